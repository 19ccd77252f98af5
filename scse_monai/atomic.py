"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

A reader (or a run killed half-way) sees either the old complete file or the new complete file, never a
truncated one. Every writer of results, checkpoints and datalists in the package goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically", "write_bytes_atomic", "write_text_atomic"]


def write_atomically(path: str | os.PathLike, write: Callable[[str], object], mode: int = 0o644) -> Path:
    """Calls ``write(tmp_path)`` on a temporary file next to ``path``, then renames it to ``path``.

    Args:
        path: destination; its folder is created if needed.
        write: writes the whole content to the temporary path it is given.
        mode: permissions of the result (``mkstemp`` creates 0600; results are meant to be shared).

    Returns:
        ``path`` as a ``Path``.

    Example::

        >>> write_atomically("out/model.pt", lambda tmp: torch.save(state, tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 ``text`` to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
