"""Always-valid inference for a promotion report that people read every day.

The problem: a fixed-horizon test (t, DeLong) controls the false-promotion rate at alpha only if
it is looked at once. Reading it every day and promoting on the first day it says "significant"
turns alpha = 0.05 into several times that (docs/STATISTICS.md measures it). Seldon, KServe and
SageMaker shadow tests all invite exactly this kind of peeking.

The fix implemented here is the mixture sequential probability ratio test (mSPRT) of Johari,
Koomen, Pekelis & Walsh ("Always valid inference", 2017/2022) with a normal mixing distribution.
For an asymptotically normal estimate ``D_n`` of the improvement theta with variance ``V_n``
(``V_n ~ sigma^2 / n``), the likelihood ratio of "theta ~ N(0, tau^2)" against "theta = 0" is

    Lambda_n = sqrt(V_n / (V_n + tau^2)) * exp(tau^2 D_n^2 / (2 V_n (V_n + tau^2))).

Under H0 it is a nonnegative martingale, so by Ville's inequality P(sup_n Lambda_n >= 1/alpha)
<= alpha: the running ``p_n = min(1, min_{k<=n} 1/Lambda_k)`` is a p-value that stays valid
however often, and whenever, it is read, and however the decision to stop is made. Inverting the
same statistic gives a confidence sequence, ``D_n +- sqrt(V(V+tau^2)/tau^2 * log((V+tau^2) /
(V alpha^2)))``, intersected over looks; the report plots it as the cumulative-statistic chart.

Choices, and why:

* ``tau`` (the mixture's scale, in the estimate's units) — the test has most power for effects
  of about that size; the decision layer sets it to the configured minimum detectable effect.
* The variance is the plug-in sample variance at each look (Johari et al. §4 justify this
  asymptotically). Early looks with a wildly uncertain variance are where plug-in could cheat,
  so looks before ``burn_in`` pairs (and, for AUROC, before ``min_per_class`` of each label)
  are skipped; they cost nothing because the test can resume at any later time.
* Looks: by default one per UTC day of the ordering timestamps, thinned evenly to
  ``max_looks``. Always-validity holds for any subset of looks, so thinning only costs a little
  power. The caller chooses the order: the decision layer passes each row's **label receipt
  time** (``EvalDataset.label_ts``), because that is the filtration daily readers see — the rows
  a report at time T used are exactly the first rows of every later report's sequence, so all
  reports ever read are looks at *one* path and Ville's bound covers them together. Replaying in
  inference-time order instead gives every report a different path (late labels are inserted
  into the past), and the union over those paths is not covered (docs/STATISTICS.md measures
  both).
* Direction: the confidence sequence, not the two-sided p-value, carries the direction of a
  decision. ``confidence_sequence`` recomputes it at another level (a multiplicity-adjusted
  alpha) from the stored path; ``cs_state`` says whether it is empty (no single effect is
  consistent with every look: the effect moved) and on which side of zero it lies.
* For AUROC and RMSE the "observations" are not i.i.d. per request, but the DeLong and
  delta-method estimates are asymptotically normal with variance ~ 1/n, which is all the
  normal-mixture statistic uses (the A/A simulations check the resulting error rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from evaluator.dataset import F64, Array
from evaluator.stats.significance import jsonable, placements_sorted

SECONDS_PER_DAY = 86_400.0
CsState = Literal["above", "below", "contains", "empty", "not_started"]
Looks = Literal["daily", "each"] | int | Sequence[int]


@dataclass(frozen=True)
class SequentialDesign:
    """How a sequential test runs: the mixture scale ``tau`` (in the estimate's units), the
    level, the look schedule (``look_points``) and the burn-in (the module docstring says why)."""

    tau: float
    alpha: float = 0.05
    looks: Looks = "daily"
    max_looks: int = 30
    burn_in: int = 100


@dataclass(frozen=True)
class SequentialResult:
    """The mSPRT path at every look, plus the always-valid p-value now (the last look)."""

    method: str
    alpha: float
    tau: float
    burn_in: int
    n: Array  # pairs used at each look
    ts: Array  # unix time of the last request in each look (NaN if unknown)
    estimate: Array  # improvement estimate (positive = challenger better)
    se: Array  # its standard error (NaN where the look was skipped)
    log_lr: Array  # log Lambda (0 where skipped)
    p_value_path: Array  # running always-valid p-value
    cs_low: Array  # running-intersection confidence sequence
    cs_high: Array
    reason: str | None = None

    @property
    def p_value(self) -> float:
        return float(self.p_value_path[-1]) if self.p_value_path.size else 1.0

    @property
    def final_estimate(self) -> float | None:
        return float(self.estimate[-1]) if self.estimate.size else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "alpha": self.alpha,
            "tau": self.tau,
            "burn_in": self.burn_in,
            "looks": int(self.n.size),
            "p_value": jsonable(self.p_value),
            "estimate": jsonable(self.final_estimate),
            "cs_low": jsonable(self.cs_low[-1]) if self.cs_low.size else None,
            "cs_high": jsonable(self.cs_high[-1]) if self.cs_high.size else None,
            "reason": self.reason,
            "path": {
                "n": jsonable(self.n),
                "ts": jsonable(self.ts),
                "estimate": jsonable(self.estimate),
                "se": jsonable(self.se),
                "log_lr": jsonable(self.log_lr),
                "p_value": jsonable(self.p_value_path),
                "cs_low": jsonable(self.cs_low),
                "cs_high": jsonable(self.cs_high),
            },
        }


def _empty_result(method: str, design: SequentialDesign, reason: str) -> SequentialResult:
    e = np.empty(0)
    return SequentialResult(
        method, design.alpha, design.tau, design.burn_in, np.empty(0, dtype=np.int64),
        e, e, e, e, e, e, e, reason,
    )


# ----------------------------------------------------------------------------------------------
# Look schedule
# ----------------------------------------------------------------------------------------------


def time_order(ts: Array | None, n: int) -> Array:
    """Stable permutation that puts rows in inference-time order (unknown times last)."""
    if ts is None:
        return np.arange(n)
    t = np.asarray(ts, dtype=np.float64)
    if t.size != n:
        raise ValueError("timestamps and data differ in length")
    if n and np.isfinite(t).all() and bool(np.all(t[1:] >= t[:-1])):
        return np.arange(n)  # already in time order (the decision layer sorts once)
    return np.argsort(np.where(np.isfinite(t), t, np.inf), kind="stable")


def _time_ordered_finite(
    columns: Sequence[Array], ts: Array | None
) -> tuple[list[Array], Array | None]:
    """Columns (and timestamps) in time order, keeping only rows finite in every column."""
    cols = [np.asarray(c, dtype=np.float64).ravel() for c in columns]
    t = None if ts is None else np.asarray(ts, dtype=np.float64).ravel()
    order = time_order(t, cols[0].size)
    cols = [c[order] for c in cols]
    keep = np.logical_and.reduce([np.isfinite(c) for c in cols])
    t_sorted = None if t is None else t[order][keep]
    return [c[keep] for c in cols], t_sorted


def look_points(
    ts_sorted: Array | None, n: int, looks: Looks = "daily", max_looks: int = 30
) -> Array:
    """Prefix sizes (number of time-ordered rows) at which the statistic is evaluated.

    ``daily``: the end of each UTC day present in ``ts_sorted``; ``each``: every row; an int:
    that many equally spaced looks; a sequence: those prefix sizes. The last look is always n.
    More than ``max_looks`` looks are thinned evenly, keeping the first and the last
    (``each`` is never thinned: it is meant for cheap i.i.d. statistics).
    """
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if isinstance(looks, str) and looks == "each":
        return np.arange(1, n + 1, dtype=np.int64)
    if isinstance(looks, str) and looks == "daily":
        if ts_sorted is None:
            points = np.array([n], dtype=np.int64)
        else:
            t = np.asarray(ts_sorted, dtype=np.float64)
            finite = t[np.isfinite(t)]
            days = np.unique(np.floor(finite / SECONDS_PER_DAY))
            ends = np.searchsorted(finite, (days + 1.0) * SECONDS_PER_DAY, side="left")
            points = np.append(ends, n).astype(np.int64)
    elif isinstance(looks, int):
        if looks < 1:
            raise ValueError("number of looks must be >= 1")
        points = np.ceil(n * np.arange(1, looks + 1) / looks).astype(np.int64)
    else:
        points = np.append(np.asarray(list(looks), dtype=np.int64), n)
    points = np.unique(np.clip(points, 1, n))
    if points.size > max_looks:
        keep = np.unique(np.linspace(0, points.size - 1, max_looks).round().astype(np.int64))
        points = points[keep]
    return points


# ----------------------------------------------------------------------------------------------
# The mixture SPRT on a path of (estimate, variance)
# ----------------------------------------------------------------------------------------------


def normal_mixture_log_lr(estimate: Array, variance: Array, tau: float) -> Array:
    """log Lambda of the N(0, tau^2)-mixture SPRT for a normal estimate with known variance."""
    est = np.asarray(estimate, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    return 0.5 * np.log(v / (v + t2)) + t2 * est * est / (2.0 * v * (v + t2))


def msprt(
    estimates: Array,
    variances: Array,
    n: Array,
    *,
    tau: float,
    alpha: float = 0.05,
    ts: Array | None = None,
    burn_in: int = 100,
    valid: Array | None = None,
    method: str = "msprt-normal-mixture",
) -> SequentialResult:
    """Always-valid p-values and confidence sequence from a path of estimates and variances.

    Looks with ``n < burn_in``, a non-positive or non-finite variance, or ``valid`` False are
    skipped (their likelihood ratio is taken as 1 and their interval as unbounded).
    """
    if tau <= 0 or not math.isfinite(tau):
        raise ValueError("mixture scale tau must be a positive number")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    est = np.asarray(estimates, dtype=np.float64)
    var = np.asarray(variances, dtype=np.float64)
    counts = np.asarray(n, dtype=np.int64)
    use = (counts >= burn_in) & np.isfinite(est) & np.isfinite(var) & (var > 0)
    if valid is not None:
        use &= np.asarray(valid, dtype=bool)
    safe_var = np.where(use, var, 1.0)
    safe_est = np.where(use, est, 0.0)
    log_lr = np.where(use, normal_mixture_log_lr(safe_est, safe_var, tau), 0.0)
    p_now = np.minimum(1.0, np.exp(-np.minimum(log_lr, 700.0)))
    p_path = np.minimum.accumulate(p_now) if p_now.size else p_now
    t2 = tau * tau
    half = np.sqrt(
        safe_var * (safe_var + t2) / t2 * np.log((safe_var + t2) / (safe_var * alpha**2))
    )
    lo = np.where(use, safe_est - half, -np.inf)
    hi = np.where(use, safe_est + half, np.inf)
    cs_low = np.maximum.accumulate(lo) if lo.size else lo
    cs_high = np.minimum.accumulate(hi) if hi.size else hi
    se = np.where(use, np.sqrt(safe_var), np.nan)
    times = np.full(counts.size, np.nan) if ts is None else np.asarray(ts, dtype=np.float64)
    reason = None
    if not use.any():
        reason = (
            f"no look had enough data (burn-in {burn_in} pairs, positive variance): "
            "the sequential test has not started"
        )
    return SequentialResult(
        method,
        alpha,
        tau,
        burn_in,
        counts,
        times,
        est,
        se,
        log_lr,
        p_path,
        cs_low,
        cs_high,
        reason,
    )


# ----------------------------------------------------------------------------------------------
# Paths for the three kinds of primary statistic
# ----------------------------------------------------------------------------------------------


def _look_times(ts_sorted: Array | None, points: Array) -> F64 | None:
    if ts_sorted is None:
        return None
    times: F64 = np.asarray(ts_sorted, dtype=np.float64)[points - 1]
    return times


def _msprt_at_looks(
    estimates: Array,
    variances: Array,
    points: Array,
    ts_sorted: Array | None,
    design: SequentialDesign,
    method: str,
    valid: Array | None = None,
) -> SequentialResult:
    """``msprt`` on a path evaluated at the look ``points`` of time-ordered rows."""
    return msprt(
        estimates,
        variances,
        points,
        tau=design.tau,
        alpha=design.alpha,
        ts=_look_times(ts_sorted, points),
        burn_in=design.burn_in,
        valid=valid,
        method=method,
    )


def _msprt_on_prefixes(
    columns: Sequence[Array],
    ts: Array | None,
    path: Callable[[list[Array], Array], tuple[Array, Array]],
    method: str,
    design: SequentialDesign,
) -> SequentialResult:
    """``msprt`` on a statistic of paired columns whose ``path`` (estimate and variance at each
    look) comes from prefix sums: rows in time order, non-finite rows dropped, looks placed."""
    cols, t_sorted = _time_ordered_finite(columns, ts)
    if cols[0].size == 0:
        return _empty_result(method, design, "no paired requests")
    points = look_points(t_sorted, cols[0].size, design.looks, design.max_looks)
    estimates, variances = path(cols, points)
    return _msprt_at_looks(estimates, variances, points, t_sorted, design, method)


def msprt_paired(
    improvements: Array, ts: Array | None = None, *, design: SequentialDesign
) -> SequentialResult:
    """mSPRT on i.i.d. per-request improvements (e.g. loss_champion - loss_challenger).

    Mean and variance at every look come from cumulative sums (O(n) in total), shifted by the
    overall mean first so the variance does not cancel catastrophically at a million rows.
    Non-finite improvements are dropped.
    """
    return _msprt_on_prefixes(
        [improvements], ts, _paired_mean_path, "msprt-normal-mixture(paired mean)", design
    )


def _paired_mean_path(columns: list[Array], points: Array) -> tuple[Array, Array]:
    """Mean improvement and its variance at each look, from shifted cumulative sums."""
    (d,) = columns
    shift = float(d.mean())
    x = d - shift
    s1 = np.cumsum(x)[points - 1]
    s2 = np.cumsum(x * x)[points - 1]
    k = points.astype(np.float64)
    mean = s1 / k + shift
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(k > 1, np.maximum(s2 - s1 * s1 / k, 0.0) / np.maximum(k - 1, 1), np.nan) / k
    return mean, var


def msprt_rmse(
    err_champion: Array,
    err_challenger: Array,
    ts: Array | None = None,
    *,
    design: SequentialDesign,
) -> SequentialResult:
    """mSPRT on the RMSE improvement (rmse_champion - rmse_challenger), delta-method variance."""
    return _msprt_on_prefixes(
        [err_champion, err_challenger], ts, _rmse_path, "msprt-normal-mixture(rmse delta method)",
        design,
    )


def _rmse_path(columns: list[Array], points: Array) -> tuple[Array, Array]:
    """RMSE improvement and its delta-method variance at each look (shifted cumulative sums)."""
    ec, eh = columns
    a, b = ec**2, eh**2
    sa, sb = float(a.mean()), float(b.mean())
    xa, xb = a - sa, b - sb
    k = points.astype(np.float64)
    ca = np.cumsum(xa)[points - 1]
    cb = np.cumsum(xb)[points - 1]
    caa = np.cumsum(xa * xa)[points - 1]
    cbb = np.cumsum(xb * xb)[points - 1]
    cab = np.cumsum(xa * xb)[points - 1]
    ma, mb = ca / k + sa, cb / k + sb
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = np.maximum(k - 1, 1)
        vaa = (caa - ca * ca / k) / dof
        vbb = (cbb - cb * cb / k) / dof
        vab = (cab - ca * cb / k) / dof
        ra, rb = np.sqrt(np.maximum(ma, 0.0)), np.sqrt(np.maximum(mb, 0.0))
        ga, gb = 1.0 / (2.0 * ra), -1.0 / (2.0 * rb)
        var = (ga * ga * vaa + gb * gb * vbb + 2 * ga * gb * vab) / k
        var = np.where((k > 1) & (ra > 0) & (rb > 0), var, np.nan)
    return ra - rb, var


def msprt_delong(
    labels: Array,
    scores_champion: Array,
    scores_challenger: Array,
    ts: Array | None = None,
    *,
    design: SequentialDesign,
    min_per_class: int = 10,
    orders: tuple[Array, Array] | None = None,
) -> SequentialResult:
    """mSPRT on the AUROC improvement (auc_challenger - auc_champion) with DeLong variance.

    Each model's scores are sorted once; a look at the first k rows keeps the sorted entries
    whose row is < k (a contiguous compress, still sorted), so each look costs O(n), not
    O(n log n). ``orders`` (argsorts of the two score arrays, for rows already in time order
    and all valid) lets the caller share the sorts with the fixed-horizon DeLong test.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    sc = np.asarray(scores_champion, dtype=np.float64).ravel()
    sh = np.asarray(scores_challenger, dtype=np.float64).ravel()
    t = None if ts is None else np.asarray(ts, dtype=np.float64).ravel()
    order = time_order(t, y.size)
    reordered = not np.array_equal(order, np.arange(y.size))
    if reordered:
        y, sc, sh = y[order], sc[order], sh[order]
    t_sorted = None if t is None else t[order]
    keep = np.isfinite(sc) & np.isfinite(sh) & ((y == 0) | (y == 1))
    if not keep.all():
        y, sc, sh = y[keep], sc[keep], sh[keep]
        if t_sorted is not None:
            t_sorted = t_sorted[keep]
    method = "msprt-normal-mixture(delong auroc)"
    if y.size == 0:
        return _empty_result(method, design, "no paired labelled requests")
    points = look_points(t_sorted, y.size, design.looks, design.max_looks)
    positive = y == 1
    cum_pos = np.cumsum(positive)
    if orders is None or reordered or not keep.all():
        orders = (np.argsort(sc), np.argsort(sh))
    sorted_c = (orders[0], sc[orders[0]], positive[orders[0]])
    sorted_h = (orders[1], sh[orders[1]], positive[orders[1]])
    negative = ~positive
    est = np.full(points.size, np.nan)
    var = np.full(points.size, np.nan)
    valid = np.zeros(points.size, dtype=bool)
    placed_c = np.empty(y.size)  # placement values in row order, refilled at every look
    placed_h = np.empty(y.size)
    for j, k in enumerate(points):
        n_pos = int(cum_pos[k - 1])
        if min(n_pos, int(k) - n_pos) < max(min_per_class, 2) or k < design.burn_in:
            continue
        for out, (o, s_sorted, p_sorted) in ((placed_c, sorted_c), (placed_h, sorted_h)):
            inside = o < k
            out[o[inside]] = placements_sorted(s_sorted[inside], p_sorted[inside])
        diff = placed_h[:k] - placed_c[:k]
        d10 = diff[positive[:k]]  # per-positive components of the AUROC difference
        d01 = diff[negative[:k]]
        est[j] = float(d10.mean())
        var[j] = float(d10.var(ddof=1)) / d10.size + float(d01.var(ddof=1)) / d01.size
        valid[j] = True
    return _msprt_at_looks(est, var, points, t_sorted, design, method, valid)


# ----------------------------------------------------------------------------------------------
# The confidence sequence at another level, and what it says
# ----------------------------------------------------------------------------------------------


def confidence_sequence(result: SequentialResult, alpha: float) -> tuple[Array, Array]:
    """Running-intersection confidence sequence of ``result``'s path at level ``1 - alpha``.

    Why: a correction across challengers gives each one its own level (Holm/Bonferroni alpha_j);
    the path (estimate, se, tau) is all the normal-mixture boundary needs, so no re-scan of the
    data. Skipped looks (se NaN) are unbounded, as in ``msprt``.
    """
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    use = np.isfinite(result.se) & (result.se > 0) & np.isfinite(result.estimate)
    v = np.where(use, result.se, 1.0) ** 2
    est = np.where(use, result.estimate, 0.0)
    t2 = result.tau * result.tau
    half = np.sqrt(v * (v + t2) / t2 * np.log((v + t2) / (v * alpha**2)))
    lo = np.where(use, est - half, -np.inf)
    hi = np.where(use, est + half, np.inf)
    if not lo.size:
        return lo, hi
    return np.maximum.accumulate(lo), np.minimum.accumulate(hi)


def cs_state(low: float, high: float, threshold: float = 0.0) -> CsState:
    """Where the (current) confidence sequence ``[low, high]`` lies relative to ``threshold``.

    ``empty`` (low > high) means no constant effect fits every look: the effect changed over the
    experiment (e.g. worse for two days, better after), so neither direction may be decided.
    """
    if not (np.isfinite(low) or np.isfinite(high)):
        return "not_started"
    if low > high:
        return "empty"
    if low > threshold:
        return "above"
    if high < threshold:
        return "below"
    return "contains"
