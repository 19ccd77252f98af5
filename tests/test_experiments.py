"""Experiment runner: a tiny 2-network x {none, scse} x 2-fold comparison through the bundle, statistics, resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from scse_monai.experiments import compare, make_folds, wilcoxon_paired
from scse_monai.experiments.__main__ import main

TINY = {
    "networks": ["unet", "sdnet"],
    "se": ["none", "scse"],
    "folds": 2,
    "epochs": 1,
    "val_interval": 2,  # no validation pass inside training: the held-out fold is evaluated once, afterwards
    "features": 4,
    "roi_size": [64, 64],
    "pixdim": [-1.0, -1.0, -1.0],
    "progress": False,
}
ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    from scse_monai.data import ensure_synthetic_dataset

    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "chaos_mr", layout="chaos-mr", cases=4, seed=3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, datalist: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cmp") / "out"
    return out, compare(datalist, out, **TINY)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(v: str) -> float:
    return float(v) if v != "" else math.nan


@pytest.mark.slow
def test_outputs_and_statistics(finished, datalist: Path) -> None:
    out, result = finished
    assert result["trained"] == 8 and result["skipped"] == 0
    for name in ["results.csv", "results.md", "per_case.csv", "overlay.png", "settings.json", "datalist.json"]:
        assert (out / name).is_file(), name
    for net in TINY["networks"]:
        assert (out / f"dice_boxplot_{net}.png").stat().st_size > 1000
        assert (out / f"training_curves_{net}.png").stat().st_size > 1000
        for se in ("none", "scse_max"):
            for fold in (0, 1):
                run = out / "runs" / f"{net}_{se}" / f"fold{fold}"
                assert (run / "models" / "checkpoint_epoch=1.pt").is_file()
                assert (run / "eval" / "metrics_per_case.csv").is_file()

    # every case is evaluated exactly once per (network, variant), by the run that held its fold out
    cases = _rows(out / "per_case.csv")
    assert len(cases) == 2 * 2 * 4
    folds = {
        Path(i["image"]).name.split(".nii")[0]: i["fold"]
        for i in json.loads((out / "datalist.json").read_text())["training"]
    }
    for net in TINY["networks"]:
        for variant in ("none", "scse"):
            sub = [r for r in cases if r["network"] == net and r["variant"] == variant]
            assert sorted(r["case"] for r in sub) == sorted(folds)
            assert all(int(r["fold"]) == folds[r["case"]] for r in sub)

    rows = _rows(out / "results.csv")
    assert len(rows) == 2 * 2 * (len(ORGANS) + 1)
    by = {(r["network"], r["variant"], r["organ"]): r for r in rows}
    for net in TINY["networks"]:
        table = {
            v: {r["case"]: r for r in cases if r["network"] == net and r["variant"] == v} for v in ("none", "scse")
        }
        names = sorted(table["none"])
        for organ in [*ORGANS, "mean"]:

            def col(v, organ=organ, table=table, names=names):
                if organ == "mean":
                    return np.array([np.nanmean([_f(table[v][c][f"dice_{o}"]) for o in ORGANS]) for c in names])
                return np.array([_f(table[v][c][f"dice_{organ}"]) for c in names])

            a, b = col("scse"), col("none")
            r = by[(net, "scse", organ)]
            np.testing.assert_allclose(_f(r["mean"]), np.nanmean(a), atol=1e-6)
            np.testing.assert_allclose(_f(r["std"]), np.nanstd(a, ddof=1), atol=1e-6)
            keep = ~(np.isnan(a) | np.isnan(b))
            if np.count_nonzero(a[keep] - b[keep]) == 0:
                assert math.isnan(_f(r["p_vs_none"])) and "zero" in r["note"]
            else:
                expected = sps.wilcoxon(a[keep], b[keep]).pvalue
                np.testing.assert_allclose(_f(r["p_vs_none"]), expected, rtol=1e-9)
            assert by[(net, "none", organ)]["note"] == "baseline"

    # parameter counts against the networks built directly
    from scse_monai.networks import SESDNet, SEUNet

    for net, cls, k in (("unet", SEUNet, 5), ("sdnet", SESDNet, 7)):
        n0, n1 = (
            sum(p.numel() for p in cls(2, 1, 5, features=4, kernel_size=k, se=s).parameters()) for s in (None, "scse")
        )
        assert int(by[(net, "none", "mean")]["parameters"]) == n0
        assert int(by[(net, "scse", "mean")]["parameters"]) == n1
        np.testing.assert_allclose(
            _f(by[(net, "scse", "mean")]["parameters_added_percent"]), 100 * (n1 - n0) / n0, atol=1e-3
        )

    md = (out / "results.md").read_text()
    assert "| none |" in md and "| scse |" in md and "unet" in md and "sdnet" in md and "overlay.png" in md


@pytest.mark.slow
def test_second_invocation_trains_nothing_and_resumes_a_half_finished_run(finished, datalist: Path) -> None:
    out, _ = finished
    ckpts = sorted(out.glob("runs/*/fold*/models/checkpoint_epoch=1.pt"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    again = compare(datalist, out, **TINY)
    assert again["trained"] == 0 and again["skipped"] == 8
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    assert "trained 0, skipped 8" in (out / "compare.log").read_text()

    # killed after training, before evaluation: the run is evaluated again, not trained again
    victim = out / "runs" / "unet_scse_max" / "fold1"
    (victim / "eval" / "metrics_per_case.csv").unlink()
    third = compare(datalist, out, **TINY)
    assert third["trained"] == 1 and third["skipped"] == 7
    assert (victim / "eval" / "metrics_per_case.csv").is_file()
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    assert "train unet_scse_max fold 1 at epoch 1/1" not in (out / "compare.log").read_text()
    assert "resume unet_scse_max fold 1 at epoch 1/1" in (out / "compare.log").read_text()


def test_wilcoxon_on_known_numbers() -> None:
    # all six differences positive and distinct: exact two-sided p = 2 / 2**6
    r = wilcoxon_paired([1.1, 2.2, 3.3, 4.4, 5.5, 6.6], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert r["p_value"] == pytest.approx(2 / 64) and r["n_pairs"] == 6 and r["note"] == ""
    # differences 1, -2, 3, 4, 5: W- = 2; subsets of ranks 1..5 with sum <= 2: {}, {1}, {2} -> p = 2 * 3 / 32
    r = wilcoxon_paired([1, -2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r["p_value"] == pytest.approx(6 / 32)
    assert "cannot go below" in r["note"]  # 5 pairs: min p = 1/16 > 0.05
    # NaN pairs dropped; too few pairs or all-zero differences: NaN p with a note
    r = wilcoxon_paired([0.5, math.nan, 0.7], [0.4, 0.3, math.nan])
    assert math.isnan(r["p_value"]) and r["n_pairs"] == 1 and "not tested" in r["note"]
    r = wilcoxon_paired([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert math.isnan(r["p_value"]) and "zero" in r["note"]
    with pytest.raises(ValueError, match="length"):
        wilcoxon_paired([1, 2], [1])


def test_folds_stay_patient_level(tmp_path: Path, datalist: Path) -> None:
    meta = json.loads(datalist.read_text())
    # two volumes of one patient must land in one fold
    extra = dict(meta["training"][0])
    extra["image"] = meta["training"][0]["image"]
    meta["training"].append(extra)
    src = datalist.parent / "datalist.json"
    p = tmp_path / "dl.json"
    p.write_text(json.dumps(meta))
    (tmp_path / "imagesTr").symlink_to(src.parent / "imagesTr")
    (tmp_path / "labelsTr").symlink_to(src.parent / "labelsTr")
    folded = make_folds(p, 3)
    by_patient: dict[str, set[int]] = {}
    for item in folded["training"]:
        by_patient.setdefault(item["patient"], set()).add(item["fold"])
        assert Path(item["image"]).is_absolute() and Path(item["image"]).exists()
    assert all(len(f) == 1 for f in by_patient.values())
    assert sorted({f for fs in by_patient.values() for f in fs}) == [0, 1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--se", "none,bogus"], "--se"),
        (["--networks", "vnet"], "--networks"),
        (["--folds", "1"], "--folds"),
        (["--folds", "5"], "only 4 patients"),
        (["--epochs", "0"], "--epochs"),
        (["--roi-size", "60", "60"], "--roi-size"),
        (["--aggregation", "min"], "--aggregation"),
        (["--recipe", "fast"], "fast"),
        (["--checkpoint", "best", "--val-interval", "3", "--epochs", "2"], "--checkpoint best"),
    ],
)
def test_invalid_arguments_exit_2_without_output(tmp_path: Path, datalist: Path, capsys, args, message) -> None:
    out = tmp_path / "out"
    code = main(["compare", "--datalist", str(datalist), "--out", str(out), "--no-progress", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_missing_datalist_and_foreign_or_mismatched_out(tmp_path: Path, datalist: Path, finished, capsys) -> None:
    assert main(["compare", "--datalist", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.json" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    assert main(["compare", "--datalist", str(datalist), "--out", str(foreign), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out, _ = finished
    args = ["--networks", "unet", "--se", "none,scse", "--features", "4", "--roi-size", "64", "64"]
    code = main(["compare", "--datalist", str(datalist), "--out", str(out), "--epochs", "2", "--no-progress", *args])
    assert code == 2
    assert "epochs" in capsys.readouterr().err


def test_bundle_override_parsing() -> None:
    from scse_monai.experiments.__main__ import _bundle_override

    assert _bundle_override("loss#weight_power=0.25") == ("loss#weight_power", 0.25)
    assert _bundle_override("pixdim=[2, 2, -1]") == ("pixdim", [2, 2, -1])
    assert _bundle_override("optimizer#_target_=torch.optim.AdamW") == ("optimizer#_target_", "torch.optim.AdamW")


def test_bad_set_exits_2(tmp_path: Path, datalist: Path, capsys) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["compare", "--datalist", str(datalist), "--out", str(out), "--set", "weight_power"])
    assert e.value.code == 2
    assert "ID=VALUE" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_set_reaches_every_run_and_is_recorded(tmp_path: Path, datalist: Path) -> None:
    out = tmp_path / "out"
    small = {**TINY, "networks": ["unet"], "se": ["scse"]}
    compare(datalist, out, bundle_overrides={"reduction_ratio": 4}, **small)
    assert json.loads((out / "settings.json").read_text())["overrides"]["reduction_ratio"] == 4
    for fold in (0, 1):
        ckpt = sorted((out / "runs" / "unet_scse_max" / f"fold{fold}" / "models").glob("checkpoint_epoch=*.pt"))[-1]
        weights = torch.load(ckpt, weights_only=True)["model"]
        assert weights["encoder_se.0.cse.fc.0.weight"].shape == (1, 4)  # 4 features / r 4 (the default r 2 gives 2)
