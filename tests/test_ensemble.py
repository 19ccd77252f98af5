"""Mean-softmax ensembles: the module, its checkpoint format and command, and the bundle configs that load it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scse_monai.networks import (
    MeanSoftmaxEnsemble,
    SEUNet,
    combine_checkpoints,
    ensemble_size,
    mean_softmax_ensemble,
    member_state,
)
from scse_monai.networks.ensemble import main

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "bundle" / "configs"


def _net(seed: int, features: int = 8) -> SEUNet:
    torch.manual_seed(seed)
    # the bundle's network (inference.json) at 8 features: 3 input channels (2.5D), 5 classes, 3x3 scSE
    kw = {"kernel_size": 3, "se": "scse", "reduction_ratio": 2, "aggregation": "max"}
    return SEUNet(2, in_channels=3, out_channels=5, features=features, **kw).eval()


def _members(tmp_path: Path, n: int = 2) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"seed{i}.pt")
        torch.save(_net(i).state_dict(), paths[-1])
    return paths


def test_output_is_the_log_of_the_mean_probabilities() -> None:
    nets = [_net(0), _net(1), _net(2)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = MeanSoftmaxEnsemble(nets)(x)
        mean = torch.stack([n(x).softmax(1) for n in nets]).mean(0)
    torch.testing.assert_close(out.softmax(1), mean)
    torch.testing.assert_close(out.exp(), mean)
    assert torch.equal(out.argmax(1), mean.argmax(1))
    assert torch.isfinite(out).all()


def test_half_precision_output_is_finite() -> None:
    # the probability floor 1e-12 is 0 in float16, where log would give -inf for a confident network
    class Confident(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x * 0 + 40.0, x * 0], dim=1)  # class 1 has probability exp(-40), 0 in float16

    ensemble = MeanSoftmaxEnsemble([Confident(), Confident()])
    out = ensemble(torch.zeros(1, 1, 4, 4).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert ensemble(torch.zeros(1, 1, 4, 4)).min() == pytest.approx(-27.631, abs=1e-3)  # float32: floor 1e-12


def test_torchscript_export_matches_eager() -> None:
    ens = MeanSoftmaxEnsemble([_net(0), _net(1)]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(ens)(x), ens(x))


def test_factory_gives_one_network_or_independent_copies() -> None:
    net = _net(0)
    assert mean_softmax_ensemble(net, 1) is net
    ens = mean_softmax_ensemble(net, 3)
    assert isinstance(ens, MeanSoftmaxEnsemble) and len(ens.networks) == 3
    ptrs = {p.data_ptr() for m in ens.networks for p in m.parameters()}
    assert len(ptrs) == 3 * len(list(net.parameters()))  # no parameter is shared between members
    with pytest.raises(ValueError, match="1 or more"):
        mean_softmax_ensemble(net, 0)
    with pytest.raises(ValueError, match="two or more"):
        MeanSoftmaxEnsemble([net])


def test_combined_checkpoint_reproduces_each_member(tmp_path: Path) -> None:
    paths = _members(tmp_path)
    torch.save({"model": torch.load(paths[1], weights_only=True)}, paths[1])  # a bundle's {"model": ...} layout
    out = combine_checkpoints(paths, tmp_path / "models" / "model.pt")
    assert ensemble_size(out) == 2 and ensemble_size(paths[0]) == 1 and ensemble_size(tmp_path / "none.pt") == 1
    ens = mean_softmax_ensemble(_net(7), ensemble_size(out))
    ens.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = (_net(0)(x).softmax(1) + _net(1)(x).softmax(1)) / 2
        torch.testing.assert_close(ens.eval()(x).exp(), expected)
    first = member_state(out, 0)
    assert all(torch.equal(first[k], v) for k, v in _net(0).state_dict().items())
    with pytest.raises(ValueError, match="no ensemble member 2"):
        member_state(out, 2)
    with pytest.raises(ValueError, match="no ensemble member True"):
        member_state(out, True)  # not member 1: a bool index named no key and gave an empty state dict
    with pytest.raises(ValueError, match="already an ensemble"):
        combine_checkpoints([out, paths[0]], tmp_path / "again.pt")


def test_mismatched_or_unreadable_members_are_refused(tmp_path: Path) -> None:
    paths = _members(tmp_path)
    torch.save(_net(2, features=4).state_dict(), paths[1])
    with pytest.raises(ValueError, match="seed1.pt: its keys or shapes differ"):
        combine_checkpoints(paths, tmp_path / "out.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable PyTorch checkpoint") as raised:
        ensemble_size(tmp_path / "junk.pt")
    # one line, without torch's advice to load with weights_only=False (unsafe for a file of unknown origin)
    assert "\n" not in str(raised.value) and "weights_only" not in str(raised.value), str(raised.value)
    # a training checkpoint of another layout: a dict, but not of tensors
    torch.save({"state_dict": _net(2).state_dict(), "epoch": 3}, tmp_path / "lightning.pt")
    with pytest.raises(ValueError, match="lightning.pt: holds no state dict"):
        combine_checkpoints([paths[0], tmp_path / "lightning.pt"], tmp_path / "out.pt")
    assert main([str(paths[0]), str(tmp_path / "lightning.pt"), "--out", str(tmp_path / "out.pt")]) == 1
    with pytest.raises(ValueError, match="two or more"):
        combine_checkpoints(paths[:1], tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_command_writes_the_ensemble_and_never_overwrites_silently(tmp_path: Path, capsys) -> None:
    paths, out = _members(tmp_path), tmp_path / "model.pt"
    out.write_bytes(b"the user's model")
    assert main([*map(str, paths), "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"the user's model"
    assert main([*map(str, paths), "--out", str(out), "--overwrite"]) == 0
    assert ensemble_size(out) == 2
    res = subprocess.run(
        [sys.executable, "-m", "scse_monai.networks.ensemble", str(paths[0]), str(tmp_path / "missing.pt"),
         "--out", str(tmp_path / "new.pt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "missing.pt" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "new.pt").exists()


def _bundle(tmp_path: Path, weights: list[Path] | Path) -> Path:
    """A bundle root whose models/model.pt is ``weights`` (one network) or their ensemble (a list)."""
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    model = tmp_path / "bundle" / "models" / "model.pt"
    if isinstance(weights, list):
        combine_checkpoints(weights, model)
    else:
        model.write_bytes(weights.read_bytes())
    return tmp_path / "bundle"


@pytest.mark.parametrize("members", [1, 2])
def test_bundle_configs_build_the_network_that_model_pt_holds(tmp_path: Path, members: int) -> None:
    paths = _members(tmp_path, members)
    root = _bundle(tmp_path, paths if members > 1 else paths[0])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([_net(i)(x).softmax(1) for i in range(members)]).mean(0)
    for configs, key in ((["inference.json"], "network_def"), (["train.json", "evaluate.json"], "network")):
        parser = ConfigParser()
        parser.read_config([str(CFG / c) for c in configs])
        parser.update({"bundle_root": str(root), "features": 8, "device": "$torch.device('cpu')"})
        net = parser.get_parsed_content(key)
        assert isinstance(net, MeanSoftmaxEnsemble) == (members > 1), configs
        net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x).softmax(1), expected)


def _export(command: str, root: Path, filepath: Path, *extra: str) -> None:
    """``python -m monai.bundle <command> network_def`` of the bundle whose root is ``root``."""
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", command, "network_def", "--filepath", str(filepath),
         "--ckpt_file", str(root / "models" / "model.pt"), "--meta_file", str(CFG / "metadata.json"),
         "--config_file", str(CFG / "inference.json"), "--bundle_root", str(root), "--features", "8", *extra],
        capture_output=True, text=True, cwd=root.parent, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]


def test_ckpt_export_of_an_ensemble_is_one_torchscript_file(tmp_path: Path) -> None:
    root = _bundle(tmp_path, _members(tmp_path))
    ts = tmp_path / "model.ts"
    _export("ckpt_export", root, ts)
    extra = {"inference.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["inference.json"])["network_def"]["size"] == "@ensemble_size"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = (_net(0)(x).softmax(1) + _net(1)(x).softmax(1)) / 2
        torch.testing.assert_close(scripted(x).softmax(1), expected)


@pytest.mark.slow
def test_onnx_export_of_an_ensemble_matches_it(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    root = _bundle(tmp_path, _members(tmp_path))
    onnx_path = tmp_path / "model.onnx"
    _export("onnx_export", root, onnx_path, "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]")
    x = torch.randn(1, 3, 64, 64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = (_net(0)(x).softmax(1) + _net(1)(x).softmax(1)) / 2
    np.testing.assert_allclose(np.exp(out), expected.numpy(), atol=1e-5)
