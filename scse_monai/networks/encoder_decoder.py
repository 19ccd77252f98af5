"""The encoder-decoder skeleton shared by SE-UNet, SE-SDNet and SE-FCDenseNet (Roy et al., Fig. 1(a)).

Four encoder stages, a bottleneck, four decoder stages with skip concatenation and a 1x1 classifier; an SE
block after every encoder and decoder stage (eight, each its own instance), optionally one after the
bottleneck. The three networks differ only in the stage they build and in how they go back up
(interpolation for U-Net, max-unpooling with the encoder's pooling indices for SD-Net and FC-DenseNet), so the
forward pass lives here once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from scse_monai.blocks import check_positive_int, check_spatial_dims, get_se_layer
from scse_monai.networks.sampling import crop_to, max_unpool, pad_to_multiple

__all__ = ["NUM_LEVELS", "SEEncoderDecoder"]

NUM_LEVELS = 4
_UPSAMPLE_MODES = ("interpolate", "unpool")
#: torch's interpolation modes that work for any number of spatial dims, and those of each number of dims
_INTERP_MODES = ("nearest", "nearest-exact", "area")
_INTERP_LINEAR = {1: ("linear",), 2: ("bilinear", "bicubic"), 3: ("trilinear",)}


class SEEncoderDecoder(nn.Module):
    """Encoder-decoder with an SE block after every stage; built by the concrete networks.

    Inputs whose spatial size is not divisible by ``2**4 = 16`` are zero-padded at their end and the logits
    cropped back, so any size works and the output always has the input's spatial size. (Training with batch norm
    needs more than one value per channel at the bottleneck, ``1/16`` of the padded size: a batch of one needs a
    spatial size above 16 in some dimension.)

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3); the same class serves 2D and 3D.
        in_channels: input channels.
        out_channels: output channels (classes) of the 1x1 classifier.
        features: channels of every stage.
        make_stage: ``make_stage(in_channels, out_channels) -> nn.Module``, one encoder/decoder/bottleneck stage.
        upsample: ``"interpolate"`` (nearest-neighbour x2, U-Net) or ``"unpool"`` (max-unpooling with the
            encoder's indices, SD-Net and FC-DenseNet).
        se: ``None``/``"none"``, ``"cse"``, ``"sse"`` or ``"scse"``.
        reduction_ratio: reduction ratio of the channel SE.
        aggregation: scSE aggregation, ``"max"``, ``"add"``, ``"mul"`` or ``"concat"``.
        se_bottleneck: also put an SE block after the bottleneck (a ninth block).
        interp_mode: interpolation mode for ``upsample="interpolate"``.
    """

    __constants__ = ["unpool"]

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: int,
        make_stage: Callable[[int, int], nn.Module],
        upsample: str = "interpolate",
        se: str | None = "scse",
        reduction_ratio: int = 2,
        aggregation: str = "max",
        se_bottleneck: bool = False,
        interp_mode: str = "nearest",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("features", features)):
            check_positive_int(name, value)
        check_spatial_dims(spatial_dims)
        if upsample not in _UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {_UPSAMPLE_MODES}, got {upsample!r}.")
        modes = _INTERP_MODES + _INTERP_LINEAR[spatial_dims]
        if upsample == "interpolate" and interp_mode not in modes:
            raise ValueError(f"interp_mode must be one of {modes} for {spatial_dims}D, got {interp_mode!r}.")
        self.spatial_dims = spatial_dims
        self.multiple = 2**NUM_LEVELS
        self.unpool = upsample == "unpool"
        # every SE block's input is a stage's fresh output that nothing else reads: without autograd the blocks
        # write over it (no full-size allocation per block at inference)
        se_opts = {"reduction_ratio": reduction_ratio, "aggregation": aggregation, "inplace": True}

        def se_block() -> nn.Module:
            return get_se_layer(se, spatial_dims, features, **se_opts)

        self.encoders = nn.ModuleList(
            [make_stage(in_channels if i == 0 else features, features) for i in range(NUM_LEVELS)]
        )
        self.encoder_se = nn.ModuleList([se_block() for _ in range(NUM_LEVELS)])
        self.bottleneck = make_stage(features, features)
        self.bottleneck_se = se_block() if se_bottleneck else nn.Identity()
        self.decoders = nn.ModuleList([make_stage(2 * features, features) for _ in range(NUM_LEVELS)])
        self.decoder_se = nn.ModuleList([se_block() for _ in range(NUM_LEVELS)])
        self.classifier = Conv[Conv.CONV, spatial_dims](features, out_channels, kernel_size=1)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, return_indices=self.unpool)
        self.upsample = nn.Upsample(scale_factor=2.0, mode=interp_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_size: list[int] = list(x.shape[2:])
        x = pad_to_multiple(x, self.multiple)
        skips: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        for encoder, se in zip(self.encoders, self.encoder_se, strict=True):
            x = se(encoder(x))
            skips.append(x)
            if self.unpool:
                x, idx = self.pool(x)
                indices.append(idx)
            else:
                x = self.pool(x)
        x = self.bottleneck_se(self.bottleneck(x))
        for decoder, se in zip(self.decoders, self.decoder_se, strict=True):
            if self.unpool:
                x = max_unpool(x, indices.pop())
            else:
                x = self.upsample(x)
            x = se(decoder(torch.cat([x, skips.pop()], dim=1)))
        return crop_to(self.classifier(x), spatial_size)
