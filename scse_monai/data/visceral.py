"""VISCERAL Anatomy3 (``Volumes/<stem>.nii.gz`` + one binary mask per structure) -> one label map + datalist.json.

Masks are ``Segmentations/<stem>_<RadLexID>_<n>.nii.gz``; if several annotations ``<n>`` exist for one structure the
lowest ``n`` is used. The default organ set is all 16 structures of :data:`RADLEX_IDS`, in that order, labels 1..16;
``organs=[...]`` selects and orders a subset (names or RadLex ids).

Overlap rule: where masks overlap, the structure with fewer voxels in that volume wins (on equal counts, the one
earlier in the organ list), so small structures such as adrenal glands or the gallbladder are not swallowed by the
liver; overlapping voxel counts per pair are written to the datalist (``"cases": {case: {"overlaps": ...}}``) and
summed in ``"overlaps"``. A structure without a mask file is listed in ``"cases": {case: {"missing": [...]}}`` and
gets no voxels. A mask whose shape or affine differs from its volume is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from .datalist import case_name as _stem  # the file name without its image suffix
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
from .errors import DataPreparationError
from .jobs import run_patients
from .nifti import load_nifti, nifti_voxels
from .radlex import RADLEX_IDS

__all__ = ["prepare_visceral", "RADLEX_IDS", "DEFAULT_ORGANS"]

DEFAULT_ORGANS = tuple(RADLEX_IDS)
_BY_ID = {v: k for k, v in RADLEX_IDS.items()}


def resolve_organs(organs: list[str] | tuple[str, ...] | None) -> list[str]:
    """Organ names from names (case-insensitive, ``_`` = space) or RadLex ids; ``None`` -> the default set."""
    if not organs:
        return list(DEFAULT_ORGANS)
    out = []
    for o in organs:
        key = str(o).strip().lower().replace("_", " ")
        name = _BY_ID.get(int(key)) if key.isdigit() else (key if key in RADLEX_IDS else None)
        if name is None:
            raise DataPreparationError(f"unknown organ {o!r}; known: {', '.join(RADLEX_IDS)} (or their RadLex ids)")
        if name in out:
            raise DataPreparationError(f"organ {o!r} given twice")
        out.append(name)
    return out


def case_name(volume: Path) -> str:
    """Case name of a VISCERAL volume, e.g. ``visceral_10000001_1_ctce_thab``."""
    return "visceral_" + re.sub(r"[^a-z0-9]+", "_", _stem(volume).lower())


def _check_geometry(img: nib.Nifti1Image, path: Path, patient: str) -> None:
    if len(img.shape) != 3:
        raise DataPreparationError(f"expected a 3D volume, got shape {img.shape}", patient, path)
    det = float(np.linalg.det(img.affine[:3, :3]))
    if not np.isfinite(det) or abs(det) < 1e-9:
        raise DataPreparationError("singular or non-finite affine (zero voxel size?)", patient, path)


def _organ_masks(stem: str, seg_dir: Path) -> dict[str, Path]:
    """The mask file of each organ of volume ``stem`` (``<stem>_<RadLexID>_<n>``; the lowest ``n`` when several)."""
    masks: dict[str, Path] = {}
    for p in sorted(seg_dir.glob(f"{stem}_*.nii*"), key=lambda p: p.name):
        m = re.fullmatch(re.escape(stem) + r"_(\d+)_(\d+)", _stem(p))
        if m and int(m.group(1)) in _BY_ID:
            name = _BY_ID[int(m.group(1))]
            if name not in masks or int(m.group(2)) < int(re.search(r"_(\d+)$", _stem(masks[name])).group(1)):
                masks[name] = p
    return masks


def _input_signature(inputs: list[Path]) -> str:
    """Names, sizes and modification times of the inputs, hashed: a re-run keeps outputs whose inputs are unchanged."""
    h = hashlib.sha1()
    for p in inputs:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _label_from_masks(
    masks: dict[str, Path], organs: list[str], vol: nib.Nifti1Image, volume: Path, patient: str
) -> tuple[np.ndarray, dict[str, int]]:
    """The label map of the organs' binary masks (smaller organs win overlaps) and the overlapping voxel counts."""
    shape, affine = vol.shape[:3], vol.affine
    binaries, sizes = {}, {}
    for o in organs:
        if o not in masks:
            continue
        mimg = load_nifti(masks[o], patient)
        if mimg.shape[:3] != shape or not np.allclose(mimg.affine, affine, atol=1e-3):
            raise DataPreparationError(
                f"mask geometry {mimg.shape} / affine differs from its volume {shape} ({volume.name})",
                patient,
                masks[o],
            )
        b = nifti_voxels(mimg, masks[o], patient).reshape(shape) > 0
        binaries[o] = b
        sizes[o] = int(b.sum())
    label = np.zeros(shape, np.uint8)
    # paint large structures first so that smaller ones win overlaps
    for o in sorted(binaries, key=lambda o: (-sizes[o], -organs.index(o))):  # ties: earlier organ wins
        label[binaries[o]] = organs.index(o) + 1
    overlaps = {}
    names = list(binaries)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1 :]:
            n = int(np.count_nonzero(binaries[a] & binaries[b]))
            if n:
                overlaps[f"{a}/{b}"] = n
    return label, overlaps


