"""DeLong: AUROC variance and the paired AUROC test (Sun & Xu 2014, O(n log n))."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evaluator.dataset import Array
from evaluator.stats.common import NamedTest, z_interval


def placements_sorted(s_sorted: Array, pos_sorted: Array) -> Array:
    """Placement values of already-sorted scores (``pos_sorted``: is each one a positive)."""
    k = s_sorted.size
    n_pos = int(np.count_nonzero(pos_sorted))
    n_neg = k - n_pos
    neg_before = np.zeros(k + 1)
    np.cumsum(~pos_sorted, out=neg_before[1:])
    new_run = np.empty(k, dtype=bool)
    new_run[:1] = True
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=new_run[1:])
    if new_run.all():  # no ties: the common case for continuous scores
        negs = neg_before[:-1]
        poss = np.arange(k, dtype=np.float64) - negs
    else:
        starts = np.flatnonzero(new_run)
        ends = np.append(starts[1:], k)
        lengths = ends - starts
        neg_b = neg_before[starts]
        neg_in = neg_before[ends] - neg_b
        pos_b = starts - neg_b
        pos_in = lengths - neg_in
        negs = np.repeat(neg_b + neg_in / 2.0, lengths)
        poss = np.repeat(pos_b + pos_in / 2.0, lengths)
    return np.where(pos_sorted, negs / max(n_neg, 1), 1.0 - poss / max(n_pos, 1))


def placement_values(scores: Array, positive: Array, order: Array) -> Array:
    """DeLong's structural components ("placement values") of every row, in row order.

    For a positive: the fraction of negatives scored below it (ties count half) — V10 in
    DeLong's notation; for a negative: the fraction of positives scored above it — V01. The AUROC
    is the mean of either set, and its variance comes from their spreads. Sun & Xu (2014) get
    them from midranks over all rows minus midranks within each class; the same thing is
    computed here from one sort (``order`` = argsort of ``scores``) and running class counts:
    within a run of tied scores every positive gets (negatives before the run + half the
    negatives in the run) / n_neg. One O(n log n) sort, everything else O(n), and a caller that
    evaluates prefixes of the same data (the sequential test) can reuse the sort.
    """
    out = np.empty(scores.size, dtype=np.float64)
    out[order] = placements_sorted(scores[order], positive[order])
    return out


def delong_covariance(
    labels: Array,
    score_matrix: Array,
    orders: Sequence[Array] | None = None,
) -> tuple[Array, Array]:
    """AUROCs of k models on the same rows and their DeLong covariance matrix.

    ``score_matrix`` is (k, n); higher score = positive class (never flipped: a model whose AUROC
    is below 0.5 is a bad model, and reporting 1 - AUROC would hide it). ``orders`` lets a caller
    that already sorted the scores (the sequential test, once per model for all looks) skip the
    sort. Needs at least two positives and two negatives (the variance divides by n - 1).
    """
    y = np.asarray(labels)
    positive = y == 1
    scores = np.atleast_2d(np.asarray(score_matrix, dtype=np.float64))
    k, n = scores.shape
    n_pos = int(np.count_nonzero(positive))
    n_neg = n - n_pos
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"DeLong needs >= 2 positives and >= 2 negatives, got {n_pos}/{n_neg}")
    v10 = np.empty((k, n_pos))
    v01 = np.empty((k, n_neg))
    for i in range(k):
        order = orders[i] if orders is not None else np.argsort(scores[i])
        placed = placement_values(scores[i], positive, order)
        v10[i] = placed[positive]
        v01[i] = placed[~positive]
    aucs = v10.mean(axis=1)
    c10 = v10 - aucs[:, None]
    c01 = v01 - v01.mean(axis=1)[:, None]
    s10 = (c10 @ c10.T) / (n_pos - 1)
    s01 = (c01 @ c01.T) / (n_neg - 1)
    return aucs, s10 / n_pos + s01 / n_neg


@dataclass(frozen=True, kw_only=True)
class DeLongResult(NamedTest):
    """Paired AUROC comparison: ``difference = auc_challenger - auc_champion``."""

    auc_champion: float | None = None
    auc_challenger: float | None = None
    difference: float | None = None
    se: float | None = None
    z: float | None = None
    p_value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    correlation: float | None = None  # correlation of the two AUROC estimates (why pairing pays)
    n_positive: int
    n_negative: int
    n_excluded: int
    alpha: float
    reason: str | None = None

    TEST = "delong"


def delong_test(
    labels: Array,
    scores_champion: Array,
    scores_challenger: Array,
    alpha: float = 0.05,
    orders: Sequence[Array] | None = None,
) -> DeLongResult:
    """DeLong et al. (1988) z-test for two correlated AUROCs, computed the Sun & Xu (2014) way.

    Rows with a non-finite score or label are excluded and counted. An undefined AUROC (one class
    only, or fewer than two of a class) returns a result with ``reason`` set instead of raising,
    because a single-class window is a normal state of a young deployment, not a bug.
    ``orders`` (argsorts of the two score arrays) lets a caller share its sorts.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    s1 = np.asarray(scores_champion, dtype=np.float64).ravel()
    s2 = np.asarray(scores_challenger, dtype=np.float64).ravel()
    if not y.size == s1.size == s2.size:
        raise ValueError("labels and scores differ in length")
    ok = np.isfinite(s1) & np.isfinite(s2) & ((y == 0) | (y == 1))
    excluded = int(y.size - np.count_nonzero(ok))
    if excluded:
        y, s1, s2 = y[ok], s1[ok], s2[ok]
        orders = None  # they index the unfiltered rows
    n_pos = int(np.count_nonzero(y == 1))
    n_neg = int(y.size - n_pos)
    empty = DeLongResult(n_positive=n_pos, n_negative=n_neg, n_excluded=excluded, alpha=alpha)
    if n_pos < 2 or n_neg < 2:
        return dataclasses.replace(empty, reason=_auroc_undefined_reason(n_pos, n_neg))
    aucs, cov = delong_covariance(y, np.vstack([s1, s2]), orders)
    return _delong_from_cov(aucs, cov, n_pos, n_neg, excluded, alpha)


def _auroc_undefined_reason(n_pos: int, n_neg: int) -> str:
    if n_pos + n_neg == 0:
        return "AUROC undefined: no labelled requests with finite scores"
    if n_pos == 0 or n_neg == 0:
        only = "negative (0)" if n_pos == 0 else "positive (1)"
        return f"AUROC undefined: all {n_pos + n_neg} labels are {only}; need both classes"
    return (
        f"AUROC variance undefined: {n_pos} positives and {n_neg} negatives; "
        "need at least 2 of each"
    )


def _delong_from_cov(
    aucs: Array, cov: Array, n_pos: int, n_neg: int, excluded: int, alpha: float
) -> DeLongResult:
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    var = max(var, 0.0)  # rounding can push an exactly-zero variance a hair below zero
    se = math.sqrt(var)
    denom = math.sqrt(max(cov[0, 0], 0.0) * max(cov[1, 1], 0.0))
    corr = float(cov[0, 1] / denom) if denom > 0 else None
    return DeLongResult(
        auc_champion=float(aucs[0]),
        auc_challenger=float(aucs[1]),
        **z_interval(diff, se, alpha),
        correlation=corr,
        n_positive=n_pos,
        n_negative=n_neg,
        n_excluded=excluded,
        alpha=alpha,
    )
