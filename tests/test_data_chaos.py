"""CHAOS preparation on synthetic data in the native layout: alignment, labels, folds, counts, re-runs."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from scse_monai.data import ensure_synthetic_dataset, prepare_chaos, synthesize
from scse_monai.data.cli import main

GRAY = {63: 1, 126: 2, 189: 3, 252: 4}


@pytest.fixture(scope="module")
def chaos_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chaos") / "Train_Sets"
    synthesize("chaos-mr", root, cases=3, seed=5, size=48, slices=(8, 10), mr_sequence="both", progress=False)
    synthesize("chaos-ct", root, cases=2, seed=6, size=48, slices=(8, 10), progress=False)
    return root


def _check_alignment(out: Path, case: str, dicom_dir: Path, ground: Path, png_name, gray: dict, channel=None):
    """Each DICOM pixel and its PNG mask value appear in the NIfTI at that pixel's own world position."""
    img = nib.load(out / "imagesTr" / f"{case}.nii.gz")
    lab = nib.load(out / "labelsTr" / f"{case}.nii.gz")
    np.testing.assert_allclose(img.affine, lab.affine)
    data, labels = np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj)
    if channel is not None:
        data = data[..., channel]
    inv = np.linalg.inv(img.affine)
    for f in sorted(dicom_dir.iterdir()):
        ds = pydicom.dcmread(f)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        idx = inv @ np.array([-ipp[0], -ipp[1], ipp[2], 1.0])  # voxel (row 0, column 0) of this slice
        np.testing.assert_allclose(idx[:2], 0, atol=1e-3)
        k = int(round(idx[2]))
        np.testing.assert_array_equal(data[:, :, k].T, ds.pixel_array)
        if ground is not None:
            png = np.asarray(Image.open(ground / png_name(f.name)))
            expected = np.vectorize(lambda g: gray.get(int(g), 0))(png)
            np.testing.assert_array_equal(labels[:, :, k].T, expected)


