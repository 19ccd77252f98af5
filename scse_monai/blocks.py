"""Squeeze-and-excitation blocks of Roy et al. (MICCAI 2018, TMI 2019) for 1, 2 or 3 spatial dims.

Each maps ``x`` of shape ``(B, C, *spatial)`` to a recalibrated map of the same shape:

- :class:`ChannelSELayer` (cSE): ``x * sigmoid(W2 relu(W1 mean(x)))``, one gate per channel;
- :class:`SpatialSELayer` (sSE): ``x * sigmoid(conv1x1(x))``, one gate per position;
- :class:`ChannelSpatialSELayer` (scSE): both, aggregated by max-out (TMI), addition (MICCAI), product or concat.

MONAI ships only cSE (``monai.networks.blocks.ChannelSELayer``). The small gates are computed first, then applied with
plain PyTorch ops, so the blocks script, export to ONNX and compile with ``torch.compile(fullgraph=True)``. They are
registered in the :data:`SE` layer factory (``SE["scse"]``); :func:`get_se_layer` builds one by name through it.
"""

from __future__ import annotations

import inspect
import numbers

import torch
from monai.networks.layers.factories import Conv, LayerFactory
from torch import nn

__all__ = [
    "AGGREGATIONS",
    "SE",
    "SE_LAYER_NAMES",
    "ChannelSELayer",
    "ChannelSpatialSELayer",
    "SpatialSELayer",
    "get_se_layer",
]

#: scSE aggregations: max-out (TMI 2019), addition (MICCAI 2018), multiplication, concatenation + 1x1 convolution
AGGREGATIONS: tuple[str, ...] = ("max", "add", "mul", "concat")
#: options :func:`get_se_layer` accepts; each layer takes the ones in its signature
SE_OPTIONS: tuple[str, ...] = ("aggregation", "inplace", "reduction_ratio")
_SPATIAL_DIMS = (1, 2, 3)


# argument checks shared with the networks (one message for one mistake)
def check_spatial_dims(spatial_dims: int) -> None:
    integral = isinstance(spatial_dims, numbers.Integral) and not isinstance(spatial_dims, bool)
    if not integral or spatial_dims not in _SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be one of {_SPATIAL_DIMS}, got {spatial_dims!r}.")


def _check_inplace(inplace: bool) -> bool:
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace must be True or False, got {inplace!r}.")
    return inplace


def _write_over(inplace: bool) -> bool:
    # not while tracing: a trace keeps the ops, not the branch, and in-place ops would then fail with autograd on
    return inplace and not torch.is_grad_enabled() and not torch.jit.is_tracing()


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_input(x: torch.Tensor, spatial_dims: int, in_channels: int) -> None:
    if x.dim() != 2 + spatial_dims or x.shape[1] != in_channels:
        raise ValueError(
            f"expected an input of shape (B, {in_channels}, ...) with {spatial_dims} spatial dims, got {list(x.shape)}."
        )


def _check_aggregation(aggregation: str) -> str:
    if not isinstance(aggregation, str) or aggregation.lower() not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    return aggregation.lower()


