"""Tests for scse_monai.losses: median frequency weights and the weighted Dice + CE loss."""

from __future__ import annotations

import json

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from scse_monai.losses import WeightedDiceCELoss, median_frequency_weights, weights_from_datalist


def test_median_frequency_weights_hand_computed():
    counts = {"0": 9000, "1": 500, "2": 300, "3": 150, "4": 50}
    # freq = [0.9, 0.05, 0.03, 0.015, 0.005], median 0.03
    expected = [0.03 / 0.9, 0.03 / 0.05, 1.0, 0.03 / 0.015, 0.03 / 0.005]
    assert median_frequency_weights(counts) == pytest.approx(expected)
    assert median_frequency_weights([9000, 500, 300, 150, 50]) == pytest.approx(expected)
    assert median_frequency_weights(torch.tensor([9000, 500, 300, 150, 50])) == pytest.approx(expected)


def test_median_frequency_weights_even_and_absent_classes():
    # class 1 absent: weight 0, and the median is over the present freqs (0.6, 0.3, 0.1) -> 0.3
    assert median_frequency_weights([600, 0, 300, 100]) == pytest.approx([0.5, 0.0, 1.0, 3.0])
    assert median_frequency_weights([700, 200, 100, 0, 0]) == pytest.approx([0.2 / 0.7, 1.0, 2.0, 0.0, 0.0])
    # even number of present classes: median of (0.25, 0.75) is 0.5
    assert median_frequency_weights([1, 3]) == pytest.approx([2.0, 2.0 / 3.0])


@pytest.mark.parametrize(
    "bad",
    [{"0": 10, "2": 5}, [0, 0, 0], [10, -1], [10, 2.5], {"x": 3}, {"0": True, "1": 4}],
)
def test_median_frequency_weights_bad_input(bad):
    with pytest.raises(ValueError):
        median_frequency_weights(bad)


def test_weights_from_datalist(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [], "class_voxel_counts": {"0": 800, "1": 150, "2": 50}}))
    assert weights_from_datalist(path) == pytest.approx([0.15 / 0.8, 1.0, 3.0])
    assert weights_from_datalist(str(path)) == weights_from_datalist(json.loads(path.read_text()))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        weights_from_datalist(tmp_path / "missing.json")
    (tmp_path / "nocounts.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="nocounts.json.*class_voxel_counts"):
        weights_from_datalist(tmp_path / "nocounts.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        weights_from_datalist(tmp_path / "broken.json")


def _data(seed=0, c=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, c, 8, 8, 4, generator=g)
    target = torch.randint(0, c, (2, 1, 8, 8, 4), generator=g)
    return logits, target


def test_loss_with_weighted_dice_equals_monai_dice_ce(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"class_voxel_counts": {"0": 1000, "1": 120, "2": 60, "3": 20}}))
    weights = weights_from_datalist(path)
    kw = {"to_onehot_y": True, "softmax": True, "include_background": False}
    ours = WeightedDiceCELoss(datalist=path, weight_dice=True, **kw)
    ref = DiceCELoss(weight=torch.tensor(weights), **kw)
    logits, target = _data()
    assert torch.allclose(ours(logits, target), ref(logits, target))
    assert ours.class_weights == pytest.approx(weights)


def test_default_loss_weights_cross_entropy_only():
    weights = [0.1, 1.0, 2.0, 4.0]
    ours = WeightedDiceCELoss(class_weights=weights, to_onehot_y=True, softmax=True, lambda_dice=0.7)
    logits, target = _data(1)
    # independent: unweighted Dice loss + torch cross-entropy with class weights
    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0], weight=torch.tensor(weights))
    assert torch.allclose(ours(logits, target), 0.7 * dice + ce)
    # and the weights change the value compared with the unweighted loss
    plain = WeightedDiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.7)
    assert not torch.allclose(plain(logits, target), ours(logits, target))


def test_gradients_flow():
    loss_fn = WeightedDiceCELoss(class_weights=[0.2, 1.0, 1.5, 3.0], to_onehot_y=True, softmax=True)
    logits, target = _data(2)
    logits.requires_grad_(True)
    loss_fn(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_loss_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="class_weights"):
        WeightedDiceCELoss(weight=torch.ones(3))
    with pytest.raises(ValueError, match="not both"):
        WeightedDiceCELoss(datalist={"class_voxel_counts": [1, 2]}, class_weights=[1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        WeightedDiceCELoss(class_weights=[1.0, -1.0])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        WeightedDiceCELoss(datalist=tmp_path / "nope.json")


def test_zero_or_miscounted_class_weights_are_refused():
    # a background-only batch with background weight 0 had a NaN loss (weighted mean 0 / 0)
    with pytest.raises(ValueError, match=r"class_weights must be > 0, got \[0.0, 1.0, 1.0\]"):
        WeightedDiceCELoss(class_weights=[0.0, 1.0, 1.0], to_onehot_y=True, softmax=True)
    # absent classes of a datalist keep weight 0 (they never occur as a target) and the loss stays finite
    loss = WeightedDiceCELoss(datalist={"class_voxel_counts": [900, 0, 100]}, to_onehot_y=True, softmax=True)
    assert loss.class_weights[1] == 0.0
    assert torch.isfinite(loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 1, 4, 4)))
    two = WeightedDiceCELoss(class_weights=[0.5, 1.0], to_onehot_y=True, softmax=True)
    with pytest.raises(ValueError, match="2 class weights for an input of 3 channels"):
        two(torch.randn(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))


def test_numpy_integer_counts_are_counts():
    import numpy as np

    expected = median_frequency_weights([900, 60, 40])
    assert median_frequency_weights(np.bincount(np.repeat([0, 1, 2], [900, 60, 40]))) == pytest.approx(expected)
    assert median_frequency_weights({0: np.int64(900), 1: np.int64(60), 2: np.int64(40)}) == pytest.approx(expected)
    with pytest.raises(ValueError, match="non-negative integer"):
        median_frequency_weights([np.float64(2.5), 1])


def test_loss_from_bundle_config(tmp_path):
    from monai.bundle import ConfigParser

    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"class_voxel_counts": {"0": 500, "1": 300, "2": 200}}))
    parser = ConfigParser(
        {
            "datalist_file": str(path),
            "loss": {
                "_target_": "scse_monai.losses.WeightedDiceCELoss",
                "datalist": "@datalist_file",
                "to_onehot_y": True,
                "softmax": True,
            },
        }
    )
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, WeightedDiceCELoss)
    assert loss.class_weights == pytest.approx([0.3 / 0.5, 1.0, 1.5])


def test_weight_power_softens_median_frequency_weights() -> None:
    counts = {"0": 900, "1": 60, "2": 40}
    full = WeightedDiceCELoss(datalist={"class_voxel_counts": counts}, to_onehot_y=True, softmax=True)
    soft = WeightedDiceCELoss(datalist={"class_voxel_counts": counts}, weight_power=0.5, to_onehot_y=True, softmax=True)
    expected = [w**0.5 for w in median_frequency_weights(counts)]
    assert soft.class_weights == pytest.approx(expected)
    assert full.class_weights == pytest.approx(median_frequency_weights(counts))
    with pytest.raises(ValueError, match="weight_power"):
        WeightedDiceCELoss(class_weights=[1.0, 1.0], weight_power=0)
