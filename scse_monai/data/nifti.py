"""Reading NIfTI files during data preparation: any failure is a :class:`DataPreparationError` naming the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataPreparationError

__all__ = ["load_nifti", "nifti_voxels"]


def load_nifti(path: str | Path, patient: str | None = None) -> nib.Nifti1Image:
    """The image of ``path``, header only (voxels are read by :func:`nifti_voxels`).

    Raises:
        DataPreparationError: missing or not NIfTI (names ``patient`` and the file).
    """
    try:
        return nib.load(path)
    except Exception as e:  # missing, not NIfTI, bad header: whatever nibabel says is the reason
        raise DataPreparationError(f"cannot read NIfTI ({type(e).__name__}: {e})", patient, path) from None


def nifti_voxels(img: nib.Nifti1Image, path: str | Path, patient: str | None = None) -> np.ndarray:
    """Every voxel of ``img`` (loaded from ``path``).

    Raises:
        DataPreparationError: the data cannot be read in full, e.g. a truncated ``.nii.gz`` (names the file).
    """
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip etc.
        raise DataPreparationError(f"cannot read NIfTI data ({type(e).__name__}: {e})", patient, path) from None
