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

Nothing here imports the rest of the evaluator, so the functions can be checked against
independent implementations (sklearn, scipy, statsmodels, an O(n^2) DeLong) on plain arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special
from statsmodels.stats.multitest import multipletests

# ----------------------------------------------------------------------------------------------
# JSON helper (every result here and in the modules above it has a to_dict() built on this)
# ----------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Convert results to plain JSON types: numpy scalars/arrays, tuples, dataclasses, NaN/inf.

    Non-finite floats become ``None`` because strict JSON has no NaN, and a report that silently
    prints ``NaN`` as a number is exactly the kind of mistake this evaluator exists to prevent.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence):
        return [jsonable(v) for v in obj]
    raise TypeError(f"cannot make {type(obj).__name__} JSON-serialisable")


def _dataclass_dict(obj: Any) -> dict[str, Any]:
    return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


# scipy.special directly: the scipy.stats distribution objects cost ~1 ms per call in argument
# checking, which dominates a decision on a few thousand rows (and the simulations run many).


def _norm_sf(x: float) -> float:
    return float(special.ndtr(-x))


def _norm_ppf(q: float) -> float:
    return float(special.ndtri(q))


def _t_sf(x: float, df: float) -> float:
    return float(special.stdtr(df, -x))


def _t_ppf(q: float, df: float) -> float:
    return float(special.stdtrit(df, q))


def _z(alpha: float) -> float:
    """Two-sided normal critical value z_{1-alpha/2}."""
    return _norm_ppf(1.0 - alpha / 2.0)


def _two_sided_normal_p(z: float) -> float:
    return 2.0 * _norm_sf(abs(z))


def _finite_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired inputs differ in length: {a.size} vs {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    excluded = int(a.size - np.count_nonzero(ok))
    if excluded:
        a, b = a[ok], b[ok]
    return a, b, excluded


# ----------------------------------------------------------------------------------------------
# DeLong: AUROC variance and the paired AUROC test (Sun & Xu 2014, O(n log n))
# ----------------------------------------------------------------------------------------------


def _sorted_midranks(values_sorted: np.ndarray) -> np.ndarray:
    """1-based midranks of an ascending array: tied values share the mean of their ranks."""
    n = values_sorted.size
    if n == 0:
        return np.empty(0, dtype=np.float64)
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(values_sorted[1:], values_sorted[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], n)
    # ranks start+1 .. end (1-based) average to (start + 1 + end) / 2
    return np.repeat((starts + ends + 1) / 2.0, ends - starts)


def midranks(x: np.ndarray) -> np.ndarray:
    """Midranks of ``x`` in its own order (equivalent to scipy.stats.rankdata(method='average'))."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = _sorted_midranks(x[order])
    return ranks


def placements_sorted(s_sorted: np.ndarray, pos_sorted: np.ndarray) -> np.ndarray:
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


def placement_values(scores: np.ndarray, positive: np.ndarray, order: np.ndarray) -> np.ndarray:
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
    labels: np.ndarray,
    score_matrix: np.ndarray,
    orders: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(frozen=True)
class DeLongResult:
    """Paired AUROC comparison: ``difference = auc_challenger - auc_champion``."""

    auc_champion: float | None
    auc_challenger: float | None
    difference: float | None
    se: float | None
    z: float | None
    p_value: float | None
    ci_low: float | None
    ci_high: float | None
    correlation: float | None  # correlation of the two AUROC estimates (why pairing pays)
    n_positive: int
    n_negative: int
    n_excluded: int
    alpha: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"test": "delong", **_dataclass_dict(self)}


def delong_test(
    labels: np.ndarray,
    scores_champion: np.ndarray,
    scores_challenger: np.ndarray,
    alpha: float = 0.05,
    orders: Sequence[np.ndarray] | None = None,
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
    empty = DeLongResult(
        None, None, None, None, None, None, None, None, None, n_pos, n_neg, excluded, alpha
    )
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
    aucs: np.ndarray, cov: np.ndarray, n_pos: int, n_neg: int, excluded: int, alpha: float
) -> DeLongResult:
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    var = max(var, 0.0)  # rounding can push an exactly-zero variance a hair below zero
    se = math.sqrt(var)
    denom = math.sqrt(max(cov[0, 0], 0.0) * max(cov[1, 1], 0.0))
    corr = float(cov[0, 1] / denom) if denom > 0 else None
    z, p = _z_and_p(diff, se)
    half = _z(alpha) * se
    return DeLongResult(
        auc_champion=float(aucs[0]),
        auc_challenger=float(aucs[1]),
        difference=diff,
        se=se,
        z=z,
        p_value=p,
        ci_low=diff - half,
        ci_high=diff + half,
        correlation=corr,
        n_positive=n_pos,
        n_negative=n_neg,
        n_excluded=excluded,
        alpha=alpha,
    )


def _z_and_p(estimate: float, se: float) -> tuple[float, float]:
    """z and two-sided p; a zero SE means identical rankings (diff 0 → p=1) or certainty."""
    if se > 0:
        z = estimate / se
        return z, _two_sided_normal_p(z)
    if estimate == 0:
        return 0.0, 1.0
    return math.copysign(math.inf, estimate), 0.0


# ----------------------------------------------------------------------------------------------
# McNemar on paired correctness (accuracy at the threshold)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test; ``b`` = champion right & challenger wrong, ``c`` = the reverse."""

    b: int
    c: int
    n: int
    method: str  # "exact" (binomial) or "asymptotic" (chi-squared, continuity-corrected)
    statistic: float
    p_value: float
    accuracy_champion: float | None
    accuracy_challenger: float | None
    difference: float | None  # accuracy_challenger - accuracy_champion = (c - b) / n
    se: float | None
    ci_low: float | None
    ci_high: float | None
    alpha: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"test": "mcnemar", **_dataclass_dict(self)}


