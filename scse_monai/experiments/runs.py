"""One training run of the bundle, in a child process, in a self-contained folder.

A run is one (network, SE variant, aggregation, seed, fold). Its folder holds ``models/`` (the bundle's
checkpoints), ``eval/`` (training curves, then the held-out patients' metrics) and ``run.log``. The bundle's
configs are used unchanged; only top-level ids are overridden, as a user would on the command line. Each run is
``python -m monai.bundle run --args_file ...`` in a child process, as MONAI's Auto3DSeg runs its trainings:
the caller's console and logging stay its own, and a crash or a kill ends only that run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scse_monai.atomic import write_text_atomic
from scse_monai.checkpoints import latest_checkpoint
from scse_monai.networks.registry import network_target

__all__ = ["BundleSettings", "Run", "TrainingFailed", "bundle_configs"]


class TrainingFailed(RuntimeError):
    """A run's training process exited with an error; the message names the run and its log."""


HELDOUT_CSV = "heldout.csv"
CURVES_CSV = "training_curves.csv"


def _end_with_parent() -> None:
    """Run in the training child before exec: on Linux it gets SIGTERM when the experiment process dies, even by
    ``kill -9``, so no orphaned trainer keeps writing a run's checkpoints beside the next resume's."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (no Python API exists)


def bundle_configs(bundle_root: Path, extra: Sequence[str] = ()) -> list[str]:
    """``train.json`` + extra configs (dataset, recipe) as paths."""
    cfg = Path(bundle_root) / "configs"
    return [str(cfg / "train.json"), *(str(cfg / e) for e in extra)]


@dataclass
class BundleSettings:
    """Settings shared by all runs of an experiment (bundle overrides that are the same for every run)."""

    bundle_root: Path
    datalist_file: Path
    epochs: int | None = None  # None: the bundle's own
    overrides: dict = field(default_factory=dict)  # features, roi_size, pixdim, num_classes, in_channels, ...
    extra_configs: list[str] = field(default_factory=list)  # e.g. "datasets/chaos_ct.json", "recipes/paper.json"
    source: str = ""  # the user's datalist, as given

    def record(self) -> dict:
        """What a resumed experiment must match (``settings.json``)."""
        return {
            "datalist": self.source,
            "epochs": self.epochs,
            "overrides": self.overrides,
            "configs": self.extra_configs,
        }

    def bundle_value(self, key: str):
        """A top-level id of the bundle as these settings resolve it (e.g. ``epochs``)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(bundle_configs(self.bundle_root, self.extra_configs))
        parser.update(self.overrides)
        return parser.get_parsed_content(key)


@dataclass
class Run:
    """One (network, variant, seed, fold) of an experiment.

    Args:
        network: ``"unet"``, ``"sdnet"`` or ``"fcdensenet"``.
        se: ``"none"``, ``"cse"``, ``"sse"`` or ``"scse"``.
        aggregation: scSE aggregation (``None``: the bundle's, or none for the other variants).
        fold: the held-out fold.
        root: the experiment's ``runs/`` folder.
        kernel_size: convolution kernel size (``None``: the bundle's).
        seed: the bundle's ``seed`` (weights, sampling, augmentation).
    """

    network: str
    se: str
    aggregation: str | None
    fold: int
    root: Path
    kernel_size: int | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        """Folder name of the variant, e.g. ``unet_scse_max`` or ``sdnet_none``."""
        return "_".join(p for p in (self.network, self.se, self.aggregation) if p)

    @property
    def folder(self) -> Path:
        return self.root / self.name / f"seed{self.seed}" / f"fold{self.fold}"

    @property
    def heldout_csv(self) -> Path:
        return self.folder / "eval" / HELDOUT_CSV

    @property
    def curves_csv(self) -> Path:
        return self.folder / "eval" / CURVES_CSV

    @property
    def finished(self) -> bool:
        """The held-out patients have been scored (the CSV is written atomically, as the last step)."""
        return self.heldout_csv.is_file()

    def trained_epochs(self) -> int:
        """Epoch of the latest resume checkpoint (0 when there is none)."""
        path = latest_checkpoint(self.folder / "models")
        return int(path.stem.split("=")[-1]) if path else 0

    def overrides(self, settings: BundleSettings) -> dict:
        """Bundle overrides of this run (top-level ids, as ``monai.bundle run --<id> <value>`` would take)."""
        ov = {
            **settings.overrides,  # first: the ids below are the run's own (controlled_ids refuses them in --set)
            "bundle_root": str(settings.bundle_root),
            "datalist_file": str(settings.datalist_file),
            "ckpt_dir": str(self.folder / "models"),
            "output_dir": str(self.folder / "eval"),
            "val_folds": [self.fold],
            "resume": True,
            "seed": self.seed,
            "se": self.se,
            "network_def#_target_": network_target(self.network),
        }
        if settings.epochs is not None:
            ov["epochs"] = settings.epochs
        if self.kernel_size is not None:
            ov["kernel_size"] = self.kernel_size
        if self.aggregation:
            ov["aggregation"] = self.aggregation
        return ov

    @staticmethod
    def controlled_ids() -> set[str]:
        """Top-level bundle ids that every run sets itself (``--set`` may not: it would move the held-out fold)."""
        probe = Run("unet", "scse", "max", 0, Path(), kernel_size=3)
        return {key.split("#")[0] for key in probe.overrides(BundleSettings(Path(), Path(), epochs=1))}

    def build_network(self, settings: BundleSettings) -> torch.nn.Module:
        """The run's ``network_def`` exactly as the bundle builds it (randomly initialised)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(bundle_configs(settings.bundle_root, settings.extra_configs))
        parser.update(self.overrides(settings))
        return parser.get_parsed_content("network_def")

    def train(self, settings: BundleSettings, epochs: int) -> None:
        """Trains (or resumes) the run through ``train.json`` in a child process; its output goes to ``run.log``.

        Raises:
            TrainingFailed: the training process failed (the message names the log).
        """
        if self.trained_epochs() >= epochs:  # killed between training and evaluation
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        args = {
            "run_id": "training",
            "config_file": bundle_configs(settings.bundle_root, settings.extra_configs),
            "meta_file": str(Path(settings.bundle_root) / "configs" / "metadata.json"),
            **self.overrides(settings),
        }
        args_file = self.folder / "train_args.json"
        write_text_atomic(args_file, json.dumps(args, indent=1) + "\n")
        log = self.folder / "run.log"
        with open(log, "a", encoding="utf-8") as f:
            cmd = [sys.executable, "-m", "monai.bundle", "run", "--args_file", str(args_file)]
            linux = sys.platform.startswith("linux")
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_end_with_parent if linux else None,
            ).returncode  # fmt: skip
        if rc != 0:
            raise TrainingFailed(
                f"{self.name} seed {self.seed} fold {self.fold}: training failed (exit {rc}); see {log}"
            )
