"""SE-SDNet (SkipDeconv-Net): one kxk convolution per stage, max-unpooling, skip concatenation, SE after each."""

from __future__ import annotations

from functools import partial

from scse_monai.networks.encoder_decoder import SEEncoderDecoder
from scse_monai.networks.stages import conv_stage

__all__ = ["SESDNet"]


class SESDNet(SEEncoderDecoder):
    """SkipDeconv-Net with spatial/channel squeeze-and-excitation after each encoder and decoder stage.

    Each stage is one (conv 7x7 -> BN -> ReLU); max-pooling with indices goes down, max-unpooling with the
    same indices goes up, skips are concatenated.

    Args:
        spatial_dims: 1, 2 or 3; the same class serves 2D and 3D.
        in_channels: input channels.
        out_channels: output channels (classes).
        features: channels of every stage.
        se: ``None``/``"none"``, ``"cse"``, ``"sse"`` or ``"scse"``.
        reduction_ratio: channel SE reduction ratio ``r``.
        aggregation: scSE aggregation: ``"max"``, ``"add"``, ``"mul"`` or ``"concat"``.
        kernel_size: odd convolution kernel size.
        act: activation (MONAI ``Act`` spec).
        norm: normalisation (MONAI ``Norm`` spec).
        dropout: dropout after each normalisation (MONAI ``Dropout`` spec or probability).
        se_bottleneck: also recalibrate the bottleneck.

    Example::

        >>> net = SESDNet(spatial_dims=3, in_channels=1, out_channels=2, features=4, kernel_size=3)
        >>> net(torch.zeros(1, 1, 16, 20, 16)).shape
        torch.Size([1, 2, 16, 20, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: int = 64,
        se: str | None = "scse",
        reduction_ratio: int = 2,
        aggregation: str = "max",
        kernel_size: int = 7,
        act: tuple | str = "relu",
        norm: tuple | str = "batch",
        dropout: tuple | str | float | None = None,
        se_bottleneck: bool = False,
    ) -> None:
        make_stage = partial(
            conv_stage, spatial_dims, num_convs=1, kernel_size=kernel_size, act=act, norm=norm, dropout=dropout
        )
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            features,
            make_stage=make_stage,
            upsample="unpool",
            se=se,
            reduction_ratio=reduction_ratio,
            aggregation=aggregation,
            se_bottleneck=se_bottleneck,
        )
