"""Transforms: left-right flip with label swap, per-organ intensity factors, full chain on a prepared phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRangePercentilesd

from scse_monai.data import prepare_chaos, synthesize
from scse_monai.transforms import RandFlipLeftRightd, RandLabelIntensityScaled


def test_flip_swaps_left_right_labels():
    label = torch.tensor([[[0, 2], [1, 3], [2, 0]]])  # (1, 3, 2): axis 0 is left-right
    image = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2)
    t = RandFlipLeftRightd(["image", "label"], label_keys="label", swap_pairs=[(2, 3)], prob=1.0)
    out = t({"image": image, "label": label})
    np.testing.assert_array_equal(np.asarray(out["image"]), image.numpy()[:, ::-1])
    expected = label.numpy()[:, ::-1].copy()
    expected = np.where(expected == 2, 3, np.where(expected == 3, 2, expected))
    np.testing.assert_array_equal(np.asarray(out["label"]), expected)
    same = RandFlipLeftRightd(["image", "label"], prob=0.0)({"image": image, "label": label})
    assert torch.equal(torch.as_tensor(same["label"]), label)


def test_flip_mirrors_the_patient_in_world_space_too():
    # the affine is kept: after the swap, the kidney labelled left lies at the patient's left in world coordinates
    # too (MONAI's Flip would update the affine and put it back on the right); nothing for Invertd to undo
    affine = torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0], dtype=torch.float64))
    label = MetaTensor(torch.tensor([2.0, 0.0, 1.0]).reshape(1, 3, 1, 1), affine=affine)
    out = RandFlipLeftRightd(["label"], prob=1.0)({"label": label})["label"]
    assert out.flatten().tolist() == [1.0, 0.0, 3.0]
    assert torch.equal(out.affine, affine) and len(out.applied_operations) == 0


def test_flip_swaps_one_hot_channels_and_refuses_label_keys_it_would_not_flip():
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0, 1]), 5).T.reshape(5, 3, 1).float()
    out = RandFlipLeftRightd(["label"], prob=1.0)({"label": one_hot})["label"]
    assert out.argmax(0).flatten().tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match=r"label_keys \['label'\] are not in keys \['image'\]"):
        RandFlipLeftRightd(["image"], label_keys="label", prob=1.0)  # the label would stay under a flipped image
    image = torch.arange(3.0).reshape(1, 3, 1)
    assert RandFlipLeftRightd("image", prob=1.0)({"image": image})["image"].flatten().tolist() == [2.0, 1.0, 0.0]


def test_label_intensity_scales_each_organ_by_its_own_factor():
    label = torch.zeros(1, 40, 40, dtype=torch.long)
    label[0, 2:18, 2:18], label[0, 22:38, 22:38] = 1, 4
    image = torch.rand(1, 40, 40) + 0.5
    t = RandLabelIntensityScaled("image", prob=1.0, factors=(0.25, 1.5), sigma=0.0)
    t.set_random_state(3)
    ratio = (t({"image": image, "label": label})["image"] / image)[0]
    liver, spleen = ratio[2:18, 2:18], ratio[22:38, 22:38]
    assert torch.allclose(liver, liver[0, 0]) and torch.allclose(spleen, spleen[0, 0])  # one factor per organ
    assert 0.25 <= liver[0, 0] <= 1.5 and 0.25 <= spleen[0, 0] <= 1.5
    assert not torch.isclose(liver[0, 0], spleen[0, 0])
    assert torch.all(ratio[label[0] == 0] == 1)  # background untouched
    # smoothed masks: no step at the organ boundary, the factor fades over a few pixels
    smooth = RandLabelIntensityScaled("image", prob=1.0, factors=(0.25, 0.25), sigma=2.0)
    edge = (smooth({"image": torch.ones(1, 40, 40), "label": label})["image"])[0, 10, 14:22]
    assert torch.all(edge[1:] >= edge[:-1]) and 0.25 < edge[3] < 1  # rises smoothly from inside to outside
    # prob 0 leaves the sample as it is; bad factors are refused
    assert torch.equal(RandLabelIntensityScaled("image", prob=0.0)({"image": image, "label": label})["image"], image)
    with pytest.raises(ValueError, match="factors"):
        RandLabelIntensityScaled("image", factors=(0.0, 1.0))


def test_chain_on_prepared_phantom(tmp_path):
    raw = synthesize("chaos-mr", tmp_path / "raw", cases=1, seed=2, size=48, slices=(10, 10), progress=False)
    datalist = prepare_chaos(raw, "mr-t2spir", tmp_path / "out", folds=1, workers=1, progress=False)
    item = json.loads(datalist.read_text())["training"][0]
    data = {k: str(tmp_path / "out" / item[k]) for k in ("image", "label")}
    keys = ["image", "label"]
    chain = Compose(
        [
            LoadImaged(keys),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS"),
            ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True),
        ]
    )
    vol = chain(data)
    lab = np.asarray(vol["label"][0])

    def mean_x(lbl, cls):
        return np.nonzero(lbl == cls)[0].mean()

    # RAS: axis 0 increases toward the patient's right -> liver (1) and right kidney (2) at larger x than
    # spleen (4) and left kidney (3)
    assert mean_x(lab, 1) > mean_x(lab, 4) and mean_x(lab, 2) > mean_x(lab, 3)
    assert 0.0 <= float(vol["image"].min()) and float(vol["image"].max()) <= 1.0
    flip = RandFlipLeftRightd(keys, label_keys="label", swap_pairs=[(2, 3)], prob=1.0)
    flipped = np.asarray(flip(dict(vol))["label"][0])
    # after a flip + swap, the kidney called "right" is still the one on the patient's right
    assert mean_x(flipped, 2) > mean_x(flipped, 3)


def test_bundle_style_config_chain(tmp_path):
    """The JSON chain given to the bundle author parses with ConfigParser and yields 2D training slices and
    3D validation volumes that SliceInferer can run a 2D network over."""
    from monai.bundle import ConfigParser

    raw = synthesize("chaos-mr", tmp_path / "raw", cases=1, seed=4, size=48, slices=(8, 8), progress=False)
    datalist = prepare_chaos(raw, "mr-t2spir", tmp_path / "out", folds=1, workers=1, progress=False)
    item = json.loads(datalist.read_text())["training"][0]
    keys = ["image", "label"]
    config = {
        "spatial": [64, 64],
        "base": [
            {"_target_": "LoadImaged", "keys": keys, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": keys},
            {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": keys, "pixdim": [6.0, 6.0, -1], "mode": ["bilinear", "nearest"]},
            {
                "_target_": "ScaleIntensityRangePercentilesd",
                "keys": "image",
                "lower": 0.5,
                "upper": 99.5,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
                "channel_wise": True,
            },
            {"_target_": "ResizeWithPadOrCropd", "keys": keys, "spatial_size": "$@spatial + [-1]"},
            {"_target_": "EnsureTyped", "keys": keys},
        ],
        "train_extra": [
            {
                "_target_": "RandCropByPosNegLabeld",
                "keys": keys,
                "label_key": "label",
                "spatial_size": [-1, -1, 1],
                "num_samples": 4,
                "pos": 2,
                "neg": 1,
            },
            {"_target_": "SqueezeDimd", "keys": keys, "dim": -1},
            {
                "_target_": "scse_monai.transforms.RandFlipLeftRightd",
                "keys": keys,
                "label_keys": "label",
                "swap_pairs": [[2, 3]],
                "prob": 0.5,
            },
        ],  # fmt: skip
        "train": {"_target_": "Compose", "transforms": "$@base + @train_extra"},
        "val": {"_target_": "Compose", "transforms": "$@base"},
        "inferer": {"_target_": "SliceInferer", "roi_size": "@spatial", "spatial_dim": 2, "sw_batch_size": 4},
    }
    parser = ConfigParser(config)
    data = {k: str(tmp_path / "out" / item[k]) for k in keys}
    samples = parser.get_parsed_content("train")(data)
    assert len(samples) == 4
    for s in samples:
        assert tuple(s["image"].shape) == (1, 64, 64) and tuple(s["label"].shape) == (1, 64, 64)
        assert float(s["image"].min()) >= 0.0 and float(s["image"].max()) <= 1.0
        assert set(np.unique(np.asarray(s["label"]))) <= {0, 1, 2, 3, 4}
    val = parser.get_parsed_content("val")(data)
    assert tuple(val["image"].shape) == (1, 64, 64, 8)
    logits = parser.get_parsed_content("inferer")(val["image"][None], torch.nn.Conv2d(1, 5, 3, padding=1))
    assert tuple(logits.shape) == (1, 5, 64, 64, 8)
