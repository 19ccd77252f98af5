"""Tests for scse_monai.metrics.SegmentationCountsMetric against numpy, MONAI's DiceMetric and a 2-rank gloo run."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from scse_monai.metrics import SegmentationCountsMetric, case_name_from_meta

C = 4


def _labels(seed: int, shape=(3, 1, 12, 10, 6), c: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    """Random target and a prediction that agrees with it on about 60% of the voxels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, shape, generator=g)
    noise = torch.randint(0, c, shape, generator=g)
    keep = torch.rand(shape, generator=g) < 0.6
    return torch.where(keep, y, noise), y


def _numpy_counts(pred: np.ndarray, target: np.ndarray, c: int) -> np.ndarray:
    """(cases, classes, 3) [intersection, prediction, target] with plain numpy, one case and class at a time."""
    out = np.zeros((pred.shape[0], c, 3), dtype=np.int64)
    for b in range(pred.shape[0]):
        for k in range(c):
            p, t = pred[b] == k, target[b] == k
            out[b, k] = [np.logical_and(p, t).sum(), p.sum(), t.sum()]
    return out


def _numpy_scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, p, t = counts[..., 0].astype(float), counts[..., 1].astype(float), counts[..., 2].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p + t > 0, 2 * i / (p + t), np.nan), np.where(p + t > 0, i / (p + t - i), np.nan)


@pytest.mark.parametrize("include_background", [False, True])
def test_agrees_with_numpy(include_background):
    m = SegmentationCountsMetric(C, include_background=include_background)
    preds, targets = [], []
    for seed in range(3):  # several updates: counts accumulate
        p, y = _labels(seed)
        m(p, y)
        preds.append(p.numpy()[:, 0])
        targets.append(y.numpy()[:, 0])
    r = m.results()
    counts = _numpy_counts(np.concatenate(preds), np.concatenate(targets), C)
    first = 0 if include_background else 1
    counts = counts[:, first:]
    case_d, case_j = _numpy_scores(counts)
    glob_d, glob_j = _numpy_scores(counts.sum(0))
    assert r["classes"] == list(range(first, C))
    np.testing.assert_array_equal(r["counts"].numpy(), counts)
    np.testing.assert_allclose(r["case_dice"].numpy(), case_d)
    np.testing.assert_allclose(r["case_jaccard"].numpy(), case_j)
    np.testing.assert_allclose(r["dice"].numpy(), glob_d)
    np.testing.assert_allclose(r["jaccard"].numpy(), glob_j)
    assert r["mean_dice"] == pytest.approx(glob_d.mean())
    assert r["mean_jaccard"] == pytest.approx(glob_j.mean())
    assert r["case_dice"].shape == (9, C - first)
    # global Dice pools voxels: it is not the mean of the per-case Dice
    assert not np.allclose(glob_d, case_d.mean(0), atol=1e-6)


def test_agrees_with_monai_dice_metric_per_case():
    p, y = _labels(7, shape=(4, 1, 16, 16, 8))
    m = SegmentationCountsMetric(C)
    m(p, y)
    ours = m.results()["case_dice"]
    ref = DiceMetric(include_background=False, reduction="none")
    ref(one_hot(p, C), one_hot(y, C))
    expected = ref.aggregate()
    assert expected.shape == ours.shape
    assert torch.allclose(ours, expected.double(), atol=1e-6)
    # MONAI's label-map path (num_classes=...) too
    ref2 = DiceMetric(include_background=False, reduction="none", num_classes=C)
    ref2(p, y)
    assert torch.allclose(ours, ref2.aggregate().double(), atol=1e-6)


def test_label_map_and_one_hot_are_equivalent():
    p, y = _labels(3)
    p_oh, y_oh = one_hot(p, C), one_hot(y, C)
    results = []
    for a, b in [(p, y), (p_oh, y_oh), (p, y_oh), (p_oh.bool(), y), (p.float(), y.float())]:
        m = SegmentationCountsMetric(C)
        m(a, b)
        results.append(m.results()["counts"])
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_one_hot_counts_nonzero_entries_exactly_in_slices(monkeypatch):
    # one-hot input: any nonzero entry (probabilities, negative values) is inside. The float32 counts are summed in
    # slices short enough to be exact; forcing 7-voxel slices must give the same integers as numpy
    from scse_monai import metrics

    g = torch.Generator().manual_seed(5)
    shape = (2, C, 9, 7, 3)
    p = torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) < 0.4)  # soft values and exact zeros
    p[0, 1, 0, 0, 0] = -0.5
    y = one_hot(torch.randint(0, C, (2, 1, 9, 7, 3), generator=g), C)
    expected = np.zeros((2, C, 3), dtype=np.int64)
    pn, yn = p.flatten(2).numpy() != 0, y.flatten(2).numpy() != 0
    expected[..., 0], expected[..., 1], expected[..., 2] = (pn & yn).sum(2), pn.sum(2), yn.sum(2)
    for slice_length in (1 << 24, 7):
        monkeypatch.setattr(metrics, "_EXACT_FLOAT32_COUNT", slice_length)
        m = SegmentationCountsMetric(C, include_background=True)
        m(p, y)
        counts = m.results()["counts"]
        assert counts.dtype == torch.int64
        np.testing.assert_array_equal(counts.numpy(), expected)


