"""Encoder/decoder stages of the three SE networks: plain convolution stacks and QuickNAT-style dense blocks."""

from __future__ import annotations

import numbers

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_dropout_layer, get_norm_layer
from torch import nn

__all__ = ["DenseStage", "check_kernel_size", "conv_stage"]


def check_kernel_size(kernel_size: int) -> None:
    """Raises ``ValueError`` unless ``kernel_size`` is a positive odd integer (padding ``k // 2`` keeps the size)."""
    integral = isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool)
    if not integral or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}.")


def conv_stage(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    num_convs: int,
    kernel_size: int,
    act: tuple | str,
    norm: tuple | str,
    dropout: tuple | str | float | None = None,
) -> nn.Sequential:
    """``num_convs`` x (conv kxk -> norm -> dropout -> act), MONAI ``Convolution`` blocks in a ``Sequential``.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels of the first convolution.
        out_channels: output channels of every convolution.
        num_convs: number of convolutions (2 for U-Net, 1 for SD-Net).
        kernel_size: odd kernel size; padding keeps the spatial size.
        act: activation (MONAI ``Act`` name or ``(name, args)``).
        norm: normalisation (MONAI ``Norm`` name or ``(name, args)``).
        dropout: dropout after each normalisation (MONAI ``Dropout`` spec or probability).

    Example::

        >>> conv_stage(2, 1, 8, num_convs=2, kernel_size=5, act="relu", norm="batch")(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """
    check_kernel_size(kernel_size)
    layers = [
        Convolution(
            spatial_dims,
            in_channels if i == 0 else out_channels,
            out_channels,
            kernel_size=kernel_size,
            act=act,
            norm=norm,
            dropout=dropout,
        )
        for i in range(num_convs)
    ]
    return nn.Sequential(*layers)


class DenseStage(nn.Module):
    """QuickNAT dense block: (BN -> act -> conv kxk), concat, (BN -> act -> conv kxk), concat, (BN -> act -> conv 1x1).

    Pre-activation ordering (norm and activation before the convolution) is what QuickNAT and the FC-DenseNet of
    Roy et al. use; MONAI's ``Convolution`` puts them after, so the three units are assembled from the factories.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels of every convolution (``features``).
        kernel_size: odd kernel size of the first two convolutions.
        act: activation (MONAI ``Act`` spec), default PReLU as in QuickNAT.
        norm: normalisation (MONAI ``Norm`` spec).
        dropout: dropout applied to the block output (MONAI ``Dropout`` spec or probability).

    Example::

        >>> DenseStage(2, 1, 8, kernel_size=5, act="prelu", norm="batch")(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        act: tuple | str,
        norm: tuple | str,
        dropout: tuple | str | float | None = None,
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size)

        def unit(cin: int, k: int) -> nn.Sequential:
            return nn.Sequential(
                get_norm_layer(norm, spatial_dims, cin),
                get_act_layer(act),
                Conv[Conv.CONV, spatial_dims](cin, out_channels, kernel_size=k, padding=k // 2),
            )

        self.unit1 = unit(in_channels, kernel_size)
        self.unit2 = unit(in_channels + out_channels, kernel_size)
        self.unit3 = unit(in_channels + 2 * out_channels, 1)
        self.dropout = get_dropout_layer(dropout, spatial_dims) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.unit1(x)
        x1 = torch.cat([x, o1], dim=1)
        o2 = self.unit2(x1)
        return self.dropout(self.unit3(torch.cat([x1, o2], dim=1)))
