"""Classification metrics with confidence intervals: AUROC, log loss, Brier, accuracy, precision,
recall, F1, and all of them (with ECE) for one model."""

from __future__ import annotations

import math

import numpy as np

from evaluator.dataset import Array
from evaluator.stats.calibration import _ece
from evaluator.stats.metric_core import (
    DEFAULT_METRIC_OPTIONS,
    LossName,
    MetricOptions,
    MetricValue,
    _mean_metric,
    _probability_guard,
    _proportion_metric,
    _zcrit,
    clean_classification,
    per_request_loss,
)
from evaluator.stats.significance import delong_covariance, midranks


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


def auroc(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """AUROC (higher score = positive; never flipped) with a DeLong Wald CI."""
    y, s, excluded = clean_classification(labels, scores)
    return _auroc(y, s, alpha, excluded)


def _probability_loss(
    name: LossName, y: Array, s: Array, alpha: float, excluded: dict[str, int]
) -> MetricValue:
    """Mean per-request loss of probabilities (missing, with a reason, for scores outside
    [0, 1])."""
    guard = _probability_guard(name, s, int(y.size), excluded)
    if guard is not None:
        return guard
    return _mean_metric(name, per_request_loss(name, y, s), alpha, excluded)


def log_loss(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """Mean binary cross-entropy (nats) with probabilities clipped to [eps, 1 - eps]."""
    y, s, excluded = clean_classification(labels, scores)
    return _probability_loss("log_loss", y, s, alpha, excluded)


def brier(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> MetricValue:
    """Brier score: mean squared difference between the probability and the 0/1 outcome."""
    y, s, excluded = clean_classification(labels, scores)
    return _probability_loss("brier", y, s, alpha, excluded)


def _accuracy(
    y: Array, s: Array, threshold: float, alpha: float, excluded: dict[str, int]
) -> MetricValue:
    correct = int(np.count_nonzero((s >= threshold) == (y == 1)))
    return _proportion_metric(
        "accuracy", correct, int(y.size), alpha, excluded, "no labelled requests"
    )


def accuracy(
    labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5, alpha: float = 0.05
) -> MetricValue:
    """Share of requests where (score >= threshold) matches the label; Wilson CI."""
    y, s, excluded = clean_classification(labels, scores)
    return _accuracy(y, s, threshold, alpha, excluded)


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


def classification_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float = 0.5,
    options: MetricOptions = DEFAULT_METRIC_OPTIONS,
) -> dict[str, MetricValue]:
    """Every classifier metric on one model's scores (rows cleaned once, exclusions shared)."""
    y, s, excluded = clean_classification(labels, scores)
    alpha, n_boot, seed = options.alpha, options.n_boot, options.seed
    return {
        "auroc": _auroc(y, s, alpha, excluded),
        "log_loss": _probability_loss("log_loss", y, s, alpha, excluded),
        "brier": _probability_loss("brier", y, s, alpha, excluded),
        "accuracy": _accuracy(y, s, threshold, alpha, excluded),
        **_precision_recall_f1(y, s, threshold, alpha, n_boot, seed, excluded),
        "ece": _ece(y, s, options.ece_bins, options.ece_strategy, alpha, n_boot, seed, excluded),
    }
