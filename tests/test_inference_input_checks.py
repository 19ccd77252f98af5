"""Issue 16 items 3 and 9, inference side: the bundle's preprocessing refuses non-finite, 2D and multi-channel
inputs with an error naming the file, instead of an all-background result or a failure deep in the inferer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

CFG = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def _preprocessing():
    parser = ConfigParser()
    parser.read_config(str(CFG / "inference.json"))
    return parser.get_parsed_content("preprocessing")


def _write(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [("nan", "not finite"), ("inf", "not finite"), ("2d", "expected a 3D image"), ("2 channels", "channel")],
)
def test_bundle_preprocessing_refuses_bad_inputs_naming_the_file(tmp_path, kind, message):
    data = np.random.default_rng(0).random((16, 16, 4)).astype(np.float32)
    if kind == "nan":
        data[:4, :4, :] = np.nan  # a block of NaNs, as in issue 16
    elif kind == "inf":
        data[0, 0, 0] = np.inf
    elif kind == "2d":
        data = data[..., 0]
    else:
        data = np.stack([data, data], axis=-1)
    path = _write(tmp_path / f"{kind.replace(' ', '_')}.nii.gz", data)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps a transform's error as "applying transform ..."
        _preprocessing()({"image": str(path)})
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and message in str(cause) and path.name in str(cause), repr(cause)


def test_bundle_preprocessing_accepts_a_finite_volume(tmp_path):
    path = _write(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 4)).astype(np.float32))
    out = _preprocessing()({"image": str(path)})
    assert out["image"].shape[0] == 3 and out["image"].shape[-1] == 4  # slices z-1, z, z+1 as channels (2.5D)
    assert torch.isfinite(torch.as_tensor(out["image"])).all()
