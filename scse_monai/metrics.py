"""On-device Dice / Jaccard accumulation for multi-class segmentation, per case and pooled.

:class:`SegmentationCountsMetric` (a MONAI ``CumulativeIterationMetric``) keeps, for every case seen since
``reset()``, three voxel counts per class: the intersection ``|P_c & T_c|``, the prediction size ``|P_c|`` and the
target size ``|T_c|``.
From them it derives

- the *global* (pooled) Dice and Jaccard per class, summing the counts over every voxel of every case: the
  "global Dice" the SE papers (Roy et al., MICCAI 2018 / TMI 2019) report;
- the per-case Dice and Jaccard (case x class), with ``NaN`` where a class is absent from both the prediction
  and the target of that case (there is nothing to score; the value is left out of per-class means, medians
  and standard deviations by ``nan``-aware reductions).

Why not ``monai.metrics.DiceMetric``: it needs one-hot ``(B, C, ...)`` float inputs (or expands label maps to
them internally), stores per-case *scores* rather than counts (so no pooled Dice), and has no Jaccard. Counting
label maps directly is a ``scatter_add_`` into a ``B x C x C`` confusion matrix (timings against
``DiceMetric``: ``docs/benchmarks.md``), and the counts stay on the input's device until :meth:`compute`: there is
no ``.item()`` / ``.cpu()`` (no host synchronisation) per update.

Under ``torch.distributed`` the per-case rows of all ranks are gathered by MONAI's ``Cumulative`` buffers
(``evenly_divisible_all_gather``) and the case names by ``string_list_all_gather``, so the pooled counts cover
every rank's cases. For ignite engines, :class:`scse_monai.handlers.GlobalDice` / ``GlobalJaccard`` wrap it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import string_list_all_gather

__all__ = ["METRIC_NAMES", "SegmentationCountsMetric", "case_name_from_meta", "dice_jaccard_from_counts"]

#: the scores :class:`SegmentationCountsMetric` derives from its counts
METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard")


#: float32 holds every integer up to 2**24 exactly, so a float32 sum of that many 0/1 values is exact whatever the
#: order of summation; longer rows are summed in slices of this length
_EXACT_FLOAT32_COUNT = 1 << 24


#: voxels per case counted at a time from label maps
_COUNT_CHUNK = 1 << 18


def _count_ones(indicator: torch.Tensor) -> torch.Tensor:
    """Exact int64 count of the ones in a 1-D float32 0/1 map."""
    n = indicator.shape[0]
    counts = [
        indicator[i : i + _EXACT_FLOAT32_COUNT].sum().to(torch.int64) for i in range(0, max(n, 1), _EXACT_FLOAT32_COUNT)
    ]
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum()


def dice_jaccard_from_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and Jaccard from ``(..., 3)`` counts ``[intersection, prediction, target]``.

    Both are ``NaN`` where prediction and target are empty (``prediction + target == 0``).

    Args:
        counts: integer or float tensor whose last dimension holds intersection, prediction and target sizes.

    Returns:
        ``(dice, jaccard)``, float64 tensors of shape ``counts.shape[:-1]``.

    Example::

        >>> dice_jaccard_from_counts(torch.tensor([[2, 3, 3], [0, 0, 0]]))
        (tensor([0.6667,    nan], dtype=torch.float64), tensor([0.5000,    nan], dtype=torch.float64))
    """
    c = counts.to(torch.float64)
    inter, pred, target = c[..., 0], c[..., 1], c[..., 2]
    size_sum = pred + target
    nan = torch.full_like(size_sum, math.nan)
    empty = size_sum == 0
    dice = torch.where(empty, nan, 2.0 * inter / size_sum.clamp_min(1))
    jaccard = torch.where(empty, nan, inter / (size_sum - inter).clamp_min(1))
    return dice, jaccard


