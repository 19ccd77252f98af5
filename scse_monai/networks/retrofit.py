"""``add_se``: put SE blocks into MONAI's own UNet, BasicUNet, DynUNet and SegResNet without renaming weights.

How a block is attached, so that every original ``state_dict`` key keeps its name and the model stays
``torch.jit.script``-able (forward hooks are neither scriptable nor visible to ONNX):

- a stage that is a plain ``nn.Sequential`` (MONAI's ``Convolution``, ``TwoConv``, ``Down``, SegResNet's
  stages) gets the SE block appended as a new child named ``se``: the existing children keep their indices
  and names, and ``Sequential.forward`` runs the new child last;
- any other stage (DynUNet's ``UnetBasicBlock``/``UnetResBlock``, UNet's ``ResidualUnit``) gets the SE block as
  a new child ``se`` and its class swapped for a subclass whose ``forward`` is ``se(original_forward(x))``.

Only keys under ``...se.`` are new, so the original weights load with ``strict=False`` and exactly the SE keys
missing. The subclasses are created on the fly and resolvable by name from this module (so ``torch.save`` of a
whole retrofitted model loads back); the usual way is still ``state_dict`` (or TorchScript) and ``add_se`` on a
freshly built model before loading.
"""

from __future__ import annotations

import types

import torch
from monai.networks.blocks import ResidualUnit, UnetBasicBlock, UnetResBlock
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from torch import nn

from scse_monai.blocks import get_se_layer

__all__ = ["SUPPORTED_MODELS", "add_se"]

SUPPORTED_MODELS: tuple[type[nn.Module], ...] = (UNet, BasicUNet, DynUNet, SegResNet)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SE_CLASSES: dict[type, type] = {}


def _se_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.se(self._forward_without_se(x))


def _with_se_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward applies ``self.se`` to the original output.

    TorchScript cannot call ``super()``, so the original ``forward`` is re-bound under another name: a copy of
    the function object with ``__name__`` changed (TorchScript compiles a called method under its
    ``__name__``, and two methods named ``forward`` would clash).
    """
    if cls not in _SE_CLASSES:
        f = cls.forward
        inner = types.FunctionType(f.__code__, f.__globals__, "_forward_without_se", f.__defaults__, f.__closure__)
        inner.__kwdefaults__ = f.__kwdefaults__
        inner.__annotations__ = dict(f.__annotations__)
        inner.__qualname__ = f.__qualname__
        name = f"SE{cls.__name__}"
        attrs = {"forward": _se_forward, "_forward_without_se": inner, "__module__": __name__, "__qualname__": name}
        _SE_CLASSES[cls] = type(name, (cls,), attrs)
    return _SE_CLASSES[cls]


# the non-Sequential stage classes of the supported models, so pickle can find "SE<name>" in this module
_SWAPPED_BASES = {cls.__name__: cls for cls in (ResidualUnit, UnetBasicBlock, UnetResBlock)}


def __getattr__(name: str) -> type:
    if name.startswith("SE") and name[2:] in _SWAPPED_BASES:
        return _with_se_class(_SWAPPED_BASES[name[2:]])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _out_channels(stage: nn.Module) -> int:
    # every convolution whose output reaches the end of a stage (main path, residual path) has the stage's
    # output channels; the last one in registration order is on the main path in all supported models
    convs = [m for m in stage.modules() if isinstance(m, _CONVS)]
    if not convs:
        raise ValueError(f"cannot find the output channels of {type(stage).__name__}: it has no convolution.")
    return convs[-1].out_channels


def _stage_channels(model: nn.Module, stages: list[nn.Module]) -> list[int]:
    """Output channels of each stage; a SegResNet up layer of no blocks (``blocks_up`` 0) has its upsampling's."""
    if isinstance(model, SegResNet):
        ups = [layer if len(layer) else sample for layer, sample in zip(model.up_layers, model.up_samples, strict=True)]
        return [_out_channels(stage) for stage in [*model.down_layers, *ups]]
    return [_out_channels(stage) for stage in stages]


def _attach(stage: nn.Module, block: nn.Module) -> None:
    if type(stage).forward is not nn.Sequential.forward:
        stage.__class__ = _with_se_class(type(stage))
    stage.add_module("se", block)


