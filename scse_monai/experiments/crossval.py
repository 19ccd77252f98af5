"""Patient-level cross-validation of the bundle: the one number the model card reports.

Each fold is trained through the bundle's own configs (``train.json`` + a dataset config), and every held-out
patient is predicted with that fold's **last-epoch** weights, so no held-out patient chooses anything. The
prediction is the bundle's inference (``inference.json``: preprocessing, ``SliceInferer``, ``Invertd`` back to
the original grid, largest component per organ); it is scored on the original grid against the original label.

Output folder layout::

    OUT/settings.json, OUT/datalist.json       what a re-run must match; the folds (paths relative to OUT)
    OUT/runs/<net>_<se>/seed<s>/fold<k>/       models/, eval/{heldout.csv, pred/<case>.nii.gz}, run.log
    OUT/crossval_per_patient.csv               seed, fold, case, dice_*, hd95_*, volume_ratio_* per patient
    OUT/crossval.md, OUT/crossval_summary.csv  per organ mean ± std, median volume ratio
    OUT/crossval_dice_boxplot.png, OUT/worst_<case>.png
    OUT/ensemble/                              with --ensemble: the same report for each fold's mean-softmax
                                               ensemble of the seeds (runs/seeds<s1>-<s2>/<net>_<se>/seed<s1>/fold<k>)
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from scse_monai.atomic import write_text_atomic
from scse_monai.blocks import SE_LAYER_NAMES
from scse_monai.experiments import figures
from scse_monai.experiments.heldout import case_name, organ_keys, read_heldout, score_heldout
from scse_monai.experiments.runs import BundleSettings, Run
from scse_monai.experiments.setup import ExperimentError, bundle_settings, check_seeds, open_experiment
from scse_monai.networks.registry import NETWORKS

__all__ = ["crossval"]

METRICS = ("dice", "hd95", "volume_ratio")


def crossval(
    datalist: str | Path,
    out: str | Path,
    folds: int = 4,
    seeds: Sequence[int] = (0,),
    network: str = "unet",
    se: str = "scse",
    epochs: int | None = None,
    dataset_config: str | None = None,
    bundle_overrides: dict | None = None,
    bundle_root: str | Path | None = None,
    progress: bool = True,
    ensemble: bool = False,
) -> dict:
    """Trains every (seed, fold) through the bundle, scores the held-out patients, writes the report.

    Re-running with the same settings resumes: finished folds are skipped, a killed training resumes from its
    latest checkpoint.

    Args:
        datalist: ``datalist.json`` of a prepared dataset; its folds are used when there are ``folds`` of them.
        out: output folder.
        folds: number of patient-level folds (each held out once).
        seeds: training seeds (each seed trains every fold).
        network: ``"unet"``, ``"sdnet"`` or ``"fcdensenet"``.
        se: ``"none"``, ``"cse"``, ``"sse"`` or ``"scse"``.
        epochs: training epochs (``None``: the bundle's own).
        dataset_config: ``bundle/configs/datasets/<name>.json`` (e.g. ``chaos_mr_t2``).
        bundle_overrides: other bundle ids for every run, e.g. ``{"features": 16}``.
        bundle_root: the bundle folder (default: the repository's ``bundle/``).
        progress: show a progress bar over runs.
        ensemble: also score each fold's mean-softmax ensemble of the seeds' networks (two or more seeds), as
            the shipped bundle predicts, and report it under ``OUT/ensemble/``.

    Returns:
        ``{"per_patient_csv", "summary_csv", "crossval_md", "figures", "summary", "n_patients", "trained",
        "skipped"}``; and ``"ensemble"``, the ensemble's report (the same keys but the counts), when ``ensemble`` is
        set.

    Example::

        >>> crossval("prepared/chaos_mr_t2/datalist.json", "cv", folds=4, dataset_config="chaos_mr_t2")
        ... # doctest: +SKIP
    """
    if network not in NETWORKS or se not in SE_LAYER_NAMES:
        raise ExperimentError(f"--network {network!r} / --se {se!r}: not in {list(NETWORKS)} / {SE_LAYER_NAMES}")
    seeds = check_seeds(seeds)
    if ensemble and len(seeds) < 2:
        raise ExperimentError(f"--ensemble needs two or more --seeds, got {seeds}")
    settings, folded = bundle_settings(datalist, folds, epochs, dataset_config, None, bundle_overrides, bundle_root)
    record = {"kind": "crossval", "folds": folds, "network": network, "se": se, **settings.record()}
    out, folded = open_experiment(out, record, settings, folded)
    runs = [Run(network, se, None, k, out / "runs", seed=s) for s in seeds for k in range(folds)]
    trained, skipped = run_all(runs, settings, folded, out / "crossval.log", progress)
    result = report(out, runs, folded)
    result.update({"trained": trained, "skipped": skipped})
    if ensemble:
        members = score_ensembles(out / "ensemble", runs, settings, folded, progress)
        result["ensemble"] = report(out / "ensemble", members, folded, f"mean-softmax ensemble of seeds {seeds}")
    return result


def score_ensembles(out: Path, runs: list[Run], settings: BundleSettings, folded: dict, progress: bool) -> list[Run]:
    """Scores, per fold whose seeds have all finished, the mean-softmax ensemble of their last-epoch networks.

    Each ensemble is scored like one run, in ``out/runs/seeds<s1>-<s2>.../`` under the first seed's name (so that
    another set of seeds is scored anew); a scored fold is skipped.
    """
    scored = []
    for fold in sorted({r.fold for r in runs}):
        members = [r for r in runs if r.fold == fold]
        if not all(r.finished for r in members):
            continue
        first, root = members[0], out / "runs" / ("seeds" + "-".join(str(r.seed) for r in members))
        ens = Run(first.network, first.se, first.aggregation, fold, root, first.kernel_size, first.seed)
        if not ens.finished:
            score_heldout(ens, settings, folded, progress, members=members)
        scored.append(ens)
    return scored


def run_all(runs: list[Run], settings: BundleSettings, folded: dict, log_path: Path, progress: bool) -> tuple[int, int]:
    """Trains (or resumes) and scores every unfinished run, in order; returns ``(trained, skipped)``.

    Each step is logged with its wall time and the number of torch threads to ``log_path``.
    """
    import torch

    epochs = settings.epochs
    trained = skipped = 0
    bar = tqdm(runs, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") as log:
        for run in bar:
            bar.set_postfix_str(f"{run.name} seed {run.seed} fold {run.fold}")
            if run.finished:
                skipped += 1
                continue
            t0 = time.perf_counter()
            _note(log, f"train {run.name} seed {run.seed} fold {run.fold} from epoch {run.trained_epochs()}/{epochs}")
            run.train(settings, epochs)
            score_heldout(run, settings, folded)
            trained += 1
            _note(
                log,
                f"done {run.name} seed {run.seed} fold {run.fold} in {time.perf_counter() - t0:.0f} s "
                f"({torch.get_num_threads()} threads)",
            )
    bar.close()
    return trained, skipped


def _note(log, msg: str) -> None:
    log.write(f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} {msg}\n")
    log.flush()


def report(out: Path, runs: list[Run], folded: dict, predictor: str = "") -> dict:
    """Per-patient CSV, summary CSV and markdown, Dice box plot and overlays of the 3 worst patients.

    ``predictor`` names what predicted when it is not each run's own network (e.g. an ensemble of seeds)."""
    organs = organ_keys(folded)
    rows = [r for run in runs if run.finished for r in read_heldout(run.heldout_csv)]
    for r in rows:
        r["dice_mean"] = float(np.nanmean([r[f"dice_{o}"] for o in organs]))
    header = ["seed", "fold", "case", "patient", "dice_mean"]
    header += [f"{m}_{o}" for m in METRICS for o in organs]
    write_text_atomic(out / "crossval_per_patient.csv", csv_text(header, rows))
    summary = _summary(rows, organs)
    write_text_atomic(out / "crossval_summary.csv", csv_text(list(summary[0]), summary))
    figs = []
    if rows:
        table = {
            predictor or f"seed {s}": {r["case"]: {o: r[f"dice_{o}"] for o in organs} for r in rows if r["seed"] == s}
            for s in sorted({r["seed"] for r in rows})
        }
        figs.append(figures.dice_boxplot(table, organs, "cross-validated Dice", out / "crossval_dice_boxplot.png"))
        figs += _worst_overlays(out, runs, rows, folded, organs)
    md = _markdown(rows, summary, organs, runs, figs, predictor)
    write_text_atomic(out / "crossval.md", md)
    return {
        "per_patient_csv": str(out / "crossval_per_patient.csv"),
        "summary_csv": str(out / "crossval_summary.csv"),
        "crossval_md": str(out / "crossval.md"),
        "figures": [str(f) for f in figs],
        "summary": summary,
        "n_patients": len({r["case"] for r in rows}),
    }


def csv_text(header: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: (f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else "" if isinstance(v, float) else v)
                for k, v in r.items()
            }
        )
    return buf.getvalue()


