"""Patient-level folds, class voxel counts, atomic file writes and the MONAI (decathlon-style) datalist: writing
it (:func:`write_datalist`), reading it (:func:`read_datalist`) and naming its cases (:func:`case_name`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import process_alive, write_text_atomic
from ..errors import InputError
from .errors import DataPreparationError

__all__ = [
    "assign_folds",
    "atomic_replace_all",
    "case_name",
    "check_case_names",
    "check_out_dir",
    "clean_stale_tmp",
    "count_classes",
    "finite_or_replace",
    "owned_outputs_check",
    "output_stamp",
    "prepare_out_dir",
    "read_datalist",
    "save_nifti_atomic",
    "tmp_path_for",
    "write_case",
    "write_datalist",
]

_TMP_RE = re.compile(r"^\.tmp-(\d+)-")
_IMAGE_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", re.IGNORECASE)


def case_name(path: str | os.PathLike) -> str:
    """The case name of an image file: its file name without the image suffix (``.nii.gz``, ``.nii``, ``.nrrd``,
    ``.mha``, ``.mhd``; any case).

    Example:
        >>> case_name("prepared/imagesTr/chaos_mr_t2_01.nii.gz")
        'chaos_mr_t2_01'
    """
    return _IMAGE_SUFFIX.sub("", Path(str(path)).name)


def read_datalist(path: str | os.PathLike, *, absolute: bool = False) -> dict:
    """The content of a datalist: ``datalist.json`` written by ``prepare``, or a decathlon ``dataset.json``.

    Args:
        path: the JSON file.
        absolute: make the ``image`` / ``label`` paths of the ``training`` items absolute: relative ones are joined
            to the datalist's folder (symlinks are not followed, so the file names stay as listed).

    Raises:
        FileNotFoundError: ``datalist <path> does not exist``.
        InputError: (a ``ValueError``) the file is not valid JSON, not a JSON object, or its ``training`` is not a
            list of objects whose ``image`` / ``label`` are paths; the message names the file.

    Example:
        >>> read_datalist("prepared/chaos_mr_t2/datalist.json", absolute=True)["training"][0]["image"]  # doctest: +SKIP
        '/data/prepared/chaos_mr_t2/imagesTr/chaos_mr_t2_01.nii.gz'
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"datalist {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"datalist {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(f"datalist {path} is not a JSON object (found a {type(doc).__name__})")
    items = doc.get("training", [])
    if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        raise InputError(f"datalist {path}: 'training' must be a list of objects")
    for it in items:
        for key in ("image", "label"):
            if key in it and not (isinstance(it[key], str) and it[key]):
                raise InputError(f"datalist {path}: a training item's {key!r} is {it[key]!r}, not a file path")
    if absolute and "training" in doc:
        base = path.resolve().parent
        doc["training"] = [{**it, **{k: str(base / it[k]) for k in ("image", "label") if k in it}} for it in items]
    return doc


def check_prepare_options(n_patients: int, folds: int, seed: int = 0, workers: int = 1) -> int:
    """Checks ``prepare``'s options before any work; returns the number of folds to use: ``folds``, or
    ``n_patients`` when there are fewer.

    Fewer patients than ``--folds`` (a handful of test patients) gives one patient per fold, said on stderr.

    Raises:
        DataPreparationError: ``folds < 1``, no patients, ``seed < 0`` or ``workers < 1``.
    """
    if seed < 0:
        raise DataPreparationError(f"--seed must be >= 0, got {seed}")
    if workers < 1:
        raise DataPreparationError(f"--workers must be >= 1, got {workers}")
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


def prepare_out_dir(root: Path, out: Path) -> None:
    """Check ``--out`` before any work: not inside ``--root``, not a file, writable; create its sub-folders.

    Raises:
        DataPreparationError: naming ``--out`` and what is wrong with it.
    """
    root_r, out_r = Path(root).resolve(), Path(out).resolve()
    if out_r == root_r or root_r in out_r.parents:
        raise DataPreparationError(
            f"--out is inside --root {root}; the next run would read its own outputs as input", file=out
        )
    if out_r.exists() and not out_r.is_dir():
        raise DataPreparationError("--out exists and is not a folder", file=out)
    try:
        for sub in ("imagesTr", "labelsTr"):
            (out_r / sub).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=out_r / "labelsTr")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataPreparationError(f"--out is not writable ({e.strerror})", file=out) from None


def clean_stale_tmp(out: Path) -> list[Path]:
    """Remove temporary files that an earlier, killed or failed ``prepare`` left in ``out``.

    Only this package's own names are touched: ``imagesTr``/``labelsTr`` ``.tmp-<pid>-*`` files whose process is
    gone, and ``.datalist.json.*.tmp``.

    Returns:
        the removed paths.
    """
    out = Path(out)
    stale = [p for p in out.glob(".datalist.json.*.tmp") if p.is_file()]
    for sub in ("imagesTr", "labelsTr"):
        for p in (out / sub).glob(".tmp-*"):
            m = _TMP_RE.match(p.name)
            if m and p.is_file() and not process_alive(int(m.group(1))):
                stale.append(p)
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_case_names(inputs: Mapping[str, str]) -> None:
    """Raise if two inputs map to one case name (one would overwrite the other and land in two folds).

    Args:
        inputs: input (patient folder or file, as the user sees it) -> case name.

    Raises:
        DataPreparationError: naming both inputs and the case.
    """
    seen: dict[str, str] = {}
    for source, case in inputs.items():
        if case in seen:
            raise DataPreparationError(
                f"{seen[case]} and {source} both map to case {case}; rename one of them", file=source
            )
        seen[case] = source


