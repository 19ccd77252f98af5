"""``python -m scse_monai.data {prepare,synthesize,preview}``: one line on stderr for every expected failure.

Bad input exits with code 2; a failing disk or file system (full, read-only) with code 1. No traceback either way.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .errors import DataPreparationError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scse_monai.data",
        description="Prepare CHAOS / VISCERAL as distributed into NIfTI + datalist.json, write synthetic phantoms in "
        "those native layouts, and preview prepared cases. Bad input: one-line error, exit code 2.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="convert a dataset in its native layout to NIfTI + datalist.json")
    psub = prep.add_subparsers(dest="dataset", required=True)
    for name, helptext in (("chaos", "CHAOS Train_Sets (DICOM + PNG masks)"), ("visceral", "VISCERAL Anatomy3")):
        q = psub.add_parser(name, help=helptext)
        q.add_argument("--root", required=True, help="dataset root as distributed")
        q.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/, datalist.json)")
        q.add_argument("--folds", type=int, default=5, help="number of patient-level folds (default 5)")
        q.add_argument("--seed", type=int, default=0, help="fold shuffle seed (default 0)")
        q.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
        q.add_argument(
            "--replace-nonfinite",
            action="store_true",
            help="replace NaN/inf voxels by the image's smallest finite value (default: reject the case)",
        )
        if name == "chaos":
            q.add_argument("--task", required=True, choices=["ct-liver", "mr-t2spir", "mr-t1dual"])
        else:
            q.add_argument("--organs", nargs="+", default=None, help="structure names (default: all 16, see docs)")

    syn = sub.add_parser("synthesize", help="write synthetic phantoms in a native layout")
    syn.add_argument("--layout", required=True, choices=["chaos-ct", "chaos-mr", "visceral"])
    syn.add_argument("--out", required=True)
    syn.add_argument("--cases", type=int, default=6)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--size", type=int, default=128, help="in-plane matrix (default 128)")
    syn.add_argument("--slices", type=int, nargs=2, default=(24, 36), metavar=("MIN", "MAX"))
    syn.add_argument("--mr-sequence", default="t2spir", choices=["t2spir", "t1dual", "both"])

    pre = sub.add_parser("preview", help="PNG montage of one case with labels overlaid")
    pre.add_argument("--datalist", required=True)
    pre.add_argument("--case", required=True, help="case name (e.g. chaos_mr_t2_01) or patient id")
    pre.add_argument("--out", required=True, help="output PNG")
    pre.add_argument("--slices", type=int, default=12)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.command == "prepare" and args.dataset == "chaos":
            from .chaos import prepare_chaos

            path = prepare_chaos(
                args.root, args.task, args.out, folds=args.folds, seed=args.seed, workers=args.workers,
                replace_nonfinite=args.replace_nonfinite,
            )  # fmt: skip
        elif args.command == "prepare":
            from .visceral import prepare_visceral

            path = prepare_visceral(
                args.root, args.out, organs=args.organs, folds=args.folds, seed=args.seed, workers=args.workers,
                replace_nonfinite=args.replace_nonfinite,
            )  # fmt: skip
        elif args.command == "synthesize":
            from .synthetic import synthesize

            path = synthesize(
                args.layout, args.out, args.cases, args.seed, size=args.size, slices=tuple(args.slices),
                mr_sequence=args.mr_sequence,
            )  # fmt: skip
        else:
            from .preview import preview_case

            path = preview_case(args.datalist, args.case, args.out, slices=args.slices)
    except (DataPreparationError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, read-only or vanished folder while writing
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0
