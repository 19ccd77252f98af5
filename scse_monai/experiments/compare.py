"""Table 1 of Roy et al. through the bundle: network x SE variant x seed x patient-level fold, then paired statistics.

Every run uses the bundle's own recipe (``train.json`` + dataset config); only the network, SE variant, seed and
held-out fold change. Each held-out patient is predicted with its fold's last-epoch weights and scored on the
original grid (:mod:`scse_monai.experiments.heldout`). Variants are compared with ``none`` paired by patient.

Output folder layout::

    OUT/settings.json, OUT/datalist.json      the recipe a re-run must match; the folds
    OUT/runs/<net>_<se>[_<agg>]/seed<s>/fold<k>/
    OUT/per_case.csv                          network, variant, seed, fold, case, dice_*, hd95_*, volume_ratio_*
    OUT/results.csv                           per network x variant x organ: mean ± std, paired vs none
    OUT/seeds.csv                             per network x variant x seed: mean Dice (the seed-to-seed spread)
    OUT/results.md, OUT/dice_boxplot_<net>.png, OUT/overlay_<net>_<case>.png, OUT/training_curves_<net>.png
    OUT/ensemble/                             with ``ensemble``: the same report for each variant's per-fold
                                              mean-softmax ensemble of its seeds (as the shipped bundle predicts)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scse_monai.atomic import write_text_atomic
from scse_monai.blocks import AGGREGATIONS, SE_LAYER_NAMES
from scse_monai.experiments import figures
from scse_monai.experiments.crossval import csv_text, fmt, run_all, score_ensembles
from scse_monai.experiments.heldout import case_name, organ_keys, read_heldout
from scse_monai.experiments.runs import BundleSettings, Run
from scse_monai.experiments.setup import ExperimentError, bundle_settings, check_seeds, open_experiment
from scse_monai.experiments.stats import paired_difference
from scse_monai.networks.registry import NETWORKS

__all__ = ["BASELINE", "compare"]

BASELINE = "none"
#: Roy et al. (TMI 2019), U-Net mean Dice without and with scSE: MALC brain / VISCERAL
PAPER = {("unet", "none"): "0.763 / 0.857", ("unet", "scse"): "0.843 / 0.881"}


def _choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
    values = [v.strip().lower() for v in values if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ExperimentError(f"--{name}: {bad or 'empty'} not in {list(allowed)}")
    if len(set(values)) != len(values):
        raise ExperimentError(f"--{name}: repeated values in {values}")
    return values


def _runs(
    networks, ses, aggs, seeds, folds, root: Path, kernel_size, bundle_aggregation: str
) -> dict[tuple[str, str], list[Run]]:
    """``{(network, variant): [Run per seed x fold]}``. scSE with the bundle's aggregation is ``scse`` (so a later
    call reuses its runs whatever the other aggregations); any other is a variant ``scse_<agg>``, trained with it."""
    variants: dict[tuple[str, str], list[Run]] = {}
    scse_aggs = [None if agg == bundle_aggregation else agg for agg in aggs]
    for net in networks:
        for s in ses:
            for agg in scse_aggs if s == "scse" else [None]:
                name = f"{s}_{agg}" if agg else s
                runs = [Run(net, s, agg, k, root, kernel_size, seed) for seed in seeds for k in range(folds)]
                variants[(net, name)] = runs
    return variants


def compare(
    datalist: str | Path,
    out: str | Path,
    networks: Sequence[str] = ("unet",),
    se: Sequence[str] = ("none", "scse"),
    aggregation: Sequence[str] = ("max",),
    folds: int = 4,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    features: int | None = None,
    kernel_size: int | None = None,
    dataset_config: str | None = None,
    recipe: str | None = None,
    bundle_overrides: dict | None = None,
    bundle_root: str | Path | None = None,
    progress: bool = True,
    ensemble: bool = False,
) -> dict:
    """Trains and scores every network x SE variant x seed x fold through the bundle, then compares with ``none``.

    Re-running with the same recipe resumes: finished runs are skipped, a killed one resumes from its latest
    checkpoint. Networks, variants and seeds may be added in a later call to the same ``out``.

    Args:
        datalist: ``datalist.json`` of a prepared dataset.
        out: output folder.
        networks: any of ``"unet"``, ``"sdnet"``, ``"fcdensenet"``.
        se: any of ``"none"``, ``"cse"``, ``"sse"``, ``"scse"``; ``"none"`` is the baseline.
        aggregation: scSE aggregation(s); with several, each is its own variant ``scse_<agg>``.
        folds: patient-level folds (each held out once).
        seeds: training seeds; per patient, each variant's values are averaged over them.
        epochs: training epochs (``None``: the bundle's).
        features: channels per stage (``None``: the bundle's).
        kernel_size: convolution kernel size (``None``: the bundle's).
        dataset_config: ``bundle/configs/datasets/<name>.json``, e.g. ``chaos_mr_t2``.
        recipe: ``bundle/configs/recipes/<name>.json`` (``paper`` or ``report``).
        bundle_overrides: other bundle ids for every run.
        bundle_root: the bundle folder (default: the repository's ``bundle/``).
        progress: progress bar over runs.
        ensemble: also compare the variants as the shipped bundle predicts: each fold's mean-softmax ensemble of
            the seeds' networks (two or more seeds), scored and reported like the runs under ``OUT/ensemble/``.

    Returns:
        ``{"results_csv", "results_md", "per_case_csv", "seeds_csv", "figures", "rows", "trained", "skipped"}``;
        and ``"ensemble"``, the ensembles' report (the same keys but the counts), when ``ensemble`` is set.

    Raises:
        ExperimentError: invalid arguments, or ``out`` holds an experiment with another recipe.

    Example::

        >>> compare("prepared/datalist.json", "cmp", se=["none", "scse"], seeds=[0, 1])  # doctest: +SKIP
    """
    networks = _choices("networks", networks, list(NETWORKS))
    ses = _choices("se", se, SE_LAYER_NAMES)
    aggs = _choices("aggregation", aggregation, AGGREGATIONS)
    seeds = check_seeds(seeds)
    if ensemble and len(seeds) < 2:
        raise ExperimentError(f"--ensemble needs two or more --seeds, got {seeds}")
    for name, value in (("features", features), ("kernel-size", kernel_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ExperimentError(f"--{name} must be a positive integer, got {value!r}")
    if kernel_size is not None and kernel_size % 2 == 0:
        raise ExperimentError(f"--kernel-size must be odd (same padding), got {kernel_size}")
    overrides = {**({"features": features} if features else {}), **(bundle_overrides or {})}
    settings, folded = bundle_settings(datalist, folds, epochs, dataset_config, recipe, overrides, bundle_root)
    record = {"kind": "compare", "folds": folds, "kernel_size": kernel_size, **settings.record()}
    out, folded = open_experiment(out, record, settings, folded)
    variants = _runs(networks, ses, aggs, seeds, folds, out / "runs", kernel_size, settings.bundle_value("aggregation"))
    runs = [r for rs in variants.values() for r in rs]
    trained, skipped = run_all(runs, settings, folded, out / "compare.log", progress)
    result = report(out, variants, settings, folded)
    result.update({"trained": trained, "skipped": skipped})
    if ensemble:
        ens = {key: score_ensembles(out / "ensemble", rs, settings, folded, progress) for key, rs in variants.items()}
        what = f"mean-softmax ensembles scored (one per fold and variant, of the networks of seeds {list(seeds)})"
        result["ensemble"] = report(out / "ensemble", ens, settings, folded, what)
    return result


def _per_patient(rows: list[dict], organs: list[str]) -> dict[str, dict[str, float]]:
    """``{case: {organ or "mean": Dice averaged over seeds}}`` from heldout rows of one variant."""
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    out = {}
    for case, rs in by_case.items():
        vals = {o: float(np.nanmean([r[f"dice_{o}"] for r in rs])) for o in organs}
        vals["mean"] = float(np.nanmean([vals[o] for o in organs]))
        out[case] = vals
    return out


def report(
    out: Path, variants: dict[tuple[str, str], list[Run]], settings: BundleSettings, folded: dict, what: str = ""
) -> dict:
    """Writes the CSVs, the markdown page and the figures from the finished runs; ``what`` names them on the page
    (default: runs finished, and their seeds)."""
    organs = organ_keys(folded)
    rows_of = {
        key: [
            {**r, "network": key[0], "variant": key[1]}
            for run in runs
            if run.finished
            for r in read_heldout(run.heldout_csv)
        ]
        for key, runs in variants.items()
    }
    all_rows = [r for rs in rows_of.values() for r in rs]
    header = ["network", "variant", "seed", "fold", "case"]
    header += [f"{m}_{o}" for m in ("dice", "hd95", "volume_ratio") for o in organs]
    write_text_atomic(out / "per_case.csv", csv_text(header, all_rows))
    table = _common_patients({key: _per_patient(rs, organs) for key, rs in rows_of.items() if rs})
    rows = _summary_rows(table, organs, variants, settings)
    write_text_atomic(out / "results.csv", csv_text(list(rows[0]) if rows else ["network"], rows))
    seed_rows = _seed_rows(rows_of, organs)
    write_text_atomic(out / "seeds.csv", csv_text(list(seed_rows[0]) if seed_rows else ["network"], seed_rows))
    figs = _figures(out, variants, table, organs, folded)
    write_text_atomic(out / "results.md", _markdown(rows, seed_rows, organs, variants, settings, figs, what))
    return {
        "results_csv": str(out / "results.csv"),
        "results_md": str(out / "results.md"),
        "per_case_csv": str(out / "per_case.csv"),
        "seeds_csv": str(out / "seeds.csv"),
        "figures": [str(f) for f in figs],
        "rows": rows,
    }


def _common_patients(table: dict) -> dict:
    """Keeps, per network, the patients that every variant has scored: while runs are missing, the means and the
    paired differences are then over the same patients."""
    out = {}
    for net in dict.fromkeys(n for n, _ in table):
        keys = [k for k in table if k[0] == net]
        common = set.intersection(*(set(table[k]) for k in keys))
        out.update({k: {c: v for c, v in table[k].items() if c in common} for k in keys})
    return out


def _summary_rows(table, organs, variants, settings) -> list[dict]:
    rows = []
    for (net, variant), per_case in table.items():
        base = table.get((net, BASELINE))
        n_params = sum(p.numel() for p in variants[(net, variant)][0].build_network(settings).parameters())
        for organ in [*organs, "mean"]:
            cases = sorted(per_case)
            v = np.array([per_case[c][organ] for c in cases])
            row = {
                "network": net,
                "variant": variant,
                "organ": organ,
                "n_patients": int(np.isfinite(v).sum()),
                "mean": float(np.nanmean(v)),
                "std": float(np.nanstd(v, ddof=1)) if v.size > 1 else math.nan,
                "parameters": n_params,
            }
            diff = {
                "n": 0,
                "mean_difference": math.nan,
                "ci_low": math.nan,
                "ci_high": math.nan,
                "p_wilcoxon": math.nan,
                "n_improved": 0,
            }
            if base is not None and variant != BASELINE:
                common = sorted(set(cases) & set(base))
                diff = paired_difference([per_case[c][organ] for c in common], [base[c][organ] for c in common])
            rows.append({**row, **{f"{k}_vs_{BASELINE}": v for k, v in diff.items()}})
    return rows


def _seed_rows(rows_of: dict, organs: list[str]) -> list[dict]:
    """Per seed of each variant: mean Dice, the paired difference from the variant's first seed (the seed-to-seed
    spread) and the paired difference from ``none`` trained with the same seed (the SE effect within one seed)."""
    per_seed = {
        key: {s: _per_patient([r for r in rows if int(r["seed"]) == s], organs) for s in {int(r["seed"]) for r in rows}}
        for key, rows in rows_of.items()
    }

    def diff(a: dict, b: dict | None) -> dict:
        cases = sorted(set(a) & set(b or {}))
        if not cases:
            return {"mean_difference": math.nan, "ci_low": math.nan, "ci_high": math.nan}
        return paired_difference([a[c]["mean"] for c in cases], [b[c]["mean"] for c in cases])

    out = []
    for (net, variant), seeds in per_seed.items():
        for s in sorted(seeds):
            vs_seed = diff(seeds[s], seeds[min(seeds)])
            vs_none = diff(seeds[s], per_seed.get((net, BASELINE), {}).get(s)) if variant != BASELINE else None
            out.append(
                {
                    "network": net,
                    "variant": variant,
                    "seed": s,
                    "n_patients": len(seeds[s]),
                    "mean_dice": float(np.nanmean([v["mean"] for v in seeds[s].values()])),
                    "difference_vs_first_seed": vs_seed["mean_difference"],
                    "ci_low": vs_seed["ci_low"],
                    "ci_high": vs_seed["ci_high"],
                    f"difference_vs_{BASELINE}_same_seed": vs_none["mean_difference"] if vs_none else math.nan,
                    f"ci_low_vs_{BASELINE}_same_seed": vs_none["ci_low"] if vs_none else math.nan,
                    f"ci_high_vs_{BASELINE}_same_seed": vs_none["ci_high"] if vs_none else math.nan,
                }
            )
    return out


def _figures(out: Path, variants, table, organs: list[str], folded: dict) -> list[Path]:
    figs = []
    for net in dict.fromkeys(n for n, _ in table):
        sub = {v: t for (n, v), t in table.items() if n == net}
        figs.append(figures.dice_boxplot(sub, organs, net, out / f"dice_boxplot_{net}.png"))
        curves = {
            v: {r.fold: r.curves_csv for r in runs if r.seed == runs[0].seed and r.curves_csv.is_file()}
            for (n, v), runs in variants.items()
            if n == net
        }
        if any(curves.values()):
            figs.append(figures.training_curves(curves, net, out / f"training_curves_{net}.png"))
        figs += _overlays(out, net, variants, table, organs, folded)
    return figs


def _overlays(out: Path, net: str, variants, table, organs: list[str], folded: dict, n: int = 2) -> list[Path]:
    """The ``n`` patients whose mean Dice SE changes most (first scSE variant vs none; first seed's predictions)."""
    se_variant = next((v for (m, v) in table if m == net and v.startswith("scse")), None)
    base, var = table.get((net, BASELINE)), table.get((net, se_variant))
    if base is None or var is None:
        return []
    cases = sorted(set(base) & set(var), key=lambda c: -abs(var[c]["mean"] - base[c]["mean"]))[:n]
    items = {case_name(i["image"]): i for i in folded["training"]}
    paths = []
    for case in cases:
        preds = {}
        for v in (BASELINE, se_variant):
            run = next(r for r in variants[(net, v)] if r.fold == int(items[case]["fold"]))
            preds[f"{v} ({var[case]['mean'] if v != BASELINE else base[case]['mean']:.3f})"] = figures.load_ras(
                run.folder / "eval" / "pred" / f"{case}.nii.gz"
            )
        image, label = figures.load_ras(items[case]["image"]), figures.load_ras(items[case]["label"])
        a, b = preds.values()
        z = int(np.argmax((a != b).reshape(-1, a.shape[-1]).sum(0)))
        figs_in = {net: {k: p[..., z] for k, p in preds.items()}}
        paths.append(
            figures.label_overlay(
                image[..., z], label[..., z], figs_in, organs, case, out / f"overlay_{net}_{case}.png"
            )
        )
    return paths


def _seed_table(seed_rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Seeds: the seed-to-seed spread next to the SE effect (mean Dice over organs, paired by patient)",
        "",
        f"| network | variant | seed | mean Dice | vs first seed (95 % CI) | vs `{BASELINE}`, same seed (95 % CI) |",
        "|---|---|---:|---:|---|---|",
    ]
    for s in seed_rows:
        k = f"_vs_{BASELINE}_same_seed"
        same = f"{s['difference' + k]:+.4f} [{s['ci_low' + k]:+.4f}, {s['ci_high' + k]:+.4f}]"
        lines.append(
            f"| {s['network']} | {s['variant']} | {s['seed']} | {fmt(s['mean_dice'])} | "
            f"{s['difference_vs_first_seed']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}] | "
            f"{same if math.isfinite(s['difference' + k]) else '—'} |"
        )
    return lines


def _markdown(rows, seed_rows, organs, variants, settings: BundleSettings, figs, what: str) -> str:
    by = {(r["network"], r["variant"], r["organ"]): r for r in rows}
    nets = list(dict.fromkeys(n for n, _ in variants))
    vars_ = list(dict.fromkeys(v for _, v in variants))
    seeds = sorted({r.seed for rs in variants.values() for r in rs})
    done = sum(r.finished for rs in variants.values() for r in rs)
    total = sum(len(rs) for rs in variants.values())
    lines = [
        "# SE comparison (Table 1 layout)",
        "",
        f"{done} of {total} {what or f'runs finished; seeds {seeds}'}; every held-out patient predicted by its fold's "
        f"last-epoch weights and scored on the original grid. Recipe: the bundle's, configs "
        f"{settings.extra_configs}, overrides `{settings.overrides}`. Patients in the tables: "
        f"{', '.join(str(by[(n, vars_[0], 'mean')]['n_patients']) for n in nets if (n, vars_[0], 'mean') in by)} "
        "(those that every variant of the network has scored).",
        "",
        "## Mean Dice over organs (mean ± std over patients; each patient averaged over seeds)",
        "",
        "| network | " + " | ".join(vars_) + " | paper (MALC / VISCERAL) none → scSE |",
        "|---|" + "---:|" * len(vars_) + "---|",
    ]
    for n in nets:
        cells = [f"{fmt(r['mean'])} ± {fmt(r['std'])}" if (r := by.get((n, v, "mean"))) else "" for v in vars_]
        paper = f"{PAPER[(n, 'none')]} → {PAPER[(n, 'scse')]}" if (n, "none") in PAPER else "—"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {paper} |")
    lines += [
        "",
        f"## Paired difference vs `{BASELINE}` (per patient; 95 % bootstrap CI, 10,000 resamples; Wilcoxon)",
        "",
        "| network | variant | organ | mean difference | 95 % CI | p (Wilcoxon) | patients improved |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        if r["variant"] == BASELINE or not r[f"n_vs_{BASELINE}"]:
            continue
        k = f"_vs_{BASELINE}"
        lines.append(
            f"| {r['network']} | {r['variant']} | {r['organ'].replace('_', ' ')} | {r['mean_difference' + k]:+.4f} | "
            f"[{r['ci_low' + k]:+.4f}, {r['ci_high' + k]:+.4f}] | {fmt(r['p_wilcoxon' + k], 3)} | "
            f"{r['n_improved' + k]} / {r['n' + k]} |"
        )
    if len(seeds) > 1:  # with one seed (or one ensemble) per variant, the table would only repeat the one above
        lines += _seed_table(seed_rows)
    lines += ["", "## Per organ (mean ± std)", ""]
    lines += ["| network | variant | " + " | ".join(o.replace("_", " ") for o in organs) + " | parameters |"]
    lines += ["|---|---|" + "---:|" * (len(organs) + 1)]
    for n in nets:
        for v in vars_:
            if (n, v, "mean") in by:
                cells = [f"{fmt(by[(n, v, o)]['mean'])} ± {fmt(by[(n, v, o)]['std'])}" for o in organs]
                lines.append(f"| {n} | {v} | " + " | ".join(cells) + f" | {by[(n, v, 'mean')]['parameters']:,} |")
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figs] + [""]
    return "\n".join(lines)
