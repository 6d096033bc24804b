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

Modules: `metric_core` (MetricValue, cleaning, per-request losses, interval helpers),
`classification`, `calibration` (ECE), and this one: regression metrics, the ROC curve and the
metrics of every model of a dataset; it re-exports the others' public names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from evaluator.dataset import EvalDataset
from evaluator.stats.calibration import (
    ECE_ROW_BOOTSTRAP_MAX_N,
    CalibrationTable,
    calibration_curve,
    expected_calibration_error,
)
from evaluator.stats.classification import (
    accuracy,
    auroc,
    brier,
    classification_metrics,
    log_loss,
    precision_recall_f1,
)
from evaluator.stats.common import JsonFields
from evaluator.stats.metric_core import (
    DEFAULT_METRIC_OPTIONS,
    PROB_EPS,
    BinStrategy,
    LossName,
    MetricOptions,
    MetricValue,
    _mean_metric,
    _zcrit,
    clean_classification,
    clean_regression,
    per_request_loss,
    probability_violations,
    wilson_interval,
)


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


@dataclass(frozen=True)
class RocCurve(JsonFields):
    """ROC points at every distinct score threshold (descending), thinned for plotting."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


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


@dataclass
class ModelMetrics(JsonFields):
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
    options: MetricOptions = DEFAULT_METRIC_OPTIONS,
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
        metrics = classification_metrics(y, s, threshold=dataset.threshold, options=options)
        y_clean, _, clean_excluded = clean_classification(y, s)
        n_pos: int | None = int(np.count_nonzero(y_clean == 1))
        n_neg: int | None = int(y_clean.size - (n_pos or 0))
    else:
        metrics = regression_metrics(y, s, alpha=options.alpha)
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
    options: MetricOptions = DEFAULT_METRIC_OPTIONS,
) -> dict[str, ModelMetrics]:
    """Metrics for every model. ``common`` (default) uses only requests every model answered, so
    the numbers compare like with like; ``own`` uses each model's own ok requests (more data for
    the champion when a challenger is sampled or failing, but not comparable across models)."""
    mask = common_rows(dataset) if rows == "common" else None
    return {
        name: model_metrics(dataset, name, mask, options=options, rows_label=rows)
        for name in dataset.models
    }


__all__ = [
    "ECE_ROW_BOOTSTRAP_MAX_N",
    "PROB_EPS",
    "BinStrategy",
    "CalibrationTable",
    "LossName",
    "MetricOptions",
    "MetricValue",
    "ModelMetrics",
    "RocCurve",
    "accuracy",
    "auroc",
    "brier",
    "calibration_curve",
    "classification_metrics",
    "clean_classification",
    "clean_regression",
    "common_rows",
    "evaluate_models",
    "expected_calibration_error",
    "log_loss",
    "mae",
    "model_metrics",
    "per_request_loss",
    "precision_recall_f1",
    "probability_violations",
    "regression_metrics",
    "rmse",
    "roc_curve",
    "wilson_interval",
]
