"""Small functions the bundle configs call: find the dataset, split it by patient-level fold, list inputs.

The bundle's JSON configs stay declarative; what a JSON expression cannot say clearly (error messages that
name the missing file, opt-in synthetic data, fold selection) lives here.

Datalists: a folder prepared by ``python -m scse_monai.data prepare`` (``datalist.json`` with ``patient``,
``fold`` and ``class_voxel_counts``) or a plain MONAI / Medical Segmentation Decathlon task folder
(``dataset.json`` whose ``training`` list holds ``{"image", "label"}`` pairs). For the latter the folds are a
seeded split by patient (the case name stands for the patient), and :func:`class_voxel_counts` counts the
label voxels when a loss asks for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from scse_monai.errors import InputError, under_bundle_cli

__all__ = [
    "DATALIST_NAMES",
    "check_inference_input",
    "class_names",
    "class_voxel_counts",
    "inference_data",
    "partition",
    "resolve_datalist",
]

logger = logging.getLogger(__name__)

#: file names looked for in ``dataset_dir``, in this order
DATALIST_NAMES = ("datalist.json", "dataset.json")


def _fail(message: str, error: type[Exception] = FileNotFoundError) -> NoReturn:
    """Raise ``error(message)``; under ``python -m monai.bundle`` end the program with that one line.

    MONAI wraps an error raised inside a config expression in a ``RuntimeError`` with two tracebacks. A user of
    the command line gets ``error: <message>`` and exit code 1 instead; library callers (ConfigWorkflow, MONAI
    Label) get the exception.
    """
    if under_bundle_cli():
        raise SystemExit(f"error: {message}")
    raise error(message)


def resolve_datalist(dataset_dir: str, synthetic_if_missing: bool = False) -> str:
    """Returns the datalist of ``dataset_dir``: its ``datalist.json``, else its ``dataset.json``.

    Args:
        dataset_dir: a folder prepared by ``python -m scse_monai.data prepare ...``, a decathlon-style task folder
            with ``dataset.json``, or a datalist JSON file itself.
        synthetic_if_missing: only when asked (``configs/datasets/synthetic.json`` sets it): if ``dataset_dir`` is
            empty or absent, synthesize and prepare a small CHAOS-MR phantom set into it (offline). A non-empty
            folder without a datalist is never written to.

    Raises:
        FileNotFoundError: no datalist (one line naming the folder and what to pass); under
            ``python -m monai.bundle`` the program ends with that line instead (see :func:`_fail`).

    Example::

        >>> resolve_datalist("prepared/chaos_mr_t2")
        'prepared/chaos_mr_t2/datalist.json'
    """
    root = Path(dataset_dir)
    if root.is_file() and root.suffix == ".json":
        return str(root)
    for name in DATALIST_NAMES:
        if (root / name).is_file():
            return str(root / name)
    hint = (
        "pass --dataset_dir DIR: a folder prepared by `python -m scse_monai.data prepare`, or a decathlon-style "
        "folder with dataset.json (training: [{image, label}])"
    )
    if not synthetic_if_missing:
        state = "does not exist" if not root.exists() else "has no datalist.json or dataset.json"
        _fail(f"dataset_dir {root} {state}; {hint}")
    if root.is_dir() and any(p.name != ".lock" and not p.name.startswith(".") for p in root.iterdir()):
        _fail(
            f"dataset_dir {root} holds files but no datalist.json; refusing to write synthetic data into it. "
            "Give an empty folder, or a folder prepared by `python -m scse_monai.data prepare`."
        )
    from scse_monai.data import ensure_synthetic_dataset

    return str(ensure_synthetic_dataset(root))


def _load(datalist_file: str, absolute: bool = False) -> dict:
    """:func:`scse_monai.data.datalist.read_datalist`, its errors raised through :func:`_fail`."""
    from scse_monai.data.datalist import read_datalist  # here, not at the top: scse_monai.data is heavy to import

    try:
        return read_datalist(datalist_file, absolute=absolute)
    except (FileNotFoundError, InputError) as e:
        _fail(str(e), type(e))


def _with_folds(entries: list[dict], datalist_file: str, folds: int, seed: int) -> list[dict]:
    """``entries`` as they are when every one has a ``fold``; else a seeded patient-level split into folds."""
    if entries and all("fold" in e for e in entries):
        return entries
    from scse_monai.data.datalist import assign_folds, case_name

    patient = [str(e.get("patient") or case_name(e["image"])) for e in entries]
    n = len(set(patient))
    k = max(1, min(int(folds), n))
    fold_of = assign_folds(patient, k, seed) if n else {}
    logger.info(f"datalist {datalist_file} has no folds: {n} patients split into {k} folds by patient (seed {seed})")
    return [{**e, "patient": p, "fold": fold_of[p]} for e, p in zip(entries, patient, strict=True)]


def partition(
    datalist_file: str, part: str = "train", val_folds: Sequence[int] = (0,), folds: int = 5, seed: int = 0
) -> list[dict]:
    """Items of a datalist with absolute paths, split by patient-level fold.

    Args:
        datalist_file: ``datalist.json`` written by ``scse_monai.data prepare``, or a decathlon ``dataset.json``.
        part: ``"train"`` (folds not in ``val_folds``), ``"val"`` (folds in ``val_folds``) or ``"all"``.
        val_folds: folds held out for validation; none (``[]``) trains on every patient, and ``"val"`` is empty.
        folds: only for a datalist without ``fold`` keys: the number of folds of the seeded patient-level split
            (at most the number of patients; the case name stands for the patient when there is no ``patient``).
        seed: only for a datalist without ``fold`` keys: the split's seed.

    Returns:
        ``[{"image": ..., "label": ..., "patient": ..., "fold": ...}, ...]``.

    Raises:
        ValueError: unknown ``part``.
        InputError: (a ``ValueError``) the requested part is empty (e.g. only one fold) although ``val_folds`` names
            folds, or a patient appears in several folds; under ``python -m monai.bundle``, one line and exit 1.

    Example::

        >>> val = partition("prepared/datalist.json", "val", val_folds=[0])
    """
    if part not in ("train", "val", "all"):
        raise ValueError(f"part must be 'train', 'val' or 'all', got {part!r}")
    meta = _load(datalist_file, absolute=True)
    held_out = {int(f) for f in val_folds}
    entries = _with_folds(list(meta.get("training", [])), datalist_file, folds, seed)
    # a patient split across folds would leak slices of one patient into both sides
    folds_of: dict[str, set[int]] = {}
    for entry in entries:
        folds_of.setdefault(str(entry.get("patient")), set()).add(int(entry.get("fold", 0)))
    leaked = sorted(p for p, f in folds_of.items() if len(f) > 1)
    if leaked:
        _fail(f"datalist {datalist_file}: patients {leaked} appear in several folds", InputError)
    items = []
    for entry in entries:
        is_val = int(entry.get("fold", 0)) in held_out
        if part == "all" or (part == "val") == is_val:
            items.append(dict(entry))
    if not items and not (part == "val" and not held_out):  # no val_folds: train on every patient
        _fail(
            f"datalist {datalist_file}: no cases for part={part!r} with val_folds={sorted(held_out)} "
            f"(folds present: {sorted({int(e.get('fold', 0)) for e in entries})})",
            InputError,
        )
    return items


def class_names(datalist_file: str, include_background: bool = False) -> list[str]:
    """Class names in index order from the datalist's ``labels`` map.

    Example::

        >>> class_names("prepared/datalist.json")
        ['liver', 'right kidney', 'left kidney', 'spleen']
    """
    labels = _load(datalist_file).get("labels", {})
    names = [labels[k] for k in sorted(labels, key=int)]
    return names if include_background else names[1:]


def class_voxel_counts(datalist_file: str, num_classes: int | None = None) -> dict[str, int]:
    """Voxel count of each class over the datalist's training labels: ``class_voxel_counts`` when it is there,
    else counted now from the label files (a plain decathlon ``dataset.json``).

    Args:
        datalist_file: the datalist.
        num_classes: classes to count; default: the size of the datalist's ``labels`` map, else the largest
            label value found plus one.

    Returns:
        ``{"0": count, "1": count, ...}``.

    Example::

        >>> class_voxel_counts("Task09_Spleen/dataset.json")  # doctest: +SKIP
        {'0': 97652433, '1': 310254}
    """
    meta = _load(datalist_file, absolute=True)
    if meta.get("class_voxel_counts"):
        return {str(k): int(v) for k, v in meta["class_voxel_counts"].items()}
    import nibabel as nib
    import numpy as np

    n = num_classes or len(meta.get("labels", {})) or 0
    total = np.zeros(max(n, 1), dtype=np.int64)
    for entry in meta.get("training", []):
        if "label" not in entry:
            continue
        label = np.asarray(nib.load(entry["label"]).dataobj).astype(np.int64).ravel()
        counts = np.bincount(label, minlength=len(total))
        if len(counts) > len(total):
            total = np.pad(total, (0, len(counts) - len(total)))
        total += counts
    if num_classes:
        total = total[:num_classes]
    logger.info(f"datalist {datalist_file} has no class_voxel_counts: counted {len(total)} classes from its labels")
    return {str(k): int(v) for k, v in enumerate(total)}


def check_inference_input(dataset_dir: str, ckpt_path: str | None = None) -> None:
    """Fail in one line when ``dataset_dir`` holds nothing :func:`inference_data` can segment, or a volume that
    cannot be read in full (``InputError``), or ``ckpt_path`` (when given) is missing or not a readable checkpoint,
    before anything is written.

    ``inference.json`` runs this first in ``run`` (not while the workflow is created), so that creating the
    workflow and ``check_properties()`` work without data, as model-zoo's CI and MONAI Label do them.
    """
    if ckpt_path is not None:
        _check_checkpoint(ckpt_path)
    if not Path(dataset_dir).exists():
        _fail(
            f"dataset_dir {dataset_dir} does not exist; pass --dataset_dir DIR (imagesTs/ or imagesTr/ with NIfTI "
            "volumes) or --dataset_dir FILE.nii.gz"
        )
    try:
        items = inference_data(dataset_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    for item in items:
        reason = _unreadable(Path(item["image"]))
        if reason:
            _fail(f"image {item['image']} cannot be read: {reason}", InputError)


def _check_checkpoint(ckpt_path: str) -> None:
    """One line naming ``ckpt_path`` when it is missing or cannot be read as a checkpoint."""
    from scse_monai.networks import ensemble_size

    if not Path(ckpt_path).is_file():
        _fail(f"ckpt_path {ckpt_path} does not exist; pass --ckpt_path FILE (the bundle's models/model.pt)")
    try:
        ensemble_size(ckpt_path)  # reads the file: a truncated or foreign file fails here, naming it
    except ValueError as e:
        _fail(f"ckpt_path {e}", InputError)


def _unreadable(path: Path) -> str | None:
    """Why ``path`` is not a complete NIfTI volume, or ``None``.

    A truncated ``.nii.gz`` fails only at its end, in the data loader and without its name, so its whole stream is
    decompressed once here (no array is built).
    """
    import gzip

    import nibabel as nib
    import numpy as np

    try:
        image = nib.load(str(path))
        size = path.stat().st_size
        if path.name.endswith(".gz"):
            size = 0
            with gzip.open(path) as f:
                while chunk := f.read(1 << 24):
                    size += len(chunk)
    except Exception as e:  # whatever nibabel or gzip says about the user's file is the reason
        return f"{type(e).__name__}: {e}"
    shape, dtype = image.dataobj.shape, image.get_data_dtype()  # the file's own offset: the header copy says 0
    needed = int(image.dataobj.offset) + int(np.prod(shape)) * dtype.itemsize
    return None if size >= needed else f"it ends after {size} of {needed} bytes (truncated)"


def inference_data(dataset_dir: str) -> list[dict]:
    """``[{"image": path}]`` for every ``imagesTs/*.nii.gz`` in ``dataset_dir``, else every ``imagesTr/*.nii.gz``.

    A single NIfTI file may also be given instead of a folder. Hidden names (``.tmp-*`` files that an interrupted
    ``prepare`` left, ``._*`` metadata files) are never cases.

    Raises:
        FileNotFoundError: nothing to segment.

    Example::

        >>> inference_data("prepared")[:1]
        [{'image': 'prepared/imagesTs/case_01.nii.gz'}]
    """
    root = Path(dataset_dir)
    if root.is_file() and root.name.endswith((".nii", ".nii.gz")):
        return [{"image": str(root)}]
    for sub in ("imagesTs", "imagesTr"):
        found = (root / sub).glob("*.nii*")
        files = sorted(p for p in found if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
        if files:
            return [{"image": str(f)} for f in files]
    raise FileNotFoundError(f"dataset_dir {root}: no imagesTs/*.nii.gz or imagesTr/*.nii.gz to segment")
