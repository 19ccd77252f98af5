"""Benchmark: SegmentationCountsMetric (on-device counting) vs MONAI's DiceMetric.

Workload (issue 4): 5 classes, batches of 2 volumes of 256 x 256 x 40 voxels, label maps with organ-sized
boxes and a noisy prediction. One repetition = ``reset``, one call with the batch, one ``results`` /
``aggregate``. The contenders run interleaved (one repetition of each in turn, order rotated), and
the medians over repetitions are compared:

- ``ours_labels``: ``SegmentationCountsMetric`` on the label maps (what an evaluator gives after ``argmax``);
- ``ours_onehot``: ``SegmentationCountsMetric`` on one-hot tensors;
- ``monai_onehot``: ``DiceMetric`` on one-hot tensors prepared beforehand (its documented input; conversion
  time not counted, the most favourable setting for MONAI);
- ``monai_onehot_incl_conversion``: the same plus the label map -> one-hot conversion;
- ``monai_labels``: ``DiceMetric(num_classes=5)`` on the label maps (it expands them internally).

The headline ratio is ``ours_labels / monai_onehot`` (target <= 0.25, issue 14). Both compute the same per-case Dice
(checked before timing).

Run: ``python -m benchmarks.bench_metrics [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from scse_monai.metrics import SegmentationCountsMetric

NUM_CLASSES = 5
#: ours_labels / monai_onehot (issue 14)
TARGET_RATIO = 0.25
SHAPE = (2, 1, 256, 256, 40)


def make_batch(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Target with 4 box-shaped organs on background, and a prediction with shifted boxes and 2% label noise."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(shape, dtype=torch.int64)
    pred = torch.zeros(shape, dtype=torch.int64)
    h, w, d = shape[2:]
    boxes = [(0.15, 0.55, 0.2, 0.6), (0.55, 0.8, 0.15, 0.4), (0.55, 0.8, 0.6, 0.85), (0.2, 0.45, 0.65, 0.9)]
    for c, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        ys, xs = slice(int(y0 * h), int(y1 * h)), slice(int(x0 * w), int(x1 * w))
        target[:, :, ys, xs, int(0.2 * d) : int(0.8 * d)] = c
        ys2, xs2 = slice(int(y0 * h) + 3, int(y1 * h) + 3), slice(int(x0 * w) - 2, int(x1 * w) - 2)
        pred[:, :, ys2, xs2, int(0.25 * d) : int(0.8 * d)] = c
    noise = torch.rand(shape, generator=g) < 0.02
    pred = torch.where(noise, torch.randint(0, NUM_CLASSES, shape, generator=g), pred)
    return pred, target


def _ours(pred: torch.Tensor, target: torch.Tensor) -> Callable[[], torch.Tensor]:
    metric = SegmentationCountsMetric(NUM_CLASSES, include_background=False)

    def step() -> torch.Tensor:
        metric.reset()
        metric(pred, target)
        return metric.results()["case_dice"]

    return step


def _monai(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None, convert: bool = False):
    metric = DiceMetric(include_background=False, reduction="none", num_classes=num_classes)

    def step() -> torch.Tensor:
        metric.reset()
        p, t = (one_hot(pred, NUM_CLASSES), one_hot(target, NUM_CLASSES)) if convert else (pred, target)
        metric(p, t)
        return metric.aggregate()

    return step


def run(quick: bool = False) -> dict:
    """Time the contenders; print a table and return the numbers (seconds, medians, ratios)."""
    reps = 3 if quick else 11
    pred, target = make_batch()
    pred_oh, target_oh = one_hot(pred, NUM_CLASSES), one_hot(target, NUM_CLASSES)
    contenders = {
        "ours_labels": _ours(pred, target),
        "ours_onehot": _ours(pred_oh, target_oh),
        "monai_onehot": _monai(pred_oh, target_oh),
        "monai_onehot_incl_conversion": _monai(pred, target, convert=True),
        "monai_labels": _monai(pred, target, num_classes=NUM_CLASSES),
    }
    # same result first (also a warm-up)
    reference = contenders["monai_onehot"]().double()
    for name, fn in contenders.items():
        if not torch.allclose(fn().double(), reference, atol=1e-6, equal_nan=True):
            raise RuntimeError(f"{name} disagrees with MONAI DiceMetric; the benchmark would compare different work.")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no contender always first
        for name in order:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["monai_onehot"]
    result = {
        "benchmark": "metrics",
        "workload": {"num_classes": NUM_CLASSES, "batch_shape": list(SHAPE), "repetitions": reps},
        "torch_threads": torch.get_num_threads(),
        "median_seconds": medians,
        "all_seconds": times,
        "ratio_ours_labels_vs_monai_onehot": medians["ours_labels"] / base,
        "ratio_ours_onehot_vs_monai_onehot": medians["ours_onehot"] / base,
        "ratio_ours_labels_vs_monai_labels": medians["ours_labels"] / medians["monai_labels"],
        "ratio_ours_labels_vs_monai_onehot_incl_conversion": medians["ours_labels"]
        / medians["monai_onehot_incl_conversion"],
        "target_ratio": TARGET_RATIO,
    }
    result["target_met"] = result["ratio_ours_labels_vs_monai_onehot"] <= result["target_ratio"]
    print(f"metrics benchmark: {NUM_CLASSES} classes, batch {tuple(SHAPE)}, {reps} interleaved repetitions")
    for name, m in medians.items():
        print(f"  {name:32s} median {m * 1000:8.1f} ms   ({m / base:5.2f} x monai_onehot)")
    print(
        f"  ratio ours_labels / monai_onehot = {result['ratio_ours_labels_vs_monai_onehot']:.3f} "
        f"(target <= {TARGET_RATIO}: {'met' if result['target_met'] else 'NOT met'})"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 11")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    result = run(quick=args.quick)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
