"""Dimension-generic padding, cropping and max-unpooling used by the SE encoder-decoders.

``torch.nn.MaxUnpool{1,2,3}d`` is written by hand here because in torch 2.13 it fails ``torch.jit.script``
(``isIntList()`` internal assert) and its ``output_size`` check breaks traced ONNX export; a scatter into a
zero map is the same operation for any number of spatial dimensions, scripts, and exports as ONNX
``ScatterElements``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_to", "max_unpool", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pads the spatial dimensions of ``x`` at their end up to the next multiple of ``multiple``.

    Args:
        x: tensor of shape ``(B, C, *spatial)``.
        multiple: every spatial size of the result is divisible by this.

    Returns:
        ``x`` itself when no padding is needed, else the padded tensor.

    Example::

        >>> pad_to_multiple(torch.zeros(1, 1, 17, 16), 16).shape
        torch.Size([1, 1, 32, 16])
    """
    pads: list[int] = []
    needed = False
    # F.pad lists the last dimension first
    for d in range(x.dim() - 1, 1, -1):
        extra = (multiple - x.shape[d] % multiple) % multiple
        needed = needed or extra > 0
        pads.append(0)
        pads.append(extra)
    if not needed:
        return x
    return F.pad(x, pads)


def crop_to(x: torch.Tensor, spatial_size: list[int]) -> torch.Tensor:
    """Crops the spatial dimensions of ``x`` to ``spatial_size``, keeping their start.

    Args:
        x: tensor of shape ``(B, C, *spatial)``.
        spatial_size: target size of each spatial dimension (not larger than ``x``'s).

    Example::

        >>> crop_to(torch.zeros(1, 1, 32, 16), [17, 16]).shape
        torch.Size([1, 1, 17, 16])
    """
    for d in range(len(spatial_size)):
        if x.shape[d + 2] != spatial_size[d]:
            x = x.narrow(d + 2, 0, spatial_size[d])
    return x


def max_unpool(x: torch.Tensor, indices: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """Inverse of a max-pool with window and stride ``scale``: each value goes back to its argmax position.

    Args:
        x: pooled tensor ``(B, C, *spatial)``.
        indices: the indices returned by ``max_pool*d(..., return_indices=True)`` (flat per ``(b, c)`` plane).
        scale: pooling window and stride; the output is ``scale`` times larger in every spatial dimension.

    Returns:
        Tensor ``(B, C, *[s * scale for s in spatial])`` with zeros at the positions that were not maxima.

    Example::

        >>> y, idx = torch.nn.functional.max_pool2d(torch.arange(16.0).view(1, 1, 4, 4), 2, return_indices=True)
        >>> max_unpool(y, idx)[0, 0, 1]
        tensor([ 0.,  5.,  0.,  7.])
    """
    b, c = x.shape[0], x.shape[1]
    out_spatial: list[int] = []
    numel = 1
    for s in x.shape[2:]:
        out_spatial.append(s * scale)
        numel = numel * s * scale
    out = x.new_zeros([b, c, numel])
    out = out.scatter(2, indices.flatten(2), x.flatten(2))
    return out.view([b, c] + out_spatial)
