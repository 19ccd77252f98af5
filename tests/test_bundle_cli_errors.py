"""Issue 16 item 9 on the command line: ``python -m monai.bundle run`` on bad input prints one line naming the file
(``error: ...``), exits non-zero and writes nothing; a real bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ignite.engine import Engine, Events

from scse_monai.bundle_support import check_inference_input
from scse_monai.errors import InputError
from scse_monai.handlers import ExitOnInputError

REPO = Path(__file__).resolve().parents[1]


def _volume(path: Path, kind: str = "ok") -> Path:
    data = np.random.default_rng(0).random((32, 32, 6)).astype(np.float32)
    if kind == "nan":
        data[:6, :6, :] = np.nan  # a block of NaNs, as in issue 16
    elif kind == "2 channels":
        data = np.stack([data, data], axis=-1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-200])
    return path


def _infer(image: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.json"]
    cmd += ["--bundle_root", "bundle", "--dataset_dir", str(image), "--output_dir", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "voxels are not finite"),
        ("2 channels", "expected 1 channel(s), got 2"),
        ("truncated", "EOFError"),
        ("empty folder", "no imagesTs/*.nii.gz or imagesTr/*.nii.gz"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_no_output(tmp_path: Path, kind: str, message: str) -> None:
    if kind == "empty folder":
        (image := tmp_path / "empty").mkdir()
    else:
        image = _volume(tmp_path / f"{kind.replace(' ', '_')}.nii.gz", kind)
    out = tmp_path / "out"
    res = _infer(image, out)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(image) in errors[0] and message in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("kind", "message"), [("missing", "does not exist"), ("garbage", "not a readable PyTorch")])
def test_a_bad_ckpt_path_is_one_line_naming_it_and_no_output(tmp_path: Path, kind: str, message: str) -> None:
    ckpt = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    res = _infer(_volume(tmp_path / "ok.nii.gz"), out, "--ckpt_path", str(ckpt))
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr[-3000:]
    assert f"ckpt_path {ckpt}" in errors[0] and message in errors[0], errors
    assert "Traceback" not in res.stderr + res.stdout and not out.exists(), res.stderr[-3000:]


@pytest.mark.parametrize(
    ("datalist", "args", "message"),
    [("{not json", [], "is not valid JSON"), ('{"training": [{"image": "a.nii.gz", "patient": "p", "fold": 0}, '
     '{"image": "b.nii.gz", "patient": "p", "fold": 1}]}', [], "patients ['p'] appear in several folds"),
     ('{"training": [{"image": "a.nii.gz", "label": "a.nii.gz", "patient": "p", "fold": 0}]}', ["--val_folds", "[0]"],
      "no cases for part='train' with val_folds=[0]")],
)  # fmt: skip
def test_bad_datalist_stops_training_in_one_line(tmp_path: Path, datalist: str, args: list, message: str) -> None:
    (tmp_path / "datalist.json").write_text(datalist)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/train.json", *args]
    cmd += ["--bundle_root", "bundle", "--dataset_dir", str(tmp_path), "--ckpt_dir", str(tmp_path / "models")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode != 0 and len(errors) == 1 and message in errors[0], res.stderr[-3000:]
    assert str(tmp_path / "datalist.json") in errors[0] and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "models").exists()


def test_a_real_bug_keeps_its_traceback(tmp_path: Path) -> None:
    # weights of 32 features into a network of 4: not the input's fault, so the traceback stays
    res = _infer(_volume(tmp_path / "ok.nii.gz"), tmp_path / "out", "--features", "4")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "size mismatch" in res.stderr, res.stderr[-3000:]
    assert not any(line.startswith("error: ") for line in res.stderr.splitlines())


def test_library_callers_get_exceptions(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="truncated.nii.gz cannot be read: EOFError"):
        check_inference_input(str(_volume(tmp_path / "truncated.nii.gz", "truncated")))
    check_inference_input(str(_volume(tmp_path / "ok.nii.gz")))
    for error in (InputError("image x.nii.gz: expected 1 channel(s), got 2"), KeyError("a bug")):
        engine = Engine(lambda engine, batch: None)
        ExitOnInputError().attach(engine)  # outside python -m monai.bundle it re-raises whatever stopped the engine

        @engine.on(Events.ITERATION_STARTED)
        def fail(engine: Engine, error: Exception = error) -> None:
            raise RuntimeError("applying transform") from error

        with pytest.raises(RuntimeError) as info:
            engine.run([0])
        assert info.value.__cause__ is error
