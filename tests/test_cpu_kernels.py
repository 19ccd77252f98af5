"""The compiled CPU kernels of the max-out scSE block (scse_monai/csrc/scse_cpu.cpp) and their loader.

The kernels are built once per source and torch version (``make setup`` does it; the fixture builds them if they
are missing). Without a C++ compiler these tests are skipped and the blocks use their PyTorch path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scse_monai import cpu_kernels
from scse_monai.blocks import ChannelSpatialSELayer

REPO = Path(__file__).resolve().parents[1]
KERNEL_NODE = "_KernelScSEMaxOutBackward"


@pytest.fixture(scope="module")
def kernels():
    if cpu_kernels.mode() == "off":
        pytest.skip(f"{cpu_kernels.ENV_VAR}=off")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here (the blocks use their PyTorch path)")
    cpu_kernels.build()  # a compiler error fails the tests
    assert cpu_kernels.available()


def blocks(spatial_dims: int, channels: int, dtype=torch.float64, seed: int = 0):
    """The same max-out block twice: on the kernels (forced, whatever the map size) and on the PyTorch path."""
    torch.manual_seed(seed)
    kernel = ChannelSpatialSELayer(spatial_dims, channels, reduction_ratio=2, aggregation="max").to(dtype)
    kernel.kernel_min_elements = 0
    plain = ChannelSpatialSELayer(spatial_dims, channels, reduction_ratio=2, aggregation="max").to(dtype)
    plain.load_state_dict(kernel.state_dict())
    plain.use_cpu_kernels = False
    return kernel, plain


def channel_shifted(shape, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """Random map whose channel means differ, so that the cSE's hidden ReLU units pass gradients."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.linspace(-1.5, 1.5, shape[1], dtype=dtype).view(1, -1, *([1] * (len(shape) - 2)))
    return torch.randn(shape, generator=g, dtype=dtype) + shift


def definition(block: ChannelSpatialSELayer, x: torch.Tensor) -> torch.Tensor:
    return torch.maximum(block.cse(x), block.sse(x))


# several position blocks of every kernel (4096 / 2048 positions, rows of 16384) with ragged ends, batch > 1
@pytest.mark.parametrize("shape", [(2, 6, 20_000), (3, 6, 17, 19, 23), (2, 16, 130, 67)])
def test_forward_and_backward_match_the_definition(kernels, shape):
    kernel, plain = blocks(len(shape) - 2, shape[1])
    x = channel_shifted(shape).requires_grad_(True)
    out = kernel(x)
    assert type(out.grad_fn).__name__ == KERNEL_NODE  # the path under test is taken
    with torch.no_grad():
        assert (plain.cse(x) - plain.sse(x)).abs().min() > 1e-9  # no ties: the gradient is unique
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    weights = (x, *kernel.parameters())
    got = torch.autograd.grad(out, weights, grad)
    expected_out = definition(plain, x)
    expected = torch.autograd.grad(expected_out, (x, *plain.parameters()), grad)
    assert torch.allclose(out, expected_out, rtol=0, atol=1e-12)
    for name, g, e in zip(["x"] + [n for n, _ in kernel.named_parameters()], got, expected, strict=True):
        assert e.abs().max() > 0, name  # every gradient is exercised
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-9), name