def case_name_from_meta(meta: Any, default: str) -> str:
    """Case name from a MONAI meta dict (``filename_or_obj``): the file or folder name without extensions.

    Args:
        meta: a ``MetaTensor.meta`` / ``*_meta_dict`` mapping, or ``None``.
        default: returned when no file name is found.

    Example::

        >>> case_name_from_meta({"filename_or_obj": "/data/imagesTs/case_007.nii.gz"}, "case_0")
        'case_007'
    """
    if not isinstance(meta, dict) and not hasattr(meta, "get"):
        return default
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):  # a collated (batched) meta dict holds one entry per case
        name = name[0] if len(name) == 1 else None
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return default
    base = os.path.basename(os.path.normpath(str(name)))
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".npy", ".npz", ".png", ".gz"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _unique_names(names: Sequence[str | None]) -> list[str | None]:
    """``names`` with the second and later uses of a name suffixed ``#2``, ``#3``, ...; warns if any repeats.

    Unnamed cases (``None`` / ``""``) are left as they are.
    """
    seen: set[str] = set()
    unique: list[str | None] = []
    repeated: dict[str, None] = {}  # in order of first repeat
    for name in names:
        new, k = name, 1
        while new and new in seen:  # also steps over a given name that looks like a suffixed one
            k += 1
            new = f"{name}#{k}"
        if new != name:
            repeated[name] = None
        if new:
            seen.add(new)
        unique.append(new)
    if repeated:
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        shown = ", ".join(map(repr, list(repeated)[:5])) + more
        warnings.warn(
            f"case names repeat: {shown}; the later cases are named '<name>#2', '<name>#3', ... "
            "Give the files unique names (e.g. case_00000.nii.gz, not case_00000/imaging.nii.gz) to tell them apart.",
            stacklevel=2,
        )
    return unique


