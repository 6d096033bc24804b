"""Per-model quality metrics with confidence intervals, on the labelled requests of a window.

Why every number carries an interval: a champion at AUROC 0.861 and a challenger at 0.866 on 800
labels are indistinguishable, and a report that prints bare point estimates invites promotions on
noise. Why undefined metrics carry a reason instead of a number: a window where every label is 0
has no AUROC, and returning 0.5 (or crashing the nightly report) would both be wrong.

Interval methods (``MetricValue.ci_method`` names the one used):

* AUROC — Wald interval from the DeLong variance (same structural components as the paired
  DeLong test), clipped to [0, 1].
* log loss, Brier, MAE — normal approximation for a mean of per-request losses (CLT).
* RMSE — delta method on the mean squared error: se = sd(e^2) / (2 RMSE sqrt(n)), clipped at 0.
* accuracy, precision, recall — Wilson score interval (good coverage even near 0 or 1).
* F1 — seeded percentile bootstrap. F1 depends only on the confusion matrix, so resampling
  requests is exactly multinomial resampling of its four cells: exact and O(B), whatever n is.
* ECE — seeded percentile bootstrap over requests with the bin edges held fixed when
  n <= ``ECE_ROW_BOOTSTRAP_MAX_N``; above that, a bin-level bootstrap (multinomial bin counts,
  and each bin's calibration gap drawn from its normal approximation), which is what the row
  bootstrap converges to when every bin holds many requests, at O(B * bins) cost.

Robustness rules: rows with a NaN/inf score or label are excluded and counted (``excluded``);
for classification, labels other than 0/1 are excluded and counted. Probability metrics (log
loss, Brier, ECE) are undefined, with a reason, when any score lies outside [0, 1] — such a model
emits logits or is broken, and clipping would hide that. Log loss clips probabilities to
[eps, 1 - eps] with eps = float64 machine epsilon (the clipping scikit-learn applies), so a
confident miss costs about 36 nats rather than infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import special

from evaluator.dataset import EvalDataset
from evaluator.stats.significance import _dataclass_dict, delong_covariance, jsonable, midranks

PROB_EPS = float(np.finfo(np.float64).eps)
ECE_ROW_BOOTSTRAP_MAX_N = 5000

LossName = Literal["log_loss", "brier", "zero_one", "squared_error", "absolute_error"]
BinStrategy = Literal["uniform", "quantile"]


@dataclass(frozen=True)
class MetricValue:
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

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


# ----------------------------------------------------------------------------------------------
# Cleaning and per-request losses
# ----------------------------------------------------------------------------------------------


def clean_classification(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Keep rows with a finite score and a 0/1 label; count what was dropped and why."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    finite = np.isfinite(s)
    label_ok = (y == 0) | (y == 1)
    keep = finite & label_ok
    excluded = {
        "nonfinite_score": int(np.count_nonzero(~finite)),
        "invalid_label": int(np.count_nonzero(finite & ~label_ok)),
    }
    return y[keep], s[keep], excluded


def clean_regression(
    labels: np.ndarray, predictions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Keep rows where both the target and the prediction are finite; count the rest."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(predictions, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and predictions ({s.size}) differ in length")
    finite = np.isfinite(s)
    label_ok = np.isfinite(y)
    excluded = {
        "nonfinite_score": int(np.count_nonzero(~finite)),
        "nonfinite_label": int(np.count_nonzero(finite & ~label_ok)),
    }
    keep = finite & label_ok
    return y[keep], s[keep], excluded


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


# ----------------------------------------------------------------------------------------------
# Classification metrics
# ----------------------------------------------------------------------------------------------


def _auc_midrank(y: np.ndarray, s: np.ndarray) -> float:
    pos = y == 1
    m = int(np.count_nonzero(pos))
    k = int(y.size - m)
    r = midranks(s)
    return float((r[pos].sum() - m * (m + 1) / 2.0) / (m * k))


def _auroc(y: np.ndarray, s: np.ndarray, alpha: float, excluded: dict[str, int]) -> MetricValue:
    n = int(y.size)
    n_pos = int(np.count_nonzero(y == 1))
    n_neg = n - n_pos
    if n == 0:
        return MetricValue("auroc", None, n=0, excluded=excluded, reason="no labelled requests")
    if n_pos == 0 or n_neg == 0:
        only = "0 (negative)" if n_pos == 0 else "1 (positive)"
        return MetricValue(
            "auroc",
            None,
            n=n,
            excluded=excluded,
            reason=f"AUROC undefined: all {n} labels are {only}; need both classes",
        )
    if n_pos < 2 or n_neg < 2:
        return MetricValue(
            "auroc",
            _auc_midrank(y, s),
            n=n,
            excluded=excluded,
            reason=f"DeLong CI undefined with {n_pos} positives / {n_neg} negatives (need 2 each)",
        )
    aucs, cov = delong_covariance(y, s[None, :])
    auc = float(aucs[0])
    half = _zcrit(alpha) * math.sqrt(max(float(cov[0, 0]), 0.0))
    return MetricValue(
        "auroc", auc, max(0.0, auc - half), min(1.0, auc + half), "delong", n, excluded
    )


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


def auroc(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """AUROC (higher score = positive; never flipped) with a DeLong Wald CI."""
    y, s, excluded = clean_classification(labels, scores)
    return _auroc(y, s, alpha, excluded)


def log_loss(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """Mean binary cross-entropy (nats) with probabilities clipped to [eps, 1 - eps]."""
    y, s, excluded = clean_classification(labels, scores)
    guard = _probability_guard("log_loss", s, int(y.size), excluded)
    if guard is not None:
        return guard
    return _mean_metric("log_loss", per_request_loss("log_loss", y, s), alpha, excluded)


def brier(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """Brier score: mean squared difference between the probability and the 0/1 outcome."""
    y, s, excluded = clean_classification(labels, scores)
    guard = _probability_guard("brier", s, int(y.size), excluded)
    if guard is not None:
        return guard
    return _mean_metric("brier", (s - y) ** 2, alpha, excluded)


def accuracy(
    labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5, alpha: float = 0.05
) -> MetricValue:
    """Share of requests where (score >= threshold) matches the label; Wilson CI."""
    y, s, excluded = clean_classification(labels, scores)
    correct = int(np.count_nonzero((s >= threshold) == (y == 1)))
    return _proportion_metric(
        "accuracy", correct, int(y.size), alpha, excluded, "no labelled requests"
    )


def precision_recall_f1(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float = 0.5,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, MetricValue]:
    """Precision, recall (Wilson CIs) and F1 (multinomial bootstrap CI) at ``threshold``."""
    y, s, excluded = clean_classification(labels, scores)
    return _precision_recall_f1(y, s, threshold, alpha, n_boot, seed, excluded)


def _precision_recall_f1(
    y: np.ndarray,
    s: np.ndarray,
    threshold: float,
    alpha: float,
    n_boot: int,
    seed: int,
    excluded: dict[str, int],
) -> dict[str, MetricValue]:
    pred = s >= threshold
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    tn = int(y.size - tp - fp - fn)
    precision = _proportion_metric(
        "precision",
        tp,
        tp + fp,
        alpha,
        excluded,
        f"precision undefined: no request scored >= {threshold}",
    )
    recall = _proportion_metric(
        "recall", tp, tp + fn, alpha, excluded, "recall undefined: no positive labels"
    )
    n = int(y.size)
    if 2 * tp + fp + fn == 0:
        reason = "no labelled requests" if n == 0 else "F1 undefined: no positives, none predicted"
        f1 = MetricValue("f1", None, n=n, excluded=excluded, reason=reason)
    else:
        value = 2 * tp / (2 * tp + fp + fn)
        rng = np.random.default_rng(seed)
        cells = rng.multinomial(n, np.array([tp, fp, fn, tn], dtype=np.float64) / n, size=n_boot)
        denom = 2 * cells[:, 0] + cells[:, 1] + cells[:, 2]
        draws = 2 * cells[denom > 0, 0] / denom[denom > 0]
        lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
        f1 = MetricValue(
            "f1",
            value,
            float(lo),
            float(hi),
            f"bootstrap-multinomial(B={n_boot},seed={seed})",
            n,
            excluded,
        )
    return {"precision": precision, "recall": recall, "f1": f1}


@dataclass(frozen=True)
class CalibrationTable:
    """Reliability-diagram data: per non-empty bin, mean score and observed positive rate."""

    strategy: str
    edges: np.ndarray
    mean_predicted: np.ndarray
    observed_rate: np.ndarray
    counts: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


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


def classification_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float = 0.5,
    alpha: float = 0.05,
    ece_bins: int = 10,
    ece_strategy: BinStrategy = "uniform",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, MetricValue]:
    """Every classifier metric on one model's scores (rows cleaned once, exclusions shared)."""
    y, s, excluded = clean_classification(labels, scores)
    n = int(y.size)
    out: dict[str, MetricValue] = {"auroc": _auroc(y, s, alpha, excluded)}
    for name in ("log_loss", "brier"):
        guard = _probability_guard(name, s, n, excluded)
        if guard is None:
            loss: LossName = "log_loss" if name == "log_loss" else "brier"
            guard = _mean_metric(name, per_request_loss(loss, y, s), alpha, excluded)
        out[name] = guard
    correct = int(np.count_nonzero((s >= threshold) == (y == 1)))
    out["accuracy"] = _proportion_metric(
        "accuracy", correct, n, alpha, excluded, "no labelled requests"
    )
    out.update(_precision_recall_f1(y, s, threshold, alpha, n_boot, seed, excluded))
    out["ece"] = _ece(y, s, ece_bins, ece_strategy, alpha, n_boot, seed, excluded)
    return out


