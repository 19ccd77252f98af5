"""The GPU script (``benchmarks/gpu_table1.py``) at tiny size on CPU: the code a GPU session will run once, with no
chance to debug it there (issue 13). No timing is asserted; every output the device run brings back is checked."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_table1

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("bf16_train_step", "metrics_vs_monai", "channels_last", "throughput", "multi_gpu_train")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("gpu_table1")
    out, work = root / "out", root / "work"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}  # the CPU path even where a GPU is
    cmd = [sys.executable, "-m", "benchmarks.gpu_table1", "--tiny", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    state = json.loads((out / "gpu_checks.json").read_text()) if (out / "gpu_checks.json").is_file() else {}
    return out, state, proc


@pytest.mark.slow
def test_tiny_run_succeeds_and_leaves_only_flat_files_for_the_device_tool(tiny) -> None:
    out, state, proc = tiny
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert state["ok"] is True
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files)  # the device tool brings back no folders beyond 2 levels
    assert len(files) <= 8
    assert set(files) == {
        "gpu_checks.json",
        "gpu_table1.log",
        "throughput.csv",
        "results.csv",
        "per_case.csv",
        "seeds.csv",
        "results.md",
        gpu_table1.TAR_NAME,
    }
    assert state["hardware"]["cuda_available"] is False
    assert state["config"]["tiny"] is True


@pytest.mark.slow
def test_tiny_checks_record_every_check_with_finite_numbers(tiny) -> None:
    _, state, _ = tiny
    checks = state["checks"]
    assert set(CHECKS) <= set(checks)
    for name in CHECKS:
        assert checks[name]["ok"] is True, (name, checks[name])
        assert checks[name]["error"] is None
        assert _finite(checks[name]["wall_s"])

    bf16 = checks["bf16_train_step"]["rows"]
    assert {r["network"] for r in bf16} == {"unet", "sdnet", "fcdensenet"}  # every registered network
    for r in bf16:
        assert _finite(r["loss"]) and _finite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["logits_dtype"] == "bfloat16" and r["grads_finite"] and r["params_changed"] > 0

    metrics = checks["metrics_vs_monai"]
    assert metrics["metric_classes"] and metrics["handlers"]  # found by what the modules export
    for r in metrics["metric_classes"] + [h for h in metrics["handlers"] if "skipped" not in h]:
        diffs = [v for k, v in r.items() if "abs_diff" in k]
        assert diffs and all(_finite(d) and d < 1e-6 for d in diffs), r

    cl = checks["channels_last"]["rows"]
    assert {r["mode"] for r in cl} == {"eval", "train"}
    assert all(_finite(r["max_abs_diff"]) for r in cl)

    thr = checks["throughput"]
    assert set(thr["scse_over_none_slices_per_s"]) == {"amp_bf16", "fp32"}  # CPU: bf16 autocast as the AMP mode
    assert all(_finite(v) and v > 0 for v in thr["scse_over_none_slices_per_s"].values())
    assert all(_finite(v) and v > 0 for v in thr["iteration_s_amp"].values())

    ddp = checks["multi_gpu_train"]
    assert ddp["returncode"] == 0 and ddp["backend"] == "gloo" and ddp["world_size"] == 1 and ddp["checkpoints"]


@pytest.mark.slow
def test_tiny_table1_reports_every_network_variant_and_fold(tiny) -> None:
    out, state, _ = tiny
    cfg = state["config"]
    table = state["table1"]
    assert table["complete"] is True and table["epochs"] == 1
    assert table["stopped_at_deadline"] == [] and table["failed"] == {}
    assert table["report"]["trained_by_report_call"] == 0  # the last compare call only wrote the report
    assert table["finished_folds"] == {f"{n}_{v}": cfg["folds"] for n in cfg["networks"] for v in cfg["variants"]}
    assert _finite(table["epochs_auto"]["gpu_s_per_epoch_of_all_runs"])

    results = _rows(out / "results.csv")
    pairs = {(r["network"], r["variant"]) for r in results}
    assert pairs == {(n, v) for n in cfg["networks"] for v in cfg["variants"]}
    means = [r for r in results if r["organ"] == "mean"]
    assert len(means) == len(pairs)
    assert all(math.isfinite(float(r["mean"])) and int(r["n_patients"]) == 4 for r in means)
    per_case = _rows(out / "per_case.csv")
    assert len(per_case) == len(pairs) * 4  # every synthetic patient held out once per (network, variant)
    assert {float(r["fold"]) for r in per_case} == {0.0, 1.0}
    assert all(math.isfinite(float(r["dice_liver"])) for r in per_case)
    assert len(_rows(out / "seeds.csv")) == len(pairs)

    thr = _rows(out / "throughput.csv")
    assert {(r["mode"], r["se"]) for r in thr} == {(m, s) for m in ("amp_bf16", "fp32") for s in ("none", "scse")}
    assert all(float(r["slices_per_s"]) > 0 for r in thr)

    with tarfile.open(out / gpu_table1.TAR_NAME) as tar:
        names = tar.getnames()
    assert "table1/results.md" in names and "table1/settings.json" in names
    assert any(n.endswith("heldout.csv") for n in names) and any(n.startswith("workers/") for n in names)
    assert not any("/models/" in n for n in names)  # no checkpoints come back


def test_report_selection_takes_the_largest_complete_product() -> None:
    cfg = gpu_table1.full_config(None, 480)
    done = {(n, v): 4 for n in cfg.networks for v in cfg.variants}
    assert gpu_table1._report_selection(done, cfg) == (list(cfg.networks), list(cfg.variants))
    done[("fcdensenet", "sse")] = 3
    done[("sdnet", "cse")] = 0
    nets, variants = gpu_table1._report_selection(done, cfg)
    assert variants[0] == "none" and len(nets) * len(variants) == 6  # e.g. {unet, fcdensenet} x {none, cse, scse}
    assert all(done[(n, v)] == 4 for n in nets for v in variants)
    done = {k: 0 for k in done}
    assert gpu_table1._report_selection(done, cfg)[0] == []


def test_auto_epochs_fit_the_window_and_stay_in_bounds() -> None:
    cfg = gpu_table1.full_config(None, 480)
    fast = gpu_table1._auto_epochs(cfg, {"unet": 0.02, "sdnet": 0.01, "fcdensenet": 0.04}, 360.0, 12)
    assert fast["iterations_per_epoch"] == 6 and 8 <= fast["epochs"] <= 80
    work = fast["fixed_s_per_worker"] + fast["epochs"] * fast["gpu_s_per_epoch_of_all_runs"]
    assert fast["epochs"] == 80 or work <= 360.0
    slow = gpu_table1._auto_epochs(cfg, {"unet": 1.0, "sdnet": 1.0, "fcdensenet": 1.0}, 360.0, 12)
    assert slow["epochs"] == 8


def test_arguments() -> None:
    with pytest.raises(SystemExit):
        gpu_table1._parse(["--tiny"])  # --out is required
    with pytest.raises(SystemExit):
        gpu_table1._parse(["--out", "x", "--epochs", "0"])
    assert gpu_table1._parse(["--out", "x", "--epochs", "auto"]).epochs == "auto"
