"""Look up the SE networks by name, e.g. from a config file or a command line."""

from __future__ import annotations

from torch import nn

from scse_monai.networks.se_fcdensenet import SEFCDenseNet
from scse_monai.networks.se_sdnet import SESDNet
from scse_monai.networks.se_unet import SEUNet

__all__ = ["NETWORKS", "get_network"]

NETWORKS: dict[str, type[nn.Module]] = {
    "se_unet": SEUNet,
    "se_sdnet": SESDNet,
    "se_fcdensenet": SEFCDenseNet,
}


def get_network(name: str, **kwargs) -> nn.Module:
    """Builds an SE network by name.

    Args:
        name: ``"se_unet"``, ``"se_sdnet"`` or ``"se_fcdensenet"`` (case-insensitive).
        kwargs: constructor arguments of the network (``spatial_dims``, ``in_channels``, ``out_channels``, ...).

    Returns:
        The network.

    Example::

        >>> net = get_network("se_unet", spatial_dims=2, in_channels=1, out_channels=2, features=8, se="cse")
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; allowed: {sorted(NETWORKS)}.")
    return NETWORKS[key](**kwargs)
