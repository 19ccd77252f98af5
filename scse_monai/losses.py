"""Loss of the SE papers: cross-entropy weighted by median frequency balancing, plus Dice loss.

Roy et al. (MICCAI 2018, TMI 2019) train with a class-weighted logistic (cross-entropy) loss plus a Dice loss;
the class weights counter the imbalance between the background and small organs. The weights come from the
training set's class voxel counts (``"class_voxel_counts"`` in ``datalist.json``, written by
``scse_monai.data``), by median frequency balancing (Eigen and Fergus, ICCV 2015)::

    freq_c = count_c / sum(counts)        weight_c = median(freq) / freq_c

:class:`WeightedDiceCELoss` is ``monai.losses.DiceCELoss`` with those weights, loadable by ``_target_`` from a
bundle config. MONAI 1.6.1's ``DiceCELoss(weight=...)`` applies ``weight`` to both the cross-entropy and the
Dice term; the papers weight only the cross-entropy, which is the default here (``weight_dice=False``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

__all__ = ["WeightedDiceCELoss", "median_frequency_weights", "weights_from_datalist"]


def median_frequency_weights(class_counts: Mapping[Any, int] | Sequence[int] | torch.Tensor) -> list[float]:
    """Median frequency balancing weights from per-class voxel counts.

    ``freq_c = count_c / total``; ``weight_c = median(freq) / freq_c``. The median is taken over the classes
    that occur (count > 0), the plain median (mean of the two middle values for an even number of classes).
    Classes with count 0 get weight 0: they never occur as a target, so their weight does not change the
    cross-entropy, and a zero keeps them from dominating a weighted Dice.

    Args:
        class_counts: voxel count per class, as a sequence indexed by class, or a mapping ``{class index (int
            or str): count}`` such as ``datalist.json``'s ``"class_voxel_counts"`` (every index from 0 to the
            largest must be present).

    Returns:
        one weight per class, in class order.

    Raises:
        ValueError: for negative or non-integer counts, missing class indices, or all counts 0.

    Example::

        >>> median_frequency_weights({"0": 900, "1": 60, "2": 40})
        [0.06666666666666667, 1.0, 1.5]
    """
    if isinstance(class_counts, Mapping):
        try:
            by_index = {int(k): v for k, v in class_counts.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"class_counts keys must be class indices, got {list(class_counts)}.") from err
        missing = sorted(set(range(max(by_index, default=-1) + 1)) - set(by_index))
        if missing or not by_index or min(by_index) < 0:
            raise ValueError(f"class_counts must have the classes 0..N-1; missing {missing or 'all'}.")
        counts = [by_index[c] for c in range(len(by_index))]
    else:
        counts = torch.as_tensor(class_counts).tolist() if isinstance(class_counts, torch.Tensor) else class_counts
        counts = list(counts)
    values = []
    for c, v in enumerate(counts):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or v < 0 or not float(v).is_integer():
            raise ValueError(f"class_counts[{c}] must be a non-negative integer voxel count, got {v!r}.")
        values.append(int(v))
    total = sum(values)
    if total == 0:
        raise ValueError("class_counts are all zero: no voxels to compute class frequencies from.")
    freqs = [v / total for v in values]
    present = sorted(f for f in freqs if f > 0)
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
    return [median / f if f > 0 else 0.0 for f in freqs]


def weights_from_datalist(path: str | os.PathLike | Mapping[str, Any]) -> list[float]:
    """Median frequency weights from a datalist's ``"class_voxel_counts"``.

    Args:
        path: ``datalist.json`` path (as written by ``scse_monai.data``), or its already loaded content. A datalist
            file without ``"class_voxel_counts"`` (a plain decathlon ``dataset.json``) has its training labels
            counted now (:func:`scse_monai.bundle_support.class_voxel_counts`).

    Returns:
        one weight per class, see :func:`median_frequency_weights`.

    Raises:
        FileNotFoundError / ValueError: naming the file when it is missing, not JSON, or has no usable counts.

    Example::

        >>> weights_from_datalist({"class_voxel_counts": {"0": 900, "1": 60, "2": 40}})
        [0.06666666666666667, 1.0, 1.5]
    """
    if isinstance(path, Mapping):
        doc, where = path, "datalist"
    else:
        from scse_monai.data.datalist import read_datalist  # here: scse_monai.data is heavy to import

        doc, where = read_datalist(path), os.fspath(path)
    counts = doc.get("class_voxel_counts")
    if counts is None and not isinstance(path, Mapping):
        # a plain decathlon dataset.json: count the voxels of its training labels now
        from scse_monai.bundle_support import class_voxel_counts

        counts = class_voxel_counts(os.fspath(path))
    if counts is None:
        raise ValueError(f"{where} has no 'class_voxel_counts' (re-prepare the dataset with scse_monai.data).")
    try:
        return median_frequency_weights(counts)
    except ValueError as err:
        raise ValueError(f"{where}: class_voxel_counts: {err}") from err


class WeightedDiceCELoss(DiceCELoss):
    """``monai.losses.DiceCELoss`` with median-frequency-balanced cross-entropy weights.

    Args:
        datalist: ``datalist.json`` path (or its loaded content) whose ``"class_voxel_counts"`` give the
            weights via :func:`weights_from_datalist`.
        class_weights: explicit per-class weights instead (one per output channel, background included; > 0,
            as a batch of only zero-weight classes would have a NaN cross-entropy). A count of weights other
            than the input's channels is a ``ValueError`` at the first call.
        weight_dice: also weight the Dice term (MONAI's ``DiceCELoss(weight=...)`` behaviour). Default False:
            only the cross-entropy is weighted, as in the SE papers.
        weight_power: raise the weights to this power. 1 is median frequency balancing as in the papers;
            smaller powers soften it. Whole abdominal volumes are ~87 % background, so plain balancing gives
            background a weight near 0.01 and a short training run over-segments every organ; with 0.5 the
            liver was still predicted 1.5x its true volume on CHAOS T2. ``recipes/report.json`` uses 0.25 and
            ``recipes/paper.json`` 1; the bundle's own recipe trains with unweighted Dice + CE (the weighted
            loss over-segmented unseen patients; see bundle/docs/README.md).
        dice_ce_kwargs: any other ``DiceCELoss`` argument (``to_onehot_y``, ``softmax``, ``include_background``,
            ``lambda_dice``, ``lambda_ce``, ...); not ``weight``. With ``include_background=False`` MONAI drops
            ``weight[0]`` for the Dice term; the cross-entropy always uses all classes.

    With neither ``datalist`` nor ``class_weights`` this is a plain ``DiceCELoss``. The weights are moved to
    the input's device on first use, so a loss built on CPU by a config works with a CUDA network.

    Example::

        >>> loss = WeightedDiceCELoss(class_weights=[0.1, 1.0, 2.0], to_onehot_y=True, softmax=True)
        >>> loss(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))).shape
        torch.Size([])
    """

    def __init__(
        self,
        datalist: str | os.PathLike | Mapping[str, Any] | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        weight_dice: bool = False,
        weight_power: float = 1.0,
        **dice_ce_kwargs: Any,
    ) -> None:
        if "weight" in dice_ce_kwargs:
            raise ValueError("WeightedDiceCELoss: give class_weights= (or datalist=), not weight=.")
        if datalist is not None and class_weights is not None:
            raise ValueError("WeightedDiceCELoss: give either datalist or class_weights, not both.")
        if isinstance(weight_power, bool) or not isinstance(weight_power, (int, float)) or not weight_power > 0:
            raise ValueError(f"weight_power must be a number > 0, got {weight_power!r}.")
        weights = weights_from_datalist(datalist) if datalist is not None else class_weights
        weight = None
        if weights is not None:
            weight = torch.as_tensor(weights, dtype=torch.float32).flatten()
            if weight.numel() == 0 or not all(math.isfinite(w) and w >= 0 for w in weight.tolist()):
                raise ValueError(f"class weights must be finite and >= 0, got {weight.tolist()}.")
            if class_weights is not None and not bool((weight > 0).all()):
                # a batch whose targets are all of zero-weight classes has a weighted cross-entropy of 0 / 0 = NaN
                raise ValueError(
                    f"class_weights must be > 0, got {weight.tolist()}: a batch of only zero-weight classes "
                    "(e.g. a background-only crop) would have a NaN cross-entropy."
                )
            weight = weight**weight_power
        super().__init__(weight=weight, **dice_ce_kwargs)
        self.weight_dice = weight_dice
        if weight is not None and not weight_dice:
            self.dice.class_weight = None  # cross-entropy only (the buffer is re-registered as None)

    @property
    def class_weights(self) -> list[float] | None:
        """The cross-entropy class weights (``None`` when unweighted)."""
        w = self.cross_entropy.weight
        return None if w is None else w.tolist()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.cross_entropy.weight
        if w is not None and w.numel() != input.shape[1]:
            raise ValueError(
                f"WeightedDiceCELoss has {w.numel()} class weights for an input of {input.shape[1]} channels: give one "
                "weight per output channel, background included (for datalist=, its class_voxel_counts' classes)."
            )
        if w is not None and w.device != input.device:
            self.to(input.device)
        return super().forward(input, target)
