"""scse-monai: spatial and channel squeeze-and-excitation for MONAI segmentation networks.

Roy, Navab, Wachinger: "Concurrent Spatial and Channel Squeeze & Excitation in Fully Convolutional
Networks" (MICCAI 2018) and "Recalibrating Fully Convolutional Networks with Spatial and Channel
'Squeeze & Excitation' Blocks" (IEEE TMI 2019).
"""

__version__ = "0.2.0"

import importlib

_SUBMODULES = (
    "apps",
    "atomic",
    "blocks",
    "bundle_support",
    "checkpoints",
    "data",
    "experiments",
    "handlers",
    "losses",
    "metrics",
    "networks",
    "transforms",
)


def __getattr__(name: str):
    # Lazy submodules, so `$import scse_monai` in a bundle config is enough for
    # `scse_monai.bundle_support.partition(...)` and the package import stays light.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
