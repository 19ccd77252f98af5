"""Table 1 of Roy et al. in one call: every network x SE variant x fold through the bundle, then statistics.

Output folder layout::

    OUT/settings.json                  settings shared by all runs (a re-run must match them)
    OUT/datalist.json                  the datalist with patient-level folds 0..K-1 (absolute paths)
    OUT/runs/<net>_<se>[_<agg>]/fold<k>/{models,eval,run.log}
    OUT/per_case.csv                   network, variant, fold, case, dice_<organ>...
    OUT/results.csv, OUT/results.md    mean ± std Dice, Wilcoxon p vs none, parameters
    OUT/dice_boxplot_<net>.png, OUT/training_curves_<net>.png, OUT/overlay.png
    OUT/compare.log                    which runs were trained, resumed or skipped
"""

from __future__ import annotations

import csv
import datetime
import inspect
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scse_monai.atomic import write_text_atomic
from scse_monai.experiments import figures
from scse_monai.experiments.runs import NETWORK_TARGETS, BundleSettings, Run
from scse_monai.experiments.stats import read_per_case, summarize

__all__ = ["SE_VARIANTS", "ExperimentError", "compare", "default_bundle_root"]

SE_VARIANTS = ("none", "cse", "sse", "scse")
AGGREGATIONS = ("max", "add", "mul", "concat")
BASELINE = "none"


class ExperimentError(ValueError):
    """Invalid arguments or an output folder that belongs to a different comparison."""


def default_bundle_root() -> Path:
    """The repository's ``bundle/`` folder (next to the ``scse_monai`` package)."""
    return Path(__file__).resolve().parents[2] / "bundle"


def _table_cell(row: dict | None, variant: str) -> str:
    """``mean ± std`` of one summary row, with the p-value against the baseline; empty when missing."""
    if row is None:
        return ""
    cell = f"{_fmt(row['mean'])} ± {_fmt(row['std'])}"
    if variant != BASELINE:
        cell += f" (p={_p(row[f'p_vs_{BASELINE}'])})"
    return cell


