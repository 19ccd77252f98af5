"""Dictionary transforms for the SE networks' data pipeline, built on MONAI.

They are plain classes usable by ``_target_`` in a MONAI bundle config:

- :class:`NormalizeModalityd`: per-modality intensity normalisation (CT: HU window -> [0, 1]; MR: per-volume
  percentile scaling or z-score, per channel). Wraps MONAI's ScaleIntensityRange / ScaleIntensityRangePercentiles /
  NormalizeIntensity so that one config entry switches with the dataset's modality.
- :class:`RandForegroundSlicesd`: 2D slices from a 3D volume, foreground slices oversampled. MONAI has no single
  transform for this; it is MONAI's ``RandCropByPosNegLabeld`` with ``spatial_size`` full in-plane and 1 along
  the slice axis, followed by ``SqueezeDimd``, packaged as one class so the pair cannot be misconfigured (slice
  axis in the crop and in the squeeze must agree).
- :class:`CheckInputd`: refuse an input a network cannot segment (non-finite voxels, wrong channels or dimensions)
  with an error naming the file, instead of a silent all-background result.
- :class:`RandFlipLeftRightd`: left-right flip that also swaps left/right label values (e.g. right kidney 2 <->
  left kidney 3). MONAI's RandFlipd flips but does not know that a flipped right kidney is a left one.
- :class:`RandLabelIntensityScaled`: a random intensity factor per labelled organ (disease changes one organ's
  signal, not the whole image's); MONAI's intensity transforms act on the whole image.

Label remapping needs nothing new: use MONAI's ``MapLabelValued`` (e.g. a VISCERAL label map -> CHAOS indices).

Orientation and spacing: after ``Orientationd(axcodes="RAS")`` axis 0 runs toward the patient's right, axis 1
anterior, axis 2 superior, so axial slices are along the last spatial axis (``slice_axis=2``) and the left-right
axis is spatial axis 0. Resample in-plane only (``Spacingd(pixdim=(s, s, -1))`` keeps the slice spacing), with
``mode=("bilinear", "nearest")``: masks are only ever resampled with nearest neighbour.

Example (train, for a 2D network; ``modality`` comes from the datalist)::

    LoadImaged(keys=["image", "label"]) -> EnsureChannelFirstd -> Orientationd(axcodes="RAS")
    -> Spacingd(pixdim=(1.5, 1.5, -1), mode=("bilinear", "nearest"))
    -> NormalizeModalityd(keys="image", modality="MR")
    -> ResizeWithPadOrCropd(spatial_size=(256, 256, -1))
    -> RandForegroundSlicesd(keys=["image", "label"], label_key="label", num_samples=8, pos=2, neg=1)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Flip,
    GaussianSmooth,
    MapTransform,
    NormalizeIntensity,
    RandCropByPosNegLabeld,
    Randomizable,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SqueezeDimd,
)

from scse_monai.errors import InputError

__all__ = [
    "CheckInputd",
    "NormalizeModalityd",
    "RandForegroundSlicesd",
    "RandFlipLeftRightd",
    "RandLabelIntensityScaled",
    "CT_ABDOMEN_WINDOW",
]

#: Abdominal soft-tissue window (level 40 HU, width 400 HU).
CT_ABDOMEN_WINDOW = (-160.0, 240.0)


class NormalizeModalityd(MapTransform):
    """Intensity normalisation chosen by modality.

    - ``CT``: clip to the HU window ``ct_window`` and scale it to [0, 1] (values are HU, see data preparation).
    - ``MR`` with ``mr_method="percentile"``: per volume and channel, map the ``lower``/``upper`` percentiles to
      0/1 and clip (robust to the bright outliers and bias field of MR).
    - ``MR`` with ``mr_method="zscore"``: per volume and channel, subtract the mean, divide by the std.

    Args:
        keys: image keys.
        modality: ``"CT"`` or ``"MR"`` (case-insensitive; ``"MRI"``, ``"T1"``, ``"T2"`` count as MR).
        ct_window: (min, max) HU for CT.
        mr_method: ``"percentile"`` or ``"zscore"``.
        lower: lower percentile for MR.
        upper: upper percentile for MR.
        allow_missing_keys: don't raise if a key is missing.

    Example:
        >>> t = NormalizeModalityd(keys="image", modality="CT")
        >>> float(t({"image": torch.tensor([[[-1000.0, 40.0, 3000.0]]])})["image"][0, 0, 1])
        0.5
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "MR",
        ct_window: Sequence[float] = CT_ABDOMEN_WINDOW,
        mr_method: str = "percentile",
        lower: float = 1.0,
        upper: float = 99.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        mod = str(modality).upper()
        if mod == "CT":
            self.op = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        elif mod in ("MR", "MRI", "T1", "T2") or mod.startswith("MR"):
            if mr_method == "percentile":
                self.op = ScaleIntensityRangePercentiles(lower, upper, 0.0, 1.0, clip=True, channel_wise=True)
            elif mr_method == "zscore":
                self.op = NormalizeIntensity(channel_wise=True)
            else:
                raise ValueError(f"mr_method must be 'percentile' or 'zscore', got {mr_method!r}")
        else:
            raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class RandForegroundSlicesd(Randomizable, MapTransform):
    """Sample ``num_samples`` 2D slices from channel-first 3D volumes, foreground slices more often.

    A voxel is drawn as the centre: with probability ``pos / (pos + neg)`` a foreground voxel of ``label_key``
    (label > 0), otherwise a background voxel; the slice through it along ``slice_axis`` is returned with that
    axis removed. Foreground slices are thus chosen in proportion to their foreground area. Built on MONAI's
    ``RandCropByPosNegLabeld`` (crop ``(-1, -1, 1)``) + ``SqueezeDimd``.

    Args:
        keys: keys to slice (image and label).
        label_key: label used to find foreground.
        num_samples: slices per volume (returns a list of dicts).
        pos: weight of foreground-centred slices.
        neg: weight of background-centred slices.
        slice_axis: spatial axis (0, 1, 2) across which slices are taken; 2 = axial after ``Orientationd("RAS")``.
        image_key: if given, background centres are drawn only where ``image > image_threshold`` (inside the body).
        image_threshold: threshold for ``image_key``.
        allow_missing_keys: don't raise if a key is missing.

    Example:
        >>> t = RandForegroundSlicesd(["image", "label"], label_key="label", num_samples=2)
        >>> out = t({"image": torch.rand(1, 8, 8, 5), "label": torch.ones(1, 8, 8, 5)})
        >>> len(out), tuple(out[0]["image"].shape)
        (2, (1, 8, 8))
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        num_samples: int = 4,
        pos: float = 2.0,
        neg: float = 1.0,
        slice_axis: int = 2,
        image_key: str | None = None,
        image_threshold: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        size = [-1, -1, -1]
        size[slice_axis] = 1
        self.cropper = RandCropByPosNegLabeld(
            keys=keys,
            label_key=label_key,
            spatial_size=size,
            pos=pos,
            neg=neg,
            num_samples=num_samples,
            image_key=image_key,
            image_threshold=image_threshold,
            allow_missing_keys=allow_missing_keys,
        )
        self.squeeze = SqueezeDimd(keys=keys, dim=slice_axis + 1, allow_missing_keys=allow_missing_keys)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:  # randomness lives in the wrapped cropper
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        return [self.squeeze(s) for s in self.cropper(data)]


class RandFlipLeftRightd(Randomizable, MapTransform):
    """Random left-right flip that swaps paired left/right label values.

    Anatomy is not left-right symmetric (a flipped abdomen has its liver on the left), so Roy et al. train
    without flips and the default ``prob`` is 0. If flips are used, this keeps the labels truthful: the flipped
    right kidney lies on the other side and becomes a left kidney.

    Args:
        keys: keys to flip (image and labels).
        label_keys: keys whose values are swapped (subset of ``keys``).
        swap_pairs: label value pairs to exchange; CHAOS: ``((2, 3),)`` (right kidney, left kidney).
        prob: flip probability.
        spatial_axis: the left-right spatial axis (0 after ``Orientationd("RAS")``, also for 2D slices).
        allow_missing_keys: don't raise if a key is missing.

    Example:
        >>> t = RandFlipLeftRightd(["label"], label_keys=["label"], swap_pairs=[(2, 3)], prob=1.0)
        >>> t({"label": torch.tensor([[[2], [0], [1]]])})["label"].flatten().tolist()
        [1, 0, 3]
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = ("label",),
        swap_pairs: Sequence[Sequence[int]] = ((2, 3),),
        prob: float = 0.0,
        spatial_axis: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.swap_pairs = [tuple(int(v) for v in p) for p in swap_pairs]
        self.prob = float(prob)
        self.flip = Flip(spatial_axis=spatial_axis)
        self._do = False

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob

    def _swap(self, label: torch.Tensor) -> torch.Tensor:
        out = label.clone()
        for a, b in self.swap_pairs:
            out[label == a] = b
            out[label == b] = a
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do:
            return d
        for key in self.key_iterator(d):
            d[key] = self.flip(d[key])
            if key in self.label_keys:
                d[key] = self._swap(d[key])
        return d


