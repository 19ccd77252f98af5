"""Benchmark: ``prepare chaos --task mr-t2spir`` wall time (target: 16-patient CHAOS T2 sample <= 60 s on 2 cores).

Uses the real sample at ``../shared/data/CHAOS_sample/Train_Sets`` (relative to the repository) or
``$SCSE_CHAOS_SAMPLE`` if present, else 16 synthetic patients of the same size (256x256, 30-37 slices). Cold runs
(fresh output folder) with 1 and 2 workers are interleaved over repetitions and summarised by medians; the warm
run is a re-run over up-to-date outputs (everything skipped).

Run: ``python benchmarks/bench_prepare.py [--quick] [--out bench_prepare.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scse_monai.data import prepare_chaos, synthesize  # noqa: E402

TARGET_S = 60.0


def _sample_root() -> Path | None:
    env = os.environ.get("SCSE_CHAOS_SAMPLE")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "CHAOS_sample" / "Train_Sets"]:
        if (cand / "MR").is_dir():
            return cand
    return None


def _timed(root: Path, out: Path, workers: int) -> float:
    t0 = time.perf_counter()
    prepare_chaos(root, "mr-t2spir", out, folds=2, seed=0, workers=workers, progress=False)
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict:
    """Time CHAOS T2-SPIR preparation; returns medians (s), speed-up of 2 vs 1 worker and the target check.

    Args:
        quick: 4 small synthetic patients and 1 repetition (a smoke run, not a measurement of the target).

    Returns:
        dict with ``dataset``, ``cases``, ``slices``, ``cold_2workers_s``, ``cold_1worker_s``, ``speedup``,
        ``warm_rerun_s``, ``target_s``, ``meets_target`` and the raw repetitions.
    """
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        root = None if quick else _sample_root()
        if root is None:
            dataset = "synthetic"
            n, size, slices = (4, 96, (12, 16)) if quick else (16, 256, (30, 37))
            root = synthesize("chaos-mr", tmp / "raw", cases=n, seed=0, size=size, slices=slices, progress=False)
        else:
            dataset = "CHAOS T2-SPIR sample"
        reps = 1 if quick else 3
        cold = {1: [], 2: []}
        for r in range(reps):
            for w in (2, 1) if r % 2 == 0 else (1, 2):  # interleaved, alternating order
                out = tmp / f"out_{r}_{w}"
                cold[w].append(_timed(root, out, w))
        warm = [_timed(root, tmp / "out_0_2", 2) for _ in range(reps)]
        doc = json.loads((tmp / "out_0_2" / "datalist.json").read_text())
        import nibabel as nib

        slices_total = sum(nib.load(tmp / "out_0_2" / it["image"]).shape[2] for it in doc["training"])
        c2, c1 = statistics.median(cold[2]), statistics.median(cold[1])
        return {
            "benchmark": "prepare_chaos_mr_t2spir",
            "dataset": dataset,
            "cases": len(doc["training"]),
            "slices": slices_total,
            "cpu_count": os.cpu_count(),
            "cold_2workers_s": round(c2, 3),
            "cold_1worker_s": round(c1, 3),
            "speedup_2_vs_1": round(c1 / c2, 3),
            "warm_rerun_s": round(statistics.median(warm), 3),
            "target_s": TARGET_S,
            "meets_target": bool(c2 <= TARGET_S),
            "repetitions": {"cold_2workers": cold[2], "cold_1worker": cold[1], "warm": warm},
            "quick": quick,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_prepare.json")
    a = ap.parse_args()
    res = run(quick=a.quick)
    print(json.dumps(res, indent=2))
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
