"""Benchmark: SE-UNet with and without SE blocks, at the paper's configuration.

SEUNet with ``features=64``, 5x5 kernels, 2D, a batch of 4 x 1 x 128 x 128: ``se=None`` against ``"cse"``,
``"sse"`` and ``"scse"`` (max aggregation, r=2), in inference (``torch.no_grad``, eval mode) and for one
training step (forward, cross-entropy loss, backward, SGD step). All variants share the weights of
the common layers; repetitions are interleaved and medians compared. Targets (issue 6): scSE-UNet / UNet
time <= 1.03 in inference and <= 1.04 in training.

A control candidate, ``none (copy)``, is a second plain U-Net with the same weights: its ratio to ``none`` would be
1.000 on a quiet machine, so how far it lands from 1 is this run's own resolution (rows and
``control_ratio_*``). A whole-network ratio closer to its target than that cannot be told apart from noise; the
``scse_blocks_alone`` row (the network's scSE blocks run alone) is the measurement of SE's own cost that noise
does not swamp.

On CPU with glibc's default malloc, much of a training step's time goes to paging in fresh memory: large
freed blocks are returned to the kernel and the next allocation of that size faults every page in again. How
much depends on the allocator's state, which changes from run to run, and SE blocks add two full-size tensors
per block (their output and their input's gradient). So the comparison is made twice: in this process
(default allocator), and in a child process with glibc settings that keep freed memory for reuse
(:data:`KEEP_MEMORY_ENV`; the effect PyTorch's CPU performance guide gets from jemalloc or tcmalloc). The
second isolates the SE blocks' own cost. Rows carry an ``allocator`` column.

Run: ``python -m benchmarks.run --only networks [--quick]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import compare_times
from scse_monai import cpu_kernels
from scse_monai.blocks import ChannelSpatialSELayer
from scse_monai.networks import SEUNet

TARGETS = {"inference": 1.03, "training": 1.04}
VARIANTS = (None, "cse", "sse", "scse")
#: the A/A control: a second plain network with the same weights, timed like the others
CONTROL = "none (copy)"
#: glibc malloc tunables: serve blocks up to 32 MiB from the heap (not fresh mmaps) and never trim the heap, so
#: freed memory is reused without page faults
KEEP_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
DEFAULT_ALLOCATOR = "default"
KEEP_MEMORY_ALLOCATOR = "glibc, freed memory kept"


def _net(se: str | None, features: int, base_state: dict | None) -> SEUNet:
    net = SEUNet(2, 1, 2, features=features, kernel_size=5, se=se)
    if base_state is not None:
        net.load_state_dict(base_state, strict=False)  # same weights in the layers all variants share
    return net


def run(quick: bool = False) -> dict:
    """Times SEUNet for every SE variant, with the default allocator and with freed memory kept.

    Args:
        quick: features 16 on 2 x 1 x 64 x 64 and fewer repetitions (a smoke run, not the paper's setting).

    Returns:
        ``measure()``'s result for the default allocator; the child process's rows are appended and its ratios
        added under keys ending in ``_kept_memory``. Where the child cannot run (not Linux/glibc), only the first.
    """
    result = measure(quick)
    if sys.platform.startswith("linux") and not all(os.environ.get(k) == v for k, v in KEEP_MEMORY_ENV.items()):
        code = (
            "import json, torch; from benchmarks.bench_networks import measure; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            f"print('RESULT ' + json.dumps(measure({quick!r}, allocator={KEEP_MEMORY_ALLOCATOR!r})))"
        )
        child = subprocess.run(
            [sys.executable, "-c", code],
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, **KEEP_MEMORY_ENV},
            capture_output=True,
            text=True,
        )
        if child.returncode != 0 or "RESULT " not in child.stdout:
            raise RuntimeError(f"the kept-memory measurement failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
        print(child.stdout.rsplit("RESULT ", 1)[0], end="")
        kept = json.loads(child.stdout.rsplit("RESULT ", 1)[1])
        result["rows"] += kept["rows"]
        for key, value in kept.items():
            if key.startswith(
                ("scse_ratio_", "scse_cpu_ratio_", "target_met_", "scse_blocks_share_", "control_ratio_")
            ):
                result[f"{key}_kept_memory"] = value
    return result


def _scse_blocks_alone(net: torch.nn.Module, x: torch.Tensor, training: bool):
    """Callables running every scSE block of ``net`` once, alone, on a random input of the shape it sees in ``net``.

    Forward only (no grad) for inference; forward and backward (input and weight gradients) for training. Its time
    over the plain network's is the SE blocks' own share of a step, free of the noise of timing two whole
    networks against each other (the allocator and cache effects that come and go between runs).

    Returns ``(run, restore)``. At inference the network's blocks write over their input (``inplace``, as in the
    network), which would shrink it by the gates at every call (to float32's denormal range, where arithmetic
    slows down, after about 150 calls); ``restore``, run untimed before each call, copies the original values back.
    """
    shapes: list[tuple[torch.nn.Module, torch.Size]] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: shapes.append((mod, args[0].shape)))
        for m in net.modules()
        if isinstance(m, ChannelSpatialSELayer)
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(1)
    work = [(m, torch.randn(s, generator=g).relu_(), torch.randn(s, generator=g)) for m, s in shapes]
    originals = [inp.clone() for _, inp, _ in work] if not training else []

    def run_blocks() -> None:
        for m, inp, grad in work:
            if training:
                inp.requires_grad_(True)
                m(inp).backward(grad)
                inp.grad = None
                m.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    m(inp)

    def restore() -> None:
        # training: nothing to restore (with autograd on the blocks leave their input alone), originals is empty
        for (_, inp, _), original in zip(work, originals, strict=False):
            inp.copy_(original)

    return run_blocks, restore


def measure(quick: bool = False, allocator: str = DEFAULT_ALLOCATOR) -> dict:
    """Times SEUNet for every SE variant in this process; returns rows with medians and ratios vs ``se=None``.

    Args:
        quick: see :func:`run`.
        allocator: label of the allocator setting this process runs with (the rows' ``allocator`` column).
    """
    # a full run takes about two minutes per allocator setting on 2 cores: 15 interleaved repetitions for inference,
    # 11 for the (about 3x slower) training step, one warm-up each. On the 2-core VM single steps scatter by 5-10 %,
    # and the control's ratio over 9 repetitions was up to 1.03 (two identical networks).
    features, shape = (16, (2, 1, 64, 64)) if quick else (64, (4, 1, 128, 128))
    repeats = {"inference": 3, "training": 2} if quick else {"inference": 15, "training": 11}
    torch.manual_seed(0)
    base = _net(None, features, None)
    nets = {str(se).lower(): _net(se, features, base.state_dict()) for se in VARIANTS}
    nets[CONTROL] = _net(None, features, base.state_dict())
    x = torch.randn(shape)
    target = torch.randint(0, 2, (shape[0], *shape[2:]))
    rows = []
    result: dict = {
        "benchmark": "networks",
        "quick": quick,
        "configuration": {"network": "SEUNet", "features": features, "kernel_size": 5, "input": list(shape)},
        "repetitions": repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": cpu_kernels.available(),  # the scSE blocks run on the compiled kernels (scse_monai.cpu_kernels)
    }
    for mode in ("inference", "training"):
        cands = {}
        for name, net in nets.items():
            if mode == "inference":
                net.eval()

                def infer(net=net):
                    with torch.no_grad():
                        return net(x)

                cands[name] = infer
            else:
                net.train()
                opt = torch.optim.SGD(net.parameters(), lr=1e-3)

                def step(net=net, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(net(x), target)
                    loss.backward()
                    opt.step()

                cands[name] = step
        cands["scse_blocks_alone"], restore = _scse_blocks_alone(nets["scse"], x, training=mode == "training")
        times = compare_times(cands, repeats=repeats[mode], setups={"scse_blocks_alone": restore})
        base_s, base_cpu = times["none"]["median_s"], times["none"]["cpu_median_s"]
        for name in nets:
            med, cpu = times[name]["median_s"], times[name]["cpu_median_s"]
            rows.append(
                {
                    "allocator": allocator,
                    "mode": mode,
                    "se": name,
                    "median_ms": round(med * 1e3, 1),
                    "ratio_vs_none": round(med / base_s, 3),
                    "cpu_median_ms": round(cpu * 1e3, 1),
                    "cpu_ratio_vs_none": round(cpu / base_cpu, 3),
                }
            )
            print(
                f"  networks [{allocator}] {mode:9s} se={name:11s} median {med * 1e3:9.1f} ms  "
                f"ratio {med / base_s:5.3f}  (CPU time ratio {cpu / base_cpu:5.3f})"
            )
        ratio = times["scse"]["median_s"] / base_s
        result[f"scse_ratio_{mode}"] = round(ratio, 4)
        result[f"scse_cpu_ratio_{mode}"] = round(times["scse"]["cpu_median_s"] / base_cpu, 4)
        result[f"target_{mode}"] = TARGETS[mode]
        result[f"target_met_{mode}"] = ratio <= TARGETS[mode]
        result[f"control_ratio_{mode}"] = round(times[CONTROL]["median_s"] / base_s, 4)
        share = times["scse_blocks_alone"]["median_s"] / base_s
        result[f"scse_blocks_share_{mode}"] = round(share, 4)
        print(f"  networks [{allocator}] {mode:9s} the scSE blocks alone take {share:.1%} of a plain U-Net {mode} step")
    result["rows"] = rows
    return result
