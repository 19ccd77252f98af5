"""Experiment runner: reproduce the paper's Table 1 (network x SE variant, patient-level folds) through the bundle.

Command line: ``python -m scse_monai.experiments compare --datalist PREPARED/datalist.json ...`` (see ``--help``).
"""

from scse_monai.experiments.compare import SE_VARIANTS, ExperimentError, compare, make_folds
from scse_monai.experiments.stats import read_per_case, summarize, wilcoxon_paired

__all__ = [
    "SE_VARIANTS",
    "ExperimentError",
    "compare",
    "make_folds",
    "read_per_case",
    "summarize",
    "wilcoxon_paired",
]
