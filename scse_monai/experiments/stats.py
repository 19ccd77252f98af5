"""Paired statistics of a comparison: variant vs baseline, per patient.

For each patient the Dice of a variant and of the baseline (each averaged over the seeds that ran) form a pair.
:func:`paired_difference` reports the mean paired difference with a percentile bootstrap 95 % CI (patients
resampled with replacement), the two-sided Wilcoxon signed-rank p (``scipy.stats.wilcoxon``) and how many
patients improve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

__all__ = ["bootstrap_ci", "paired_difference", "wilcoxon_paired"]


def bootstrap_ci(values: Sequence[float], n_resamples: int = 10_000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap confidence interval of the mean of ``values`` (NaNs dropped).

    Args:
        values: one value per patient (e.g. a paired difference).
        n_resamples: bootstrap resamples of the patients.
        level: confidence level.
        seed: seed of the resampling (results are reproducible).

    Returns:
        ``(low, high)``; NaNs when fewer than two values.

    Example::

        >>> low, high = bootstrap_ci([0.01, 0.02, 0.03, 0.02, 0.01])
        >>> 0.01 <= low < high <= 0.03
        True
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size < 2:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_resamples, v.size))
    means = v[idx].mean(1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def wilcoxon_paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of paired ``a`` vs ``b`` (pairs with a NaN dropped).

    Returns NaN when the test cannot run (fewer than 2 pairs, or every difference zero).

    Example::

        >>> round(wilcoxon_paired([0.9, 0.8, 0.85, 0.7, 0.95, 0.9], [0.8, 0.7, 0.8, 0.6, 0.9, 0.85]), 5)
        0.03125
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 2 or not np.any(x[keep] != y[keep]):
        return math.nan
    return float(sps.wilcoxon(x[keep], y[keep], alternative="two-sided").pvalue)


def paired_difference(a: Sequence[float], b: Sequence[float], n_resamples: int = 10_000) -> dict:
    """Variant ``a`` minus baseline ``b``, paired per patient.

    Returns:
        ``{"n", "mean_difference", "ci_low", "ci_high", "p_wilcoxon", "n_improved"}``.

    Example::

        >>> r = paired_difference([0.9, 0.8, 0.85], [0.8, 0.8, 0.8])
        >>> r["n"], r["n_improved"], round(r["mean_difference"], 3)
        (3, 2, 0.05)
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    low, high = bootstrap_ci(d, n_resamples)
    return {
        "n": int(d.size),
        "mean_difference": float(d.mean()) if d.size else math.nan,
        "ci_low": low,
        "ci_high": high,
        "p_wilcoxon": wilcoxon_paired(x[keep], y[keep]),
        "n_improved": int((d > 0).sum()),
    }
