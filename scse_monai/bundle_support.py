"""Small functions the bundle configs call: find the dataset, split it by patient-level fold, list inputs.

The bundle's JSON configs stay declarative; what a JSON expression cannot say clearly (error messages that
name the missing file, opt-in synthetic data, fold selection) lives here.

Datalists: a folder prepared by ``python -m scse_monai.data prepare`` (``datalist.json`` with ``patient``,
``fold`` and ``class_voxel_counts``) or a plain MONAI / Medical Segmentation Decathlon task folder
(``dataset.json`` whose ``training`` list holds ``{"image", "label"}`` pairs, with or without ``fold``). Items
keep their own folds when every one has a ``fold``; when none has, the folds are a seeded split by patient. An
item without ``patient`` is its own patient (its case name). :func:`class_voxel_counts` counts the label voxels
of the training cases when a loss asks for them.
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
    "check_outputs",
    "check_volumes",
    "class_voxel_counts",
    "inference_data",
    "partition",
    "resolve_datalist",
    "training_datalist",
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
            folder without a datalist (a hidden file such as ``.DS_Store`` counts) is never written to.

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
    held = sorted(p.name for p in root.iterdir())[:3] if root.is_dir() else ["it is a file"]
    if root.exists() and held:  # hidden files (.DS_Store) too: ensure_synthetic_dataset never writes beside them
        _fail(
            f"dataset_dir {root} is not empty ({', '.join(held)}) and has no datalist.json; refusing to write "
            "synthetic data into it. Give an empty folder, or a folder prepared by `python -m scse_monai.data prepare`."
        )
    from scse_monai.data import ensure_synthetic_dataset

    try:
        return str(ensure_synthetic_dataset(root))
    except FileExistsError as e:  # another process put files there meanwhile
        _fail(str(e), FileExistsError)


def _load(datalist_file: str, absolute: bool = False) -> dict:
    """:func:`scse_monai.data.datalist.read_datalist`, its errors raised through :func:`_fail`."""
    from scse_monai.data.datalist import read_datalist  # here, not at the top: scse_monai.data is heavy to import

    try:
        return read_datalist(datalist_file, absolute=absolute)
    except (FileNotFoundError, InputError) as e:
        _fail(str(e), type(e))


def _val_folds(val_folds: Sequence[int]) -> set[int]:
    """The held-out folds; one line naming ``val_folds`` when it is not a list of fold numbers."""
    if isinstance(val_folds, (list, tuple)) and all(isinstance(f, int) and not isinstance(f, bool) for f in val_folds):
        return set(val_folds)
    _fail(
        f"val_folds must be a list of fold numbers such as [0] ([] trains on every patient), got {val_folds!r}; "
        'on the command line: --val_folds "[0]"',
        InputError,
    )


def _with_folds(entries: list[dict], datalist_file: str, folds: int, seed: int) -> list[dict]:
    """``entries``, each with a ``patient`` (its case name when it has none), keeping their folds when every one
    has a ``fold``; when none has, a seeded patient-level split into ``folds`` folds; only some: an error."""
    from scse_monai.data.datalist import assign_folds, case_name

    patient = [str(e["patient"]) if e.get("patient") is not None else case_name(e.get("image", "")) for e in entries]
    entries = [{**e, "patient": p} for e, p in zip(entries, patient, strict=True)]
    missing = sum("fold" not in e for e in entries)
    if entries and not missing:
        return entries
    if missing < len(entries):
        _fail(
            f"datalist {datalist_file}: {missing} of {len(entries)} training items have no 'fold'; give every item "
            "a fold, or none for a seeded split by patient",
            InputError,
        )
    n = len(set(patient))
    k = max(1, min(int(folds), n))
    fold_of = assign_folds(patient, k, seed) if n else {}
    logger.info(f"datalist {datalist_file} has no folds: {n} patients split into {k} folds by patient (seed {seed})")
    return [{**e, "fold": fold_of[e["patient"]]} for e in entries]


def partition(
    datalist_file: str, part: str = "train", val_folds: Sequence[int] = (0,), folds: int = 5, seed: int = 0
) -> list[dict]:
    """Items of a datalist with absolute paths, split by patient-level fold.

    Args:
        datalist_file: ``datalist.json`` written by ``scse_monai.data prepare``, or a decathlon ``dataset.json``.
        part: ``"train"`` (folds not in ``val_folds``), ``"val"`` (folds in ``val_folds``) or ``"all"``.
        val_folds: a list of the folds held out for validation; none (``[]``) trains on every patient, and
            ``"val"`` is empty. A bare number (``--val_folds 0``) is refused: write ``--val_folds "[0]"``.
        folds: only for a datalist whose items have no ``fold`` keys: the number of folds of the seeded
            patient-level split (at most the number of patients). The items' own folds are used when every item
            has one (MONAI's fold datalists); an item without ``patient`` is its own patient (its case name).
        seed: only for a datalist without ``fold`` keys: the split's seed.

    Returns:
        ``[{"image": ..., "label": ..., "patient": ..., "fold": ...}, ...]``.

    Raises:
        ValueError: unknown ``part``.
        InputError: (a ``ValueError``) the requested part is empty (e.g. only one fold) although ``val_folds`` names
            folds, ``val_folds`` is not a list of fold numbers, only some items have a ``fold``, or a patient
            appears in several folds; under ``python -m monai.bundle``, one line and exit 1.

    Example::

        >>> val = partition("prepared/datalist.json", "val", val_folds=[0])
    """
    if part not in ("train", "val", "all"):
        raise ValueError(f"part must be 'train', 'val' or 'all', got {part!r}")
    held_out = _val_folds(val_folds)
    meta = _load(datalist_file, absolute=True)
    entries = _with_folds(list(meta.get("training", [])), datalist_file, folds, seed)
    # a patient split across folds would leak slices of one patient into both sides
    folds_of: dict[str, set[int]] = {}
    for entry in entries:
        folds_of.setdefault(entry["patient"], set()).add(int(entry["fold"]))
    leaked = sorted(p for p, f in folds_of.items() if len(f) > 1)
    if leaked:
        _fail(f"datalist {datalist_file}: patients {leaked} appear in several folds", InputError)
    items = []
    for entry in entries:
        is_val = int(entry["fold"]) in held_out
        if part == "all" or (part == "val") == is_val:
            items.append(dict(entry))
    if not items and not (part == "val" and not held_out):  # no val_folds: train on every patient
        _fail(
            f"datalist {datalist_file}: no cases for part={part!r} with val_folds={sorted(held_out)} "
            f"(folds present: {sorted({int(e['fold']) for e in entries})})",
            InputError,
        )
    return items


def class_names(datalist_file: str, include_background: bool = False, num_classes: int | None = None) -> list[str]:
    """Class names in index order from the datalist's ``labels`` map; without one (MONAI's fold datalists often
    have none), ``class1``, ``class2``, ... for ``num_classes`` classes, else one line naming the datalist.

    Example::

        >>> class_names("prepared/datalist.json")
        ['liver', 'right kidney', 'left kidney', 'spleen']
    """
    labels = _load(datalist_file).get("labels") or {}
    if not labels and num_classes is None:
        example = '{"0": "background", "1": "liver"}'
        _fail(f"datalist {datalist_file} has no 'labels' map (e.g. {example})", InputError)
    if not labels:
        labels = {str(c): "background" if c == 0 else f"class{c}" for c in range(num_classes)}
    names = [labels[k] for k in sorted(labels, key=int)]
    return names if include_background else names[1:]


def class_voxel_counts(
    datalist_file: str, num_classes: int | None = None, val_folds: Sequence[int] | None = None
) -> dict[str, int]:
    """Voxel count of each class over the datalist's training labels.

    Args:
        datalist_file: the datalist.
        num_classes: classes to count; default: the size of the datalist's ``labels`` map, else the largest
            label value found plus one.
        val_folds: count only the cases a run with these ``val_folds`` trains on (:func:`partition`'s
            ``"train"``), so the held-out patients' labels do not set the loss weights. ``None``: every case.

    Returns:
        ``{"0": count, "1": count, ...}``: the datalist's own ``class_voxel_counts`` when they cover the cases
        asked for (``val_folds`` is ``None`` or ``[]``), else counted now from the label files.

    Example::

        >>> class_voxel_counts("Task09_Spleen/dataset.json", val_folds=[0])  # doctest: +SKIP
        {'0': 78121946, '1': 248203}
    """
    if val_folds is not None:
        return training_datalist(datalist_file, val_folds, num_classes)["class_voxel_counts"]
    meta = _load(datalist_file, absolute=True)
    return _counts(meta, meta.get("training", []), num_classes, datalist_file)


def _counts(meta: dict, entries: list[dict], num_classes: int | None, datalist_file: str) -> dict[str, int]:
    """``entries``' class voxel counts: the datalist's own when ``entries`` are all its cases, else from the files."""
    if meta.get("class_voxel_counts") and len(entries) == len(meta.get("training", [])):
        return {str(k): int(v) for k, v in meta["class_voxel_counts"].items()}
    labels = [e["label"] for e in entries if "label" in e]
    total = _count_labels(labels, num_classes or len(meta.get("labels", {})))[: num_classes or None]
    logger.info(f"datalist {datalist_file}: counted {len(total)} classes in the labels of {len(labels)} cases")
    return {str(k): int(v) for k, v in enumerate(total)}


def _count_labels(labels: Sequence[str], min_classes: int) -> list[int]:
    """Summed voxel count of each class in the label files: ``min_classes`` values, or more if a label has more."""
    import nibabel as nib
    import numpy as np

    total = np.zeros(max(min_classes, 1), dtype=np.int64)
    for label in labels:
        counts = np.bincount(np.asarray(nib.load(label).dataobj).astype(np.int64).ravel(), minlength=len(total))
        total = np.pad(total, (0, len(counts) - len(total))) + counts
    return total.tolist()


def training_datalist(datalist_file: str, val_folds: Sequence[int], num_classes: int | None = None) -> dict:
    """The datalist's content for a run with ``val_folds``: its ``training`` items are the cases the run trains on
    (:func:`partition`'s ``"train"``), its ``class_voxel_counts`` theirs only (:func:`class_voxel_counts`).

    Give it to ``WeightedDiceCELoss(datalist=...)`` so that the held-out patients' labels do not set the weights.

    Example::

        >>> training_datalist("prepared/datalist.json", val_folds=[0])["class_voxel_counts"]  # doctest: +SKIP
        {'0': 4028295, '1': 330079, '2': 33354, '3': 33287, '4': 31433}
    """
    meta, training = _load(datalist_file, absolute=True), partition(datalist_file, "train", val_folds)
    return {**meta, "training": training, "class_voxel_counts": _counts(meta, training, num_classes, datalist_file)}


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


def check_volumes(volume_transforms: Sequence, *parts: Sequence[dict]) -> None:
    """Run ``volume_transforms`` up to their last ``CheckInputd`` over every case of ``parts``; one line naming the
    file for bad input (an :class:`~scse_monai.errors.InputError`).

    ``train.json`` and ``evaluate.json`` run this first in ``run``: their datasets cache the volumes in worker
    threads while the workflow is built, where a failed check can only be a traceback. Each volume is read once more.
    """
    from monai.transforms import Compose

    from scse_monai.errors import input_error_in
    from scse_monai.transforms import CheckInputd

    last = max(i for i, t in enumerate(volume_transforms) if isinstance(t, CheckInputd))
    checks = Compose(volume_transforms[: last + 1])
    for item in (item for part in parts for item in part):
        try:
            checks(dict(item))
        except Exception as e:
            error = input_error_in(e)
            if error is None:
                raise
            _fail(str(error), InputError)


def check_outputs(items: Sequence[dict], postprocessing, overwrite: bool | str = False, key: str = "image") -> None:
    """One line naming the file, before anything is written, when an output that ``postprocessing``'s
    ``SaveImage(d)`` would write for an item exists already, unless ``overwrite`` (``--overwrite true``).

    The paths are the ones MONAI's ``SaveImage`` computes (its name formatter and folder layout), without creating
    the output folder.
    """
    import copy

    from monai.transforms import Compose, SaveImage, SaveImaged

    if str(overwrite).strip().lower() not in ("true", "false"):
        _fail(f"--overwrite must be true or false, got {overwrite!r}", InputError)
    if str(overwrite).strip().lower() == "true":
        return
    found = postprocessing.flatten().transforms if isinstance(postprocessing, Compose) else [postprocessing]
    savers = [getattr(t, "saver", t) for t in found if isinstance(t, (SaveImaged, SaveImage))]
    for item, saver in ((item, saver) for item in items for saver in savers):
        layout = copy.copy(saver.folder_layout)
        layout.makedirs = False  # a path, not a folder
        path = Path(layout.filename(**saver.fname_formatter({"filename_or_obj": str(item[key])}, saver)))
        if path.exists() or path.is_symlink():
            _fail(
                f"output {path} (for {key} {item[key]}) exists; refusing to overwrite it: pass --overwrite true to "
                "replace it, or another --output_dir",
                InputError,
            )


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
