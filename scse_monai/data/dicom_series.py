"""Read one DICOM series into a volume with its world geometry (RAS affine, NIfTI convention).

pydicom reads single files; it has no series-to-volume assembly. MONAI's ITKReader / ITK-GDCM can read a series,
but they sort and validate silently (they do not report a mixed series or uneven spacing by file name) and they do
not tell us which file became which slice, which we need to pair CHAOS masks by file name. So the assembly is
written here, small and explicit, and tested against ITK's reading of the same series.

Geometry (DICOM PS3.3 C.7.6.2): for a pixel at column ``i`` and row ``j`` of a slice whose ImagePositionPatient is
``P``, the LPS world position is ``P + i * dc * r + j * dr * c`` where ``r``/``c`` are the row/column direction
cosines of ImageOrientationPatient and ``(dr, dc)`` = PixelSpacing. Slices are ordered by the projection of ``P`` on
the normal ``r x c``, never by file name or InstanceNumber. The volume is stored as ``array[i, j, k]`` (column,
row, slice) so that ``affine @ (i, j, k, 1)`` is the RAS position, as nibabel and MONAI expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .errors import DataPreparationError

__all__ = ["DicomVolume", "read_dicom_series", "LPS_TO_RAS"]

#: Flip of the first two world axes: DICOM patient coordinates are LPS, NIfTI/nibabel/MONAI world is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# tolerance on slice positions relative to the slice spacing (and a floor in mm), for rounding in DS strings
_REL_TOL = 0.01
_ABS_TOL_MM = 0.01


@dataclass
class DicomVolume:
    """A DICOM series assembled into a volume.

    Attributes:
        array: voxel values indexed ``[column, row, slice]``; CT in Hounsfield units (RescaleSlope/Intercept
            applied), other modalities as stored.
        affine: 4x4 voxel-to-world matrix in RAS (NIfTI convention).
        files: the files in slice order, ``files[k]`` is slice ``k`` of ``array``.
        modality: DICOM Modality (``"CT"``, ``"MR"``, ...).
        rows: DICOM Rows.
        columns: DICOM Columns.
    """

    array: np.ndarray
    affine: np.ndarray
    files: list[Path]
    modality: str
    rows: int
    columns: int


def _read_header_and_pixels(path: Path, patient: str | None) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DataPreparationError(f"not a DICOM file ({e})", patient, path) from None
    except Exception as e:  # truncated files raise assorted errors (EOFError, struct.error, ValueError)
        raise DataPreparationError(f"cannot read DICOM file ({type(e).__name__}: {e})", patient, path) from None
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise DataPreparationError(f"DICOM file lacks {tag}; cannot place it in space", patient, path)
    if "PixelData" not in ds:
        raise DataPreparationError("DICOM file has no pixel data (truncated?)", patient, path)
    for tag in ("RescaleSlope", "RescaleIntercept"):  # MONAI Deploy applies them to MR too
        if tag in ds and not _finite(ds, tag):
            raise DataPreparationError(f"{tag} {ds.get(tag)} is not a finite number", patient, path)
    return ds


def _finite(ds: pydicom.Dataset, tag: str) -> bool:
    try:
        return bool(np.all(np.isfinite(np.asarray(ds.get(tag), dtype=np.float64))))
    except (TypeError, ValueError):
        return False


def _pixels(ds: pydicom.Dataset, path: Path, patient: str | None, to_hu: bool) -> np.ndarray:
    try:
        pix = ds.pixel_array
    except Exception as e:  # truncated pixel data
        raise DataPreparationError(f"cannot decode pixel data ({type(e).__name__}: {e})", patient, path) from None
    if pix.shape != (int(ds.Rows), int(ds.Columns)):
        raise DataPreparationError(f"pixel array shape {pix.shape} is not Rows x Columns", patient, path)
    if to_hu:
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        pix = pix.astype(np.float64) * slope + intercept
    return pix


def read_dicom_series(
    files: Sequence[str | Path], patient: str | None = None, rescale: bool | None = None
) -> DicomVolume:
    """Assemble DICOM files of one series into a volume ordered along the slice normal.

    Args:
        files: the files of the series, in any order.
        patient: patient id used in error messages.
        rescale: apply RescaleSlope/Intercept (Hounsfield units); default: only for CT.

    Returns:
        the volume, RAS affine and the files in slice order.

    Raises:
        DataPreparationError: unreadable/non-DICOM file, several series or orientations mixed, duplicate or
            non-uniform slice positions, or inconsistent slice size / pixel spacing.

    Example:
        >>> vol = read_dicom_series(sorted(Path("T2SPIR/DICOM_anon").glob("*.dcm")), patient="1")  # doctest: +SKIP
        >>> vol.array.shape, vol.affine  # doctest: +SKIP
    """
    paths = [Path(f) for f in files]
    headers = [_read_header_and_pixels(p, patient) for p in paths]
    headers, paths, positions, step = _placed_slices(headers, paths, patient)
    first = headers[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    shape = (int(first.Rows), int(first.Columns))

    modality = str(getattr(first, "Modality", ""))
    to_hu = modality == "CT" if rescale is None else rescale
    slices = [_pixels(ds, p, patient, to_hu) for ds, p in zip(headers, paths, strict=True)]
    # array[i, j, k]: column i, row j, slice k
    array = np.stack([s.T for s in slices], axis=-1)
    if to_hu:
        if np.allclose(array, np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
            array = np.round(array).astype(np.int16)
        else:
            array = array.astype(np.float32)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: column index i, spacing between columns
    lps[:3, 1] = col_dir * spacing[0]  # along a column: row index j, spacing between rows
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return DicomVolume(
        array=array, affine=LPS_TO_RAS @ lps, files=paths, modality=modality, rows=shape[0], columns=shape[1]
    )


def _check_consistent(headers: list[pydicom.Dataset], paths: list[Path], patient: str | None) -> None:
    first, first_path = headers[0], paths[0]
    for tag in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):  # one series, one patient space
        ref = first.get(tag)
        for ds, p in zip(headers, paths, strict=True):
            if ds.get(tag) != ref:
                raise DataPreparationError(
                    f"two series mixed in one folder ({tag} {ds.get(tag)} differs from {ref} of {first_path.name})",
                    patient,
                    p,
                )
    for ds, p in zip(headers, paths, strict=True):
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if not _finite(ds, tag):
                raise DataPreparationError(f"{tag} {ds.get(tag)} has a value that is not a finite number", patient, p)
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)  # (row spacing dr, column spacing dc)
    if spacing.shape != (2,) or np.any(spacing <= 0):  # finite: checked above, in every file
        raise DataPreparationError(f"PixelSpacing {spacing.tolist()} must be two positive numbers", patient, first_path)
    if iop.shape != (6,) or np.linalg.norm(np.cross(iop[:3], iop[3:])) < 1e-3:
        raise DataPreparationError(f"ImageOrientationPatient {iop.tolist()} is degenerate", patient, first_path)
    shape = (int(first.Rows), int(first.Columns))
    for ds, p in zip(headers, paths, strict=True):
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise DataPreparationError(f"ImageOrientationPatient differs from {first_path.name}", patient, p)
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), spacing, rtol=1e-4):
            raise DataPreparationError(f"PixelSpacing differs from {first_path.name}", patient, p)
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DataPreparationError(f"slice size differs from {first_path.name}", patient, p)


def _placed_slices(
    headers: list[pydicom.Dataset], paths: list[Path], patient: str | None
) -> tuple[list[pydicom.Dataset], list[Path], np.ndarray, np.ndarray]:
    """Headers and paths sorted along the slice normal, their positions and the slice step (checked regular)."""
    if not paths:
        raise DataPreparationError("no DICOM files", patient)
    _check_consistent(headers, paths, patient)
    first = headers[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in headers])
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    positions, proj = positions[order], proj[order]
    headers = [headers[k] for k in order]
    paths = [paths[k] for k in order]
    n = len(paths)
    if n == 1:
        thickness = float(getattr(first, "SpacingBetweenSlices", getattr(first, "SliceThickness", 1.0)) or 1.0)
        return headers, paths, positions, normal * thickness
    gaps = np.diff(proj)
    dup = int(np.argmin(gaps))
    if gaps[dup] < _ABS_TOL_MM:
        raise DataPreparationError(
            f"two slices at the same position along the slice normal (also {paths[dup].name}); "
            "duplicate file or two series mixed in one folder",
            patient,
            paths[dup + 1],
        )
    step = (positions[-1] - positions[0]) / (n - 1)
    expected = positions[0] + np.arange(n)[:, None] * step
    dev = np.linalg.norm(positions - expected, axis=1)
    tol = max(_ABS_TOL_MM, _REL_TOL * float(np.linalg.norm(step)))
    bad = int(np.argmax(dev))
    if dev[bad] > tol:
        raise DataPreparationError(
            f"non-uniform slice spacing (gaps {np.round(gaps, 3).tolist()} mm), a missing slice?; this slice is "
            f"{dev[bad]:.3f} mm off a regular grid",
            patient,
            paths[bad],
        )
    return headers, paths, positions, step
