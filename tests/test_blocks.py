"""SE blocks against the paper's equations, computed independently from each layer's weights."""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers.factories import LayerFactory
from torch import nn

from scse_monai.blocks import (
    AGGREGATIONS,
    SE,
    ChannelSELayer,
    ChannelSpatialSELayer,
    SpatialSELayer,
    get_se_layer,
)

DIMS = [1, 2, 3]


def rand(spatial_dims, b=2, c=6, size=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, c) + (size,) * spatial_dims, generator=g, dtype=dtype)


def direct_cse_gate(layer: ChannelSELayer, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(W2 relu(W1 z + b1) + b2), z the channel means, written out from the Linear weights."""
    z = x.flatten(2).mean(-1)  # (B, C)
    w1, b1 = layer.fc[0].weight, layer.fc[0].bias
    w2, b2 = layer.fc[2].weight, layer.fc[2].bias
    s = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    return s.view(*s.shape, *([1] * (x.dim() - 2)))


def direct_sse_gate(layer: SpatialSELayer, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(sum_c w_c x_c + b) at every position."""
    w = layer.conv.weight.flatten()  # (C,)
    q = torch.einsum("c,bc...->b...", w, x) + layer.conv.bias
    return torch.sigmoid(q).unsqueeze(1)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_cse_gate_is_the_equation_constant_over_space_and_permutation_invariant(spatial_dims):
    torch.manual_seed(0)
    layer = ChannelSELayer(spatial_dims, 6, reduction_ratio=3)
    x = rand(spatial_dims)
    gate = layer.gate(x)
    assert gate.shape == (2, 6) + (1,) * spatial_dims
    assert torch.allclose(gate, direct_cse_gate(layer, x), atol=1e-6)
    assert torch.allclose(layer(x), x * direct_cse_gate(layer, x), atol=1e-6)
    # permuting the spatial positions (same permutation for all channels) leaves the gate unchanged
    perm = torch.randperm(x[0, 0].numel())
    xp = x.flatten(2)[..., perm].view_as(x)
    assert torch.allclose(layer.gate(xp), gate, atol=1e-6)
    # and it depends on the channel means only: a zero-mean change per channel changes nothing
    noise = torch.randn_like(x)
    noise = noise - noise.flatten(2).mean(-1).view(2, 6, *([1] * spatial_dims))
    assert torch.allclose(layer.gate(x + noise), gate, atol=1e-5)
    # ... while changing one channel's mean does change the gates (hidden units kept active for this check)
    with torch.no_grad():
        layer.fc[0].bias.fill_(10.0)
    gate = layer.gate(x)
    shifted = x.clone()
    shifted[:, 0] += 3.0
    assert not torch.allclose(layer.gate(shifted), gate)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_sse_gate_is_the_equation_constant_over_channels(spatial_dims):
    torch.manual_seed(0)
    layer = SpatialSELayer(spatial_dims, 6)
    x = rand(spatial_dims)
    gate = layer.gate(x)
    assert gate.shape == (2, 1) + (5,) * spatial_dims
    assert torch.allclose(gate, direct_sse_gate(layer, x), atol=1e-6)
    out = layer(x)
    assert torch.allclose(out, x * direct_sse_gate(layer, x), atol=1e-6)
    # the same factor for every channel at a position: out / x is constant over channels
    ratio = out / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    # non-contiguous inputs (channels-last, a transposed view): the same gate
    layouts = {2: torch.channels_last, 3: torch.channels_last_3d}
    views = [x.transpose(-1, -2).contiguous().transpose(-1, -2)] if spatial_dims > 1 else []
    if spatial_dims in layouts:
        views.append(x.contiguous(memory_format=layouts[spatial_dims]))
    for xc in views:
        assert not xc.is_contiguous()
        assert torch.allclose(layer.gate(xc), gate, atol=1e-6)
    # the gate applies the weights of layer.conv: it equals the convolution's own output
    assert torch.allclose(gate, torch.sigmoid(layer.conv(x)), atol=1e-6)


@pytest.mark.parametrize("name", ["cse", "sse", "scse"])
def test_wrong_input_shape_is_a_value_error_naming_the_expected_shape(name):
    layer = get_se_layer(name, 2, 4)
    for bad in (torch.zeros(2, 4, 3, 3, 3), torch.zeros(2, 5, 3, 3)):
        with pytest.raises(ValueError, match=r"expected an input of shape \(B, 4, \.\.\.\) with 2 spatial dims"):
            layer(bad)


DEFINITIONS = {
    "max": lambda b, x: torch.maximum(b.cse(x), b.sse(x)),
    "add": lambda b, x: b.cse(x) + b.sse(x),
    "mul": lambda b, x: b.cse(x) * b.sse(x),
    "concat": lambda b, x: b.fuse(torch.cat([b.cse(x), b.sse(x)], dim=1)),
}


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("grad", [False, True])
def test_scse_aggregation_equals_definition(spatial_dims, aggregation, grad):
    torch.manual_seed(0)
    block = ChannelSpatialSELayer(spatial_dims, 6, reduction_ratio=2, aggregation=aggregation)
    x = rand(spatial_dims, size=7)  # negative and positive values: max-out must pick per sign
    assert (x < 0).any() and (x > 0).any()
    with torch.set_grad_enabled(grad):
        got = block(x)
    with torch.no_grad():
        # independent: the recalibrated maps from the weights, not from the block's own gate methods
        cse_map = x * direct_cse_gate(block.cse, x)
        sse_map = x * direct_sse_gate(block.sse, x)
        expected = {
            "max": torch.maximum(cse_map, sse_map),
            "add": cse_map + sse_map,
            "mul": cse_map * sse_map,
            "concat": F.conv1d(
                torch.cat([cse_map, sse_map], 1).flatten(2), block.fuse.weight.flatten(2), block.fuse.bias
            ).view_as(x)
            if aggregation == "concat"
            else None,
        }[aggregation]
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(got, DEFINITIONS[aggregation](block, x), atol=1e-5)


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("name,aggregation", [("cse", None), ("sse", None)] + [("scse", a) for a in AGGREGATIONS])
def test_gradcheck_double(spatial_dims, name, aggregation):
    torch.manual_seed(0)
    kwargs = {"aggregation": aggregation} if aggregation else {}
    layer = get_se_layer(name, spatial_dims, 4, reduction_ratio=2, **kwargs).double()
    x = rand(spatial_dims, b=2, c=4, size=3, dtype=torch.float64).requires_grad_(True)
    if aggregation == "max":
        # keep the two maps apart so max is differentiable at every point the finite differences probe
        with torch.no_grad():
            gap = (layer.cse(x) - layer.sse(x)).abs().min()
        assert gap > 1e-5  # finite differences move the maps by ~1e-6
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-5)
    params = [p for p in layer.parameters()]
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(
            layer, dict(zip([n for n, _ in layer.named_parameters()], ps, strict=True)), (x,)
        ),
        tuple(p.detach().clone().requires_grad_(True) for p in params),
        eps=1e-6,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("cse", {"reduction_ratio": 2}, 64 * 32 + 32 + 32 * 64 + 64),
        ("cse", {"reduction_ratio": 16}, 64 * 4 + 4 + 4 * 64 + 64),
        ("sse", {}, 64 + 1),
        ("scse", {"reduction_ratio": 2, "aggregation": "max"}, 64 * 32 * 2 + 32 + 64 + 65),
        ("scse", {"reduction_ratio": 2, "aggregation": "add"}, 4257),
        ("scse", {"reduction_ratio": 2, "aggregation": "mul"}, 4257),
        ("scse", {"reduction_ratio": 2, "aggregation": "concat"}, 4257 + 128 * 64 + 64),
        (None, {}, 0),
        ("NONE", {}, 0),
    ],
)
@pytest.mark.parametrize("spatial_dims", DIMS)
def test_parameter_counts(name, kwargs, expected, spatial_dims):
    layer = get_se_layer(name, spatial_dims, 64, **kwargs)
    assert sum(p.numel() for p in layer.parameters()) == expected


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("name,aggregation", [("cse", "max"), ("sse", "max")] + [("scse", a) for a in AGGREGATIONS])
def test_torchscript_round_trip(spatial_dims, name, aggregation):
    torch.manual_seed(0)
    layer = get_se_layer(name, spatial_dims, 6, aggregation=aggregation).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(layer), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = rand(spatial_dims, size=6)
    assert torch.allclose(loaded(x), layer(x), atol=1e-6)  # grad enabled (autograd branch)
    with torch.no_grad():  # inference branch
        assert torch.allclose(loaded(x), layer(x), atol=1e-6)
        assert torch.allclose(
            loaded(x), DEFINITIONS.get(aggregation if name == "scse" else "", lambda b, t: b(t))(layer, x), atol=1e-5
        )


