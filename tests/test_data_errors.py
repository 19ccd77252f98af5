"""Bad input (issue 3, section 5): one clear error naming patient and file, exit code 2, no traceback, no partial
output for that patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from scse_monai.data import DataPreparationError, prepare_chaos, synthesize
from scse_monai.data.cli import main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "Train_Sets"
    synthesize("chaos-mr", root, cases=2, seed=9, size=32, slices=(6, 6), progress=False)
    synthesize("visceral", root.parent / "visceral", cases=1, seed=9, size=32, slices=(6, 6), progress=False)
    return root


@pytest.fixture
def raw(pristine, tmp_path) -> Path:
    root = tmp_path / "Train_Sets"
    shutil.copytree(pristine, root)
    return root


def _t2(root: Path, pid: str = "2") -> Path:
    return root / "MR" / pid / "T2SPIR"


def _run(root: Path, out: Path, capsys, workers: int = 1) -> str:
    code = main(["prepare", "chaos", "--root", str(root), "--task", "mr-t2spir", "--out", str(out),
                 "--workers", str(workers), "--folds", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert not (out / "datalist.json").exists()
    assert not list(out.rglob(".tmp-*"))
    assert not list(out.rglob("chaos_mr_t2_02*"))  # nothing of the bad patient
    return lines[0]


def test_missing_ground(raw, tmp_path, capsys):
    shutil.rmtree(_t2(raw) / "Ground")
    msg = _run(raw, tmp_path / "out", capsys, workers=2)  # error crosses the process pool intact
    assert "patient 2" in msg and "Ground" in msg and "missing Ground folder" in msg


def test_mask_without_slice(raw, tmp_path, capsys):
    g = _t2(raw) / "Ground"
    shutil.copy(g / "IMG-0002-00001.png", g / "IMG-0002-00099.png")
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "IMG-0002-00099.png" in msg and "7 masks for 6 slices" in msg
    assert "no matching DICOM slice" in msg


def test_slice_without_mask(raw, tmp_path, capsys):
    (_t2(raw) / "Ground" / "IMG-0002-00003.png").unlink()
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "IMG-0002-00003.dcm" in msg and "slice has no mask" in msg


def test_renamed_mask_is_not_paired_by_sort_order(raw, tmp_path, capsys):
    g = _t2(raw) / "Ground"
    (g / "IMG-0002-00006.png").rename(g / "IMG-0002-00007.png")  # same count, one name off
    msg = _run(raw, tmp_path / "out", capsys)
    assert "IMG-0002-00006.dcm" in msg and "slice has no mask" in msg


def test_truncated_dicom(raw, tmp_path, capsys):
    f = _t2(raw) / "DICOM_anon" / "IMG-0002-00004.dcm"
    f.write_bytes(f.read_bytes()[:600])
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "IMG-0002-00004.dcm" in msg


def test_non_dicom_file(raw, tmp_path, capsys):
    (_t2(raw) / "DICOM_anon" / "notes.txt").write_text("not an image")
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "notes.txt" in msg and "not a DICOM file" in msg


def test_two_series_mixed(raw, tmp_path, capsys):
    shutil.copy(_t2(raw, "1") / "DICOM_anon" / "IMG-0002-00002.dcm", _t2(raw) / "DICOM_anon" / "IMG-0002-00777.dcm")
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "two series mixed" in msg and "IMG-0002-00777.dcm" in msg


def test_non_uniform_spacing(raw, tmp_path, capsys):
    f = _t2(raw) / "DICOM_anon" / "IMG-0002-00003.dcm"
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 2.0]
    ds.save_as(f)
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "IMG-0002-00003.dcm" in msg and "non-uniform slice spacing" in msg


def test_unknown_gray_level(raw, tmp_path, capsys):
    p = _t2(raw) / "Ground" / "IMG-0002-00002.png"
    m = np.asarray(Image.open(p)).copy()
    m[0, 0] = 100
    Image.fromarray(m).save(p)
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "IMG-0002-00002.png" in msg and "unknown gray levels [100]" in msg


def test_mask_size_differs(raw, tmp_path, capsys):
    p = _t2(raw) / "Ground" / "IMG-0002-00002.png"
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(p)
    msg = _run(raw, tmp_path / "out", capsys)
    assert "IMG-0002-00002.png" in msg and "differs from DICOM Rows x Columns" in msg


def test_empty_patient_folder(raw, tmp_path, capsys):
    shutil.rmtree(raw / "MR" / "2")
    (raw / "MR" / "2").mkdir()
    msg = _run(raw, tmp_path / "out", capsys)
    assert "patient 2" in msg and "empty patient folder" in msg


def test_previous_good_outputs_untouched_and_no_overwrite_of_partial(raw, tmp_path):
    out = tmp_path / "out"
    prepare_chaos(raw, "mr-t2spir", out, folds=2, workers=1, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*.nii.gz")}
    (_t2(raw) / "Ground" / "IMG-0002-00003.png").unlink()
    with pytest.raises(DataPreparationError) as e:
        prepare_chaos(raw, "mr-t2spir", out, folds=2, workers=1, progress=False)
    assert e.value.patient == "2" and e.value.file.endswith("IMG-0002-00003.dcm")
    assert {p: p.read_bytes() for p in out.rglob("*.nii.gz")} == before


def test_visceral_mask_geometry(pristine, tmp_path, capsys):
    root = tmp_path / "visceral"
    shutil.copytree(pristine.parent / "visceral", root)
    p = root / "Segmentations" / "10000001_1_CTce_ThAb_58_1.nii.gz"
    img = nib.load(p)
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), p)
    out = tmp_path / "vout"
    code = main(["prepare", "visceral", "--root", str(root), "--out", str(out), "--folds", "1", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "patient 10000001" in err and "10000001_1_CTce_ThAb_58_1.nii.gz" in err and "geometry" in err
    assert not list(out.rglob("*.nii.gz")) and not (out / "datalist.json").exists()


def test_out_holding_another_dataset_is_not_overwritten(raw, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_chaos(raw, "mr-t2spir", out, folds=2, workers=1, progress=False)
    before = (out / "datalist.json").read_text()
    code = main(["prepare", "chaos", "--root", str(raw), "--task", "mr-t1dual", "--out", str(out), "--folds", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a different prepared dataset" in err and "datalist.json" in err
    assert (out / "datalist.json").read_text() == before
    assert not list(out.rglob("chaos_mr_t1dual_*"))


def test_synthesize_never_overwrites(raw, capsys):
    before = sorted(p.name for p in (raw / "MR" / "1" / "T2SPIR" / "DICOM_anon").iterdir())
    code = main(["synthesize", "--layout", "chaos-mr", "--out", str(raw), "--cases", "1", "--size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists; not overwriting" in err and "Traceback" not in err
    assert sorted(p.name for p in (raw / "MR" / "1" / "T2SPIR" / "DICOM_anon").iterdir()) == before


def test_synthesize_visceral_never_overwrites_a_mask(tmp_path, capsys):
    """A user's file where a VISCERAL mask would go is kept (only the volumes were checked)."""
    mask = tmp_path / "Segmentations" / "10000001_1_CTce_ThAb_58_1.nii.gz"
    mask.parent.mkdir()
    mask.write_text("USER")
    code = main(["synthesize", "--layout", "visceral", "--out", str(tmp_path), "--cases", "1", "--size", "16",
                 "--slices", "4", "4"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and str(mask) in err and "already exists; not overwriting" in err
    assert mask.read_text() == "USER" and not (tmp_path / "Volumes").exists()


@pytest.mark.parametrize(("option", "value"), [("--seed", "-1"), ("--workers", "0"), ("--workers", "-5")])
def test_prepare_bad_seed_or_workers_is_refused_before_any_work(raw, tmp_path, capsys, option, value):
    out = tmp_path / "out"
    code = main(["prepare", "chaos", "--root", str(raw), "--task", "mr-t2spir", "--out", str(out), "--folds", "2",
                 option, value])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"error: {option} must be >= " in err and "Traceback" not in err
    assert not out.exists()
