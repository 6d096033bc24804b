"""Paired significance tests for a champion and a challenger scored on the same labelled requests.

Why paired: shadow mirroring gives every challenger the *same* requests the champion answered, so
the two models' errors are strongly correlated. Tests that treat the two samples as independent
would throw that correlation away and need many times more labels; every test here works on the
per-request pairing instead.

Conventions used throughout the evaluator:

* argument order is always ``(champion, challenger)``;
* ``difference`` is ``challenger - champion`` in the metric's own units (so for a loss a negative
  difference is an improvement);
* p-values are two-sided unless a name says otherwise; the decision layer reads the direction from
  the estimate.

Nothing here imports the rest of the evaluator (only the array aliases of evaluator.dataset), so
the functions can be checked against independent implementations (sklearn, scipy, statsmodels,
an O(n^2) DeLong) on plain arrays.

Modules: ``common`` (JSON, normal/t tails, ranks), ``delong`` (AUROC), ``paired`` (McNemar, paired
t, Wilcoxon, RMSE delta, non-inferiority), ``power`` (multiplicity, power and sample size). This
module is their one import point.
"""

from evaluator.stats.common import dataclass_dict, jsonable, midranks
from evaluator.stats.delong import (
    DeLongResult,
    delong_covariance,
    delong_test,
    placement_values,
    placements_sorted,
)
from evaluator.stats.paired import (
    DeltaRmseResult,
    McNemarResult,
    NonInferiorityResult,
    PairedTestResult,
    mcnemar_test,
    non_inferiority_test,
    paired_t_test,
    rmse_delta_moments,
    rmse_difference_test,
    wilcoxon_signed_rank,
)
from evaluator.stats.power import (
    PowerResult,
    adjust_pvalues,
    corrected_levels,
    power_normal,
    sample_size_normal,
    sample_size_paired_t,
)

__all__ = [
    "DeLongResult",
    "DeltaRmseResult",
    "McNemarResult",
    "NonInferiorityResult",
    "PairedTestResult",
    "PowerResult",
    "adjust_pvalues",
    "corrected_levels",
    "dataclass_dict",
    "delong_covariance",
    "delong_test",
    "jsonable",
    "mcnemar_test",
    "midranks",
    "non_inferiority_test",
    "paired_t_test",
    "placement_values",
    "placements_sorted",
    "power_normal",
    "rmse_delta_moments",
    "rmse_difference_test",
    "sample_size_normal",
    "sample_size_paired_t",
    "wilcoxon_signed_rank",
]