def test_gradcheck(kernels):
    kernel, _ = blocks(2, 4)
    x = channel_shifted((2, 4, 5, 6)).requires_grad_(True)
    names = [n for n, _ in kernel.named_parameters()]

    def f(t, *ps):
        return torch.func.functional_call(kernel, dict(zip(names, ps, strict=True)), (t,))

    params = tuple(p.detach().clone().requires_grad_(True) for p in kernel.parameters())
    assert type(f(x, *params).grad_fn).__name__ == KERNEL_NODE
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_float32_inference_and_training_agree_with_the_pytorch_path(kernels):
    kernel, plain = blocks(2, 32, dtype=torch.float32)
    kernel.kernel_min_elements = plain.kernel_min_elements  # the default threshold, with a map above it
    x = channel_shifted((2, 32, 96, 96), dtype=torch.float32).relu_()  # ReLU output: many exact zeros (ties)
    assert x.numel() >= kernel.kernel_min_elements
    with torch.no_grad():
        inferred = kernel(x)
    assert inferred.grad_fn is None
    assert torch.allclose(inferred, definition(plain, x), rtol=1e-5, atol=1e-6)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for block in (kernel, plain):
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.backward(grad)
        results.append([type(out.grad_fn).__name__, out.detach(), xi.grad, *(p.grad for p in block.parameters())])
    assert results[0][0] == KERNEL_NODE and results[1][0] != KERNEL_NODE
    for got, expected in zip(results[0][1:], results[1][1:], strict=True):
        # at x == 0 both paths send the gradient to the sSE branch, so the input gradients agree there too
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_inference_writes_the_kernel_output_over_the_input(kernels, dtype):
    kernel, _ = blocks(3, 8, dtype=dtype)
    inplace = ChannelSpatialSELayer(3, 8, reduction_ratio=2, aggregation="max", inplace=True).to(dtype)
    inplace.load_state_dict(kernel.state_dict())
    inplace.kernel_min_elements = 0
    x = channel_shifted((2, 8, 20, 30, 60), dtype=dtype)  # 36,000 positions: three row chunks, the last one ragged
    y = x.clone()
    with torch.no_grad(), torch.profiler.profile() as prof:
        expected = kernel(x)
        got = inplace(y)
    ops = [e.key for e in prof.key_averages()]
    assert "scse_monai::maxout_forward_" in ops and "scse_monai::maxout_forward" in ops  # both kernel forms ran
    assert got.data_ptr() == y.data_ptr() and torch.equal(got, expected)
    # with autograd on, the same block returns a new tensor and leaves its input alone
    z = x.clone().requires_grad_(True)
    out = inplace(z)
    assert type(out.grad_fn).__name__ == KERNEL_NODE and torch.equal(z.detach(), x)


def test_frozen_weights_and_input_get_no_gradient(kernels):
    kernel, plain = blocks(2, 4)
    x = channel_shifted((2, 4, 30, 30))
    kernel.requires_grad_(False)
    assert kernel(x).grad_fn is None
    kernel.sse.requires_grad_(True)
    out = kernel(x)
    assert type(out.grad_fn).__name__ == KERNEL_NODE
    out.sum().backward()
    assert all(p.grad is None for p in kernel.cse.parameters())
    (expected,) = torch.autograd.grad(definition(plain, x).sum(), plain.sse.conv.weight)
    assert torch.allclose(kernel.sse.conv.weight.grad, expected, atol=1e-9)


def test_nan_propagates_as_in_the_pytorch_path(kernels):
    # a NaN in the input or in the gates (diverged cSE weights) must reach the output, as with torch.maximum
    kernel, plain = blocks(2, 4, dtype=torch.float32)
    x = channel_shifted((2, 4, 40, 40), dtype=torch.float32)
    x[1, 2, 3, 4] = float("nan")
    with torch.no_grad():
        got, expected = kernel(x), plain(x)
        assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().sum() >= 1
        kernel.cse.fc[2].bias[1] = float("nan")
        plain.cse.fc[2].bias[1] = float("nan")
        got, expected = kernel(x), plain(x)
    assert torch.equal(got.isnan(), expected.isnan()) and got[:, 1].isnan().all()


@pytest.mark.parametrize(
    "case",
    ["bfloat16", "autocast", "non_contiguous", "small_map", "disabled", "torchscript"],
)
def test_other_inputs_take_the_pytorch_path(kernels, case):
    kernel, plain = blocks(2, 8, dtype=torch.float32)
    x = channel_shifted((2, 8, 40, 40), dtype=torch.float32)
    if case == "bfloat16":
        kernel, x = kernel.to(torch.bfloat16), x.to(torch.bfloat16)
    elif case == "non_contiguous":
        x = x.transpose(2, 3)
    elif case == "small_map":
        kernel.kernel_min_elements = x.numel() + 1
    elif case == "disabled":
        kernel.use_cpu_kernels = False
    elif case == "torchscript":
        kernel = torch.jit.script(kernel)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = kernel(x)
    assert type(out.grad_fn).__name__ != KERNEL_NODE
    if case not in ("bfloat16", "autocast"):
        assert torch.allclose(out, definition(plain, x), atol=1e-6)


