"""Request guards of the MONAI Label app: ids not paths, checked uploads, CORS allow-list, 4xx errors not 500s.

MONAI Label 0.8.5 does not guard these itself:

- its ``LocalDatastore`` joins request-supplied image ids and label tags onto the studies folder, so ``..``, an
  absolute path or ``.scse_monai/...`` reach files outside the studies or the served weights;
- its FastAPI app answers CORS for any origin, with credentials;
- an upload is registered without being read, whatever its size;
- invalid JSON in ``params`` and most errors inside a route end as a bare HTTP 500;
- ``POST /train`` merges any JSON keys into the train request (``model_filename`` becomes a path that is read,
  ``tracking_uri`` a place that is written);
- ``/model`` replaces, deletes and serves the weights, ``/session`` stores uploads outside the studies folder,
  ``/logs`` serves the server's log to anyone who reaches the port.

:class:`RequestGuard` wraps the whole ASGI application (outside MONAI Label's own middleware) and
:class:`GuardedDatastore` replaces the local datastore; ``main.py`` installs both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from monailabel.utils.others.generic import device_list

__all__ = [
    "TRAIN_OPTIONS",
    "GuardedDatastore",
    "RequestGuard",
    "check_id",
    "check_image_file",
    "check_train_options",
    "install_guard",
    "is_id",
]

logger = logging.getLogger(__name__)

#: Query parameters that name datastore objects; each must be an id, never a path.
ID_PARAMS = ("image", "label", "id", "tag", "label_tag", "session_id")
#: Image formats accepted for upload (read with nibabel before they are registered).
UPLOAD_SUFFIXES = (".nii.gz", ".nii")
_BAD_ID_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
#: Routes refused whatever the method. GET /model too: no client of this app downloads weights, and the docs
#: promise that the workspace's weights are out of reach. Sessions hold uploads outside the studies folder. The log
#: holds the server's paths and request details (its page also pulls scripts from public CDNs), /logs/gpu runs a
#: program, and /proxy forwards to a DICOMweb server, which a local studies folder is not.
REFUSED_ROUTES = {
    "model": "the served weights cannot be downloaded, replaced or deleted over HTTP",
    "session": "sessions are disabled: upload with PUT /datastore/image and infer by id",
    "logs": "the server's log is read on the server (logs/app.log in the app folder), not over HTTP",
    "proxy": "this app serves a local studies folder; there is no DICOMweb server to proxy to",
}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class UploadTooLarge(Exception):
    """The request body exceeds the upload limit."""


def is_id(value: object) -> bool:
    """Whether ``value`` is a datastore id: 1-255 characters, no path separator, control character or ``..``, and
    no leading ``.`` (hidden names such as the app's ``.scse_monai`` workspace)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 255
        and not value.startswith(".")
        and ".." not in value
        and not _BAD_ID_CHARS.search(value)
    )


def check_id(value: object, what: str = "image") -> str:
    """Return ``value`` if it is a datastore id (see :func:`is_id`); else raise HTTP 400."""
    if not is_id(value):
        raise HTTPException(status_code=400, detail=f"{what} {value!r} is not an id (no path, no '..', no leading dot)")
    return value


def _is_device(value: object) -> bool:
    return isinstance(value, str) and (
        value in ("cpu", "cuda") or re.fullmatch(r"cuda:\d{1,2}", value) is not None or value in device_list()
    )


def _is_number(value: object, low: float, high: float) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and low <= value < high


#: Train options a client may send in the JSON body of ``POST /train/<model>``: key -> (check, what it must be).
TRAIN_OPTIONS: dict[str, tuple[Callable[[object], bool], str]] = {
    "max_epochs": (lambda v: type(v) is int and 1 <= v <= 1000, "an integer from 1 to 1000"),
    "val_split": (lambda v: _is_number(v, 0.0, 1.0), "a number from 0 to below 1"),
    "device": (_is_device, "'cpu', 'cuda', 'cuda:N' or a device name listed by /info/"),
    "pretrained": (lambda v: type(v) is bool, "true or false"),
}


def check_train_options(body: bytes) -> None:
    """The JSON body of a train request may set only the :data:`TRAIN_OPTIONS`, each with a valid value.

    Raises:
        HTTPException: 400 with a one-line message naming the refused key or value.
    """
    if not body.strip():
        return
    try:
        options = json.loads(body)
    except ValueError:
        raise HTTPException(status_code=400, detail="train options must be a JSON object") from None
    if options is not None and not isinstance(options, dict):
        raise HTTPException(status_code=400, detail="train options must be a JSON object")
    for key, value in (options or {}).items():
        if key not in TRAIN_OPTIONS:
            raise HTTPException(
                status_code=400, detail=f"train option {key!r:.60} is not accepted; allowed: {', '.join(TRAIN_OPTIONS)}"
            )
        check, expected = TRAIN_OPTIONS[key]
        if not check(value):
            raise HTTPException(status_code=400, detail=f"train option {key!r} must be {expected}, not {value!r:.60}")


