"""``python apps/deploy -i DICOM_DIR -o OUTPUT_DIR -m model.ts``: segment one DICOM series to DICOM SEG.

Arguments fall back to the SDK's environment variables (``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``,
``HOLOSCAN_MODEL_PATH``) and then to ``input``, ``output``, ``models``, as MONAI Deploy apps do. Before the graph
runs, the inputs are checked so that expected mistakes (missing or empty folder, no DICOM file, a model without
embedded configs, no matching series) end with one clear line and exit code 2 instead of a traceback. The SEG is
written to a temporary folder inside the output folder and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
from pathlib import Path

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1


class InputError(Exception):
    """An expected problem with the arguments; reported without a traceback."""


def _raise_stack_limit() -> None:
    # holoscan warns at import when the stack limit is below 32 MiB; raise the soft limit when the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 32 * 1024 * 1024
    if soft != resource.RLIM_INFINITY and soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python apps/deploy",
        description="Segment liver, kidneys and spleen in a DICOM series (CHAOS-like MR T2-SPIR or CT) to DICOM SEG.",
    )
    parser.add_argument(
        "-i",
        "--input",
        default=os.environ.get("HOLOSCAN_INPUT_PATH", "input"),
        help="folder with the DICOM series (searched recursively) [$HOLOSCAN_INPUT_PATH or ./input]",
    )
    parser.add_argument(
        "-o",
        "--output",
        default=os.environ.get("HOLOSCAN_OUTPUT_PATH", "output"),
        help="folder for the DICOM SEG file [$HOLOSCAN_OUTPUT_PATH or ./output]",
    )
    parser.add_argument(
        "-m",
        "--model",
        default=os.environ.get("HOLOSCAN_MODEL_PATH", "models"),
        help="TorchScript bundle (model.ts from `monai.bundle ckpt_export`, configs embedded) or a "
        "folder holding exactly one [$HOLOSCAN_MODEL_PATH or ./models]",
    )
    parser.add_argument(
        "-l",
        "--log-level",
        default="WARN",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"],
        help="SDK log level (default WARN)",
    )
    return parser.parse_args(argv)


def _dicom_files(folder: Path) -> list[Path]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        found.append(path)
    return found


def _series_summary(files: list[Path]) -> str:
    import pydicom

    series = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = (str(ds.get("Modality", "?")), str(ds.get("SeriesDescription", "")))
        series[key] = series.get(key, 0) + 1
    return ", ".join(f"{m} '{d}' ({n} files)" for (m, d), n in sorted(series.items()))


def _select_series(input_path: Path, files: list[Path]) -> tuple[dict, list[Path]]:
    """The one series to segment: the first rule, in priority order, that selects a series anywhere in the input.

    Several series selected by that rule (several patients or studies) are an error: one SEG per run, never a
    silently dropped series. The series is read as ``prepare`` reads it (every file decoded, finite geometry and
    rescale values, one frame of reference, a regular grid), and must have two slices or more (the SDK sets no
    geometry for one), so that a bad file is named here and not found later inside the graph.

    Returns:
        selection rules for the SDK that name exactly that series, and its files.
    """
    from rules import SERIES_RULES, exact_series_rules, series_for_first_rule

    from scse_monai.data.dicom_series import read_dicom_series
    from scse_monai.data.errors import DataPreparationError

    name, chosen = series_for_first_rule(files, SERIES_RULES)
    if not chosen:
        names = [s["name"] for s in SERIES_RULES["selections"]]
        raise InputError(
            f"input {input_path}: no series matches the selection rules {names}; found {_series_summary(files)}"
        )
    if len(chosen) > 1:
        found = "; ".join(
            f"patient {ds.get('PatientID', '?')} series {uid} in {series_files[0].parent}"
            for uid, (ds, series_files) in chosen.items()
        )
        raise InputError(
            f"input {input_path}: {len(chosen)} series match the rule '{name}' ({found}); "
            "give one series per run (-i its folder)"
        )
    uid, (_, series_files) = next(iter(chosen.items()))
    if len(series_files) < 2:
        raise InputError(f"input {input_path}: series '{name}' has one slice ({series_files[0]}); a volume needs two")
    try:
        read_dicom_series(series_files, rescale=False)
    except DataPreparationError as e:
        raise InputError(f"input {input_path}: series '{name}' cannot be segmented: {e}") from None
    return exact_series_rules(name, uid), series_files


def check_inputs(input_path: Path, model_path: Path) -> tuple[Path, list[Path], dict[int, str], dict]:
    """Validate the arguments before the SDK graph runs.

    Returns:
        the model file, the DICOM files of the selected series, the organ labels the model predicts, and the
        selection rules that pick exactly that series.

    Raises:
        InputError: with a message naming the offending argument or file.
    """
    from scse_monai.apps.organs import organ_labels, read_torchscript_metadata

    if not input_path.exists():
        raise InputError(f"input {input_path}: no such file or folder")
    if input_path.is_file():
        if _dicom_files_in([input_path]):
            raise InputError(f"input {input_path}: give the folder that holds the DICOM series, not one file")
        raise InputError(f"input {input_path}: not a DICOM file (and not a folder of DICOM files)")
    files = _dicom_files(input_path)
    if not files:
        if not any(p.is_file() for p in input_path.rglob("*")):
            raise InputError(f"input {input_path}: the folder is empty")
        raise InputError(f"input {input_path}: no DICOM files in this folder (non-DICOM files are ignored)")
    rules, files = _select_series(input_path, files)

    if model_path.is_dir():
        candidates = sorted(model_path.rglob("*.ts"))  # a MAP mounts models as models/<name>/<file>
        if len(candidates) != 1:
            raise InputError(
                f"model {model_path}: expected exactly one *.ts TorchScript bundle, found {len(candidates)}"
            )
        model_path = candidates[0]
    if not model_path.is_file():
        raise InputError(f"model {model_path}: no such file")
    try:
        labels = organ_labels(read_torchscript_metadata(model_path))
    except ValueError as e:
        raise InputError(f"model {e}") from e
    return model_path, files, labels, rules


def _dicom_files_in(paths: list[Path]) -> list[Path]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    ok = []
    for path in paths:
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
            ok.append(path)
        except (InvalidDicomError, OSError):
            pass
    return ok


def _staging_folder(output_path: Path) -> tuple[Path, Path | None]:
    """A fresh ``.seg-partial-*`` folder inside the output folder, and the topmost folder made for it (or None).

    Raises:
        InputError: the output folder cannot be written.
    """
    if output_path.exists() and not output_path.is_dir():
        raise InputError(f"output {output_path}: exists and is not a folder")
    made = None
    for folder in (output_path, *output_path.parents):
        if folder.exists():
            break
        made = folder
    try:
        output_path.mkdir(parents=True, exist_ok=True)
        from scse_monai.atomic import work_folder  # removes the .seg-partial-* of runs killed before clean-up

        return work_folder(output_path, ".seg-partial-"), made
    except OSError as e:
        raise InputError(f"output {output_path}: cannot write there ({e.strerror or e})") from None


def _failure(e: BaseException) -> str:
    """``Type: message`` of an error, with its first cause's when it has one (MONAI wraps transform errors)."""
    cause = e.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    text = f"{type(e).__name__}: {e}"
    return text if cause is None else f"{text} <- {type(cause).__name__}: {cause}"


