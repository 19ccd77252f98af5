"""SE-FCDenseNet: QuickNAT-style dense blocks, max-unpooling, skip concatenation, SE after each stage."""

from __future__ import annotations

from functools import partial

from scse_monai.networks.encoder_decoder import SEEncoderDecoder
from scse_monai.networks.stages import DenseStage

__all__ = ["SEFCDenseNet"]


class SEFCDenseNet(SEEncoderDecoder):
    """Fully convolutional DenseNet (QuickNAT) with spatial/channel squeeze-and-excitation after each stage.

    Each stage is a dense block (BN -> PReLU -> conv kxk, concat, BN -> PReLU -> conv kxk, concat,
    BN -> PReLU -> conv 1x1 to ``features``); max-pooling with indices goes down, max-unpooling goes up.

    Args:
        spatial_dims: 1, 2 or 3; the same class serves 2D and 3D.
        in_channels: input channels.
        out_channels: output channels (classes).
        features: channels of every stage.
        se: ``None``/``"none"``, ``"cse"``, ``"sse"`` or ``"scse"``.
        reduction_ratio: channel SE reduction ratio ``r``.
        aggregation: scSE aggregation: ``"max"``, ``"add"``, ``"mul"`` or ``"concat"``.
        kernel_size: odd kernel size of the dense convolutions.
        act: activation (MONAI ``Act`` spec).
        norm: normalisation (MONAI ``Norm`` spec).
        dropout: dropout after each dense block (MONAI ``Dropout`` spec or probability).
        se_bottleneck: also recalibrate the bottleneck.

    Example::

        >>> net = SEFCDenseNet(spatial_dims=2, in_channels=1, out_channels=4, features=8)
        >>> net(torch.zeros(2, 1, 48, 33)).shape
        torch.Size([2, 4, 48, 33])
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
        act: tuple | str = "prelu",
        norm: tuple | str = "batch",
        dropout: tuple | str | float | None = None,
        se_bottleneck: bool = False,
    ) -> None:
        make_stage = partial(DenseStage, spatial_dims, kernel_size=kernel_size, act=act, norm=norm, dropout=dropout)
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
