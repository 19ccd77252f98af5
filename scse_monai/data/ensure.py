"""Offline default dataset for the bundle and ``make demo``: synthesize + prepare once, safely under torchrun."""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path

from .chaos import prepare_chaos
from .synthetic import synthesize
from .visceral import prepare_visceral

__all__ = ["ensure_synthetic_dataset"]

_TASK = {"chaos-mr": "mr-t2spir", "chaos-ct": "ct-liver", "visceral": None}


def ensure_synthetic_dataset(dataset_dir: str | Path, layout: str = "chaos-mr", cases: int = 6, seed: int = 0) -> Path:
    """Return ``dataset_dir/datalist.json``, creating a small synthetic prepared dataset there if absent.

    Raw data is synthesized in the native layout into a temporary folder next to ``dataset_dir``, prepared with
    the same code as real data into another temporary folder, and that folder is renamed to ``dataset_dir`` in one
    step. An exclusive file lock (``<dataset_dir>.lock``) makes concurrent callers (e.g. torchrun ranks) wait for
    the first one and then reuse its result. Cases: 96x96 in-plane, 12-20 slices.

    Args:
        dataset_dir: prepared dataset folder.
        layout: ``"chaos-mr"`` (T2-SPIR, 4 organs), ``"chaos-ct"`` (liver) or ``"visceral"`` (CT, 16 structures).
        cases: number of synthetic patients (>= 2 for 2 folds).
        seed: random seed.

    Returns:
        path of the datalist.

    Raises:
        FileExistsError: ``dataset_dir`` exists, is not empty and has no datalist.json (never overwritten).

    Example:
        >>> datalist = ensure_synthetic_dataset(tmp_path / "demo")  # doctest: +SKIP
    """
    if layout not in _TASK:
        raise ValueError(f"layout must be one of {sorted(_TASK)}, got {layout!r}")
    dataset_dir = Path(dataset_dir)
    datalist = dataset_dir / "datalist.json"
    if datalist.exists():
        return datalist
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(dataset_dir.parent / f".{dataset_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if datalist.exists():  # another process finished while we waited
            return datalist
        if dataset_dir.exists():
            if any(dataset_dir.iterdir()):
                raise FileExistsError(f"{dataset_dir} exists, is not empty and has no datalist.json; not overwriting")
            dataset_dir.rmdir()
        work = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.tmp-", dir=dataset_dir.parent))
        try:
            raw = synthesize(layout, work / "raw", cases=cases, seed=seed, size=96, slices=(12, 20), progress=False)
            prepared = work / "prepared"
            folds = min(5, cases)
            if layout == "visceral":
                prepare_visceral(raw, prepared, folds=folds, seed=seed, workers=1, progress=False)
            else:
                prepare_chaos(raw, _TASK[layout], prepared, folds=folds, seed=seed, workers=1, progress=False)
            prepared.rename(dataset_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return datalist
