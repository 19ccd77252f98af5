"""The one registry of the SE networks: look them up by name, e.g. from a config file or a command line."""

from __future__ import annotations

from torch import nn

from scse_monai.networks.se_fcdensenet import SEFCDenseNet
from scse_monai.networks.se_sdnet import SESDNet
from scse_monai.networks.se_unet import SEUNet

__all__ = ["NETWORKS", "get_network", "network_class", "network_target"]

#: network name -> class; the SE variant is a constructor argument (``se="none"`` gives the plain network)
NETWORKS: dict[str, type[nn.Module]] = {
    "unet": SEUNet,
    "sdnet": SESDNet,
    "fcdensenet": SEFCDenseNet,
}


def network_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``.

    Args:
        name: ``"unet"``, ``"sdnet"`` or ``"fcdensenet"``, case-insensitive; the former names ``"se_unet"``,
            ``"se_sdnet"`` and ``"se_fcdensenet"`` are accepted too.

    Raises:
        ValueError: for a name that is not registered, listing the registered ones.

    Example::

        >>> network_class("unet")
        <class 'scse_monai.networks.se_unet.SEUNet'>
    """
    key = name.lower().removeprefix("se_") if isinstance(name, str) else name
    if key not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; allowed: {list(NETWORKS)}.")
    return NETWORKS[key]


def network_target(name: str) -> str:
    """The bundle config ``_target_`` of the network registered under ``name``.

    Example::

        >>> network_target("fcdensenet")
        'scse_monai.networks.SEFCDenseNet'
    """
    return f"scse_monai.networks.{network_class(name).__name__}"


def get_network(name: str, **kwargs) -> nn.Module:
    """Builds an SE network by name.

    Args:
        name: a registry name (see :func:`network_class`).
        kwargs: constructor arguments of the network (``spatial_dims``, ``in_channels``, ``out_channels``, ...).

    Returns:
        The network.

    Example::

        >>> net = get_network("unet", spatial_dims=2, in_channels=1, out_channels=2, features=8, se="cse")
    """
    return network_class(name)(**kwargs)