@pytest.mark.parametrize("slice_length", [720, 719, 7])
def test_label_maps_are_counted_exactly_in_slices(monkeypatch, slice_length):
    # 720 voxels per case: one whole slice; 719: a second slice of one voxel; 7: many, the last partial
    from scse_monai import metrics

    monkeypatch.setattr(metrics, "_COUNT_CHUNK", slice_length)
    p, y = _labels(11)
    m = SegmentationCountsMetric(C, include_background=True)
    m(p, y)
    expected = _numpy_counts(p.numpy()[:, 0], y.numpy()[:, 0], C)
    np.testing.assert_array_equal(m.results()["counts"].numpy(), expected)


def test_absent_classes_give_nan_per_case():
    # case 0: class 2 absent from prediction and target; class 3 predicted but absent from target
    y = torch.tensor([[[[0, 1, 1, 0]]], [[[2, 2, 1, 0]]]])
    p = torch.tensor([[[[0, 1, 3, 0]]], [[[2, 1, 1, 0]]]])
    m = SegmentationCountsMetric(C)
    m(p, y)
    r = m.results()
    case_dice = r["case_dice"]
    assert math.isnan(case_dice[0, 1])  # class 2 in case 0
    assert case_dice[0, 2] == 0.0  # class 3 in case 0: a false positive scores 0, not NaN
    assert case_dice[0, 0] == pytest.approx(2 * 1 / (1 + 2))
    assert math.isnan(case_dice[1, 2]) and math.isnan(r["case_jaccard"][1, 2])
    assert case_dice[1, 1] == pytest.approx(2 * 1 / (2 + 1))
    # class 2 appears in case 1, so its global Dice exists; pooled over both cases
    assert r["dice"][1] == pytest.approx(2 * 1 / (1 + 2))
    assert r["mean_dice"] == pytest.approx(float(r["dice"].mean()))


def test_class_absent_everywhere_is_left_out_of_the_mean():
    y = torch.tensor([[[0, 1, 1, 2]]])
    m = SegmentationCountsMetric(C)
    m(y.clone(), y)
    r = m.results()
    assert math.isnan(r["dice"][2])  # class 3 never appears
    assert r["mean_dice"] == 1.0 and r["mean_jaccard"] == 1.0


def test_list_of_cases_with_different_sizes_and_names():
    p1, y1 = _labels(1, shape=(1, 1, 8, 8, 4))
    p2, y2 = _labels(2, shape=(1, 1, 6, 10, 5))
    batched = SegmentationCountsMetric(C)
    batched(p1, y1, names=["a"])
    batched(p2, y2, names=["b"])
    listed = SegmentationCountsMetric(C)
    listed([p1[0], p2[0]], [y1[0], y2[0]], names=["a", "b"])
    assert torch.equal(batched.results()["counts"], listed.results()["counts"])
    assert listed.results()["case_names"] == ["a", "b"]
    unnamed = SegmentationCountsMetric(C)
    unnamed([p1[0], p2[0]], [y1[0], y2[0]])
    assert unnamed.results()["case_names"] == ["case_0", "case_1"]
    assert len(listed) == 2
    listed.reset()
    assert len(listed) == 0


def test_update_never_reads_values_on_the_host():
    # "meta" tensors have no data: any .item() / .cpu() / data-dependent shape in update() would raise, so this
    # checks that counting stays on the input's device without host synchronisation.
    p, y = _labels(5, shape=(2, 1, 6, 6, 3))
    m = SegmentationCountsMetric(C)
    m(p.to("meta"), y.to("meta"))
    m(one_hot(p, C).to("meta"), y.to("meta"))
    m([p[0].to("meta")], [y[0].to("meta")])
    assert len(m._names) == 5
    assert all(r.device.type == "meta" for r in m._buffers[0])


def test_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationCountsMetric(1)
    m = SegmentationCountsMetric(3)
    with pytest.raises(ValueError, match="before any update"):
        m.results()
    with pytest.raises(ValueError, match="metric_name"):
        SegmentationCountsMetric(3, metric_name="hausdorff")
    with pytest.raises(ValueError, match="channels"):
        m(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="differ"):
        m(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="names"):
        m(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), names=["x"])
    m(torch.tensor([[[0, 1, 5, 2]]]), torch.tensor([[[0, 1, 2, 2]]]))
    with pytest.raises(ValueError, match=r"1 label map\(s\) .* outside \[0, 3\)"):
        m.results()
    for bad_pred, bad_target in [(torch.zeros(1, 3, 4), torch.full((1, 1, 4), -1)), (torch.full((1, 1, 4), 3), None)]:
        m = SegmentationCountsMetric(3)
        m(bad_pred, bad_target if bad_target is not None else torch.zeros(1, 1, 4, dtype=torch.int64))
        with pytest.raises(ValueError, match="outside"):
            m.results()


