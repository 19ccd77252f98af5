"""Table 1 of Roy et al. and the GPU checks that have never run, in one command for one H200 (issue 13, GPU part).

``python -m benchmarks.gpu_table1 --out DIR [--tiny] [--datalist D | --chaos-root R] [--epochs N|auto]``

What it does, in this order (every step is timed; a failing check is recorded and the next one runs):

1. GPU checks, each a function, results in ``DIR/gpu_checks.json`` (rewritten after every step):

   - ``bf16_train_step``: one ``torch.autocast(bfloat16)`` training step of every registered network x SE variant
     at the paper's width (finite loss and gradients, bf16 logits, weights changed);
   - ``metrics_vs_monai``: the Dice metric class of ``scse_monai.metrics`` and the metric handlers of
     ``scse_monai.handlers`` (found by what the modules export when this runs) on device tensors, against MONAI's
     ``DiceMetric`` / ``compute_dice`` / ``MeanDice``;
   - ``channels_last``: ``channels_last`` forward of every network equals the contiguous one (fp32, TF32 off);
   - ``throughput``: training slices/s of the paper's U-Net (64 features, 5x5) with ``none`` vs ``scse``,
     interleaved repetitions, median, ratio (``DIR/throughput.csv``); the same timing of every network sizes
     ``--epochs auto``;
   - ``multi_gpu_train``: ``bundle/configs/multi_gpu_train.json`` under ``torchrun --nproc_per_node=1`` (nccl on a
     GPU, gloo on CPU), one epoch, run alongside the Table 1 trainings.

2. Table 1 through :func:`scse_monai.experiments.compare`: 3 networks x {none, cSE, sSE, scSE} x 4 patient-level
   folds, seed 0, 64 features, 5x5 kernels, the bundle's recipe (``train.json`` + ``datasets/chaos_mr_t2.json``).
   One ``compare`` call per (network, variant), all concurrently in separate processes over the same output
   folder, then one final ``compare`` over every finished (network, variant) that only writes the report.
   The held-out patients are scored on the bundle's ``device`` (the GPU).

3. Everything comes back in at most 8 flat files (what the device tool returns): ``gpu_checks.json``,
   ``throughput.csv``, ``results.csv``, ``per_case.csv``, ``seeds.csv``, ``results.md``, ``table1_extra.tar.gz``
   (figures, run logs, held-out CSVs, training curves, predictions; no checkpoints) and ``gpu_table1.log``.
   Work files (data, checkpoints) go to ``--work`` (default: a temporary folder).

``--tiny`` runs the same code on CPU at tiny size (2 networks x 2 variants x 2 folds, 4 features, 64x64, 1 epoch,
synthetic CHAOS-MR phantoms, gloo): ``tests/test_gpu_script.py``. How to run it on a GPU machine, and what to
copy there: ``docs/benchmarks.md``, section "Table 1 and the GPU checks on one H200".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
DEFAULT_DATALIST = REPO / "prepared" / "chaos_mr_t2" / "datalist.json"
DATASET_CONFIG = "chaos_mr_t2"
NUM_CLASSES = 5  # CHAOS MR: background, liver, right kidney, left kidney, spleen
#: the files that come back from the device machine (at most 8, flat)
RESULT_FILES = ("results.csv", "per_case.csv", "seeds.csv", "results.md")
TAR_NAME = "table1_extra.tar.gz"
TAR_LIMIT = 15 * 2**20  # keeps the tar small enough for job runners that cap returned files (16 MiB)

# ---------------------------------------------------------------------------------------------- budget
# One H200, 16 CPU cores, 600 s per device command. The script stops itself at --budget-s (default 480 s) so the
# device command (timeout_s 570) ends with its files written, and a 15-minute device lease (start ~1-2 min,
# transfers) still holds it.
#   checks before Table 1: imports + CUDA start ~15 s, bf16 step of 12 networks ~10 s, metrics ~5 s,
#     channels_last ~5 s, throughput (AMP: 2 variants x 9 x 20 steps x ~25 ms ~9 s; fp32 ~3x that ~25 s;
#     iteration time of the 3 networks ~6 s) ~40 s  -> ~75 s
#   final report + tar: bootstrap (10,000 resamples) of 45 rows, 9 figures, ~30 s; reserve 60 s
#   Table 1 window: 480 - 75 - 60 = ~345 s, for 48 runs.
# Concurrency 12: one compare process per (network, variant), each training its 4 folds one after another, so
#   12 trainings share the GPU and the 16 cores (OMP_NUM_THREADS=1 each; the bundle's transforms run in the
#   training process, num_workers 0). Fewer processes would serialise the per-run fixed cost (below); more are not
#   possible without splitting folds, which compare does not do.
# Per run: fixed ~35 s (Python + MONAI import, CUDA context, caching 12 + 4 volumes, held-out scoring of 4
#   patients with HD95 on CPU) -> 4 x 35 = 140 s per worker, mostly CPU, overlapping other workers' GPU work.
# GPU work per epoch: 12 training patients / 2 volumes per batch = 6 iterations of 16 slices at 160x160; fwd+bwd
#   FLOPs per iteration (torch.utils.flop_counter): U-Net 1.42 T, SD-Net 0.76 T, FC-DenseNet 2.27 T. At an assumed
#   ~150 TFLOP/s (fp16 AMP, deterministic cuDNN as the bundle's set_determinism asks, BN/ReLU/SE memory-bound)
#   that is ~0.15 / 0.08 / 0.25 s per epoch and ~7.7 s per epoch of all 48 runs, ~10 s with time-slicing between
#   12 processes, plus validation every 10 epochs and held-out inference (~+20 %).
#   -> epochs = (345 - 140) / (10 x 1.2) ~ 17. The bundle's own recipe is 120 epochs; this fits ~1/7 of it.
# --epochs auto (the default at full size) does this arithmetic with the iteration times measured by the
# throughput check instead of the assumed 150 TFLOP/s (``_auto_epochs``), clamped to [8, 80]; without a
# measurement it uses FALLBACK_EPOCHS. If the trainings still run past the window, they are stopped and the report
# covers the (network, variant) pairs whose 4 folds finished; every finished run is in the tar.
FALLBACK_EPOCHS = 16
PER_RUN_FIXED_S = 35.0
TIMESLICE_FACTOR = 1.3
EVAL_OVERHEAD = 1.2
REPORT_RESERVE_S = 60.0


@dataclass
class Config:
    """Sizes of one invocation (full size on a GPU, or ``--tiny`` on CPU)."""

    tiny: bool
    networks: tuple[str, ...]  # Table 1 rows
    variants: tuple[str, ...]
    folds: int
    features: int
    kernel_size: int
    roi: int  # training slice size (the bundle's roi_size)
    epochs: int | None  # None: --epochs auto
    bundle_overrides: dict = field(default_factory=dict)
    check_batch: int = 8  # bf16 step, channels_last
    slices_per_iteration: int = 16  # the bundle's volumes_per_batch x slices_per_volume (throughput batch)
    steps: int = 20  # training steps per timed repetition
    repeats: int = 7
    ddp_features: int = 32
    metric_shape: tuple[int, ...] = (96, 96, 24)
    budget_s: float = 480.0


def full_config(epochs: int | None, budget_s: float) -> Config:
    return Config(
        tiny=False,
        networks=tuple(_all_networks()),
        variants=_all_variants(),
        folds=4,
        features=64,
        kernel_size=5,
        roi=160,
        epochs=epochs,
        bundle_overrides={},  # the bundle's recipe unchanged: only network, SE, width, kernel, epochs and fold vary
        budget_s=budget_s,
    )


def tiny_config(epochs: int | None, budget_s: float) -> Config:
    return Config(
        tiny=True,
        networks=("unet", "sdnet"),
        variants=("none", "scse"),
        folds=2,
        features=4,
        kernel_size=5,
        roi=64,
        epochs=epochs or 1,
        bundle_overrides={"roi_size": [64, 64], "volumes_per_batch": 1, "slices_per_volume": 2, "val_interval": 1},
        check_batch=2,
        slices_per_iteration=2,
        steps=1,  # one step per timed call and two interleaved repetitions: the code path, not a measurement
        repeats=2,
        ddp_features=4,
        metric_shape=(24, 24, 6),
        budget_s=budget_s,
    )


# ---------------------------------------------------------------------------------------------- bookkeeping
class Recorder:
    """``gpu_checks.json`` and ``gpu_table1.log`` in ``--out``, rewritten / appended after every step."""

    def __init__(self, out: Path, state: dict) -> None:
        self.out, self.state, self.t0 = out, state, time.perf_counter()
        self.log_path = out / "gpu_table1.log"
        self.lock = threading.RLock()  # the multi-GPU check records from a thread

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {msg}"
        with self.lock:
            print(line, flush=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def save(self) -> None:
        from scse_monai.atomic import write_text_atomic

        with self.lock:
            self.state["wall_s"] = round(self.elapsed(), 1)
            text = json.dumps(self.state, indent=1, default=str) + "\n"
            write_text_atomic(self.out / "gpu_checks.json", text)


def _run_check(rec: Recorder, name: str, fn: Callable[[], dict]) -> dict:
    """Runs one check; its dict (with ``ok``, ``wall_s`` and ``error``) goes to ``state["checks"][name]``."""
    rec.log(f"check {name} ...")
    t0 = time.perf_counter()
    try:
        result = fn()
        result.setdefault("error", None)
    except Exception as e:  # recorded, and the next check runs
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    with rec.lock:
        rec.state["checks"][name] = result
    rec.log(
        f"check {name}: {'ok' if result.get('ok') else 'FAILED ' + str(result.get('error'))} ({result['wall_s']} s)"
    )
    rec.save()
    return result


def _child_env(threads: int) -> dict:
    """Environment of every child process: the repository importable, ``threads`` intra-op threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def hardware() -> dict:
    """The machine the numbers were measured on (named in the committed results)."""
    import monai
    import numpy
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            {
                "gpu": p.name,
                "gpu_count": torch.cuda.device_count(),
                "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                "compute_capability": f"{p.major}.{p.minor}",
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
            }
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
    return info


