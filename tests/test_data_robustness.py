"""Issue 16, data side: non-finite voxels, case-name collisions, truncated VISCERAL files, stale temp files,
foreign outputs, ``--out`` inside ``--root``, and one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from scse_monai.bundle_support import inference_data
from scse_monai.data import DataPreparationError, synthesize
from scse_monai.data.cli import main
from scse_monai.data.datalist import write_datalist


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pristine")
    synthesize("chaos-mr", base / "Train_Sets", cases=2, seed=5, size=32, slices=(6, 6), progress=False)
    synthesize("visceral", base / "visceral", cases=2, seed=5, size=32, slices=(6, 6), progress=False)
    return base


@pytest.fixture
def chaos(pristine, tmp_path) -> Path:
    shutil.copytree(pristine / "Train_Sets", tmp_path / "Train_Sets")
    return tmp_path / "Train_Sets"


@pytest.fixture
def visceral(pristine, tmp_path) -> Path:
    shutil.copytree(pristine / "visceral", tmp_path / "visceral")
    return tmp_path / "visceral"


def _chaos(root: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "chaos", "--root", str(root), "--task", "mr-t2spir", "--out", str(out), "--folds", "2",
            "--workers", "1", *extra]  # fmt: skip


def _visceral(root: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "visceral", "--root", str(root), "--out", str(out), "--folds", "2", "--workers", "1",
            "--organs", "liver", "spleen", *extra]  # fmt: skip


def _error(argv: list[str], capsys, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _first_volume(root: Path) -> Path:
    return sorted((root / "Volumes").glob("*.nii.gz"))[0]


# item 3: non-finite voxels
def test_nan_volume_is_rejected_naming_the_case_or_replaced_under_a_flag(visceral, tmp_path, capsys):
    vol = _first_volume(visceral)
    img = nib.load(vol)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[:4, :4, 0] = np.nan
    data[5, 5, 1] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), vol)
    msg = _error(_visceral(visceral, tmp_path / "out"), capsys)
    assert vol.name in msg and "non-finite" in msg and "--replace-nonfinite" in msg
    assert not (tmp_path / "out" / "datalist.json").exists()

    assert main(_visceral(visceral, tmp_path / "fixed", "--replace-nonfinite")) == 0
    case = "visceral_" + vol.name[: -len(".nii.gz")].lower()
    fixed = np.asarray(nib.load(tmp_path / "fixed" / "imagesTr" / f"{case}.nii.gz").dataobj)
    assert np.isfinite(fixed).all() and fixed[0, 0, 0] == np.nanmin(data[np.isfinite(data)])


# item 5: case-name collisions
def test_chaos_patients_1_and_01_collide_with_an_error_naming_both(chaos, tmp_path, capsys):
    shutil.copytree(chaos / "MR" / "1", chaos / "MR" / "01")
    msg = _error(_chaos(chaos, tmp_path / "out"), capsys)
    assert "MR/1 " in msg and "MR/01 " in msg and "chaos_mr_t2_01" in msg
    assert not (tmp_path / "out" / "datalist.json").exists()


@pytest.mark.parametrize("twin", ["uncompressed", "upper case"])
def test_visceral_stems_that_map_to_one_case_collide(visceral, tmp_path, capsys, twin):
    vol = _first_volume(visceral)
    stem = vol.name[: -len(".nii.gz")]
    other = vol.with_name(stem + ".nii") if twin == "uncompressed" else vol.with_name(stem.upper() + ".nii.gz")
    nib.save(nib.load(vol), other)
    msg = _error(_visceral(visceral, tmp_path / "out"), capsys)
    assert vol.name in msg and other.name in msg and "both map to case" in msg


def test_datalist_never_holds_one_file_twice(tmp_path):
    items = [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "patient": p} for p in ("1", "01")]
    with pytest.raises(DataPreparationError, match="both map to imagesTr/a.nii.gz"):
        write_datalist(tmp_path, name="x", modality={"0": "MR"}, labels={"0": "background"}, items=items,
                       counts={}, folds=2, seed=0)  # fmt: skip


# item 6: truncated VISCERAL volume
def test_truncated_visceral_volume_is_rejected(visceral, tmp_path, capsys):
    vol = _first_volume(visceral)
    blob = vol.read_bytes()
    vol.write_bytes(blob[: len(blob) // 2])
    msg = _error(_visceral(visceral, tmp_path / "out"), capsys)
    assert vol.name in msg
    assert not list((tmp_path / "out" / "imagesTr").glob("*"))


# item 7: stale temporary files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_prepare_removes_its_stale_temp_files_and_inference_ignores_hidden_names(chaos, tmp_path):
    out = tmp_path / "out"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    stale = [out / "imagesTr" / f".tmp-{_dead_pid()}-chaos_mr_t2_01.nii.gz", out / "labelsTr" / ".tmp-1-x.json"]
    for p in stale:
        p.write_bytes(b"partial")
    foreign = out / "imagesTr" / ".user-notes.nii.gz"  # not one of prepare's names: left alone
    foreign.write_bytes(b"x")
    assert main(_chaos(chaos, out)) == 0
    assert [p.exists() for p in stale] == [False, os.path.exists("/proc/1")]  # pid 1 is alive: kept
    assert foreign.exists()
    listed = [Path(d["image"]).name for d in inference_data(str(out))]
    assert listed == ["chaos_mr_t2_01.nii.gz", "chaos_mr_t2_02.nii.gz"]


# item 8: overwrites
def test_prepare_never_overwrites_a_file_it_did_not_write(chaos, tmp_path, capsys):
    mine = tmp_path / "out" / "imagesTr" / "chaos_mr_t2_01.nii.gz"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's own file")
    msg = _error(_chaos(chaos, tmp_path / "out"), capsys)
    assert str(mine) in msg and "not written by" in msg
    assert mine.read_bytes() == b"the user's own file"


def test_prepare_rerun_keeps_working_and_notices_a_replaced_output(chaos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_chaos(chaos, out)) == 0
    assert main(_chaos(chaos, out)) == 0  # its own outputs: reused
    label = out / "labelsTr" / "chaos_mr_t2_02.nii.gz"
    label.write_bytes(b"edited by hand")
    msg = _error(_chaos(chaos, out), capsys)
    assert str(label) in msg and label.read_bytes() == b"edited by hand"


def test_out_inside_root_is_refused(chaos, capsys):
    msg = _error(_chaos(chaos, chaos / "prepared"), capsys)
    assert "--out is inside --root" in msg
    assert not (chaos / "prepared").exists()


# item 9: one-line errors
@pytest.mark.parametrize("kind", ["dangling", "looping"])
def test_bad_symlink_in_dicom_folder(chaos, tmp_path, capsys, kind):
    link = chaos / "MR" / "2" / "T2SPIR" / "DICOM_anon" / "IMG-link.dcm"
    link.symlink_to(tmp_path / "nowhere.dcm" if kind == "dangling" else link)
    msg = _error(_chaos(chaos, tmp_path / "out"), capsys)
    assert "patient 2" in msg and "IMG-link.dcm" in msg and "symbolic link" in msg


def test_out_that_is_a_file(chaos, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    msg = _error(_chaos(chaos, tmp_path / "out"), capsys)
    assert "not a folder" in msg and str(tmp_path / "out") in msg


def test_pixel_spacing_zero(chaos, tmp_path, capsys):
    for f in (chaos / "MR" / "2" / "T2SPIR" / "DICOM_anon").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0, 0]
        ds.save_as(f)
    msg = _error(_chaos(chaos, tmp_path / "out"), capsys)
    assert "patient 2" in msg and "PixelSpacing" in msg


def test_singular_affine(visceral, tmp_path, capsys):
    vol = _first_volume(visceral)
    img = nib.load(vol)
    header = img.header.copy()
    header.set_qform(None, code=0)
    header["srow_z"][:3] = 0  # a zero third column: nibabel itself refuses to write such an affine, so set it raw
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), vol)
    assert abs(np.linalg.det(nib.load(vol).affine[:3, :3])) < 1e-9
    msg = _error(_visceral(visceral, tmp_path / "out"), capsys)
    assert vol.name in msg and "singular" in msg


def test_full_disk_is_one_line_exit_1(chaos, tmp_path):
    def limit():  # a 1 KiB file size limit: the first NIfTI write fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 10, 1 << 10))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scse_monai.data", *_chaos(chaos, out)]
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not list(out.rglob(".tmp-*")) and not (out / "datalist.json").exists()


def test_synthesize_removes_the_work_folder_a_killed_run_left(tmp_path):
    """A killed synthesize left .synthesize.tmp-* in --out for good; the next run removes it (a live one stays)."""
    from scse_monai.data import synthesize

    out = tmp_path / "raw"
    dead = out / f".synthesize.tmp-{_dead_pid()}-abc"
    live = out / ".synthesize.tmp-1-xyz"  # pid 1 (init) runs
    for folder in (dead, live):
        (folder / "MR").mkdir(parents=True)
    synthesize("chaos-mr", out, cases=1, seed=0, size=16, slices=(3, 3), progress=False)
    assert (out / "MR" / "1").is_dir() and sorted(out.glob(".synthesize.tmp-*")) == [live]