# ----------------------------------------------------------------------------------------------
# Regression metrics
# ----------------------------------------------------------------------------------------------


def _rmse(err: np.ndarray, alpha: float, excluded: dict[str, int]) -> MetricValue:
    n = int(err.size)
    if n == 0:
        return MetricValue("rmse", None, n=0, excluded=excluded, reason="no labelled requests")
    sq = err**2
    value = math.sqrt(float(sq.mean()))
    if n < 2:
        return MetricValue(
            "rmse", value, n=n, excluded=excluded, reason="CI undefined with a single request"
        )
    if value == 0:
        return MetricValue("rmse", 0.0, 0.0, 0.0, "delta", n, excluded)
    se = float(sq.std(ddof=1)) / (2.0 * value * math.sqrt(n))
    half = _zcrit(alpha) * se
    return MetricValue("rmse", value, max(0.0, value - half), value + half, "delta", n, excluded)


def rmse(labels: np.ndarray, predictions: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """Root mean squared error with a delta-method CI."""
    y, s, excluded = clean_regression(labels, predictions)
    return _rmse(s - y, alpha, excluded)


def mae(labels: np.ndarray, predictions: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """Mean absolute error with a normal-approximation CI."""
    y, s, excluded = clean_regression(labels, predictions)
    return _mean_metric("mae", np.abs(s - y), alpha, excluded)


def regression_metrics(
    labels: np.ndarray, predictions: np.ndarray, *, alpha: float = 0.05
) -> dict[str, MetricValue]:
    """RMSE and MAE on one model's predictions."""
    y, s, excluded = clean_regression(labels, predictions)
    return {
        "rmse": _rmse(s - y, alpha, excluded),
        "mae": _mean_metric("mae", np.abs(s - y), alpha, excluded),
    }


# ----------------------------------------------------------------------------------------------
# ROC curve (for the report's plot)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RocCurve:
    """ROC points at every distinct score threshold (descending), thinned for plotting."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


def roc_curve(labels: np.ndarray, scores: np.ndarray, max_points: int | None = None) -> RocCurve:
    """ROC curve with (0, 0) first; ``max_points`` thins it evenly for plots, keeping the ends."""
    y, s, _ = clean_classification(labels, scores)
    n_pos = int(np.count_nonzero(y == 1))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC curve needs both classes")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    if max_points is not None and fpr.size > max_points:
        keep = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(np.int64))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return RocCurve(fpr, tpr, thresholds)


# ----------------------------------------------------------------------------------------------
# Dataset level
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelMetrics:
    """All metrics for one model over the chosen rows of an EvalDataset."""

    model: str
    role: str
    task: str
    rows: str  # "common" or "own"
    n: int
    n_positive: int | None
    n_negative: int | None
    excluded: dict[str, int]
    metrics: dict[str, MetricValue]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "role": self.role,
            "task": self.task,
            "rows": self.rows,
            "n": self.n,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "excluded": jsonable(self.excluded),
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
        }


def common_rows(dataset: EvalDataset) -> np.ndarray:
    """Rows where every model answered ok with a finite score (so their metrics are comparable)."""
    mask = np.ones(len(dataset), dtype=bool)
    for col in dataset.models.values():
        mask &= col.ok & np.isfinite(col.scores)
    return mask


def model_metrics(
    dataset: EvalDataset,
    model: str,
    rows: np.ndarray | None = None,
    *,
    alpha: float = 0.05,
    ece_bins: int = 10,
    ece_strategy: BinStrategy = "uniform",
    n_boot: int = 1000,
    seed: int = 0,
    rows_label: str = "own",
) -> ModelMetrics:
    """Metrics for ``model`` on ``rows`` (default: every request it answered with status ok)."""
    col = dataset.models[model]
    n_all = len(dataset)
    selected = np.ones(n_all, dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    use = selected & col.ok
    excluded: dict[str, int] = {"status_not_ok": int(np.count_nonzero(~col.ok))}
    if rows is not None:
        excluded["not_in_common_rows"] = int(np.count_nonzero(col.ok & ~selected))
    y = dataset.labels[use]
    s = col.scores[use]
    if dataset.task == "classification":
        metrics = classification_metrics(
            y,
            s,
            threshold=dataset.threshold,
            alpha=alpha,
            ece_bins=ece_bins,
            ece_strategy=ece_strategy,
            n_boot=n_boot,
            seed=seed,
        )
        y_clean, _, clean_excluded = clean_classification(y, s)
        n_pos: int | None = int(np.count_nonzero(y_clean == 1))
        n_neg: int | None = int(y_clean.size - (n_pos or 0))
    else:
        metrics = regression_metrics(y, s, alpha=alpha)
        y_clean, _, clean_excluded = clean_regression(y, s)
        n_pos = n_neg = None
    excluded.update(clean_excluded)
    return ModelMetrics(
        model,
        col.role,
        dataset.task,
        rows_label,
        int(y_clean.size),
        n_pos,
        n_neg,
        excluded,
        metrics,
    )


def evaluate_models(
    dataset: EvalDataset,
    *,
    rows: Literal["common", "own"] = "common",
    alpha: float = 0.05,
    ece_bins: int = 10,
    ece_strategy: BinStrategy = "uniform",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, ModelMetrics]:
    """Metrics for every model. ``common`` (default) uses only requests every model answered, so
    the numbers compare like with like; ``own`` uses each model's own ok requests (more data for
    the champion when a challenger is sampled or failing, but not comparable across models)."""
    mask = common_rows(dataset) if rows == "common" else None
    return {
        name: model_metrics(
            dataset,
            name,
            mask,
            alpha=alpha,
            ece_bins=ece_bins,
            ece_strategy=ece_strategy,
            n_boot=n_boot,
            seed=seed,
            rows_label=rows,
        )
        for name in dataset.models
    }