def _unet_stages(model: UNet) -> list[nn.Module]:
    # UNet.model is Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)), up); the
    # innermost submodule is the bottom layer (no SE) and the outermost up layer produces the logits (no SE).
    encoders, decoders = [], []
    node = model.model
    while isinstance(node, nn.Sequential) and len(node) == 3 and hasattr(node[1], "submodule"):
        encoders.append(node[0])
        decoders.append(node[2])
        node = node[1].submodule
    return encoders + decoders[1:]


def _stages(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, UNet):
        return _unet_stages(model)
    if isinstance(model, BasicUNet):
        encoders = [model.conv_0, model.down_1, model.down_2, model.down_3, model.down_4]
        decoders = [model.upcat_4.convs, model.upcat_3.convs, model.upcat_2.convs, model.upcat_1.convs]
        return encoders + decoders
    if isinstance(model, DynUNet):
        # the bottleneck gets none; UnetUpBlock.forward takes (inp, skip), so its conv_block carries the SE
        return [model.input_block, *model.downsamples] + [up.conv_block for up in model.upsamples]
    if isinstance(model, SegResNet):
        return list(model.down_layers) + list(model.up_layers)
    raise TypeError(
        f"add_se supports {[c.__module__ + '.' + c.__name__ for c in SUPPORTED_MODELS]}, got {type(model).__name__}."
    )


def _spatial_dims(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, _CONVS):
            return m.weight.dim() - 2
    raise ValueError(f"cannot infer spatial_dims of {type(model).__name__}: it has no convolution.")


def add_se(model: nn.Module, se: str = "scse", **kwargs) -> nn.Module:
    """Inserts an SE block after every encoder and decoder stage of a MONAI segmentation network, in place.

    Supported: ``monai.networks.nets.UNet`` (after each down layer and each up layer except the last, which
    produces the logits), ``BasicUNet`` (after ``conv_0``, ``down_1..4`` and the convolutions of
    ``upcat_4..1``), ``DynUNet`` (after the input block, each downsample block and each upsample block's
    convolutions; not on the bottleneck or output/deep-supervision heads), ``SegResNet`` (after each down layer
    and each up layer). 2D and 3D. Never on the final logits.

    Args:
        model: the network; modified in place and returned. The blocks take the device and floating-point dtype
            of its parameters.
        se: ``"cse"``, ``"sse"`` or ``"scse"`` (``None``/``"none"`` inserts identities).
        kwargs: ``reduction_ratio``, ``aggregation`` and ``inplace`` (default ``False``), passed to
            :func:`scse_monai.blocks.get_se_layer`. With ``inplace=True`` the blocks write over their stage's output
            at inference; the tests check that the supported networks give the same outputs with it.

    Returns:
        ``model``, with SE blocks registered as children named ``se`` of the stages. All original
        ``state_dict`` keys are unchanged; ``model.load_state_dict(original, strict=False)`` reports exactly
        the SE keys as missing.

    Raises:
        TypeError: ``model`` is not one of :data:`SUPPORTED_MODELS`.
        ValueError: invalid SE options, or the model already has SE blocks from ``add_se``.

    Example::

        >>> from monai.networks.nets import BasicUNet
        >>> net = add_se(BasicUNet(spatial_dims=2, in_channels=1, out_channels=2), se="scse", aggregation="add")
        >>> sum(1 for n, _ in net.named_modules() if n.endswith(".se"))
        9
    """
    if not isinstance(model, SUPPORTED_MODELS):
        raise TypeError(
            f"add_se supports {[c.__module__ + '.' + c.__name__ for c in SUPPORTED_MODELS]}, "
            f"got {type(model).__module__}.{type(model).__name__}."
        )
    spatial_dims = _spatial_dims(model)
    stages = _stages(model)
    for stage in stages:
        if hasattr(stage, "se"):
            raise ValueError(f"{type(stage).__name__} already has an 'se' attribute; add_se was applied twice?")
    # build every block before touching the model, so invalid options leave it unchanged
    blocks = [get_se_layer(se, spatial_dims, channels, **kwargs) for channels in _stage_channels(model, stages)]
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None:  # the blocks join the model on its device, in its precision
        blocks = [block.to(device=weight.device, dtype=weight.dtype) for block in blocks]
    for stage, block in zip(stages, blocks, strict=True):
        _attach(stage, block)
    return model
