"""Runs the benchmarks and writes ``benchmarks/results/latest.json`` and ``latest.md``.

Every module ``benchmarks/bench_<name>.py`` that defines ``run(quick: bool = False) -> dict`` is a benchmark
named ``<name>``. Each result is printed and stored; a result's ``rows`` (a list of dicts) becomes a markdown
table, its other plain values (numbers, strings, booleans) a key/value table.

Usage: ``python -m benchmarks.run [--only blocks,networks] [--quick] [--threads N]``.
Exit status 1 if a benchmark failed (the others still run and are written), 2 for a bad ``--only``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.timing import set_threads
from scse_monai.atomic import write_text_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def discover() -> dict[str, str]:
    """Benchmark name -> module name, for every ``bench_*.py`` next to this file."""
    return {p.stem[len("bench_") :]: f"benchmarks.{p.stem}" for p in sorted(HERE.glob("bench_*.py"))}


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _markdown_table(rows: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and _plain(row[k])]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return lines


def to_markdown(report: dict) -> str:
    """Renders the report (as written to ``latest.json``) as markdown."""
    meta = report["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"{meta['date']} · {meta['platform']} · {meta['cpus']} CPUs · torch {meta['torch']} · "
        f"{meta['torch_threads']} threads · load average before {meta['load_average_before']}"
        + (" · **quick run (smoke test, not a measurement)**" if meta["quick"] else ""),
        "",
    ]
    for name, result in report["benchmarks"].items():
        lines += [f"## {name}", ""]
        if "error" in result:
            lines += ["FAILED: " + result["error"].splitlines()[-1], ""]
            continue
        rows = result.get("rows")
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            lines += _markdown_table(rows) + [""]
        scalars = {k: v for k, v in result.items() if k != "rows" and _plain(v)}
        if scalars:
            lines += ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in scalars.items()] + [""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(description="Run the scse-monai benchmarks.")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(available)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable CPUs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json and latest.md")
    args = parser.parse_args(argv)
    names = list(available)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            print(f"error: --only: unknown benchmark(s) {unknown}; available: {sorted(available)}", file=sys.stderr)
            return 2
    threads = set_threads(args.threads)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": threads,
            "load_average_before": [round(v, 2) for v in os.getloadavg()],
            "quick": args.quick,
        },
        "benchmarks": {},
    }
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(available[name])
            if not callable(getattr(module, "run", None)):
                raise TypeError(f"{available[name]} has no run(quick: bool = False) -> dict")
            result = module.run(quick=args.quick)
        except Exception:  # one broken benchmark must not lose the others' results
            result = {"error": traceback.format_exc()}
            failed.append(name)
            print(result["error"], file=sys.stderr)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        report["benchmarks"][name] = result
    report["meta"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    markdown = to_markdown(report)
    write_text_atomic(args.out / "latest.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(args.out / "latest.md", markdown + "\n")
    print()
    print(markdown)
    print(f"\nwritten: {args.out / 'latest.json'}, {args.out / 'latest.md'}")
    if failed:
        print(f"error: benchmark(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