def mcnemar_test(
    correct_champion: np.ndarray,
    correct_challenger: np.ndarray,
    alpha: float = 0.05,
    exact: bool | None = None,
    exact_max_discordant: int = 25,
) -> McNemarResult:
    """McNemar's test of equal accuracy on the same requests.

    Only discordant pairs carry information. With few of them (``b + c <= exact_max_discordant``,
    by default 25, the usual rule of thumb) the chi-squared approximation is poor, so the exact
    binomial test is used (statistic = min(b, c), as statsmodels reports it); above that, the
    continuity-corrected chi-squared statistic (|b - c| - 1)^2 / (b + c). ``exact`` forces one.
    The CI on the accuracy difference is the paired Wald interval.
    """
    a = np.asarray(correct_champion, dtype=bool).ravel()
    h = np.asarray(correct_challenger, dtype=bool).ravel()
    if a.shape != h.shape:
        raise ValueError("paired inputs differ in length")
    n = int(a.size)
    b = int(np.count_nonzero(a & ~h))
    c = int(np.count_nonzero(~a & h))
    discordant = b + c
    use_exact = discordant <= exact_max_discordant if exact is None else exact
    if discordant == 0:
        statistic, p = (0.0, 1.0)
    elif use_exact:
        statistic = float(min(b, c))
        p = float(min(1.0, 2.0 * special.bdtr(min(b, c), discordant, 0.5)))
    else:
        statistic = max(abs(b - c) - 1.0, 0.0) ** 2 / discordant
        p = float(special.chdtrc(1, statistic))
    if n == 0:
        return McNemarResult(
            b,
            c,
            0,
            "exact" if use_exact else "asymptotic",
            statistic,
            p,
            None,
            None,
            None,
            None,
            None,
            None,
            alpha,
            reason="no paired requests",
        )
    diff = (c - b) / n
    se = math.sqrt(max(discordant - (c - b) ** 2 / n, 0.0)) / n
    half = _z(alpha) * se
    return McNemarResult(
        b=b,
        c=c,
        n=n,
        method="exact" if use_exact else "asymptotic",
        statistic=float(statistic),
        p_value=p,
        accuracy_champion=float(np.mean(a)),
        accuracy_challenger=float(np.mean(h)),
        difference=diff,
        se=se,
        ci_low=diff - half,
        ci_high=diff + half,
        alpha=alpha,
    )