def _summary(rows: list[dict], organs: list[str]) -> list[dict]:
    """Per organ (and the mean over organs): Dice mean ± std, HD95 mean and median, median volume ratio."""
    out = []
    for organ in [*organs, "mean"]:
        dice = np.array([r[f"dice_{organ}"] for r in rows], dtype=float)
        hd = np.array([r.get(f"hd95_{organ}", math.nan) for r in rows], dtype=float)
        vol = np.array([r.get(f"volume_ratio_{organ}", math.nan) for r in rows], dtype=float)
        if organ == "mean":
            hd = np.array([np.nanmean([r[f"hd95_{o}"] for o in organs]) for r in rows], dtype=float)
        out.append(
            {
                "organ": organ,
                "n": int(np.isfinite(dice).sum()),
                "dice_mean": _nan(np.nanmean, dice),
                "dice_std": _nan(lambda a: np.nanstd(a, ddof=1), dice),
                "dice_min": _nan(np.nanmin, dice),
                "hd95_mean_mm": _nan(np.nanmean, hd),
                "hd95_median_mm": _nan(np.nanmedian, hd),
                "volume_ratio_median": _nan(np.nanmedian, vol) if organ != "mean" else math.nan,
            }
        )
    return out


def _nan(f, a: np.ndarray) -> float:
    """``f`` of the finite values of ``a``; NaN when there are none (or when ``f`` is undefined for them)."""
    a = a[np.isfinite(a)]
    with np.errstate(all="ignore"):
        return float(f(a)) if a.size else math.nan


