"""Mean-softmax ensembles of segmentation networks, stored as one ``model.pt`` and exported as one ``model.ts``.

MONAI's ensembles (``MeanEnsembled``, ``EnsembleEvaluator``) average the outputs of several networks inside a
workflow; the bundle's consumers (``ckpt_export``, the MONAI Label and Deploy apps) expect one network and one
weights file, so the average lives in a module here. It returns the log of the mean class probabilities: every
consumer's softmax then gives the mean probabilities, and argmax the ensemble's labels.

Combine separately trained checkpoints with
``python -m scse_monai.networks.ensemble seed0/model.pt seed1/model.pt --out bundle/models/model.pt --overwrite``.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from scse_monai.atomic import write_atomically

__all__ = ["MeanSoftmaxEnsemble", "combine_checkpoints", "ensemble_size", "mean_softmax_ensemble", "member_state"]

PREFIX = "networks."
MEMBER_KEY = re.compile(re.escape(PREFIX) + r"(\d+)\.")  # the start of an ensemble member's key in its state dict


class MeanSoftmaxEnsemble(nn.Module):
    """Networks of the same output classes whose softmax probabilities are averaged.

    The output is ``log(mean_i softmax(net_i(x)))`` (probabilities clamped at 1e-12, in float16 at 6.1e-5, before
    the log), so it can stand wherever one network's logits did: ``softmax`` of it is the mean of the members'
    probabilities.
    Members are ``networks.0``, ``networks.1``, ... in the state dict.

    Args:
        networks: two or more networks with the same input and output shape.

    Example:
        >>> from scse_monai.networks import SEUNet
        >>> nets = [SEUNet(2, in_channels=1, out_channels=3, features=8) for _ in range(2)]
        >>> MeanSoftmaxEnsemble(nets)(torch.zeros(1, 1, 32, 32)).exp().sum(dim=1).allclose(torch.ones(1, 32, 32))
        True
    """

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        if len(networks) < 2:
            raise ValueError(f"an ensemble needs two or more networks, got {len(networks)}")
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs: list[torch.Tensor] = []
        for net in self.networks:
            probs.append(torch.softmax(net(x), dim=1))
        mean = torch.stack(probs).mean(dim=0)
        # 1e-12 is 0 in float16: there the floor is float16's smallest normal number
        return mean.clamp_min(6.103515625e-05 if mean.dtype == torch.float16 else 1e-12).log()


def mean_softmax_ensemble(network: nn.Module, size: int) -> nn.Module:
    """``network`` itself when ``size`` is 1, else a :class:`MeanSoftmaxEnsemble` of ``network`` and copies of it.

    The copies share nothing with ``network``; load the members' weights afterwards (e.g. from a checkpoint
    written by :func:`combine_checkpoints`).

    Example:
        >>> from scse_monai.networks import SEUNet
        >>> net = SEUNet(2, in_channels=1, out_channels=3, features=8)
        >>> mean_softmax_ensemble(net, 1) is net, len(mean_softmax_ensemble(net, 3).networks)
        (True, 3)
    """
    if size < 1:
        raise ValueError(f"ensemble size must be 1 or more, got {size}")
    if size == 1:
        return network
    return MeanSoftmaxEnsemble([network] + [copy.deepcopy(network) for _ in range(size - 1)])


def _state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's errors do not name the file; its weights-only one spans lines and advises
        # weights_only=False (unsafe for an untrusted file): keep the line that says what failed
        detail = str(e).split("WeightsUnpickler error:")[-1]
        reason = next((line.strip() for line in detail.splitlines() if line.strip()), "")
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason})") from None
    state = state.get("model", state) if isinstance(state, dict) else state  # a bundle's {"model": ...} or bare
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict (a mapping of parameter names to tensors, or one under 'model')")
    return state


def ensemble_size(checkpoint: str | os.PathLike) -> int:
    """How many networks ``checkpoint`` holds: N for a :class:`MeanSoftmaxEnsemble`'s weights, else 1.

    A missing file counts as one network, so that a config can be parsed before any weights exist.

    Example:
        >>> ensemble_size("no/such/model.pt")
        1
    """
    return _count(_state_dict(checkpoint)) if Path(checkpoint).is_file() else 1


def _count(state: dict) -> int:
    return len({m.group(1) for k in state if (m := MEMBER_KEY.match(k))}) or 1


def member_state(checkpoint: str | os.PathLike, index: int) -> dict[str, torch.Tensor]:
    """The weights of member ``index`` of an ensemble checkpoint, as one network's state dict.

    Example:
        >>> state = member_state("bundle/models/model.pt", 0)  # doctest: +SKIP
    """
    state = _state_dict(checkpoint)
    size = _count(state)
    if size == 1 or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise ValueError(f"{checkpoint}: no ensemble member {index} (the file holds {size} network(s))")
    prefix = f"{PREFIX}{index}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def combine_checkpoints(members: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Writes the weights of a :class:`MeanSoftmaxEnsemble` of ``members`` (one network's checkpoint each) to ``out``.

    Raises:
        ValueError: fewer than two members, or a member whose keys or shapes differ from the first's.

    Example:
        >>> combine_checkpoints(["seed0/model.pt", "seed1/model.pt"], "bundle/models/model.pt")  # doctest: +SKIP
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs two or more checkpoints, got {len(members)}")
    states = [_state_dict(m) for m in members]
    first = {k: v.shape for k, v in states[0].items()}
    combined = {}
    for i, (path, state) in enumerate(zip(members, states, strict=True)):
        if any(MEMBER_KEY.match(k) for k in state):
            raise ValueError(f"{path}: already an ensemble; combine single networks")
        if {k: v.shape for k, v in state.items()} != first:
            raise ValueError(f"{path}: its keys or shapes differ from those of {members[0]}")
        combined.update({f"{PREFIX}{i}.{k}": v for k, v in state.items()})
    return write_atomically(out, lambda tmp: torch.save(combined, tmp))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Combine single-network checkpoints into one ensemble model.pt.")
    parser.add_argument("members", nargs="+", help="checkpoints of one network each (the bundle's model.pt)")
    parser.add_argument("--out", required=True, help="ensemble checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        print(f"error: --out {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        combine_checkpoints(args.members, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: mean-softmax ensemble of {len(args.members)} networks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