# ----------------------------------------------------------------------------------------------
# Paired tests on per-request losses
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedTestResult:
    """A paired test on per-request losses; ``difference`` = challenger - champion."""

    test: str
    n: int
    n_excluded: int
    mean_champion: float | None
    mean_challenger: float | None
    difference: float | None  # paired t: mean difference; Wilcoxon: median difference
    se: float | None
    statistic: float | None
    df: float | None
    p_value: float | None
    ci_low: float | None
    ci_high: float | None
    alpha: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


def paired_t_test(
    loss_champion: np.ndarray, loss_challenger: np.ndarray, alpha: float = 0.05
) -> PairedTestResult:
    """Paired t-test on per-request losses (challenger - champion).

    Why t and not a permutation test: the mean loss difference is exactly what log loss, Brier and
    MAE compare, and with the hundreds-plus labels promotion needs, its CLT is excellent; the
    t-distribution only matters for small pilot windows. Non-finite pairs are excluded, counted.
    """
    c, h, excluded = _finite_pairs(loss_champion, loss_challenger)
    n = int(c.size)
    base = PairedTestResult(
        "paired_t", n, excluded, None, None, None, None, None, None, None, None, None, alpha
    )
    if n < 2:
        return dataclasses.replace(base, reason=f"paired t-test needs >= 2 pairs, got {n}")
    d = h - c
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    if se > 0:
        t = mean / se
        p = 2.0 * _t_sf(abs(t), df)
    else:
        t, p = _z_and_p(mean, 0.0)
    half = _t_ppf(1.0 - alpha / 2.0, df) * se
    return dataclasses.replace(
        base,
        mean_champion=float(c.mean()),
        mean_challenger=float(h.mean()),
        difference=mean,
        se=se,
        statistic=float(t),
        df=float(df),
        p_value=p,
        ci_low=mean - half,
        ci_high=mean + half,
    )


def wilcoxon_signed_rank(
    loss_champion: np.ndarray, loss_challenger: np.ndarray, alpha: float = 0.05
) -> PairedTestResult:
    """Wilcoxon signed-rank test on per-request loss differences (normal approximation).

    Reported next to the t-test as a robustness check: per-request log loss is heavy-tailed (one
    confident mistake costs ~36 nats), and the rank test does not let a handful of those decide.
    It tests a different null (differences symmetric about zero), so it never drives the
    decision. Zero differences are dropped (Wilcoxon's convention, scipy's default), ties get
    midranks with the usual variance correction; no continuity correction. ``difference`` is the
    median paired difference.
    """
    c, h, excluded = _finite_pairs(loss_champion, loss_challenger)
    d = h - c
    base = PairedTestResult(
        "wilcoxon",
        int(d.size),
        excluded,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        alpha,
    )
    nonzero = d[d != 0]
    n = int(nonzero.size)
    if d.size == 0:
        return dataclasses.replace(base, reason="no paired requests")
    median = float(np.median(d))
    if n == 0:
        return dataclasses.replace(
            base,
            mean_champion=float(c.mean()),
            mean_challenger=float(h.mean()),
            difference=median,
            statistic=0.0,
            p_value=1.0,
            reason="all paired differences are zero",
        )
    magnitude = np.abs(nonzero)
    order = np.argsort(magnitude)
    sorted_mag = magnitude[order]
    ranks_sorted = _sorted_midranks(sorted_mag)
    r_plus = float(ranks_sorted[nonzero[order] > 0].sum())
    r_minus = n * (n + 1) / 2.0 - r_plus
    mean_w = n * (n + 1) / 4.0
    run_starts = np.flatnonzero(np.r_[True, sorted_mag[1:] != sorted_mag[:-1]])
    tie_counts = np.diff(np.append(run_starts, n)).astype(np.float64)
    tie_term = float(np.sum(tie_counts**3 - tie_counts)) / 48.0
    var_w = n * (n + 1) * (2 * n + 1) / 24.0 - tie_term
    z = (r_plus - mean_w) / math.sqrt(var_w) if var_w > 0 else 0.0
    return dataclasses.replace(
        base,
        mean_champion=float(c.mean()),
        mean_challenger=float(h.mean()),
        difference=median,
        statistic=min(r_plus, r_minus),
        p_value=_two_sided_normal_p(z),
    )


