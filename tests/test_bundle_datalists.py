"""What the bundle does with the data it is given: plain decathlon datalists, missing data, few patients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from scse_monai.bundle_support import (
    class_names,
    class_voxel_counts,
    partition,
    resolve_datalist,
    training_datalist,
)
from scse_monai.losses import weights_from_datalist

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def write_decathlon(root: Path, cases: int = 5, shape=(12, 10, 3), seed: int = 0) -> Path:
    """A plain decathlon task folder: ``dataset.json`` with ``training: [{image, label}]`` and nothing else."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(cases):
        name = f"case_{i:02d}.nii.gz"
        label = rng.integers(0, 3, size=shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), np.eye(4)), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    doc = {"name": "toy", "labels": {"0": "background", "1": "liver", "2": "spleen"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def test_a_plain_decathlon_datalist_is_split_by_a_seeded_patient_level_fold(tmp_path: Path) -> None:
    datalist = write_decathlon(tmp_path / "Task01_Toy")
    assert resolve_datalist(str(tmp_path / "Task01_Toy")) == str(datalist)
    train = partition(str(datalist), "train", [0])
    val = partition(str(datalist), "val", [0])
    assert len(val) == 1 and len(train) == 4  # 5 cases, one patient per fold
    assert {Path(i["image"]).name for i in train + val} == {f"case_{i:02d}.nii.gz" for i in range(5)}
    assert all(Path(i["image"]).is_absolute() and Path(i["label"]).is_file() for i in train + val)
    assert {i["patient"] for i in val}.isdisjoint(i["patient"] for i in train)
    assert partition(str(datalist), "val", [0]) == val  # the same split every time (seed 0)
    three = partition(str(datalist), "all", [0], folds=3, seed=1)
    assert sorted(i["fold"] for i in three) == [0, 0, 1, 1, 2]
    assert class_names(str(datalist)) == ["liver", "spleen"]
    # no validation folds: every patient trains, validation is empty; a val fold that holds nobody is an error
    assert len(partition(str(datalist), "train", [])) == 5 and partition(str(datalist), "val", []) == []
    with pytest.raises(ValueError, match="no cases for part='val'"):
        partition(str(datalist), "val", [7])


def test_class_voxel_counts_are_counted_when_the_datalist_has_none(tmp_path: Path) -> None:
    datalist = write_decathlon(tmp_path / "toy", cases=3)
    expected = np.zeros(3, dtype=np.int64)
    for lab in sorted((tmp_path / "toy" / "labelsTr").glob("*.nii.gz")):
        expected += np.bincount(np.asarray(nib.load(lab).dataobj).ravel(), minlength=3)
    counts = class_voxel_counts(str(datalist))
    assert counts == {str(k): int(v) for k, v in enumerate(expected)}
    weights = weights_from_datalist(str(datalist))  # WeightedDiceCELoss's datalist= path
    assert len(weights) == 3 and all(w > 0 for w in weights)
    # a prepared datalist's own counts are used as they are
    doc = json.loads(datalist.read_text())
    doc["class_voxel_counts"] = {"0": 10, "1": 5, "2": 5}
    datalist.write_text(json.dumps(doc))
    assert class_voxel_counts(str(datalist)) == {"0": 10, "1": 5, "2": 5}


def test_prepare_with_fewer_patients_than_folds_uses_one_fold_per_patient(tmp_path: Path, capsys) -> None:
    from scse_monai.data.cli import main
    from scse_monai.data.synthetic import synthesize

    raw = synthesize("chaos-mr", tmp_path / "raw", cases=2, seed=0, size=32, slices=(4, 5), progress=False)
    out = tmp_path / "prepared"
    args = ["prepare", "chaos", "--root", str(raw), "--task", "mr-t2spir", "--out", str(out), "--workers", "1"]
    assert main(args) == 0  # the default --folds 5
    assert "--folds 5 but 2 patients: using 2 folds" in capsys.readouterr().err
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["folds"] == 2
    assert sorted(i["fold"] for i in doc["training"]) == [0, 1]


@pytest.mark.slow
def test_training_without_dataset_dir_fails_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """From the bundle's own folder, as model-zoo runs it; the default dataset_dir does not exist here."""
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for name in ("train.json", "metadata.json", "logging.conf"):
        (bundle / "configs" / name).write_bytes((BUNDLE / "configs" / name).read_bytes())
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json"]
    cmd += ["--dataset_dir", str(tmp_path / "nowhere")]
    res = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset_dir ") and "nowhere does not exist" in last and "--dataset_dir" in last
    assert sorted(p.name for p in bundle.iterdir()) == ["configs"]  # no data/, models/ or eval/ written
    assert not (tmp_path / "nowhere").exists()


def set_folds(datalist: Path, folds: list[int | None]) -> None:
    """Give the datalist's items these ``fold`` keys (``None``: no key), as MONAI's fold datalists have them."""
    doc = json.loads(datalist.read_text())
    for item, fold in zip(doc["training"], folds, strict=True):
        item.pop("fold", None)
        if fold is not None:
            item["fold"] = fold
    datalist.write_text(json.dumps(doc))


def test_a_fold_datalist_without_patients_keeps_its_folds_and_each_case_is_its_own_patient(tmp_path: Path) -> None:
    datalist = write_decathlon(tmp_path / "toy", cases=4)
    set_folds(datalist, [0, 1, 0, 1])
    val = partition(str(datalist), "val", [0])
    assert [i["patient"] for i in val] == ["case_00", "case_02"] and all(i["fold"] == 0 for i in val)
    assert [i["patient"] for i in partition(str(datalist), "train", [0])] == ["case_01", "case_03"]


def test_a_datalist_without_labels_names_its_classes_by_index(tmp_path: Path) -> None:
    # MONAI's fold datalists often have no "labels" map: the metrics' class names come from num_classes
    datalist = write_decathlon(tmp_path / "toy", cases=4)
    doc = json.loads(datalist.read_text())
    doc.pop("labels", None)
    datalist.write_text(json.dumps(doc))
    assert class_names(str(datalist), num_classes=3) == ["class1", "class2"]
    with pytest.raises(ValueError, match=r"toy/dataset.json has no 'labels' map"):
        class_names(str(datalist))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"dataset_dir": str(datalist.parent), "num_classes": 3})
    assert parser.get_parsed_content("validate#key_metric#val_mean_dice").class_labels == ["class1", "class2"]


