"""``python -m scse_monai.experiments {crossval,compare} ...``: cross-validate the bundle, or compare SE variants."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from scse_monai.blocks import AGGREGATIONS, SE_LAYER_NAMES
from scse_monai.errors import input_error_in
from scse_monai.experiments.compare import compare
from scse_monai.experiments.crossval import crossval
from scse_monai.experiments.runs import TrainingFailed
from scse_monai.experiments.setup import ExperimentError
from scse_monai.networks.registry import NETWORKS


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _bundle_override(text: str) -> tuple[str, object]:
    """``ID=VALUE`` -> ``(ID, VALUE)``; VALUE is read as JSON (``0.25``, ``[2, 2, -1]``, ``true``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected ID=VALUE (e.g. features=16), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datalist", required=True, help="datalist.json of a prepared dataset")
    p.add_argument("--out", required=True, help="output folder (run again with the same settings to resume)")
    p.add_argument("--folds", type=int, default=4, help="patient-level folds, each held out once (default 4)")
    p.add_argument("--seeds", type=_int_list, default=[0], help="training seeds, e.g. 0,1 (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="default: the bundle's")
    p.add_argument("--dataset-config", default=None, help="bundle/configs/datasets/<name>.json, e.g. chaos_mr_t2")
    p.add_argument(
        "--set",
        dest="bundle_overrides",
        type=_bundle_override,
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="any other bundle override for every run, VALUE as JSON, e.g. --set features=16",
    )
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scse_monai.experiments",
        description="Train the bundle on patient-level folds and score every held-out patient with its fold's "
        "last-epoch weights: cross-validation of the shipped recipe, or a paired comparison of SE variants.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cv = sub.add_parser("crossval", help="cross-validate the bundle's recipe (resumable)")
    _common(cv)
    cv.add_argument("--network", choices=list(NETWORKS), default="unet")
    cv.add_argument("--se", choices=list(SE_LAYER_NAMES), default="scse")
    cv.add_argument(
        "--ensemble",
        action="store_true",
        help="also score each fold's mean-softmax ensemble of the seeds (as shipped); report in OUT/ensemble/",
    )
    c = sub.add_parser("compare", help="compare SE variants, paired by patient (resumable)")
    _common(c)
    c.add_argument("--networks", type=_csv_list, default=["unet"], help=",".join(NETWORKS))
    c.add_argument("--se", type=_csv_list, default=["none", "scse"], help=",".join(SE_LAYER_NAMES))
    c.add_argument("--aggregation", type=_csv_list, default=["max"], help=",".join(AGGREGATIONS))
    c.add_argument("--features", type=int, default=None, help="channels per stage (default: the bundle's)")
    c.add_argument("--kernel-size", type=int, default=None, help="default: the bundle's")
    c.add_argument("--recipe", default=None, help="bundle/configs/recipes/<name>.json: paper or report")
    c.add_argument(
        "--ensemble",
        action="store_true",
        help="also compare each variant's per-fold mean-softmax ensemble of the seeds (as shipped); in OUT/ensemble/",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = {
        "datalist": args.datalist,
        "out": args.out,
        "folds": args.folds,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "dataset_config": args.dataset_config,
        "bundle_overrides": dict(args.bundle_overrides),
        "progress": not args.no_progress,
    }
    try:
        if args.command == "crossval":
            result, unit = crossval(network=args.network, se=args.se, ensemble=args.ensemble, **common), "folds"
        else:
            result = compare(
                networks=args.networks,
                se=args.se,
                aggregation=args.aggregation,
                features=args.features,
                kernel_size=args.kernel_size,
                recipe=args.recipe,
                ensemble=args.ensemble,
                **common,
            )
            unit = "runs"
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:  # the log has the child's traceback; finished runs are kept for a resume
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bad volume found while scoring (MONAI wraps the InputError): one line, not a traceback
        if (error := input_error_in(e)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"trained {result['trained']} {unit}, skipped {result['skipped']} finished {unit}")
    for report in [result, result["ensemble"]] if args.ensemble else [result]:
        # a report's files are its *_md and *_csv entries
        print("written: " + ", ".join(v for k, v in report.items() if k.endswith(("_md", "_csv"))))
        for f in report["figures"]:
            print(f"figure: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