# ----------------------------------------------------------------------------------------------
# RMSE difference (delta method)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaRmseResult:
    """RMSE comparison by the delta method; ``difference = rmse_challenger - rmse_champion``."""

    rmse_champion: float | None
    rmse_challenger: float | None
    difference: float | None
    se: float | None
    z: float | None
    p_value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    n_excluded: int
    alpha: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"test": "delta_method_rmse", **_dataclass_dict(self)}


def rmse_delta_moments(
    sq_champion: np.ndarray, sq_challenger: np.ndarray
) -> tuple[float, float, float]:
    """(rmse_champion, rmse_challenger, var of their difference) from squared errors.

    RMSE = sqrt(mean(e^2)); its gradient is 1 / (2 RMSE), so the difference's variance is
    g' Sigma g / n with Sigma the sample covariance of the paired squared errors. The paired
    covariance term is where shadow pairing shrinks the variance.
    """
    a = sq_champion
    b = sq_challenger
    n = a.size
    ma, mb = float(a.mean()), float(b.mean())
    ra, rb = math.sqrt(ma), math.sqrt(mb)
    cov = np.cov(np.vstack([a, b]), ddof=1)
    if ra == 0 or rb == 0:
        return ra, rb, math.nan
    g = np.array([-1.0 / (2.0 * ra), 1.0 / (2.0 * rb)])
    return ra, rb, float(g @ cov @ g) / n


def rmse_difference_test(
    err_champion: np.ndarray, err_challenger: np.ndarray, alpha: float = 0.05
) -> DeltaRmseResult:
    """z-test and CI for the paired RMSE difference from per-request errors (pred - label).

    The sign of the RMSE difference equals the sign of the MSE difference, so this agrees with a
    paired t-test on squared errors asymptotically, but its CI and margins are in RMSE units,
    which is what people configure.
    """
    ec, eh, excluded = _finite_pairs(err_champion, err_challenger)
    n = int(ec.size)
    base = DeltaRmseResult(None, None, None, None, None, None, None, None, n, excluded, alpha)
    if n < 2:
        return dataclasses.replace(base, reason=f"RMSE comparison needs >= 2 pairs, got {n}")
    ra, rb, var = rmse_delta_moments(ec**2, eh**2)
    if not math.isfinite(var):
        return dataclasses.replace(
            base,
            rmse_champion=ra,
            rmse_challenger=rb,
            difference=rb - ra,
            reason="a model has zero error on every request: delta-method variance undefined",
        )
    diff = rb - ra
    se = math.sqrt(max(var, 0.0))
    z, p = _z_and_p(diff, se)
    half = _z(alpha) * se
    return DeltaRmseResult(ra, rb, diff, se, z, p, diff - half, diff + half, n, excluded, alpha)


# ----------------------------------------------------------------------------------------------
# Non-inferiority
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonInferiorityResult:
    """One-sided test of H0: improvement <= -margin against H1: improvement > -margin.

    ``improvement`` is positive when the challenger is better (for a loss: champion - challenger).
    """

    margin: float
    improvement: float | None
    se: float | None
    statistic: float | None
    df: float | None
    p_value: float | None
    lower_bound: float | None  # one-sided (1 - alpha) lower confidence bound on the improvement
    passed: bool | None
    alpha: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