def _device():
    import torch

    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _network(name: str, se: str, features: int, kernel_size: int):
    from scse_monai.networks import get_network

    return get_network(
        name, spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES, features=features, kernel_size=kernel_size, se=se
    )


def _all_networks() -> list[str]:
    """The names in the network registry (``scse_monai.networks.registry``)."""
    from scse_monai.networks.registry import NETWORKS

    return list(NETWORKS)


def _all_variants() -> tuple[str, ...]:
    """The SE variants: the names of the ``scse_monai.blocks.SE`` factory (``none`` first)."""
    from scse_monai.blocks import SE_LAYER_NAMES

    return SE_LAYER_NAMES


# ---------------------------------------------------------------------------------------------- checks
def check_bf16_train_step(cfg: Config) -> dict:
    """One bf16-autocast training step (DiceCE loss, AdamW) of every network x SE variant."""
    import torch
    from monai.losses import DiceCELoss

    device = _device()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    rows = []
    for net_name in _all_networks():
        for se in _all_variants() if not cfg.tiny else cfg.variants:
            torch.manual_seed(0)
            net = _network(net_name, se, cfg.features, cfg.kernel_size).to(device).train()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            x = torch.randn(cfg.check_batch, 1, cfg.roi, cfg.roi, device=device)
            y = torch.randint(0, NUM_CLASSES, (cfg.check_batch, 1, cfg.roi, cfg.roi), device=device)
            before = [p.detach().clone() for p in net.parameters()]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = net(x)
                loss = loss_fn(logits, y)
            loss.backward()
            grads = [p.grad for p in net.parameters()]
            present = [g for g in grads if g is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in present])))
            opt.step()
            _sync(device)
            changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, net.parameters(), strict=True))
            row = {
                "network": net_name,
                "se": se,
                "loss": float(loss),
                "loss_dtype": str(loss.dtype).removeprefix("torch."),
                "logits_dtype": str(logits.dtype).removeprefix("torch."),
                "grad_norm": grad_norm,
                "grads_finite": all(bool(torch.isfinite(g).all()) for g in present),
                "params": len(grads),
                "params_without_grad": len(grads) - len(present),
                "params_changed": changed,
            }
            row["ok"] = (
                math.isfinite(row["loss"])
                and row["grads_finite"]
                and math.isfinite(grad_norm)
                and grad_norm > 0
                and row["logits_dtype"] == "bfloat16"
                and changed > 0
            )
            rows.append(row)
            del net, opt, x, y, logits, loss, before, grads, present
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ok": all(r["ok"] for r in rows), "device": str(device), "features": cfg.features, "rows": rows}


