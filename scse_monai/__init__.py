"""scse-monai: spatial and channel squeeze-and-excitation for MONAI segmentation networks.

Roy, Navab, Wachinger: "Concurrent Spatial and Channel Squeeze & Excitation in Fully Convolutional
Networks" (MICCAI 2018) and "Recalibrating Fully Convolutional Networks with Spatial and Channel
'Squeeze & Excitation' Blocks" (IEEE TMI 2019).
"""

__version__ = "0.1.0"
