"""Number formatting and labels in one place, so Markdown and HTML print the same digits."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

METRIC_LABELS: dict[str, str] = {
    "auroc": "AUROC",
    "log_loss": "log loss",
    "brier": "Brier",
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "ece": "ECE",
    "rmse": "RMSE",
    "mae": "MAE",
}
CORRECTION_LABELS = {"holm": "Holm", "bonferroni": "Bonferroni", "fdr_bh": "BH", "none": ""}
VERDICTS = ("PROMOTE", "KEEP", "BLOCKED", "INCONCLUSIVE")  # the report counts each one
# secondary tests whose difference is challenger - champion of a loss (lower is better)
LOSS_TESTS = ("paired_t_", "wilcoxon_", "rmse_delta")


def _iso(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, spec: str = ".4g") -> str:
    if not _finite(x):
        return "n/a"
    text = format(float(x), spec)
    # never "-0" (or "> -0"): a value that rounds to zero has no sign
    return text.replace("-", "") if not text.strip("+-0.%") else text


def _improvement(p: Mapping[str, Any], lower_is_better: bool | None = None
                 ) -> tuple[Any, Any, Any]:
    """(improvement, CI low, CI high), positive = challenger better: the difference
    (challenger - champion) with its CI flipped for losses. One sign convention everywhere."""
    lower = (not p.get("higher_is_better", True)) if lower_is_better is None else lower_is_better
    diff, lo, hi = p.get("difference"), p.get("ci_low"), p.get("ci_high")
    if not lower:
        imp = p.get("improvement", diff) if lower_is_better is None else diff
        return imp, lo, hi
    neg = [-float(v) if v is not None and _finite(v) else None for v in (diff, hi, lo)]
    return neg[0], neg[1], neg[2]


def _diff(x: Any) -> str:
    return _num(x, "+.3g")


def _p(x: Any) -> str:
    """p-values: 3 significant digits, scientific below 1e-4, and never a bare 0."""
    if not _finite(x):
        return "n/a"
    if x == 0:
        return "< 1e-300"
    return format(x, ".2e") if x < 1e-4 else format(x, ".3g")


def _pct(x: Any, spec: str = ".2%") -> str:
    return format(float(x), spec) if _finite(x) else "n/a"


def _int(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "n/a"


def _ci(value: Any, lo: Any, hi: Any, fmt: str = ".4g") -> str:
    if not _finite(value):
        return "n/a"
    if _finite(lo) and _finite(hi):
        return f"{_num(value, fmt)} [{_num(lo, fmt)}, {_num(hi, fmt)}]"
    return _num(value, fmt)