def test_torch_compile_sees_pytorch_ops_only(kernels, monkeypatch):
    # dynamo cannot trace the kernels' autograd node (no fake implementations): compiled code takes the PyTorch path
    kernel, plain = blocks(2, 8, dtype=torch.float32)
    calls = []
    original = ChannelSpatialSELayer._kernel_max_out
    monkeypatch.setattr(ChannelSpatialSELayer, "_kernel_max_out", lambda self, x: calls.append(1) or original(self, x))
    x = channel_shifted((2, 8, 40, 40), dtype=torch.float32)
    kernel(x)
    assert calls == [1]  # eager: the kernels
    torch._dynamo.reset()
    compiled = torch.compile(kernel, backend="eager", fullgraph=True)
    out = compiled(x)
    assert calls == [1]
    assert torch.allclose(out, definition(plain, x), atol=1e-6)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )


def test_auto_mode_never_compiles_and_off_mode_never_loads(tmp_path):
    # auto with nothing built: the PyTorch path, at once, and nothing written to the cache
    probe = "from scse_monai import cpu_kernels; print(cpu_kernels.available())"
    # the answer is kept: every block call asks, and must not look at the disk each time
    once = probe + "; cpu_kernels.library_path = None; print(cpu_kernels.available())"
    r = run_python(once, TORCH_EXTENSIONS_DIR=str(tmp_path), SCSE_MONAI_CPU_KERNELS="auto")
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr
    assert list(tmp_path.iterdir()) == []
    r = run_python(probe, SCSE_MONAI_CPU_KERNELS="0")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_a_bad_mode_is_named_in_the_error():
    r = run_python("from scse_monai import cpu_kernels; cpu_kernels.available()", SCSE_MONAI_CPU_KERNELS="yes")
    assert r.returncode != 0 and "SCSE_MONAI_CPU_KERNELS='yes'" in r.stderr and "auto" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "scse_monai.cpu_kernels", "status"],
        cwd=REPO,
        env={**os.environ, "SCSE_MONAI_CPU_KERNELS": "yes"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "SCSE_MONAI_CPU_KERNELS" in r.stderr


def test_missing_compiler_is_reported_and_the_blocks_still_work(tmp_path):
    code = (
        "import torch, warnings; from scse_monai import cpu_kernels; from scse_monai.blocks import "
        "ChannelSpatialSELayer\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); ok = cpu_kernels.available()\n"
        "print(ok, [str(m.message) for m in w])\n"
        "b = ChannelSpatialSELayer(2, 4); b.kernel_min_elements = 0; x = torch.randn(1, 4, 8, 8, requires_grad=True)\n"
        "print(type(b(x).grad_fn).__name__)"
    )
    r = run_python(code, TORCH_EXTENSIONS_DIR=str(tmp_path), SCSE_MONAI_CPU_KERNELS="build", CXX="no-such-compiler")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first.startswith("False") and "no-such-compiler" in first and "not found" in first
    assert second != KERNEL_NODE
    assert list(tmp_path.iterdir()) == []  # no partial build left behind


def test_cli_builds_into_an_empty_cache_checks_and_leaves_only_the_library(kernels, tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "scse_monai.cpu_kernels"]
    r = subprocess.run(cmd + ["status"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "built: no" in r.stdout
    r = subprocess.run(cmd + ["build"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "ready" in r.stdout and "relative difference" in r.stdout
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".so"] and files[0].name.startswith("scse_monai_cpu_")
    r = subprocess.run(cmd + ["status"], cwd=REPO, env=env, capture_output=True, text=True)
    assert "built: yes" in r.stdout and files[0].name in r.stdout
    # built: auto mode now loads it, and the blocks take the kernels
    code = (
        "import torch; from scse_monai.blocks import ChannelSpatialSELayer\n"
        "b = ChannelSpatialSELayer(2, 8); x = torch.randn(2, 8, 200, 200, requires_grad=True)\n"
        "print(type(b(x).grad_fn).__name__)"
    )
    r = run_python(code, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == KERNEL_NODE, r.stderr


def test_self_check_reports_agreement(kernels):
    assert 0 <= cpu_kernels.self_check() < 1e-5