def _metric_classes() -> tuple[list[tuple[str, type]], list[tuple[str, type]]]:
    """The metric classes ``scse_monai.metrics`` exports and the metric handlers ``scse_monai.handlers`` exports,
    as they are named when this runs (``[(name, class)]`` each)."""
    import inspect

    from monai.handlers import IgniteMetricHandler
    from monai.metrics import Cumulative

    from scse_monai import handlers, metrics

    metric_cls = [
        (n, c)
        for n in getattr(metrics, "__all__", dir(metrics))
        if inspect.isclass(c := getattr(metrics, n, None)) and issubclass(c, Cumulative)
    ]
    handler_cls = [
        (n, c)
        for n in getattr(handlers, "__all__", dir(handlers))
        if inspect.isclass(c := getattr(handlers, n, None)) and issubclass(c, IgniteMetricHandler)
    ]
    return metric_cls, handler_cls


def check_metrics_vs_monai(cfg: Config) -> dict:
    """scse_monai's metric and metric handlers on device label maps against MONAI's Dice (per case and pooled)."""
    import torch
    from ignite.engine import Engine
    from monai.handlers import MeanDice, from_engine
    from monai.metrics import DiceMetric, compute_dice
    from monai.networks.utils import one_hot

    device = _device()
    gen = torch.Generator(device="cpu").manual_seed(1)
    n_cases, shape = 4, cfg.metric_shape
    labels = torch.randint(0, NUM_CLASSES, (n_cases, 1, *shape), generator=gen)
    noise = torch.randint(0, NUM_CLASSES, (n_cases, 1, *shape), generator=gen)
    keep = torch.rand(n_cases, 1, *shape, generator=gen) < 0.7
    preds = torch.where(keep, labels, noise)
    labels, preds = labels.to(device), preds.to(device)
    p1, y1 = one_hot(preds, NUM_CLASSES), one_hot(labels, NUM_CLASSES)

    # references: MONAI's DiceMetric per case x class; pooled Dice = compute_dice over all cases laid side by side
    ref = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    ref(p1, y1)
    ref_case = ref.aggregate().double().cpu()
    pooled = (
        compute_dice(torch.cat(list(p1), dim=-1)[None], torch.cat(list(y1), dim=-1)[None], include_background=False)[0]
        .double()
        .cpu()
    )
    ref_jaccard = (pooled / (2 - pooled)).cpu()  # J = D / (2 - D), per class, pooled

    metric_cls, handler_cls = _metric_classes()
    results: dict = {"device": str(device), "metric_classes": [], "handlers": [], "case_shape": list(shape)}
    ok = bool(metric_cls) and bool(handler_cls)
    for name, cls in metric_cls:
        try:
            m = cls(num_classes=NUM_CLASSES)
        except TypeError:
            m = cls(NUM_CLASSES)
        m(preds, labels)
        buffers = m.get_buffer() if hasattr(m, "get_buffer") else None
        buffer_device = str(buffers.device) if isinstance(buffers, torch.Tensor) else None
        agg = float(m.aggregate())
        row = {"name": name, "aggregate": agg, "buffer_device": buffer_device}
        if hasattr(m, "results"):
            r = m.results()
            case = r.get("case_dice")
            dice = r.get("dice")
            if isinstance(case, torch.Tensor):
                row["max_abs_diff_case_dice_vs_DiceMetric"] = float((case.double().cpu() - ref_case).abs().max())
            if isinstance(dice, torch.Tensor):
                row["max_abs_diff_pooled_dice_vs_compute_dice"] = float((dice.double().cpu() - pooled).abs().max())
            if isinstance(r.get("jaccard"), torch.Tensor):
                row["max_abs_diff_pooled_jaccard"] = float((r["jaccard"].double() - ref_jaccard).abs().max())
        target = float(ref_jaccard.mean()) if getattr(m, "metric_name", "dice") == "jaccard" else float(pooled.mean())
        row["abs_diff_aggregate"] = abs(agg - target)
        diffs = [v for k, v in row.items() if k.startswith(("max_abs_diff", "abs_diff"))]
        row["ok"] = all(d < 1e-6 for d in diffs) and (device.type != "cuda" or buffer_device in (None, str(device)))
        ok &= row["ok"]
        results["metric_classes"].append(row)

    batches = [{"pred": preds[i : i + 2], "label": labels[i : i + 2]} for i in range(0, n_cases, 2)]
    for name, cls in handler_cls:
        engine = Engine(lambda engine, batch: batch)
        try:
            handler = cls(num_classes=NUM_CLASSES, output_transform=from_engine(["pred", "label"]))
        except TypeError as e:  # an abstract base or another signature: reported, not failed
            results["handlers"].append({"name": name, "skipped": f"{type(e).__name__}: {e}"})
            continue
        handler.attach(engine, "score")
        MeanDice(
            include_background=False,
            output_transform=lambda o: (one_hot(o["pred"], NUM_CLASSES), one_hot(o["label"], NUM_CLASSES)),
        ).attach(engine, "monai")
        state = engine.run(batches)
        kind = getattr(handler, "metric_name", "dice")
        target = float(ref_jaccard.mean()) if kind == "jaccard" else float(pooled.mean())
        row = {"name": name, "metric_name": kind, "value": state.metrics["score"], "reference": target}
        row["abs_diff"] = abs(row["value"] - target)
        details = getattr(state, "metric_details", {}).get("score")
        if kind == "dice" and isinstance(details, torch.Tensor):
            row["max_abs_diff_case_dice_vs_DiceMetric"] = float((details.double().cpu() - ref_case).abs().max())
            row["monai_MeanDice"] = state.metrics["monai"]
            row["abs_diff_case_mean_vs_MeanDice"] = abs(float(details.double().nanmean()) - state.metrics["monai"])
        diffs = [v for k, v in row.items() if "abs_diff" in k]
        row["ok"] = all(d < 1e-6 for d in diffs)
        ok &= row["ok"]
        results["handlers"].append(row)
    results["ok"] = ok
    return results


