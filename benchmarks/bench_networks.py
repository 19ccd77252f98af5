"""Benchmark: SE-UNet with and without SE blocks, at the paper's configuration.

SEUNet with ``features=64``, 5x5 kernels, 2D, a batch of 4 x 1 x 128 x 128: ``se=None`` against ``"cse"``,
``"sse"`` and ``"scse"`` (max aggregation, r=2), in inference (``torch.no_grad``, eval mode) and for one
training step (forward, cross-entropy loss, backward, SGD step). All variants share the weights of
the common layers; repetitions are interleaved and medians compared. Targets (issue 6): scSE-UNet / UNet
time <= 1.03 in inference and <= 1.04 in training.

Run: ``python -m benchmarks.run --only networks [--quick]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.timing import compare_times
from scse_monai.networks import SEUNet

TARGETS = {"inference": 1.03, "training": 1.04}
VARIANTS = (None, "cse", "sse", "scse")


def _net(se: str | None, features: int, base_state: dict | None) -> SEUNet:
    net = SEUNet(2, 1, 2, features=features, kernel_size=5, se=se)
    if base_state is not None:
        net.load_state_dict(base_state, strict=False)  # same weights in the layers all variants share
    return net


def run(quick: bool = False) -> dict:
    """Times SEUNet for every SE variant; returns rows with medians and ratios against ``se=None``.

    Args:
        quick: features 16 on 2 x 1 x 64 x 64 and fewer repetitions (a smoke run, not the paper's setting).
    """
    # a full run must stay within a few minutes on 2 cores: 7 interleaved repetitions for inference, 5 for the
    # (about 3x slower) training step, one warm-up each
    features, shape = (16, (2, 1, 64, 64)) if quick else (64, (4, 1, 128, 128))
    repeats = {"inference": 3, "training": 2} if quick else {"inference": 7, "training": 5}
    torch.manual_seed(0)
    base = _net(None, features, None)
    nets = {str(se).lower(): _net(se, features, base.state_dict()) for se in VARIANTS}
    x = torch.randn(shape)
    target = torch.randint(0, 2, (shape[0], *shape[2:]))
    rows = []
    result: dict = {
        "benchmark": "networks",
        "quick": quick,
        "configuration": {"network": "SEUNet", "features": features, "kernel_size": 5, "input": list(shape)},
        "repetitions": repeats,
        "torch_threads": torch.get_num_threads(),
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
        times = compare_times(cands, repeats=repeats[mode])
        base_s, base_cpu = times["none"]["median_s"], times["none"]["cpu_median_s"]
        for name in nets:
            med, cpu = times[name]["median_s"], times[name]["cpu_median_s"]
            rows.append(
                {
                    "mode": mode,
                    "se": name,
                    "median_ms": round(med * 1e3, 1),
                    "ratio_vs_none": round(med / base_s, 3),
                    "cpu_median_ms": round(cpu * 1e3, 1),
                    "cpu_ratio_vs_none": round(cpu / base_cpu, 3),
                }
            )
            print(
                f"  networks {mode:9s} se={name:5s} median {med * 1e3:9.1f} ms  ratio {med / base_s:5.3f}  "
                f"(CPU time ratio {cpu / base_cpu:5.3f})"
            )
        ratio = times["scse"]["median_s"] / base_s
        result[f"scse_ratio_{mode}"] = round(ratio, 4)
        result[f"scse_cpu_ratio_{mode}"] = round(times["scse"]["cpu_median_s"] / base_cpu, 4)
        result[f"target_{mode}"] = TARGETS[mode]
        result[f"target_met_{mode}"] = ratio <= TARGETS[mode]
    result["rows"] = rows
    return result
