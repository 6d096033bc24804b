"""What every quality metric shares: the value with its interval, cleaning, per-request losses
and the interval helpers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import special

from evaluator.dataset import Array
from evaluator.stats.common import JsonFields

PROB_EPS = float(np.finfo(np.float64).eps)

LossName = Literal["log_loss", "brier", "zero_one", "squared_error", "absolute_error"]
BinStrategy = Literal["uniform", "quantile"]


@dataclass(frozen=True)
class MetricOptions:
    """How the metrics' intervals are computed: the level, ECE's bins, and the bootstrap's
    draws and seed (F1, ECE)."""

    alpha: float = 0.05
    ece_bins: int = 10
    ece_strategy: BinStrategy = "uniform"
    n_boot: int = 1000
    seed: int = 0


DEFAULT_METRIC_OPTIONS = MetricOptions()


@dataclass(frozen=True)
class MetricValue(JsonFields):
    """A metric with its confidence interval, sample size and exclusions, or why it is missing."""

    name: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    ci_method: str | None = None
    n: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    reason: str | None = None

    @property
    def defined(self) -> bool:
        return self.value is not None


# ----------------------------------------------------------------------------------------------
# Cleaning and per-request losses
# ----------------------------------------------------------------------------------------------


def _clean(
    labels: Array,
    values: Array,
    values_name: str,
    label_check: Callable[[Array], Array],
    label_reason: str,
) -> tuple[Array, Array, dict[str, int]]:
    """Keep rows with a finite value whose label passes ``label_check``; count what was dropped
    (a non-finite value first, else a bad label, counted under ``label_reason``)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(values, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and {values_name} ({s.size}) differ in length")
    finite = np.isfinite(s)
    label_ok = label_check(y)
    keep = finite & label_ok
    excluded = {
        "nonfinite_score": int(np.count_nonzero(~finite)),
        label_reason: int(np.count_nonzero(finite & ~label_ok)),
    }
    return y[keep], s[keep], excluded


def clean_classification(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Keep rows with a finite score and a 0/1 label; count what was dropped and why."""
    return _clean(labels, scores, "scores", lambda y: (y == 0) | (y == 1), "invalid_label")


def clean_regression(
    labels: np.ndarray, predictions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Keep rows where both the target and the prediction are finite; count the rest."""
    return _clean(labels, predictions, "predictions", np.isfinite, "nonfinite_label")


def probability_violations(scores: np.ndarray) -> int:
    """How many finite scores fall outside [0, 1] (a model emitting logits, or broken)."""
    s = np.asarray(scores, dtype=np.float64)
    finite = s[np.isfinite(s)]
    return int(np.count_nonzero((finite < 0) | (finite > 1)))


def per_request_loss(
    loss: LossName, labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5
) -> np.ndarray:
    """The loss each request contributes, so paired tests can compare models request by request.

    NaN wherever the score or label is not finite (callers exclude and count those). For
    ``log_loss`` probabilities are clipped to [eps, 1 - eps]; callers should first check
    :func:`probability_violations`, since clipping a score of 1.7 would hide a broken model.
    ``zero_one`` is 1 for a wrong decision at ``threshold`` (score >= threshold means positive).
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    bad = ~(np.isfinite(y) & np.isfinite(s))
    if loss == "log_loss":
        p = np.clip(np.where(bad, 0.5, s), PROB_EPS, 1.0 - PROB_EPS)
        yy = np.where(bad, 0.0, y)
        out = -(yy * np.log(p) + (1.0 - yy) * np.log1p(-p))
    elif loss in ("brier", "squared_error"):
        out = (s - y) ** 2
    elif loss == "absolute_error":
        out = np.abs(s - y)
    elif loss == "zero_one":
        out = ((np.where(bad, 0.0, s) >= threshold) != (y == 1)).astype(np.float64)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    out = np.asarray(out, dtype=np.float64)
    out[bad] = np.nan
    return out


# ----------------------------------------------------------------------------------------------
# Interval helpers
# ----------------------------------------------------------------------------------------------


def _zcrit(alpha: float) -> float:
    return float(special.ndtri(1.0 - alpha / 2.0))


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (stays inside [0, 1], good near 0/1)."""
    if n <= 0:
        raise ValueError("Wilson interval needs n > 0")
    z = _zcrit(alpha)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _mean_metric(
    name: str, values: np.ndarray, alpha: float, excluded: dict[str, int]
) -> MetricValue:
    n = int(values.size)
    if n == 0:
        return MetricValue(name, None, n=0, excluded=excluded, reason="no labelled requests")
    mean = float(values.mean())
    if n < 2:
        return MetricValue(
            name, mean, n=n, excluded=excluded, reason="CI undefined with a single request"
        )
    half = _zcrit(alpha) * float(values.std(ddof=1)) / math.sqrt(n)
    return MetricValue(name, mean, mean - half, mean + half, "normal", n, excluded)


def _proportion_metric(
    name: str, successes: int, n: int, alpha: float, excluded: dict[str, int], empty_reason: str
) -> MetricValue:
    if n == 0:
        return MetricValue(name, None, n=0, excluded=excluded, reason=empty_reason)
    lo, hi = wilson_interval(successes, n, alpha)
    return MetricValue(name, successes / n, lo, hi, "wilson", n, excluded)


def _probability_guard(
    name: str, s: np.ndarray, n: int, excluded: dict[str, int]
) -> MetricValue | None:
    bad = probability_violations(s)
    if bad:
        return MetricValue(
            name,
            None,
            n=n,
            excluded=excluded,
            reason=f"{bad} scores outside [0, 1]: {name} needs probabilities",
        )
    return None