def check_channels_last(cfg: Config) -> dict:
    """``channels_last`` forward equals the contiguous forward (fp32, TF32 off), eval and train mode."""
    import torch

    device = _device()
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    try:
        for net_name in _all_networks():
            for se in ("none", "scse"):
                torch.manual_seed(0)
                net = _network(net_name, se, cfg.features, cfg.kernel_size).to(device)
                net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
                x = torch.randn(cfg.check_batch, 1, cfg.roi, cfg.roi, device=device)
                for mode in ("eval", "train"):
                    net.train(mode == "train")
                    net_cl.train(mode == "train")
                    with torch.no_grad():
                        ref = net(x)
                        out = net_cl(x.contiguous(memory_format=torch.channels_last))
                    scale = float(ref.abs().max())
                    diff = float((out.float() - ref.float()).abs().max())
                    rows.append(
                        {
                            "network": net_name,
                            "se": se,
                            "mode": mode,
                            "max_abs_diff": diff,
                            "max_abs_output": scale,
                            "output_channels_last": out.is_contiguous(memory_format=torch.channels_last),
                            "ok": bool(torch.isfinite(out).all()) and diff <= 1e-4 * max(1.0, scale),
                        }
                    )
                del net, net_cl, x
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"ok": all(r["ok"] for r in rows), "device": str(device), "tolerance": "1e-4 x max|output|", "rows": rows}


