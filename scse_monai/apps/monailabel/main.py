"""The MONAI Label app: one segmentation model from the scse_monai bundle, with inference and training.

``--conf`` keys (all optional):
    ``bundle``: source bundle folder (default: the repository's ``bundle/``).
    ``workspace``: the writable copy that is served and fine-tuned (default ``STUDIES/.scse_monai/bundle``).
    ``model``: model name in ``/info/`` and ``/infer/<model>`` (default ``scse_unet``).
    ``preload``: ``true`` to load the weights at start-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.utils.others.generic import strtobool

from scse_monai.apps.monailabel.lib.infers import BundleSegmentationInferTask
from scse_monai.apps.monailabel.lib.trainers import BundleSegmentationTrainTask
from scse_monai.apps.monailabel.lib.workspace import default_bundle, prepare_workspace, read_metadata
from scse_monai.apps.organs import organ_labels

logger = logging.getLogger(__name__)


class SEBundleApp(MONAILabelApp):
    """MONAI Label app serving the scse_monai bundle (liver, right kidney, left kidney, spleen).

    Args:
        app_dir: this folder (given by MONAI Label).
        studies: the studies folder (given by ``--studies``).
        conf: ``--conf`` key/value pairs, see the module docstring.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        source = Path(conf.get("bundle") or default_bundle())
        workspace = Path(conf.get("workspace") or Path(studies) / ".scse_monai" / "bundle")
        self.bundle_dir = prepare_workspace(source, workspace)
        self.model_name = conf.get("model", "scse_unet")
        metadata = read_metadata(self.bundle_dir)
        labels = {name: value for value, name in organ_labels(metadata).items()}
        logger.info(f"Serving bundle {source} (version {metadata.get('version')}) from {self.bundle_dir}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="scse_monai",
            description=metadata.get("task", "SE-UNet abdominal organ segmentation"),
            version=str(metadata.get("version", "")),
            labels=labels,
        )

    def init_infers(self):
        preload = bool(strtobool(self.conf.get("preload", "false")))
        return {self.model_name: BundleSegmentationInferTask(self.bundle_dir, preload=preload)}

    def init_trainers(self):
        return {self.model_name: BundleSegmentationTrainTask(self.bundle_dir, self.conf)}

    def infer(self, request, datastore=None):
        """MONAI Label's infer, but an unknown model or image id is HTTP 404, not a 500 from deep inside."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {list(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            store = datastore if datastore else self.datastore()
            if not store.get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"unknown image id {image!r} in the studies folder")
        return super().infer(request, datastore)
