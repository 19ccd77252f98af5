"""What every experiment does first: check the output folder, fold the datalist by patient, record settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

from scse_monai.atomic import write_text_atomic
from scse_monai.data.datalist import read_datalist
from scse_monai.experiments.runs import BundleSettings, Run, bundle_configs

__all__ = ["ExperimentError", "bundle_settings", "check_seeds", "default_bundle_root", "make_folds", "open_experiment"]


class ExperimentError(ValueError):
    """Invalid arguments or an output folder that belongs to a different experiment."""


def default_bundle_root() -> Path:
    """The repository's ``bundle/`` folder (next to the ``scse_monai`` package)."""
    return Path(__file__).resolve().parents[2] / "bundle"


def make_folds(datalist_file: str | Path, folds: int) -> dict:
    """The datalist with patient-level folds ``0..folds-1`` and absolute image/label paths (:func:`read_datalist`).

    The prepared folds are kept when there are exactly ``folds`` of them; otherwise patients (ordered by their
    prepared fold, then id) are dealt round-robin into ``folds`` groups: every patient's volumes stay in one fold.

    Raises:
        ExperimentError: unreadable datalist, no training items, a listed file missing, a fold that is not an
            integer, or fewer patients than folds.
    """
    try:
        meta = read_datalist(datalist_file, absolute=True)
    except (FileNotFoundError, ValueError) as e:
        raise ExperimentError(str(e)) from None
    items = meta.get("training")
    if not items or not all(isinstance(i, dict) and "image" in i and "label" in i for i in items):
        raise ExperimentError(f"--datalist {datalist_file}: no 'training' items with image and label")
    _check_items(items, datalist_file)
    patients: dict[str, int] = {}
    for item in items:
        patients.setdefault(str(item.get("patient", item["image"])), item.get("fold", 0))
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
        item["fold"] = new_fold[str(item.get("patient", item["image"]))]
        out["training"].append(item)
    return out


def _check_items(items: list[dict], datalist_file: str | Path) -> None:
    """Every listed image and label exists and every ``fold`` is an integer, checked before any run starts."""
    missing = [str(i[k]) for i in items for k in ("image", "label") if not Path(i[k]).is_file()]
    if missing:
        raise ExperimentError(
            f"--datalist {datalist_file}: {len(missing)} of the listed files do not exist, e.g. {missing[0]}"
        )
    bad = [i["fold"] for i in items if "fold" in i and (isinstance(i["fold"], bool) or not isinstance(i["fold"], int))]
    if bad:
        raise ExperimentError(f"--datalist {datalist_file}: folds must be integers, found {bad[0]!r}")


def check_seeds(seeds) -> list[int]:
    """Distinct integer seeds, at least one."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ExperimentError(f"--seeds must be distinct integers, got {seeds}")
    return seeds


def check_out(out: str | Path) -> Path:
    """Creates ``out``; refuses a file, or a non-empty folder that holds no experiment (``settings.json``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "settings.json").is_file():
        raise ExperimentError(f"--out {out} is not empty and holds no experiment (settings.json); not writing there")
    out.mkdir(parents=True, exist_ok=True)
    return out


def settings_check(path: Path, settings: dict) -> None:
    """Writes ``settings`` to ``path``, or checks that they equal the recorded ones (a resume)."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise ExperimentError(f"--out {path.parent}: {path.name} is not a JSON object; use another --out")
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ExperimentError(
                f"--out {path.parent} holds an experiment with other settings ({details}); "
                "use another --out or the same settings"
            )
    else:
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def bundle_settings(
    datalist: str | Path,
    folds: int,
    epochs: int | None,
    dataset_config: str | None,
    recipe: str | None,
    bundle_overrides: dict | None,
    bundle_root: str | Path | None,
) -> tuple[BundleSettings, dict]:
    """Checks the arguments and folds the datalist by patient; writes nothing.

    Returns:
        the run settings (``epochs`` is the bundle's when not given; ``datalist_file`` is set by
        :func:`open_experiment`) and the folded datalist.

    Raises:
        ExperimentError: an argument is invalid.
    """
    for name, value, low in (("folds", folds, 2), ("epochs", epochs, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ExperimentError(f"--{name} must be an integer >= {low}, got {value!r}")
    bundle_root = Path(bundle_root) if bundle_root else default_bundle_root()
    extra = []
    for kind, name in (("datasets", dataset_config), ("recipes", recipe)):
        if name:
            path = bundle_root / "configs" / kind / f"{name}.json"
            if not path.is_file():
                found = sorted(p.stem for p in (bundle_root / "configs" / kind).glob("*.json"))
                raise ExperimentError(f"--{kind[:-1].replace('dataset', 'dataset-config')} {name!r}: not in {found}")
            extra.append(f"{kind}/{name}.json")
    folded = make_folds(datalist, folds)
    labels = folded.get("labels") or {}
    if len(labels) < 2:
        raise ExperimentError(f"--datalist {datalist}: no 'labels' map with foreground classes")
    overrides: dict = {"num_classes": len(labels), "in_channels": max(1, len(folded.get("modality") or {0: ""}))}
    overrides.update(_checked_overrides(bundle_overrides or {}, bundle_root, extra))
    settings = BundleSettings(bundle_root, Path(), epochs, overrides, extra, str(datalist))
    if epochs is None:  # recorded as a number, so a resume cannot follow a changed bundle default
        settings.epochs = int(settings.bundle_value("epochs"))
    return settings, folded


def _checked_overrides(bundle_overrides: dict, bundle_root: Path, extra: list[str]) -> dict:
    """``bundle_overrides`` whose ids all exist in the bundle's configs (a mistyped id would be silently unused)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle_root, extra))
    controlled = Run.controlled_ids()
    for key in bundle_overrides:
        if not isinstance(key, str) or not key or key.startswith("#"):
            raise ExperimentError(f"--set: bad bundle id {key!r}")
        if key.split("#")[0] in controlled:
            raise ExperimentError(
                f"--set {key}: each run sets it (held-out fold, seed, SE variant, network, paths); use the "
                "experiment's own options (--folds, --seeds, --se, --network, --epochs, ...)"
            )
        if key not in parser:
            raise ExperimentError(
                f"--set {key}: no such id in the bundle's configs ({', '.join(['train.json', *extra])})"
            )
    return dict(bundle_overrides)


def open_experiment(out: str | Path, record: dict, settings: BundleSettings, folded: dict) -> tuple[Path, dict]:
    """Creates or resumes ``out``: checks the recorded settings; the folds are written once (``out/datalist.json``,
    paths relative to ``out``) and read back on every resume, so a resumed experiment keeps its patients' folds.

    Returns:
        ``out`` and the folded datalist with absolute paths.
    """
    out = check_out(out)
    settings_check(out / "settings.json", record)
    settings.datalist_file = out / "datalist.json"
    if settings.datalist_file.is_file():
        return out, read_datalist(settings.datalist_file, absolute=True)
    rel = [{**i, **{k: os.path.relpath(i[k], out.resolve()) for k in ("image", "label")}} for i in folded["training"]]
    write_text_atomic(settings.datalist_file, json.dumps({**folded, "training": rel}, indent=1) + "\n")
    return out, folded