def test_mr_t2spir_roundtrip(chaos_raw, tmp_path):
    out = tmp_path / "out"
    path = prepare_chaos(chaos_raw, "mr-t2spir", out, folds=3, seed=1, workers=2, progress=False)
    doc = json.loads(path.read_text())
    assert doc["labels"] == {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
    assert doc["modality"] == {"0": "MR"} and doc["folds"] == 3 and doc["seed"] == 1
    assert [it["patient"] for it in doc["training"]] == ["1", "2", "3"]
    assert sorted(it["fold"] for it in doc["training"]) == [0, 1, 2]
    # the synthetic series of patient 2 runs against the slice normal: file 1 is the most superior slice
    files = sorted((chaos_raw / "MR/2/T2SPIR/DICOM_anon").iterdir())
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in (files[0], files[-1])]
    assert z[0] > z[1]
    counts = np.zeros(5, dtype=np.int64)
    for pid in ("1", "2", "3"):
        base = chaos_raw / "MR" / pid / "T2SPIR"
        _check_alignment(out, f"chaos_mr_t2_0{pid}", base / "DICOM_anon", base / "Ground",
                         lambda n: n.replace(".dcm", ".png"), GRAY)  # fmt: skip
        for png in (base / "Ground").iterdir():
            g = np.asarray(Image.open(png))
            counts[0] += (g == 0).sum()
            for level, cls in GRAY.items():
                counts[cls] += (g == level).sum()
    assert doc["class_voxel_counts"] == {str(k): int(v) for k, v in enumerate(counts)}
    assert all(counts > 0)

    # re-run: outputs up to date are not rewritten; datalist unchanged
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    prepare_chaos(chaos_raw, "mr-t2spir", out, folds=3, seed=1, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == before
    assert json.loads(path.read_text()) == doc
    assert not list(out.rglob(".tmp-*"))


def test_mr_t1dual_two_channels(chaos_raw, tmp_path):
    out = tmp_path / "t1"
    doc = json.loads(prepare_chaos(chaos_raw, "mr-t1dual", out, folds=2, workers=1, progress=False).read_text())
    assert doc["modality"] == {"0": "MR", "1": "MR"}
    assert doc["channels"] == {"0": "T1 in-phase", "1": "T1 opposed-phase"}
    base = chaos_raw / "MR" / "1" / "T1DUAL"
    img = nib.load(out / "imagesTr" / "chaos_mr_t1dual_01.nii.gz")
    assert img.ndim == 4 and img.shape[-1] == 2
    _check_alignment(out, "chaos_mr_t1dual_01", base / "DICOM_anon" / "InPhase", base / "Ground",
                     lambda n: n.replace(".dcm", ".png"), GRAY, channel=0)  # fmt: skip
    _check_alignment(out, "chaos_mr_t1dual_01", base / "DICOM_anon" / "OutPhase", None, None, GRAY, channel=1)


def test_ct_liver_hounsfield_and_masks(chaos_raw, tmp_path):
    out = tmp_path / "ct"
    doc = json.loads(prepare_chaos(chaos_raw, "ct-liver", out, folds=2, workers=1, progress=False).read_text())
    assert doc["modality"] == {"0": "CT"} and doc["labels"] == {"0": "background", "1": "liver"}
    base = chaos_raw / "CT" / "1"
    img = nib.load(out / "imagesTr" / "chaos_ct_01.nii.gz")
    data = np.asanyarray(img.dataobj)
    assert data.min() < -500 and data.max() > 100  # Hounsfield units, not stored values
    inv = np.linalg.inv(img.affine)
    labels = np.asanyarray(nib.load(out / "labelsTr" / "chaos_ct_01.nii.gz").dataobj)
    for f in sorted((base / "DICOM_anon").iterdir()):
        ds = pydicom.dcmread(f)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        k = int(round((inv @ np.array([-ipp[0], -ipp[1], ipp[2], 1.0]))[2]))
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(data[:, :, k].T, hu)
        index = int(f.name[1:5])  # i0045,0000b.dcm <-> liver_GT_045.png
        png = np.asarray(Image.open(base / "Ground" / f"liver_GT_{index:03d}.png"))
        np.testing.assert_array_equal(labels[:, :, k].T, (png == 255).astype(np.uint8))


def _ensure(path: str, q) -> None:
    q.put(str(ensure_synthetic_dataset(path)))


def test_ensure_synthetic_dataset_concurrent(tmp_path):
    target = tmp_path / "demo"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(target), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert {q.get(), q.get()} == {str(target / "datalist.json")}
    doc = json.loads((target / "datalist.json").read_text())
    assert len(doc["training"]) == 6
    for it in doc["training"]:
        shape = nib.load(target / it["image"]).shape
        assert shape[:2] == (96, 96) and 12 <= shape[2] <= 20
        assert nib.load(target / it["label"]).shape == shape
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["demo"]
    # present: returned without rewriting
    mtime = (target / "datalist.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset(target) == target / "datalist.json"
    assert (target / "datalist.json").stat().st_mtime_ns == mtime


def test_cli_prepare_and_preview(chaos_raw, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["prepare", "chaos", "--root", str(chaos_raw.parent), "--task", "mr-t2spir", "--out", str(out),
                 "--folds", "2", "--workers", "1"]) == 0  # fmt: skip
    png = tmp_path / "p.png"
    datalist = str(out / "datalist.json")
    assert main(["preview", "--datalist", datalist, "--case", "chaos_mr_t2_02", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 300
    assert main(["preview", "--datalist", datalist, "--case", "nope", "--out", str(png)]) == 2
    assert "case 'nope' not in datalist" in capsys.readouterr().err


def test_t1dual_masks_named_after_opposed_phase(chaos_raw, tmp_path):
    """Ground PNGs carrying the opposed-phase file names are paired with those slices (same geometry)."""
    root = tmp_path / "Train_Sets"
    shutil.copytree(chaos_raw / "MR" / "1", root / "MR" / "1")
    shutil.copytree(chaos_raw / "MR" / "2", root / "MR" / "2")
    for pid in ("1", "2"):
        base = root / "MR" / pid / "T1DUAL"
        by_pos = {}
        for phase in ("InPhase", "OutPhase"):
            for f in (base / "DICOM_anon" / phase).iterdir():
                z = round(float(pydicom.dcmread(f).ImagePositionPatient[2]), 2)
                by_pos.setdefault(z, {})[phase] = f.stem
        for names in by_pos.values():
            (base / "Ground" / f"{names['InPhase']}.png").rename(base / "Ground" / f"{names['OutPhase']}.tmp")
        for p in (base / "Ground").glob("*.tmp"):
            p.rename(p.with_suffix(".png"))
    out = tmp_path / "out"
    prepare_chaos(root, "mr-t1dual", out, folds=2, workers=1, progress=False)
    base = root / "MR" / "2" / "T1DUAL"
    _check_alignment(out, "chaos_mr_t1dual_02", base / "DICOM_anon" / "OutPhase", base / "Ground",
                     lambda n: n.replace(".dcm", ".png"), GRAY, channel=1)  # fmt: skip
