"""Per-model summaries and the distribution-free bounds the guardrails judge: p99 order
statistics (ranks from the binomial), the variance inflation of a p99 whose slow calls cluster
in time (batch means of its exceedances), outcome counts, Wilson and Newcombe intervals for error
rates. The report shows the same summaries for every model.

Definitions (and why) are in evaluator/gates/guardrails.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from evaluator.dataset import F64, STATUS_CODES, Array, Bool, ModelColumn
from evaluator.stats.common import JsonFields
from evaluator.stats.metrics import wilson_interval

P99 = 0.99
# The rank interval whose width estimates a p99's standard error (independent of the test's
# alpha: it measures spread, it is not the test). 97.5% one-sided on each side needs n >= 368.
_SPREAD_TAIL = 0.025
# Contiguous time blocks for the batch-means variance inflation of a p99 (guardrails.py says why
# 25: blocks long enough to hold a burst of slow calls, enough of them for a usable estimate).
TIME_BLOCKS = 25
# A second, coarser look used only to call a tail too thin to judge: an episode of slow calls
# longer than a block (a stall spread over a lagging lane's backlog) is only partly seen at 25.
COARSE_BLOCKS = 10
# Confidence that the clustering is real before a p99 is called too thin to judge.
_CLUSTER_CONFIDENCE = 0.95

_ATTEMPTED = (STATUS_CODES["ok"], STATUS_CODES["error"], STATUS_CODES["timeout"])


@dataclass(frozen=True)
class LatencySummary(JsonFields):
    n: int
    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    p99_ci_low_ms: float | None  # exact order-statistic interval (None: no order statistic
    p99_ci_high_ms: float | None  # is far enough out for this n)


@dataclass(frozen=True)
class OutcomeSummary(JsonFields):
    total: int
    attempted: int
    ok: int
    error: int
    timeout: int
    shed: int
    skipped: int
    error_rate: float | None  # (error + timeout) / attempted
    error_rate_ci_low: float | None  # Wilson interval
    error_rate_ci_high: float | None


# ----------------------------------------------------------------------------------------------
# Quantile bounds
# ----------------------------------------------------------------------------------------------


def _bdtr(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), with the ends pinned (scipy.special: no argument-checking cost)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(special.bdtr(k, n, p))


def quantile_ranks(n: int, p: float, tail: float) -> tuple[int | None, int | None]:
    """1-based ranks (r, s) of the exact one-sided (1 - tail) bounds for the p-quantile.

    With B ~ Binomial(n, p) the number of observations at or below the quantile,
    P(X_(r) <= q_p) >= P(B >= r) and P(X_(s) >= q_p) >= P(B <= s - 1) for any distribution
    (equality when continuous). r is the largest rank with P(B <= r - 1) <= tail, s the smallest
    with P(B <= s - 1) >= 1 - tail; None when no order statistic qualifies (n too small).
    """
    if n <= 0:
        return None, None
    sd = math.sqrt(n * p * (1 - p))
    z = float(special.ndtri(1 - tail))
    k = min(n, max(-1, math.floor(n * p - z * sd)))  # normal-approximation start, then exact
    while k >= 0 and _bdtr(k, n, p) > tail:
        k -= 1
    while k + 1 < n and _bdtr(k + 1, n, p) <= tail:
        k += 1
    lower = k + 1 if k >= 0 else None
    k = min(n, max(0, math.ceil(n * p + z * sd)))
    while k > 0 and _bdtr(k - 1, n, p) >= 1 - tail:
        k -= 1
    while k < n and _bdtr(k, n, p) < 1 - tail:
        k += 1
    upper = k + 1 if k + 1 <= n else None
    return lower, upper


@dataclass(frozen=True)
class QuantileEstimate:
    """A sample p99 with its distribution-free spread (see the module docstring), widened by
    ``sqrt(vif)`` when its slow calls cluster in time."""

    n: int
    value: float
    se_ms: float | None  # None: n too small for the spread interval
    se_log: float | None  # None also when a bound is not positive
    vif: float = 1.0  # variance inflation from time-clustering (1: as if independent)
    df: float = math.inf  # degrees of freedom of the variance estimate (inf: not estimated)
    vif_coarse: float = 1.0  # the same over COARSE_BLOCKS blocks (only for ``thin``)
    df_coarse: float = math.inf

    @property
    def n_effective(self) -> float:
        """The number of independent observations with the same p99 variance: n / vif."""
        return self.n / self.vif

    @property
    def clustered(self) -> bool:
        """Whether the clustering is beyond chance: the batch-means variance has ``df`` degrees
        of freedom (chi-squared), so under independence vif exceeds chi2_{0.95}(df) / df only 5%
        of the time. A chance pair of tail values in one block, which the point estimate reads
        as clustering when a p99 rests on a handful of them, does not reach it."""
        return _beyond_chance(self.vif, self.df)

    def thin(self, need: int) -> float | None:
        """The effective sample size that makes this p99 too thin to judge: n / vif at the first
        time scale (25 blocks, then 10) whose clustering is beyond chance and leaves fewer than
        ``need`` effective observations; None when neither does."""
        for vif, df in ((self.vif, self.df), (self.vif_coarse, self.df_coarse)):
            if _beyond_chance(vif, df) and self.n / vif < need:
                return self.n / vif
        return None


def _beyond_chance(vif: float, df: float) -> bool:
    """A batch-means vif with ``df`` degrees of freedom above the 95% point of its distribution
    for independent data (chi-squared(df) / df)."""
    if math.isinf(df):
        return False
    return vif * df > float(special.chdtri(df, 1 - _CLUSTER_CONFIDENCE))


def min_latency_samples() -> int:
    """Smallest n whose order statistics bracket a p99 at 97.5% on both sides (368)."""
    return math.ceil(math.log(_SPREAD_TAIL) / math.log(P99))


def tail_vif(x_in_time_order: Array, q: float, blocks: int = TIME_BLOCKS) -> float:
    """How much time-clustering inflates the variance of the count of observations above ``q``.

    A sample quantile's variance is that of the count of exceedances (Bahadur: q_hat - q is
    about (p - F_n(q)) / f(q)), which is binomial for independent observations and larger when
    slow calls come in bursts. The ratio is estimated by non-overlapping batch means: the
    exceedance indicator split into ``blocks`` contiguous runs (sizes m_j differing by at most
    one), VIF = sum_j (S_j - m_j p)^2 / m_j / ((blocks - 1) p (1 - p)) with S_j a block's count
    and p the overall share — the between-block sum of squares of a one-way layout, whose
    expectation is (blocks - 1) p (1 - p) for independent data. Floored at 1: never narrower
    than the independent-observations interval. 1 when there is nothing to estimate from.
    """
    x = np.asarray(x_in_time_order, dtype=np.float64)
    b = min(blocks, int(x.size))
    if b < 2:
        return 1.0
    above = (x > q).astype(np.float64)
    p = float(above.mean())
    if not 0.0 < p < 1.0:
        return 1.0
    starts = (np.arange(b) * x.size) // b
    counts = np.add.reduceat(above, starts)
    sizes = np.diff(np.append(starts, x.size))
    between = float(np.sum((counts - sizes * p) ** 2 / sizes))
    return max(1.0, between / ((b - 1) * p * (1 - p)))


def p99_estimate(x_sorted: Array, x_in_time_order: Array | None = None,
                 blocks: int = TIME_BLOCKS) -> QuantileEstimate:
    """p99 of sorted latencies and its standard error from the order-statistic interval width.

    The interval [X_(r), X_(s)] (97.5% one-sided each side) has exact coverage c; dividing its
    width by 2 z_{(1+c)/2} gives the standard error a normal interval of that coverage would have.
    With the same latencies in time order, that standard error is widened by sqrt(tail_vif) (the
    variance estimate then has ``blocks - 1`` degrees of freedom), and the coarser estimate over
    COARSE_BLOCKS is kept for ``thin``; without them, or with ``blocks`` 0, the observations are
    taken as independent.
    """
    n = int(x_sorted.size)
    value = float(np.quantile(x_sorted, P99))
    vif, df, vif_c, df_c = 1.0, math.inf, 1.0, math.inf
    if x_in_time_order is not None and blocks >= 2:
        vif = tail_vif(x_in_time_order, value, blocks)
        df = math.inf if vif == 1.0 else float(min(blocks, n) - 1)
        coarse = min(blocks, COARSE_BLOCKS)
        vif_c = tail_vif(x_in_time_order, value, coarse)
        df_c = math.inf if vif_c == 1.0 else float(min(coarse, n) - 1)
    r, s = quantile_ranks(n, P99, _SPREAD_TAIL)
    if r is None or s is None:
        return QuantileEstimate(n, value, None, None, vif, df, vif_c, df_c)
    coverage = _bdtr(s - 1, n, P99) - _bdtr(r - 1, n, P99)
    z = float(special.ndtri(0.5 + coverage / 2))
    lo, hi = float(x_sorted[r - 1]), float(x_sorted[s - 1])
    widen = math.sqrt(vif) / (2 * z)
    se_log = (math.log(hi) - math.log(lo)) * widen if lo > 0 and value > 0 else None
    return QuantileEstimate(n, value, (hi - lo) * widen, se_log, vif, df, vif_c, df_c)


def p99_bounds(q: QuantileEstimate, x_sorted: Array, tail: float) -> tuple[float, float]:
    """One-sided (1 - tail) order-statistic bounds for a p99, each end -inf / inf when no order
    statistic qualifies.

    Independent observations (vif 1): the exact ranks of ``quantile_ranks``. Clustered ones: the
    count below the p99 has vif times the binomial variance, which Binomial(n / vif, p) scaled by
    vif matches in mean and variance, so the ranks are those of the effective sample carried
    back to the same fraction of the full one (rounded outwards), at the tail of Student's t with
    the estimate's degrees of freedom (the variance was estimated, not known).
    """
    n = q.n
    if q.vif == 1.0:
        r, s = quantile_ranks(n, P99, tail)
    else:
        n_e = max(1, math.floor(n / q.vif))
        t_tail = float(special.ndtr(-special.stdtrit(q.df, 1 - tail)))
        r_e, s_e = quantile_ranks(n_e, P99, t_tail)
        r = 1 + math.floor((r_e - 1) * n / n_e) if r_e is not None else None
        s = 1 + math.ceil((s_e - 1) * n / n_e) if s_e is not None else None
        s = s if s is not None and s <= n else None
    lo = float(x_sorted[r - 1]) if r is not None else -math.inf
    hi = float(x_sorted[s - 1]) if s is not None else math.inf
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Summaries (also used by the report for every model)
# ----------------------------------------------------------------------------------------------


def outcome_summary(status: Array, alpha: float = 0.05) -> OutcomeSummary:
    """Counts per outcome and the error/timeout rate over attempted requests (Wilson CI)."""
    st = np.asarray(status)
    counts = {name: int(np.count_nonzero(st == code)) for name, code in STATUS_CODES.items()}
    attempted = counts["ok"] + counts["error"] + counts["timeout"]
    failures = counts["error"] + counts["timeout"]
    rate = lo = hi = None
    if attempted:
        rate = failures / attempted
        lo, hi = wilson_interval(failures, attempted, alpha)
    return OutcomeSummary(
        int(st.size),
        attempted,
        counts["ok"],
        counts["error"],
        counts["timeout"],
        counts["shed"],
        counts["skipped"],
        rate,
        lo,
        hi,
    )


def measured_latencies(latency_ms: Array, status: Array) -> Array:
    """Sorted latencies of attempted requests that carry one (batched copies have NaN)."""
    return np.sort(measured_in_time_order(latency_ms, status))


def measured_in_time_order(latency_ms: Array, status: Array, ts: Array | None = None) -> Array:
    """The measured latencies (as ``measured_latencies``) in the order the requests were made:
    by ``ts`` (stable, unknown times last), or in row order when no times are given."""
    lat: F64 = np.asarray(latency_ms, dtype=np.float64)
    keep = attempted_mask(status) & np.isfinite(lat)
    measured: F64 = lat[keep]
    if ts is None:
        return measured
    t = np.where(np.isfinite(ts), ts, np.inf)[keep]
    if bool(np.all(t[1:] >= t[:-1])):  # the store's rows already are (no sort on 10M rows)
        return measured
    ordered: F64 = measured[np.argsort(t, kind="stable")]
    return ordered


def latency_summary(
    latency_ms: Array, status: Array, alpha: float = 0.05
) -> LatencySummary:
    """Latency over measured requests; p99 with its exact two-sided 1 - alpha order-statistic CI."""
    x = measured_latencies(latency_ms, status)
    n = int(x.size)
    if n == 0:
        return LatencySummary(0, None, None, None, None, None)
    p50, p99 = (float(v) for v in np.quantile(x, [0.5, P99]))
    r, s = quantile_ranks(n, P99, alpha / 2)
    lo = float(x[r - 1]) if r is not None else None
    hi = float(x[s - 1]) if s is not None else None
    return LatencySummary(n, float(x.mean()), p50, p99, lo, hi)


def attempted_mask(status: Array) -> Bool:
    st = np.asarray(status)
    attempted: Bool = (st == _ATTEMPTED[0]) | (st == _ATTEMPTED[1]) | (st == _ATTEMPTED[2])
    return attempted


def unmeasured(model: ModelColumn) -> int:
    """Attempted requests without a latency: batched shadow copies (understudy/records.py)."""
    latency = np.asarray(model.latency_ms, dtype=np.float64)
    return int((attempted_mask(model.status) & ~np.isfinite(latency)).sum())


# ----------------------------------------------------------------------------------------------
# Error-rate intervals
# ----------------------------------------------------------------------------------------------


def newcombe_interval(
    k1: int, n1: int, k2: int, n2: int, alpha: float = 0.05
) -> tuple[float, float]:
    """Two-sided 1 - alpha Newcombe hybrid-score interval for p1 - p2 (independent samples).

    Newcombe (1998), method 10: with Wilson intervals (l_i, u_i) for each rate,
    low = d - sqrt((p1 - l1)^2 + (u2 - p2)^2), high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2).
    Good coverage down to small n and rates near 0, where the Wald interval is far too narrow.
    """
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, alpha)
    l2, u2 = wilson_interval(k2, n2, alpha)
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )
