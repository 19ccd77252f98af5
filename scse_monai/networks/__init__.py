"""SE segmentation networks (SE-UNet, SE-SDNet, SE-FCDenseNet), their registry, and ``add_se`` for MONAI nets."""

from scse_monai.networks.encoder_decoder import SEEncoderDecoder
from scse_monai.networks.registry import NETWORKS, get_network, network_class, network_target
from scse_monai.networks.retrofit import SUPPORTED_MODELS, add_se
from scse_monai.networks.se_fcdensenet import SEFCDenseNet
from scse_monai.networks.se_sdnet import SESDNet
from scse_monai.networks.se_unet import SEUNet

__all__ = [
    "NETWORKS",
    "SUPPORTED_MODELS",
    "SEEncoderDecoder",
    "SEFCDenseNet",
    "SESDNet",
    "SEUNet",
    "add_se",
    "count_parameters",
    "format_parameter_table",
    "get_network",
    "network_class",
    "network_target",
    "parameter_table",
]


def __getattr__(name: str):
    # imported lazily so that `python -m scse_monai.networks.params` does not import the module twice
    if name in ("count_parameters", "format_parameter_table", "parameter_table"):
        from scse_monai.networks import params

        return getattr(params, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
