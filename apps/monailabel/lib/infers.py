"""Segmentation infer task built from the bundle's ``inference.json`` and ``models/model.pt``.

MONAI Label's own ``BundleInferTask`` cannot be used here: its module imports ``monailabel.transform.post``,
which imports torchvision, and torchvision does not import beside the CPU torch wheel. This task does the same
job on ``BasicInferTask`` with what the bundle declares: ``network_def``, ``preprocessing``, ``inferer`` and
``postprocessing`` (whose ``Invertd`` already returns the label map on the input grid, so no ``Restored``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.inferers import Inferer
from monai.transforms import Compose, SqueezeDimd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from torch.nn import Module

from scse_monai.apps.organs import organ_labels

from .workspace import read_metadata

__all__ = ["BundleSegmentationInferTask"]

logger = logging.getLogger(__name__)


class BundleSegmentationInferTask(BasicInferTask):
    """3D label maps from a bundle whose 2D network runs slice by slice (``SliceInferer``) over volumes.

    Reported to clients as ``dimension=3``: the bundle consumes and returns volumes even though the network is 2D.
    Labels are the organ names of ``metadata.json`` ``channel_def`` (lower case, without background). Weights are
    loaded strictly, so a checkpoint that does not fit ``network_def`` fails instead of running half-initialised.
    ``network_def`` is rebuilt whenever ``model.pt`` changes, since that may change its number of networks
    (fine-tuning replaces the shipped ensemble by one network).

    Args:
        bundle_dir: bundle folder (the app's workspace copy).
        preload: load the weights at start-up rather than on the first request.

    Example:
        >>> task = BundleSegmentationInferTask("studies/.scse_monai/bundle")  # doctest: +SKIP
    """

    def __init__(self, bundle_dir: str | Path, preload: bool = False):
        self.bundle_dir = Path(bundle_dir)
        self.parser = ConfigParser()
        self.parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        self.parser["bundle_root"] = str(self.bundle_dir)
        metadata = read_metadata(self.bundle_dir)
        self.image_key, self.pred_key = (
            next(iter(metadata["network_data_format"][part])) for part in ("inputs", "outputs")
        )
        model = self.bundle_dir / "models" / "model.pt"
        self._built_for = _mtime(model)  # the model.pt that network_def was built for
        super().__init__(
            path=str(model),
            network=self._network_def(),
            type=InferType.SEGMENTATION,
            labels={name: value for value, name in organ_labels(metadata).items()},
            dimension=3,
            description=metadata.get("description", ""),
            input_key=self.image_key,
            output_label_key=self.pred_key,
            load_strict=True,
            preload=preload,
        )
        self.version = metadata.get("version")

    def _network_def(self) -> Module:
        # a parser of its own: re-resolving the shared one would re-create the preprocessing that Invertd inverts;
        # inference.json reads from model.pt how many networks it holds (ensemble_size)
        parser = ConfigParser()
        parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser["bundle_root"] = str(self.bundle_dir)
        return parser.get_parsed_content("network_def")

    def _get_network(self, device, data):
        path = self.get_path()
        mtime = _mtime(path)
        if mtime != self._built_for:  # BasicInferTask then reloads the weights into a copy of the new network
            logger.info(f"{path} changed; rebuilding network_def for it")
            self.network, self._built_for = self._network_def(), mtime
        return super()._get_network(device, data)

    def _without_image_prefixed_strings(self, data: dict, run: Callable[[dict], dict]) -> dict:
        # MONAI 1.6's Spacingd copies the image's meta into every "<key>_*" entry of the data dict that it takes
        # for a meta dict; MONAI Label's request carries "image_path" (a str), which makes Spacingd raise. Hide
        # such entries while the bundle's transforms run, then put them back for the writer.
        prefix = f"{self.image_key}_"
        hidden = {k: data.pop(k) for k in list(data) if k.startswith(prefix) and isinstance(data[k], str)}
        result = run(data)
        result.update(hidden)
        return result

    def run_pre_transforms(self, data: dict[str, Any], transforms):
        run = super().run_pre_transforms
        return self._without_image_prefixed_strings(data, lambda d: run(d, transforms))

    def run_post_transforms(self, data: dict[str, Any], transforms):
        run = super().run_post_transforms
        return self._without_image_prefixed_strings(data, lambda d: run(d, transforms))

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["version"] = self.version
        return info

    def _transforms(self, key: str) -> list:
        # The parser caches what it instantiates, so the Invertd of "postprocessing" refers to the very Compose
        # that "preprocessing" returns here (the inverse itself is driven by each image's applied operations).
        compose = self.parser.get_parsed_content(key, instantiate=True)
        return list(compose.transforms) if isinstance(compose, Compose) else list(compose)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return self._transforms("preprocessing")

    def inferer(self, data=None) -> Inferer:
        return self.parser.get_parsed_content("inferer", instantiate=True)

    def inverse_transforms(self, data=None) -> None:
        return None  # the bundle's postprocessing inverts its preprocessing itself (Invertd)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        # SaveImaged dropped: the server writes the result itself.
        transforms = [t for t in self._transforms("postprocessing") if "SaveImage" not in type(t).__name__]
        # (1, H, W, D) -> (H, W, D): MONAI Label's writer treats a leading axis as channels.
        return transforms + [SqueezeDimd(keys=self.pred_key, dim=0)]


def _mtime(path: str | Path | None) -> int | None:
    return os.stat(path).st_mtime_ns if path and os.path.exists(path) else None
