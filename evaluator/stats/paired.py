"""Paired tests on per-request outcomes: McNemar (accuracy), paired t and Wilcoxon (losses),
the delta-method RMSE difference, and non-inferiority against a margin."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from evaluator.dataset import Array
from evaluator.stats.common import (
    JsonFields,
    NamedTest,
    finite_pairs,
    norm_ppf,
    norm_sf,
    sorted_midranks,
    t_ppf,
    t_sf,
    two_sided_normal_p,
    z_and_p,
    z_crit,
    z_interval,
)

# ----------------------------------------------------------------------------------------------
# McNemar on paired correctness (accuracy at the threshold)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class McNemarResult(NamedTest):
    """McNemar's test; ``b`` = champion right & challenger wrong, ``c`` = the reverse."""

    b: int
    c: int
    n: int
    method: str  # "exact" (binomial) or "asymptotic" (chi-squared, continuity-corrected)
    statistic: float
    p_value: float
    accuracy_champion: float | None = None
    accuracy_challenger: float | None = None
    difference: float | None = None  # accuracy_challenger - accuracy_champion = (c - b) / n
    se: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    alpha: float
    reason: str | None = None

    TEST = "mcnemar"


def mcnemar_test(
    correct_champion: Array,
    correct_challenger: Array,
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
            b=b,
            c=c,
            n=0,
            method="exact" if use_exact else "asymptotic",
            statistic=statistic,
            p_value=p,
            alpha=alpha,
            reason="no paired requests",
        )
    diff = (c - b) / n
    se = math.sqrt(max(discordant - (c - b) ** 2 / n, 0.0)) / n
    half = z_crit(alpha) * se
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


@dataclass(frozen=True, kw_only=True)
class PairedTestResult(JsonFields):
    """A paired test on per-request losses; ``difference`` = challenger - champion."""

    test: str
    n: int
    n_excluded: int
    mean_champion: float | None = None
    mean_challenger: float | None = None
    difference: float | None = None  # paired t: mean difference; Wilcoxon: median difference
    se: float | None = None
    statistic: float | None = None
    df: float | None = None
    p_value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    alpha: float
    reason: str | None = None


def paired_t_test(
    loss_champion: Array, loss_challenger: Array, alpha: float = 0.05
) -> PairedTestResult:
    """Paired t-test on per-request losses (challenger - champion).

    Why t and not a permutation test: the mean loss difference is exactly what log loss, Brier and
    MAE compare, and with the hundreds-plus labels promotion needs, its CLT is excellent; the
    t-distribution only matters for small pilot windows. Non-finite pairs are excluded, counted.
    """
    c, h, excluded = finite_pairs(loss_champion, loss_challenger)
    n = int(c.size)
    base = PairedTestResult(test="paired_t", n=n, n_excluded=excluded, alpha=alpha)
    if n < 2:
        return dataclasses.replace(base, reason=f"paired t-test needs >= 2 pairs, got {n}")
    d = h - c
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    if se > 0:
        t = mean / se
        p = 2.0 * t_sf(abs(t), df)
    else:
        t, p = z_and_p(mean, 0.0)
    half = t_ppf(1.0 - alpha / 2.0, df) * se
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
    loss_champion: Array, loss_challenger: Array, alpha: float = 0.05
) -> PairedTestResult:
    """Wilcoxon signed-rank test on per-request loss differences (normal approximation).

    Reported next to the t-test as a robustness check: per-request log loss is heavy-tailed (one
    confident mistake costs ~36 nats), and the rank test does not let a handful of those decide.
    It tests a different null (differences symmetric about zero), so it never drives the
    decision. Zero differences are dropped (Wilcoxon's convention, scipy's default), ties get
    midranks with the usual variance correction; no continuity correction. ``difference`` is the
    median paired difference.
    """
    c, h, excluded = finite_pairs(loss_champion, loss_challenger)
    d = h - c
    base = PairedTestResult(test="wilcoxon", n=int(d.size), n_excluded=excluded, alpha=alpha)
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
    ranks_sorted = sorted_midranks(sorted_mag)
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
        p_value=two_sided_normal_p(z),
    )


# ----------------------------------------------------------------------------------------------
# RMSE difference (delta method)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeltaRmseResult(NamedTest):
    """RMSE comparison by the delta method; ``difference = rmse_challenger - rmse_champion``."""

    rmse_champion: float | None = None
    rmse_challenger: float | None = None
    difference: float | None = None
    se: float | None = None
    z: float | None = None
    p_value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int
    n_excluded: int
    alpha: float
    reason: str | None = None

    TEST = "delta_method_rmse"


def rmse_delta_moments(
    sq_champion: Array, sq_challenger: Array
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
    err_champion: Array, err_challenger: Array, alpha: float = 0.05
) -> DeltaRmseResult:
    """z-test and CI for the paired RMSE difference from per-request errors (pred - label).

    The sign of the RMSE difference equals the sign of the MSE difference, so this agrees with a
    paired t-test on squared errors asymptotically, but its CI and margins are in RMSE units,
    which is what people configure.
    """
    ec, eh, excluded = finite_pairs(err_champion, err_challenger)
    n = int(ec.size)
    base = DeltaRmseResult(n=n, n_excluded=excluded, alpha=alpha)
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
    se = math.sqrt(max(var, 0.0))
    return dataclasses.replace(
        base, rmse_champion=ra, rmse_challenger=rb, **z_interval(rb - ra, se, alpha)
    )


# ----------------------------------------------------------------------------------------------
# Non-inferiority
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NonInferiorityResult(JsonFields):
    """One-sided test of H0: improvement <= -margin against H1: improvement > -margin.

    ``improvement`` is positive when the challenger is better (for a loss: champion - challenger).
    """

    margin: float
    improvement: float | None
    se: float | None
    statistic: float | None = None
    df: float | None
    p_value: float | None = None
    # one-sided (1 - alpha) lower confidence bound on the improvement
    lower_bound: float | None = None
    passed: bool | None = None
    alpha: float
    reason: str | None = None


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
            margin=margin,
            improvement=improvement,
            se=se,
            df=df,
            alpha=alpha,
            reason="no estimate of the difference to test",
        )
    if se > 0:
        statistic = (improvement + margin) / se
        p = t_sf(statistic, df) if df is not None else norm_sf(statistic)
    else:
        statistic = math.inf if improvement + margin > 0 else -math.inf
        p = 0.0 if improvement + margin > 0 else 1.0
    crit = t_ppf(1.0 - alpha, df) if df is not None else norm_ppf(1.0 - alpha)
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