def _csv_text(header: Sequence[str], rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return buf.getvalue()


def _check_choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
    values = [v.strip().lower() for v in values if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ExperimentError(f"--{name}: {bad or 'empty'} not in {list(allowed)}")
    if len(set(values)) != len(values):
        raise ExperimentError(f"--{name}: repeated values in {values}")
    return values


def make_folds(datalist_file: Path, folds: int) -> dict:
    """The datalist with patient-level folds ``0..folds-1`` and absolute image/label paths.

    The prepared folds are kept when there are exactly ``folds`` of them; otherwise patients (ordered by their
    prepared fold, then id) are dealt round-robin into ``folds`` groups: every patient's volumes stay in one fold.

    Raises:
        ExperimentError: unreadable datalist, no training items, or fewer patients than folds.
    """
    try:
        meta = json.loads(Path(datalist_file).read_text())
    except FileNotFoundError:
        raise ExperimentError(f"--datalist {datalist_file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExperimentError(f"--datalist {datalist_file} is not a JSON datalist: {e}") from None
    items = meta.get("training") if isinstance(meta, dict) else None
    if not items or not all(isinstance(i, dict) and "image" in i and "label" in i for i in items):
        raise ExperimentError(f"--datalist {datalist_file}: no 'training' items with image and label")
    base = Path(datalist_file).resolve().parent
    patients: dict[str, int] = {}
    for item in items:
        patients.setdefault(str(item.get("patient", item["image"])), int(item.get("fold", 0)))
    if len(patients) < folds:
        raise ExperimentError(f"--folds {folds}: the datalist has only {len(patients)} patients")
    keep = sorted(set(patients.values())) == list(range(folds))
    order = sorted(patients, key=lambda p: (patients[p], p))
    new_fold = {p: (patients[p] if keep else i % folds) for i, p in enumerate(order)}
    out = dict(meta)
    out["folds"] = folds
    out["training"] = []
    for item in items:
        item = dict(item)
        for key in ("image", "label"):
            item[key] = str((base / item[key]).resolve())
        item["fold"] = new_fold[str(item.get("patient", item["image"]))]
        out["training"].append(item)
    return out


def _settings_check(path: Path, settings: dict) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ExperimentError(
                f"--out {path.parent} holds a comparison with other settings ({details}); "
                "use another --out or the same settings"
            )
    else:
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def _variant(se: str, aggregation: str | None, many_aggregations: bool) -> str:
    return f"{se}_{aggregation}" if aggregation and many_aggregations else se


def compare(
    datalist: str | Path,
    out: str | Path,
    networks: Sequence[str] = ("unet", "sdnet", "fcdensenet"),
    se: Sequence[str] = SE_VARIANTS,
    folds: int = 2,
    epochs: int = 10,
    aggregation: Sequence[str] = ("max",),
    features: int | None = None,
    kernel_size: int | None = None,
    roi_size: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = None,
    val_interval: int = 1,
    num_workers: int | None = None,
    dataset_config: str | None = None,
    recipe: str | None = None,
    checkpoint: str = "last",
    bundle_overrides: dict | None = None,
    bundle_root: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Trains and evaluates every network x SE variant x fold through the bundle and writes the comparison.

    Args:
        datalist: ``datalist.json`` of a prepared dataset (``python -m scse_monai.data prepare``).
        out: output folder (created; re-running with the same settings resumes, finished runs are skipped).
        networks: any of ``"unet"``, ``"sdnet"``, ``"fcdensenet"``.
        se: SE variants, any of ``"none"``, ``"cse"``, ``"sse"``, ``"scse"``; ``"none"`` is the baseline of
            the Wilcoxon tests.
        folds: number of patient-level folds K (>= 2); every fold is held out once.
        epochs: training epochs of every run.
        aggregation: scSE aggregations (each one a separate scSE variant ``scse_<agg>`` when several).
        features: channels of every stage (bundle default when ``None``).
        kernel_size: convolution kernel size; ``None``: each network's own default (SD-Net 7, others 5).
        roi_size: in-plane training/inference size ``[H, W]`` (bundle default when ``None``).
        pixdim: resampling spacing, ``-1`` keeps an axis (bundle default when ``None``).
        val_interval: validate on the held-out fold every N epochs (training curves).
        num_workers: data loader workers (bundle default when ``None``).
        dataset_config: a ``bundle/configs/datasets/<name>.json`` override (e.g. ``chaos_ct`` for the CT window).
        recipe: a ``bundle/configs/recipes/<name>.json`` override (``paper`` or ``report``).
        checkpoint: evaluate the ``"last"`` epoch (default; the held-out fold is never used to pick weights) or
            the ``"best"`` validation epoch (optimistic: picked on the evaluated fold).
        bundle_overrides: any other bundle ids for every run, e.g. ``{"loss#weight_power": 0.25}`` (applied
            last; recorded in ``settings.json`` like the rest).
        bundle_root: the bundle folder (default: the repository's ``bundle/``).
        progress: show a progress bar over runs.

    Returns:
        ``{"results_csv", "results_md", "trained", "skipped", "figures", ...}`` (paths and counts).

    Raises:
        ExperimentError: invalid arguments, or ``out`` holds a comparison with different settings.

    Example::

        >>> compare("prepared/datalist.json", "cmp", networks=["unet"], se=["none", "scse"], folds=2, epochs=3)
        ... # doctest: +SKIP
    """
    networks = _check_choices("networks", networks, list(NETWORK_TARGETS))
    ses = _check_choices("se", se, SE_VARIANTS)
    aggs = _check_choices("aggregation", aggregation, AGGREGATIONS)
    for name, value, low in (("folds", folds, 2), ("epochs", epochs, 1), ("val-interval", val_interval, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ExperimentError(f"--{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("features", features), ("kernel-size", kernel_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ExperimentError(f"--{name} must be a positive integer, got {value!r}")
    if kernel_size is not None and kernel_size % 2 == 0:
        raise ExperimentError(f"--kernel-size must be odd (same padding), got {kernel_size}")
    if roi_size is not None and (len(roi_size) != 2 or any(int(v) < 16 or int(v) % 16 for v in roi_size)):
        raise ExperimentError(f"--roi-size needs two multiples of 16 (4 poolings), got {list(roi_size)}")
    if pixdim is not None and (len(pixdim) != 3 or any(v == 0 for v in pixdim)):
        raise ExperimentError(f"--pixdim needs three spacings (-1 keeps an axis), got {list(pixdim)}")
    if checkpoint not in ("last", "best"):
        raise ExperimentError(f"--checkpoint must be 'last' or 'best', got {checkpoint!r}")
    if checkpoint == "best" and val_interval > epochs:
        raise ExperimentError(f"--checkpoint best needs validation: --val-interval {val_interval} > --epochs {epochs}")
    bundle_root = Path(bundle_root) if bundle_root else default_bundle_root()
    extra = []
    for kind, name in (("datasets", dataset_config), ("recipes", recipe)):
        if name:
            path = bundle_root / "configs" / kind / f"{name}.json"
            if not path.is_file():
                found = sorted(p.stem for p in (bundle_root / "configs" / kind).glob("*.json"))
                raise ExperimentError(f"--{kind[:-1].replace('dataset', 'dataset-config')} {name!r}: not in {found}")
            extra.append(f"{kind}/{name}.json")
    datalist = Path(datalist)
    folded = make_folds(datalist, folds)
    labels = folded.get("labels") or {}
    organs_all = [labels[k] for k in sorted(labels, key=int)][1:]
    if not organs_all:
        raise ExperimentError(f"--datalist {datalist}: no 'labels' map with foreground classes")

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "settings.json").is_file():
        raise ExperimentError(f"--out {out} is not empty and holds no comparison (settings.json); not writing there")
    out.mkdir(parents=True, exist_ok=True)

    overrides: dict = {"num_classes": len(labels), "in_channels": max(1, len(folded.get("modality") or {0: ""}))}
    for key, value in (("features", features), ("num_workers", num_workers)):
        if value is not None:
            overrides[key] = int(value)
    if roi_size is not None:
        overrides["roi_size"] = [int(v) for v in roi_size]
    if pixdim is not None:
        overrides["pixdim"] = [float(v) for v in pixdim]
    overrides["val_interval"] = val_interval
    for key, value in (bundle_overrides or {}).items():
        if not isinstance(key, str) or not key or key.startswith("#"):
            raise ExperimentError(f"--set: bad bundle id {key!r}")
        overrides[key] = value
    settings_record = {
        "datalist": str(datalist.resolve()),
        "folds": folds,
        "epochs": epochs,
        "kernel_size": kernel_size,
        "overrides": overrides,
        "extra_configs": extra,
        "checkpoint": checkpoint,
    }
    _settings_check(out / "settings.json", settings_record)
    folded_path = out / "datalist.json"
    if not folded_path.is_file():
        write_text_atomic(folded_path, json.dumps(folded, indent=1) + "\n")
    settings = BundleSettings(bundle_root, folded_path, epochs, overrides, extra, checkpoint)

    many_aggs = len(aggs) > 1
    runs: list[Run] = []
    variants: dict[tuple[str, str], list[Run]] = {}
    for net in networks:
        k = kernel_size or inspect.signature(_network_class(net)).parameters["kernel_size"].default
        for s in ses:
            for agg in aggs if s == "scse" else [None]:
                for fold in range(folds):
                    run = Run(net, s, agg, fold, out / "runs", int(k))
                    runs.append(run)
                    variants.setdefault((net, _variant(s, agg, many_aggs)), []).append(run)

    log_path = out / "compare.log"
    trained = skipped = 0
    start = time.perf_counter()
    bar = tqdm(runs, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") as log:

        def note(msg: str) -> None:
            log.write(f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} {msg}\n")
            log.flush()

        note(f"compare: {len(runs)} runs in {out}")
        for run in bar:
            bar.set_postfix_str(f"{run.name} fold {run.fold}")
            if run.finished:
                skipped += 1
                note(f"skip {run.name} fold {run.fold}: finished ({run.eval_csv.name} exists)")
                continue
            done = run.trained_epochs()
            note(f"{'resume' if done else 'train'} {run.name} fold {run.fold} at epoch {done}/{epochs}")
            t0 = time.perf_counter()
            run.train(settings, run.folder / "run.log")
            run.evaluate(settings, run.folder / "run.log")
            if not run.finished:
                raise RuntimeError(
                    f"{run.folder}: evaluation wrote no {run.eval_csv.name}; see {run.folder / 'run.log'}"
                )
            trained += 1
            note(f"done {run.name} fold {run.fold} in {time.perf_counter() - t0:.1f} s")
        note(f"compare: trained {trained}, skipped {skipped} finished runs, {time.perf_counter() - start:.1f} s")
    bar.close()

    result = _report(out, variants, settings, organs_all, ses, folded)
    result.update({"trained": trained, "skipped": skipped, "log": str(log_path)})
    return result


def _network_class(name: str):
    import scse_monai.networks as nets

    return getattr(nets, NETWORK_TARGETS[name].rsplit(".", 1)[1])


def _report(out: Path, variants: dict, settings: BundleSettings, organs_all: list[str], ses: list[str], folded: dict):
    per_case: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    case_rows, organs = [], None
    for (net, variant), runs in variants.items():
        table: dict[str, dict[str, float]] = {}
        for run in runs:
            organs_run, dice = read_per_case(run.eval_csv)
            organs = organs or organs_run
            for case, vals in dice.items():
                table[case] = vals
                case_rows.append(
                    {
                        "network": net,
                        "variant": variant,
                        "fold": run.fold,
                        "case": case,
                        **{f"dice_{o}": vals.get(o, math.nan) for o in organs},
                    }
                )
        per_case[(net, variant)] = table
    organs = organs or [o.replace(" ", "_") for o in organs_all]
    write_text_atomic(
        out / "per_case.csv",
        _csv_text(["network", "variant", "fold", "case", *[f"dice_{o}" for o in organs]], case_rows),
    )

    params: dict[tuple[str, str], int] = {}
    for key, runs in variants.items():
        params[key] = sum(p.numel() for p in runs[0].build_network(settings).parameters() if p.requires_grad)
    rows = summarize(per_case, organs, baseline=BASELINE)
    for r in rows:
        n = params[(r["network"], r["variant"])]
        base = params.get((r["network"], BASELINE))
        r["parameters"] = n
        r["parameters_added_percent"] = round(100.0 * (n - base) / base, 3) if base else math.nan
    header = [
        "network",
        "variant",
        "organ",
        "mean",
        "std",
        "median",
        "n_cases",
        f"p_vs_{BASELINE}",
        "n_pairs",
        "median_difference",
        "parameters",
        "parameters_added_percent",
        "note",
    ]
    write_text_atomic(out / "results.csv", _csv_text(header, rows))

    figs = []
    for net in dict.fromkeys(n for n, _ in variants):
        sub = {v: t for (n, v), t in per_case.items() if n == net}
        figs.append(str(figures.dice_boxplot(sub, organs, net, out / f"dice_boxplot_{net}.png")))
        curves = {
            v: {r.fold: r.curves_csv for r in runs if r.curves_csv.is_file()}
            for (n, v), runs in variants.items()
            if n == net
        }
        if any(curves.values()):
            figs.append(str(figures.training_curves(curves, net, out / f"training_curves_{net}.png")))
    overlay_note = ""
    scse_variants = [v for (_, v) in variants if v.startswith("scse")]
    if BASELINE in ses and scse_variants:
        figs.append(str(_overlay(out, variants, settings, organs, scse_variants)))
    else:
        overlay_note = "no overlay figure: it needs both 'none' and 'scse' in --se"
    md = _markdown(rows, organs, variants, settings, folded, figs, overlay_note)
    write_text_atomic(out / "results.md", md)
    return {
        "results_csv": str(out / "results.csv"),
        "results_md": str(out / "results.md"),
        "per_case_csv": str(out / "per_case.csv"),
        "figures": figs,
        "rows": rows,
    }


def _load_weights(run: Run, settings: BundleSettings) -> torch.nn.Module:
    net = run.build_network(settings)
    path = run.folder / "models" / "model.pt"
    if settings.checkpoint == "last" or not path.is_file():
        from scse_monai.checkpoints import latest_checkpoint

        path = latest_checkpoint(run.folder / "models")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # resume checkpoints hold {"model": ..., "optimizer": ..., ...}; model.pt holds the model's state dict
    net.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
    return net.eval()


def _overlay(out: Path, variants: dict, settings: BundleSettings, organs: list[str], scse_variants: list[str]) -> Path:
    """Fold-0 models of ``none`` and the scSE variant(s) on the first held-out case of fold 0, middle slice."""
    from monai.bundle import ConfigParser

    from scse_monai.experiments.runs import bundle_configs

    item = sorted(
        (i for i in json.loads(settings.datalist_file.read_text())["training"] if i["fold"] == 0),
        key=lambda i: i["image"],
    )[0]
    parser = ConfigParser()
    parser.read_config(bundle_configs(settings.bundle_root, settings.extra_configs))
    first = next(iter(variants.values()))[0]
    parser.update(first.overrides(settings))
    data = parser.get_parsed_content("validate#preprocessing")({"image": item["image"], "label": item["label"]})
    inferer = parser.get_parsed_content("validate#inferer")
    image = torch.as_tensor(data["image"])[None].float()
    label = np.asarray(data["label"])[0]
    z = int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(0)))  # slice with the most foreground
    preds: dict[str, dict[str, np.ndarray]] = {}
    for (net, variant), runs in variants.items():
        if variant != BASELINE and variant not in scse_variants:
            continue
        run = next(r for r in runs if r.fold == 0)
        model = _load_weights(run, settings)
        with torch.no_grad():
            logits = inferer(image, model)
        preds.setdefault(net, {})[variant] = logits.argmax(1)[0].numpy()[..., z]
    case = Path(item["image"]).name.split(".nii")[0]
    return figures.label_overlay(
        np.asarray(image[0, 0])[..., z], label[..., z], preds, organs, case, out / "overlay.png"
    )


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _p(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3g}")


def _markdown(rows, organs, variants, settings: BundleSettings, folded: dict, figs: list[str], overlay_note: str):
    nets = list(dict.fromkeys(n for n, _ in variants))
    vars_ = list(dict.fromkeys(v for _, v in variants))
    by = {(r["network"], r["variant"], r["organ"]): r for r in rows}
    n_cases = len(folded["training"])
    lines = [
        "# SE comparison (Table 1 style)",
        "",
        f"{n_cases} cases, {folded['folds']} patient-level folds (each held out once), {settings.epochs} epochs per "
        f"run, evaluated weights: {settings.checkpoint} epoch. Bundle overrides: "
        f"`{json.dumps(settings.overrides)}`"
        + (f", configs {settings.extra_configs}" if settings.extra_configs else "")
        + ".",
        "",
        "## Mean Dice over organs (mean ± std over cases; p: Wilcoxon signed-rank vs `none`, paired by case)",
        "",
        "| variant | " + " | ".join(nets) + " |",
        "|---|" + "---:|" * len(nets),
    ]
    for v in vars_:
        cells = [_table_cell(by.get((n, v, "mean")), v) for n in nets]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "## Per organ", ""]
    for n in nets:
        lines += [
            f"### {n}",
            "",
            "| variant | " + " | ".join(o.replace("_", " ") for o in organs) + " |",
            "|---|" + "---:|" * len(organs),
        ]
        for v in vars_:
            cells = [_table_cell(by.get((n, v, o)), v) for o in organs]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Parameters", "", "| network | variant | parameters | added % vs none |", "|---|---|---:|---:|"]
    for n in nets:
        for v in vars_:
            r = by.get((n, v, "mean"))
            if r:
                lines.append(f"| {n} | {v} | {r['parameters']:,} | {_fmt(r['parameters_added_percent'], 2)} |")
    notes = sorted(
        {
            f"{r['network']} {r['variant']} {r['organ']}: {r['note']}"
            for r in rows
            if r["note"] and r["note"] != "baseline"
        }
    )
    lines += ["", "## Notes", ""]
    lines += [f"- {x}" for x in notes] or ["- none"]
    if overlay_note:
        lines.append(f"- {overlay_note}")
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figs] + [""]
    return "\n".join(lines)