class RandLabelIntensityScaled(Randomizable, MapTransform):
    """Multiply the intensity of each labelled structure by its own random factor.

    Disease changes one organ's signal and not its neighbours' (e.g. iron overload darkens liver and spleen on
    T2 while the kidneys stay bright), which no whole-image intensity transform can imitate. This is a light form
    of the per-label intensity randomisation of SynthSeg (Billot et al., Medical Image Analysis 2023), applied to
    real images: with probability ``prob`` every foreground label gets a factor drawn log-uniformly from
    ``factors``; label masks are Gaussian-smoothed (``sigma`` pixels) so that no artificial step marks the
    boundary. MONAI's intensity transforms all act on the whole image, hence this class.

    Args:
        keys: image keys to scale.
        label_key: the label map (same spatial shape as the images, one channel).
        prob: probability of scaling a sample.
        factors: (min, max) factor, sampled log-uniformly.
        sigma: Gaussian smoothing of the masks, in pixels (0: sharp masks).
        allow_missing_keys: don't raise if a key is missing.

    Example:
        >>> t = RandLabelIntensityScaled("image", prob=1.0, factors=(0.5, 0.5), sigma=0.0)
        >>> out = t({"image": torch.ones(1, 2, 2), "label": torch.tensor([[[0, 1], [2, 0]]])})
        >>> out["image"].flatten().tolist()
        [1.0, 0.5, 0.5, 1.0]
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        prob: float = 0.3,
        factors: Sequence[float] = (0.25, 1.5),
        sigma: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0 < factors[0] <= factors[1]:
            raise ValueError(f"factors must satisfy 0 < min <= max, got {tuple(factors)}")
        self.label_key = label_key
        self.prob = float(prob)
        self.log_range = (float(np.log(factors[0])), float(np.log(factors[1])))
        self.smooth = GaussianSmooth(sigma) if sigma > 0 else None
        self._do = False

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob

    def _field(self, label: torch.Tensor) -> torch.Tensor:
        field = torch.ones_like(label, dtype=torch.float32)
        for value in torch.unique(label).tolist():
            if value == 0:
                continue
            mask = (label == value).float()
            if self.smooth is not None:
                mask = torch.as_tensor(self.smooth(mask))
            field = field + (float(np.exp(self.R.uniform(*self.log_range))) - 1.0) * mask
        return field

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do:
            return d
        field = self._field(torch.as_tensor(d[self.label_key]))
        for key in self.key_iterator(d):
            d[key] = d[key] * field.to(device=d[key].device)
        return d


class CheckInputd(MapTransform):
    """Refuse an input image that the network cannot segment, with an ``InputError`` naming the file.

    NaN or inf voxels pass MONAI's percentile normalisation and the network and come out as an all-background
    label map, without a warning; a 2D image or one with a different number of channels fails deep inside the
    inferer. Put this right after ``EnsureChannelFirstd``: inputs must be channel-first.

    Args:
        keys: image keys.
        channels: expected number of channels, or ``None`` for any.
        spatial_dims: expected number of spatial dimensions, or ``None`` for any.
        allow_missing_keys: don't raise if a key is missing.

    Example:
        >>> CheckInputd(keys="image", channels=1)({"image": torch.tensor([[[[float("nan")]]]])})
        Traceback (most recent call last):
        ...
        scse_monai.errors.InputError: image: 1 of 1 voxels are not finite (NaN/inf); inference refuses non-finite input
    """

    def __init__(
        self,
        keys: KeysCollection,
        channels: int | None = None,
        spatial_dims: int | None = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = channels
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            self._check(d[key], key)
        return d

    def _check(self, image: torch.Tensor, key: Hashable) -> None:
        meta = getattr(image, "meta", {}) or {}
        name = f"{key} {meta['filename_or_obj']}" if meta.get("filename_or_obj") else str(key)
        shape = tuple(image.shape)
        if self.spatial_dims is not None and len(shape) - 1 != self.spatial_dims:
            raise InputError(f"{name}: expected a {self.spatial_dims}D image with channels first, got shape {shape}")
        if self.channels is not None and shape[0] != self.channels:
            raise InputError(f"{name}: expected {self.channels} channel(s), got {shape[0]} (shape {shape})")
        values = torch.as_tensor(image)
        if values.is_floating_point():
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise InputError(
                    f"{name}: {bad} of {values.numel()} voxels are not finite (NaN/inf); inference refuses "
                    "non-finite input"
                )
