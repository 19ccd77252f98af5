"""Atomic, resume-safe checkpoint handlers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from scse_monai.checkpoints import AtomicCheckpointSaver, ResumeFromLatestCheckpoint, latest_checkpoint


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


def _counting_trainer(net: torch.nn.Module, loss_at: dict | None = None) -> Engine:
    """A trainer whose step adds 1 to every weight, so each epoch's checkpoint holds different weights; ``loss_at``
    maps an iteration to the loss (and weights) it produces, e.g. NaN."""

    def step(engine: Engine, batch: int) -> dict:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        loss = (loss_at or {}).get(engine.state.iteration, 0.5)
        if loss != loss:  # NaN: the step wrote NaN weights, as an optimizer step after a NaN loss does
            with torch.no_grad():
                net.weight.fill_(loss)
        return {"loss": torch.tensor(loss)}

    return Engine(step)


def _attach_resumable(trainer: Engine, net: torch.nn.Module, ckpt_dir: Path) -> None:
    ResumeFromLatestCheckpoint(str(ckpt_dir), {"model": net}, load_engine_as="trainer").attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), {"model": net}, interval=1, save_engine_as="trainer").attach(trainer)


def test_resume_sets_a_truncated_latest_checkpoint_aside_and_loads_the_previous_one(tmp_path: Path, caplog) -> None:
    net = torch.nn.Linear(2, 1)
    trainer = _counting_trainer(net)
    _attach_resumable(trainer, net, tmp_path)
    trainer.run([0, 1], max_epochs=2)
    epoch1 = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    latest = tmp_path / "checkpoint_epoch=2.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # killed half-way through a copy

    resumed_net = torch.nn.Linear(2, 1)
    resumed = _counting_trainer(resumed_net)
    _attach_resumable(resumed, resumed_net, tmp_path)
    loaded: dict = {}
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: loaded.setdefault("epoch", e.state.epoch))
    resumed.add_event_handler(
        Events.EPOCH_STARTED, lambda e: loaded.setdefault("weight", resumed_net.weight.detach().clone())
    )
    with caplog.at_level(logging.INFO):
        resumed.run([0, 1], max_epochs=3)
    assert loaded["epoch"] == 2  # continued after epoch 1, the last readable checkpoint
    assert torch.equal(loaded["weight"], epoch1["weight"])
    assert (tmp_path / "checkpoint_epoch=2.pt.corrupt").is_file()
    assert "checkpoint_epoch=2.pt" in caplog.text and "renamed to" in caplog.text
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=3.pt"
    assert resumed.state.iteration == 6


def test_training_start_removes_orphan_temp_files_only(tmp_path: Path) -> None:
    orphans = [tmp_path / ".model.pt.k2j3h4.tmp", tmp_path / ".checkpoint_epoch=1.pt.abc.tmp", tmp_path / "tmpa1b2_c3d"]
    kept = [tmp_path / "notes.tmp", tmp_path / "tmp", tmp_path / "model.pt"]
    for p in orphans + kept:
        p.write_bytes(b"x")
    net = torch.nn.Linear(2, 1)
    trainer = _counting_trainer(net)
    _attach_resumable(trainer, net, tmp_path)
    trainer.run([0], max_epochs=1)
    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in kept)


def test_non_finite_loss_stops_training_before_any_save_of_its_weights(tmp_path: Path) -> None:
    from scse_monai.handlers import StopOnNonFiniteLoss

    net = torch.nn.Linear(2, 1)
    trainer = _counting_trainer(net, loss_at={4: float("nan")})  # epoch 2, second iteration
    StopOnNonFiniteLoss().attach(trainer)
    _attach_resumable(trainer, net, tmp_path)
    evaluator = _evaluator([0.1, 0.2, 0.3])
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, interval=0, save_key_metric=True).attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=e.state.epoch))
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2, iteration 4 \(2 of the epoch\)"):
        trainer.run([0, 1], max_epochs=3)
    assert [p.name for p in tmp_path.glob("checkpoint_epoch=*.pt")] == ["checkpoint_epoch=1.pt"]
    saved = [torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["model"]]
    saved.append(torch.load(tmp_path / "model.pt", weights_only=True))
    assert all(torch.isfinite(t).all() for state in saved for t in state.values())


def test_savers_refuse_non_finite_weights(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    _run_best_saver(tmp_path, net, [0.5])
    with torch.no_grad():
        net.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"not saving .*model\.pt.*model\.bias"):
        _run_best_saver(tmp_path, net, [0.9])
    assert torch.isfinite(torch.load(tmp_path / "model.pt", weights_only=True)["bias"]).all()
    assert json.loads((tmp_path / "model.pt.json").read_text())["score"] == 0.5
    trainer = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, interval=1).attach(trainer)
    with pytest.raises(FloatingPointError, match="not saving a checkpoint at epoch 1"):
        trainer.run([0], max_epochs=1)
    assert latest_checkpoint(tmp_path) is None


class _Killed(Exception):
    """Stands for a SIGKILL while a checkpoint is being written."""


def test_n_saved_1_keeps_the_previous_checkpoint_until_the_new_one_is_in_place(tmp_path: Path, monkeypatch) -> None:
    from ignite.handlers import DiskSaver

    save = DiskSaver._save_func

    def dying_save(self, checkpoint, path, func) -> None:
        if Path(path).name == "checkpoint_epoch=3.pt":
            raise _Killed(path)
        save(self, checkpoint, path, func)

    def run(max_epochs: int) -> Engine:
        net = torch.nn.Linear(2, 1)
        trainer = _counting_trainer(net)
        ResumeFromLatestCheckpoint(str(tmp_path), {"model": net}, load_engine_as="trainer").attach(trainer)
        AtomicCheckpointSaver(str(tmp_path), {"model": net}, n_saved=1, save_engine_as="trainer").attach(trainer)
        trainer.run([0], max_epochs=max_epochs)
        return trainer

    monkeypatch.setattr(DiskSaver, "_save_func", dying_save)
    with pytest.raises(_Killed):
        run(5)  # ignite removes checkpoint 2 while it saves checkpoint 3
    assert [p.name for p in tmp_path.glob("*.pt")] == ["checkpoint_epoch=2.pt"]
    with pytest.raises(_Killed):
        run(5)  # the resumed run's first save takes the folder over
    assert [p.name for p in tmp_path.glob("*.pt")] == ["checkpoint_epoch=2.pt"]
    monkeypatch.undo()
    assert run(5).state.epoch == 5
    assert [p.name for p in tmp_path.glob("*.pt")] == ["checkpoint_epoch=5.pt"]


def test_nan_key_metric_is_never_the_best_and_an_old_nan_record_is_no_best(tmp_path: Path, caplog) -> None:
    def strict_record() -> dict:
        return json.loads((tmp_path / "model.pt.json").read_text(), parse_constant=pytest.fail)

    net = torch.nn.Linear(2, 1)
    scores = [float("nan"), 0.5, 0.9, float("nan")]
    engine = _evaluator(scores)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: torch.nn.init.constant_(net.weight, e.state.epoch))
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, interval=0, save_key_metric=True).attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run([0], max_epochs=len(scores))
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].flatten()[0].item() == 3.0
    assert strict_record() == {"key_metric_name": "val_mean_dice", "score": 0.9, "epoch": 3}
    assert "epoch 1" in caplog.text and "epoch 4" in caplog.text and "nan" in caplog.text

    # a record with NaN, written by an earlier version, counts as no best: the next score is saved (old file kept)
    (tmp_path / "model.pt.json").write_text('{"key_metric_name": "val_mean_dice", "score": NaN, "epoch": 1}')
    torch.nn.init.constant_(net.weight, 7.0)
    _run_best_saver(tmp_path, net, [0.2])
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].flatten()[0].item() == 7.0
    assert strict_record()["score"] == 0.2 and len(list(tmp_path.glob("model.pt.*.bak"))) == 1


def test_file_prefixes_that_extend_each_other_are_separate_series(tmp_path: Path) -> None:
    net, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    trainer = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"model": ema}, file_prefix="checkpoint_ema").attach(trainer)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, file_prefix="checkpoint").attach(trainer)
    trainer.run([0], max_epochs=3)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "checkpoint_ema_epoch=2.pt",
        "checkpoint_ema_epoch=3.pt",
        "checkpoint_epoch=2.pt",
        "checkpoint_epoch=3.pt",
    ]
    torch.save({"model": ema.state_dict()}, tmp_path / "checkpoint_ema_epoch=4.pt")
    assert latest_checkpoint(tmp_path, "checkpoint") == tmp_path / "checkpoint_epoch=3.pt"
    assert latest_checkpoint(tmp_path, "checkpoint_ema") == tmp_path / "checkpoint_ema_epoch=4.pt"


def test_best_model_follows_the_engines_metric_cmp_fn(tmp_path: Path) -> None:
    from ignite.metrics import Average
    from monai.engines import SupervisedEvaluator

    def run(hd95: list[float]) -> SupervisedEvaluator:
        net = torch.nn.Linear(1, 1)
        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=[{"image": torch.zeros(1, 1), "label": torch.zeros(1, 1)}],
            network=net,
            decollate=False,
            key_val_metric={"val_hd95": Average(lambda o: torch.tensor(hd95[evaluator.state.epoch - 1]))},
            metric_cmp_fn=lambda current, prev: current < prev,  # lower is better, e.g. a Hausdorff distance
            val_handlers=[AtomicCheckpointSaver(str(tmp_path), {"model": net}, interval=0, save_key_metric=True)],
        )
        for epoch in range(1, len(hd95) + 1):
            torch.nn.init.constant_(net.bias, epoch)
            evaluator.run(global_epoch=epoch)
        return evaluator

    def saved() -> tuple[float, dict]:
        record = json.loads((tmp_path / "model.pt.json").read_text(), parse_constant=pytest.fail)
        return torch.load(tmp_path / "model.pt", weights_only=True)["bias"].item(), record

    evaluator = run([float("inf"), 9.0, 3.0, 5.0])
    assert evaluator.state.best_metric == 3.0 and evaluator.state.best_metric_epoch == 3
    assert saved() == (3.0, {"key_metric_name": "val_hd95", "score": 3.0, "epoch": 3})
    run([4.0])  # a resumed run with a worse (higher) distance keeps the best model
    assert saved()[0] == 3.0
    run([2.0])
    assert saved() == (1.0, {"key_metric_name": "val_hd95", "score": 2.0, "epoch": 1})
