"""SE segmentation networks (SE-UNet, SE-SDNet, SE-FCDenseNet), their registry, ``add_se`` for MONAI nets, and
mean-softmax ensembles."""

import importlib

from scse_monai.networks.encoder_decoder import SEEncoderDecoder
from scse_monai.networks.registry import NETWORKS, get_network, network_class, network_target
from scse_monai.networks.retrofit import SUPPORTED_MODELS, add_se
from scse_monai.networks.se_fcdensenet import SEFCDenseNet
from scse_monai.networks.se_sdnet import SESDNet
from scse_monai.networks.se_unet import SEUNet

__all__ = [
    "MeanSoftmaxEnsemble",
    "NETWORKS",
    "SUPPORTED_MODELS",
    "SEEncoderDecoder",
    "SEFCDenseNet",
    "SESDNet",
    "SEUNet",
    "add_se",
    "combine_checkpoints",
    "count_parameters",
    "ensemble_size",
    "format_parameter_table",
    "get_network",
    "mean_softmax_ensemble",
    "member_state",
    "network_class",
    "network_target",
    "parameter_table",
]


_LAZY = {
    "params": ("count_parameters", "format_parameter_table", "parameter_table"),
    "ensemble": (
        "MeanSoftmaxEnsemble",
        "combine_checkpoints",
        "ensemble_size",
        "mean_softmax_ensemble",
        "member_state",
    ),
}


def __getattr__(name: str):
    # imported lazily so that `python -m scse_monai.networks.<module>` does not import that module twice
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"scse_monai.networks.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