class SegmentationCountsMetric(CumulativeIterationMetric):
    """Accumulate per-case, per-class voxel counts on device; derive global and per-case Dice / Jaccard.

    A MONAI ``CumulativeIterationMetric``: ``metric(y_pred, y)`` adds a batch, :meth:`aggregate` gives the mean
    global score named by ``metric_name`` (what ``IgniteMetricHandler`` records), :meth:`results` everything.

    Args:
        num_classes: number of classes **including** the background (label values ``0 .. num_classes - 1``);
            at least 2.
        include_background: whether class 0 is reported. The background is always counted (it is part of
            the one-hot / label map), only left out of the results when False.
        metric_name: the score :meth:`aggregate` returns, ``"dice"`` or ``"jaccard"``.

    ``metric(y_pred, y, names=None)`` takes, for each of ``y_pred`` and ``y`` independently,

    - a label map ``(B, 1, *spatial)`` (integer or float class indices; float values are rounded down, so
      ``1.7`` counts as class 1 and ``-0.5`` is out of range), or
    - a one-hot / multi-label mask ``(B, num_classes, *spatial)`` (any dtype, nonzero = inside), or
    - a sequence of per-case ``(1 or C, *spatial)`` tensors (MONAI's decollated batches; the cases may have
      different spatial shapes);

    and optional case names, one per case. It returns the batch's ``(B, C, 3)`` counts.

    :meth:`results` returns a dict with float64 CPU tensors / floats:

    - ``"classes"``: the reported class indices (``1 .. C-1`` without background);
    - ``"dice"``, ``"jaccard"``: ``(K,)`` per class, from counts pooled over every case (global Dice);
      ``NaN`` for a class never present in any prediction or target;
    - ``"mean_dice"``, ``"mean_jaccard"``: mean of the above over the classes that are not ``NaN``;
    - ``"case_dice"``, ``"case_jaccard"``: ``(N, K)`` per case, ``NaN`` where the class is absent from both
      the case's prediction and target;
    - ``"counts"``: ``(N, K, 3)`` int64 per-case ``[intersection, prediction, target]``;
    - ``"case_names"``: ``N`` names (given with the batches, or ``"case_<i>"``); a repeated name warns and its
      second and later uses become ``"<name>#2"``, ``"<name>#3"``, ...

    Label maps with values outside ``[0, num_classes)`` are flagged on device (no host sync) and make
    :meth:`results` / :meth:`aggregate` raise ``ValueError``.

    Example::

        >>> m = SegmentationCountsMetric(num_classes=3)
        >>> _ = m(torch.tensor([[[0, 1, 2, 2]]]), torch.tensor([[[0, 1, 2, 1]]]))
        >>> r = m.results()
        >>> r["dice"], r["mean_dice"]
        (tensor([0.6667, 0.6667], dtype=torch.float64), 0.6666666666666666)
    """

    def __init__(self, num_classes: int, include_background: bool = False, metric_name: str = "dice") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}.")
        if metric_name not in METRIC_NAMES:
            raise ValueError(f"metric_name must be one of {METRIC_NAMES}, got {metric_name!r}.")
        self.num_classes = num_classes
        self.include_background = bool(include_background)
        self.metric_name = metric_name
        super().__init__()

    def reset(self) -> None:
        """Forget every case seen so far."""
        super().reset()
        self._names: list[str | None] = []
        self._invalid: torch.Tensor | None = None

    def __call__(  # type: ignore[override]
        self,
        y_pred: torch.Tensor | Sequence[torch.Tensor],
        y: torch.Tensor | Sequence[torch.Tensor] | None = None,
        names: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """Counts a batch (or a list of per-case tensors) of predictions against targets; returns its counts.

        Args:
            y_pred: predicted label map ``(B, 1, ...)`` or one-hot ``(B, C, ...)``, or a sequence of per-case
                ``(1 or C, ...)`` tensors.
            y: ground truth, same conventions (may use the other encoding than ``y_pred``).
            names: optional case names, one per case, used in :meth:`results`'s ``"case_names"``.
        """
        if y is None or isinstance(y_pred, torch.Tensor) != isinstance(y, torch.Tensor):
            raise TypeError("y_pred and y must both be tensors or both be sequences of per-case tensors.")
        n = y_pred.shape[0] if isinstance(y_pred, torch.Tensor) else len(y_pred)
        if not isinstance(y_pred, torch.Tensor) and len(y_pred) != len(y):
            raise ValueError(f"y_pred has {len(y_pred)} cases but y has {len(y)}.")
        if names is not None and len(names) != n:
            raise ValueError(f"got {len(names)} names for {n} cases.")
        if n == 0:
            return torch.zeros(0, self.num_classes, 3, dtype=torch.int64)
        counts = super().__call__(y_pred, y)  # added to the buffer
        self._names.extend(names if names is not None else [None] * n)
        return counts

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self._counts(y_pred, y)

    # ------------------------------------------------------------------ counting
    def _label_map(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(
                f"{what} must have 1 channel (label map) or num_classes={self.num_classes} channels (one-hot), "
                f"got shape {tuple(x.shape)}."
            )
        # floor, not truncation: a float label in (-1, 0) is below the range (-0.5 -> -1, not class 0); 1.7 -> 1
        return x.flatten(1).floor().long() if x.is_floating_point() else x.flatten(1).to(torch.int64)

    def _check_range(self, labels: torch.Tensor) -> None:
        """Remember (on device, no host sync) whether some label is outside ``[0, num_classes)``."""
        low, high = labels.aminmax()
        self._flag_invalid(((low < 0) | (high >= self.num_classes)).to(torch.int64))

    def _flag_invalid(self, bad: torch.Tensor) -> None:
        """Adds ``bad`` (0-d int64 on device: how many label maps had out-of-range values) to the running count."""
        self._invalid = bad if self._invalid is None else self._invalid + bad

    def _counts_from_labels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # scatter_add_ into a per-case confusion matrix: one pass over the voxels instead of C comparisons (and no
        # one-hot expansion, which MONAI's DiceMetric needs); torch.bincount would synchronise with the host on CUDA.
        # Labels are clamped to [-1, C], so the matrix's outer rows and columns count the out-of-range ones: that is
        # the range check, with no second pass over the inputs. _COUNT_CHUNK voxels per case at a time keep the
        # int64 index map at 2 MiB per case (in cache), where a batch-sized one takes 8 bytes per voxel.
        b, c = pred.shape[0], self.num_classes
        side = c + 2  # classes -1 (below range), 0 .. C-1, C (above range)
        cm = torch.zeros(b, side * side, dtype=torch.int64, device=pred.device)
        one = torch.ones(1, 1, dtype=torch.int64, device=pred.device)
        for start in range(0, pred.shape[1], _COUNT_CHUNK):
            stop = start + _COUNT_CHUNK
            idx = torch.clamp(pred[:, start:stop], -1, c)
            idx.add_(torch.clamp(target[:, start:stop], -1, c), alpha=side).add_(side + 1)  # (target+1)*side + pred+1
            cm.scatter_add_(1, idx, one.expand_as(idx))
        cm = cm.view(b, side, side)  # [case, target class, predicted class]
        outside_pred = cm[:, :, 0].sum() + cm[:, :, -1].sum()
        outside_target = cm[:, 0, :].sum() + cm[:, -1, :].sum()
        self._flag_invalid((outside_pred > 0).to(torch.int64) + (outside_target > 0).to(torch.int64))
        cm = cm[:, 1:-1, 1:-1]
        return torch.stack([cm.diagonal(dim1=1, dim2=2), cm.sum(1), cm.sum(2)], dim=-1)

    def _class_rows(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
        """``(B, C or 1, N)`` view of a one-hot map or label map, and whether it is one-hot."""
        if x.shape[1] == self.num_classes:
            return x.flatten(2), True
        labels = self._label_map(x, what)
        self._check_range(labels)
        return labels.unsqueeze(1), False

    def _counts_per_class_row(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Counts when one input (or both) is one-hot: one case and class at a time, in two reused buffers.

        Each row of each input becomes a float32 0/1 indicator (nonzero one-hot entry, or voxels of that label)
        written into a buffer that every row reuses, instead of whole-batch boolean or float maps: boolean sums are
        slow on CPU, and fresh batch-sized maps are paged in on every call.
        """
        p_rows, p_one_hot = self._class_rows(y_pred, "y_pred")
        t_rows, t_one_hot = self._class_rows(y, "y")
        n = p_rows.shape[2]
        buffers = torch.empty(2, n, dtype=torch.float32, device=y_pred.device)

        def indicator(rows: torch.Tensor, one_hot: bool, b: int, k: int, out: torch.Tensor) -> torch.Tensor:
            return torch.ne(rows[b, k], 0, out=out) if one_hot else torch.eq(rows[b, 0], k, out=out)

        cases = []
        for b in range(p_rows.shape[0]):
            per_class = []
            for k in range(self.num_classes):
                ip = indicator(p_rows, p_one_hot, b, k, buffers[0])
                it = indicator(t_rows, t_one_hot, b, k, buffers[1])
                predicted, target = _count_ones(ip), _count_ones(it)
                per_class.append(torch.stack([_count_ones(ip.mul_(it)), predicted, target]))
            cases.append(torch.stack(per_class))
        return torch.stack(cases)

    def _counts(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.ndim < 3 or y.ndim != y_pred.ndim:
            raise ValueError(
                f"y_pred and y must both be (B, 1 or C, *spatial); got shapes {tuple(y_pred.shape)} and "
                f"{tuple(y.shape)}."
            )
        if y_pred.shape[0] != y.shape[0] or y_pred.shape[2:] != y.shape[2:]:
            raise ValueError(
                f"y_pred and y differ in batch or spatial size: {tuple(y_pred.shape)} vs {tuple(y.shape)}."
            )
        # plain tensors: MetaTensor bookkeeping slows every op down and the meta data is not needed here
        y_pred, y = y_pred.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
        if y.device != y_pred.device:
            y = y.to(y_pred.device, non_blocking=True)
        c = self.num_classes
        if y_pred.shape[1] != c and y.shape[1] != c:
            return self._counts_from_labels(self._label_map(y_pred, "y_pred"), self._label_map(y, "y"))
        return self._counts_per_class_row(y_pred, y)

    # ------------------------------------------------------------------ results
    def _gathered_invalid(self) -> int:
        invalid = self._invalid if self._invalid is not None else torch.zeros((), dtype=torch.int64)
        if idist.get_world_size() > 1:
            invalid = idist.all_reduce(invalid.to(idist.device()).reshape(1))
        return int(invalid.sum())

    def results(self) -> dict[str, Any]:
        """Gathers (under DDP: every rank must call it) and turns the counts into scores; see the class docstring.

        Raises:
            ValueError: if no case was accumulated or some label was outside ``[0, num_classes)``.
        """
        rows = self.get_buffer()  # every rank's cases, in rank order
        invalid = self._gathered_invalid()
        names = self._names
        if idist.get_world_size() > 1:
            names = [n or None for n in string_list_all_gather([n or "" for n in names])]
        if invalid:
            raise ValueError(
                f"{invalid} label map(s) given to the metric had values outside [0, {self.num_classes}); "
                "check num_classes and the label maps."
            )
        if rows is None or rows.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.results() called before any update.")
        first = 0 if self.include_background else 1
        rows = rows[:, first:].cpu()
        dice, jaccard = dice_jaccard_from_counts(rows.sum(0))
        case_dice, case_jaccard = dice_jaccard_from_counts(rows)
        return {
            "classes": list(range(first, self.num_classes)),
            "dice": dice,
            "jaccard": jaccard,
            "mean_dice": float(torch.nanmean(dice)),
            "mean_jaccard": float(torch.nanmean(jaccard)),
            "case_dice": case_dice,
            "case_jaccard": case_jaccard,
            "counts": rows,
            "case_names": [n if n else f"case_{i}" for i, n in enumerate(_unique_names(names))],
        }

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """The mean over classes of the global ``metric_name`` score, a float64 scalar tensor."""
        return torch.tensor(self.results()[f"mean_{self.metric_name}"], dtype=torch.float64)