def non_inferiority_test(
    improvement: float | None,
    se: float | None,
    margin: float,
    alpha: float = 0.05,
    df: float | None = None,
) -> NonInferiorityResult:
    """Is the challenger no worse than the champion by more than ``margin`` (metric units)?

    One-sided at level alpha on the paired difference: the challenger passes when the lower
    (1 - alpha) confidence bound of its improvement is above -margin. With ``df`` the t
    distribution is used (as statsmodels' ``ttost_paired`` does for the lower of its two tests),
    otherwise the normal.
    """
    if margin < 0:
        raise ValueError("non-inferiority margin must be >= 0")
    if improvement is None or se is None or not math.isfinite(improvement) or se < 0:
        return NonInferiorityResult(
            margin,
            improvement,
            se,
            None,
            df,
            None,
            None,
            None,
            alpha,
            reason="no estimate of the difference to test",
        )
    if se > 0:
        statistic = (improvement + margin) / se
        p = _t_sf(statistic, df) if df is not None else _norm_sf(statistic)
    else:
        statistic = math.inf if improvement + margin > 0 else -math.inf
        p = 0.0 if improvement + margin > 0 else 1.0
    crit = _t_ppf(1.0 - alpha, df) if df is not None else _norm_ppf(1.0 - alpha)
    lower = improvement - crit * se
    return NonInferiorityResult(
        margin=margin,
        improvement=improvement,
        se=se,
        statistic=float(statistic),
        df=df,
        p_value=p,
        lower_bound=lower,
        passed=bool(p < alpha),
        alpha=alpha,
    )


# ----------------------------------------------------------------------------------------------
# Multiple challengers
# ----------------------------------------------------------------------------------------------


def adjust_pvalues(
    p_values: Sequence[float | None], alpha: float = 0.05, method: str = "holm"
) -> tuple[list[float | None], list[bool]]:
    """Family-wise correction across challengers (statsmodels ``multipletests``).

    Why: with k challengers each tested at alpha, the chance that *some* useless challenger gets
    promoted is up to k * alpha. Holm controls that family-wise rate and is uniformly more
    powerful than Bonferroni. ``fdr_bh`` (Benjamini-Hochberg) is available for teams that run
    many challengers and accept a controlled false-discovery rate instead. A missing p-value
    (test undefined) counts as 1 so it still occupies its place in the family — dropping it
    would quietly make the correction less strict.
    """
    if method not in {"holm", "bonferroni", "fdr_bh", "none"}:
        raise ValueError(f"unknown correction {method!r}")
    if not p_values:
        return [], []
    missing = [p is None or not math.isfinite(p) for p in p_values]
    raw = np.array([1.0 if m else float(p) for p, m in zip(p_values, missing, strict=True)])
    raw = np.clip(raw, 0.0, 1.0)
    if method == "none" or raw.size == 1:  # one test: every method leaves p unchanged
        adjusted = raw
    else:
        _, adjusted, _, _ = multipletests(raw, alpha=alpha, method=method)
    out: list[float | None] = [
        None if m else float(p) for p, m in zip(adjusted, missing, strict=True)
    ]
    reject = [(p is not None and p <= alpha) for p in out]
    return out, reject


def corrected_levels(
    p_values: Sequence[float | None], alpha: float = 0.05, method: str = "holm"
) -> list[float]:
    """The level each test of a family is held to, for confidence sets that carry a direction.

    Why: a confidence sequence at level alpha_j excludes zero exactly when the matching
    always-valid p-value is <= alpha_j, so giving each challenger's CS the level at which the
    correction would reject it reproduces the correction's rejections and adds the sign.
    ``holm``: the j-th smallest p (1-based) gets alpha / (k - j + 1) while every smaller one is
    rejected; from the first non-rejection on, alpha / k (Bonferroni: simultaneous coverage for
    the undecided). ``bonferroni``: alpha / k. ``fdr_bh``: the r hypotheses Benjamini-Hochberg
    rejects get r * alpha / k, the rest alpha / k. ``none``: alpha. Missing p-values count as 1.
    """
    if method not in {"holm", "bonferroni", "fdr_bh", "none"}:
        raise ValueError(f"unknown correction {method!r}")
    k = len(p_values)
    if k == 0:
        return []
    if method == "none" or k == 1:
        return [alpha] * k
    raw = np.array([1.0 if p is None or not math.isfinite(p) else float(p) for p in p_values])
    levels = np.full(k, alpha / k)
    order = np.argsort(raw, kind="stable")
    if method == "holm":
        for j, i in enumerate(order):
            level = alpha / (k - j)
            if raw[i] > level:
                break
            levels[i] = level
    elif method == "fdr_bh":
        passing = np.nonzero(raw[order] <= alpha * np.arange(1, k + 1) / k)[0]
        if passing.size:
            r = int(passing[-1]) + 1
            levels[order[:r]] = r * alpha / k
    return [float(x) for x in levels]