def check_image_file(path: str | os.PathLike, what: str, max_bytes: int) -> None:
    """An uploaded file must be a readable 3D (or 3D + channels) NIfTI volume of finite values within the limit.

    Raises:
        HTTPException: 413 too large, 415 not a NIfTI file name, 422 unreadable, wrong shape or non-finite.
    """
    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise HTTPException(status_code=413, detail=f"{what}: larger than the upload limit of {max_bytes} bytes")
    if not path.name.endswith(UPLOAD_SUFFIXES):
        raise HTTPException(status_code=415, detail=f"{what}: upload a NIfTI volume ({', '.join(UPLOAD_SUFFIXES)})")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"{what}: not a readable NIfTI image ({type(e).__name__})") from e
    if data.ndim not in (3, 4) or min(data.shape) < 1:
        raise HTTPException(status_code=422, detail=f"{what}: expected a 3D volume, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise HTTPException(status_code=422, detail=f"{what}: holds non-finite voxels (NaN/inf)")


@contextmanager
def _removed_if_refused(upload: str) -> Iterator[None]:
    """Delete the upload's temporary file when the block raises. MONAI Label removes it in a background task that
    does not run when the route fails; only files in the server's temporary folder are touched."""
    try:
        yield
    except Exception:
        path = Path(upload).resolve()
        if path.parent == Path(tempfile.gettempdir()).resolve():
            path.unlink(missing_ok=True)
        raise


class GuardedDatastore(LocalDatastore):
    """MONAI Label's local datastore with ids checked and uploads read before anything is copied.

    Args:
        datastore_path: the studies folder.
        max_upload_bytes: largest accepted image or label file.
        **kwargs: passed to ``LocalDatastore``.
    """

    def __init__(self, datastore_path: str, max_upload_bytes: int, **kwargs: Any):
        self.max_upload_bytes = max_upload_bytes
        super().__init__(datastore_path, **kwargs)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        with _removed_if_refused(image_filename):
            image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
            check_id(image_id, "image")
            check_image_file(image_filename, f"image {image_id}", self.max_upload_bytes)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        with _removed_if_refused(label_filename):
            check_id(image_id, "image")
            check_id(label_tag, "tag")
            if not self.get_image_uri(image_id):
                raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r} in the studies folder")
            check_image_file(label_filename, f"label of {image_id}", self.max_upload_bytes)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(image_id) if is_id(image_id) else ""  # a path is never found

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(label_id, label_tag) if is_id(label_id) and is_id(label_tag) else ""


def _error_for(exc: BaseException) -> tuple[int, str]:
    """HTTP status and message for an exception that escaped a route."""
    if isinstance(exc, UploadTooLarge):
        return 413, str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return 400, f"params is not valid JSON ({exc.msg} at character {exc.pos})"
    if isinstance(exc, ImageNotFoundException | LabelNotFoundException | FileNotFoundError):
        return 404, str(exc) or type(exc).__name__
    if isinstance(exc, MONAILabelException):
        status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
        return status, exc.msg
    if isinstance(exc, ValueError):
        return 422, str(exc)
    return 500, f"internal error ({type(exc).__name__}: {exc}); see the server log"


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _route(scope: Scope) -> str:
    """The first segment of the request path after MONAI Label's API prefix: ``train`` for ``/train/scse_unet``."""
    path = scope.get("path", "")
    prefix = settings.MONAI_LABEL_API_STR.rstrip("/")
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    return next((part for part in path.split("/") if part), "")


async def _checked_train_body(receive: Receive) -> tuple[tuple[int, str] | None, Receive]:
    """Read a train request's whole body, check it with :func:`check_train_options`, and replay it to the app.

    Returns:
        the refusal (status, message) or ``None``, and the ``receive`` to pass on.
    """
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    try:
        check_train_options(body)
    except HTTPException as e:
        return (e.status_code, str(e.detail)), receive
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return None, replay


def _origin_allowed(origin: str, host: str, allowed: Iterable[str]) -> bool:
    if origin in allowed:
        return True
    # the server's own pages (same origin) on a loopback address; a DNS name could be rebound, an IP cannot
    parts = urlsplit(origin)
    return parts.netloc == host and (parts.hostname or "") in _LOOPBACK


