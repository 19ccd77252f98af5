"""Squeeze-and-excitation blocks of Roy et al. (MICCAI 2018, TMI 2019) for any number of spatial dims.

Each block takes a feature map ``x`` of shape ``(B, C, *spatial)`` and returns a recalibrated map of the
same shape:

- :class:`ChannelSELayer` (cSE) squeezes space (global average pool), excites channels:
  ``x * sigmoid(W2 relu(W1 mean(x)))``.
- :class:`SpatialSELayer` (sSE) squeezes channels (1x1 convolution), excites positions:
  ``x * sigmoid(conv1x1(x))``.
- :class:`ChannelSpatialSELayer` (scSE) combines both recalibrated maps by max-out (journal version),
  addition (MICCAI version), multiplication or concatenation followed by a 1x1 convolution.

MONAI ships only a channel SE block (``monai.networks.blocks.ChannelSELayer``); sSE and scSE are written
here. The gates are computed first (they are small: ``(B, C, 1, ...)`` and ``(B, 1, *spatial)``), and the
full-size feature map is touched as few times as possible. On CPU, scSE with max-out runs on compiled kernels
when they are built (:mod:`scse_monai.cpu_kernels`; eager mode, float32/float64, maps of at least
:data:`KERNEL_MIN_ELEMENTS` elements); everywhere else (GPU, TorchScript, other dtypes) on PyTorch ops.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv, LayerFactory
from torch import nn

from scse_monai import cpu_kernels

__all__ = [
    "AGGREGATIONS",
    "SE_LAYER_NAMES",
    "ChannelSELayer",
    "ChannelSpatialSELayer",
    "SpatialSELayer",
    "get_se_layer",
]

AGGREGATIONS: tuple[str, ...] = ("max", "add", "mul", "concat")
SE_LAYER_NAMES: tuple[str, ...] = ("none", "cse", "sse", "scse")
_SPATIAL_DIMS = (1, 2, 3)


#: Maps of at least this many elements (4 MiB of float32) are aggregated chunk by chunk on CPU (inference, and
#: max-out training through ``_FusedScSEMaxOut``); smaller ones stay in cache anyway, and there the per-chunk
#: Python overhead made the chunked path slower than plain ops.
CHUNKED_MIN_ELEMENTS = 1 << 20
#: Elements per chunk (2 MiB of float32): above torch's parallel grain size, so every op of a chunk still uses all
#: intra-op threads (with chunks at the grain size each op ran on one thread, and 2 threads did the naive form
#: faster), and few enough chunks that the fork-joins per call stay in the tens. Measured on 2 cores, idle.
CHUNK_ELEMENTS = 1 << 19
#: Maps of at least this many elements use the compiled CPU kernels (max-out, when built); below, their fixed
#: per-call cost (a few small ops more than the PyTorch path) was not paid back (measured on 2 cores: at
#: 4 x 64 x 16 x 16 the kernels took 1.1-1.3x the PyTorch path's time, at 4 x 64 x 32 x 32 0.8x in training).
KERNEL_MIN_ELEMENTS = 1 << 18


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in _SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be one of {_SPATIAL_DIMS}, got {spatial_dims!r}.")


def _check_inplace(inplace: bool) -> bool:
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace must be True or False, got {inplace!r}.")
    return inplace


def _check_in_channels(in_channels: int) -> None:
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")


class ChannelSELayer(nn.Module):
    """Channel squeeze-and-excitation (cSE).

    A global average pool squeezes each channel to one number; two fully connected layers
    (``C -> C // reduction_ratio -> C``, with biases, ReLU between) and a sigmoid turn those into one
    gate per channel, which scales the whole channel.

    Args:
        spatial_dims: number of spatial dimensions of the input (1, 2 or 3).
        in_channels: number of channels ``C`` of the input.
        reduction_ratio: ``r``; the hidden layer has ``C // r`` units, at least 1.
        inplace: with autograd off (``torch.no_grad``, ``torch.inference_mode``), write the result over the input
            instead of a new tensor, as ``nn.ReLU(inplace=True)`` does; for inputs nothing else reads afterwards
            (the SE networks set it). With autograd on, the result is always a new tensor.

    Example::

        >>> layer = ChannelSELayer(spatial_dims=2, in_channels=64, reduction_ratio=2)
        >>> layer(torch.randn(4, 64, 32, 32)).shape
        torch.Size([4, 64, 32, 32])
    """

    def __init__(self, spatial_dims: int, in_channels: int, reduction_ratio: int = 2, inplace: bool = False) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        self.inplace: bool = _check_inplace(inplace)
        _check_in_channels(in_channels)
        if isinstance(reduction_ratio, bool) or not isinstance(reduction_ratio, int) or reduction_ratio < 1:
            raise ValueError(f"reduction_ratio must be a positive integer, got {reduction_ratio!r}.")
        hidden = in_channels // reduction_ratio
        if hidden < 1:
            raise ValueError(
                f"reduction_ratio={reduction_ratio} leaves {hidden} hidden units for in_channels={in_channels}; "
                f"allowed values are 1..{in_channels}."
            )
        self.spatial_dims = spatial_dims
        # a sum over the spatial dims / their size is the global average pool; on CPU it is several times faster than
        # AdaptiveAvgPool{1,2,3}d(1) for large maps
        self.reduce_dims: list[int] = list(range(2, 2 + spatial_dims))
        self.fc = nn.Sequential(
            nn.Linear(in_channels, hidden, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, in_channels, bias=True),
            nn.Sigmoid(),
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the channel gates, shape ``(B, C, 1, ...)``, broadcastable against ``x``."""
        b, c = x.shape[0], x.shape[1]
        n = 1
        for d in self.reduce_dims:
            n = n * x.shape[d]
        # sum / n, not mean: mean's backward writes a full-size grad / n map; sum's is an expanded view
        y = self.fc(x.sum(self.reduce_dims) / max(n, 1))
        return y.view([b, c] + [1] * self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and not torch.is_grad_enabled():
            return x.mul_(self.gate(x))
        return x * self.gate(x)


class SpatialSELayer(nn.Module):
    """Spatial squeeze-and-excitation (sSE).

    A 1x1 convolution (``C -> 1``, with bias) and a sigmoid give one gate per position, which scales
    every channel at that position.

    Args:
        spatial_dims: number of spatial dimensions of the input (1, 2 or 3).
        in_channels: number of channels ``C`` of the input.
        inplace: with autograd off, write the result over the input (see :class:`ChannelSELayer`).

    Example::

        >>> layer = SpatialSELayer(spatial_dims=3, in_channels=16)
        >>> layer(torch.randn(2, 16, 8, 8, 8)).shape
        torch.Size([2, 16, 8, 8, 8])
    """

    def __init__(self, spatial_dims: int, in_channels: int, inplace: bool = False) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        _check_in_channels(in_channels)
        self.inplace: bool = _check_inplace(inplace)
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, 1, kernel_size=1, bias=True)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the spatial gates, shape ``(B, 1, *spatial)``, broadcastable against ``x``."""
        bias = self.conv.bias
        if x.is_contiguous() and bias is not None:
            b, c = x.shape[0], x.shape[1]
            y = _sse_gate_flat(x.reshape(b, c, -1), self.conv.weight, bias)
            return y.reshape([b, 1] + list(x.shape[2:]))
        return torch.sigmoid(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and not torch.is_grad_enabled():
            return x.mul_(self.gate(x))
        return x * self.gate(x)


class ChannelSpatialSELayer(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (scSE).

    The input is recalibrated by the channel gates of :attr:`cse` and by the spatial gates of :attr:`sse`,
    and the two recalibrated maps are aggregated:

    - ``"max"``: elementwise maximum (max-out; the TMI 2019 version and the authors' code),
    - ``"add"``: sum (the MICCAI 2018 version),
    - ``"mul"``: elementwise product,
    - ``"concat"``: concatenation along channels, then a 1x1 convolution ``2C -> C`` (with bias).

    ``block(x)`` equals, e.g. for ``"max"``, ``torch.maximum(block.cse(x), block.sse(x))``.

    With ``"max"`` on CPU the block uses the compiled kernels of :mod:`scse_monai.cpu_kernels` when they are built
    (set ``use_cpu_kernels = False`` on an instance to keep it on PyTorch ops).

    Args:
        spatial_dims: number of spatial dimensions of the input (1, 2 or 3).
        in_channels: number of channels ``C`` of the input.
        reduction_ratio: reduction ratio ``r`` of the channel SE's hidden layer.
        aggregation: one of ``"max"``, ``"add"``, ``"mul"``, ``"concat"``.
        inplace: with autograd off, write the result over the input (see :class:`ChannelSELayer`); not with
            ``"concat"``, whose result is a convolution's output. Its :attr:`cse` and :attr:`sse` stay out of place.

    Example::

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
        if not isinstance(aggregation, str) or aggregation.lower() not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
        self.aggregation: str = aggregation.lower()
        # the concat aggregation's result comes from its 1x1 convolution: there is nothing to write over x
        self.inplace: bool = _check_inplace(inplace) and self.aggregation != "concat"
        # on CPU, maps of at least chunked_min_elements are aggregated chunk by chunk at inference, and with
        # max-out the whole block runs as one autograd node in training (eager mode); instance attributes, not
        # globals, so that TorchScript sees them
        self.chunked_min_elements: int = CHUNKED_MIN_ELEMENTS
        self.chunk_elements: int = CHUNK_ELEMENTS
        # max-out on CPU uses the compiled kernels of scse_monai.cpu_kernels when they are built (eager mode)
        self.use_cpu_kernels: bool = True
        self.kernel_min_elements: int = KERNEL_MIN_ELEMENTS
        self.cse = ChannelSELayer(spatial_dims, in_channels, reduction_ratio)
        self.sse = SpatialSELayer(spatial_dims, in_channels)
        # Only "concat" has its own weights; an Identity keeps the module tree TorchScript-friendly.
        self.fuse: nn.Module = (
            Conv[Conv.CONV, spatial_dims](2 * in_channels, in_channels, kernel_size=1, bias=True)
            if self.aggregation == "concat"
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript does not compile this branch
            if self.aggregation == "max" and self._kernels_apply(x):
                return self._kernel_max_out(x)
        chunked = x.device.type == "cpu" and x.is_contiguous() and x.numel() >= self.chunked_min_elements
        if self.aggregation == "max" and chunked and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._fused_max_out(x)
        gc = self.cse.gate(x)  # (B, C, 1, ...)
        gs = self.sse.gate(x)  # (B, 1, *spatial)
        if self.aggregation == "concat":
            return self.fuse(torch.cat([x * gc, x * gs], dim=1))
        if self.inplace and not torch.is_grad_enabled():
            # over x: the gates are computed, x is read once more and written once, no full-size allocation
            if chunked:
                return _aggregate_in_chunks(x, gc, gs, self.aggregation, self.chunk_elements, out=x)
            if self.aggregation == "mul":
                return x.mul_(x).mul_(gc).mul_(gs)
            xs = x * gs  # the one full-size temporary
            if self.aggregation == "add":
                return x.mul_(gc).add_(xs)
            return torch.maximum(x.mul_(gc), xs, out=x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or gc.requires_grad or gs.requires_grad)
        if not needs_grad:
            if chunked:
                return _aggregate_in_chunks(x, gc, gs, self.aggregation, self.chunk_elements)
            # small maps (they stay in cache) and other devices: one or two allocations instead of three
            out = x * gc
            if self.aggregation == "add":
                return out.addcmul_(x, gs)
            if self.aggregation == "mul":
                return out.mul_(x).mul_(gs)
            return torch.maximum(out, x * gs, out=out)
        if self.aggregation == "add":
            # x*gc + x*gs as one product and one fused multiply-add: no full-size (gc + gs) temporary
            return torch.addcmul(x * gc, x, gs)
        if self.aggregation == "mul":
            # (x*gc) * (x*gs) == (x*x) * (gc*gs); gc*gs is the only other full-size tensor.
            return (x * x) * (gc * gs)
        # max(a, b) == b + relu(a - b) with a - b == x * (gc - gs): the same values (to rounding), and a backward of
        # cheap elementwise ops. torch.maximum's backward (where / masked_fill / eq for both inputs) made forward +
        # backward of the block 2.7x slower (4 x 64 x 128 x 128, 1 thread). Where x * gc == x * gs (x == 0, e.g.
        # after a ReLU) the gradient w.r.t. x goes to the sSE branch instead of half to each: another subgradient.
        return torch.addcmul(torch.relu(x * (gc - gs)), x, gs)

    @torch.jit.unused
    def _kernels_apply(self, x: torch.Tensor) -> bool:
        # whether the compiled CPU kernels take this call: eager mode (not traced or compiled), a large enough
        # contiguous float32/float64 CPU map with weights of its dtype, no CPU autocast, and the kernels built
        conv = self.sse.conv
        return (
            self.use_cpu_kernels
            and x.numel() >= self.kernel_min_elements
            and x.device.type == "cpu"
            and x.dtype in cpu_kernels.DTYPES
            and x.dim() >= 3
            and x.is_contiguous()
            and conv.weight.dtype == x.dtype
            and conv.bias is not None
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()  # torch.compile / torch.export see PyTorch ops only
            and not torch.is_autocast_enabled("cpu")
            and cpu_kernels.available()
        )

    @torch.jit.unused
    def _kernel_max_out(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.sse.conv
        if not torch.is_grad_enabled():  # inference: no autograd node
            return _kernel_max_out_forward(x, self.cse.fc, conv.weight, conv.bias, inplace=self.inplace)[0]
        return _KernelScSEMaxOut.apply(x, self.cse.fc, conv.weight, conv.bias, *self.cse.fc.parameters())

    @torch.jit.unused
    def _fused_max_out(self, x: torch.Tensor) -> torch.Tensor:
        """Max-out on CPU with autograd enabled (eager only; TorchScript takes the autograd formula above)."""
        conv = self.sse.conv
        return _FusedScSEMaxOut.apply(
            x, self.cse.fc, conv.weight, conv.bias, self.chunk_elements, *self.cse.fc.parameters()
        )


def _sse_gate_flat(x3: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sSE gates ``sigmoid(w . x[:, :, n] + b)`` of a ``(B, C, N)`` map, shape ``(B, 1, N)``.

    The 1x1 convolution ``C -> 1`` as one batched matrix product: on CPU about twice as fast as the convolution
    kernel for this shape, identical math.
    """
    b, c = x3.shape[0], x3.shape[1]
    return torch.sigmoid(torch.baddbmm(bias.reshape(1, 1, 1), weight.reshape(1, 1, c).expand(b, 1, c), x3))


def _aggregate_in_chunks(
    x: torch.Tensor,
    gc: torch.Tensor,
    gs: torch.Tensor,
    aggregation: str,
    chunk_elements: int = CHUNK_ELEMENTS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference-only scSE aggregation ("max", "add" or "mul") written into one output, chunk by chunk.

    The naive form makes two full-size products and a third full-size result, each a fresh allocation that
    the kernel has to page in. Here each cache-sized chunk of ``x`` is read from memory once, combined with
    both gates while it is in cache, and written once into the only full-size allocation, the output.
    ``x`` must be contiguous, ``gc`` of shape ``(B, C, 1, ...)``, ``gs`` of shape ``(B, 1, *spatial)``.

    ``chunk_elements``: elements per chunk (default :data:`CHUNK_ELEMENTS`); a chunk and its one temporary stay
    in cache between the 2-3 passes over it. ``out``: where to write (a new tensor if ``None``); may be ``x``
    itself, each chunk is read before it is written.
    """
    b_, c_ = x.shape[0], x.shape[1]
    n = 1
    for s in x.shape[2:]:
        n = n * s
    if out is None:
        out = torch.empty_like(x)
    if n == 0 or b_ * c_ == 0:
        return out
    x3 = x.reshape(b_, c_, n)
    out3 = out.view(b_, c_, n)
    gc3 = gc.reshape(b_, c_, 1)
    gs3 = gs.reshape(b_, 1, n)
    tmp = torch.empty([min(chunk_elements, c_ * n) if aggregation != "mul" else 0], dtype=x.dtype, device=x.device)
    for b, c0, cn, n0, nn_ in _chunk_spans(b_, c_, n, chunk_elements):
        xs = x3[b, c0 : c0 + cn, n0 : n0 + nn_]
        o = out3[b, c0 : c0 + cn, n0 : n0 + nn_]
        gcb = gc3[b, c0 : c0 + cn]
        gsb = gs3[b, :, n0 : n0 + nn_]
        if aggregation == "max":
            t = tmp[: cn * nn_].view(cn, nn_)
            torch.mul(xs, gsb, out=t)  # first: o may be xs
            torch.mul(xs, gcb, out=o)
            torch.maximum(o, t, out=o)
        elif aggregation == "add":
            t = tmp[: cn * nn_].view(cn, nn_)
            torch.mul(xs, gsb, out=t)  # first: o may be xs
            torch.mul(xs, gcb, out=o).add_(t)
        else:
            torch.mul(xs, xs, out=o)
            o.mul_(gcb)
            o.mul_(gsb)
    return out


def _chunk_spans(b_: int, c_: int, n: int, chunk_elements: int) -> list[tuple[int, int, int, int, int]]:
    """``(batch, first channel, channels, first position, positions)`` of every chunk of a ``(B, C, N)`` map.

    A chunk holds at most ``chunk_elements`` elements (at least one): several whole channels of a small map, or
    part of one channel of a large map. Shared by the chunked forward and backward passes.
    """
    cs = max(1, chunk_elements // max(n, 1))  # channels per chunk (small maps)
    ns = max(1, min(n, chunk_elements))  # positions per chunk (large maps)
    spans: list[tuple[int, int, int, int, int]] = []
    for b in range(b_):
        for c0 in range(0, c_, cs):
            for n0 in range(0, n, ns):
                spans.append((b, c0, min(cs, c_ - c0), n0, min(ns, n - n0)))
    return spans


class _FusedScSEMaxOut(torch.autograd.Function):
    """The whole scSE block with max-out (both gates and the aggregation) as one autograd node, chunk by chunk.

    CPU training path for contiguous maps. Hand-written because autograd's version of the block makes several
    full-size passes and allocations in the backward: the aggregation's input gradient, the sSE 1x1
    convolution's input gradient (a fresh full-size map), the cSE mean's broadcast gradient, and the sums of the
    three. On CPU every fresh large allocation is also paged in (tens of thousands of page faults per training
    step of SE-UNet at features 64 were measured). Here the backward writes one full-size map, the input's
    gradient, in two passes:

    1. chunk by chunk: the max-out gradient ``grad * (gc if x*gc > x*gs else gs)`` and the partial sums of
       ``grad * x`` that the two gates receive;
    2. after the small gate networks' backward, over the whole map: the gates' own contributions to the input
       gradient, ``w_sse[c] * dz[b, n] + dmean[b, c] / N``, added in place, and the sSE weight gradient.

    Only ``x``, the channel means and the two gate tensors are saved (``x`` is kept by the preceding layer
    anyway). Ties (``x * gc == x * gs``) send the gradient to the sSE branch, as the autograd formula
    ``x * gs + relu(x * (gc - gs))`` does. Inputs after ``x``: the cSE's ``fc`` module, the sSE's 1x1 convolution
    weight and bias, the chunk size, then the ``fc``'s parameters (inputs, so that autograd routes their gradients).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, cse_fc: nn.Module, ws, bs, chunk_elements: int, *cse_params):
        b_, c_ = x.shape[0], x.shape[1]
        n = x[0, 0].numel() if b_ * c_ else 0
        x3 = x.view(b_, c_, n)
        mean = x3.sum(2) / max(n, 1)
        gc = cse_fc(mean)  # (B, C)
        gs = _sse_gate_flat(x3, ws, bs)  # (B, 1, N)
        ctx.save_for_backward(x, mean, gc, gs, ws)
        ctx.cse_fc, ctx.chunk_elements = cse_fc, chunk_elements
        return _aggregate_in_chunks(x, gc, gs, "max", chunk_elements)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")  # the gate recomputation below runs under the forward's autocast state
    def backward(ctx, grad: torch.Tensor):
        x, mean, gc, gs, ws = ctx.saved_tensors
        grad = grad.contiguous()
        b_, c_ = x.shape[0], x.shape[1]
        n = x[0, 0].numel() if b_ * c_ else 0
        x3, g3 = x.view(b_, c_, n), grad.view(b_, c_, n)
        gc3, gs3 = gc.view(b_, c_, 1), gs.view(b_, 1, n)
        grad_x = torch.empty_like(x)
        gx3 = grad_x.view(b_, c_, n)
        # the gates' gradients are sums over many elements: accumulated in at least float32 (bfloat16 / half maps)
        acc = torch.promote_types(x.dtype, torch.float32)
        grad_gc = torch.zeros(b_, c_, dtype=acc, device=x.device)
        grad_gs = torch.zeros(b_, n, dtype=acc, device=x.device)
        spans = _chunk_spans(b_, c_, n, ctx.chunk_elements)
        # two chunk-sized work buffers for the whole pass: one allocation each instead of several per chunk
        work = torch.empty([2, min(ctx.chunk_elements, max(c_ * n, 1))], dtype=x.dtype, device=x.device)
        for b, c0, cn, n0, nn_ in spans:  # pass 1
            part = (b, slice(c0, c0 + cn), slice(n0, n0 + nn_))
            xs, gg, gcb, gsb = x3[part], g3[part], gc3[b, c0 : c0 + cn], gs3[b, :, n0 : n0 + nn_]
            d, w = work[0, : cn * nn_].view(cn, nn_), work[1, : cn * nn_].view(cn, nn_)
            # max(x*gc, x*gs) == x*gs + relu(x*d) with d = gc - gs. The branch indicator w is computed in float
            # (relu then sign: 1.0 where the cSE map is larger, else 0.0): boolean masks and torch.where were
            # 4-40x slower than float ops of the same size on CPU (measured on (32, 16384) chunks).
            torch.sub(gcb, gsb, out=d)
            torch.mul(xs, d, out=w).relu_().sign_()
            torch.mul(gg, torch.addcmul(gsb, d, w, out=d), out=gx3[part])  # grad * (gc if cSE wins else gs)
            gx = torch.mul(gg, xs, out=d)  # d out / d gate, before choosing the branch
            to_cse = w.mul_(gx)
            grad_gc[b, c0 : c0 + cn] += to_cse.sum(1)
            grad_gs[b, n0 : n0 + nn_] += gx.sub_(to_cse).sum(0)
        grad_mean, grad_params = _cse_fc_backward(ctx.cse_fc, mean, grad_gc)
        gs2 = gs.view(b_, n).to(acc)
        grad_z = grad_gs * gs2 * (1.0 - gs2)  # through the sSE sigmoid
        # pass 2, on the whole map (two in-place passes; chunking them only added per-op overhead): the sSE
        # convolution's input gradient w[c] * dz[b, n], and the channel means' gradient, dmean[b, c] / N at every
        # position of the channel
        gz = grad_z.to(x.dtype)
        gx3.addcmul_(ws.reshape(1, c_, 1).to(x.dtype), gz.view(b_, 1, n))
        gx3.add_((grad_mean / max(n, 1)).to(x.dtype).view(b_, c_, 1))
        grad_ws = torch.zeros(c_, dtype=acc, device=x.device)
        for b in range(b_):
            grad_ws.addmv_(x3[b].to(acc) if x.dtype != acc else x3[b], grad_z[b])
        return grad_x, None, grad_ws.view(ws.shape), grad_z.sum().view(1), None, *grad_params


def _cse_fc_backward(
    cse_fc: nn.Module, mean: torch.Tensor, grad_gate: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Backward of the cSE's small network: gradients w.r.t. the channel means and the ``fc`` parameters.

    Autograd on ``(B, C)`` tensors through the layer's own ``fc``, recomputed from the saved means. Frozen parameters
    get ``None``.
    """
    params = list(cse_fc.parameters())
    trainable = [p for p in params if p.requires_grad]
    with torch.enable_grad():
        mean_leaf = mean.detach().requires_grad_(True)
        gate = cse_fc(mean_leaf)
        grad_mean, *grads = torch.autograd.grad(gate, [mean_leaf, *trainable], grad_gate.to(gate.dtype))
    found = dict(zip(map(id, trainable), grads, strict=True))
    return grad_mean, [found.get(id(p)) for p in params]


def _kernel_max_out_forward(
    x: torch.Tensor, cse_fc: nn.Module, ws: torch.Tensor, bs: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, ...]:
    """Max-out scSE on the compiled CPU kernels: returns the output, the channel means, both gates and the flat sSE
    weight (``(B, C)``, ``(B, C)``, ``(B, N)``, ``(C,)``; what the backward needs). ``inplace``: the output is
    written over ``x`` (inference only)."""
    ops = torch.ops.scse_monai
    b_, c_ = x.shape[0], x.shape[1]
    n = x[0, 0].numel() if b_ * c_ else 0
    x3 = x.view(b_, c_, n)
    w = ws.reshape(c_).contiguous()
    sums, z = ops.stats(x3, w)  # one pass: channel sums (float64) and the sSE convolution
    mean = (sums / max(n, 1)).to(x.dtype)
    gc = cse_fc(mean).contiguous()  # (B, C)
    gs = torch.sigmoid(z + bs)  # (B, N)
    out = ops.maxout_forward_(x3, gc, gs) if inplace else ops.maxout_forward(x3, gc, gs)
    return out.view_as(x), mean, gc, gs, w


class _KernelScSEMaxOut(torch.autograd.Function):
    """The scSE block with max-out as one autograd node on the compiled CPU kernels (:mod:`scse_monai.cpu_kernels`).

    Forward: one pass for the channel sums and the sSE convolution (``stats``), the two small gate networks in
    PyTorch, one pass for the max-out (``maxout_forward``). Backward: one kernel pass for the input gradient through
    the chosen branches, the gate gradients and the sSE convolution's gradients (``maxout_backward``), the cSE's
    small network by autograd, and one in-place pass adding the channel means' gradient. Saves ``x``, the means and
    the gates. Ties go to the sSE branch, as in the PyTorch paths. Inputs after ``x``: the cSE's ``fc`` module, the
    sSE's 1x1 convolution weight and bias, then the ``fc``'s parameters (inputs, so that autograd routes their
    gradients).
    """

    @staticmethod
    def forward(ctx, x, cse_fc: nn.Module, ws, bs, *cse_params):
        out, mean, gc, gs, w = _kernel_max_out_forward(x, cse_fc, ws, bs)
        ctx.save_for_backward(x, mean, gc, gs, w)
        ctx.cse_fc, ctx.ws_shape = cse_fc, ws.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, mean, gc, gs, w = ctx.saved_tensors
        b_, c_ = x.shape[0], x.shape[1]
        n = x[0, 0].numel() if b_ * c_ else 0
        g3 = grad.contiguous().view(b_, c_, n)
        grad_x, grad_gc, grad_z, grad_w = torch.ops.scse_monai.maxout_backward(x.view(b_, c_, n), g3, gc, gs, w)
        grad_mean, grad_params = _cse_fc_backward(ctx.cse_fc, mean, grad_gc)
        grad_x.view(b_, c_, n).add_((grad_mean / max(n, 1)).to(x.dtype).view(b_, c_, 1))
        grad_bias = grad_z.sum(dtype=torch.float64).to(x.dtype).view(1)
        return grad_x.view_as(x), None, grad_w.to(x.dtype).view(ctx.ws_shape), grad_bias, *grad_params


def get_se_layer(name: str | None, spatial_dims: int, in_channels: int, **kwargs) -> nn.Module:
    """Builds an SE layer by name.

    Args:
        name: ``None`` or ``"none"`` (identity), ``"cse"``, ``"sse"`` or ``"scse"``; case-insensitive.
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        kwargs: ``reduction_ratio`` (cSE, scSE), ``aggregation`` (scSE) and ``inplace`` (all). They are validated
            for every variant, and ignored by variants that do not use them, so one set of options configures all.

    Returns:
        The layer (``torch.nn.Identity`` for ``None``/``"none"``).

    Example::

        >>> get_se_layer("scse", 2, 32, reduction_ratio=4, aggregation="add")
        ChannelSpatialSELayer(...)
    """
    key = "none" if name is None else name
    if not isinstance(key, str) or key.lower() not in SE_LAYER_NAMES:
        raise ValueError(f"SE layer name must be None or one of {SE_LAYER_NAMES} (case-insensitive), got {name!r}.")
    key = key.lower()
    allowed = ("aggregation", "inplace", "reduction_ratio")
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise ValueError(f"unexpected SE options {sorted(unknown)}; allowed: {list(allowed)}.")
    _check_spatial_dims(spatial_dims)
    _check_in_channels(in_channels)
    ratio = kwargs.get("reduction_ratio", 2)
    aggregation = kwargs.get("aggregation", "max")
    inplace = _check_inplace(kwargs.get("inplace", False))
    # validate options even where the chosen variant does not use them, so a typo never passes silently
    if not isinstance(aggregation, str) or aggregation.lower() not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    if key == "none":
        return nn.Identity()
    if key == "sse":
        return SpatialSELayer(spatial_dims, in_channels, inplace=inplace)
    if key == "cse":
        return ChannelSELayer(spatial_dims, in_channels, ratio, inplace=inplace)
    return ChannelSpatialSELayer(spatial_dims, in_channels, ratio, aggregation, inplace=inplace)


SE = LayerFactory(name="SE", description="Squeeze-and-excitation layers of Roy et al. (cSE, sSE, scSE).")
SE.add_factory_class("CSE", ChannelSELayer)
SE.add_factory_class("SSE", SpatialSELayer)
SE.add_factory_class("SCSE", ChannelSpatialSELayer)
SE.add_factory_class("NONE", nn.Identity)
__all__.append("SE")
