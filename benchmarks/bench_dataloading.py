"""Benchmark: data loading's share of a bundle training step (issue 6, §3 e).

The bundle's ``train.json`` is parsed as shipped (CacheDataset of the resampled volumes, random slice crops +
augmentation per iteration, ``num_workers`` 0, SE-UNet features 32, 5x5, batch of 1 volume x 4 slices of
160 x 160, SGD), on the synthetic CHAOS-MR set the bundle falls back to. Each iteration is split into:

- ``load``: ``next()`` on the train data loader (the random per-slice transforms and collation; the volume
  transforms are cached once before timing, their one-off time is reported as ``cache_build_s``);
- ``step``: moving the batch to the device, forward, loss, backward, optimizer step (what ``SupervisedTrainer``
  does per iteration).

The two alternate within every iteration (so they are interleaved by construction); medians over all iterations
of several epochs are reported, and ``load_share = load / (load + step)``.

Run: ``python -m benchmarks.run --only dataloading [--quick]``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def run(quick: bool = False) -> dict:
    """Times the train data loader against the training step of the bundle.

    Args:
        quick: features 8 and 1 epoch (a smoke run); otherwise the shipped features 32 and 3 epochs.
    """
    from scse_monai.data import ensure_synthetic_dataset

    features, epochs = (8, 1) if quick else (32, 3)
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = Path(tmp) / "synthetic_chaos_mr"
        ensure_synthetic_dataset(dataset_dir, layout="chaos-mr", cases=6, seed=0)
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser.update(
            {
                "bundle_root": str(BUNDLE),
                "dataset_dir": str(dataset_dir),
                "ckpt_dir": str(Path(tmp) / "models"),
                "output_dir": str(Path(tmp) / "eval"),
                "features": features,
            }
        )
        torch.manual_seed(0)
        start = time.perf_counter()
        loader = parser.get_parsed_content("train#dataloader")
        cache_s = time.perf_counter() - start
        net = parser.get_parsed_content("network").train()
        loss_fn = parser.get_parsed_content("loss")
        opt = parser.get_parsed_content("optimizer")
        device = parser.get_parsed_content("device")
        amp = parser.get_parsed_content("amp")

        def step(batch: dict) -> float:
            x, y = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return float(loss.detach())

        load_t, step_t, shapes = [], [], set()
        for epoch in range(epochs + 1):  # epoch 0 is warm-up, not timed
            it = iter(loader)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                step(batch)
                t2 = time.perf_counter()
                if epoch:
                    load_t.append(t1 - t0)
                    step_t.append(t2 - t1)
                    shapes.add(tuple(batch["image"].shape))
    load, stp = statistics.median(load_t), statistics.median(step_t)
    share = load / (load + stp)
    print(f"  dataloading load {load * 1e3:8.1f} ms  step {stp * 1e3:8.1f} ms  load share {share:.3f}")
    return {
        "benchmark": "dataloading",
        "quick": quick,
        "device": str(device),
        "features": features,
        "batch_shape": "; ".join("x".join(map(str, s)) for s in sorted(shapes)),
        "iterations_timed": len(load_t),
        "num_workers": parser["num_workers"],
        "cache_build_s": round(cache_s, 2),
        "load_median_ms": round(load * 1e3, 1),
        "step_median_ms": round(stp * 1e3, 1),
        "load_share": round(share, 4),
        "load_share_total": round(sum(load_t) / (sum(load_t) + sum(step_t)), 4),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2, default=str))
