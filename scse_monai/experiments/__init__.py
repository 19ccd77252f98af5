"""Experiments through the bundle: patient-level cross-validation of the shipped recipe, and the paper's
comparison of SE variants (Table 1), each held-out patient scored with its fold's last-epoch weights.

Command line: ``python -m scse_monai.experiments {crossval,compare} --datalist PREPARED/datalist.json ...``.
"""

from scse_monai.experiments.compare import compare
from scse_monai.experiments.crossval import crossval
from scse_monai.experiments.setup import ExperimentError, make_folds
from scse_monai.experiments.stats import bootstrap_ci, paired_difference, wilcoxon_paired

__all__ = [
    "ExperimentError",
    "bootstrap_ci",
    "compare",
    "crossval",
    "make_folds",
    "paired_difference",
    "wilcoxon_paired",
]