# ----------------------------------------------------------------------------------------------
# Power analysis
# ----------------------------------------------------------------------------------------------


def power_normal(se: float, effect: float, alpha: float = 0.05) -> float:
    """Power of a two-sided z-test at level alpha when the true difference is ``effect``."""
    if se <= 0:
        return 1.0 if effect != 0 else alpha
    z = _z(alpha)
    shift = abs(effect) / se
    return _norm_sf(z - shift) + _norm_sf(z + shift)


def sample_size_normal(
    se_pilot: float, n_pilot: int, mde: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Labelled requests for ``power`` to detect ``mde`` with a z-test whose SE scales 1/sqrt(n).

    Used for the DeLong AUROC difference, the RMSE delta method and the paired accuracy
    difference: the pilot window's SE is turned into a per-request standard deviation
    sigma = se * sqrt(n_pilot) (for AUROC this assumes the class balance stays as in the pilot),
    and n = ((z_{1-alpha/2} + z_power) * sigma / mde)^2, the standard formula that ignores the
    negligible far tail.
    """
    if mde <= 0:
        raise ValueError("minimum detectable effect must be > 0")
    sigma = se_pilot * math.sqrt(n_pilot)
    if not math.isfinite(sigma):
        raise ValueError("pilot standard error must be finite")
    z = _z(alpha) + _norm_ppf(power)
    return max(2, math.ceil((z * sigma / mde) ** 2))


def _t_power(n: int, effect_size: float, alpha: float) -> float:
    df = n - 1
    crit = _t_ppf(1.0 - alpha / 2.0, df)
    nc = effect_size * math.sqrt(n)
    return float(1.0 - special.nctdtr(df, nc, crit) + special.nctdtr(df, nc, -crit))


def sample_size_paired_t(
    sd_diff: float, mde: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Pairs needed for a two-sided paired t-test to reach ``power`` at a mean difference ``mde``.

    ``sd_diff`` is the pilot standard deviation of the per-request loss differences: pairing
    enters through it (sd_diff^2 = var_c + var_h - 2 cov), which is why shadow comparisons need
    far fewer labels than an A/B split. Exact noncentral-t power, searched upward from the normal
    approximation (matches statsmodels' ``TTestPower().solve_power`` rounded up).
    """
    if mde <= 0:
        raise ValueError("minimum detectable effect must be > 0")
    if sd_diff <= 0:
        return 2
    d = mde / sd_diff
    z = _z(alpha) + _norm_ppf(power)
    # Guenther's correction (+ z_{1-alpha/2}^2 / 2) puts the start within a step of the answer.
    n = max(2, math.floor((z / d) ** 2 + _z(alpha) ** 2 / 2))
    if n > 10_000_000:  # the t correction is irrelevant there; avoid a long search
        return math.ceil((z / d) ** 2)
    while _t_power(n, d, alpha) < power:
        n += 1
    while n > 2 and _t_power(n - 1, d, alpha) >= power:
        n -= 1
    return n


@dataclass(frozen=True)
class PowerResult:
    """How many labelled requests a fixed-horizon test needs to detect the configured effect."""

    method: str
    mde: float
    alpha: float  # the per-test level used (alpha / number of challengers under a correction)
    power: float
    current_n: int
    required_n: int | None
    achieved_power: float | None  # power at the current n for an effect of size mde
    sd_per_request: float | None  # pilot per-request standard deviation behind the estimate
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)
