"""Calibration: the reliability table and the expected calibration error (ECE) with its bootstrap
interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluator.stats.common import JsonFields
from evaluator.stats.metric_core import (
    BinStrategy,
    MetricValue,
    _probability_guard,
    clean_classification,
    probability_violations,
)

ECE_ROW_BOOTSTRAP_MAX_N = 5000


@dataclass(frozen=True)
class CalibrationTable(JsonFields):
    """Reliability-diagram data: per non-empty bin, mean score and observed positive rate."""

    strategy: str
    edges: np.ndarray
    mean_predicted: np.ndarray
    observed_rate: np.ndarray
    counts: np.ndarray


def _bin_ids(s: np.ndarray, n_bins: int, strategy: BinStrategy) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and each score's bin, with scikit-learn's ``calibration_curve`` conventions.

    ``uniform``: equal-width bins on [0, 1]. ``quantile``: equal-mass bins (edges at score
    quantiles; tied scores can leave some bins empty). A score equal to an inner edge falls in
    the lower bin.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.percentile(s, np.linspace(0.0, 100.0, n_bins + 1))
    else:
        raise ValueError(f"unknown binning strategy {strategy!r}")
    return edges, np.searchsorted(edges[1:-1], s)


def calibration_curve(
    labels: np.ndarray, scores: np.ndarray, n_bins: int = 10, strategy: BinStrategy = "uniform"
) -> CalibrationTable:
    """Reliability-diagram table for the report's calibration plot (empty bins are dropped)."""
    y, s, _ = clean_classification(labels, scores)
    if y.size == 0:
        empty = np.empty(0)
        return CalibrationTable(strategy, empty, empty, empty, np.empty(0, dtype=np.int64))
    if probability_violations(s):
        raise ValueError("calibration needs probabilities in [0, 1]")
    edges, ids = _bin_ids(s, n_bins, strategy)
    counts = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=s, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    nz = counts > 0
    return CalibrationTable(
        strategy, edges, sum_p[nz] / counts[nz], sum_y[nz] / counts[nz], counts[nz]
    )


def _ece_value(ids: np.ndarray, y: np.ndarray, s: np.ndarray, n_bins: int) -> float:
    counts = np.bincount(ids, minlength=n_bins)
    gap = np.bincount(ids, weights=y - s, minlength=n_bins)  # sum of (y - p) per bin
    return float(np.abs(gap).sum() / max(int(counts.sum()), 1))


def expected_calibration_error(
    labels: np.ndarray,
    scores: np.ndarray,
    n_bins: int = 10,
    strategy: BinStrategy = "uniform",
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
) -> MetricValue:
    """ECE = sum over bins of (n_b / n) * |observed positive rate_b - mean score_b|.

    Calibration of the positive-class probability (not top-label confidence), in ``n_bins``
    equal-width (``uniform``, the usual reliability diagram) or equal-mass (``quantile``: every
    bin holds about n / n_bins requests, more stable when scores crowd near 0, as fraud scores
    do) bins. ECE is biased upward in small samples (|noise| > 0), so compare models on the same
    requests and bins rather than reading it as an absolute.
    """
    y, s, excluded = clean_classification(labels, scores)
    return _ece(y, s, n_bins, strategy, alpha, n_boot, seed, excluded)


def _ece(
    y: np.ndarray,
    s: np.ndarray,
    n_bins: int,
    strategy: BinStrategy,
    alpha: float,
    n_boot: int,
    seed: int,
    excluded: dict[str, int],
) -> MetricValue:
    name = f"ece_{strategy}_{n_bins}"
    n = int(y.size)
    if n == 0:
        return MetricValue(name, None, n=0, excluded=excluded, reason="no labelled requests")
    guard = _probability_guard(name, s, n, excluded)
    if guard is not None:
        return guard
    _, ids = _bin_ids(s, n_bins, strategy)
    value = _ece_value(ids, y, s, n_bins)
    rng = np.random.default_rng(seed)
    if n <= ECE_ROW_BOOTSTRAP_MAX_N:
        draws = np.empty(n_boot)
        for b in range(n_boot):
            idx = rng.integers(0, n, size=n)
            draws[b] = _ece_value(ids[idx], y[idx], s[idx], n_bins)
        method = f"bootstrap-rows(B={n_boot},seed={seed})"
    else:
        counts = np.bincount(ids, minlength=n_bins).astype(np.float64)
        r = y - s
        gap_sum = np.bincount(ids, weights=r, minlength=n_bins)
        sq_sum = np.bincount(ids, weights=r * r, minlength=n_bins)
        nz = counts > 0
        cnt = counts[nz]
        mean_gap = gap_sum[nz] / cnt
        var_gap = np.where(cnt > 1, (sq_sum[nz] - cnt * mean_gap**2) / np.maximum(cnt - 1, 1), 0.0)
        var_gap = np.maximum(var_gap, 0.0)
        boot_counts = rng.multinomial(n, cnt / n, size=n_boot)
        sd = np.sqrt(var_gap[None, :] / np.maximum(boot_counts, 1))
        gaps = mean_gap[None, :] + sd * rng.standard_normal(boot_counts.shape)
        draws = (boot_counts * np.abs(gaps)).sum(axis=1) / n
        method = f"bootstrap-bins-normal(B={n_boot},seed={seed})"
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return MetricValue(name, value, float(lo), float(hi), method, n, excluded)
