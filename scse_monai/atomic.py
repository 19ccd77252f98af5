"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

A reader (or a run killed half-way) sees either the old complete file or the new complete file, never a
truncated one. Every writer of results, checkpoints and datalists in the package goes through here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["process_alive", "work_folder", "write_atomically", "write_bytes_atomic", "write_text_atomic"]


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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (our own pid counts as gone: an earlier process had the same id)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work_folder(folder: str | os.PathLike, prefix: str) -> Path:
    """A fresh folder ``<prefix><pid>-*`` inside ``folder`` for work that is moved into place once complete.

    Folders of that prefix that a process no longer running left behind (killed before its clean-up) are removed
    first; those of running processes are left alone.

    Example::

        >>> work = work_folder("out", ".seg-partial-")  # out/.seg-partial-4242-k3j2x1
    """
    folder = Path(folder)
    for stale in folder.glob(f"{prefix}*"):
        pid = stale.name[len(prefix) :].split("-")[0]
        if stale.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder))
