"""Checkpoint handlers for resumable training.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` (a run killed while saving leaves a truncated file),
and its ``CheckpointLoader`` needs a path that exists when the config is parsed. A resumable bundle needs both
the other way round: files that are either complete or absent, and "load the latest checkpoint if there is one".
These two handlers add exactly that on top of ignite's ``Checkpoint`` and MONAI's ``CheckpointLoader``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader

from scse_monai.atomic import write_atomically, write_text_atomic

__all__ = ["AtomicCheckpointSaver", "ResumeFromLatestCheckpoint", "latest_checkpoint", "save_atomically"]

_EPOCH_RE = re.compile(r"_epoch=(\d+)\.pt$")


def save_atomically(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: the file is complete or absent.

    Args:
        obj: what to save.
        path: destination file.

    Example::

        >>> save_atomically({"w": torch.zeros(1)}, "out/model.pt")
    """
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler for interval checkpoints: atomic writes on rank 0, and the newest ``n_saved`` kept.

    ignite's ``Checkpoint`` only removes files it saved itself, so a resumed run (a new process) would leave
    the previous run's ``<prefix>_epoch=N.pt`` behind forever; pruning by epoch number keeps the folder bounded.
    """

    def __init__(self, dirname: str | os.PathLike, prefix: str, n_saved: int) -> None:
        self.dirname = Path(dirname)
        self.prefix = prefix
        self.n_saved = n_saved

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        import ignite.distributed as idist

        if idist.get_rank() != 0:
            return
        save_atomically(checkpoint, self.dirname / filename)
        for _, stale in sorted(_epoch_checkpoints(self.dirname, self.prefix), reverse=True)[self.n_saved :]:
            stale.unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        import ignite.distributed as idist

        if idist.get_rank() == 0:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver:
    """Saves checkpoints atomically: every ``interval`` epochs (for resuming) and/or the best key metric.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects to save, e.g. ``{"model": net, "optimizer": opt, "trainer": trainer}``. DDP-wrapped
            models are unwrapped by ignite, so the keys match the bare network.
        interval: save ``<prefix>_epoch=N.pt`` every ``interval`` epochs (0 disables).
        n_saved: how many interval checkpoints to keep.
        file_prefix: prefix of interval checkpoints.
        save_key_metric: also save the model whenever the engine's key metric beats the best so far, which is
            kept in ``<key_metric_filename>.json`` so that a resumed run does not replace a better model; an
            existing file without that record is moved to ``<name>.<time>.bak`` first.
        key_metric_filename: file name of the best-metric checkpoint.
        save_engine_as: also save the state of the engine this handler is attached to under this key (e.g.
            ``"trainer"``); a config cannot reference the trainer from its own handler list without a cycle.

    Example::

        >>> saver = AtomicCheckpointSaver("models", {"model": net, "trainer": trainer}, interval=1)
        >>> saver.attach(trainer)
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        interval: int = 1,
        n_saved: int = 1,
        file_prefix: str = "checkpoint",
        save_key_metric: bool = False,
        key_metric_filename: str = "model.pt",
        save_engine_as: str | None = None,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save.")
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.interval = interval
        self.n_saved = n_saved
        self.file_prefix = file_prefix
        self.save_key_metric = save_key_metric
        self.key_metric_filename = key_metric_filename
        self.save_engine_as = save_engine_as

    def attach(self, engine: Engine) -> None:
        Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        to_save = dict(self.save_dict)
        if self.save_engine_as:
            to_save[self.save_engine_as] = engine
        if self.interval > 0:
            interval_ckpt = Checkpoint(
                to_save=to_save,
                save_handler=_AtomicDiskSaver(self.save_dir, self.file_prefix, self.n_saved),
                filename_prefix=self.file_prefix,
                filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
                n_saved=self.n_saved,
                global_step_transform=lambda eng, _: eng.state.epoch,
            )
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), interval_ckpt)
        if self.save_key_metric:
            engine.add_event_handler(
                Events.EPOCH_COMPLETED,
                _BestMetricSaver(Path(self.save_dir) / self.key_metric_filename, to_save),
            )


