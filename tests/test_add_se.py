"""add_se on MONAI's UNet, BasicUNet, DynUNet and SegResNet: placement, weights, TorchScript, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from torch import nn

from scse_monai.blocks import ChannelSELayer, ChannelSpatialSELayer, SpatialSELayer
from scse_monai.networks import SEUNet, add_se


def unet(d):
    return UNet(d, 1, 2, channels=(4, 8, 8, 16, 16), strides=(2, 2, 2, 2))


def res_unet(d):
    return UNet(d, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)


def basic_unet(d):
    return BasicUNet(d, 1, 2, features=(4, 4, 8, 8, 16, 4))


def dynunet(d):
    return DynUNet(d, 1, 2, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4)


def res_dynunet(d):
    return DynUNet(d, 1, 2, kernel_size=[3] * 3, strides=[1, 2, 2], upsample_kernel_size=[2, 2], res_block=True)


def segresnet(d):
    return SegResNet(d, init_filters=8, in_channels=1, out_channels=2)


# (builder, number of SE blocks expected from the configuration, the module producing the logits)
CASES = {
    "UNet": (unet, 2 * (5 - 1) - 1, lambda m: m.model[2]),  # 4 down + 4 up, not the top (logits) up layer
    "UNet-residual": (res_unet, 2 * (3 - 1) - 1, lambda m: m.model[2]),
    "BasicUNet": (basic_unet, 5 + 4, lambda m: m.final_conv),  # conv_0, down_1..4, upcat_4..1
    "DynUNet": (dynunet, 4 + 4, lambda m: m.output_block),  # input + 3 downsamples, 4 upsamples
    "DynUNet-residual": (res_dynunet, 2 + 2, lambda m: m.output_block),
    "SegResNet": (segresnet, 4 + 3, lambda m: m.conv_final),  # blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)
}
SE_TYPES = (ChannelSELayer, SpatialSELayer, ChannelSpatialSELayer)


def top_level_se(model):
    parts = {id(p) for m in model.modules() if isinstance(m, ChannelSpatialSELayer) for p in (m.cse, m.sse)}
    return [m for m in model.modules() if isinstance(m, SE_TYPES) and id(m) not in parts]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_add_se_keeps_weights_shape_and_scripts(case, spatial_dims):
    build, expected_blocks, logits_layer = CASES[case]
    torch.manual_seed(0)
    model = build(spatial_dims).eval()
    original = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 1, *(32,) * spatial_dims)
    with torch.no_grad():
        y0 = model(x)

    assert add_se(model, "scse", reduction_ratio=2) is model
    blocks = top_level_se(model)
    assert len(blocks) == expected_blocks and all(isinstance(b, ChannelSpatialSELayer) for b in blocks)
    assert not any(isinstance(m, SE_TYPES) for m in logits_layer(model).modules())

    new_keys = set(model.state_dict())
    assert set(original) <= new_keys  # no original key renamed
    result = model.load_state_dict(original, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == new_keys - set(original)
    assert result.missing_keys and all(".se." in k for k in result.missing_keys)

    model.eval()
    with torch.no_grad():
        y = model(x)
        assert y.shape == y0.shape
        assert not torch.allclose(y, y0)  # the SE blocks are on the path
        assert torch.allclose(torch.jit.script(model)(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inplace_se_gives_the_same_outputs_in_every_supported_model(case):
    # inplace=True writes each SE block's result over its stage's output when autograd is off: that output must
    # feed nothing else in any supported model, and the caller's input must stay untouched
    build = CASES[case][0]
    torch.manual_seed(0)
    model = add_se(build(2), "scse", reduction_ratio=2).eval()
    inplace = add_se(build(2), "scse", reduction_ratio=2, inplace=True)
    inplace.load_state_dict(model.state_dict())
    inplace.eval()
    assert all(block.inplace for block in top_level_se(inplace))
    x = torch.randn(2, 1, 32, 32)
    y = x.clone()
    with torch.no_grad():
        expected, got = model(x), inplace(y)
    assert torch.equal(y, x) and torch.equal(got, expected)


def test_se_sits_after_the_stage_output():
    # the input of every SE block must be the output of the stage it was attached to
    model = basic_unet(2).eval()
    add_se(model, "sse")
    seen = {}
    for name, m in model.named_modules():
        if name.endswith(".se"):
            stage = model.get_submodule(name[: -len(".se")])
            stage_out = {}
            # the stage's original output is the SE block's input; a hook on the last original child records it
            last = list(stage.children())[-2]
            last.register_forward_hook(lambda mod, i, o, d=stage_out: d.__setitem__("out", o))
            m.register_forward_hook(lambda mod, i, o, d=stage_out, n=name: seen.__setitem__(n, (i[0], d["out"])))
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32))
    assert len(seen) == 9
    for se_in, stage_out in seen.values():
        assert se_in is stage_out


def test_add_se_matches_manual_composition_for_non_sequential_stage():
    # DynUNet blocks are not Sequential: their class is swapped; output must equal se(original_forward(x))
    model = dynunet(2).eval()
    block = model.input_block
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        before = block(x)
        add_se(model, "cse")
        assert torch.allclose(block(x), block.se(before))
    assert isinstance(block.se, ChannelSELayer)


def test_add_se_none_is_identity():
    model = segresnet(2).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        y0 = model(x)
        add_se(model, None)
        assert torch.equal(model(x), y0)


def test_unsupported_model_lists_supported_classes():
    with pytest.raises(TypeError, match="UNet.*BasicUNet.*DynUNet.*SegResNet"):
        add_se(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(TypeError, match="SegResNet"):
        add_se(SEUNet(2, 1, 2, features=4))


def test_bad_options_leave_model_untouched_and_double_application_fails():
    model = basic_unet(2)
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="max.*add.*mul.*concat"):
        add_se(model, "scse", aggregation="min")
    with pytest.raises(ValueError, match="cse.*sse.*scse"):
        add_se(model, "xse")
    with pytest.raises(ValueError, match="reduction_ratio"):
        add_se(model, "cse", reduction_ratio=8)  # 4 channels // 8 = 0 hidden units
    assert set(model.state_dict()) == keys
    add_se(model, "cse")
    with pytest.raises(ValueError, match="twice"):
        add_se(model, "cse")


def test_whole_model_pickles_and_loads_back():
    import io

    torch.manual_seed(0)
    model = add_se(res_dynunet(2), "scse").eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert type(loaded.input_block) is type(model.input_block)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_blocks_take_the_models_dtype(dtype):
    model = add_se(basic_unet(2).to(dtype), "scse")
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 32, 32, dtype=dtype)).dtype == dtype


def test_segresnet_with_empty_up_layers():
    # blocks_up 0: the up layers are empty Sequentials; their SE blocks take the upsampling's channels
    model = SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8, blocks_up=(0, 0, 0)).eval()
    x = torch.randn(1, 1, 32, 32)
    add_se(model, "scse")
    assert sum(1 for n, _ in model.named_modules() if n.endswith(".se")) == 7
    with torch.no_grad():
        assert model(x).shape == (1, 2, 32, 32)
