"""``python -m scse_monai.experiments compare ...``: train and compare SE variants through the bundle."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from scse_monai.experiments.compare import AGGREGATIONS, SE_VARIANTS, ExperimentError, compare
from scse_monai.experiments.runs import NETWORK_TARGETS


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _bundle_override(text: str) -> tuple[str, object]:
    """``ID=VALUE`` -> ``(ID, VALUE)``; VALUE is read as JSON (``0.25``, ``[2, 2, -1]``, ``true``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected ID=VALUE (e.g. loss#weight_power=0.25), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scse_monai.experiments",
        description="Reproduce Table 1 of Roy et al.: train every network x SE variant on patient-level folds "
        "through the bundle, then write Dice tables, Wilcoxon tests, parameter counts and figures.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="train, evaluate and compare (resumable)")
    c.add_argument("--datalist", required=True, help="datalist.json of a prepared dataset")
    c.add_argument("--out", required=True, help="output folder (re-run with the same settings to resume)")
    c.add_argument("--networks", type=_csv_list, default=list(NETWORK_TARGETS), help=",".join(NETWORK_TARGETS))
    c.add_argument("--se", type=_csv_list, default=list(SE_VARIANTS), help=",".join(SE_VARIANTS))
    c.add_argument(
        "--aggregation", type=_csv_list, default=["max"], help="scSE aggregation(s): " + ",".join(AGGREGATIONS)
    )
    c.add_argument("--folds", type=int, default=2, help="patient-level folds K (each held out once)")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--features", type=int, default=None, help="channels per stage (bundle default 32; paper 64)")
    c.add_argument("--kernel-size", type=int, default=None, help="default: each network's own (SD-Net 7, else 5)")
    c.add_argument("--roi-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    c.add_argument("--pixdim", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="-1 keeps an axis")
    c.add_argument("--val-interval", type=int, default=1, help="validate every N epochs (training curves)")
    c.add_argument("--num-workers", type=int, default=None)
    c.add_argument("--dataset-config", default=None, help="bundle/configs/datasets/<name>.json, e.g. chaos_ct")
    c.add_argument("--recipe", default=None, help="bundle/configs/recipes/<name>.json: paper or report")
    c.add_argument(
        "--checkpoint",
        choices=("last", "best"),
        default="last",
        help="evaluate the last epoch (default) or the best validation epoch (optimistic)",
    )
    c.add_argument(
        "--set",
        dest="bundle_overrides",
        type=_bundle_override,
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="any other bundle override for every run, VALUE as JSON, e.g. --set loss#weight_power=0.25",
    )
    c.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = compare(
            datalist=args.datalist,
            out=args.out,
            networks=args.networks,
            se=args.se,
            folds=args.folds,
            epochs=args.epochs,
            aggregation=args.aggregation,
            features=args.features,
            kernel_size=args.kernel_size,
            roi_size=args.roi_size,
            pixdim=args.pixdim,
            val_interval=args.val_interval,
            num_workers=args.num_workers,
            dataset_config=args.dataset_config,
            recipe=args.recipe,
            checkpoint=args.checkpoint,
            bundle_overrides=dict(args.bundle_overrides),
            progress=not args.no_progress,
        )
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {result['trained']} runs, skipped {result['skipped']} finished runs")
    print(f"written: {result['results_md']}, {result['results_csv']}, {result['per_case_csv']}")
    for f in result["figures"]:
        print(f"figure: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
