"""Benchmark: SE-UNet with and without SE blocks, at the paper's configuration.

SEUNet with ``features=64``, 5x5 kernels, 2D, a batch of 4 x 1 x 128 x 128: ``se=None`` against ``"cse"``,
``"sse"`` and ``"scse"`` (max aggregation, r=2), in inference (``torch.no_grad``, eval mode) and for one
training step (forward, cross-entropy loss, backward, SGD step). All variants share the weights of
the common layers. Targets (issue 14): scSE-UNet / UNet time <= 1.03 in inference and <= 1.08 in training.

How the ratios are made. A *session* is one fresh process that builds the networks and times every candidate
over interleaved repetitions (the order rotates each repetition). Each repetition gives one paired ratio per
candidate, its time over the plain network's time in the same repetition (adjacent in time, so load that comes
and goes cancels). The reported ratio is the median of the paired ratios pooled over all sessions of an
allocator setting; each session's own median ratio is listed too (``session_ratios``). Several sessions, because
each process places its tensors differently: two identical networks timed in one process differed by up to 3 %.

A control candidate, ``none (copy)``, is a second plain U-Net with the same weights: its ratio to ``none`` would be
1.000 on a quiet machine, so how far it lands from 1 is the measurement's own resolution (``control_ratio_*``).
A whole-network ratio closer to its target than that cannot be told apart from noise; ``scse_blocks_share_*``
(the network's scSE blocks run alone, at the shapes they see in it) is the measurement of SE's own cost that
noise does not swamp.

On CPU with glibc's default malloc, much of a training step's time goes to paging in fresh memory: large
freed blocks are returned to the kernel and the next allocation of that size faults every page in again. How
much depends on the allocator's state, which changes from run to run, and SE blocks add two full-size tensors
per block in training (their output and their input's gradient). So sessions run with the default allocator
and with glibc settings that keep freed memory for reuse (:data:`KEEP_MEMORY_ENV`; the effect PyTorch's CPU
performance guide gets from jemalloc or tcmalloc), alternating. The second isolates the SE blocks' own cost.
Rows carry an ``allocator`` column; result keys of the second end in ``_kept_memory``.

Run: ``python -m benchmarks.run --only networks [--quick]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import compare_times
from scse_monai.blocks import SE_LAYER_NAMES, ChannelSpatialSELayer
from scse_monai.networks import SEUNet

TARGETS = {"inference": 1.03, "training": 1.08}
MODES = ("inference", "training")
VARIANTS = SE_LAYER_NAMES
#: the A/A control: a second plain network with the same weights, timed like the others
CONTROL = "none (copy)"
BLOCKS_ALONE = "scse_blocks_alone"
#: glibc malloc tunables: serve blocks up to 32 MiB from the heap (not fresh mmaps) and never trim the heap, so
#: freed memory is reused without page faults
KEEP_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
DEFAULT_ALLOCATOR = "default"
KEEP_MEMORY_ALLOCATOR = "glibc, freed memory kept"
#: sessions per allocator setting (a full session: about 2 minutes on 2 cores)
SESSIONS = 2


def _net(se: str | None, features: int, base_state: dict | None) -> SEUNet:
    net = SEUNet(2, 1, 2, features=features, kernel_size=5, se=se)
    if base_state is not None:
        net.load_state_dict(base_state, strict=False)  # same weights in the layers all variants share
    return net


def run(quick: bool = False) -> dict:
    """Times SEUNet for every SE variant in fresh processes, with the default allocator and with freed memory kept.

    Args:
        quick: one session per allocator setting, features 16 on 2 x 1 x 64 x 64 and fewer repetitions (a smoke
            run, not the paper's setting).

    Returns:
        Rows per allocator, mode and variant, and the summary keys (``scse_ratio_*``, ``control_ratio_*``,
        ``target_met_*``, ``scse_blocks_share_*``; ``*_kept_memory`` for the second allocator setting). Where glibc's
        tunables do not apply (not Linux), only the default allocator is measured.
    """
    settings = [(DEFAULT_ALLOCATOR, {})]
    if sys.platform.startswith("linux"):
        settings.append((KEEP_MEMORY_ALLOCATOR, KEEP_MEMORY_ENV))
    sessions: dict[str, list[dict]] = {name: [] for name, _ in settings}
    for _ in range(1 if quick else SESSIONS):
        for name, env in settings:  # alternating, so that slow drifts of the machine hit both settings
            sessions[name].append(_session_in_child(quick, name, env))
    first = sessions[DEFAULT_ALLOCATOR][0]
    result: dict = {
        "benchmark": "networks",
        "quick": quick,
        "configuration": first["configuration"],
        "repetitions_per_session": first["repetitions"],
        "sessions_per_allocator": len(sessions[DEFAULT_ALLOCATOR]),
        "torch_threads": torch.get_num_threads(),
        "rows": [],
    }
    for name, _ in settings:
        suffix = "" if name == DEFAULT_ALLOCATOR else "_kept_memory"
        rows, summary = _summarize(sessions[name], name)
        result["rows"] += rows
        result.update({f"{key}{suffix}": value for key, value in summary.items()})
    return result


def _session_in_child(quick: bool, allocator: str, env: dict[str, str]) -> dict:
    """Runs :func:`measure_session` in a fresh Python process with ``env`` added; returns its result."""
    code = (
        "import json, torch; from benchmarks.bench_networks import measure_session; "
        f"torch.set_num_threads({torch.get_num_threads()}); "
        f"print('RESULT ' + json.dumps(measure_session({quick!r})))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        # the default sessions must not inherit the kept-memory tunables from the caller's environment
        env={**{k: v for k, v in os.environ.items() if k not in KEEP_MEMORY_ENV}, **env},
        capture_output=True,
        text=True,
    )
    if child.returncode != 0 or "RESULT " not in child.stdout:
        raise RuntimeError(f"a {allocator!r} session failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    session = json.loads(child.stdout.rsplit("RESULT ", 1)[1])
    for mode in MODES:
        times = session["times"][mode]
        ratio, control = _session_ratio(times, "scse"), _session_ratio(times, CONTROL)
        print(f"  networks [{allocator}] session: {mode:9s} scse/none {ratio:5.3f}  control {control:5.3f}", flush=True)
    return session


def _session_ratio(times: dict, name: str) -> float:
    """One session's ratio ``name / none``: its median time over the plain network's median time."""
    return statistics.median(times[name]["wall_s"]) / statistics.median(times["none"]["wall_s"])


def _paired(session_times: list[dict], name: str, key: str = "wall_s") -> list[float]:
    """Per-repetition ratios ``name / none``, pooled over sessions."""
    return [a / b for t in session_times for a, b in zip(t[name][key], t["none"][key], strict=True)]


def _summarize(sessions: list[dict], allocator: str) -> tuple[list[dict], dict]:
    rows, summary = [], {}
    for mode in MODES:
        per_session = [s["times"][mode] for s in sessions]
        names = [n for n in per_session[0] if n != BLOCKS_ALONE]
        for name in names:
            wall = [v for t in per_session for v in t[name]["wall_s"]]
            ratio = statistics.median(_paired(per_session, name))
            rows.append(
                {
                    "allocator": allocator,
                    "mode": mode,
                    "se": name,
                    "median_ms": round(statistics.median(wall) * 1e3, 1),
                    "ratio_vs_none": round(ratio, 3),
                    "session_ratios": ", ".join(f"{_session_ratio(t, name):.3f}" for t in per_session),
                    "cpu_ratio_vs_none": round(statistics.median(_paired(per_session, name, "cpu_s")), 3),
                }
            )
            print(
                f"  networks [{allocator}] {mode:9s} se={name:11s} median {rows[-1]['median_ms']:9.1f} ms  "
                f"ratio {ratio:5.3f}  (sessions: {rows[-1]['session_ratios']})"
            )
        scse = statistics.median(_paired(per_session, "scse"))
        share = statistics.median(_paired(per_session, BLOCKS_ALONE))
        summary.update(
            {
                f"scse_ratio_{mode}": round(scse, 4),
                f"target_{mode}": TARGETS[mode],
                f"target_met_{mode}": scse <= TARGETS[mode],
                f"control_ratio_{mode}": round(statistics.median(_paired(per_session, CONTROL)), 4),
                f"scse_blocks_share_{mode}": round(share, 4),
            }
        )
        print(f"  networks [{allocator}] {mode:9s} the scSE blocks alone take {share:.1%} of a plain U-Net {mode} step")
    return rows, summary


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


def measure_session(quick: bool = False) -> dict:
    """One session in this process: times every candidate, interleaved; returns every repetition's times.

    Args:
        quick: see :func:`run`.

    Returns:
        ``{"times": {mode: {candidate: {"wall_s": [...], "cpu_s": [...]}}}, ...}``, one value per repetition;
        candidates: the SE variants (``"none"``, ``"cse"``, ``"sse"``, ``"scse"``), the control and the scSE
        blocks alone.
    """
    # one session takes about 2 minutes on 2 cores: 9 interleaved repetitions for inference, 7 for the (about 3x
    # slower) training step, one warm-up each. On the 2-core VM single steps scatter by 5-10 %.
    features, shape = (16, (2, 1, 64, 64)) if quick else (64, (4, 1, 128, 128))
    repeats = {"inference": 3, "training": 2} if quick else {"inference": 9, "training": 7}
    torch.manual_seed(0)
    base = _net(None, features, None)
    nets = {str(se).lower(): _net(se, features, base.state_dict()) for se in VARIANTS}
    nets[CONTROL] = _net(None, features, base.state_dict())
    x = torch.randn(shape)
    target = torch.randint(0, 2, (shape[0], *shape[2:]))
    result: dict = {
        "configuration": {"network": "SEUNet", "features": features, "kernel_size": 5, "input": list(shape)},
        "repetitions": repeats,
        "times": {},
    }
    for mode in MODES:
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
        cands[BLOCKS_ALONE], restore = _scse_blocks_alone(nets["scse"], x, training=mode == "training")
        times = compare_times(cands, repeats=repeats[mode], setups={BLOCKS_ALONE: restore})
        result["times"][mode] = {n: {"wall_s": t["times_s"], "cpu_s": t["cpu_times_s"]} for n, t in times.items()}
    return result