def _prepare_volume(
    volume: Path, seg_dir: Path, organs: list[str], out: Path, replace_nonfinite: bool = False
) -> tuple[dict, list[int], bool]:
    stem = _stem(volume)
    patient = stem.split("_")[0]
    case = case_name(volume)
    img_path, lab_path = out / "imagesTr" / f"{case}.nii.gz", out / "labelsTr" / f"{case}.nii.gz"
    masks = _organ_masks(stem, seg_dir)
    if not masks:
        raise DataPreparationError(f"no masks {stem}_<RadLexID>_<n>.nii.gz in {seg_dir.name}/", patient, volume)
    missing = [o for o in organs if o not in masks]
    item = {"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "patient": patient}
    item["missing"] = missing
    side = out / "labelsTr" / f".{case}.json"  # organs, input signature, overlaps and counts of the written case
    signature = _input_signature([volume, *(masks[o] for o in organs if o in masks)])
    owned_outputs_check([img_path, lab_path], side, patient)
    if img_path.exists() and lab_path.exists() and side.exists():
        info = json.loads(side.read_text())
        fresh = info.get("organs") == organs and info.get("inputs") == signature
        if fresh and info.get("replace_nonfinite", False) == replace_nonfinite:
            item["overlaps"] = info["overlaps"]
            return item, info["counts"], True

    vol = load_nifti(volume, patient)
    _check_geometry(vol, volume, patient)
    # read every voxel: a truncated .nii.gz fails here, and NaN/inf are found before anything is written
    image, replaced = finite_or_replace(nifti_voxels(vol, volume, patient), replace_nonfinite, patient, volume)
    label, overlaps = _label_from_masks(masks, organs, vol, volume, patient)
    item["overlaps"] = overlaps
    counts = count_classes(label, len(organs) + 1)
    info = {"organs": organs, "inputs": signature, "overlaps": overlaps, "counts": counts}
    info.update(replace_nonfinite=replace_nonfinite, nonfinite_replaced=replaced)
    copy_volume = volume.name.endswith(".nii.gz") and not replaced  # keep the volume exactly as distributed
    write_case((img_path, lab_path, side), image, label, vol.affine, info, volume if copy_volume else None)
    return item, counts, False


def _case_details(results: list[dict], progress: bool) -> tuple[list[dict], dict, dict[str, int]]:
    """Datalist items without their per-case details, which go to a top-level ``cases`` map (training items keep
    only collatable scalar fields), and the overlapping voxels summed over cases; ``progress`` prints both."""
    items, cases = [], {}
    total_overlap: dict[str, int] = {}
    for r in results:
        it = dict(r)
        case = _stem(it["image"])
        cases[case] = {"missing": it.pop("missing"), "overlaps": it.pop("overlaps")}
        items.append(it)
        for k, v in cases[case]["overlaps"].items():
            total_overlap[k] = total_overlap.get(k, 0) + v
        if cases[case]["missing"] and progress:
            print(f"note: {case}: no mask for {', '.join(cases[case]['missing'])}")
    if total_overlap and progress:
        print(f"overlaps resolved (smaller structure wins), voxels: {total_overlap}")
    return items, cases, total_overlap


def prepare_visceral(
    root: str | Path,
    out: str | Path,
    organs: list[str] | tuple[str, ...] | None = None,
    folds: int = 5,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    replace_nonfinite: bool = False,
) -> Path:
    """Merge VISCERAL per-structure masks into label maps and write ``OUT/datalist.json``.

    Cases are named ``visceral_<stem>`` (lower case, e.g. ``visceral_10000001_1_ctce_thab``); the patient id is
    the first field of the stem, and folds are by patient.

    Args:
        root: folder with ``Volumes/`` and ``Segmentations/``.
        out: output folder.
        organs: structures to include, in label order (names or RadLex ids); default all 16.
        folds: number of patient-level folds.
        seed: fold shuffle seed.
        workers: parallel processes.
        progress: show a progress bar and print missing structures / resolved overlaps.
        replace_nonfinite: replace NaN/inf voxels by the volume's smallest finite value instead of rejecting it.

    Returns:
        path of ``OUT/datalist.json``.

    Raises:
        DataPreparationError: missing folders, unreadable or truncated files, non-finite voxels, a mask whose
            geometry differs from its volume, two volumes with one case name, ``out`` inside ``root``, or an output
            file that an earlier ``prepare`` did not write.

    Example:
        >>> prepare_visceral("VISCERAL", "prepared/visceral", organs=["liver", "spleen"])  # doctest: +SKIP
    """
    root, out = Path(root), Path(out)
    names = resolve_organs(organs)
    vol_dir, seg_dir = root / "Volumes", root / "Segmentations"
    for d in (vol_dir, seg_dir):
        if not d.is_dir():
            raise DataPreparationError(f"no {d.name}/ folder: --root must hold Volumes/ and Segmentations/", file=d)
    volumes = sorted(p for p in vol_dir.iterdir() if re.search(r"\.nii(\.gz)?$", p.name) and not p.name.startswith("."))
    if not volumes:
        raise DataPreparationError("no .nii/.nii.gz volumes", file=vol_dir)
    check_case_names({str(v): case_name(v) for v in volumes})
    folds = check_prepare_options(len({_stem(v).split("_")[0] for v in volumes}), folds, seed, workers)
    mods = {"MR" if re.search(r"_MR", _stem(v), re.I) else "CT" for v in volumes}
    if len(mods) > 1:
        raise DataPreparationError("CT and MR volumes mixed; prepare them into separate folders", file=vol_dir)
    prepare_out_dir(root, out)
    check_out_dir(out, "VISCERAL Anatomy3")
    clean_stale_tmp(out)
    jobs = [(v, seg_dir, names, out, replace_nonfinite) for v in volumes]
    results = run_patients(_prepare_volume, jobs, workers, "prepare visceral", progress)
    items, cases, total_overlap = _case_details([r[0] for r in results], progress)
    return write_datalist(
        out,
        name="VISCERAL Anatomy3",
        modality={"0": mods.pop()},
        labels={"0": "background", **{str(i + 1): n for i, n in enumerate(names)}},
        items=items,
        counts={r[0]["image"]: r[1] for r in results},
        folds=folds,
        seed=seed,
        extra={
            "radlex": {n: RADLEX_IDS[n] for n in names},
            "overlap_rule": "smaller structure (fewer voxels in the volume) wins; ties: earlier in the organ list",
            "overlaps": total_overlap,
            "cases": cases,
        },
    )
