"""Dictionary transforms for the SE networks' data pipeline, built on MONAI.

They are plain classes usable by ``_target_`` in a MONAI bundle config:

- :class:`CheckInputd`: refuse an input a network cannot segment (non-finite voxels, wrong channels or dimensions)
  with an error naming the file, instead of a silent all-background result.
- :class:`RandFlipLeftRightd`: left-right flip that also swaps left/right label values (e.g. right kidney 2 <->
  left kidney 3). MONAI's RandFlipd flips but does not know that a flipped right kidney is a left one.
- :class:`RandLabelIntensityScaled`: a random intensity factor per labelled organ (disease changes one organ's
  signal, not the whole image's); MONAI's intensity transforms act on the whole image.

Everything else is MONAI's own: ``ScaleIntensityRangePercentilesd`` (MR) or ``ScaleIntensityRanged`` (CT window)
for normalisation, ``RandCropByPosNegLabeld`` with ``spatial_size=(-1, -1, 1)`` + ``SqueezeDimd(dim=-1)`` for
foreground-weighted 2D slices (as the bundle's ``train.json`` does), ``MapLabelValued`` for label remapping (e.g.
a VISCERAL label map -> CHAOS indices).

Orientation and spacing: after ``Orientationd(axcodes="RAS")`` axis 0 runs toward the patient's right, axis 1
anterior, axis 2 superior, so axial slices are along the last spatial axis and the left-right axis is spatial
axis 0. Resample in-plane only (``Spacingd(pixdim=(s, s, -1))`` keeps the slice spacing), with
``mode=("bilinear", "nearest")``: masks are only ever resampled with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import GaussianSmooth, MapTransform, Randomizable

from scse_monai.errors import InputError

__all__ = [
    "CheckInputd",
    "RandFlipLeftRightd",
    "RandLabelIntensityScaled",
]


class RandFlipLeftRightd(Randomizable, MapTransform):
    """Random left-right mirror of a patient that swaps paired left/right labels.

    Anatomy is not left-right symmetric (a flipped abdomen has its liver on the left), so Roy et al. train
    without flips and the default ``prob`` is 0. If flips are used, this keeps the labels truthful: the mirrored
    right kidney lies on the left and becomes a left kidney. The arrays are flipped and their affine (and MONAI's
    record of applied transforms) kept: the sample is a mirrored patient, consistent in world space too (MONAI's
    ``Flip`` would update the affine, putting the swapped left kidney back on the patient's right). So it is a
    training augmentation only: ``Invertd`` does not undo it, and it must not be used at test time.

    Args:
        keys: keys to flip (image and labels).
        label_keys: keys whose labels are swapped (default: ``"label"`` if it is in ``keys``); each must be in
            ``keys``, and every flipped label must be named here, or it is flipped without the swap. A label map (one
            channel) has the values of each pair exchanged; a one-hot label (several channels) its pair's channels.
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
        label_keys: KeysCollection | None = None,
        swap_pairs: Sequence[Sequence[int]] = ((2, 3),),
        prob: float = 0.0,
        spatial_axis: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if label_keys is None:  # default: "label", when it is flipped
            label_keys = [k for k in self.keys if k == "label"]
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        if not self.label_keys <= set(self.keys):
            # a label left out of keys would stay unflipped under its flipped image
            missing = sorted(self.label_keys - set(self.keys))
            raise ValueError(f"label_keys {missing} are not in keys {list(self.keys)}.")
        self.swap_pairs = [tuple(int(v) for v in p) for p in swap_pairs]
        self.prob = float(prob)
        self.spatial_axis = spatial_axis
        self._do = False

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob

    def _swap(self, label: torch.Tensor) -> torch.Tensor:
        out = label.clone()
        for a, b in self.swap_pairs:
            if label.shape[0] > 1:  # one-hot: the pair's channels change places
                out[[a, b]] = label[[b, a]]
            else:
                out[label == a] = b
                out[label == b] = a
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.flip(torch.as_tensor(d[key]), dims=[self.spatial_axis + 1])  # keeps a MetaTensor's meta
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
        scse_monai.errors.InputError: image: 1 of 1 voxels are not finite (NaN/inf); no network can segment them
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
                    f"{name}: {bad} of {values.numel()} voxels are not finite (NaN/inf); no network can segment them"
                )
