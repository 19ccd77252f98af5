"""Experiments: cross-validation and SE comparison through the bundle on tiny synthetic data, statistics, resume."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from scse_monai.experiments import bootstrap_ci, compare, crossval, make_folds, paired_difference, wilcoxon_paired
from scse_monai.experiments.__main__ import main
from scse_monai.experiments.compare import _common_patients, _seed_rows
from scse_monai.experiments.heldout import score_case
from scse_monai.experiments.setup import ExperimentError, bundle_settings, default_bundle_root, open_experiment

TINY_SET = {"features": 4, "roi_size": [64, 64], "pixdim": [-1.0, -1.0, -1.0], "val_interval": 2}
ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    from scse_monai.data import ensure_synthetic_dataset

    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "chaos_mr", layout="chaos-mr", cases=4, seed=3)


@pytest.fixture(scope="module")
def cv(tmp_path_factory, datalist: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cv") / "out"
    return out, crossval(datalist, out, folds=2, epochs=1, bundle_overrides=TINY_SET, progress=False)


@pytest.fixture(scope="module")
def cmp(tmp_path_factory, datalist: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cmp") / "out"
    return out, compare(
        datalist, out, se=["none", "scse"], folds=2, epochs=1, bundle_overrides=TINY_SET, progress=False
    )


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(v: str) -> float:
    return float(v) if v != "" else math.nan


def _folds(out: Path) -> dict[str, int]:
    items = json.loads((out / "datalist.json").read_text())["training"]
    return {Path(i["image"]).name.split(".nii")[0]: i["fold"] for i in items}


@pytest.mark.slow
def test_crossval_scores_every_patient_once_with_the_fold_that_held_it_out(cv) -> None:
    out, result = cv
    assert result["trained"] == 2 and result["skipped"] == 0 and result["n_patients"] == 4
    for name in ["crossval.md", "crossval_per_patient.csv", "crossval_summary.csv", "crossval_dice_boxplot.png"]:
        assert (out / name).stat().st_size > 100, name
    rows = _rows(out / "crossval_per_patient.csv")
    folds = _folds(out)
    assert sorted(r["case"] for r in rows) == sorted(folds)
    for r in rows:
        assert int(r["fold"]) == folds[r["case"]]
        run = out / "runs" / "unet_scse" / "seed0" / f"fold{r['fold']}"
        args = json.loads((run / "train_args.json").read_text())
        assert args["val_folds"] == [int(r["fold"])]  # the model that scored it never trained on it
        assert sorted(p.name for p in (run / "models").glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
        for o in ORGANS:
            assert 0.0 <= _f(r[f"dice_{o}"]) <= 1.0 and _f(r[f"volume_ratio_{o}"]) >= 0.0
        # the CSV's numbers are the saved prediction scored against the original label
        import nibabel as nib

        item = next(i for i in json.loads((out / "datalist.json").read_text())["training"] if r["case"] in i["image"])
        pred = nib.load(run / "eval" / "pred" / f"{r['case']}.nii.gz")
        label = nib.load(out / item["label"])
        assert pred.shape == label.shape
        again = score_case(
            torch.as_tensor(np.asarray(pred.dataobj))[None],
            torch.as_tensor(np.asarray(label.dataobj))[None],
            label.header.get_zooms()[:3],
            ORGANS,
        )
        for o in ORGANS:
            np.testing.assert_allclose(_f(r[f"dice_{o}"]), again[f"dice_{o}"], atol=1e-4, equal_nan=True)
    worst = sorted(out.glob("worst_*.png"))
    assert len(worst) == 3
    summary = {r["organ"]: r for r in _rows(out / "crossval_summary.csv")}
    liver = np.array([_f(r["dice_liver"]) for r in rows])
    np.testing.assert_allclose(_f(summary["liver"]["dice_mean"]), liver.mean(), atol=1e-4)
    md = (out / "crossval.md").read_text()
    assert "HD95" in md and "| **mean** |" in md and all(r["case"] in md for r in rows)


@pytest.mark.slow
def test_crossval_resumes_without_retraining(cv, datalist: Path) -> None:
    out, _ = cv
    ckpts = sorted(out.glob("runs/*/seed0/fold*/models/checkpoint_epoch=1.pt"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    again = crossval(datalist, out, folds=2, epochs=1, bundle_overrides=TINY_SET, progress=False)
    assert again["trained"] == 0 and again["skipped"] == 2
    # killed after training, before scoring: scored again, not trained again
    victim = out / "runs" / "unet_scse" / "seed0" / "fold1"
    log_size = (victim / "run.log").stat().st_size
    (victim / "eval" / "heldout.csv").unlink()
    third = crossval(datalist, out, folds=2, epochs=1, bundle_overrides=TINY_SET, progress=False)
    assert third["trained"] == 1 and (victim / "eval" / "heldout.csv").is_file()
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before and (victim / "run.log").stat().st_size == log_size
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        crossval(datalist, out, folds=2, epochs=2, bundle_overrides=TINY_SET, progress=False)


@pytest.mark.slow
def test_compare_pairs_variants_by_patient(cmp, datalist: Path) -> None:
    out, result = cmp
    assert result["trained"] == 4
    for name in ["results.csv", "results.md", "per_case.csv", "seeds.csv", "dice_boxplot_unet.png"]:
        assert (out / name).is_file(), name
    assert len(list(out.glob("overlay_unet_*.png"))) == 2
    cases = _rows(out / "per_case.csv")
    assert len(cases) == 2 * 4
    table = {v: {r["case"]: r for r in cases if r["variant"] == v} for v in ("none", "scse")}
    names = sorted(table["none"])
    by = {(r["variant"], r["organ"]): r for r in _rows(out / "results.csv")}
    for organ in ["liver", "mean"]:

        def col(v, organ=organ):
            if organ == "mean":
                return np.array([np.nanmean([_f(table[v][c][f"dice_{o}"]) for o in ORGANS]) for c in names])
            return np.array([_f(table[v][c][f"dice_{organ}"]) for c in names])

        a, b = col("scse"), col("none")
        r = by[("scse", organ)]
        np.testing.assert_allclose(_f(r["mean"]), np.nanmean(a), atol=1e-4)  # the CSV keeps 4 decimals
        np.testing.assert_allclose(_f(r["mean_difference_vs_none"]), np.nanmean(a - b), atol=1e-4)
        assert int(r["n_improved_vs_none"]) == int(((a - b) > 0).sum())
        assert _f(r["ci_low_vs_none"]) - 1e-4 <= _f(r["mean_difference_vs_none"]) <= _f(r["ci_high_vs_none"]) + 1e-4
    from scse_monai.networks import SEUNet

    train_json = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json"
    context = json.loads(train_json.read_text())["context_slices"]
    n0, n1 = (
        sum(p.numel() for p in SEUNet(2, 2 * context + 1, 5, features=4, kernel_size=3, se=s).parameters())
        for s in (None, "scse")
    )
    assert int(by[("none", "mean")]["parameters"]) == n0 and int(by[("scse", "mean")]["parameters"]) == n1
    md = (out / "results.md").read_text()
    assert "| unet |" in md and "95 % CI" in md and "0.763 / 0.857" in md


def test_compare_trains_a_non_default_aggregation_as_its_own_variant(cmp, datalist: Path) -> None:
    out, _ = cmp  # the same folder: its max-out "scse" runs must not be taken for add, and are reused for max
    result = compare(
        datalist, out, se=["scse"], aggregation=["max", "add"], folds=2, epochs=1, bundle_overrides=TINY_SET,
        progress=False,
    )  # fmt: skip
    assert result["trained"] == 2 and result["skipped"] == 2
    for k in range(2):
        args = json.loads((out / "runs" / "unet_scse_add" / "seed0" / f"fold{k}" / "train_args.json").read_text())
        assert args["se"] == "scse" and args["aggregation"] == "add"
    assert {r["variant"] for r in _rows(out / "results.csv")} == {"scse", "scse_add"}


def test_compare_ensemble_reports_each_variant_as_the_mean_softmax_of_its_seeds(cmp, datalist: Path, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(cmp[0], out)  # seed 0 is trained there; a second seed is added, then the ensembles are scored
    with pytest.raises(ExperimentError, match="two or more --seeds"):
        compare(datalist, out, folds=2, epochs=1, bundle_overrides=TINY_SET, progress=False, ensemble=True)
    result = compare(
        datalist, out, seeds=[0, 1], folds=2, epochs=1, bundle_overrides=TINY_SET, progress=False, ensemble=True
    )
    assert result["trained"] == 4 and result["skipped"] == 4
    ens = out / "ensemble"
    assert result["ensemble"]["results_md"] == str(ens / "results.md") and (ens / "dice_boxplot_unet.png").is_file()
    rows = _rows(ens / "per_case.csv")
    assert sorted((r["variant"], r["case"]) for r in rows) == sorted(
        (v, c) for v in ("none", "scse") for c in _folds(out)
    )
    for variant in ("none", "scse"):
        for k in range(2):
            held = _rows(ens / "runs" / "seeds0-1" / f"unet_{variant}" / "seed0" / f"fold{k}" / "eval" / "heldout.csv")
            assert {r["case"] for r in held} == {c for c, f in _folds(out).items() if f == k}
    assert {r["variant"] for r in _rows(ens / "results.csv")} == {"none", "scse"}
    # one ensemble per variant has no seed-to-seed spread to show; the runs' page, with two seeds, has
    assert (
        "## Seeds" not in (ens / "results.md").read_text()
        and "mean-softmax ensembles scored" in (ens / "results.md").read_text()
    )
    assert "## Seeds" in (out / "results.md").read_text()


def test_seed_rows_report_the_spread_between_seeds_and_the_se_effect_within_a_seed() -> None:
    def rows(shifts: dict[int, float]) -> list[dict]:
        return [
            {"case": f"c{c}", "seed": seed, **{f"dice_{o}": 0.5 + shift + 0.01 * c for o in ORGANS}}
            for seed, shift in shifts.items()
            for c in range(4)
        ]

    out = _seed_rows({("unet", "none"): rows({0: 0.0, 1: 0.1}), ("unet", "scse"): rows({0: 0.02, 1: 0.05})}, ORGANS)
    assert [(r["variant"], r["seed"]) for r in out] == [("none", 0), ("none", 1), ("scse", 0), ("scse", 1)]
    assert out[0]["difference_vs_first_seed"] == 0.0
    assert out[1]["difference_vs_first_seed"] == pytest.approx(0.1)
    assert out[1]["mean_dice"] == pytest.approx(0.615)
    assert out[3]["difference_vs_first_seed"] == pytest.approx(0.03)
    # scSE against none trained with the same seed: +0.02 with seed 0, -0.05 with seed 1
    assert out[2]["difference_vs_none_same_seed"] == pytest.approx(0.02)
    assert out[3]["difference_vs_none_same_seed"] == pytest.approx(-0.05)
    assert math.isnan(out[0]["difference_vs_none_same_seed"])


def test_tables_use_only_the_patients_every_variant_has() -> None:
    table = {
        ("unet", "none"): {"a": 1, "b": 2},
        ("unet", "scse"): {"a": 3, "b": 4, "c": 5},
        ("sdnet", "none"): {"c": 6},
    }
    assert _common_patients(table) == {
        ("unet", "none"): {"a": 1, "b": 2},
        ("unet", "scse"): {"a": 3, "b": 4},
        ("sdnet", "none"): {"c": 6},
    }


def test_paired_statistics_on_known_numbers() -> None:
    # all six differences positive and distinct: exact two-sided p = 2 / 2**6
    assert wilcoxon_paired([1.1, 2.2, 3.3, 4.4, 5.5, 6.6], [1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)
    a, b = [0.9, 0.8, 0.85, 0.7, 0.95, 0.6], [0.8, 0.82, 0.8, 0.6, 0.9, 0.6]
    assert wilcoxon_paired(a, b) == pytest.approx(sps.wilcoxon(a, b).pvalue)
    assert math.isnan(wilcoxon_paired([0.5, 0.6], [0.5, 0.6]))
    with pytest.raises(ValueError, match="length"):
        wilcoxon_paired([1, 2], [1])
    r = paired_difference(a + [math.nan], b + [0.5])
    assert r["n"] == 6 and r["n_improved"] == 4
    assert r["mean_difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert r["ci_low"] < r["mean_difference"] < r["ci_high"]
    # the bootstrap: reproducible, and its width shrinks like 1/sqrt(n)
    rng = np.random.default_rng(1)
    small, big = rng.normal(0.02, 0.05, 16), rng.normal(0.02, 0.05, 1600)
    assert bootstrap_ci(small) == bootstrap_ci(small)
    w_small, w_big = np.diff(bootstrap_ci(small))[0], np.diff(bootstrap_ci(big, 2000))[0]
    assert 5 < w_small / w_big < 20
    assert all(math.isnan(x) for x in bootstrap_ci([0.1]))


def test_score_case_dice_hd95_and_volume() -> None:
    label = torch.zeros(1, 20, 20, 10, dtype=torch.long)
    label[0, 5:15, 5:15, 2:8] = 1
    pred = torch.zeros_like(label)
    pred[0, 7:17, 5:15, 2:8] = 1  # shifted by 2 voxels along x (spacing 2 mm): every surface distance <= 4 mm
    s = score_case(pred, label, (2.0, 1.0, 1.0), ["liver", "spleen"])
    assert s["dice_liver"] == pytest.approx(2 * 8 * 10 * 6 / (2 * 600))
    assert s["hd95_liver"] == pytest.approx(4.0)
    assert s["volume_ratio_liver"] == pytest.approx(1.0)
    assert math.isnan(s["dice_spleen"]) and math.isnan(s["hd95_spleen"]) and math.isnan(s["volume_ratio_spleen"])
    pred[0, 0:4, 0:4, 0:2] = 2  # spleen predicted where there is none: Dice stays NaN (absent from the truth)
    assert math.isnan(score_case(pred, label, (1.0, 1.0, 1.0), ["liver", "spleen"])["dice_spleen"])
    with pytest.raises(ValueError, match="shape"):
        score_case(pred[..., :5], label, (1.0, 1.0, 1.0), ["liver", "spleen"])


def test_the_bundle_default_epochs_are_recorded_so_a_changed_default_cannot_resume(tmp_path: Path, datalist) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_root() / "configs", bundle / "configs")
    train = bundle / "configs" / "train.json"
    own = json.loads(train.read_text())["epochs"]
    settings, folded = bundle_settings(datalist, 2, None, None, None, None, bundle)
    assert settings.epochs == own and settings.record()["epochs"] == own
    out = tmp_path / "out"
    open_experiment(out, {"kind": "crossval", **settings.record()}, settings, folded)
    train.write_text(train.read_text().replace(f'"epochs": {own},', f'"epochs": {own + 7},'))
    settings, folded = bundle_settings(datalist, 2, None, None, None, None, bundle)
    assert settings.epochs == own + 7
    with pytest.raises(ExperimentError, match=f"epochs: {own} -> {own + 7}"):
        open_experiment(out, {"kind": "crossval", **settings.record()}, settings, folded)


def test_folds_stay_patient_level(tmp_path: Path, datalist: Path) -> None:
    meta = json.loads(datalist.read_text())
    extra = dict(meta["training"][0])  # a second volume of one patient must land in the same fold
    meta["training"].append(extra)
    p = tmp_path / "dl.json"
    p.write_text(json.dumps(meta))
    (tmp_path / "imagesTr").symlink_to(datalist.parent / "imagesTr")
    (tmp_path / "labelsTr").symlink_to(datalist.parent / "labelsTr")
    folded = make_folds(p, 3)
    by_patient: dict[str, set[int]] = {}
    for item in folded["training"]:
        by_patient.setdefault(item["patient"], set()).add(item["fold"])
        assert Path(item["image"]).is_absolute() and Path(item["image"]).exists()
    assert all(len(f) == 1 for f in by_patient.values())
    assert sorted({f for fs in by_patient.values() for f in fs}) == [0, 1, 2]


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("compare", ["--se", "none,bogus"], "--se"),
        ("compare", ["--networks", "vnet"], "--networks"),
        ("compare", ["--folds", "1"], "--folds"),
        ("crossval", ["--folds", "5"], "only 4 patients"),
        ("crossval", ["--epochs", "0"], "--epochs"),
        ("compare", ["--aggregation", "min"], "--aggregation"),
        ("compare", ["--recipe", "fast"], "fast"),
        ("compare", ["--seeds", "1,1"], "--seeds"),
        ("crossval", ["--dataset-config", "nope"], "nope"),
        ("crossval", ["--ensemble"], "two or more --seeds"),
        ("compare", ["--set", "featurs=16"], "--set featurs: no such id"),
        ("crossval", ["--set", "val_folds=[0]"], "--set val_folds: each run sets it"),  # would train on held-out
        ("compare", ["--set", 'se="none"'], "--set se: each run sets it"),
        ("crossval", ["--set", "network_def#features=4"], "--set network_def#features: each run sets it"),
    ],
)
def test_invalid_arguments_exit_2_without_output(tmp_path: Path, datalist: Path, capsys, command, args, message):
    out = tmp_path / "out"
    code = main([command, "--datalist", str(datalist), "--out", str(out), "--no-progress", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"training": 3}', "'training' must be a list of objects"), ('{"training": [{"image": 5, "label": "x"}]}',
     "a training item's 'image' is 5, not a file path")],
)  # fmt: skip
def test_malformed_datalist_is_one_line_naming_it(tmp_path: Path, capsys, content: str, message: str) -> None:
    bad = tmp_path / "datalist.json"
    bad.write_text(content)
    out = tmp_path / "out"
    assert main(["crossval", "--datalist", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"datalist {bad}: {message}" in err and "Traceback" not in err and not out.exists()


def test_out_with_a_garbage_settings_file_is_refused(tmp_path: Path, datalist: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_text("x")
    assert main(["crossval", "--datalist", str(datalist), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "settings.json is not a JSON object" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["settings.json"]


@pytest.mark.parametrize(
    ("command", "fixture", "unit", "runs", "files"),
    [
        ("crossval", "cv", "folds", 2, ["crossval_per_patient.csv", "crossval_summary.csv", "crossval.md"]),
        ("compare", "cmp", "runs", 4, ["results.csv", "results.md", "per_case.csv", "seeds.csv"]),
    ],
)
def test_cli_resumes_a_finished_experiment_and_lists_its_report(
    request, tmp_path: Path, datalist: Path, capsys, command, fixture, unit, runs, files
) -> None:
    out = tmp_path / "out"
    shutil.copytree(request.getfixturevalue(fixture)[0], out)
    tiny = [a for k, v in TINY_SET.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    args = ["--datalist", str(datalist), "--out", str(out), "--folds", "2", "--epochs", "1", "--no-progress", *tiny]
    assert main([command, *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"trained 0 {unit}, skipped {runs} finished {unit}" in lines
    (written,) = [line for line in lines if line.startswith("written: ")]
    assert sorted(written.removeprefix("written: ").split(", ")) == sorted(str(out / f) for f in files)
    figures = [line.removeprefix("figure: ") for line in lines if line.startswith("figure: ")]
    assert figures and all(Path(f).is_file() and Path(f).parent == out for f in figures)


def _edited_datalist(datalist: Path, tmp_path: Path, edit) -> Path:
    doc = json.loads(datalist.read_text())
    for item in doc["training"]:
        item.update({k: str(datalist.parent / item[k]) for k in ("image", "label")})
    edit(doc["training"])
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda items: items[1].update(image="gone.nii.gz"), "of the listed files do not exist, e.g. "),
        (lambda items: items[0].update(fold="x"), "folds must be integers, found 'x'"),
    ],
)
def test_a_bad_datalist_item_exits_2_before_any_output(tmp_path: Path, datalist: Path, capsys, edit, message) -> None:
    bad, out = _edited_datalist(datalist, tmp_path, edit), tmp_path / "out"
    assert main(["crossval", "--datalist", str(bad), "--out", str(out), "--folds", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(bad) in err
    assert not out.exists()


def test_a_failed_training_is_one_line_naming_its_log(tmp_path: Path, datalist: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--datalist", str(datalist), "--out", str(out), "--folds", "2", "--epochs", "1", "--no-progress"]
    assert main(["crossval", *args, "--set", "features=-4"]) == 1
    err = capsys.readouterr().err
    (log,) = out.glob("runs/*/seed0/fold0/run.log")
    assert err.count("\n") == 1 and "training failed" in err and str(log) in err and "Traceback" not in err
    assert "Traceback" in log.read_text()


def test_missing_datalist_and_foreign_out(tmp_path: Path, datalist: Path, capsys) -> None:
    assert main(["crossval", "--datalist", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.json" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    assert main(["crossval", "--datalist", str(datalist), "--out", str(foreign), "--folds", "2", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_bundle_override_parsing(tmp_path: Path, datalist: Path, capsys) -> None:
    from scse_monai.experiments.__main__ import _bundle_override

    assert _bundle_override("features=16") == ("features", 16)
    assert _bundle_override("pixdim=[2, 2, -1]") == ("pixdim", [2, 2, -1])
    assert _bundle_override("optimizer#_target_=torch.optim.AdamW") == ("optimizer#_target_", "torch.optim.AdamW")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["compare", "--datalist", str(datalist), "--out", str(out), "--set", "features"])
    assert e.value.code == 2 and "ID=VALUE" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_set_reaches_every_run_and_is_recorded(cv) -> None:
    out, _ = cv
    assert json.loads((out / "settings.json").read_text())["overrides"]["features"] == 4
    for fold in (0, 1):
        ckpt = out / "runs" / "unet_scse" / "seed0" / f"fold{fold}" / "models" / "checkpoint_epoch=1.pt"
        weights = torch.load(ckpt, weights_only=True)["model"]
        assert weights["encoder_se.0.cse.fc.0.weight"].shape == (2, 4)  # 4 features, the bundle's r = 2


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_overlays_show_the_patients_right_anterior_corner_top_left(tmp_path: Path, codes: str):
    """Radiological display, whatever the file's orientation: anterior up, the patient's right on the left."""
    import nibabel as nib

    from scse_monai.experiments.figures import _radiological, load_ras

    vol = np.zeros((6, 5, 3), dtype=np.uint8)
    # the voxel nearest the patient's right-anterior corner: index 0 of an L/P axis, the last index of an R/A axis
    vol[(0, 0, 1) if codes == "LPS" else (5, 4, 1)] = 1
    sign = -1.0 if codes == "LPS" else 1.0
    path = tmp_path / f"{codes}.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([sign, sign, 1.0, 1.0])), path)
    shown = _radiological(load_ras(path)[..., 1])
    assert shown.shape == (5, 6)
    assert shown[0, 0] == 1 and shown.sum() == 1


@pytest.mark.slow
def test_crossval_ensemble_scores_each_fold_with_the_mean_softmax_of_its_seeds(cv, datalist: Path, tmp_path) -> None:
    """Seed 1 is a copy of seed 0 whose classifier says "spleen" with certainty: the ensemble's mean probability of
    spleen is then >= 0.5 everywhere, so it labels every voxel spleen, which seed 0 alone does not."""
    out = tmp_path / "out"
    shutil.copytree(cv[0], out)
    seed0, seed1 = out / "runs" / "unet_scse" / "seed0", out / "runs" / "unet_scse" / "seed1"
    shutil.copytree(seed0, seed1)
    for ckpt in seed1.glob("fold*/models/checkpoint_epoch=1.pt"):
        state = torch.load(ckpt, weights_only=True)
        state["model"]["classifier.weight"].zero_()
        state["model"]["classifier.bias"].copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 50.0]))
        torch.save(state, ckpt)
    result = crossval(datalist, out, folds=2, seeds=(0, 1), epochs=1, bundle_overrides=TINY_SET, progress=False,
                      ensemble=True)  # fmt: skip
    assert result["trained"] == 0 and result["ensemble"]["n_patients"] == 4
    ens = out / "ensemble"
    for name in ["crossval.md", "crossval_per_patient.csv", "crossval_summary.csv", "crossval_dice_boxplot.png"]:
        assert (ens / name).stat().st_size > 100, name
    assert "ensemble of seeds [0, 1]" in (ens / "crossval.md").read_text()
    rows = _rows(ens / "crossval_per_patient.csv")
    assert sorted(r["case"] for r in rows) == sorted(_folds(out))
    import nibabel as nib

    for r in rows:
        assert all(_f(r[f"volume_ratio_{o}"]) == 0 for o in ORGANS[:-1]), r
        fold = ens / "runs" / "seeds0-1" / "unet_scse" / "seed0" / f"fold{r['fold']}"
        pred = np.asarray(nib.load(fold / "eval" / "pred" / f"{r['case']}.nii.gz").dataobj)
        alone = np.asarray(nib.load(seed0 / f"fold{r['fold']}" / "eval" / "pred" / f"{r['case']}.nii.gz").dataobj)
        assert (pred == 4).all() and not (alone == 4).all()
    scored = sorted(ens.glob("runs/seeds0-1/unet_scse/seed0/fold*/eval/heldout.csv"))
    before = [p.stat().st_mtime_ns for p in scored]
    again = crossval(datalist, out, folds=2, seeds=(0, 1), epochs=1, bundle_overrides=TINY_SET, progress=False,
                     ensemble=True)  # fmt: skip
    assert again["trained"] == 0 and [p.stat().st_mtime_ns for p in scored] == before  # scored folds are kept


def test_a_bad_volume_found_while_scoring_is_one_line(monkeypatch, tmp_path: Path, datalist: Path, capsys) -> None:
    """MONAI wraps the InputError of a NaN volume in a RuntimeError; the command line gives its message alone."""
    import scse_monai.experiments.__main__ as cli
    from scse_monai.errors import InputError

    def crossval(**_):
        try:
            raise InputError("case_03.nii.gz: the image has non-finite voxels")
        except InputError as e:
            raise RuntimeError("applying transform <CheckInputd>") from e

    monkeypatch.setattr(cli, "crossval", crossval)
    assert cli.main(["crossval", "--datalist", str(datalist), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: case_03.nii.gz: the image has non-finite voxels"

    def broken(**_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "crossval", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # any other error keeps its traceback
        cli.main(["crossval", "--datalist", str(datalist), "--out", str(tmp_path / "out"), "--no-progress"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_training_child_ends_when_the_experiment_process_is_killed(monkeypatch, tmp_path: Path) -> None:
    """kill -9 of the experiment process left its trainer running, writing checkpoints beside the next resume's."""
    import signal
    import subprocess as sp
    import time

    from scse_monai.experiments import runs

    seen = {}
    monkeypatch.setattr(runs.subprocess, "run", lambda cmd, **kw: seen.update(kw) or sp.CompletedProcess(cmd, 0))
    run = runs.Run("unet", "scse", None, fold=0, root=tmp_path / "runs")
    run.train(runs.BundleSettings(Path("bundle"), tmp_path / "datalist.json"), epochs=1)
    assert seen["preexec_fn"] is runs._end_with_parent

    # the mechanism: a parent that starts a child with it, then dies by SIGKILL
    parent = (
        "import subprocess, sys, time; from scse_monai.experiments.runs import _end_with_parent; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_end_with_parent); "
        "print(c.pid, flush=True); time.sleep(60)"
    )
    proc = sp.Popen([sys.executable, "-c", parent], stdout=sp.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")
