"""Tests for scse_monai.handlers in MONAI workflows built from bundle-style configs (tiny data, CPU)."""

from __future__ import annotations

import csv
import math
import socket

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.utils import one_hot

from scse_monai.handlers import (
    GlobalDice,
    GlobalJaccard,
    PerCaseMetricsSaver,
    TrainingCurvePlotter,
    batch_case_names,
)

C = 4
CLASS_NAMES = ["liver", "right kidney", "left kidney", "spleen"][: C - 1]  # as in datalist "labels"
KEYS = [n.replace(" ", "_") for n in CLASS_NAMES]


def _cases(n: int = 5, seed: int = 0) -> list[dict]:
    """Cases whose "image" is the one-hot of a noisy copy of the label: an identity network predicts it."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        shape = (1, 8, 9, 4)
        y = torch.randint(0, C, shape, generator=g)
        if i == 0:
            y[y == 2] = 0  # class 2 absent from case 0's label ...
        pred = torch.where(torch.rand(shape, generator=g) < 0.7, y, torch.randint(0, C, shape, generator=g))
        if i == 0:
            pred[pred == 2] = 1  # ... and from its prediction: NaN for that case
        meta = {"filename_or_obj": f"/data/imagesTs/patient_{i:02d}.nii.gz"}
        items.append(
            {
                "image": MetaTensor(one_hot(pred.unsqueeze(0), C)[0].float(), meta=meta),
                "label": MetaTensor(y.float(), meta={"filename_or_obj": f"/data/labelsTs/patient_{i:02d}.nii.gz"}),
                "pred_labels": pred,
            }
        )
    return items


def _reference(items: list[dict]) -> dict:
    """Independent numpy Dice / Jaccard: per case and pooled, foreground classes."""
    counts = []
    for it in items:
        p, t = it["pred_labels"].numpy(), it["label"].numpy()
        counts.append([[np.sum((p == k) & (t == k)), np.sum(p == k), np.sum(t == k)] for k in range(1, C)])
    counts = np.asarray(counts, dtype=float)

    def scores(c):
        i, p, t = c[..., 0], c[..., 1], c[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(p + t > 0, 2 * i / (p + t), np.nan), np.where(p + t > 0, i / (p + t - i), np.nan)

    case_d, case_j = scores(counts)
    glob_d, glob_j = scores(counts.sum(0))
    return {"case_dice": case_d, "case_jaccard": case_j, "dice": glob_d, "jaccard": glob_j}


def _evaluator_config(items: list[dict], out_dir: str) -> dict:
    return {
        "imports": ["$import monai", "$import torch"],
        "output_dir": out_dir,
        "num_classes": C,
        "class_names": CLASS_NAMES,
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": {"_target_": "Dataset", "data": [{k: it[k] for k in ("image", "label")} for it in items]},
            "batch_size": 2,
            "collate_fn": "$monai.data.list_data_collate",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
        "key_metric": {
            "val_mean_dice": {
                "_target_": "scse_monai.handlers.GlobalDice",
                "num_classes": "@num_classes",
                "class_names": "@class_names",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
        "additional_metrics": {
            "val_mean_jaccard": {
                "_target_": "scse_monai.handlers.GlobalJaccard",
                "num_classes": "@num_classes",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            },
            # the metric in MONAI's own handler, unchanged
            "monai_handler_jaccard": {
                "_target_": "IgniteMetricHandler",
                "metric_fn": {
                    "_target_": "scse_monai.metrics.SegmentationCountsMetric",
                    "num_classes": "@num_classes",
                    "metric_name": "jaccard",
                },
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                "save_details": False,
            },
        },
        "handlers": [
            {
                "_target_": "scse_monai.handlers.PerCaseMetricsSaver",
                "output_dir": "@output_dir",
                "class_names": "@class_names",
            },
            {
                "_target_": "MetricsSaver",
                "save_dir": "$@output_dir + '/monai_saver'",
                "metrics": "*",
                "metric_details": ["val_mean_dice"],
                "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
            },
        ],  # fmt: skip
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "cpu",
            "val_data_loader": "@dataloader",
            "network": "$torch.nn.Identity()",
            "postprocessing": "@postprocessing",
            "key_val_metric": "@key_metric",
            "additional_metrics": "@additional_metrics",
            "val_handlers": "@handlers",
        },
    }


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One MONAI SupervisedEvaluator run built from a bundle-style config (decollated batches of 2)."""
    items = _cases()
    out = tmp_path_factory.mktemp("eval")
    parser = ConfigParser(_evaluator_config(items, str(out)))
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    return evaluator, items, out


