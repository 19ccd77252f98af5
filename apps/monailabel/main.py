"""The MONAI Label app: one segmentation model from the scse_monai bundle, with inference and training.

``--conf`` keys (all optional):
    ``bundle``: source bundle folder (default: the repository's ``bundle/``).
    ``workspace``: the writable copy that is served and fine-tuned (default ``STUDIES/.scse_monai/bundle``).
    ``model``: model name in ``/info/`` and ``/infer/<model>`` (default ``scse_unet``).
    ``preload``: ``true`` to load the weights at start-up.
    ``cors_origins``: comma-separated origins allowed to make cross-origin requests (default none: CORS off).
    ``max_upload_mb``: largest accepted request body / uploaded image or label, in MiB (default 1024); a finite
    number > 0, else the app fails to start with a ValueError naming the key (after the start-up traceback).

Requests are guarded by ``lib/security.py``: datastore ids are ids, never paths; ``/infer`` takes only datastore
ids; uploads are read before they are registered; train requests set only a few options; the weights
(``/model``) and sessions are out of reach; errors are 4xx with a message; temporary files stay in the
workspace's ``.uploads-tmp`` (docs/apps.md, security model).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

from fastapi import HTTPException
from lib.infers import BundleSegmentationInferTask
from lib.security import GuardedDatastore, install_guard, is_id
from lib.trainers import BundleSegmentationTrainTask
from lib.workspace import default_bundle, prepare_workspace, read_metadata
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.utils.others.generic import strtobool

from scse_monai.apps.organs import organ_labels

logger = logging.getLogger(__name__)


def upload_limit_bytes(conf: dict[str, str]) -> int:
    """The ``max_upload_mb`` conf value (default 1024 MiB) in bytes.

    Raises:
        ValueError: one line naming the conf key, unless the value is a finite number greater than 0.
    """
    value = conf.get("max_upload_mb", "1024")
    try:
        mib = float(value)
    except (TypeError, ValueError):
        mib = math.nan
    if not (math.isfinite(mib) and mib > 0):
        raise ValueError(f"--conf max_upload_mb {value!r}: must be a finite number of MiB greater than 0")
    return max(1, int(mib * 1024 * 1024))


#: the server's temporary folder, inside the workspace (see :func:`use_temp_dir`)
UPLOADS_TMP = ".uploads-tmp"


def use_temp_dir(folder: Path, empty: bool = False) -> Path:
    """Make ``folder`` this process's temporary folder (``empty``: remove what an earlier server left there).

    MONAI Label writes every upload and infer result to a temporary file and removes it only after the route
    succeeds, so failed requests left files in the system's temporary folder, outside the studies and the
    workspace. The server empties ``folder`` when it starts; processes MONAI Label starts for tasks only use it.
    """
    if empty:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(folder)
    return folder


class SEBundleApp(MONAILabelApp):
    """MONAI Label app serving the scse_monai bundle (liver, right kidney, left kidney, spleen).

    Args:
        app_dir: this folder (given by MONAI Label).
        studies: the studies folder (given by ``--studies``).
        conf: ``--conf`` key/value pairs, see the module docstring.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.max_upload_bytes = upload_limit_bytes(conf)  # before anything is written
        source = Path(conf.get("bundle") or default_bundle())
        workspace = Path(conf.get("workspace") or Path(studies) / ".scse_monai" / "bundle")
        self.bundle_dir = prepare_workspace(source, workspace)
        self.temp_dir = use_temp_dir(self.bundle_dir / UPLOADS_TMP)
        self.model_name = conf.get("model", "scse_unet")
        self.cors_origins = [o.strip() for o in conf.get("cors_origins", "").split(",") if o.strip()]
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

    def init_datastore(self):
        """The studies folder as a :class:`GuardedDatastore` (ids checked, uploads read); local folders only."""
        if self.studies.startswith(("http://", "https://")):
            raise ValueError(f"studies {self.studies}: this app serves a local studies folder only")
        return GuardedDatastore(
            self.studies,
            max_upload_bytes=self.max_upload_bytes,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def server_mode(self, mode: bool):
        """Entering server mode wraps the server's ASGI stack in the request guard (lib/security.py)."""
        super().server_mode(mode)
        if not mode:
            return
        use_temp_dir(self.temp_dir, empty=True)  # the server process only, before any request
        if not install_guard(self.cors_origins, self.max_upload_bytes):  # never serve without the guard
            raise RuntimeError("the request guard could not wrap MONAI Label's server (monailabel.app.app not found)")
        logger.info(f"Request guard on; CORS origins allowed: {self.cors_origins or 'none'}")

    def infer(self, request, datastore=None):
        """MONAI Label's infer for datastore ids only; unknown model or image 404, a bad request 400 or 422.

        MONAI Label reads any existing path given as ``image`` (query or ``params``), and an uploaded file arrives
        as a temporary path: both are refused. The id is resolved here to its file inside the studies folder.
        """
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {list(self._infers)}")
        image = request.get("image")
        if not is_id(image):
            raise HTTPException(
                status_code=400,
                detail="image must be the id of a study in the datastore (upload with PUT /datastore/image first)",
            )
        for key in ("label_tag", "tag"):
            if key in request and not is_id(request[key]):
                raise HTTPException(status_code=400, detail=f"{key} {request[key]!r} is not an id")
        store = datastore if datastore else self.datastore()
        uri = store.get_image_uri(image)
        if not uri:
            raise HTTPException(status_code=404, detail=f"unknown image id {image!r} in the studies folder")
        try:
            return super().infer({**request, "image": uri}, datastore)
        except (ValueError, OSError, RuntimeError) as e:
            cause = e.__cause__ if isinstance(e, RuntimeError) else e  # MONAI wraps a transform's error
            if not isinstance(cause, ValueError | OSError):
                raise
            # the image is unreadable, or the bundle's CheckInputd refuses it (non-finite, wrong shape)
            logger.warning(f"infer {image}: {type(cause).__name__}: {cause}")
            raise HTTPException(status_code=422, detail=f"image {image!r}: {cause}") from e
