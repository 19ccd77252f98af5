"""The error for bad input a user can fix, and how ``python -m monai.bundle`` shows it: one line, no traceback."""

from __future__ import annotations

import sys

__all__ = ["InputError", "input_error_in", "under_bundle_cli"]


class InputError(ValueError):
    """Bad input a user can fix (NaN voxels, a wrong shape, an unreadable file); the message names the file.

    Anywhere else it is an ordinary ``ValueError``. Under ``python -m monai.bundle`` the bundle ends the program
    with ``error: <message>`` and exit code 1 instead of a traceback (:class:`scse_monai.handlers.ExitOnInputError`).

    Example:
        >>> isinstance(InputError("image a.nii.gz: expected 1 channel(s), got 2"), ValueError)
        True
    """


def under_bundle_cli() -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (the command line, not a library caller)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in ("monai.bundle.__main__", "monai.bundle")


def input_error_in(error: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``error``, or ``None``: MONAI and ignite wrap a transform's error in others.

    Example:
        >>> try:
        ...     try:
        ...         raise InputError("image a.nii.gz: 3 of 8 voxels are not finite")
        ...     except InputError as e:
        ...         raise RuntimeError("applying transform CheckInputd") from e
        ... except RuntimeError as wrapped:
        ...     str(input_error_in(wrapped))
        'image a.nii.gz: 3 of 8 voxels are not finite'
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None
