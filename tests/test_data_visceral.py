"""VISCERAL preparation on synthetic data in the native layout: merge rule, organ selection, counts, geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scse_monai.data import DEFAULT_ORGANS, RADLEX_IDS, DataPreparationError, prepare_visceral, synthesize


@pytest.fixture(scope="module")
def visceral_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("visceral")
    return synthesize("visceral", root, cases=2, seed=3, size=40, slices=(8, 10), progress=False)


def _masks(root: Path, stem: str) -> dict[str, np.ndarray]:
    out = {}
    for name, rid in RADLEX_IDS.items():
        p = root / "Segmentations" / f"{stem}_{rid}_1.nii.gz"
        if p.exists():
            out[name] = np.asanyarray(nib.load(p).dataobj) > 0
    return out


def test_default_merge_smaller_wins(visceral_raw, tmp_path):
    out = tmp_path / "out"
    doc = json.loads(prepare_visceral(visceral_raw, out, folds=2, workers=2, progress=False).read_text())
    assert doc["labels"] == {"0": "background", **{str(i + 1): n for i, n in enumerate(DEFAULT_ORGANS)}}
    assert doc["modality"] == {"0": "CT"} and len(doc["training"]) == 2
    total = np.zeros(17, dtype=np.int64)
    overlap_total = 0
    for it in doc["training"]:
        stem = Path(it["image"]).name.split(".")[0].replace("visceral_", "")
        stem = next(p.name[: -len(".nii.gz")] for p in (visceral_raw / "Volumes").iterdir() if p.name.lower()
                    .startswith(stem))  # fmt: skip
        assert (out / it["image"]).read_bytes() == (visceral_raw / "Volumes" / f"{stem}.nii.gz").read_bytes()
        masks = _masks(visceral_raw, stem)
        info = doc["cases"][Path(it["image"]).name.split(".")[0]]
        assert set(it) == {"image", "label", "patient", "fold"}  # collatable fields only
        assert "trachea" in info["missing"]  # the phantom has no trachea
        assert info["missing"] == [n for n in DEFAULT_ORGANS if n not in masks]
        label = np.asanyarray(nib.load(out / it["label"]).dataobj)
        # independent merge: every voxel gets the covering structure with the fewest voxels
        names = list(masks)
        sizes = np.array([masks[n].sum() for n in names], dtype=float)
        cover = np.stack([masks[n] for n in names])
        cost = np.where(cover, sizes[:, None, None, None], np.inf)
        winner = np.argmin(cost, axis=0)
        expected = np.where(cover.any(0), np.array([DEFAULT_ORGANS.index(n) + 1 for n in names])[winner], 0)
        np.testing.assert_array_equal(label, expected)
        total += np.bincount(label.ravel(), minlength=17)
        n_overlap = int((masks["gallbladder"] & masks["liver"]).sum())
        assert n_overlap > 0 and info["overlaps"]["liver/gallbladder"] == n_overlap
        overlap_total += n_overlap
    assert doc["class_voxel_counts"] == {str(k): int(v) for k, v in enumerate(total)}
    assert doc["overlaps"]["liver/gallbladder"] == overlap_total

    # re-run keeps outputs and reports the same overlaps
    mtimes = [p.stat().st_mtime_ns for p in sorted(out.rglob("*.nii.gz"))]
    again = json.loads(prepare_visceral(visceral_raw, out, folds=2, workers=1, progress=False).read_text())
    assert again == doc
    assert [p.stat().st_mtime_ns for p in sorted(out.rglob("*.nii.gz"))] == mtimes


def test_organ_selection_order(visceral_raw, tmp_path):
    doc = json.loads(
        prepare_visceral(visceral_raw, tmp_path / "o", organs=["spleen", "58"], folds=1, workers=1, progress=False)
        .read_text()
    )  # fmt: skip
    assert doc["labels"] == {"0": "background", "1": "spleen", "2": "liver"}
    it = doc["training"][0]
    stem = "10000001_1_CTce_ThAb"
    masks = _masks(visceral_raw, stem)
    label = np.asanyarray(nib.load(tmp_path / "o" / it["label"]).dataobj)
    np.testing.assert_array_equal(label == 1, masks["spleen"])
    np.testing.assert_array_equal(label == 2, masks["liver"] & ~masks["spleen"])
    with pytest.raises(DataPreparationError, match="unknown organ 'stomach'"):
        prepare_visceral(visceral_raw, tmp_path / "x", organs=["stomach"], folds=1, progress=False)
