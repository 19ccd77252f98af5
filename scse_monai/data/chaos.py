"""CHAOS (Zenodo 3431873) ``Train_Sets`` -> NIfTI volumes + label maps + datalist.json.

Native layout (``ROOT`` is ``Train_Sets``, or a folder that contains it)::

    CT/<id>/DICOM_anon/i<NNNN>,0000b.dcm               CT/<id>/Ground/liver_GT_<NNN>.png (0/255)
    MR/<id>/T2SPIR/DICOM_anon/IMG-*.dcm                MR/<id>/T2SPIR/Ground/IMG-*.png (gray levels)
    MR/<id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/IMG-*.dcm   MR/<id>/T1DUAL/Ground/IMG-*.png

Masks are paired with slices by the index in the file name (CT ``i0045,...`` <-> ``liver_GT_045``; MR: same
stem), never by sort order. Slices are placed by DICOM geometry (:mod:`.dicom_series`), and each mask follows its
slice. T1-DUAL is written as one 2-channel image, channel 0 = in-phase, channel 1 = opposed-phase (out-phase);
the Ground masks are paired by name with whichever echo carries their file names (in real and synthetic data:
in-phase) and the other echo must have the same geometry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .datalist import (
    check_case_names,
    check_out_dir,
    check_prepare_options,
    clean_stale_tmp,
    count_classes,
    finite_or_replace,
    owned_outputs_check,
    prepare_out_dir,
    write_case,
    write_datalist,
)
from .dicom_series import DicomVolume, read_dicom_series
from .errors import DataPreparationError
from .jobs import run_patients

__all__ = ["prepare_chaos", "CHAOS_TASKS", "CHAOS_MR_LABELS", "gray_to_class"]

CHAOS_MR_LABELS = {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
CHAOS_CT_LABELS = {"0": "background", "1": "liver"}

# MR mask gray levels (CHAOS documentation): nominal value and accepted range -> class index
MR_GRAY_RANGES = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}
CT_GRAY_RANGES = {1: (128, 255)}  # CT masks are 0/255


@dataclass(frozen=True)
class _Task:
    folder: str  # CT or MR
    sequence: str | None  # T2SPIR, T1DUAL or None for CT
    prefix: str
    labels: dict
    modality: dict
    gray: dict


CHAOS_TASKS = {
    "ct-liver": _Task("CT", None, "chaos_ct", CHAOS_CT_LABELS, {"0": "CT"}, CT_GRAY_RANGES),
    "mr-t2spir": _Task("MR", "T2SPIR", "chaos_mr_t2", CHAOS_MR_LABELS, {"0": "MR"}, MR_GRAY_RANGES),
    "mr-t1dual": _Task("MR", "T1DUAL", "chaos_mr_t1dual", CHAOS_MR_LABELS, {"0": "MR", "1": "MR"}, MR_GRAY_RANGES),
}


def gray_to_class(mask: np.ndarray, ranges: dict[int, tuple[int, int]], patient: str, file: Path) -> np.ndarray:
    """Map PNG gray levels to class indices; 0 is background, any level outside the ranges is an error."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    for cls, (lo, hi) in ranges.items():
        lut[lo : hi + 1] = cls
    out = lut[mask]
    if (out == 255).any():
        bad = np.unique(mask[out == 255]).tolist()
        raise DataPreparationError(f"unknown gray levels {bad[:10]} in mask (expected 0 and {ranges})", patient, file)
    return out


def _read_png(path: Path, patient: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as e:
        raise DataPreparationError(f"cannot read PNG mask ({type(e).__name__}: {e})", patient, path) from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3:  # RGB(A) with identical channels is accepted as gray
        if not (arr[..., :3] == arr[..., :1]).all():
            raise DataPreparationError("colour PNG mask; expected gray levels", patient, path)
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if arr.max() > 255:
            raise DataPreparationError(f"mask values up to {arr.max()}; expected 8-bit gray levels", patient, path)
        arr = arr.astype(np.uint8)
    return arr


def _slice_key(task: _Task, name: str) -> str:
    if task.folder == "CT":  # i0045,0000b.dcm -> 45 ; liver_GT_045.png -> 45
        m = re.match(r"i(\d+)", name) or re.search(r"(\d+)\.png$", name)
        return str(int(m.group(1))) if m else name
    return Path(name).stem


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _check_links(folder: Path, pid: str) -> None:
    """A dangling or looping symbolic link is an error naming it, not a traceback later."""
    for p in folder.iterdir():
        if p.is_symlink() and not p.exists():
            raise DataPreparationError("broken or looping symbolic link", pid, p)


def _pair_masks(task: _Task, vol: DicomVolume, ground: Path, pid: str, strict_names: bool = True) -> list[Path]:
    """Mask file for each slice of ``vol`` (in slice order), paired by file-name index."""
    masks = {_slice_key(task, p.name): p for p in _files(ground) if p.suffix.lower() == ".png"}
    if not masks:
        raise DataPreparationError("Ground folder has no PNG masks", pid, ground)
    paired, missing = [], []
    for f in vol.files:
        m = masks.pop(_slice_key(task, f.name), None)
        (paired if m is not None else missing).append(m if m is not None else f)
    if missing or masks:
        n_masks = len(paired) + len(masks)
        count = f"{n_masks} masks for {len(vol.files)} slices; " if n_masks != len(vol.files) else ""
        if missing:
            raise DataPreparationError(f"{count}slice has no mask in {ground.name}/", pid, missing[0])
        raise DataPreparationError(f"{count}mask has no matching DICOM slice", pid, sorted(masks.values())[0])
    return paired


def _patient_paths(root: Path, task: _Task, pid: str) -> tuple[Path, list[Path], Path]:
    pdir = root / task.folder / pid
    if not any(p for p in pdir.rglob("*") if p.is_file()):
        raise DataPreparationError("empty patient folder", pid, pdir)
    base = pdir / task.sequence if task.sequence else pdir
    if not base.is_dir():
        raise DataPreparationError(f"no {task.sequence} folder", pid, base)
    dicom = base / "DICOM_anon"
    series = [dicom / "InPhase", dicom / "OutPhase"] if task.sequence == "T1DUAL" else [dicom]
    for s in series:
        if not s.is_dir() or not _files(s):
            raise DataPreparationError("missing or empty DICOM folder", pid, s)
    ground = base / "Ground"
    if not ground.is_dir():
        raise DataPreparationError("missing Ground folder", pid, ground)
    for folder in (*series, ground):
        _check_links(folder, pid)
    return base, series, ground


def case_name(task: str, pid: str) -> str:
    """Case name for a patient, e.g. ``case_name("mr-t2spir", "1") == "chaos_mr_t2_01"``."""
    tag = f"{int(pid):02d}" if pid.isdigit() else re.sub(r"[^A-Za-z0-9]+", "_", pid)
    return f"{CHAOS_TASKS[task].prefix}_{tag}"


def input_signature(folders: list[Path]) -> str:
    """Hash of (name, size, mtime) of every file in ``folders``: changes when a file is added, removed, renamed or
    rewritten, so re-runs can skip cases whose inputs are unchanged."""
    h = hashlib.sha1()
    for f in folders:
        for p in sorted(f.iterdir()):
            st = p.stat()
            h.update(f"{p.parent.name}/{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _prepare_patient(
    root: Path, task_name: str, pid: str, out: Path, replace_nonfinite: bool = False
) -> tuple[dict, list[int], bool]:
    """Prepare one patient; returns (datalist item, class counts, skipped-because-up-to-date)."""
    task = CHAOS_TASKS[task_name]
    case = case_name(task_name, pid)
    img_path, lab_path = out / "imagesTr" / f"{case}.nii.gz", out / "labelsTr" / f"{case}.nii.gz"
    item = {"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "patient": pid}
    _, series, ground = _patient_paths(root, task, pid)
    side = out / "labelsTr" / f".{case}.json"  # input signature and class counts of the written case
    signature = input_signature([*series, ground])
    owned_outputs_check([img_path, lab_path], side, pid)
    if img_path.exists() and lab_path.exists() and side.exists():
        info = json.loads(side.read_text())
        fresh = info.get("inputs") == signature and info.get("task") == task_name
        if fresh and info.get("replace_nonfinite", False) == replace_nonfinite:
            return item, info["counts"], True

    vols = [read_dicom_series(_files(s), patient=pid) for s in series]
    image, affine, mask_files = _image_and_masks(task, vols, series, ground, pid)
    label = _label_from_masks(task, mask_files, (vols[0].rows, vols[0].columns), pid)
    image, replaced = finite_or_replace(image, replace_nonfinite, pid, series[0])
    counts = count_classes(label, len(task.labels))
    info = {"task": task_name, "inputs": signature, "counts": counts}
    info.update(replace_nonfinite=replace_nonfinite, nonfinite_replaced=replaced)
    write_case((img_path, lab_path, side), image, label, affine, info)
    return item, counts, False


def _image_and_masks(
    task: _Task, vols: list[DicomVolume], series: list[Path], ground: Path, pid: str
) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """The image (T1-DUAL: channel 0 in-phase, 1 opposed-phase), its affine and the mask file of each slice."""
    if len(vols) == 1:
        return vols[0].array, vols[0].affine, _pair_masks(task, vols[0], ground, pid)
    # T1-DUAL: masks carry the names of one echo; the other must share the geometry
    a, b = vols
    if a.array.shape != b.array.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise DataPreparationError("in-phase and opposed-phase series differ in geometry", pid, series[1])
    mask_names = {p.stem for p in _files(ground)}
    ref = b if {f.stem for f in b.files} == mask_names and {f.stem for f in a.files} != mask_names else a
    return np.stack([a.array, b.array], axis=-1), a.affine, _pair_masks(task, ref, ground, pid)


def _label_from_masks(task: _Task, mask_files: list[Path], rows_cols: tuple[int, int], pid: str) -> np.ndarray:
    """The label map of the slices' PNG masks (each ``rows x columns`` of the DICOM slices)."""
    slices = []
    for f in mask_files:
        m = _read_png(f, pid)
        if m.shape != rows_cols:
            raise DataPreparationError(f"mask shape {m.shape} differs from DICOM Rows x Columns {rows_cols}", pid, f)
        slices.append(gray_to_class(m, task.gray, pid, f).T)
    return np.stack(slices, axis=-1).astype(np.uint8)


def _resolve_root(root: Path, folder: str) -> Path:
    if not (root / folder).is_dir() and (root / "Train_Sets" / folder).is_dir():
        root = root / "Train_Sets"
    if not (root / folder).is_dir():
        raise DataPreparationError(f"no {folder}/ folder: --root must be CHAOS Train_Sets", file=root / folder)
    return root


def prepare_chaos(
    root: str | Path,
    task: str,
    out: str | Path,
    folds: int = 5,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    replace_nonfinite: bool = False,
) -> Path:
    """Convert a CHAOS ``Train_Sets`` folder into ``OUT/imagesTr``, ``OUT/labelsTr`` and ``OUT/datalist.json``.

    Cases are named ``chaos_ct_<id>``, ``chaos_mr_t2_<id>`` or ``chaos_mr_t1dual_<id>`` (id zero-padded to 2
    digits). Outputs newer than all of a patient's inputs are kept (re-runs are cheap).

    Args:
        root: CHAOS ``Train_Sets`` (or its parent).
        task: ``"ct-liver"``, ``"mr-t2spir"`` or ``"mr-t1dual"``.
        out: output folder (created).
        folds: number of patient-level folds.
        seed: fold shuffle seed.
        workers: parallel processes (one patient per process).
        progress: show a progress bar.
        replace_nonfinite: replace NaN/inf voxels by the image's smallest finite value instead of rejecting the
            patient.

    Returns:
        path of ``OUT/datalist.json``.

    Raises:
        DataPreparationError: bad input; names the patient and file. Nothing partial is left for that patient.
            Also: two patient folders with one case name (``1`` and ``01``), ``out`` inside ``root``, or an output
            file that an earlier ``prepare`` did not write.

    Example:
        >>> prepare_chaos("CHAOS/Train_Sets", "mr-t2spir", "prepared/chaos_mr_t2")  # doctest: +SKIP
    """
    if task not in CHAOS_TASKS:
        raise DataPreparationError(f"unknown task {task!r}; choose one of {sorted(CHAOS_TASKS)}")
    spec = CHAOS_TASKS[task]
    root = _resolve_root(Path(root), spec.folder)
    out = Path(out)
    pids = sorted((p.name for p in (root / spec.folder).iterdir() if p.is_dir()), key=lambda s: (len(s), s))
    if not pids:
        raise DataPreparationError("no patient folders", file=root / spec.folder)
    check_case_names({str(root / spec.folder / pid): case_name(task, pid) for pid in pids})
    folds = check_prepare_options(len(pids), folds, seed, workers)
    prepare_out_dir(root, out)
    check_out_dir(out, f"CHAOS {task}")
    clean_stale_tmp(out)
    jobs = [(root, task, pid, out, replace_nonfinite) for pid in pids]
    results = run_patients(_prepare_patient, jobs, workers, f"prepare chaos {task}", progress)
    items = [r[0] for r in results]
    counts = {r[0]["image"]: r[1] for r in results}
    extra = {"source": "CHAOS (Kavur et al., Zenodo 3431873), CC BY-SA 4.0", "task": task}
    if task == "mr-t1dual":
        extra["channels"] = {"0": "T1 in-phase", "1": "T1 opposed-phase"}
    if os.environ.get("SCSE_DATA_VERBOSE"):
        print(f"{sum(r[2] for r in results)} of {len(results)} cases up to date")
    return write_datalist(
        out,
        name=f"CHAOS {task}",
        modality=spec.modality,
        labels=spec.labels,
        items=items,
        counts=counts,
        folds=folds,
        seed=seed,
        extra=extra,
    )
