"""Ignite handlers for MONAI workflows: on-device Dice / Jaccard metrics, a per-case CSV saver, training curves.

- :class:`GlobalDice` / :class:`GlobalJaccard` are MONAI ``IgniteMetricHandler`` s around
  :class:`scse_monai.metrics.SegmentationCountsMetric`, usable as a MONAI evaluator's ``key_val_metric`` or
  ``additional_metrics``. The value is the mean over classes of the *global* (pooled) score; per-class values
  go to ``engine.state.metrics["<name>_<class>"]`` (so MONAI's ``StatsHandler``, ``TensorBoardStatsHandler``,
  ``MLFlowHandler`` and ``MetricsSaver`` log them unchanged) and the case x class table to
  ``engine.state.metric_details[name]`` (MONAI's convention, read by ``MetricsSaver``).
- :class:`PerCaseMetricsSaver` writes per-case, per-class Dice and Jaccard, a summary and a Dice box plot.
- :class:`TrainingCurvePlotter` saves loss and validation-metric curves (PNG + CSV) during and after training.
- :class:`StopOnNonFiniteLoss` stops training at the first NaN / inf loss, naming the epoch and iteration.
- :class:`ExitOnInputError` ends ``python -m monai.bundle`` with one line when bad input stopped the engine.

MONAI's ``StatsHandler``, ``TensorBoardStatsHandler``, ``MLFlowHandler``, ``CheckpointSaver`` and
``MetricsSaver`` are meant to be used alongside; only what they lack is written here (see each class).

Example bundle config (evaluator)::

    "key_val_metric": {"val_mean_dice": {"_target_": "scse_monai.handlers.GlobalDice",
        "num_classes": 5, "class_names": "@class_names",
        "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
    "additional_metrics": {"val_mean_jaccard": {"_target_": "scse_monai.handlers.GlobalJaccard",
        "num_classes": 5, "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
    "val_handlers": [{"_target_": "scse_monai.handlers.PerCaseMetricsSaver", "output_dir": "@output_dir",
        "class_names": ["liver", "right_kidney", "left_kidney", "spleen"]}]
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine

from scse_monai.atomic import write_bytes_atomic
from scse_monai.errors import input_error_in, under_bundle_cli
from scse_monai.metrics import SegmentationCountsMetric, case_name_from_meta

__all__ = [
    "ExitOnInputError",
    "GlobalDice",
    "GlobalJaccard",
    "GlobalOverlap",
    "PerCaseMetricsSaver",
    "StopOnNonFiniteLoss",
    "TrainingCurvePlotter",
    "batch_case_names",
]


# ---------------------------------------------------------------------------------------------- helpers
def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else _fmt(v) for v in row])
    return buf.getvalue().encode("utf-8")


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _save_figure(fig: Any, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def _figure(ncols: int = 1, width: float = 6.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; no-op if a backend is already in use
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.5))  # not pyplot: no global state, thread-safe
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _name_of(item: Any) -> str | None:
    """Name of one case from a ``MetaTensor`` or a meta dict."""
    meta = getattr(item, "meta", item)
    return (case_name_from_meta(meta, "") or None) if isinstance(meta, Mapping) else None


def _names_from_meta(meta: Any, n: int) -> list[str | None]:
    """Names of ``n`` cases from a collated meta dict (``filename_or_obj`` is a list of ``n``)."""
    if not isinstance(meta, Mapping):
        return [None] * n
    fn = meta.get("filename_or_obj")
    if isinstance(fn, (list, tuple)) and len(fn) == n:
        return [_name_of({"filename_or_obj": f}) for f in fn]
    return [_name_of(meta)] if n == 1 else [None] * n


def _names_from(data: Any, n: int) -> list[str | None]:
    """Case names from a batched ``MetaTensor`` or a list of per-case ``MetaTensor`` s."""
    if isinstance(data, torch.Tensor):
        return _names_from_meta(getattr(data, "meta", None), n)
    if isinstance(data, Sequence) and len(data) == n:
        return [_name_of(d) for d in data]
    return [None] * n


def batch_case_names(y_pred: Any, y: Any = None, batch: Any = None, key: str = "image") -> list[str | None]:
    """Case names of one iteration, from the prediction's, the label's or the input batch's meta data.

    MONAI post transforms copy the image meta (``filename_or_obj``) to ``pred``; the decollated
    ``engine.state.batch`` (list of dicts) or a collated one (dict) is the fallback, through
    ``batch[key].meta`` or ``batch[f"{key}_meta_dict"]``.

    Args:
        y_pred: batched tensor or list of per-case tensors.
        y: the same for the labels (optional).
        batch: ``engine.state.batch`` (optional).
        key: the image key in the batch.

    Returns:
        one name (or ``None``) per case.

    Example::

        >>> from monai.data import MetaTensor
        >>> batch_case_names([MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": "d/p01.nii.gz"})])
        ['p01']
    """
    n = y_pred.shape[0] if isinstance(y_pred, torch.Tensor) else len(y_pred)
    names = _names_from(y_pred, n)
    if not all(names) and y is not None:
        names = [a or b for a, b in zip(names, _names_from(y, n), strict=True)]
    if not all(names) and batch is not None:
        if isinstance(batch, Mapping):
            image = batch.get(key)
            other = (
                _names_from(image, n)
                if isinstance(getattr(image, "meta", None), Mapping)
                else _names_from_meta(batch.get(f"{key}_meta_dict"), n)
            )
        elif isinstance(batch, Sequence) and len(batch) == n and all(isinstance(b, Mapping) for b in batch):
            other = [_name_of(b.get(key)) or _name_of(b.get(f"{key}_meta_dict")) for b in batch]
        else:
            other = [None] * n
        names = [a or b for a, b in zip(names, other, strict=True)]
    return names


def _resolve_classes(
    class_names: Sequence[str] | Mapping[Any, str] | None, num_classes: int | None, include_background: bool
) -> tuple[int, list[str]]:
    """``(num_classes, labels of the reported classes)`` from a list or a ``{"index": name}`` mapping."""
    first = 0 if include_background else 1
    if isinstance(class_names, Mapping):
        by_index = {int(k): str(v) for k, v in class_names.items()}
        n = max(by_index) + 1 if num_classes is None else num_classes
        return n, [by_index.get(c, f"class{c}") for c in range(first, n)]
    if class_names is not None:
        names = [str(c) for c in class_names]
        n = len(names) + first if num_classes is None else num_classes
        if len(names) == n and not include_background:  # the list includes the background: drop it
            names = names[1:]
        if len(names) != n - first:
            raise ValueError(
                f"class_names has {len(class_names)} entries; expected {n - first} (the reported classes) "
                f"for num_classes={n}, include_background={include_background}."
            )
        return n, names
    if num_classes is None:
        raise ValueError("give num_classes or class_names.")
    return num_classes, [f"class{c}" for c in range(first, num_classes)]


def _key(label: str) -> str:
    """Class label as a metric key / CSV column part: spaces and symbols become ``_`` ("right kidney")."""
    return re.sub(r"[^\w.-]+", "_", label.strip()) or "class"


# ---------------------------------------------------------------------------------------------- metrics
class GlobalOverlap(IgniteMetricHandler):
    """MONAI metric handler: mean over classes of the global (pooled) Dice or Jaccard, counted on device.

    An ``IgniteMetricHandler`` around :class:`scse_monai.metrics.SegmentationCountsMetric`. Differences from
    ``monai.handlers.MeanDice`` (why this exists): pooled counts (the SE papers' global Dice) instead of a mean of
    per-case scores, label maps accepted without one-hot expansion, Jaccard from the same counts, per-class values
    published as separate scalars, and case names taken from the batch's meta data (timings against MONAI:
    ``docs/benchmarks.md``).

    Args:
        num_classes: number of classes including background; may be omitted when ``class_names`` is a
            mapping that covers every label.
        include_background: report class 0 too.
        metric_name: ``"dice"`` or ``"jaccard"``.
        class_names: names of the reported classes (list) or ``{"label index": name}`` (e.g. a bundle's
            ``channel_def``); used for the per-class keys ``"<name>_<class>"`` (spaces and symbols in a class
            name become ``_``: ``"right kidney"`` -> ``right_kidney``); default ``class<i>``.
        per_class: also put each class's value in ``engine.state.metrics``.
        save_details: put the case x class table into ``engine.state.metric_details[name]`` (float64 tensor,
            NaN where the class is absent from prediction and label of a case; what MONAI's ``MetricsSaver`` reads).
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``: batched tensors or lists of per-case
            ``(1 or C, ...)`` tensors (``monai.handlers.from_engine(["pred", "label"])``).

    Example::

        >>> handler = GlobalDice(num_classes=3)
        >>> handler.update((torch.tensor([[[0, 1, 2, 2]]]), torch.tensor([[[0, 1, 2, 1]]])))
        >>> handler.save_details = False
        >>> round(handler.compute(), 4)
        0.6667
    """

    def __init__(
        self,
        num_classes: int | None = None,
        include_background: bool = False,
        metric_name: str = "dice",
        class_names: Sequence[str] | Mapping[Any, str] | None = None,
        per_class: bool = True,
        save_details: bool = True,
        output_transform: Callable = lambda x: x,
    ) -> None:
        num_classes, self.class_labels = _resolve_classes(class_names, num_classes, include_background)
        metric = SegmentationCountsMetric(num_classes, include_background, metric_name)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)
        # ignite would unroll lists of per-case tensors into one update per case, without their meta data (case names);
        # set by hand because MONAI's IgniteMetricHandler does not pass ignite's Metric(skip_unrolling=...) argument on
        self._skip_unrolling = True
        self.num_classes = num_classes
        self.include_background = include_background
        self.metric_name = metric_name
        self.per_class = per_class
        self.last_result: dict[str, Any] | None = None

    @reinit__is_reduced
    def reset(self) -> None:
        super().reset()
        self.last_result = None

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Counts ``(y_pred, y)``, named after the cases of the attached engine's batch."""
        if len(output) != 2:
            raise ValueError(f"{type(self).__name__}: output_transform must give (y_pred, y), got {len(output)} items.")
        y_pred, y = output
        batch = self._engine.state.batch if self._engine is not None else None
        self.metric_fn(y_pred, y, names=batch_case_names(y_pred, y, batch))

    def compute(self) -> float:
        """Mean global score; the full :meth:`SegmentationCountsMetric.results` dict is kept in ``last_result``."""
        self.last_result = self.metric_fn.results()
        if self.save_details:
            if self._engine is None or self._name is None:
                raise RuntimeError("please call the attach() function to connect expected engine first.")
            self._engine.state.metric_details[self._name] = self.last_result[f"case_{self.metric_name}"]
        return float(self.last_result[f"mean_{self.metric_name}"])

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if self.per_class and self.last_result is not None:
            values = self.last_result[self.metric_name].tolist()
            for label, v in zip(self.class_labels, values, strict=True):
                engine.state.metrics[f"{name}_{_key(label)}"] = float(v)


class GlobalDice(GlobalOverlap):
    """:class:`GlobalOverlap` with ``metric_name="dice"``: mean global Dice, per-class Dice, per-case table."""

    def __init__(self, num_classes: int | None = None, include_background: bool = False, **kwargs: Any) -> None:
        super().__init__(num_classes, include_background, metric_name="dice", **kwargs)


class GlobalJaccard(GlobalOverlap):
    """:class:`GlobalOverlap` with ``metric_name="jaccard"``: mean global Jaccard (IoU), per class, per case."""

    def __init__(self, num_classes: int | None = None, include_background: bool = False, **kwargs: Any) -> None:
        super().__init__(num_classes, include_background, metric_name="jaccard", **kwargs)


# ---------------------------------------------------------------------------------------------- savers
class PerCaseMetricsSaver:
    """At an evaluator's ``EPOCH_COMPLETED``, write per-case Dice / Jaccard CSV, a summary CSV and a box plot.

    Files in ``output_dir`` (replaced atomically each time; written by rank 0 only, after all ranks' cases are
    gathered):

    - ``<prefix>_per_case.csv``: ``case, dice_<class>..., jaccard_<class>...`` (class names with spaces and
      symbols replaced by ``_``; empty cell = class absent from
      both prediction and label of that case);
    - ``<prefix>_summary.csv``: one row per class (and a ``mean`` row over classes): mean / std / median over
      cases (NaN cases left out; population std, as MONAI's ``MetricsSaver``), number of cases scored, and the
      global (pooled) Dice / Jaccard;
    - ``<prefix>_dice_boxplot.png``: per-class Dice distribution over cases.

    Why not ``monai.handlers.MetricsSaver``: it writes one metric's details at a time with generic
    ``class0..`` headers, no pooled score, no plot, and not atomically.

    The handler counts on its own (same on-device counting as :class:`GlobalDice`; cheap), so it does not
    depend on which metrics the evaluator has.

    Args:
        output_dir: folder for the files (created).
        class_names: names of the reported classes, a list (foreground classes, or all classes when
            ``include_background``) or ``{"label index": name}``.
        filename_prefix: file name prefix.
        num_classes: number of classes including background; default from ``class_names``.
        include_background: report class 0 too.
        output_transform: ``engine.state.output`` -> ``(y_pred, y)`` (default ``from_engine(["pred", "label"])``).
        image_key: batch key whose meta data names the case (``filename_or_obj``), if ``pred`` has none.
        boxplot: also write the PNG.

    Example::

        >>> saver = PerCaseMetricsSaver("eval_out", class_names=["liver", "right_kidney", "left_kidney", "spleen"])
        >>> saver.attach(evaluator)  # doctest: +SKIP
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str] | Mapping[Any, str],
        filename_prefix: str = "metrics",
        num_classes: int | None = None,
        include_background: bool = False,
        output_transform: Callable | None = None,
        image_key: str = "image",
        boxplot: bool = True,
    ) -> None:
        self.output_dir = str(output_dir)
        self.num_classes, self.class_labels = _resolve_classes(class_names, num_classes, include_background)
        self.filename_prefix = filename_prefix
        self.output_transform = output_transform or from_engine(["pred", "label"])
        self.image_key = image_key
        self.boxplot = boxplot
        self._counter = SegmentationCountsMetric(self.num_classes, include_background)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._counter.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    @torch.no_grad()
    def _update(self, engine: Engine) -> None:
        y_pred, y = self.output_transform(engine.state.output)
        self._counter(y_pred, y, names=batch_case_names(y_pred, y, engine.state.batch, self.image_key))

    def _save(self, engine: Engine) -> None:
        result = self._counter.results()  # collective under DDP: every rank takes part
        if idist.get_rank() == 0:
            self.write(result)

    def paths(self) -> dict[str, str]:
        """Paths of the files this saver writes."""
        p = os.path.join(self.output_dir, self.filename_prefix)
        return {"per_case": f"{p}_per_case.csv", "summary": f"{p}_summary.csv", "boxplot": f"{p}_dice_boxplot.png"}

    def write(self, result: Mapping[str, Any]) -> dict[str, str]:
        """Write the files from a :meth:`SegmentationCountsMetric.results` dict; returns their paths."""
        paths = self.paths()
        case_dice = np.asarray(result["case_dice"], dtype=np.float64)
        case_jac = np.asarray(result["case_jaccard"], dtype=np.float64)
        labels = [_key(c) for c in self.class_labels]
        header = ["case"] + [f"dice_{c}" for c in labels] + [f"jaccard_{c}" for c in labels]
        rows = [
            [name, *map(float, d), *map(float, j)]
            for name, d, j in zip(result["case_names"], case_dice, case_jac, strict=True)
        ]
        write_bytes_atomic(paths["per_case"], _csv_bytes(header, rows))
        header = ["class", "dice_mean", "dice_std", "dice_median", "jaccard_mean", "jaccard_std", "jaccard_median"]
        header += ["n_cases", "global_dice", "global_jaccard"]
        write_bytes_atomic(paths["summary"], _csv_bytes(header, self._summary_rows(result, case_dice, case_jac)))
        if self.boxplot:
            self._write_boxplot(paths["boxplot"], case_dice, float(result["mean_dice"]))
        else:
            paths.pop("boxplot")
        return paths

    def _summary_rows(self, result: Mapping[str, Any], case_dice: np.ndarray, case_jac: np.ndarray) -> list[list]:
        """One row per class and a ``mean`` row: mean / std / median over the scored cases, count, global scores."""

        def stats(a: np.ndarray) -> list[float]:
            valid = a[~np.isnan(a)]
            if valid.size == 0:
                return [math.nan, math.nan, math.nan]
            return [float(valid.mean()), float(valid.std()), float(np.median(valid))]

        rows = []
        glob_d = np.asarray(result["dice"], dtype=np.float64)
        glob_j = np.asarray(result["jaccard"], dtype=np.float64)
        for k, label in enumerate(self.class_labels):
            n = int((~np.isnan(case_dice[:, k])).sum())
            rows.append([_key(label), *stats(case_dice[:, k]), *stats(case_jac[:, k]), n, glob_d[k], glob_j[k]])
        # "mean" row: per case, the mean over the classes scored in that case
        with warnings.catch_warnings():  # a case without any scored class has no mean: NaN, without a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            case_mean_d = np.nanmean(case_dice, axis=1)
            case_mean_j = np.nanmean(case_jac, axis=1)
        rows.append(
            ["mean", *stats(case_mean_d), *stats(case_mean_j), int((~np.isnan(case_mean_d)).sum()),
             float(result["mean_dice"]), float(result["mean_jaccard"])]
        )  # fmt: skip
        return [[r[0], *map(_to_float, r[1:])] for r in rows]

    def _write_boxplot(self, path: str, case_dice: np.ndarray, mean_dice: float) -> None:
        labels = self.class_labels
        fig, (ax,) = _figure(width=max(5.0, 1.2 * len(labels)))
        ax.boxplot([case_dice[~np.isnan(case_dice[:, k]), k] for k in range(len(labels))], showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30 if len(labels) > 5 else 0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice per case")
        ax.set_title(f"Dice over {case_dice.shape[0]} cases (mean global Dice {mean_dice:.3f})")
        ax.grid(axis="y", alpha=0.3)
        _save_figure(fig, path)


def _to_float(v: Any) -> Any:
    return v if isinstance(v, int) else float(v)


class StopOnNonFiniteLoss:
    """Stops training at the first NaN or inf loss with a ``FloatingPointError`` naming the epoch and iteration.

    Attached at ``ITERATION_COMPLETED``, it raises before the epoch completes, so no checkpoint or ``model.pt``
    is written from the weights that step produced (the savers of :mod:`scse_monai.checkpoints` also refuse
    non-finite weights). ignite's ``TerminateOnNan`` ends the run quietly instead, with exit code 0.

    Args:
        loss_transform: ``engine.state.output`` -> loss (default ``from_engine(["loss"], first=True)``).

    Example::

        >>> StopOnNonFiniteLoss().attach(trainer)  # doctest: +SKIP
    """

    def __init__(self, loss_transform: Callable | None = None) -> None:
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach()
        if not bool(torch.isfinite(loss).all()):
            epoch, iteration = engine.state.epoch, engine.state.iteration
            of_epoch = iteration - (epoch - 1) * engine.state.epoch_length if engine.state.epoch_length else iteration
            raise FloatingPointError(
                f"training loss is {loss.float().mean().item()} at epoch {epoch}, iteration {iteration} "
                f"({of_epoch} of the epoch); training stopped, no checkpoint or model was saved from these weights. "
                "Check the inputs for NaN/inf voxels and the learning rate."
            )


class ExitOnInputError:
    """Under ``python -m monai.bundle``, ends the run with ``error: <message>`` (exit code 1) when an
    :class:`~scse_monai.errors.InputError` (a NaN voxel, a wrong shape; raised by
    :class:`~scse_monai.transforms.CheckInputd`) stopped the engine. Any other exception, and any exception in a
    library caller, is raised as it came, traceback and all.

    List it before ``StatsHandler``: ignite calls ``EXCEPTION_RAISED`` handlers in order, and ``StatsHandler``
    logs the traceback before it re-raises.

    Example bundle config::

        "handlers": [{"_target_": "scse_monai.handlers.ExitOnInputError"}, {"_target_": "StatsHandler"}]
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, e: BaseException) -> None:
        error = input_error_in(e)
        if error is not None and under_bundle_cli():
            # the user's input is at fault, not the code: the message names the file, a traceback would bury it
            raise SystemExit(f"error: {error}") from None
        raise e


class TrainingCurvePlotter:
    """Save training-loss and validation-metric curves (PNG + CSV) every N epochs and when training completes.

    MONAI's ``TensorBoardStatsHandler`` / ``MLFlowHandler`` log the same numbers to a tracking server; this
    handler leaves plain files next to the checkpoints, which is what people open after a run (no server).

    The mean training loss of each epoch is accumulated on device (no per-iteration ``.item()``). Validation
    metrics are read from ``evaluator.state.metrics`` each time the evaluator completes (numbers only, e.g. the
    key metric and the ``<name>_<class>`` entries of :class:`GlobalDice`). When the trainer resumes from
    a checkpoint, the rows of earlier epochs are read back from the CSV (at its first epoch, or at a validation
    before it: ``ValidationHandler(exec_at_start=True)``). Only rank 0 writes.

    Files: ``<prefix>.csv`` (``epoch, loss, <metric>...``) and ``<prefix>.png`` (loss left, metrics right).

    Args:
        output_dir: folder for the files (created).
        evaluator: the validation engine (``@validate#evaluator`` in a bundle); optional.
        metric_names: which evaluator metrics to record; default all numeric ones (numbers and one-element tensors).
        every_n_epochs: also save after every N trainer epochs (0: only at ``COMPLETED``).
        loss_transform: ``engine.state.output`` -> loss (default ``from_engine(["loss"], first=True)``).
        filename_prefix: file name prefix.

    Example::

        >>> plotter = TrainingCurvePlotter("runs/exp1", evaluator=evaluator, every_n_epochs=5)  # doctest: +SKIP
        >>> plotter.attach(trainer)  # doctest: +SKIP
    """

    def __init__(
        self,
        output_dir: str,
        evaluator: Engine | None = None,
        metric_names: Sequence[str] | None = None,
        every_n_epochs: int = 1,
        loss_transform: Callable | None = None,
        filename_prefix: str = "training_curves",
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be an integer >= 0, got {every_n_epochs!r}.")
        self.output_dir = str(output_dir)
        self.evaluator = evaluator
        self.metric_names = list(metric_names) if metric_names is not None else None
        self.every_n_epochs = every_n_epochs
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)
        self.filename_prefix = filename_prefix
        self.history: dict[int, dict[str, float]] = {}
        self._trainer: Engine | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._resumed_checked = False

    @property
    def csv_path(self) -> str:
        return os.path.join(self.output_dir, f"{self.filename_prefix}.csv")

    @property
    def png_path(self) -> str:
        return os.path.join(self.output_dir, f"{self.filename_prefix}.png")

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.save())
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def _restore_earlier_epochs(self, completed: int) -> None:
        """Once per run: when ``completed`` epochs were done before it (a resumed run), read their rows back."""
        if self._resumed_checked:
            return
        self._resumed_checked = True
        if completed > 0 and os.path.isfile(self.csv_path):
            with open(self.csv_path, newline="") as f:
                for row in csv.DictReader(f):
                    epoch = int(row.pop("epoch"))
                    if epoch <= completed and epoch not in self.history:
                        self.history[epoch] = {k: float(v) for k, v in row.items() if v not in ("", None)}

    def _epoch_started(self, engine: Engine) -> None:
        self._loss_sum, self._loss_n = None, 0
        # Here (or at a validation before it), not at STARTED, so that a checkpoint loader attached at STARTED
        # (in any order) has already restored the epoch: a resumed run keeps the curves of the earlier epochs.
        self._restore_earlier_epochs(engine.state.epoch - 1)

    def _iteration(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach().float().mean()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_n += 1

    def _epoch_completed(self, engine: Engine) -> None:
        if self._loss_sum is not None and self._loss_n:
            self.history.setdefault(engine.state.epoch, {})["loss"] = float(self._loss_sum) / self._loss_n
        if self.every_n_epochs and engine.state.epoch % self.every_n_epochs == 0:
            self.save()

    def _validated(self, evaluator: Engine) -> None:
        epoch = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
        # a validation before the first epoch (MONAI's ValidationHandler(exec_at_start=True)) saves the CSV: the
        # earlier epochs' rows are read back first, or that save would drop them
        self._restore_earlier_epochs(epoch)
        row = self.history.setdefault(epoch, {})
        for k, v in evaluator.state.metrics.items():
            scalar = isinstance(v, (int, float, np.number)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
            if scalar and (self.metric_names is None or k in self.metric_names):
                row[k] = float(v)
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and self._trainer is not None:
            self.save()

    def save(self) -> None:
        """Write the CSV and PNG now (rank 0 only; nothing when no epoch was recorded)."""
        if idist.get_rank() != 0 or not self.history:
            return
        epochs = sorted(self.history)
        metrics = sorted({k for e in epochs for k in self.history[e] if k != "loss"})
        rows = [[e, *(self.history[e].get(k, math.nan) for k in ["loss", *metrics])] for e in epochs]
        write_bytes_atomic(self.csv_path, _csv_bytes(["epoch", "loss", *metrics], rows))
        fig, (ax_loss, ax_metric) = _figure(ncols=2)
        pts = [(e, self.history[e]["loss"]) for e in epochs if "loss" in self.history[e]]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker="o", ms=3)
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
        for k in metrics:
            pts = [(e, self.history[e][k]) for e in epochs if k in self.history[e]]
            ax_metric.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k)
        ax_metric.set(xlabel="epoch", ylabel="validation metric", title="Validation metrics")
        if metrics:
            ax_metric.legend(fontsize="small")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax_loss, ax_metric):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _save_figure(fig, self.png_path)
