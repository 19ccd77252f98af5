"""SE-UNet, SE-SDNet and SE-FCDenseNet: shapes, SE placement, parameter counts, padding, TorchScript, ONNX."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from scse_monai.blocks import AGGREGATIONS, ChannelSELayer, ChannelSpatialSELayer, SpatialSELayer
from scse_monai.networks import (
    NETWORKS,
    SEFCDenseNet,
    SESDNet,
    SEUNet,
    count_parameters,
    format_parameter_table,
    get_network,
    network_target,
    parameter_table,
)
from scse_monai.networks.sampling import crop_to, max_unpool, pad_to_multiple

NETS = (SEUNet, SESDNet, SEFCDenseNet)
SE_CONFIGS = [(None, "max"), ("cse", "max"), ("sse", "max")] + [("scse", a) for a in AGGREGATIONS]
SE_TYPES = (ChannelSELayer, SpatialSELayer, ChannelSpatialSELayer)
# odd sizes on purpose: none is divisible by 16
SHAPES = {2: (2, 1, 19, 23), 3: (1, 1, 9, 17, 6)}


def tiny(cls, spatial_dims, **kwargs):
    kwargs.setdefault("features", 4)
    kwargs.setdefault("kernel_size", 3)
    return cls(spatial_dims=spatial_dims, in_channels=1, out_channels=3, **kwargs)


def se_blocks(net):
    return [m for m in net.modules() if isinstance(m, SE_TYPES) and not any(m is c for c in _sub_se(net))]


def _sub_se(net):
    # cse/sse submodules of scSE blocks are parts, not blocks of their own
    return [p for m in net.modules() if isinstance(m, ChannelSpatialSELayer) for p in (m.cse, m.sse)]


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("se,aggregation", SE_CONFIGS)
def test_output_shape_every_variant(cls, spatial_dims, se, aggregation):
    torch.manual_seed(0)
    net = tiny(cls, spatial_dims, se=se, aggregation=aggregation).eval()
    x = torch.randn(SHAPES[spatial_dims])
    with torch.no_grad():
        y = net(x)
    assert y.shape == (x.shape[0], 3, *x.shape[2:])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("cls", NETS)
def test_eight_distinct_se_blocks_each_called_once_per_forward(cls):
    net = tiny(cls, 2, se="scse").eval()
    blocks = se_blocks(net)
    assert len(blocks) == 8 and len({id(b) for b in blocks}) == 8
    calls = []
    for b in blocks:
        b.register_forward_hook(lambda m, i, o: calls.append((m, i[0].shape[1], o.shape)))
    with torch.no_grad():
        net(torch.randn(1, 1, 32, 32))
    assert len(calls) == 8 and len({id(m) for m, _, _ in calls}) == 8
    assert all(c == 4 for _, c, _ in calls)
    # encoder SE blocks see 32, 16, 8, 4; decoder SE blocks 4, 8, 16, 32 (bottleneck has none by default)
    assert [o[-1] for _, _, o in calls] == [32, 16, 8, 4, 4, 8, 16, 32]
    assert len(se_blocks(tiny(cls, 2, se="scse", se_bottleneck=True))) == 9
    assert se_blocks(tiny(cls, 2, se=None)) == []


def _conv(cin, cout, k, spatial_dims=2):
    return cin * cout * k**spatial_dims + cout


def test_seunet_parameter_count_is_the_papers_unet():
    # independent count of the paper's U-Net: 4 encoder + 1 bottleneck + 4 decoder stages of two 5x5 convs
    # (+ BN weight and bias), decoders take 2F channels, 1x1 classifier
    f, k = 64, 5
    first = _conv(1, f, k) + 2 * f
    conv_ff = _conv(f, f, k) + 2 * f
    conv_2ff = _conv(2 * f, f, k) + 2 * f
    expected = first + conv_ff + 3 * 2 * conv_ff + 2 * conv_ff + 4 * (conv_2ff + conv_ff) + _conv(f, 2, 1)
    net = SEUNet(2, 1, 2, features=64, se=None)
    n = count_parameters(net)
    assert n == expected
    assert 2.0e6 < n < 2.2e6
    print(f"SEUNet(features=64, kernel 5x5, se=None): {n:,} parameters")


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_exact_se_parameter_deltas(name):
    def n(se, **kw):
        return count_parameters(get_network(name, spatial_dims=2, in_channels=1, out_channels=2, se=se, **kw))

    base = n(None)
    assert n("scse") - base == 8 * (64 * 32 * 2 + 32 + 64 + 65) == 34_056
    assert n("cse") - base == 33_536
    assert n("sse") - base == 520
    # concat adds one 1x1 conv 2C -> C per block; a bottleneck SE adds a ninth block
    assert n("scse", aggregation="concat") - base == 34_056 + 8 * (128 * 64 + 64)
    assert n("scse", se_bottleneck=True) - base == 9 * 4257


def test_parameter_table_matches_counts():
    rows = parameter_table(networks=["sdnet"], features=8, kernel_size=3)
    base = count_parameters(SESDNet(2, 1, 2, features=8, kernel_size=3, se=None))
    assert [r["se"] for r in rows] == ["none", "cse", "sse", "scse"]
    assert rows[0]["parameters"] == base
    assert rows[3]["added"] == 8 * (8 * 4 * 2 + 4 + 8 + 9)
    table = format_parameter_table(rows)
    assert table.splitlines()[0].startswith("| network | SE |")
    assert f"| sdnet | scse | {rows[3]['parameters']:,} |" in table


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_odd_sizes_equal_zero_padded_then_cropped(cls, spatial_dims):
    torch.manual_seed(0)
    net = tiny(cls, spatial_dims).eval()
    x = torch.randn(SHAPES[spatial_dims])
    padded = F.pad(x, sum(([0, (-s) % 16] for s in reversed(x.shape[2:])), []))
    assert all(s % 16 == 0 for s in padded.shape[2:])
    with torch.no_grad():
        expected = net(padded)[(slice(None), slice(None)) + tuple(slice(0, s) for s in x.shape[2:])]
        assert torch.allclose(net(x), expected, atol=1e-6)


def test_sampling_helpers_match_torch():
    x = torch.randn(2, 3, 10, 12, 6)
    y, idx = F.max_pool3d(x, 2, 2, return_indices=True)
    assert torch.equal(max_unpool(y, idx), F.max_unpool3d(y, idx, 2, 2))
    x2 = torch.randn(2, 3, 10, 12)
    y2, idx2 = F.max_pool2d(x2, 2, 2, return_indices=True)
    assert torch.equal(max_unpool(y2, idx2), F.max_unpool2d(y2, idx2, 2, 2))
    p = pad_to_multiple(x2, 16)
    assert p.shape == (2, 3, 16, 16) and torch.equal(p[..., :10, :12], x2) and p[..., 10:, :].abs().sum() == 0
    assert pad_to_multiple(p, 16) is p
    assert torch.equal(crop_to(p, [10, 12]), x2)


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_torchscript_identical_outputs(cls, spatial_dims):
    torch.manual_seed(0)
    net = tiny(cls, spatial_dims).eval()
    scripted = torch.jit.script(net)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(SHAPES[spatial_dims])
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def _export_onnx(net, x) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    return buffer.getvalue()


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_onnx_export(cls, spatial_dims):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = tiny(cls, spatial_dims).eval()
    x = torch.randn(SHAPES[spatial_dims])
    model = onnx.load_from_string(_export_onnx(net, x))
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        expected = net(x).numpy()
    if cls is SEUNet:
        # onnx's reference evaluator mis-computes MaxPool indices, so it only checks the net without unpooling
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(model).run(None, {"x": x.numpy()})[0]
        assert abs(got - expected).max() < 1e-5
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {"x": x.numpy()})[0] - expected).max() < 1e-5


@pytest.mark.parametrize("cls", NETS)
def test_torch_compile_fullgraph_equals_eager(cls):
    # one graph without breaks (fullgraph=True) for the inference path (in-place SE blocks under no_grad) and the
    # training path (the autograd formulas). Inference runs through aot_eager, the functionalized graph inductor would
    # fuse, without inductor's C++ compile step; training through dynamo alone (an aot_eager joint graph triples the
    # test's time), checking the gradients as well.
    torch.manual_seed(0)
    net = tiny(cls, 2, se="scse").eval()
    x = torch.randn(SHAPES[2])
    with torch.no_grad():
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-6, atol=1e-6)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = net(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
    ye.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _recording_storage_reuse(blocks):
    """Yields a list that gets, per SE block call, whether the block's output shares its input's storage."""
    reused: list[bool] = []
    hooks = [
        b.register_forward_hook(lambda m, args, out: reused.append(out.data_ptr() == args[0].data_ptr()))
        for b in blocks
    ]
    try:
        yield reused
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("se,aggregation", SE_CONFIGS[1:])
def test_inference_writes_se_blocks_over_stage_outputs_only(cls, spatial_dims, se, aggregation):
    # the networks build their SE blocks in-place: without autograd they write over the stage's output. The
    # result must equal the autograd-mode forward and the out-of-place blocks', and the caller's input is untouched.
    torch.manual_seed(0)
    net = tiny(cls, spatial_dims, se=se, aggregation=aggregation).eval()
    blocks = se_blocks(net)
    assert all(b.inplace == (aggregation != "concat") for b in blocks)
    x = torch.randn(SHAPES[spatial_dims])
    y = x.clone()
    with torch.no_grad(), _recording_storage_reuse(blocks) as reused:
        got = net(y)
    assert reused == [aggregation != "concat"] * len(blocks)  # every block wrote over its input (not concat)
    assert torch.equal(y, x)
    assert torch.allclose(got, net(x), atol=1e-6)
    for b in blocks:
        b.inplace = False
    with torch.no_grad():
        assert torch.allclose(got, net(x), rtol=1e-6, atol=1e-7)  # "add": x*gc + x*gs in two ops, not addcmul


@pytest.mark.parametrize("aggregation", ["max", "add"])
def test_inplace_blocks_under_autocast_in_channels_last(aggregation):
    # the GPU inference path of the bundle and the benchmark (AMP, channels_last), exercised on CPU with bfloat16
    # autocast: maps are channels_last (the kernels do not apply), the gates may be of another dtype than the map
    torch.manual_seed(0)
    net = tiny(SEUNet, 2, features=8, se="scse", aggregation=aggregation).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32).to(memory_format=torch.channels_last)
    y = x.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with _recording_storage_reuse(se_blocks(net)) as reused:
            got = net(y)
        assert reused and all(reused)  # the blocks wrote over their inputs under autocast too
        for b in se_blocks(net):
            b.inplace = False
        expected = net(x)
    assert torch.equal(y, x)
    assert torch.allclose(got.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cls", NETS)
def test_training_step_reaches_se_parameters(cls):
    torch.manual_seed(0)
    net = tiny(cls, 2, se="scse", aggregation="add")
    x = torch.randn(2, 1, 16, 16)
    loss = net(x).square().mean()
    loss.backward()
    for b in se_blocks(net):
        # the last layers of both gates always receive gradient with "add" (the ReLU inside cSE may be dead)
        assert b.cse.fc[2].bias.grad.abs().sum() > 0
        assert b.sse.conv.weight.grad.abs().sum() > 0


def test_registry_and_bundle_target():
    net = get_network("SE_UNet", spatial_dims=2, in_channels=1, out_channels=2, features=4, se="cse")
    assert isinstance(net, SEUNet) and len(se_blocks(net)) == 8
    assert all(isinstance(b, ChannelSELayer) for b in se_blocks(net))
    dense = get_network("fcdensenet", spatial_dims=2, in_channels=1, out_channels=2, features=4)
    assert isinstance(dense, SEFCDenseNet)
    assert network_target("SDNet") == "scse_monai.networks.SESDNet"
    with pytest.raises(ValueError, match=r"allowed: \['unet', 'sdnet', 'fcdensenet'\]"):
        get_network("vnet", spatial_dims=2, in_channels=1, out_channels=2)
    parser = ConfigParser(
        {
            "net": {
                "_target_": "scse_monai.networks.SEFCDenseNet",
                "spatial_dims": 3,
                "in_channels": 2,
                "out_channels": 5,
                "features": 4,
                "se": "sse",
            }
        }
    )
    built = parser.get_parsed_content("net")
    assert isinstance(built, SEFCDenseNet) and isinstance(se_blocks(built)[0], SpatialSELayer)
    assert built.eval()(torch.zeros(1, 2, 16, 16, 16)).shape == (1, 5, 16, 16, 16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"spatial_dims": 4}, r"spatial_dims.*\(1, 2, 3\)"),
        ({"spatial_dims": 0}, r"spatial_dims.*\(1, 2, 3\)"),
        ({"spatial_dims": True}, r"spatial_dims.*\(1, 2, 3\)"),
        ({"spatial_dims": 2.0}, r"spatial_dims.*\(1, 2, 3\)"),
        ({"kernel_size": 4}, "kernel_size must be a positive odd integer"),
        ({"kernel_size": 0}, "kernel_size must be a positive odd integer"),
        ({"kernel_size": True}, "kernel_size must be a positive odd integer"),
        ({"features": 0}, "features"),
        ({"in_channels": 0}, "in_channels"),
        ({"se": "bse"}, "cse.*sse.*scse"),
        ({"aggregation": "min"}, "max.*add.*mul.*concat"),
        ({"reduction_ratio": 8}, "reduction_ratio"),
    ],
)
@pytest.mark.parametrize("cls", NETS)
def test_invalid_arguments(cls, kwargs, match):
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**args)


def test_interp_mode_must_suit_the_spatial_dims():
    with pytest.raises(ValueError, match=r"interp_mode must be one of .*'trilinear'\) for 3D"):
        SEUNet(3, 1, 2, features=4, interp_mode="bilinear")
    net = SEUNet(3, 1, 2, features=4, interp_mode="trilinear").eval()
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    assert SEUNet(2, 1, 2, features=4, interp_mode="bicubic").eval()(torch.zeros(1, 1, 16, 16)).shape == (1, 2, 16, 16)


def test_numpy_integers_are_integers():
    import numpy as np

    net = SEUNet(np.int64(2), np.int64(1), 2, features=np.int64(4), kernel_size=np.int64(3)).eval()
    assert net(torch.zeros(1, 1, 16, 16)).shape == (1, 2, 16, 16)


@pytest.mark.parametrize("cls", NETS)
def test_traced_under_no_grad_runs_with_autograd_too(cls):
    # MONAI's convert_to_torchscript(use_trace=True) traces under no_grad: a trace of the in-place blocks would keep
    # ops with out= that fail as soon as the traced model runs with autograd (fine-tuning, GradCAM)
    torch.manual_seed(0)
    net = cls(2, 1, 3, features=4).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        expected = net(x)
    out = traced(x)
    out.sum().backward()
    assert torch.allclose(out, expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(traced(x), expected, atol=1e-6)


@pytest.mark.parametrize("cls", NETS)
def test_empty_batch_gives_an_empty_output(cls):
    net = cls(2, 1, 3, features=4).eval()
    with torch.no_grad():
        assert net(torch.zeros(0, 1, 32, 32)).shape == (0, 3, 32, 32)