class ChannelSELayer(nn.Module):
    """Channel squeeze-and-excitation (cSE): a global average pool, fully connected layers ``C -> C // r -> C``
    (with biases, ReLU between) and a sigmoid give one gate per channel, which scales the whole channel.

    Args:
        spatial_dims: number of spatial dimensions of the input (1, 2 or 3).
        in_channels: number of channels ``C`` of the input.
        reduction_ratio: ``r``; the hidden layer has ``C // r`` units, at least 1.
        inplace: with autograd off (``torch.no_grad``, ``inference_mode``), write the result over the input, as
            ``nn.ReLU(inplace=True)`` does, for inputs nothing else reads (the SE networks set it); else a new tensor.

    Example:
        >>> layer = ChannelSELayer(spatial_dims=2, in_channels=64, reduction_ratio=2)
        >>> layer(torch.randn(4, 64, 32, 32)).shape
        torch.Size([4, 64, 32, 32])
    """

    def __init__(self, spatial_dims: int, in_channels: int, reduction_ratio: int = 2, inplace: bool = False) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.inplace: bool = _check_inplace(inplace)
        check_positive_int("in_channels", in_channels)
        check_positive_int("reduction_ratio", reduction_ratio)
        hidden = in_channels // reduction_ratio
        if hidden < 1:
            raise ValueError(
                f"reduction_ratio={reduction_ratio} leaves {hidden} hidden units for in_channels={in_channels}; "
                f"allowed values are 1..{in_channels}."
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.reduce_dims: list[int] = list(range(2, 2 + spatial_dims))
        self.fc = nn.Sequential(
            nn.Linear(in_channels, hidden, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, in_channels, bias=True),
            nn.Sigmoid(),
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the channel gates, shape ``(B, C, 1, ...)``, broadcastable against ``x``."""
        _check_input(x, self.spatial_dims, self.in_channels)
        b, c = x.shape[0], x.shape[1]
        voxels = x.numel() // max(b * c, 1)  # per channel (x[0, 0] does not exist in an empty batch)
        # sum / n is the global average pool; mean's backward would write a full-size map, sum's is a broadcast view.
        # Half-precision inputs are summed in float32: a float16 sum overflows past 65504.
        total = x.sum(self.reduce_dims, dtype=torch.promote_types(x.dtype, torch.float32))
        y = self.fc((total / max(voxels, 1)).to(x.dtype))
        return y.view([b, c] + [1] * self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _write_over(self.inplace):
            return x.mul_(self.gate(x))
        return x * self.gate(x)


class SpatialSELayer(nn.Module):
    """Spatial squeeze-and-excitation (sSE): a 1x1 convolution (``C -> 1``, with bias) and a sigmoid give one gate
    per position, which scales every channel at that position.

    The weights live in :attr:`conv` (checkpoints name them ``conv.weight`` / ``conv.bias``); :meth:`gate` applies
    them as one batched matrix product without calling the module, so hooks or pruning set on it have no effect.

    Args:
        spatial_dims, in_channels: as in :class:`ChannelSELayer`.
        inplace: with autograd off, write the result over the input (see :class:`ChannelSELayer`).

    Example:
        >>> layer = SpatialSELayer(spatial_dims=3, in_channels=16)
        >>> layer(torch.randn(2, 16, 8, 8, 8)).shape
        torch.Size([2, 16, 8, 8, 8])
    """

    def __init__(self, spatial_dims: int, in_channels: int, inplace: bool = False) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        self.inplace: bool = _check_inplace(inplace)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, 1, kernel_size=1, bias=True)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the spatial gates, shape ``(B, 1, *spatial)``, broadcastable against ``x``."""
        # conv as a batched (1 x C) @ (C x voxels) product: same values, much faster on CPU (docs/benchmarks.md)
        _check_input(x, self.spatial_dims, self.in_channels)
        b, c = x.shape[0], x.shape[1]
        bias = self.conv.bias
        assert bias is not None  # built with bias=True; the assert tells TorchScript so
        weight = self.conv.weight.view(1, 1, c).expand(b, 1, c)
        logits = torch.baddbmm(bias.view(1, 1, 1), weight, x.flatten(2))
        return torch.sigmoid(logits).view([b, 1] + list(x.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _write_over(self.inplace):
            return x.mul_(self.gate(x))
        return x * self.gate(x)


class ChannelSpatialSELayer(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (scSE): ``x`` is recalibrated by the channel gates
    ``gc`` of :attr:`cse` and by the spatial gates ``gs`` of :attr:`sse`, and the two maps are aggregated.

    Args:
        spatial_dims, in_channels, reduction_ratio: as in :class:`ChannelSELayer`.
        aggregation: ``"max"``: elementwise maximum (max-out; TMI 2019 and the authors' code), computed as
            ``x*gs + relu(x*(gc-gs))``; ``"add"``: sum (MICCAI 2018); ``"mul"``: product; ``"concat"``:
            concatenation along channels, then a 1x1 convolution ``2C -> C`` (with bias).
        inplace: with autograd off, write the result over the input (see :class:`ChannelSELayer`); not with
            ``"concat"``, whose result is a convolution's output. Its :attr:`cse` and :attr:`sse` stay out of place.

    Example:
        >>> layer = ChannelSpatialSELayer(spatial_dims=2, in_channels=64, aggregation="max")
        >>> x = torch.randn(1, 64, 16, 16)
        >>> torch.allclose(layer(x), torch.maximum(layer.cse(x), layer.sse(x)))
        True
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        reduction_ratio: int = 2,
        aggregation: str = "max",
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.aggregation: str = _check_aggregation(aggregation)
        # the concat aggregation's result comes from its 1x1 convolution: there is nothing to write over x
        self.inplace: bool = _check_inplace(inplace) and self.aggregation != "concat"
        self.cse = ChannelSELayer(spatial_dims, in_channels, reduction_ratio)
        self.sse = SpatialSELayer(spatial_dims, in_channels)
        # Only "concat" has its own weights; an Identity keeps the module tree TorchScript-friendly.
        self.fuse: nn.Module = (
            Conv[Conv.CONV, spatial_dims](2 * in_channels, in_channels, kernel_size=1, bias=True)
            if self.aggregation == "concat"
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gc = self.cse.gate(x)  # (B, C, 1, ...)
        gs = self.sse.gate(x)  # (B, 1, *spatial)
        if self.aggregation == "concat":
            return self.fuse(torch.cat([x * gc, x * gs], dim=1))
        # one formula per aggregation; inplace only writes its last steps over x, after every read of x
        inplace = _write_over(self.inplace)
        if self.aggregation == "max":
            # max(a, b) == b + relu(a - b), a - b == x * (gc - gs): the same values (to rounding) and a backward of
            # cheap elementwise ops (torch.maximum's is not); at ties (x == 0) the gradient goes to the sSE branch,
            # a subgradient. relu_ writes over the product, which no backward needs; inplace writes it over the
            # full-size gc + (-gs). Adding -gs keeps the backward's negation on the small gate; no local name, so
            # out of place that map is freed before the addcmul.
            if inplace:
                return torch.addcmul(torch.relu_((gc + gs.neg()).mul_(x)), x, gs, out=x)
            return torch.addcmul(torch.relu_(x * (gc + gs.neg())), x, gs)
        xs = x * gs
        if self.aggregation == "add":
            return torch.addcmul(xs, x, gc, out=x) if inplace else torch.addcmul(xs, x, gc)
        return x.mul_(gc).mul_(xs) if inplace else x * gc * xs


SE = LayerFactory(name="SE", description="Squeeze-and-excitation layers of Roy et al. (cSE, sSE, scSE).")
SE.add_factory_class("NONE", nn.Identity)
SE.add_factory_class("CSE", ChannelSELayer)
SE.add_factory_class("SSE", SpatialSELayer)
SE.add_factory_class("SCSE", ChannelSpatialSELayer)

#: SE layer names (case-insensitive), the :data:`SE` factory's names
SE_LAYER_NAMES: tuple[str, ...] = tuple(name.lower() for name in SE.names)


def get_se_layer(name: str | None, spatial_dims: int, in_channels: int, **kwargs) -> nn.Module:
    """Builds an SE layer by name, through the :data:`SE` layer factory (``torch.nn.Identity`` for ``"none"``).

    Args:
        name: ``None`` or ``"none"`` (identity), ``"cse"``, ``"sse"`` or ``"scse"``; case-insensitive.
        spatial_dims, in_channels: as in :class:`ChannelSELayer`.
        kwargs: ``reduction_ratio`` (cSE, scSE), ``aggregation`` (scSE) and ``inplace`` (all). They are validated
            for every variant, and ignored by variants that do not use them, so one set of options configures all.

    Example:
        >>> get_se_layer("scse", 2, 32, reduction_ratio=4, aggregation="add")
        ChannelSpatialSELayer(...)
    """
    key = "none" if name is None else name
    if not isinstance(key, str) or key.lower() not in SE_LAYER_NAMES:
        raise ValueError(f"SE layer name must be None or one of {SE_LAYER_NAMES} (case-insensitive), got {name!r}.")
    unknown = set(kwargs) - set(SE_OPTIONS)
    if unknown:
        raise ValueError(f"unexpected SE options {sorted(unknown)}; allowed: {list(SE_OPTIONS)}.")
    check_spatial_dims(spatial_dims)
    check_positive_int("in_channels", in_channels)
    # validate options even where the chosen variant does not use them, so a typo never passes silently
    _check_inplace(kwargs.get("inplace", False))
    _check_aggregation(kwargs.get("aggregation", "max"))
    check_positive_int("reduction_ratio", kwargs.get("reduction_ratio", 2))
    layer_type = SE[key]
    accepted = inspect.signature(layer_type).parameters
    return layer_type(spatial_dims, in_channels, **{k: v for k, v in kwargs.items() if k in accepted})