class _BestMetricSaver:
    """Saves the model when the engine's key metric beats the best recorded next to the file.

    ignite's ``Checkpoint(score_function=...)`` forgets the best score when a run is resumed in a new process,
    so its first validation would replace a better ``model.pt``. The score is therefore kept in a sidecar
    ``<file>.json``. A file without a sidecar (e.g. shipped weights) is moved to ``<file>.<time>.bak``, never
    overwritten silently.
    """

    def __init__(self, path: Path, to_save: dict) -> None:
        self.path = path
        self.sidecar = path.with_name(path.name + ".json")
        self.to_save = to_save

    def best(self) -> float | None:
        try:
            return float(json.loads(self.sidecar.read_text())["score"])
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            return None

    def __call__(self, engine: Engine) -> None:
        import ignite.distributed as idist

        if idist.get_rank() != 0:
            return
        name = engine.state.key_metric_name
        score = float(engine.state.metrics[name])
        best = self.best()
        if best is not None and not score > best:
            return
        if best is None and self.path.exists():
            backup = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
            os.replace(self.path, backup)
            logging.getLogger(__name__).warning(f"kept the existing {self.path} as {backup}")
        states = {k: _unwrap(v).state_dict() for k, v in self.to_save.items()}
        save_atomically(states[next(iter(states))] if len(states) == 1 else states, self.path)
        record = {"key_metric_name": name, "score": score, "epoch": engine.state.epoch}
        write_text_atomic(self.sidecar, json.dumps(record))


def _unwrap(obj: object) -> object:
    """The bare network inside DataParallel / DistributedDataParallel, so saved keys have no ``module.``."""
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


def _epoch_checkpoints(ckpt_dir: str | os.PathLike, prefix: str) -> list[tuple[int, Path]]:
    found = []
    for p in Path(ckpt_dir).glob(f"{prefix}_*.pt"):
        m = _EPOCH_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return found


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> Path | None:
    """Returns the ``<prefix>_epoch=N.pt`` file with the largest ``N`` in ``ckpt_dir``, or ``None``.

    Example::

        >>> latest_checkpoint("models")
        PosixPath('models/checkpoint_epoch=3.pt')
    """
    found = _epoch_checkpoints(ckpt_dir, prefix)
    return max(found)[1] if found else None


class ResumeFromLatestCheckpoint(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that loads the latest interval checkpoint if one exists, else does nothing.

    Attach it to the trainer first, so a killed run continues from its last completed epoch.

    Args:
        ckpt_dir: folder searched for ``<prefix>_epoch=N.pt``.
        load_dict: objects to restore (same keys as the saver's ``save_dict``).
        prefix: checkpoint file prefix.
        enabled: ``False`` turns resuming off (start from scratch even if checkpoints exist).
        load_engine_as: also restore the state of the engine this handler is attached to from this key.
        kwargs: passed to ``monai.handlers.CheckpointLoader`` (``map_location``, ``strict``, ...).

    Example::

        >>> ResumeFromLatestCheckpoint("models", {"model": net, "optimizer": opt, "trainer": trainer}).attach(trainer)
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: dict,
        prefix: str = "checkpoint",
        enabled: bool = True,
        load_engine_as: str | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("map_location", "cpu")
        super().__init__(load_path=str(Path(ckpt_dir) / f"{prefix}_epoch=0.pt"), load_dict=load_dict, **kwargs)
        self.ckpt_dir = ckpt_dir
        self.prefix = prefix
        self.enabled = enabled
        self.load_engine_as = load_engine_as

    def attach(self, engine: Engine) -> None:
        if self.load_engine_as:
            self.load_dict[self.load_engine_as] = engine
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir, self.prefix) if self.enabled else None
        if path is None:
            self.logger.info(f"no checkpoint to resume from in {self.ckpt_dir}; starting from scratch")
            return
        self.load_path = str(path)
        super().__call__(engine)
        self.logger.info(f"resumed at epoch {engine.state.epoch} from {path}")
