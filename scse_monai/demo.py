"""``make demo``: the bundle end to end on synthetic CHAOS-MR phantoms, offline, on CPU.

Synthetic patients (DICOM + PNG masks in the CHAOS layout) -> ``scse_monai.data prepare`` -> a short
training run of the bundle (``train.json``) -> evaluation on held-out patients (``evaluate.json``, printed as a
per-organ Dice table) -> segmentations of every synthetic volume (``inference.json``). Everything is written below
``--out`` (default ``runs/demo``), which the demo owns: its ``models/``, ``eval/`` and ``pred/`` are replaced on
every run, the synthetic ``data/`` is reused. A folder the demo did not create (it has no :data:`MARKER`) is used
only when it is empty.

Example::

    python -m scse_monai.demo --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundle"
#: written into ``--out`` by the demo: only a folder that has it is cleared on the next run
MARKER = ".scse_monai_demo"


def claim_out(out: Path) -> str | None:
    """Makes ``out`` the demo's folder; returns why it cannot be, or ``None``.

    ``out`` is claimed when it is absent or empty (the :data:`MARKER` is written) or already has the marker; then
    its ``models/``, ``eval/`` and ``pred/`` from an earlier run are removed. Any other folder is left untouched.
    """
    if out.exists() and not (out / MARKER).is_file():
        if not out.is_dir() or any(out.iterdir()):
            return f"--out {out} is not empty and was not made by the demo; pick a new or empty folder"
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for sub in ("models", "eval", "pred"):
        shutil.rmtree(out / sub, ignore_errors=True)
    return None


def _workflow(configs: list[Path], workflow_type: str | None, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(c) for c in configs],
        meta_file=str(BUNDLE_DIR / "configs" / "metadata.json"),
        logging_file=str(BUNDLE_DIR / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _print_table(path: Path, columns: list[str] | None = None) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"(no rows in {path})")
        return
    cols = [c for c in (columns or list(rows[0])) if c in rows[0]]
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(r[c].ljust(w) for c, w in zip(cols, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scse_monai.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="output folder, new or empty, or the demo's own from an earlier run: its models/, eval/ and pred/ are "
        "replaced (default runs/demo)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--features", type=int, default=16, help="SE-UNet base features (default 16)")
    parser.add_argument("--cases", type=int, default=8, help="synthetic patients (default 8)")
    args = parser.parse_args(argv)
    for name, least in (("epochs", 1), ("features", 1), ("cases", 4)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if not BUNDLE_DIR.is_dir():
        print(f"error: bundle folder {BUNDLE_DIR} not found (run the demo from a repo checkout)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    refused = claim_out(out)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2

    from scse_monai.data import ensure_synthetic_dataset

    t0 = time.perf_counter()
    data_dir = out / "data"
    datalist = ensure_synthetic_dataset(data_dir, layout="chaos-mr", cases=args.cases, seed=0)
    print(f"[demo] synthetic CHAOS-MR dataset: {_shown(datalist)} ({time.perf_counter() - t0:.1f} s)")

    cfg = BUNDLE_DIR / "configs"
    synthetic = cfg / "datasets" / "synthetic.json"
    common = {
        "bundle_root": str(BUNDLE_DIR),
        "dataset_dir": str(data_dir),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "features": args.features,
    }
    t1 = time.perf_counter()
    _workflow([cfg / "train.json", synthetic], "train", epochs=args.epochs, val_interval=1, **common)
    print(f"[demo] trained {args.epochs} epochs in {time.perf_counter() - t1:.1f} s; curves in {_shown(out / 'eval')}")
    print("[demo] training loss and validation mean Dice per epoch:")
    _print_table(out / "eval" / "training_curves.csv", ["epoch", "loss", "val_mean_dice"])

    _workflow([cfg / "train.json", synthetic, cfg / "evaluate.json"], None, **common)
    summary = sorted((out / "eval").glob("*summary*.csv"))
    print("[demo] per-organ Dice / Jaccard on held-out synthetic patients:")
    if summary:
        _print_table(summary[0])
    _workflow(
        [cfg / "inference.json", synthetic],
        "infer",
        bundle_root=str(BUNDLE_DIR),
        dataset_dir=str(data_dir),
        ckpt_path=str(out / "models" / "model.pt"),
        output_dir=str(out / "pred"),
        features=args.features,
    )
    print(f"[demo] segmentations written to {_shown(out / 'pred')}; total {time.perf_counter() - t0:.1f} s")
    return 0


def _shown(path: Path) -> Path:
    """``path`` relative to the working folder when it lies inside it (shorter, and the same on every machine)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


if __name__ == "__main__":
    sys.exit(main())
