"""SE-UNet: the U-Net of Roy et al. (two kxk convolutions per stage) with an SE block after every stage."""

from __future__ import annotations

from functools import partial

from scse_monai.networks.encoder_decoder import SEEncoderDecoder
from scse_monai.networks.stages import conv_stage

__all__ = ["SEUNet"]


class SEUNet(SEEncoderDecoder):
    """U-Net with spatial/channel squeeze-and-excitation after each encoder and decoder stage.

    Each stage is two (conv kxk -> norm -> act) units; max-pooling goes down, nearest-neighbour upsampling
    goes up, skips are concatenated. With ``features=64`` and 5x5 kernels this is the paper's
    ~2.1e6-parameter U-Net; ``se="scse"`` adds 34,056 parameters (r=2).

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
        interp_mode: upsampling interpolation mode.

    Example::

        >>> net = SEUNet(spatial_dims=2, in_channels=1, out_channels=3, features=8)
        >>> net(torch.zeros(1, 1, 40, 40)).shape
        torch.Size([1, 3, 40, 40])
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
        kernel_size: int = 5,
        act: tuple | str = "relu",
        norm: tuple | str = "batch",
        dropout: tuple | str | float | None = None,
        se_bottleneck: bool = False,
        interp_mode: str = "nearest",
    ) -> None:
        make_stage = partial(
            conv_stage, spatial_dims, num_convs=2, kernel_size=kernel_size, act=act, norm=norm, dropout=dropout
        )
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            features,
            make_stage=make_stage,
            upsample="interpolate",
            se=se,
            reduction_ratio=reduction_ratio,
            aggregation=aggregation,
            se_bottleneck=se_bottleneck,
            interp_mode=interp_mode,
        )