@pytest.mark.parametrize(
    "pred_value, target_value, flagged",
    [(3, 0, 1), (0, -1, 1), (-(2**40), 2**40, 2), (2, 2, 0)],  # 3 == C would alias class (1, 0) in a C x C matrix
)
def test_out_of_range_label_maps_are_counted_in_any_slice(monkeypatch, pred_value, target_value, flagged):
    from scse_monai import metrics

    monkeypatch.setattr(metrics, "_COUNT_CHUNK", 5)
    p, y = torch.zeros(2, 1, 12, dtype=torch.int64), torch.ones(2, 1, 12, dtype=torch.int64)
    p[1, 0, 11], y[1, 0, 11] = pred_value, target_value  # last voxel of the last case, in a partial slice
    m = SegmentationCountsMetric(3)
    m(p, y)
    if flagged:
        with pytest.raises(ValueError, match=rf"{flagged} label map\(s\) .* outside \[0, 3\)"):
            m.results()
    else:
        np.testing.assert_array_equal(m.results()["counts"][1, :, 2].numpy(), [11, 1])  # target sizes of 1 and 2


@pytest.mark.parametrize(
    "value, flagged", [(-0.5, True), (-1e-6, True), (-1.0, True), (0.5, False), (2.9, False), (3.0, True)]
)
@pytest.mark.parametrize("pred_one_hot", [False, True])
def test_float_label_maps_are_floored(value, flagged, pred_one_hot):
    # a value in (-1, 0) is below the range; a non-integer value in range counts as the class below it (2.9 -> 2)
    p = torch.tensor([[[0, 1, 2, 2]]])
    y = torch.tensor([[[0.0, 1.0, 2.0, value]]])
    m = SegmentationCountsMetric(3, include_background=True)
    m(one_hot(p, 3) if pred_one_hot else p, y)
    if flagged:
        with pytest.raises(ValueError, match=r"1 label map\(s\) .* outside \[0, 3\)"):
            m.results()
    else:
        expected = [1, 1, 1]
        expected[math.floor(value)] += 1
        np.testing.assert_array_equal(m.results()["counts"][0, :, 2].numpy(), expected)  # target sizes


def test_repeated_case_names_are_made_unique_with_one_warning():
    # e.g. a KiTS layout, case_00000/imaging.nii.gz, case_00001/imaging.nii.gz: every case is named "imaging"
    p, y = _labels(1, shape=(6, 1, 4, 4, 2))
    m = SegmentationCountsMetric(C)
    m(p, y, names=["imaging", "imaging", None, "a", "imaging", "a#2"])
    with pytest.warns(UserWarning, match=r"'imaging'.*unique") as record:
        names = m.results()["case_names"]
    assert names == ["imaging", "imaging#2", "case_2", "a", "imaging#3", "a#2"]
    assert len([w for w in record if "unique" in str(w.message)]) == 1
    m = SegmentationCountsMetric(C)
    m(p[:3], y[:3], names=["a", "a", "a#2"])
    with pytest.warns(UserWarning, match="'a'"):
        assert m.results()["case_names"] == ["a", "a#2", "a#2#2"]


def test_case_name_from_meta():
    assert case_name_from_meta({"filename_or_obj": "/d/imagesTs/p07_t2.nii.gz"}, "x") == "p07_t2"
    assert case_name_from_meta({"filename_or_obj": ["/d/P3/"]}, "x") == "P3"
    assert case_name_from_meta({}, "case_3") == "case_3"
    assert case_name_from_meta(None, "case_3") == "case_3"


# --------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(local_rank: int, out_path: str) -> None:
    import ignite.distributed as idist

    rank, world = idist.get_rank(), idist.get_world_size()
    p, y = _labels(11, shape=(5, 1, 10, 8, 4))
    m = SegmentationCountsMetric(C)
    cases = list(range(rank, 5, world))  # 3 cases on rank 0, 2 on rank 1: uneven on purpose
    m(p[cases], y[cases], names=[f"c{i}" for i in cases])
    result = m.results()
    result["aggregate"] = float(m.aggregate())
    result["world_size"] = world
    if rank == 0:
        torch.save(result, out_path)


def test_two_process_gloo_equals_single_process(tmp_path):
    import ignite.distributed as idist

    out = tmp_path / "ddp.pt"
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=_free_port()) as parallel:
        parallel.run(_ddp_worker, str(out))
    ddp = torch.load(out, weights_only=False)
    assert ddp["world_size"] == 2
    p, y = _labels(11, shape=(5, 1, 10, 8, 4))
    order = [0, 2, 4, 1, 3]  # rank 0's cases, then rank 1's
    single = SegmentationCountsMetric(C)
    single(p[order], y[order], names=[f"c{i}" for i in order])
    ref = single.results()
    assert ddp["case_names"] == ref["case_names"]
    assert torch.equal(ddp["counts"], ref["counts"])
    for key in ("dice", "jaccard", "case_dice", "case_jaccard"):
        assert torch.allclose(ddp[key], ref[key], equal_nan=True)
    assert ddp["mean_dice"] == pytest.approx(ref["mean_dice"]) == pytest.approx(ddp["aggregate"])