def test_key_and_additional_metrics_in_evaluator(evaluated):
    evaluator, items, _ = evaluated
    ref = _reference(items)
    metrics = evaluator.state.metrics
    assert metrics["val_mean_dice"] == pytest.approx(np.nanmean(ref["dice"]))
    assert metrics["val_mean_jaccard"] == pytest.approx(np.nanmean(ref["jaccard"]))
    for k, name in enumerate(KEYS):
        assert metrics[f"val_mean_dice_{name}"] == pytest.approx(ref["dice"][k])
        assert metrics[f"val_mean_jaccard_class{k + 1}"] == pytest.approx(ref["jaccard"][k])
    details = evaluator.state.metric_details
    np.testing.assert_allclose(details["val_mean_dice"].numpy(), ref["case_dice"])
    np.testing.assert_allclose(details["val_mean_jaccard"].numpy(), ref["case_jaccard"])
    assert math.isnan(details["val_mean_dice"][0, 1])  # class 2 absent from case 0
    assert evaluator.state.best_metric == pytest.approx(metrics["val_mean_dice"])
    # MONAI's IgniteMetricHandler records the metric's aggregate() unchanged
    assert metrics["monai_handler_jaccard"] == pytest.approx(np.nanmean(ref["jaccard"]))


def test_monai_metrics_saver_writes_the_per_case_table(evaluated):
    _, items, out = evaluated
    ref = _reference(items)
    saved = out / "monai_saver"
    metrics = dict(line.split(",") for line in (saved / "metrics.csv").read_text().splitlines())
    assert float(metrics["val_mean_dice"]) == pytest.approx(np.nanmean(ref["dice"]))
    with open(saved / "val_mean_dice_raw.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0].rsplit("/", 1)[-1] for r in rows[1:]] == [f"patient_{i:02d}.nii.gz" for i in range(len(items))]
    got = np.array([[float(v) for v in r[1:C]] for r in rows[1:]])
    np.testing.assert_allclose(got, ref["case_dice"], rtol=1e-4)


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_per_case_saver_files(evaluated):
    _, items, out = evaluated
    ref = _reference(items)
    rows = _read_csv(out / "metrics_per_case.csv")
    assert [r["case"] for r in rows] == [f"patient_{i:02d}" for i in range(len(items))]
    for i, row in enumerate(rows):
        for k, name in enumerate(KEYS):
            for metric in ("dice", "jaccard"):
                expected = ref[f"case_{metric}"][i, k]
                cell = row[f"{metric}_{name}"]
                assert (cell == "") if math.isnan(expected) else float(cell) == pytest.approx(expected, rel=1e-5)
    summary = {r["class"]: r for r in _read_csv(out / "metrics_summary.csv")}
    for k, name in enumerate(KEYS):
        col = ref["case_dice"][:, k]
        valid = col[~np.isnan(col)]
        assert float(summary[name]["dice_mean"]) == pytest.approx(valid.mean(), rel=1e-5)
        assert float(summary[name]["dice_std"]) == pytest.approx(valid.std(), rel=1e-5)
        assert float(summary[name]["dice_median"]) == pytest.approx(np.median(valid), rel=1e-5)
        assert int(summary[name]["n_cases"]) == valid.size
        assert float(summary[name]["global_dice"]) == pytest.approx(ref["dice"][k], rel=1e-5)
        assert float(summary[name]["global_jaccard"]) == pytest.approx(ref["jaccard"][k], rel=1e-5)
    assert float(summary["mean"]["global_dice"]) == pytest.approx(np.nanmean(ref["dice"]), rel=1e-5)
    assert (out / "metrics_dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_batched_tensors_in_plain_ignite_engine():
    items = _cases(4, seed=3)
    preds = torch.stack([it["pred_labels"] for it in items])
    labels = torch.stack([it["label"].as_tensor() for it in items])
    engine = Engine(lambda e, b: b)
    GlobalDice(class_names={"0": "bg", "1": "a", "2": "b", "3": "c"}).attach(engine, "dice")
    GlobalJaccard(C).attach(engine, "iou")
    engine.run([(preds[:2], labels[:2]), (preds[2:], labels[2:])])
    ref = _reference(items)
    assert engine.state.metrics["dice"] == pytest.approx(np.nanmean(ref["dice"]))
    assert engine.state.metrics["dice_b"] == pytest.approx(ref["dice"][1])
    assert engine.state.metrics["iou"] == pytest.approx(np.nanmean(ref["jaccard"]))
    # reset at each run
    engine.run([(preds[:2], labels[:2])])
    assert engine.state.metrics["dice"] == pytest.approx(np.nanmean(_reference(items[:2])["dice"]))


def test_batch_case_names_fallbacks():
    meta = {"filename_or_obj": ["/a/x1.nii.gz", "/a/x2.nii.gz"]}
    batched = MetaTensor(torch.zeros(2, 1, 2, 2), meta=meta)
    assert batch_case_names(batched) == ["x1", "x2"]
    plain = torch.zeros(2, 1, 2, 2)
    assert batch_case_names(plain, plain, {"image": batched}) == ["x1", "x2"]
    assert batch_case_names(plain, None, {"image": plain, "image_meta_dict": meta}) == ["x1", "x2"]
    decollated = [{"image": MetaTensor(torch.zeros(1, 2), meta={"filename_or_obj": "/b/y.nii"})}, {"image": None}]
    assert batch_case_names([plain[0], plain[1]], None, decollated) == ["y", None]


def test_per_case_rows_of_cases_with_the_same_file_name_differ(tmp_path):
    # KiTS layout: case_00000/imaging.nii.gz, case_00001/imaging.nii.gz, ... are all named "imaging"
    engine = Engine(lambda e, b: b)
    GlobalDice(C).attach(engine, "dice")
    saver = PerCaseMetricsSaver(tmp_path, class_names=CLASS_NAMES, output_transform=lambda o: o)
    saver.attach(engine)
    items = _cases(3)
    for i, it in enumerate(items):
        it["label"].meta["filename_or_obj"] = f"/data/kits19/case_{i:05d}/imaging.nii.gz"
    with pytest.warns(UserWarning, match="'imaging'"):
        engine.run([([it["label"].clone()], [it["label"]]) for it in items])
    rows = _read_csv(tmp_path / "metrics_per_case.csv")
    assert [r["case"] for r in rows] == ["imaging", "imaging#2", "imaging#3"]


def test_saver_and_metric_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="class_names has 2 entries; expected 3"):
        PerCaseMetricsSaver(tmp_path, class_names=["a", "b"], num_classes=4)
    with pytest.raises(ValueError, match="num_classes or class_names"):
        GlobalDice()
    # a class list including the background is accepted and the background dropped
    assert GlobalDice(num_classes=3, class_names=["background", "a", "b"]).class_labels == ["a", "b"]


def test_training_curve_plotter_records_and_resumes(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = [torch.randn(4, 3) for _ in range(3)]
    losses: list[float] = []

    def train_step(engine, x):
        opt.zero_grad()
        loss = (net(x) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        return {"loss": loss.detach()}

    trainer = Engine(train_step)
    evaluator = Engine(lambda e, b: b)

    @evaluator.on(Events.COMPLETED)
    def _metric(engine):
        per_class = torch.tensor([0.5, 0.7])  # not one number: left out
        metrics = {"val_dice": 0.1 * trainer.state.epoch, "val_hd95": torch.tensor(2.0), "per_class": per_class}
        engine.state.metrics.update({**metrics, "not_a_number": "x"})

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    plotter = TrainingCurvePlotter(tmp_path, evaluator=evaluator, every_n_epochs=2)
    plotter.attach(trainer)
    saved_epochs = []
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: saved_epochs.append(len(_read_csv(plotter.csv_path)) if e.state.epoch == 2 else 0),
    )
    trainer.run(data, max_epochs=3)
    rows = _read_csv(tmp_path / "training_curves.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for epoch, row in enumerate(rows, start=1):
        assert float(row["loss"]) == pytest.approx(np.mean(losses[3 * (epoch - 1) : 3 * epoch]), rel=1e-5)
        assert float(row["val_dice"]) == pytest.approx(0.1 * epoch) and float(row["val_hd95"]) == 2.0
    assert "not_a_number" not in rows[0] and "per_class" not in rows[0]
    assert saved_epochs[1] >= 1  # written during training (every 2 epochs), not only at the end
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"

    # resume: a new plotter on a trainer whose checkpoint loader (attached after it, at STARTED, like MONAI's
    # CheckpointLoader) restores epoch 2: epochs 1-2 are kept from the CSV, epoch 3 is replaced, 4 added
    resumed = Engine(train_step)
    TrainingCurvePlotter(tmp_path, every_n_epochs=0).attach(resumed)

    @resumed.on(Events.STARTED)
    def _load_checkpoint(engine):
        engine.state.epoch, engine.state.iteration = 2, 2 * len(data)

    resumed.run(data, max_epochs=4)
    rows2 = _read_csv(tmp_path / "training_curves.csv")
    assert [int(r["epoch"]) for r in rows2] == [1, 2, 3, 4]
    assert rows2[:2] == rows[:2]
    assert float(rows2[2]["loss"]) != pytest.approx(float(rows[2]["loss"]))


def test_training_curve_plotter_resumes_with_validation_at_start(tmp_path):
    # MONAI's ValidationHandler(exec_at_start=True) validates at STARTED, after the checkpoint loader and before the
    # first EPOCH_STARTED: the rows of the earlier epochs must be read back before that validation saves the CSV
    def run(max_epochs: int, restored_epoch: int, every_n_epochs: int = 1) -> list[dict]:
        trainer = Engine(lambda e, b: {"loss": torch.tensor(float(e.state.epoch))})
        evaluator = Engine(lambda e, b: b)
        evaluator.add_event_handler(
            Events.COMPLETED, lambda e: e.state.metrics.update(val_dice=0.1 * trainer.state.epoch)
        )
        trainer.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", restored_epoch))  # the loader
        trainer.add_event_handler(Events.STARTED, lambda _: evaluator.run([0]))  # exec_at_start
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
        TrainingCurvePlotter(tmp_path, evaluator=evaluator, every_n_epochs=every_n_epochs).attach(trainer)
        trainer.run([0, 1], max_epochs=max_epochs)
        return _read_csv(tmp_path / "training_curves.csv")

    def table(rows: list[dict]) -> list[tuple]:
        return [(int(r["epoch"]), r["loss"], float(r["val_dice"])) for r in rows]

    first = run(3, restored_epoch=0)
    assert table(first) == [(0, "", 0.0), (1, "1", 0.1), (2, "2", pytest.approx(0.2)), (3, "3", pytest.approx(0.3))]
    resumed = run(5, restored_epoch=3)
    assert table(resumed) == table(first) + [(4, "4", pytest.approx(0.4)), (5, "5", 0.5)]
    # a fresh run (nothing completed) does not take the old CSV's rows of later epochs
    fresh = run(2, restored_epoch=0, every_n_epochs=0)
    assert [int(r["epoch"]) for r in fresh] == [0, 1, 2]


# --------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_saver_worker(local_rank: int, out_dir: str) -> None:
    import ignite.distributed as idist

    rank, world = idist.get_rank(), idist.get_world_size()
    items = _cases(5)[rank::world]
    batches = [([it["pred_labels"]], [it["label"]]) for it in items]
    engine = Engine(lambda e, b: b)
    GlobalDice(C).attach(engine, "dice")
    PerCaseMetricsSaver(out_dir, class_names=CLASS_NAMES, output_transform=lambda o: o).attach(engine)
    engine.run(batches)
    with open(f"{out_dir}/rank{rank}_dice.txt", "w") as f:
        f.write(repr(engine.state.metrics["dice"]))


def test_saver_two_process_gloo(tmp_path):
    import ignite.distributed as idist

    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=_free_port()) as parallel:
        parallel.run(_ddp_saver_worker, str(tmp_path))
    items = _cases(5)
    rows = _read_csv(tmp_path / "metrics_per_case.csv")
    # every case of both ranks, rank 0's first; named from the label meta (pred_labels are plain tensors)
    assert [r["case"] for r in rows] == [f"patient_{i:02d}" for i in (0, 2, 4, 1, 3)]
    ref = _reference(items)
    for rank in (0, 1):  # both ranks got the all-reduced value
        value = float((tmp_path / f"rank{rank}_dice.txt").read_text())
        assert value == pytest.approx(np.nanmean(ref["dice"]))
