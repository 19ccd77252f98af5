"""Dataset preparation (CHAOS, VISCERAL), synthetic phantoms in the native layouts, and previews.

Command line: ``python -m scse_monai.data {prepare,synthesize,preview} ...`` (see ``--help``).
"""

from .chaos import CHAOS_MR_LABELS, CHAOS_TASKS, prepare_chaos
from .dicom_series import DicomVolume, read_dicom_series
from .ensure import ensure_synthetic_dataset
from .errors import DataPreparationError
from .synthetic import synthesize
from .visceral import DEFAULT_ORGANS, RADLEX_IDS, prepare_visceral

__all__ = [
    "CHAOS_MR_LABELS",
    "CHAOS_TASKS",
    "DataPreparationError",
    "DicomVolume",
    "ensure_synthetic_dataset",
    "prepare_chaos",
    "read_dicom_series",
    "synthesize",
    "prepare_visceral",
    "DEFAULT_ORGANS",
    "RADLEX_IDS",
]