def main(argv: list[str] | None = None) -> int:
    """Run the application; returns the process exit code (0 ok, 1 run failed, 2 bad input)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    _raise_stack_limit()
    if args.log_level != "DEBUG":
        os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")  # the C++ runtime's own [info] lines
    input_path, output_path = Path(args.input), Path(args.output)
    try:
        model_path, files, labels, rules = check_inputs(input_path, Path(args.model))
        staging, made = _staging_folder(output_path)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    others = sum(1 for p in input_path.rglob("*") if p.is_file()) - len(files)
    print(
        f"{len(files)} DICOM files of the selected series in {input_path} ({others} other files ignored); "
        f"model {model_path} segments {', '.join(labels.values())}",
        file=sys.stderr,
    )
    try:
        from app import OrganSegApp

        app_argv = [
            sys.executable,
            "apps/deploy",
            "-i",
            str(input_path),
            "-o",
            str(staging),
            "-m",
            str(model_path),
            "-l",
            args.log_level,
        ]
        try:
            app = OrganSegApp(app_argv)
            app.series_rules = rules
            app.run()
        except Exception as e:  # the SDK re-raises operator errors after stopping the graph
            logging.getLogger(__name__).debug("application failed", exc_info=True)
            print(f"error: segmentation failed: {_failure(e)}", file=sys.stderr)
            return EXIT_RUN_FAILED
        written = sorted(staging.glob("*.dcm"))
        if not written:
            print("error: the application finished without writing a DICOM SEG", file=sys.stderr)
            return EXIT_RUN_FAILED
        for path in written:
            os.replace(path, output_path / path.name)
            print(f"wrote {output_path / path.name}")
        return 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made is not None and not any(p.is_file() for p in made.rglob("*")):
            shutil.rmtree(made)  # a failed run leaves no trace, not even the folders it made


if __name__ == "__main__":
    sys.exit(main())