INPLACE_CASES = [("cse", "max"), ("sse", "max")] + [("scse", a) for a in AGGREGATIONS]


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("name,aggregation", INPLACE_CASES)
def test_inplace_inference_writes_over_the_input_with_the_same_values(spatial_dims, name, aggregation):
    torch.manual_seed(0)
    layer = get_se_layer(name, spatial_dims, 6, aggregation=aggregation).eval()
    inplace = get_se_layer(name, spatial_dims, 6, aggregation=aggregation, inplace=True).eval()
    inplace.load_state_dict(layer.state_dict())
    x = rand(spatial_dims, size=7)
    with torch.no_grad():
        expected = layer(x)
        y = x.clone()
        got = inplace(y)
    assert torch.equal(got, expected)  # the same ops, written over the input
    if aggregation == "concat":  # its result is a convolution's output: nothing is written over the input
        assert inplace.inplace is False and torch.equal(y, x)
    else:
        assert got.data_ptr() == y.data_ptr() and not torch.equal(y, x)


@pytest.mark.parametrize("name,aggregation", INPLACE_CASES)
def test_inplace_blocks_leave_the_input_alone_when_autograd_is_on(name, aggregation):
    torch.manual_seed(0)
    layer = get_se_layer(name, 2, 6, aggregation=aggregation, inplace=True)
    x = rand(2, size=7)
    for inp in (x.clone(), x.clone().requires_grad_(True)):
        out = layer(inp)
        assert torch.equal(inp.detach(), x) and out.data_ptr() != inp.data_ptr()
        out.square().sum().backward()  # no in-place modification error
        assert all(p.grad is not None for p in layer.parameters())
        layer.zero_grad()