def finite_or_replace(array: np.ndarray, replace: bool, patient: str, file: Path) -> tuple[np.ndarray, int]:
    """Check that an image has only finite voxels, or replace NaN/inf by the smallest finite value.

    Args:
        array: the image.
        replace: replace non-finite voxels instead of rejecting the case.
        patient: patient / case id for the message.
        file: the input file for the message.

    Returns:
        the (possibly repaired) array and the number of voxels replaced.

    Raises:
        DataPreparationError: non-finite voxels and ``replace`` is false, or no finite voxel at all.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return array, 0
    bad = ~np.isfinite(array)
    n = int(bad.sum())
    if not n:
        return array, 0
    if not replace:
        raise DataPreparationError(
            f"{n} non-finite voxels (NaN/inf) in the image; fix the file or pass --replace-nonfinite", patient, file
        )
    if n == array.size:
        raise DataPreparationError("the image has no finite voxel at all", patient, file)
    fixed = np.array(array, copy=True)
    fixed[bad] = array[~bad].min()
    return fixed, n


def output_stamp(pairs: Iterable[tuple[Path, Path]]) -> dict[str, list[int]]:
    """``{"imagesTr/<name>": [size, mtime_ns]}`` of written ``(tmp, final)`` files (a rename keeps both).

    Kept in the case's side file so that a later run recognises its own outputs.
    """
    out = {}
    for tmp, final in pairs:
        st = Path(tmp).stat()
        out[_rel(final)] = [st.st_size, st.st_mtime_ns]
    return out


def _rel(path: Path) -> str:
    return f"{Path(path).parent.name}/{Path(path).name}"


def owned_outputs_check(outputs: Sequence[Path], side: Path, patient: str) -> None:
    """Refuse to overwrite an output file that ``prepare`` did not write.

    A case's outputs are ours when its side file (``labelsTr/.<case>.json``) exists and, if it recorded them, the
    files still have the recorded size and modification time.

    Raises:
        DataPreparationError: naming the file that would be overwritten.
    """
    existing = [p for p in outputs if p.exists() or p.is_symlink()]
    if not existing:
        return
    info = {}
    if side.is_file():
        try:
            info = json.loads(side.read_text())
        except (OSError, ValueError):
            info = {}
    recorded = info.get("outputs")
    for p in existing:
        ours = bool(info) and (recorded is None or _matches_stamp(p, recorded.get(_rel(p))))
        if not ours:
            raise DataPreparationError(
                "exists and was not written by scse_monai prepare; move it away or choose another --out", patient, p
            )


def _matches_stamp(path: Path, stamp: Sequence[int] | None) -> bool:
    if stamp is None:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return [st.st_size, st.st_mtime_ns] == list(stamp)


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


def tmp_path_for(path: Path) -> Path:
    """The temporary sibling a case file is written to before :func:`atomic_replace_all` renames it into place.

    It keeps the real suffix (nibabel picks the format from it) and the folder (``os.replace`` is atomic there);
    its ``.tmp-<pid>-`` prefix is what :func:`clean_stale_tmp` recognises.
    """
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``array`` as NIfTI to a temporary sibling of ``path`` (qform = sform = ``affine``) and return it.

    The caller renames it into place with :func:`atomic_replace_all` once every file of the case is written.
    """
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = tmp_path_for(path)
    try:
        nib.save(img, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial temporary file behind
        raise
    return tmp


def write_case(
    paths: tuple[Path, Path, Path],
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    info: dict,
    copy_image_from: Path | None = None,
) -> None:
    """Writes one prepared case all-or-nothing: image, label map and the side file ``info`` (plus the outputs' stamp).

    Args:
        paths: ``(image path, label path, side file)``.
        copy_image_from: an input file to copy byte for byte as the image, instead of writing ``image``.
    """
    img_path, lab_path, side = paths
    tmps = []
    try:
        if copy_image_from is not None:
            tmps.append((tmp_path_for(img_path), img_path))
            shutil.copyfile(copy_image_from, tmps[-1][0])
        else:
            tmps.append((save_nifti_atomic(image, affine, img_path), img_path))
        tmps.append((save_nifti_atomic(label, affine, lab_path), lab_path))
        info = {**info, "outputs": output_stamp(tmps)}
        tmps.append((tmp_path_for(side), side))
        tmps[-1][0].write_text(json.dumps(info))
        atomic_replace_all(tmps)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


def atomic_replace_all(pairs: Iterable[tuple[Path, Path]]) -> None:
    """``os.replace(tmp, final)`` for each ``(tmp, final)`` pair."""
    for tmp, final in pairs:
        os.replace(tmp, final)


def _check_unique(items: Sequence[Mapping]) -> None:
    # one file once, and every case of one patient under one patient id (hence in one fold)
    for key in ("image", "label"):
        seen: dict[str, Mapping] = {}
        for it in items:
            if it[key] in seen:
                raise DataPreparationError(
                    f"patients {seen[it[key]]['patient']} and {it['patient']} both map to {it[key]}", file=it[key]
                )
            seen[it[key]] = it


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
    _check_unique(items)
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