def test_a_datalist_where_only_some_items_have_a_fold_is_refused(tmp_path: Path) -> None:
    datalist = write_decathlon(tmp_path / "toy", cases=5)
    set_folds(datalist, [0, 0, 1, 1, None])
    with pytest.raises(ValueError, match=r"toy/dataset.json: 1 of 5 training items have no 'fold'"):
        partition(str(datalist), "val", [0])


def test_the_loss_weights_count_only_the_training_cases(tmp_path: Path) -> None:
    from scse_monai.bundle_support import training_datalist
    from scse_monai.losses import WeightedDiceCELoss, median_frequency_weights

    datalist = write_decathlon(tmp_path / "toy", cases=4)
    set_folds(datalist, [0, 1, 1, 1])
    nib.save(nib.Nifti1Image(np.full((12, 10, 3), 2, np.uint8), np.eye(4)), tmp_path / "toy/labelsTr/case_00.nii.gz")
    train = np.zeros(3, dtype=np.int64)
    for item in partition(str(datalist), "train", [0]):
        train += np.bincount(np.asarray(nib.load(item["label"]).dataobj).ravel(), minlength=3)
    counts = class_voxel_counts(str(datalist), val_folds=[0])
    assert counts == {str(k): int(v) for k, v in enumerate(train)} != class_voxel_counts(str(datalist))
    doc = training_datalist(str(datalist), [0])  # what a recipe gives WeightedDiceCELoss(datalist=...)
    assert [Path(i["image"]).name for i in doc["training"]] == ["case_01.nii.gz", "case_02.nii.gz", "case_03.nii.gz"]
    weights = WeightedDiceCELoss(datalist=doc, to_onehot_y=True, softmax=True).class_weights
    assert weights == pytest.approx(median_frequency_weights(train.tolist()))
    assert weights != pytest.approx(weights_from_datalist(str(datalist)))  # all cases, the held-out one too
    # a prepared datalist's all-cases counts are not used when folds are held out; with none held out they are
    doc = json.loads(datalist.read_text())
    doc["class_voxel_counts"] = {"0": 10, "1": 5, "2": 5}
    datalist.write_text(json.dumps(doc))
    assert class_voxel_counts(str(datalist), val_folds=[0]) == counts
    assert class_voxel_counts(str(datalist), val_folds=[]) == {"0": 10, "1": 5, "2": 5}


def test_val_folds_that_is_not_a_list_is_one_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    datalist = write_decathlon(tmp_path / "toy", cases=3)
    with pytest.raises(ValueError, match=r'val_folds must be .* got 0; on the command line: --val_folds "\[0\]"'):
        partition(str(datalist), "train", 0)
    monkeypatch.setattr("scse_monai.bundle_support.under_bundle_cli", lambda: True)
    with pytest.raises(SystemExit, match="^error: val_folds must be a list"):
        class_voxel_counts(str(datalist), val_folds=0)


def test_synthetic_data_is_not_written_beside_a_hidden_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "hiddenonly"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"hiddenonly is not empty \(\.DS_Store\) and has no datalist.json"):
        resolve_datalist(str(folder), synthetic_if_missing=True)
    monkeypatch.setattr("scse_monai.bundle_support.under_bundle_cli", lambda: True)
    with pytest.raises(SystemExit, match="^error: dataset_dir .*hiddenonly is not empty"):
        resolve_datalist(str(folder), synthetic_if_missing=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hiddenonly"]  # no .hiddenonly.lock left beside it
    assert [p.name for p in folder.iterdir()] == [".DS_Store"]


@pytest.mark.parametrize("recipe", ["paper", "report"])
def test_recipe_loss_weights_leave_out_the_validation_folds(tmp_path: Path, recipe: str) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    training = []
    for i in range(4):
        label = np.full((8, 8, 2), 4 if i == 0 else 0, np.uint8)  # the held-out case is all "spleen"
        label[:2, :2, :] = (1, 2)
        label[2:3, :3, 0] = 3
        nib.save(nib.Nifti1Image(label.astype(np.float32), np.eye(4)), tmp_path / f"imagesTr/c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / f"labelsTr/c{i}.nii.gz")
        training.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz", "fold": min(i, 1)})
    labels = {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels, "training": training}))
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "recipes" / f"{recipe}.json")])
    parser["dataset_dir"] = str(tmp_path)
    loss = parser.get_parsed_content("loss")
    power = parser["loss#weight_power"]
    datalist = str(tmp_path / "dataset.json")
    assert len(partition(datalist, "val", [0])) == 1
    want = [w**power for w in weights_from_datalist(training_datalist(datalist, [0]))]
    assert want[4] == 0 and want != [w**power for w in weights_from_datalist(datalist)]
    assert loss.class_weights == pytest.approx(want)
