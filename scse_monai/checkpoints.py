"""Checkpoint handlers for resumable training, on ignite's ``Checkpoint`` and ``DiskSaver(atomic=True)``.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` (a run killed while saving leaves a truncated file), and
its ``CheckpointLoader`` needs a path that exists when the config is parsed. A resumable bundle needs files that
are complete or absent, and "load the latest good checkpoint if there is one". ignite does the saving; the thin
subclasses below add what it cannot do, each with the reason:

- :class:`AtomicCheckpointSaver`: interval checkpoints ``<prefix>_epoch=N.pt`` (for resuming; an old one is
  removed only once the new one is in place) and the best model (``model.pt``, its score kept in ``model.pt.json``
  so that a resumed run never replaces a better model; "better" is the engine's ``metric_cmp_fn``, as in MONAI's
  workflows). Neither is written when the weights hold NaN or inf, and a NaN score is never the best.
- :class:`ResumeFromLatestCheckpoint`: at training start, removes the temporary files a killed run left in the
  folder, then loads the newest readable interval checkpoint; an unreadable one (truncated, corrupt) is named in
  the log, renamed to ``<name>.corrupt`` and the previous one is tried.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from scse_monai.atomic import write_text_atomic

__all__ = [
    "AtomicCheckpointSaver",
    "ResumeFromLatestCheckpoint",
    "check_finite_weights",
    "epoch_checkpoints",
    "latest_checkpoint",
    "remove_orphan_temp_files",
]

#: temporary files of scse_monai.atomic (``.<name>.<random>.tmp``) and of ignite's atomic DiskSaver (``tmp<random>``)
_TEMP_FILE_RE = re.compile(r"^(\..+\.tmp|tmp[a-z0-9_]{8})$")
_logger = logging.getLogger(__name__)


def remove_orphan_temp_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that runs killed while saving left in ``ckpt_dir``; returns them.

    Only names the atomic writers here produce are touched: ``.<name>.<random>.tmp`` (:mod:`scse_monai.atomic`)
    and ``tmp<8 random characters>`` (ignite's ``DiskSaver(atomic=True)``). Call it when nothing writes to the folder.

    Example::

        >>> remove_orphan_temp_files("models")
        [PosixPath('models/.model.pt.k2j3h4.tmp')]
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if p.is_file() and _TEMP_FILE_RE.match(p.name)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def check_finite_weights(objects: Mapping[str, object], what: str) -> None:
    """Raises ``FloatingPointError`` naming the tensors if a module in ``objects`` holds NaN or inf weights.

    Args:
        objects: e.g. a saver's ``{"model": net, "optimizer": opt}``; only ``torch.nn.Module`` values are checked.
        what: what was about to happen, for the message (e.g. ``"saving models/model.pt"``).

    Example::

        >>> check_finite_weights({"model": torch.nn.Linear(2, 1)}, "saving model.pt")
    """
    bad = [
        f"{key}.{name}"
        for key, obj in objects.items()
        if isinstance(obj, torch.nn.Module)
        for name, t in _unwrap(obj).state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise FloatingPointError(f"not {what}: non-finite (NaN/inf) values in {shown}.")


def epoch_checkpoints(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``<prefix>_epoch=N.pt`` in ``ckpt_dir``, oldest first.

    Only that exact name matches: the files of ``checkpoint_ema`` are not those of ``checkpoint``.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(prefix)}_epoch=(\d+)\.pt")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> Path | None:
    """Returns the ``<prefix>_epoch=N.pt`` file with the largest ``N`` in ``ckpt_dir``, or ``None``.

    Example::

        >>> latest_checkpoint("models")
        PosixPath('models/checkpoint_epoch=3.pt')
    """
    found = epoch_checkpoints(ckpt_dir, prefix)
    return found[-1][1] if found else None


def _unwrap(obj: object) -> object:
    """The bare network inside DataParallel / DistributedDataParallel, so saved keys have no ``module.``."""
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


class _SaveThenRemoveDiskSaver(DiskSaver):
    # ignite removes the old file before saving the new one: removals wait until the new file is in place
    def __init__(self, dirname: str | os.PathLike) -> None:
        super().__init__(dirname, atomic=True, require_empty=False)
        self._pending: list[str] = []

    def remove(self, filename: str) -> None:
        self._pending.append(filename)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, filename, metadata)
        pending, self._pending = self._pending, []
        if idist.get_rank() == self.save_on_rank:
            for name in pending:
                if name != filename:
                    (self.dirname / name).unlink(missing_ok=True)


class _IntervalCheckpoint(Checkpoint):
    # ignite prunes only the files this process saved: the ones an earlier (killed) run left are taken over here
    def __init__(self, to_save: dict, dirname: str, prefix: str, n_saved: int) -> None:
        super().__init__(
            to_save,
            _SaveThenRemoveDiskSaver(dirname),
            filename_prefix=prefix,
            filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
            n_saved=n_saved,
            global_step_transform=lambda engine, _: engine.state.epoch,
        )
        self.dirname, self.prefix, self._taken_over = Path(dirname), prefix, False

    def __call__(self, engine: Engine) -> None:
        check_finite_weights(self.to_save, f"saving a checkpoint at epoch {engine.state.epoch}")
        if not self._taken_over:  # at the first save, after any resume handler has run
            self._taken_over = True
            self.load_state_dict({"_saved": self._previous_files(engine.state.epoch)})
        super().__call__(engine)

    def _previous_files(self, epoch: int) -> list[tuple[int, str]]:
        """The newest ``n_saved - 1`` earlier checkpoints; older ones and any of a later epoch (an abandoned run's)
        are removed once the new one is saved, so the folder holds ``n_saved`` files and the latest is this run's."""
        found = epoch_checkpoints(self.dirname, self.prefix)
        keep = [(e, p) for e, p in found if e < epoch][-(self.n_saved - 1) :] if self.n_saved > 1 else []
        for e, p in found:
            if (e, p) not in keep:
                self.save_handler.remove(p.name)
        return [(e, p.name) for e, p in keep]


class _BestCheckpoint(Checkpoint):
    # ignite forgets the best score in a new process and always keeps the highest: the best is kept in <file>.json
    # and compared with the engine's metric_cmp_fn here, so a resume never replaces a better model
    def __init__(self, path: Path, to_save: dict) -> None:
        super().__init__(to_save, _SaveThenRemoveDiskSaver(path.parent), filename_pattern=path.name)
        self.path, self.sidecar = path, path.with_name(path.name + ".json")

    def best(self) -> float | None:
        """The best score recorded next to the file, or ``None`` (also for a NaN an earlier version recorded)."""
        try:
            score = float(json.loads(self.sidecar.read_text())["score"])
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            return None
        return None if math.isnan(score) else score

    def __call__(self, engine: Engine) -> None:
        score = float(engine.state.metrics[engine.state.key_metric_name])
        if math.isnan(score):
            _logger.warning(
                f"not saving {self.path}: {engine.state.key_metric_name} is nan at epoch {engine.state.epoch}"
            )
            return
        best = self.best()
        is_better = getattr(engine, "metric_cmp_fn", lambda current, prev: current > prev)  # as MONAI's workflows
        if best is not None and not is_better(score, best):
            return
        check_finite_weights(self.to_save, f"saving {self.path} (epoch {engine.state.epoch})")
        if best is None:
            _keep_existing(self.path)
        self.reset()  # the decision is made above: ignite only saves
        super().__call__(engine)
        if idist.get_rank() == 0:
            # inf (e.g. a Hausdorff distance with an empty mask) as the string "inf", so the file stays strict JSON
            score_text = score if math.isfinite(score) else str(score)
            record = {"key_metric_name": engine.state.key_metric_name, "score": score_text, "epoch": engine.state.epoch}
            write_text_atomic(self.sidecar, json.dumps(record, allow_nan=False))


def _keep_existing(path: Path) -> None:
    """Moves a file this run did not write to ``<name>.<time>.bak`` (rank 0), so nothing is overwritten silently."""
    if idist.get_rank() == 0 and path.exists():
        backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        os.replace(path, backup)
        _logger.warning(f"kept the existing {path} as {backup}")


class _FinalCheckpoint(Checkpoint):
    # the weights at the end of training, for a run without validation (nothing else chooses a model); a subclass
    # because ignite's Checkpoint would save non-finite weights and replace a model.pt this run did not write
    def __init__(self, path: Path, to_save: dict) -> None:
        super().__init__(to_save, _SaveThenRemoveDiskSaver(path.parent), filename_pattern=path.name)
        self.path = path

    def __call__(self, engine: Engine) -> None:
        check_finite_weights(self.to_save, f"saving {self.path} (end of training, epoch {engine.state.epoch})")
        _keep_existing(self.path)
        super().__call__(engine)


class AtomicCheckpointSaver:
    """Saves checkpoints atomically: every ``interval`` epochs (for resuming) and/or the best key metric.

    Nothing is saved from weights that hold NaN or inf: the save raises ``FloatingPointError`` naming the tensors.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects to save, e.g. ``{"model": net, "optimizer": opt, "trainer": trainer}``. DDP-wrapped
            models are unwrapped by ignite, so the keys match the bare network.
        interval: save ``<prefix>_epoch=N.pt`` every ``interval`` epochs (0 disables).
        n_saved: how many interval checkpoints to keep; with 2 (the default) a resume can fall back to the previous
            one when the latest is unreadable. Older files are removed only after the new one is saved, so a run
            killed while saving still leaves one even with ``n_saved=1``.
        file_prefix: prefix of interval checkpoints; only ``<file_prefix>_epoch=N.pt`` is theirs (the files of
            ``checkpoint_ema`` are not those of ``checkpoint``).
        save_key_metric: also save the model whenever the engine's key metric beats the best so far, which is
            kept in ``<key_metric_filename>.json`` so that a resumed run does not replace a better model; an
            existing file without that record is moved to ``<name>.<time>.bak`` first. "Beats" is the engine's
            ``metric_cmp_fn(current, best)`` when it has one, as MONAI's workflows do (e.g.
            ``lambda current, prev: current < prev`` for a Hausdorff distance), so the file is the model MONAI
            reports as ``best_metric``; otherwise greater is better. A NaN score is never saved nor recorded (a
            warning names the epoch), and a NaN recorded by an earlier version counts as no best; inf is compared
            like any score and recorded as the string ``"inf"``, so the record stays strict JSON.
        key_metric_filename: file name of the best-metric checkpoint.
        final_filename: also save the model under this name when training completes (e.g. ``model.pt`` when no
            validation set chooses one); an existing file is moved to ``<name>.<time>.bak`` first.
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
        n_saved: int = 2,
        file_prefix: str = "checkpoint",
        save_key_metric: bool = False,
        key_metric_filename: str = "model.pt",
        save_engine_as: str | None = None,
        final_filename: str | None = None,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save.")
        if isinstance(n_saved, bool) or not isinstance(n_saved, int) or n_saved < 1:
            raise ValueError(f"n_saved must be a positive integer, got {n_saved!r}.")
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.interval = interval
        self.n_saved = n_saved
        self.file_prefix = file_prefix
        self.save_key_metric = save_key_metric
        self.key_metric_filename = key_metric_filename
        self.save_engine_as = save_engine_as
        self.final_filename = final_filename

    def attach(self, engine: Engine) -> None:
        Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        to_save = dict(self.save_dict)
        if self.save_engine_as:
            to_save[self.save_engine_as] = engine
        if self.interval > 0:
            interval_ckpt = _IntervalCheckpoint(to_save, self.save_dir, self.file_prefix, self.n_saved)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), interval_ckpt)
        if self.save_key_metric:
            best = _BestCheckpoint(Path(self.save_dir) / self.key_metric_filename, to_save)
            engine.add_event_handler(Events.EPOCH_COMPLETED, best)
        if self.final_filename:
            engine.add_event_handler(
                Events.COMPLETED, _FinalCheckpoint(Path(self.save_dir) / self.final_filename, to_save)
            )


class ResumeFromLatestCheckpoint(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that loads the latest readable interval checkpoint if there is one.

    Attach it to the trainer first, so a killed run continues from its last completed epoch. At training start it
    also removes the temporary files a run killed while saving left in ``ckpt_dir``
    (:func:`remove_orphan_temp_files`). A checkpoint that cannot be read (truncated, corrupt) is named in the log,
    renamed to ``<name>.corrupt`` and the previous one is loaded instead.

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
        if idist.get_rank() == 0:
            for p in remove_orphan_temp_files(self.ckpt_dir):
                self.logger.info(f"removed {p}, a temporary file left by a run killed while saving")
        path = self.latest_readable() if self.enabled else None
        if path is None:
            self.logger.info(f"no checkpoint to resume from in {self.ckpt_dir}; starting from scratch")
            return
        self.load_path = str(path)
        super().__call__(engine)
        self.logger.info(f"resumed at epoch {engine.state.epoch} from {path}")

    def latest_readable(self) -> Path | None:
        """The newest interval checkpoint ``torch.load`` reads; unreadable newer ones are set aside as ``.corrupt``."""
        for _, path in reversed(epoch_checkpoints(self.ckpt_dir, self.prefix)):
            try:
                # read once more by CheckpointLoader.__call__: once per run, to keep MONAI's loading logic unchanged
                torch.load(path, map_location="cpu", weights_only=True)
                return path
            except Exception as err:  # truncated zip, bad pickle, I/O error: any reason this file cannot be resumed
                aside = path.with_name(path.name + ".corrupt")
                self.logger.warning(f"cannot read checkpoint {path} ({type(err).__name__}: {err}); renamed to {aside}")
                if idist.get_rank() == 0:
                    os.replace(path, aside)
        return None
