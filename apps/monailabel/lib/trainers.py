"""Train task built from the bundle's ``train.json``: fine-tunes the served weights on the studies' final labels.

Built on MONAI Label's ``BundleTrainTask`` (which overrides ``bundle_root``, ``device``,
``train#trainer#max_epochs``, ``train#dataset#data``, ``validate#dataset#data`` and ``train#handlers`` and runs
``monai.bundle.run``); what this bundle needs beyond that is set in :meth:`_update_overrides`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.train.bundle import BundleTrainTask

from scse_monai.atomic import write_atomically, write_text_atomic
from scse_monai.networks import ensemble_size, member_state

from .security import TRAIN_OPTIONS
from .workspace import read_metadata

__all__ = ["BundleSegmentationTrainTask"]

logger = logging.getLogger(__name__)

#: what a train request gets for the options it leaves out (also what ``/info/`` shows); MONAI Label's own
#: default would be 50 epochs
TRAIN_DEFAULTS = {"max_epochs": 10, "val_split": 0.2}


class BundleSegmentationTrainTask(BundleTrainTask):
    """Fine-tune from ``models/model.pt`` on every image of the datastore that has a final label.

    The loss is ``train.json``'s, an unweighted ``DiceCELoss``. A ``datalist.json`` with the labelled images and
    the metadata's class names is written into the workspace, so the bundle's default synthetic data set is never
    used; resuming from older epoch checkpoints is off, because every request is a new fine-tuning run. Of a
    request only the client options of ``TRAIN_OPTIONS`` (``lib/security.py``) reach MONAI Label's train task: the
    weights file, tracking and multi-GPU settings are fixed here, never taken from a client. The served weights
    load strictly: weights that do not fit fail the request. Checkpoints are written into the workspace's
    ``models/``: the best-metric one replaces ``model.pt``, which the infer task then reloads. When ``model.pt``
    holds an ensemble (the shipped weights), its first network is fine-tuned, and the fine-tuned ``model.pt``
    holds that one network.

    Args:
        bundle_dir: bundle folder (the app's workspace copy).
        conf: the app's ``--conf`` values.

    Example:
        >>> task = BundleSegmentationTrainTask("studies/.scse_monai/bundle", {})  # doctest: +SKIP
    """

    def __init__(self, bundle_dir: str | Path, conf: dict[str, str]):
        super().__init__(str(bundle_dir), conf, load_strict=True)  # weights that do not fit fail, not skip

    def config(self) -> dict:
        """The train options shown to clients (``/info/``): exactly the ones a request may set."""
        options = {**super().config(), **TRAIN_DEFAULTS}
        return {key: options[key] for key in TRAIN_OPTIONS}

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        """Train with the request's client options only; ``model.pt``, no tracking, one device."""
        options = {key: value for key, value in request.items() if key in TRAIN_OPTIONS or key == "model"}
        return super().__call__({**TRAIN_DEFAULTS, **options, "multi_gpu": False}, datastore)

    def _fetch_datalist(self, request, datastore: Datastore) -> list[dict]:
        datalist = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d]
        if not datalist:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, "no image in the studies folder has a final label to train on"
            )
        _check_label_values(datalist, len(self._channel_def()))  # before anything is written
        return datalist

    def _channel_def(self) -> dict:
        metadata = read_metadata(self.bundle_path)
        return next(iter(metadata["network_data_format"]["outputs"].values()))["channel_def"]

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle)
        if val is not None and not val and len(datalist) > 1:  # too few images for the ratio: keep one for val
            train, val = datalist[:-1], datalist[-1:]
        elif val is not None and not val:
            val = list(train)  # a single labelled image: validate on it rather than not at all
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        if not pretrained:  # train from scratch; MONAI Label 0.8.5 would call os.path.exists(None) here
            return
        if os.path.exists(model_pytorch) and ensemble_size(model_pytorch) > 1:
            first = Path(self.bundle_path) / "monailabel_train" / "pretrained_network_0.pt"
            write_atomically(first, lambda tmp: torch.save(member_state(model_pytorch, 0), tmp))
            logger.info(f"{model_pytorch} holds an ensemble: fine-tuning its first network")
            model_pytorch = str(first)
        super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def _update_overrides(self, overrides: dict) -> dict:
        train_items = overrides[self.const.key_train_dataset_data()]
        work = Path(self.bundle_path) / "monailabel_train"
        channel_def = self._channel_def()
        datalist = {  # the keys of a datalist.json from scse_monai.data that the train config reads
            "name": "monailabel",
            "labels": {str(k): v for k, v in channel_def.items()},
            "training": train_items,
        }
        write_text_atomic(work / "datalist.json", json.dumps(datalist, indent=2))
        overrides.update(
            {
                "dataset_dir": str(work),
                "datalist_file": str(work / "datalist.json"),
                "synthetic_if_missing": False,
                "resume": False,
                "cache_rate": 0.0,
                "num_workers": 0,
            }
        )
        logger.info(f"Fine-tuning on {len(train_items)} labelled images")
        return overrides


def _check_label_values(items: list[dict], num_classes: int) -> None:
    """Refuse a label holding values outside ``0..num_classes-1`` (the bundle's ``channel_def``), naming it: such a
    value would otherwise stop training deep inside the loss."""
    for item in items:
        label = np.asarray(nib.load(item["label"]).dataobj)
        if label.size and (label.min() < 0 or label.max() >= num_classes):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"label {item['label']}: values outside 0..{num_classes - 1}"
            )
