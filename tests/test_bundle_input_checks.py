"""The bundle's training, evaluation and inference refuse what would silently give wrong results or lose files:

- train.json (training and validation volumes) and evaluate.json run ``CheckInputd`` on image and label, as
  inference.json does on the image: one NaN voxel is an error naming the file (one line under
  ``python -m monai.bundle``), not Dice 0 or a skewed validation;
- evaluate.json scores against the label file itself, not the label resampled to ``pixdim`` and back;
- inference.json refuses to replace an existing output file unless ``--overwrite true``;
- docs/bundle.md describes what ``WeightedDiceCELoss`` weights by default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import decollate_batch, list_data_collate

from scse_monai.bundle_support import check_outputs
from scse_monai.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "bundle" / "configs"
AFFINE = np.diag([1.3, 1.3, 4.0, 1.0])  # in-plane spacing that 2 mm resampling does not preserve


def _parser(*configs: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CFG / c) for c in configs])
    parser.update(overrides)
    return parser


def _case(folder: Path, name: str, nan_in: str | None = None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.random((24, 20, 5)).astype(np.float32)
    label = np.zeros(image.shape, np.float32)
    label[3:15, 4:12] = 1
    label[16:21, 2:6, 1:4] = 2
    label[rng.random(image.shape) < 0.1] = 4  # speckle: nearest resampling to 2 mm and back cannot keep it
    if nan_in == "image":
        image[0, 0, 0] = np.nan
    elif nan_in == "label":
        label[5, 5, 2] = np.nan
    paths = {}
    for key, data in (("image", image), ("label", label)):
        (folder / f"{key}sTr").mkdir(parents=True, exist_ok=True)
        paths[key] = folder / f"{key}sTr" / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), paths[key])
    return {"image": str(paths["image"]), "label": str(paths["label"])}


def _dataset(folder: Path, nan_in: str | None = None, nan_case: int = 1) -> Path:
    """A decathlon folder of 4 cases; case ``nan_case`` has one NaN voxel in its ``nan_in``."""
    cases = [_case(folder, f"case{i}", nan_in if i == nan_case else None, seed=i) for i in range(4)]
    training = [{k: str(Path(v).relative_to(folder)) for k, v in c.items()} for c in cases]
    labels = {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "training": training}))
    return folder


def _bundle_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", "bundle"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------------------------ issue 1: input check
@pytest.mark.parametrize("configs", [["train.json"], ["train.json", "evaluate.json"]])
@pytest.mark.parametrize("key", ["image", "label"])
def test_training_and_evaluation_volumes_refuse_a_nan_naming_the_file(tmp_path: Path, configs, key) -> None:
    item = _case(tmp_path, "case", nan_in=key)
    for part in ("validate#preprocessing", "train#preprocessing"):
        if part == "train#preprocessing" and "evaluate.json" in configs:
            continue
        pre = _parser(*configs).get_parsed_content(part)
        with pytest.raises(RuntimeError) as info:  # MONAI wraps a transform's error as "applying transform ..."
            pre(dict(item))
        cause = info.value.__cause__
        assert isinstance(cause, InputError) and item[key] in str(cause) and "not finite" in str(cause), repr(cause)
    assert _parser(*configs).get_parsed_content("validate#preprocessing")(_case(tmp_path, "ok"))["label"].shape[0] == 1


def test_evaluation_of_a_nan_image_is_one_line_and_writes_no_scores(tmp_path: Path) -> None:
    data, out = _dataset(tmp_path / "data", "image"), tmp_path / "eval"
    res = _bundle_cli(
        "--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']", "--dataset_dir", str(data),
        "--ckpt_dir", "bundle/models", "--output_dir", str(out), "--eval_part", "all",
    )  # fmt: skip
    line = _one_error_line(res)
    assert str(data / "imagesTr" / "case1.nii.gz") in line and "not finite" in line, line
    assert not list(out.glob("*.csv")) if out.exists() else True


@pytest.mark.parametrize("key", ["image", "label"])
def test_training_with_a_nan_is_one_line_naming_the_file_before_anything_is_written(tmp_path: Path, key) -> None:
    data, models = _dataset(tmp_path / "data", key), tmp_path / "models"
    res = _bundle_cli(
        "--config_file", "bundle/configs/train.json", "--dataset_dir", str(data), "--ckpt_dir", str(models),
        "--output_dir", str(tmp_path / "eval"), "--epochs", "1", "--features", "4",
    )  # fmt: skip
    line = _one_error_line(res)
    assert f"{key} {data / f'{key}sTr' / 'case1.nii.gz'}" in line and "not finite" in line, line
    assert not models.exists() and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_torchrun_training_with_a_nan_label_stops_each_rank_in_one_line(tmp_path: Path) -> None:
    # multi_gpu_train.json builds the trainer (and so caches the volumes) in initialize: the check comes first there
    data = _dataset(tmp_path / "data", "label")
    configs = "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", "bundle"]
    cmd += ["--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    log = res.stdout + res.stderr
    errors = [line for line in log.splitlines() if line.startswith("error: label ")]
    assert res.returncode != 0 and errors, log[-3000:]
    assert all(str(data / "labelsTr" / "case1.nii.gz") in e and "not finite" in e for e in errors), errors
    assert "Failed to instantiate" not in log and "InputError" not in log, log[-3000:]  # no rank's traceback
    assert not (tmp_path / "models").exists()


# ------------------------------------------------------------------- issue 2: scores against the label file itself
def test_evaluation_scores_against_the_label_file_on_its_own_grid(tmp_path: Path) -> None:
    item = _case(tmp_path, "case")
    parser = _parser("train.json", "evaluate.json", device="$torch.device('cpu')", keep_largest_component=False)
    pre = parser.get_parsed_content("validate#preprocessing")
    post = parser.get_parsed_content("validate#postprocessing")
    batch = list_data_collate([pre(dict(item))])
    # a "perfect" prediction on the network's 2 mm grid: the resampled label, one-hot
    batch["pred"] = torch.nn.functional.one_hot(batch["label"][:, 0].long(), 5).permute(0, 4, 1, 2, 3).float()
    out = post(decollate_batch(batch)[0])
    truth = np.asarray(nib.load(item["label"]).dataobj)
    scored = np.asarray(torch.as_tensor(out["label"]).cpu())[0]
    assert scored.shape == truth.shape and np.array_equal(scored, truth)
    assert np.asarray(torch.as_tensor(out["pred"]).cpu()).shape[1:] == truth.shape


# ------------------------------------------------------------------------------ issue 3: existing outputs are kept
def test_inference_refuses_to_overwrite_an_existing_output_unless_asked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(2):
        _case(data, f"case{i}", seed=i)
    out = tmp_path / "out"
    out.mkdir()
    manual = out / "case1_seg.nii.gz"  # the user's own segmentation, named as the bundle names its output
    manual.write_bytes(b"the user's manual segmentation")
    args = ["--config_file", "bundle/configs/inference.json", "--dataset_dir", str(data), "--output_dir", str(out)]
    line = _one_error_line(_bundle_cli(*args))
    assert str(manual) in line and "--overwrite true" in line, line
    assert manual.read_bytes() == b"the user's manual segmentation"
    assert sorted(p.name for p in out.iterdir()) == ["case1_seg.nii.gz"]  # nothing written for case0 either
    assert "--overwrite" in _one_error_line(_bundle_cli(*args, "--overwrite", "maybe"))
    res = _bundle_cli(*args, "--overwrite", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["case0_seg.nii.gz", "case1_seg.nii.gz"]
    assert nib.load(manual).shape == (24, 20, 5)


@pytest.mark.parametrize("layout", [{}, {"separate_folder": True, "output_postfix": "mask", "output_ext": ".nii"}])
def test_refused_path_is_the_one_save_imaged_writes(tmp_path: Path, layout: dict) -> None:
    parser = _parser("inference.json", output_dir=str(tmp_path / "out"))
    for k, v in layout.items():
        parser[f"postprocessing#transforms#4#{k}"] = v
    post = parser.get_parsed_content("postprocessing")
    item = _case(tmp_path, "case")
    out = tmp_path / "out"
    check_outputs([item], post)  # nothing there yet: no error, and computing the path creates nothing
    assert not out.exists()
    saver = post.transforms[-1]
    pred = parser.get_parsed_content("preprocessing")(dict(item))["image"][:1]
    saver({"pred": pred})
    (written,) = [p for p in out.rglob("*") if p.is_file()]
    with pytest.raises(InputError, match=f"output {written} .*exists; refusing to overwrite"):
        check_outputs([item], post)
    check_outputs([item], post, overwrite="true")


# ------------------------------------------------------------------------------------- issue 4: the docs' loss line
def test_docs_say_weighted_dice_ce_weights_only_the_cross_entropy_by_default() -> None:
    import inspect

    from scse_monai.losses import WeightedDiceCELoss

    assert inspect.signature(WeightedDiceCELoss).parameters["weight_dice"].default is False
    text = " ".join((REPO / "docs" / "bundle.md").read_text().split())
    assert "which weights Dice + cross-entropy" not in text
    assert "weights only the cross-entropy" in text and "weight_dice" in text
