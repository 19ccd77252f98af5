"""DICOM series -> volume: every voxel at the DICOM world position, whatever the file order or direction."""

from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest

from scse_monai.data.dicom_series import read_dicom_series
from scse_monai.data.synthetic import write_dicom_series


def _oblique_axes(theta: float = 0.3, phi: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    r = np.array([np.cos(theta), np.sin(theta), 0.0])
    c = np.array([0.0, np.cos(phi), np.sin(phi)])
    c = c - r * (r @ c)
    return r, c / np.linalg.norm(c)


@pytest.mark.parametrize("against_normal", [False, True])
@pytest.mark.parametrize("file_order", ["forward", "reverse", "shuffled"])
def test_every_voxel_at_its_dicom_world_position(tmp_path, against_normal, file_order):
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 3000, (7, 5, 6)).astype(np.uint16)
    r, c = _oblique_axes()
    n = np.cross(r, c)
    names = [f"IMG-{k:03d}.dcm" for k in range(vol.shape[2])]
    if file_order == "reverse":
        names = names[::-1]
    elif file_order == "shuffled":
        random.Random(3).shuffle(names)
    step = (-2.5 if against_normal else 2.5) * n
    write_dicom_series(vol, tmp_path, names, origin=(10, -20, 30), row_dir=r, col_dir=c, pixel_spacing=(0.8, 1.3),
                       slice_step=step)  # fmt: skip
    out = read_dicom_series(sorted(tmp_path.iterdir()))
    inv = np.linalg.inv(out.affine)
    # independent: each file's own header places pixel (row j, column i) at IPP + i*dc*r + j*dr*c (LPS)
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(f)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        pix = ds.pixel_array
        for j in range(pix.shape[0]):
            for i in range(pix.shape[1]):
                lps = ipp + i * dc * iop[:3] + j * dr * iop[3:]
                ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
                idx = inv @ ras
                assert np.allclose(idx[:3], np.round(idx[:3]), atol=1e-3)
                ii, jj, kk = np.round(idx[:3]).astype(int)
                assert out.array[ii, jj, kk] == pix[j, i]
    # slices are ordered along the normal: slice k+1 lies further along r x c than slice k
    assert out.affine[:3, 2] @ np.array([-n[0], -n[1], n[2]]) > 0


def test_agrees_with_itk(tmp_path):
    itk_reader = pytest.importorskip("monai.data").ITKReader
    pytest.importorskip("itk")
    rng = np.random.default_rng(2)
    vol = rng.integers(0, 3000, (6, 5, 4)).astype(np.uint16)
    r, c = _oblique_axes(0.5, -0.3)
    names = [f"x{k}.dcm" for k in range(4)]
    random.Random(0).shuffle(names)
    write_dicom_series(vol, tmp_path, names, origin=(-5, 7, 100), row_dir=r, col_dir=c, pixel_spacing=(1.1, 0.9),
                       slice_step=-3.0 * np.cross(r, c))  # fmt: skip
    ours = read_dicom_series(list(tmp_path.iterdir()))
    reader = itk_reader(affine_lps_to_ras=True)
    arr, meta = reader.get_data(reader.read(str(tmp_path)))
    np.testing.assert_array_equal(np.asarray(arr), ours.array)
    np.testing.assert_allclose(np.asarray(meta["affine"]), ours.affine, atol=1e-3)


def test_ct_rescale_to_hounsfield(tmp_path):
    hu = np.array([-1000, -100, 0, 40, 700, 1500], dtype=np.int16).reshape(3, 2, 1).repeat(2, axis=2)
    write_dicom_series(hu, tmp_path, ["a.dcm", "b.dcm"], origin=(0, 0, 0), modality="CT", rescale_intercept=-1024)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert int(ds.pixel_array.min()) >= 0  # stored values are not HU
    out = read_dicom_series([tmp_path / "b.dcm", tmp_path / "a.dcm"])
    np.testing.assert_array_equal(out.array, hu)


def _edit(path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for tag, value in tags.items():
        setattr(ds, tag, value)
    ds.save_as(path)


@pytest.mark.parametrize(
    "slice_index, tags, message",
    [
        (2, {"ImagePositionPatient": ["0", "NaN", "5"]}, "ImagePositionPatient"),
        (0, {"ImageOrientationPatient": [1, 0, 0, 0, 1, "NaN"]}, "ImageOrientationPatient"),
        (2, {"RescaleSlope": "NaN", "RescaleIntercept": "0"}, "RescaleSlope"),
        (1, {"RescaleSlope": "1", "RescaleIntercept": "inf"}, "RescaleIntercept"),
        (3, {"FrameOfReferenceUID": "1.2.3.4"}, "FrameOfReferenceUID"),
        (3, {"StudyInstanceUID": "1.2.3.5"}, "StudyInstanceUID"),
    ],
)
def test_non_finite_geometry_or_rescale_and_mixed_uids_name_the_file(tmp_path, slice_index, tags, message):
    """Each is refused naming the offending file (NaN compares False, so it used to pass or blame another file)."""
    from scse_monai.data.errors import DataPreparationError

    names = [f"s{k}.dcm" for k in range(4)]
    write_dicom_series(np.ones((4, 4, 4), np.uint16), tmp_path, names, origin=(0, 0, 0), modality="CT")
    _edit(tmp_path / names[slice_index], **tags)
    with pytest.raises(DataPreparationError, match=message) as raised:
        read_dicom_series(sorted(tmp_path.iterdir()))
    assert names[slice_index] in str(raised.value)
