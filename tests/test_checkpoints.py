"""Atomic, resume-safe checkpoint handlers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from scse_monai.checkpoints import AtomicCheckpointSaver, latest_checkpoint


def _evaluator(scores: list[float]) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.key_metric_name = "val_mean_dice"

    @engine.on(Events.EPOCH_COMPLETED)
    def _set(e: Engine) -> None:
        e.state.metrics["val_mean_dice"] = scores[e.state.epoch - 1]

    return engine


def _run_best_saver(tmp_path: Path, net: torch.nn.Module, scores: list[float]) -> None:
    engine = _evaluator(scores)
    # the metric is set before the saver runs: register the saver after the metric handler
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, interval=0, save_key_metric=True).attach(engine)
    engine.run([0], max_epochs=len(scores))


def test_best_model_survives_a_resumed_run_and_existing_files_are_kept(tmp_path: Path) -> None:
    shipped = {"w": torch.ones(1)}
    torch.save(shipped, tmp_path / "model.pt")
    net = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(net.weight, 1.0)
    _run_best_saver(tmp_path, net, [0.5, 0.7, 0.6])
    backups = list(tmp_path.glob("model.pt.*.bak"))
    assert len(backups) == 1 and torch.load(backups[0], weights_only=True)["w"].item() == 1.0
    record = json.loads((tmp_path / "model.pt.json").read_text())
    assert record["score"] == 0.7 and record["epoch"] == 2

    # a "resumed" run in a new process with a worse score must not replace the best model
    torch.nn.init.constant_(net.weight, 2.0)
    _run_best_saver(tmp_path, net, [0.65])
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].flatten()[0].item() == 1.0
    _run_best_saver(tmp_path, net, [0.9])
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].flatten()[0].item() == 2.0
    assert json.loads((tmp_path / "model.pt.json").read_text())["score"] == 0.9
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_interval_checkpoints_keep_the_latest_with_engine_state(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    torch.save({"stale": True}, tmp_path / "checkpoint_epoch=1.pt")  # left by an earlier (killed) run
    trainer = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, interval=1, n_saved=1, save_engine_as="trainer").attach(
        trainer
    )
    trainer.run([0, 1], max_epochs=3)
    files = sorted(p.name for p in tmp_path.glob("checkpoint_epoch=*.pt"))
    assert files == ["checkpoint_epoch=3.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=3.pt"
    state = torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)
    assert set(state) == {"model", "trainer"} and state["trainer"]["iteration"] == 6
