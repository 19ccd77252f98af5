"""Statistics of a comparison: per-case Dice tables, mean ± std, Wilcoxon signed-rank tests against ``none``."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats as sps

__all__ = ["read_per_case", "summarize", "wilcoxon_paired"]


def read_per_case(path: str | Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Reads a bundle evaluation's ``metrics_per_case.csv``.

    Args:
        path: CSV with columns ``case, dice_<organ>..., jaccard_<organ>...`` (empty cell = organ absent).

    Returns:
        ``(organs, {case: {organ: dice}})`` with NaN for empty cells.

    Example::

        >>> organs, dice = read_per_case("runs/unet_none/fold0/eval/metrics_per_case.csv")  # doctest: +SKIP
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        organs = [c[len("dice_") :] for c in reader.fieldnames or [] if c.startswith("dice_")]
        table = {}
        for row in reader:
            table[row["case"]] = {
                o: float(row[f"dice_{o}"]) if row[f"dice_{o}"] not in ("", None) else math.nan for o in organs
            }
    return organs, table


def wilcoxon_paired(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired values ``a`` vs ``b`` (``scipy.stats.wilcoxon``).

    Pairs with a NaN on either side are dropped. The p-value is NaN, with a note saying why, when the test
    cannot be run (fewer than 2 pairs, or every difference zero). With ``n`` pairs and no ties the exact test's
    smallest two-sided p-value is ``2 / 2**n``; when that is above ``alpha`` the note says so, since then no
    outcome could be called significant.

    Args:
        a: values of the variant, one per case.
        b: values of the baseline for the same cases, in the same order.
        alpha: significance level the note refers to.

    Returns:
        ``{"p_value", "n_pairs", "n_nonzero", "median_difference", "note"}``.

    Example::

        >>> r = wilcoxon_paired([0.9, 0.8, 0.85, 0.7, 0.95, 0.9], [0.8, 0.7, 0.8, 0.6, 0.9, 0.85])
        >>> round(r["p_value"], 5), r["n_pairs"]
        (0.03125, 6)
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    n, nonzero = int(d.size), int(np.count_nonzero(d))
    out = {"p_value": math.nan, "n_pairs": n, "n_nonzero": nonzero, "median_difference": math.nan, "note": ""}
    if n:
        out["median_difference"] = float(np.median(d))
    if n < 2:
        out["note"] = f"not tested: {n} paired case(s)"
        return out
    if nonzero == 0:
        out["note"] = "not tested: all paired differences are zero"
        return out
    out["p_value"] = float(sps.wilcoxon(x[keep], y[keep], alternative="two-sided").pvalue)
    smallest = 2.0 / 2**nonzero
    if smallest > alpha:
        out["note"] = f"{nonzero} non-zero pairs: p cannot go below {smallest:.3g}, so never < {alpha}"
    return out


def summarize(
    per_case: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]],
    organs: Sequence[str],
    baseline: str = "none",
) -> list[dict]:
    """Mean ± std Dice per (network, variant) and organ, and Wilcoxon p-values against the baseline variant.

    Args:
        per_case: ``{(network, variant): {case: {organ: dice}}}`` pooled over folds (every case once).
        organs: organ names; the summary adds ``"mean"`` (per case, the mean over the organs scored in it).
        baseline: variant the others are tested against, paired per case within a network.

    Returns:
        Rows with ``network, variant, organ, mean, std, median, n_cases, p_vs_<baseline>, n_pairs,
        median_difference, note`` (std: sample std, ddof=1; NaN with one case).

    Example::

        >>> rows = summarize({("unet", "none"): {"c1": {"liver": 0.8}}}, ["liver"])
        >>> rows[0]["mean"]
        0.8
    """

    def values(table: Mapping[str, Mapping[str, float]], cases: Sequence[str], organ: str) -> np.ndarray:
        if organ == "mean":
            rows = [[table[c].get(o, math.nan) for o in organs] for c in cases]
            with np.errstate(all="ignore"):
                arr = np.asarray(rows, dtype=np.float64).reshape(len(cases), len(organs))
                counts = (~np.isnan(arr)).sum(1)
                sums = np.nansum(arr, 1)
                return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)
        return np.asarray([table[c].get(organ, math.nan) for c in cases], dtype=np.float64)

    out = []
    for (network, variant), table in per_case.items():
        cases = sorted(table)
        base = per_case.get((network, baseline))
        for organ in [*organs, "mean"]:
            v = values(table, cases, organ)
            valid = v[~np.isnan(v)]
            row = {
                "network": network,
                "variant": variant,
                "organ": organ,
                "mean": float(valid.mean()) if valid.size else math.nan,
                "std": float(valid.std(ddof=1)) if valid.size > 1 else math.nan,
                "median": float(np.median(valid)) if valid.size else math.nan,
                "n_cases": int(valid.size),
            }
            test = {"p_value": math.nan, "n_pairs": 0, "median_difference": math.nan, "note": ""}
            if variant == baseline:
                test["note"] = "baseline"
            elif base is None:
                test["note"] = f"no '{baseline}' run for this network"
            else:
                common = sorted(set(cases) & set(base))
                test = wilcoxon_paired(values(table, common, organ), values(base, common, organ))
            row[f"p_vs_{baseline}"] = test["p_value"]
            row["n_pairs"] = test["n_pairs"]
            row["median_difference"] = test["median_difference"]
            row["note"] = test["note"]
            out.append(row)
    return out