def test_scripted_inplace_block_writes_over_the_input_only_without_autograd():
    torch.manual_seed(0)
    layer = ChannelSpatialSELayer(2, 6, inplace=True).eval()
    scripted = torch.jit.script(layer)
    x = rand(2, size=7)
    expected = torch.maximum(layer.cse(x), layer.sse(x))
    y = x.clone()
    assert torch.allclose(scripted(y), expected, atol=1e-6) and torch.equal(y, x)
    with torch.no_grad():
        out = scripted(y)
    assert out.data_ptr() == y.data_ptr() and torch.allclose(y, expected, atol=1e-6)


def test_scripted_training_gradients_match_eager():
    torch.manual_seed(0)
    block = ChannelSpatialSELayer(2, 6, aggregation="max")
    scripted = torch.jit.script(block)
    x = rand(2, size=6).requires_grad_(True)
    g_eager = torch.autograd.grad(block(x).square().sum(), (x, block.cse.fc[0].weight))
    g_script = torch.autograd.grad(scripted(x).square().sum(), (x, scripted.cse.fc[0].weight))
    for a, b in zip(g_eager, g_script, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: get_se_layer("bse", 2, 8), r"None or one of \('none', 'cse', 'sse', 'scse'\)"),
        (lambda: get_se_layer(3, 2, 8), "one of"),
        (lambda: get_se_layer("scse", 2, 8, aggregation="min"), r"\('max', 'add', 'mul', 'concat'\)"),
        (lambda: get_se_layer("cse", 2, 8, aggregation="min"), r"\('max', 'add', 'mul', 'concat'\)"),
        (lambda: ChannelSpatialSELayer(2, 8, aggregation="sum"), r"\('max', 'add', 'mul', 'concat'\)"),
        (lambda: get_se_layer("cse", 0, 8), r"spatial_dims must be one of \(1, 2, 3\)"),
        (lambda: get_se_layer("sse", 4, 8), r"spatial_dims must be one of \(1, 2, 3\)"),
        (lambda: ChannelSELayer(4, 8), r"\(1, 2, 3\)"),
        (lambda: SpatialSELayer(0, 8), r"\(1, 2, 3\)"),
        (lambda: ChannelSpatialSELayer(4, 8), r"\(1, 2, 3\)"),
        (lambda: ChannelSELayer(2, 8, reduction_ratio=0), "reduction_ratio"),
        (lambda: ChannelSELayer(2, 8, reduction_ratio=9), r"allowed values are 1\.\.8"),
        (lambda: get_se_layer("scse", 2, 8, reduction_ratio=16), r"allowed values are 1\.\.8"),
        (lambda: ChannelSELayer(2, 0), "in_channels"),
        (lambda: get_se_layer("cse", 2, 8, ratio=2), r"allowed: \['aggregation', 'inplace', 'reduction_ratio'\]"),
        (lambda: get_se_layer("sse", 2, 8, inplace=1), "inplace must be True or False, got 1"),
        (lambda: get_se_layer("sse", 2, 8, reduction_ratio=0), "reduction_ratio must be a positive integer, got 0"),
        (lambda: get_se_layer("none", 2, 8, reduction_ratio="2"), "reduction_ratio must be a positive integer"),
        (lambda: ChannelSpatialSELayer(2, 8, inplace="yes"), "inplace must be True or False"),
        (lambda: get_se_layer("scse", True, 8), r"spatial_dims must be one of \(1, 2, 3\), got True"),
        (lambda: SpatialSELayer(2.0, 8), r"spatial_dims must be one of \(1, 2, 3\), got 2.0"),
    ],
)
def test_invalid_arguments_raise_value_error_listing_allowed_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_names_are_case_insensitive_and_none_is_identity():
    x = rand(2)
    for name, cls in [("CSE", ChannelSELayer), ("sSE", SpatialSELayer), ("ScSe", ChannelSpatialSELayer)]:
        assert type(get_se_layer(name, 2, 6)) is cls
    for name in (None, "none", "None"):
        layer = get_se_layer(name, 2, 6)
        assert isinstance(layer, nn.Identity) and layer(x) is x
    assert get_se_layer("scse", 2, 6, aggregation="ADD").aggregation == "add"


