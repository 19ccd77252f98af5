"""One training + evaluation run of the bundle, in this process, in a self-contained folder.

A run is one (network, SE variant, aggregation, fold). Its folder holds ``models/`` (the bundle's
checkpoints) and ``eval/`` (training curves, then the per-case metrics of the held-out fold). The bundle's
configs are used unchanged; only top-level ids are overridden, as a user would on the command line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scse_monai.checkpoints import latest_checkpoint

__all__ = ["NETWORK_TARGETS", "BundleSettings", "Run", "bundle_configs"]

#: command-line network name -> bundle ``network_def#_target_``
NETWORK_TARGETS: dict[str, str] = {
    "unet": "scse_monai.networks.SEUNet",
    "sdnet": "scse_monai.networks.SESDNet",
    "fcdensenet": "scse_monai.networks.SEFCDenseNet",
}

EVAL_CSV = "metrics_per_case.csv"
CURVES_CSV = "training_curves.csv"


def bundle_configs(bundle_root: Path, extra: Sequence[str] = (), evaluate: bool = False) -> list[str]:
    """``train.json`` + extra configs (dataset, recipe) [+ ``evaluate.json``] as paths."""
    cfg = Path(bundle_root) / "configs"
    return [
        str(cfg / "train.json"),
        *(str(cfg / e) for e in extra),
        *([str(cfg / "evaluate.json")] if evaluate else []),
    ]


@dataclass
class BundleSettings:
    """Settings shared by all runs of a comparison (bundle overrides that are the same for every run)."""

    bundle_root: Path
    datalist_file: Path
    epochs: int
    overrides: dict = field(default_factory=dict)  # features, roi_size, pixdim, num_classes, in_channels, ...
    extra_configs: list[str] = field(default_factory=list)  # e.g. "datasets/chaos_ct.json", "recipes/paper.json"
    checkpoint: str = "last"  # which weights are evaluated: "last" epoch or the "best" validation epoch


@dataclass
class Run:
    """One (network, variant, fold) of a comparison.

    Args:
        network: ``"unet"``, ``"sdnet"`` or ``"fcdensenet"``.
        se: ``"none"``, ``"cse"``, ``"sse"`` or ``"scse"``.
        aggregation: scSE aggregation (``None`` for the variants without one).
        fold: the held-out fold.
        root: the comparison's ``runs/`` folder.
        kernel_size: convolution kernel size of this network.
    """

    network: str
    se: str
    aggregation: str | None
    fold: int
    root: Path
    kernel_size: int

    @property
    def name(self) -> str:
        """Folder name of the variant, e.g. ``unet_scse_max`` or ``sdnet_none``."""
        return "_".join(p for p in (self.network, self.se, self.aggregation) if p)

    @property
    def folder(self) -> Path:
        return self.root / self.name / f"fold{self.fold}"

    @property
    def eval_csv(self) -> Path:
        return self.folder / "eval" / EVAL_CSV

    @property
    def curves_csv(self) -> Path:
        return self.folder / "eval" / CURVES_CSV

    @property
    def finished(self) -> bool:
        """The held-out fold has been evaluated (the CSV is written atomically, as the last step)."""
        return self.eval_csv.is_file()

    def trained_epochs(self) -> int:
        """Epoch of the latest resume checkpoint (0 when there is none)."""
        path = latest_checkpoint(self.folder / "models")
        return int(path.stem.split("=")[-1]) if path else 0

    def overrides(self, settings: BundleSettings) -> dict:
        """Bundle overrides of this run (top-level ids, as ``monai.bundle run --<id> <value>`` would take)."""
        ov = {
            "bundle_root": str(settings.bundle_root),
            "datalist_file": str(settings.datalist_file),
            "ckpt_dir": str(self.folder / "models"),
            "output_dir": str(self.folder / "eval"),
            "epochs": settings.epochs,
            "val_folds": [self.fold],
            "resume": True,
            "se": self.se,
            "kernel_size": self.kernel_size,
            "network_def#_target_": NETWORK_TARGETS[self.network],
            **settings.overrides,
        }
        if self.aggregation:
            ov["aggregation"] = self.aggregation
        return ov

    def build_network(self, settings: BundleSettings) -> torch.nn.Module:
        """The run's ``network_def`` exactly as the bundle builds it (randomly initialised)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(bundle_configs(settings.bundle_root, settings.extra_configs))
        parser.update(self.overrides(settings))
        return parser.get_parsed_content("network_def")

    def train(self, settings: BundleSettings, log: Path) -> None:
        """Trains (or resumes) the run through ``train.json``; output goes to ``log``."""
        if self.trained_epochs() >= settings.epochs:  # killed between training and evaluation
            return
        self._workflow(bundle_configs(settings.bundle_root, settings.extra_configs), "train", settings, log)

    def evaluate(self, settings: BundleSettings, log: Path) -> None:
        """Evaluates the held-out fold per case through ``train.json`` + ``evaluate.json``."""
        ov = {}
        if settings.checkpoint == "last":
            last = latest_checkpoint(self.folder / "models")
            if last is None:
                raise FileNotFoundError(f"{self.folder / 'models'}: no checkpoint to evaluate")
            # the resume checkpoint holds model, optimizer, ...: CheckpointLoader takes its "model" entry
            ov["validate#handlers#0#load_path"] = str(last)
        configs = bundle_configs(settings.bundle_root, settings.extra_configs, evaluate=True)
        self._workflow(configs, None, settings, log, **ov)

    def _workflow(self, configs: list[str], workflow_type: str | None, settings: BundleSettings, log: Path, **extra):
        from monai.bundle import ConfigWorkflow

        self.folder.mkdir(parents=True, exist_ok=True)
        with _captured(log):
            wf = ConfigWorkflow(
                config_file=configs,
                meta_file=str(Path(settings.bundle_root) / "configs" / "metadata.json"),
                logging_file=False,  # the comparison owns the console; this run's messages go to its log
                workflow_type=workflow_type,
                **self.overrides(settings),
                **extra,
            )
            wf.initialize()
            wf.run()
            wf.finalize()


class _LogRouter(io.TextIOBase):
    """A stream that writes to the current run's log file, and drops writes between runs.

    Loggers and progress bars created during a run keep a reference to ``sys.stdout`` / ``sys.stderr``; with a
    plain redirect to the run's file they would write to a closed file in the next run. Through this router
    they write to whichever run is current.
    """

    def __init__(self) -> None:
        super().__init__()
        self.target: io.TextIOBase | None = None

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if self.target is not None:
            self.target.write(s)
        return len(s)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()


_ROUTER = _LogRouter()


@contextlib.contextmanager
def _captured(log: Path) -> Iterator[None]:
    """Sends stdout, stderr (ignite's progress bars) and INFO logging to ``log`` while a run executes.

    Handlers that were bound to the console before (e.g. MONAI's own stream handlers) are muted meanwhile, so
    the comparison's single progress bar stays readable.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    muted = []
    for lg in [root, *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (
                sys.stdout,
                sys.stderr,
                sys.__stdout__,
                sys.__stderr__,
            ):
                muted.append((h, h.level))
                h.setLevel(logging.CRITICAL + 1)
    with open(log, "a", encoding="utf-8") as f:
        handler = logging.StreamHandler(_ROUTER)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        _ROUTER.target = f
        try:
            with contextlib.redirect_stdout(_ROUTER), contextlib.redirect_stderr(_ROUTER):
                yield
        finally:
            _ROUTER.flush()
            _ROUTER.target = None
            root.removeHandler(handler)
            root.setLevel(level)
            for h, lvl in muted:
                h.setLevel(lvl)