class RequestGuard:
    """ASGI wrapper around MONAI Label's FastAPI app.

    - Requests with an ``Origin`` that is not allowed are refused with 403 (preflight included), so a web page
      cannot drive the server; allowed are the ``cors_origins`` allow-list and the server's own loopback origin.
    - Query parameters that name datastore objects (:data:`ID_PARAMS`) must be ids, and no path segment may be
      ``..``: 400 otherwise.
    - ``/model``, ``/session``, ``/logs`` and ``/proxy`` (:data:`REFUSED_ROUTES`) are refused with 403.
    - The JSON body of ``POST /train`` may set only the :data:`TRAIN_OPTIONS`: 400 naming the key otherwise.
    - Request bodies larger than ``max_upload_bytes`` are refused with 413.
    - An exception that escapes a route becomes a JSON error with a 4xx status where the cause is the request
      (invalid JSON, unknown id, unreadable input), never a bare 500.

    Args:
        app: the ASGI application to wrap.
        allowed_origins: origins allowed to make cross-origin requests.
        max_upload_bytes: body size limit (a multipart upload's overhead included).
    """

    def __init__(self, app: Callable, allowed_origins: Iterable[str], max_upload_bytes: int):
        self.app = app
        self.allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins if o)
        self.max_upload_bytes = max_upload_bytes

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin and not _origin_allowed(origin, headers.get("host", ""), self.allowed_origins):
            return 403, f"cross-origin request from {origin} refused (the app's cors_origins setting allows origins)"
        if ".." in scope.get("path", "").split("/"):
            return 400, "'..' is not allowed in the request path"
        route = _route(scope)
        if route in REFUSED_ROUTES:
            return 403, f"{scope.get('method')} {scope.get('path')}: {REFUSED_ROUTES[route]}"
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in ID_PARAMS and value:
                try:
                    check_id(value, key)
                except HTTPException as e:
                    return e.status_code, str(e.detail)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload_bytes:
            return 413, f"request body of {length} bytes is larger than the upload limit of {self.max_upload_bytes}"
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_upload_bytes:
                raise UploadTooLarge(f"request body is larger than the upload limit of {self.max_upload_bytes} bytes")
            return message

        return receive_limited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        receive = self._limited(receive)
        if not refusal and scope.get("method") == "POST" and _route(scope) == "train":
            try:
                refusal, receive = await _checked_train_body(receive)
            except UploadTooLarge as e:
                refusal = 413, str(e)
        if refusal:
            await _send_json(send, *refusal)
            return
        held: list[Message] = []  # a 5xx response, kept until we know whether an exception explains it
        started = False

        async def send_guarded(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and message["status"] >= 500 and not started:
                held.append(message)
                return
            if held:
                held.append(message)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_guarded)
        except Exception as exc:
            if started:
                raise
            status, detail = _error_for(exc)
            logger.warning(
                f"{scope.get('method')} {scope.get('path')}: HTTP {status}: {detail}", exc_info=status >= 500
            )
            await _send_json(send, status, detail)
            return
        for message in held:
            await send(message)


def install_guard(allowed_origins: Iterable[str], max_upload_bytes: int) -> bool:
    """Wrap the running MONAI Label server's ASGI stack in :class:`RequestGuard` (once).

    Called when the app enters server mode, i.e. after FastAPI built its middleware stack; outside the server
    (for example in a training subprocess) there is nothing to wrap and nothing happens.

    Returns:
        whether the guard is installed.
    """
    import sys

    server = sys.modules.get("monailabel.app")
    fastapi_app = getattr(server, "app", None)
    if fastapi_app is None:
        return False
    stack = fastapi_app.middleware_stack or fastapi_app.build_middleware_stack()
    if isinstance(stack, RequestGuard):
        return True
    fastapi_app.middleware_stack = RequestGuard(stack, allowed_origins, max_upload_bytes)
    generate = fastapi_app.openapi

    def openapi() -> dict[str, Any]:
        """The API schema without the refused routes: /openapi.json and /docs do not advertise them."""
        schema = generate()
        schema["paths"] = {p: v for p, v in schema["paths"].items() if _route({"path": p}) not in REFUSED_ROUTES}
        return schema

    # FastAPI's documented way to customise the schema; a route's include_in_schema does not reach the routers that
    # FastAPI 0.165 includes lazily (they are not in app.routes)
    fastapi_app.openapi = openapi
    return True