def test_layer_factory_lookups():
    assert isinstance(SE, LayerFactory)
    assert SE["cse"] is ChannelSELayer and SE["SSE"] is SpatialSELayer and SE[SE.SCSE] is ChannelSpatialSELayer
    assert SE["none"] is nn.Identity
    layer = SE["scse"](spatial_dims=3, in_channels=8, reduction_ratio=4, aggregation="add")
    assert isinstance(layer, ChannelSpatialSELayer) and layer.cse.fc[0].out_features == 2
    with pytest.raises(Exception, match="cse|CSE"):
        SE["bse"]


def test_scse_parts_are_independent_of_each_other():
    # cse and sse are the block's own submodules: changing one leaves the other map unchanged
    block = ChannelSpatialSELayer(2, 6)
    x = rand(2)
    before = block.sse(x)
    with torch.no_grad():
        for p in block.cse.parameters():
            p.add_(1.0)
    assert torch.equal(block.sse(x), before)
    assert set(dict(block.named_children())) >= {"cse", "sse"}
    assert len(list(itertools.chain(block.cse.parameters(), block.sse.parameters()))) == 6


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_max_training_gradients_match_the_definition(spatial_dims):
    # the autograd branch computes max(x*gc, x*gs) as x*gs + relu(x*(gc - gs)); away from ties its gradients
    # (w.r.t. the input and every weight) must be those of torch.maximum
    torch.manual_seed(0)
    block = ChannelSpatialSELayer(spatial_dims, 6, reduction_ratio=2, aggregation="max")
    x = rand(spatial_dims, size=7).requires_grad_(True)
    weights = (x, *block.parameters())
    got = torch.autograd.grad(block(x).square().sum(), weights)
    expected = torch.autograd.grad(torch.maximum(block.cse(x), block.sse(x)).square().sum(), weights)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-5)


def test_cse_gate_of_half_precision_input_does_not_overflow():
    # 90,000 ones per channel: a float16 sum would be inf (max 65504) and the gate NaN
    layer = ChannelSELayer(2, 4).half()
    x = torch.ones(1, 4, 300, 300, dtype=torch.float16)
    gate = layer.gate(x)
    assert gate.dtype == torch.float16
    torch.testing.assert_close(gate.float(), layer.float().gate(x.float()), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name,aggregation", [("cse", "max"), ("sse", "max")] + [("scse", a) for a in AGGREGATIONS])
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_and_onnx_equal_eager(name, aggregation, inplace):
    # every block and aggregation, in the out-of-place and in-place inference paths and in training: one graph
    # (dynamo, no breaks) that computes what eager does; ONNX export of the inference path gives the same values
    torch._dynamo.reset()  # every case compiles the same forward code: start under dynamo's recompile limit
    torch.manual_seed(0)
    layer = get_se_layer(name, 2, 6, aggregation=aggregation, inplace=inplace).eval()
    x = torch.randn(2, 6, 9, 7)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = layer(x.clone())
        torch.testing.assert_close(compiled(x.clone()), expected, rtol=1e-6, atol=1e-6)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(xc), layer(xe), rtol=1e-6, atol=1e-6)
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x.clone(),), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    model = onnx.load_from_string(buffer.getvalue())
    got = ReferenceEvaluator(model).run(None, {"x": x.numpy()})[0]
    assert abs(got - expected.numpy()).max() < 1e-5
