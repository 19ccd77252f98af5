"""Benchmark: the scSE block against the naive formulation of the same math.

The naive formulation is the definition: two full-size recalibrated maps, then their elementwise maximum
(``"max"``) or sum (``"add"``): ``torch.maximum(block.cse(x), block.sse(x))``. It uses the same gate code as
the block, so the comparison measures how the block combines them. Both are timed in inference
(``torch.no_grad``, eval mode) and for forward + backward (input requiring grad, training mode), in 2D and 3D,
interleaved repetitions, medians; peak memory is the most torch's allocator had allocated during one call
(``benchmarks.timing.peak_memory_bytes``). Target: the block at <= 0.7x the naive time in inference.

Run: ``python -m benchmarks.run --only blocks [--quick]``.
"""

from __future__ import annotations

import torch

from benchmarks.timing import compare_times, peak_memory_bytes
from scse_monai.blocks import ChannelSpatialSELayer

TARGET_INFERENCE_RATIO = 0.7
SHAPES = {"2d": (4, 64, 128, 128), "3d": (2, 32, 48, 48, 48)}
QUICK_SHAPES = {"2d": (2, 32, 64, 64), "3d": (1, 16, 24, 24, 24)}
NAIVE = {"max": torch.maximum, "add": torch.add}


def _candidates(block: ChannelSpatialSELayer, x: torch.Tensor, mode: str) -> dict:
    combine = NAIVE[block.aggregation]

    def naive() -> torch.Tensor:
        return combine(block.cse(x), block.sse(x))

    def fused() -> torch.Tensor:
        return block(x)

    fns = {"naive": naive, "scse": fused}
    if mode == "inference":

        def wrap(fn):
            def call():
                with torch.no_grad():
                    return fn()

            return call

        return {name: wrap(fn) for name, fn in fns.items()}

    grad = torch.ones_like(x)

    def wrap_train(fn):
        def call():
            x.grad = None
            block.zero_grad(set_to_none=True)
            fn().backward(grad)

        return call

    return {name: wrap_train(fn) for name, fn in fns.items()}


def run(quick: bool = False) -> dict:
    """Times the scSE block and the naive formulation; returns rows with medians, ratios and peak memory.

    Args:
        quick: smaller maps and fewer repetitions (a smoke run, not a measurement of the target).
    """
    repeats = 3 if quick else 9
    shapes = QUICK_SHAPES if quick else SHAPES
    rows = []
    for dims, shape in shapes.items():
        torch.manual_seed(0)
        for aggregation in NAIVE:
            block = ChannelSpatialSELayer(len(shape) - 2, shape[1], reduction_ratio=2, aggregation=aggregation)
            for mode in ("inference", "training"):
                block.train(mode == "training")
                x = torch.randn(shape, requires_grad=mode == "training")
                cands = _candidates(block, x, mode)
                if mode == "inference":  # same result, checked once (also a warm-up)
                    ref = cands["naive"]()
                    for name in set(cands) - {"naive"}:
                        if not torch.allclose(ref, cands[name](), atol=1e-5):
                            raise RuntimeError(f"scSE block ({name}) and naive formulation disagree ({dims}).")
                times = compare_times(cands, repeats=repeats)
                peaks = {name: peak_memory_bytes(fn) for name, fn in cands.items()}
                naive_s, block_s = times["naive"]["median_s"], times["scse"]["median_s"]
                rows.append(
                    {
                        "case": f"{dims} {tuple(shape)}",
                        "aggregation": aggregation,
                        "mode": mode,
                        "naive_ms": round(naive_s * 1e3, 2),
                        "scse_ms": round(block_s * 1e3, 2),
                        "time_ratio": round(block_s / naive_s, 3),
                        "cpu_time_ratio": round(times["scse"]["cpu_median_s"] / times["naive"]["cpu_median_s"], 3),
                        "naive_peak_MiB": round(peaks["naive"] / 2**20, 1),
                        "scse_peak_MiB": round(peaks["scse"] / 2**20, 1),
                        "memory_ratio": round(peaks["scse"] / max(peaks["naive"], 1), 3),
                    }
                )
                print(
                    f"  blocks {rows[-1]['case']:24s} {aggregation:3s} {mode:9s} naive {naive_s * 1e3:8.2f} ms  "
                    f"scSE {block_s * 1e3:8.2f} ms  ratio {block_s / naive_s:5.2f}  "
                    f"peak {rows[-1]['naive_peak_MiB']:7.1f} -> {rows[-1]['scse_peak_MiB']:7.1f} MiB"
                )
    headline = [r["time_ratio"] for r in rows if r["aggregation"] == "max" and r["mode"] == "inference"]
    worst = max(headline)
    return {
        "benchmark": "blocks",
        "quick": quick,
        "repetitions": repeats,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "max_inference_ratio_worst": worst,
        "target_ratio": TARGET_INFERENCE_RATIO,
        "target_met": worst <= TARGET_INFERENCE_RATIO,
    }