def _train_step_fn(net_name: str, se: str, cfg: Config, mode: str):
    """``steps()`` doing ``cfg.steps`` training steps as the bundle's trainer does them (AMP: fp16 autocast with a
    GradScaler on CUDA, bf16 autocast on CPU), synchronised; ``(steps, net)``."""
    import torch
    from monai.losses import DiceCELoss

    device = _device()
    torch.manual_seed(0)
    net = _network(net_name, se, cfg.features, cfg.kernel_size).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    b = cfg.slices_per_iteration
    x = torch.randn(b, 1, cfg.roi, cfg.roi, device=device)
    y = torch.randint(0, NUM_CLASSES, (b, 1, cfg.roi, cfg.roi), device=device)
    amp = mode == "amp"
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

    def steps() -> None:
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = loss_fn(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        _sync(device)

    return steps, net


def check_throughput(cfg: Config) -> dict:
    """Training slices/s of the paper's U-Net, ``none`` vs ``scse`` (interleaved repetitions, median), in the
    bundle's AMP mode and in fp32; and the AMP iteration time of every network for ``--epochs auto``."""
    import torch
    from monai.utils import set_determinism

    from benchmarks.timing import compare_times

    device = _device()
    set_determinism(seed=0)  # as the bundle's "initialize": deterministic cuDNN, no autotuning
    rows = []
    for mode in ("amp", "fp32"):
        fns = {se: _train_step_fn("unet", se, cfg, mode)[0] for se in ("none", "scse")}
        for fn in fns.values():  # cuDNN / allocator warm-up
            fn()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = compare_times(fns, repeats=cfg.repeats, warmup=1)
        base = timed["none"]["median_s"]
        for se, t in timed.items():
            rows.append(
                {
                    "network": "unet",
                    "se": se,
                    "mode": "amp_fp16" if mode == "amp" and device.type == "cuda" else mode.replace("amp", "amp_bf16"),
                    "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                    "features": cfg.features,
                    "kernel_size": cfg.kernel_size,
                    "batch_slices": cfg.slices_per_iteration,
                    "roi": cfg.roi,
                    "steps": cfg.steps,
                    "repeats": cfg.repeats,
                    "median_s": t["median_s"],
                    "min_s": t["min_s"],
                    "slices_per_s": cfg.steps * cfg.slices_per_iteration / t["median_s"],
                    "time_ratio_vs_none": t["median_s"] / base,
                    "times_s": t["times_s"],
                }
            )
        del fns
    # iteration time (bundle's AMP) of every network, scSE, for the epoch arithmetic of --epochs auto
    iteration_s = {}
    for net_name in cfg.networks:
        fn, _ = _train_step_fn(net_name, "scse", cfg, "amp")
        fn()
        t = compare_times({net_name: fn}, repeats=min(3, cfg.repeats), warmup=0)[net_name]["median_s"]
        iteration_s[net_name] = t / cfg.steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    by = {(r["mode"], r["se"]): r for r in rows}
    ratios = {m: by[(m, "scse")]["slices_per_s"] / by[(m, "none")]["slices_per_s"] for m, _ in by}
    ok = all(math.isfinite(r["slices_per_s"]) and r["slices_per_s"] > 0 for r in rows)
    return {
        "ok": ok,
        "device": str(device),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "scse_over_none_slices_per_s": ratios,
        "iteration_s_amp": iteration_s,
        "rows": rows,
    }


def write_throughput_csv(out: Path, result: dict) -> None:
    from scse_monai.atomic import write_text_atomic
    from scse_monai.experiments.crossval import csv_text

    rows = [{k: v for k, v in r.items() if k != "times_s"} for r in result.get("rows", [])]
    if rows:
        write_text_atomic(out / "throughput.csv", csv_text(list(rows[0]), rows))


def _auto_epochs(cfg: Config, iteration_s: dict[str, float], window_s: float, train_patients: int) -> dict:
    """Epochs that fit the Table 1 window, from measured iteration times (the arithmetic at the top of the file)."""
    volumes_per_batch = 2 if not cfg.tiny else cfg.bundle_overrides.get("volumes_per_batch", 2)
    iterations = math.ceil(train_patients / volumes_per_batch)
    runs_per_net = len(cfg.variants) * cfg.folds
    gpu_per_epoch = sum(iteration_s.get(n, 0.0) * iterations * runs_per_net for n in cfg.networks)
    gpu_per_epoch *= TIMESLICE_FACTOR * EVAL_OVERHEAD
    fixed = cfg.folds * PER_RUN_FIXED_S
    epochs = int((window_s - fixed) / gpu_per_epoch) if gpu_per_epoch > 0 else FALLBACK_EPOCHS
    return {
        "epochs": max(8, min(80, epochs)),
        "gpu_s_per_epoch_of_all_runs": gpu_per_epoch,
        "fixed_s_per_worker": fixed,
        "window_s": window_s,
        "iterations_per_epoch": iterations,
    }


def check_multi_gpu_train(cfg: Config, datalist: Path, work: Path, timeout_s: float) -> dict:
    """``train.json`` + ``multi_gpu_train.json`` under ``torchrun --nproc_per_node=1``: one epoch with validation;
    the process group's backend and world size are printed from inside the run."""
    import torch

    folder = work / "multi_gpu_train"
    folder.mkdir(parents=True, exist_ok=True)
    cfgs = BUNDLE / "configs"
    args = {
        "run_id": "run",
        "config_file": [
            str(cfgs / "train.json"),
            str(cfgs / "multi_gpu_train.json"),
            str(cfgs / "datasets" / f"{DATASET_CONFIG}.json"),
        ],
        "meta_file": str(cfgs / "metadata.json"),
        "bundle_root": str(BUNDLE),
        "datalist_file": str(datalist),
        "ckpt_dir": str(folder / "models"),
        "output_dir": str(folder / "eval"),
        "val_folds": [0],
        "epochs": 1,
        "val_interval": 1,
        "features": cfg.ddp_features,
        **cfg.bundle_overrides,
        "run": [
            "$@train#trainer.run()",
            "$print('DIST_CHECK', dist.get_backend(), dist.get_world_size(), str(@device), flush=True)",
        ],
    }
    (folder / "args.json").write_text(json.dumps(args, indent=1) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1"]
    cmd += ["-m", "monai.bundle", "run", "--args_file", str(folder / "args.json")]
    log = folder / "run.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = _start(cmd, f, 2)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    text = log.read_text(encoding="utf-8", errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("DIST_CHECK")), "")
    parts = line.split()
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    checkpoints = sorted(p.name for p in (folder / "models").glob("*")) if (folder / "models").is_dir() else []
    result = {
        "command": " ".join(cmd),
        "returncode": rc,
        "backend": parts[1] if len(parts) > 1 else None,
        "world_size": int(parts[2]) if len(parts) > 2 else None,
        "device": parts[3] if len(parts) > 3 else None,
        "expected_backend": expected,
        "checkpoints": checkpoints,
        "run_wall_s": round(time.perf_counter() - t0, 1),
    }
    result["ok"] = rc == 0 and result["backend"] == expected and result["world_size"] == 1 and bool(checkpoints)
    if not result["ok"]:
        result["log_tail"] = text[-4000:]
    return result


# ---------------------------------------------------------------------------------------------- Table 1
def _compare_kwargs(cfg: Config, epochs: int) -> dict:
    return {
        "folds": cfg.folds,
        "seeds": [0],
        "epochs": epochs,
        "features": cfg.features,
        "kernel_size": cfg.kernel_size,
        "dataset_config": DATASET_CONFIG,
        "bundle_overrides": dict(cfg.bundle_overrides),
        "progress": False,
    }


def worker(spec_file: Path) -> int:
    """One ``compare`` call (one network x one variant, every fold) in its own process."""
    from scse_monai.experiments import compare

    spec = json.loads(Path(spec_file).read_text())
    t0 = time.perf_counter()
    result = compare(spec["datalist"], spec["out"], networks=[spec["network"]], se=[spec["variant"]], **spec["kwargs"])
    print(
        f"WORKER_DONE {spec['network']} {spec['variant']} trained {result['trained']} skipped {result['skipped']} "
        f"in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return 0


_CHILDREN: list[subprocess.Popen] = []


def _start(cmd: list[str], log, threads: int) -> subprocess.Popen:
    """A child in its own session (so that it and everything it starts can be ended together), logging to ``log``."""
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=_child_env(threads),
        start_new_session=True,
    )  # fmt: skip
    _CHILDREN.append(proc)
    return proc


def _end_children(signum=None, frame=None) -> None:
    """Ends every child still running (on exit, or when this process is told to stop)."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            _kill_group(proc)
    if signum is not None:
        raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen) -> None:
    """Ends a child started with ``start_new_session`` and everything it started (its own process group only)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _finished_runs(table: Path, cfg: Config) -> dict[tuple[str, str], int]:
    """Finished folds per (network, variant), read from the runs' folders."""
    from scse_monai.experiments.runs import Run

    return {
        (n, v): sum(Run(n, v, None, k, table / "runs", seed=0).finished for k in range(cfg.folds))
        for n in cfg.networks
        for v in cfg.variants
    }


def _report_selection(done: dict[tuple[str, str], int], cfg: Config) -> tuple[list[str], list[str]]:
    """The largest networks x variants product (``none`` included) whose runs all finished."""
    best: tuple[list[str], list[str]] = ([], [])
    others = [v for v in cfg.variants if v != "none"]
    for mask in range(2 ** len(others)):
        variants = ["none"] + [v for i, v in enumerate(others) if mask >> i & 1]
        nets = [n for n in cfg.networks if all(done[(n, v)] == cfg.folds for v in variants)]
        if len(nets) * len(variants) > len(best[0]) * len(best[1]):
            best = (nets, variants)
    return best


def run_table1(
    cfg: Config, datalist: Path, table: Path, epochs: int, rec: Recorder, deadline: float, on_started: Callable
) -> dict:
    """Trains the (network, variant) pairs concurrently, one ``compare`` process each, until done or ``deadline``
    (``time.perf_counter()``); calls ``on_started()`` once the experiment folder exists (the multi-GPU check)."""
    pairs = [(n, v) for n in cfg.networks for v in cfg.variants]
    threads = max(1, (os.cpu_count() or 1) // len(pairs))
    kwargs = _compare_kwargs(cfg, epochs)
    work_dir = table.parent / "workers"
    work_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[tuple[str, str], subprocess.Popen] = {}
    t0 = time.perf_counter()

    def start(pair):
        name = f"{pair[0]}_{pair[1]}"
        spec = {"datalist": str(datalist), "out": str(table), "network": pair[0], "variant": pair[1], "kwargs": kwargs}
        (work_dir / f"{name}.json").write_text(json.dumps(spec, indent=1) + "\n")
        with open(work_dir / f"{name}.log", "w", encoding="utf-8") as log:
            procs[pair] = _start(
                [sys.executable, "-m", "benchmarks.gpu_table1", "--worker", str(work_dir / f"{name}.json")],
                log,
                threads,
            )

    # the first call creates the experiment folder (settings.json, datalist.json); the others then resume into it
    # (compare refuses a non-empty folder without settings.json, which a concurrent first write could show them)
    start(pairs[0])
    while not ((table / "settings.json").is_file() and (table / "datalist.json").is_file()):
        if procs[pairs[0]].poll() is not None or time.perf_counter() > deadline:
            break
        time.sleep(0.5)
    for pair in pairs[1:]:
        start(pair)
    rec.log(f"table 1: {len(pairs)} compare processes ({threads} threads each), {epochs} epochs")
    if (table / "datalist.json").is_file():
        on_started()
    stopped = []
    while any(p.poll() is None for p in procs.values()):
        if time.perf_counter() > deadline:
            for pair, p in procs.items():
                if p.poll() is None:
                    _kill_group(p)
                    stopped.append(f"{pair[0]}_{pair[1]}")
            rec.log(f"table 1: deadline reached, stopped {stopped}")
            break
        time.sleep(1.0)
    failed = {
        f"{n}_{v}": (work_dir / f"{n}_{v}.log").read_text(errors="replace")[-3000:]
        for (n, v), p in procs.items()
        if p.returncode not in (0, None) and f"{n}_{v}" not in stopped
    }
    return {
        "pairs": len(pairs),
        "threads_per_process": threads,
        "train_wall_s": round(time.perf_counter() - t0, 1),
        "stopped_at_deadline": stopped,
        "failed": failed,
    }


def _tar_extras(table: Path, work: Path, out: Path) -> dict:
    """Figures, logs, held-out CSVs, curves and predictions of every run (no checkpoints) in one tar.gz."""
    skip_dirs = {"models"}

    def build(with_predictions: bool) -> Path:
        path = out / TAR_NAME
        with tarfile.open(path, "w:gz") as tar:
            for base, arc in (
                (table, "table1"),
                (work / "workers", "workers"),
                (work / "multi_gpu_train", "multi_gpu_train"),
            ):
                if not base.is_dir():
                    continue
                for p in sorted(base.rglob("*")):
                    rel = p.relative_to(base)
                    if not p.is_file() or skip_dirs & set(rel.parts) or p.suffix in (".pt", ".ts"):
                        continue
                    if not with_predictions and "pred" in rel.parts:
                        continue
                    tar.add(p, arcname=str(Path(arc) / rel))
        return path

    path = build(True)
    with_pred = path.stat().st_size <= TAR_LIMIT
    if not with_pred:
        path = build(False)
    return {"file": path.name, "bytes": path.stat().st_size, "predictions_included": with_pred}


# ---------------------------------------------------------------------------------------------- data
def prepare_data(args, cfg: Config, work: Path, rec: Recorder) -> Path:
    """The prepared datalist: synthetic (``--tiny``), prepared from ``--chaos-root``, or ``--datalist``."""
    if cfg.tiny:
        from scse_monai.data import ensure_synthetic_dataset

        return ensure_synthetic_dataset(work / "synthetic_chaos_mr", layout="chaos-mr", cases=4, seed=3)
    if args.chaos_root:
        dest = work / "prepared_chaos_mr_t2"
        if not (dest / "datalist.json").is_file():
            cmd = [sys.executable, "-m", "scse_monai.data", "prepare", "chaos", "--root", str(args.chaos_root)]
            cmd += ["--task", "mr-t2spir", "--out", str(dest), "--folds", str(cfg.folds), "--workers", "8"]
            rec.log("preparing CHAOS: " + " ".join(cmd))
            subprocess.run(cmd, check=True, cwd=REPO, env=_child_env(1))
        return dest / "datalist.json"
    datalist = Path(args.datalist or DEFAULT_DATALIST)
    if not datalist.is_file():
        raise SystemExit(
            f"no prepared CHAOS datalist at {datalist}: copy prepared/chaos_mr_t2 there (see docs/benchmarks.md), "
            "pass --datalist, or --chaos-root with the raw CHAOS Train_Sets"
        )
    return datalist


# ---------------------------------------------------------------------------------------------- main
def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_table1", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="results folder (the device tool's $OUT): at most 8 flat files")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at tiny size on synthetic data")
    ap.add_argument("--datalist", type=Path, help=f"prepared CHAOS MR T2 datalist (default {DEFAULT_DATALIST})")
    ap.add_argument("--chaos-root", type=Path, help="raw CHAOS Train_Sets to prepare first (needs pydicom)")
    ap.add_argument("--work", type=Path, help="work folder: data, runs, checkpoints (default: a temporary folder)")
    ap.add_argument("--epochs", default=None, help="training epochs per run, or 'auto' (default: auto; tiny: 1)")
    ap.add_argument(
        "--budget-s", type=float, help="stop the trainings so that everything ends by then (default 480; tiny 3000)"
    )
    ap.add_argument("--skip-table", action="store_true", help="only the checks")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is None and args.out is None:
        ap.error("--out is required")
    if args.epochs not in (None, "auto") and not (str(args.epochs).isdigit() and int(args.epochs) > 0):
        ap.error(f"--epochs must be a positive integer or 'auto', got {args.epochs!r}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker is not None:
        return worker(args.worker)
    signal.signal(signal.SIGTERM, _end_children)
    try:
        return _main(args)
    finally:
        _end_children()


def _main(args) -> int:
    epochs = None if args.epochs in (None, "auto") else int(args.epochs)
    if args.tiny:
        cfg = tiny_config(epochs, args.budget_s or 3000.0)  # a safety net only: a loaded CPU is slow
    else:
        cfg = full_config(epochs, args.budget_s or 480.0)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_table1_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state: dict = {"config": asdict(cfg), "work": str(work), "checks": {}, "table1": {}}
    rec = Recorder(out, state)
    deadline = time.perf_counter() + cfg.budget_s
    rec.log(f"gpu_table1 {'tiny (CPU dry run)' if cfg.tiny else 'full'}; out {out}; work {work}")
    import torch

    if cfg.tiny:  # CPU dry run: one thread (several spin-wait against each other on a loaded machine)
        torch.set_num_threads(1)
    if not cfg.tiny and not torch.cuda.is_available():
        rec.log("no CUDA device: the full size is meant for a GPU (use --tiny on CPU); continuing on CPU")
    state["hardware"] = hardware()
    rec.save()
    datalist = prepare_data(args, cfg, work, rec)
    state["datalist"] = str(datalist)
    rec.log(f"data: {datalist}")

    _run_check(rec, "bf16_train_step", lambda: check_bf16_train_step(cfg))
    _run_check(rec, "metrics_vs_monai", lambda: check_metrics_vs_monai(cfg))
    _run_check(rec, "channels_last", lambda: check_channels_last(cfg))
    thr = _run_check(rec, "throughput", lambda: check_throughput(cfg))
    write_throughput_csv(out, thr)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    table = work / "table1"
    table_deadline = deadline - REPORT_RESERVE_S
    train_patients = _train_patients(datalist, cfg.folds)
    auto = _auto_epochs(cfg, thr.get("iteration_s_amp", {}), table_deadline - time.perf_counter(), train_patients)
    state["table1"]["epochs_auto"] = auto
    run_epochs = cfg.epochs if cfg.epochs is not None else (auto["epochs"] if thr.get("ok") else FALLBACK_EPOCHS)
    state["table1"]["epochs"] = run_epochs

    def ddp(datalist_file: Path, timeout_s: float) -> dict:
        return _run_check(rec, "multi_gpu_train", lambda: check_multi_gpu_train(cfg, datalist_file, work, timeout_s))

    if args.skip_table:
        from scse_monai.experiments.setup import make_folds

        folded = work / "ddp_datalist.json"
        folded.write_text(json.dumps(make_folds(datalist, cfg.folds)))
        ddp(folded, deadline - time.perf_counter())
    else:
        # the multi-GPU check runs beside the trainings, from a thread (it is a child process itself), on the
        # experiment's folded datalist
        ddp_threads: list[threading.Thread] = []

        def ddp_async() -> None:
            t = threading.Thread(target=ddp, args=(table / "datalist.json", table_deadline - time.perf_counter()))
            t.start()
            ddp_threads.append(t)

        rec.log(f"table 1: epochs {run_epochs} (auto estimate {auto['epochs']}); window {auto['window_s']:.0f} s")
        state["table1"].update(run_table1(cfg, datalist, table, run_epochs, rec, table_deadline, ddp_async))
        rec.save()
        for t in ddp_threads:
            t.join()
        _final_report(cfg, datalist, table, run_epochs, rec, out)
        with contextlib.suppress(OSError):
            state["table1"]["extra"] = _tar_extras(table, work, out)
    if "multi_gpu_train" not in state["checks"]:
        state["checks"]["multi_gpu_train"] = {"ok": False, "error": "did not run (no experiment folder)"}
    state["ok"] = all(c.get("ok") for c in state["checks"].values()) and (
        args.skip_table or state["table1"].get("complete", False)
    )
    rec.log(f"done: {'all ok' if state['ok'] else 'NOT all ok'}; {len(list(out.iterdir()))} files in {out}")
    rec.save()
    if args.work is None and not cfg.tiny:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if state["ok"] else 1


def _train_patients(datalist: Path, folds: int) -> int:
    try:
        items = json.loads(Path(datalist).read_text())["training"]
        patients = {str(i.get("patient", i["image"])) for i in items}
        return len(patients) - math.ceil(len(patients) / folds)
    except (OSError, KeyError, ValueError):
        return 12


def _final_report(cfg: Config, datalist: Path, table: Path, epochs: int, rec: Recorder, out: Path) -> None:
    """One ``compare`` over every finished (network, variant): every run is done, so it only writes the report."""
    from scse_monai.experiments import compare

    if not (table / "settings.json").is_file():
        rec.state["table1"].update({"complete": False, "reported": None})
        return
    done = _finished_runs(table, cfg)
    rec.state["table1"]["finished_folds"] = {f"{n}_{v}": k for (n, v), k in done.items()}
    complete = all(k == cfg.folds for k in done.values())
    nets, variants = _report_selection(done, cfg)
    rec.state["table1"].update({"complete": complete, "reported": {"networks": nets, "variants": variants}})
    if not nets:
        rec.log("table 1: no network has every fold of 'none' finished; no report")
        rec.save()
        return
    t0 = time.perf_counter()
    result = compare(datalist, table, networks=nets, se=variants, **_compare_kwargs(cfg, epochs))
    rec.state["table1"]["report"] = {
        "trained_by_report_call": result["trained"],  # 0: the report call trained nothing
        "skipped": result["skipped"],
        "rows": len(result["rows"]),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for name in RESULT_FILES:
        if (table / name).is_file():
            shutil.copyfile(table / name, out / name)
    rec.state["table1"]["mean_dice"] = {
        f"{r['network']}_{r['variant']}": r["mean"] for r in result["rows"] if r["organ"] == "mean"
    }
    rec.log(f"table 1 report: {nets} x {variants} ({'complete' if complete else 'partial'})")
    rec.save()


if __name__ == "__main__":
    sys.exit(main())
