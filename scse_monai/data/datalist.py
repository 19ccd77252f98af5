"""Patient-level folds, class voxel counts, atomic file writes and the MONAI (decathlon-style) datalist."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import write_text_atomic
from .errors import DataPreparationError

__all__ = ["assign_folds", "count_classes", "write_datalist", "save_nifti_atomic", "atomic_replace_all"]


def check_folds(n_patients: int, folds: int) -> int:
    """The number of folds to use (checked before any work): ``folds``, or ``n_patients`` when there are fewer.

    Fewer patients than ``--folds`` (a handful of test patients) gives one patient per fold, said on stderr.

    Raises:
        DataPreparationError: ``folds < 1`` or no patients.
    """
    if folds < 1 or n_patients < 1:
        raise DataPreparationError(f"--folds {folds} needs folds >= 1 and at least one patient (found {n_patients})")
    if folds > n_patients:
        import sys

        print(f"note: --folds {folds} but {n_patients} patients: using {n_patients} folds", file=sys.stderr)
        return n_patients
    return folds


def check_out_dir(out: Path, name: str) -> None:
    """Refuse to mix datasets: ``out/datalist.json`` must be absent or have the same ``name``."""
    path = Path(out) / "datalist.json"
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != name:
            raise DataPreparationError(
                f"holds a different prepared dataset ({old!r}, not {name!r}); choose another --out", file=path
            )


def assign_folds(patients: Sequence[str], folds: int, seed: int = 0) -> dict[str, int]:
    """Assign each patient to one of ``folds`` folds (shuffled with ``seed``, sizes differ by at most one).

    Splitting is by patient, so all slices of one patient end up in the same fold.

    Args:
        patients: patient ids (duplicates are collapsed).
        folds: number of folds, 1 <= folds <= number of patients.
        seed: shuffle seed.

    Returns:
        patient id -> fold index.

    Example:
        >>> sorted(assign_folds(["1", "2", "3", "4"], folds=2, seed=0).values())
        [0, 0, 1, 1]
    """
    unique = sorted(set(patients), key=lambda p: (len(p), p))
    if not 1 <= folds <= len(unique):
        raise ValueError(f"folds must be between 1 and the number of patients ({len(unique)}), got {folds}")
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i]: int(rank % folds) for rank, i in enumerate(order)}


def count_classes(label: np.ndarray, num_classes: int) -> list[int]:
    """Voxel count of each class index ``0..num_classes-1`` in ``label``."""
    return np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes].tolist()


def _tmp_path(path: Path) -> Path:
    # keep the real suffix (nibabel picks the format from it) and stay in the same folder (os.replace is atomic)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``array`` as NIfTI to a temporary sibling of ``path`` (qform = sform = ``affine``) and return it.

    The caller renames it into place with :func:`atomic_replace_all` once every file of the case is written.
    """
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = _tmp_path(path)
    nib.save(img, tmp)
    return tmp


def atomic_replace_all(pairs: Iterable[tuple[Path, Path]]) -> None:
    """``os.replace(tmp, final)`` for each ``(tmp, final)`` pair."""
    for tmp, final in pairs:
        os.replace(tmp, final)


def write_json_atomic(obj: object, path: Path) -> None:
    """Write JSON via a temporary file in the same folder and ``os.replace``."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_datalist(
    out: Path,
    *,
    name: str,
    modality: Mapping[str, str],
    labels: Mapping[str, str],
    items: Sequence[Mapping],
    counts: Mapping[str, Sequence[int]],
    folds: int,
    seed: int,
    extra: Mapping | None = None,
) -> Path:
    """Write ``out/datalist.json`` (decathlon style) with patient-level folds and class voxel counts.

    Args:
        out: prepared dataset folder; paths in the datalist are relative to it.
        name: dataset name.
        modality: channel index -> modality, e.g. ``{"0": "MR"}``.
        labels: class index -> name, ``"0"`` is background.
        items: one dict per case with ``image``, ``label``, ``patient`` (and optional extra keys).
        counts: case image path -> per-class voxel counts (summed into ``class_voxel_counts``).
        folds: number of folds.
        seed: fold shuffle seed.
        extra: additional top-level keys (e.g. a VISCERAL overlap report).

    Returns:
        the datalist path.
    """
    fold_of = assign_folds([it["patient"] for it in items], folds, seed)
    training = [{**it, "fold": fold_of[it["patient"]]} for it in sorted(items, key=lambda it: it["image"])]
    total = np.zeros(len(labels), dtype=np.int64)
    for c in counts.values():
        total += np.asarray(c, dtype=np.int64)
    doc = {
        "name": name,
        "description": "prepared by scse_monai.data",
        "tensorImageSize": "3D",
        "modality": dict(modality),
        "labels": dict(labels),
        "numTraining": len(training),
        "folds": folds,
        "seed": seed,
        "class_voxel_counts": {str(k): int(v) for k, v in enumerate(total)},
        "training": training,
    }
    if extra:
        doc.update(extra)
    path = Path(out) / "datalist.json"
    write_json_atomic(doc, path)
    return path
