"""Real samples (``../shared/data`` next to the repository): skipped when absent. Prepared volumes must match
ITK's independent reading of the same DICOM series, voxel for voxel and in world geometry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scse_monai.data import prepare_chaos, prepare_visceral

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAOS = SHARED / "CHAOS_sample" / "Train_Sets"
VISCERAL = SHARED / "VISCERAL_sample"


@pytest.mark.skipif(not (CHAOS / "MR").is_dir(), reason="real CHAOS sample not present")
def test_real_chaos_t2_matches_itk(tmp_path):
    itk_reader = pytest.importorskip("monai.data").ITKReader
    root = tmp_path / "Train_Sets"
    for pid in ("2", "22"):  # 22 has a slightly oblique ImageOrientationPatient
        shutil.copytree(CHAOS / "MR" / pid, root / "MR" / pid)
    datalist = prepare_chaos(root, "mr-t2spir", tmp_path / "out", folds=2, workers=1, progress=False)
    doc = json.loads(datalist.read_text())
    reader = itk_reader(affine_lps_to_ras=True)
    for it in doc["training"]:
        img = nib.load(tmp_path / "out" / it["image"])
        arr, meta = reader.get_data(reader.read(str(root / "MR" / it["patient"] / "T2SPIR" / "DICOM_anon")))
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asarray(arr))
        np.testing.assert_allclose(img.affine, np.asarray(meta["affine"]), atol=1e-3)
        label = np.asanyarray(nib.load(tmp_path / "out" / it["label"]).dataobj)
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}


@pytest.mark.skipif(not (VISCERAL / "Volumes").is_dir(), reason="real VISCERAL sample not present")
def test_real_visceral_sample(tmp_path):
    doc = json.loads(prepare_visceral(VISCERAL, tmp_path, folds=1, workers=1, progress=False).read_text())
    it = doc["training"][0]
    label = np.asanyarray(nib.load(tmp_path / it["label"]).dataobj)
    liver = np.asanyarray(nib.load(VISCERAL / "Segmentations" / "10000001_1_CTce_ThAb_58_1.nii.gz").dataobj) > 0
    np.testing.assert_array_equal(label == 1, liver)
    assert doc["cases"]["visceral_10000001_1_ctce_thab"]["missing"] == ["trachea"]