def _worst_overlays(out: Path, runs: list[Run], rows: list[dict], folded: dict, organs: list[str]) -> list[Path]:
    """Image, truth and prediction of the 3 patients with the lowest mean Dice (first seed), on the slice where
    prediction and truth disagree most."""
    first = min(r["seed"] for r in rows)
    worst = sorted((r for r in rows if r["seed"] == first), key=lambda r: r["dice_mean"])[:3]
    images = {case_name(i["image"]): i for i in folded["training"]}
    paths = []
    for r in worst:
        run = next(x for x in runs if x.seed == r["seed"] and x.fold == int(r["fold"]))
        item = images[r["case"]]
        image, label = figures.load_ras(item["image"]), figures.load_ras(item["label"])
        pred = figures.load_ras(run.folder / "eval" / "pred" / f"{r['case']}.nii.gz")
        z = int(np.argmax((pred != label).reshape(-1, label.shape[-1]).sum(0)))
        title = f"{r['case']} (mean Dice {r['dice_mean']:.3f})"
        paths.append(
            figures.label_overlay(
                image[..., z],
                label[..., z],
                {f"fold {r['fold']}": {"prediction": pred[..., z]}},
                organs,
                title,
                out / f"worst_{r['case']}.png",
            )
        )
    return paths


def _markdown(
    rows: list[dict], summary: list[dict], organs: list[str], runs: list[Run], figs: list[Path], predictor: str = ""
) -> str:
    seeds = sorted({r.seed for r in runs})
    done = sum(r.finished for r in runs)
    by = f"the {predictor} (rows carry the first seed)" if predictor else "the last-epoch weights"
    lines = [
        f"# Cross-validation{': ' + predictor if predictor else ''}",
        "",
        f"{len({r['case'] for r in rows})} held-out patients, {done} of {len(runs)} folds finished"
        f"{'' if predictor else f' (seeds {seeds})'}; every patient predicted by {by} of the fold that held it out, "
        "scored on the original grid.",
        "",
        "| organ | Dice mean ± std | min | HD95 mean (mm) | HD95 median (mm) | median volume pred/true |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        name = s["organ"].replace("_", " ")
        lines.append(
            f"| {'**mean**' if name == 'mean' else name} | {fmt(s['dice_mean'])} ± {fmt(s['dice_std'])} | "
            f"{fmt(s['dice_min'])} | {fmt(s['hd95_mean_mm'], 1)} | {fmt(s['hd95_median_mm'], 1)} | "
            f"{fmt(s['volume_ratio_median'], 2)} |"
        )
    lines += ["", "## Per patient (Dice; volume pred/true in brackets)", ""]
    lines += ["| seed | fold | case | " + " | ".join(o.replace("_", " ") for o in organs) + " | mean |"]
    lines += ["|---:|---:|---|" + "---:|" * (len(organs) + 1)]
    for r in sorted(rows, key=lambda r: (r["seed"], r["case"])):
        cells = [f"{fmt(r[f'dice_{o}'])} ({fmt(r[f'volume_ratio_{o}'], 2)})" for o in organs]
        lines.append(
            f"| {int(r['seed'])} | {int(r['fold'])} | {r['case']} | "
            + " | ".join(cells)
            + f" | {fmt(r['dice_mean'])} |"
        )
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figs] + [""]
    return "\n".join(lines)


def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"
