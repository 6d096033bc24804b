"""Operational guardrails: a challenger that is more accurate but slower or flakier is not better.

A promotion swaps the model that answers clients, so the challenger's tail latency and its
error/timeout rate are checked against the champion on the same requests. A guardrail is a
*blocking* verdict, so it must not fire on noise: every check judges a one-sided confidence bound,
never a point estimate, and a check without enough data says so instead of guessing.

Definitions (and why):

* **Attempted** requests are those the model actually received: status ok, error or timeout.
  ``shed`` copies (the gateway dropped them to protect the champion) and ``skipped`` ones (not
  sampled) say nothing about the model, so they are counted and reported but are not failures
  (whether shedding biases the comparison is the data-health gate's question, health.py).
* **Error rate** = (error + timeout) / attempted. A timeout is a failure the client would see.
* **Measured latencies** are the attempted requests with a finite ``latency_ms`` — timeouts
  included, because dropping them would flatter exactly the slow model the guardrail exists to
  catch. Batched shadow copies carry no comparable latency (NaN in the dataset) and are left out.
* **p99** is numpy's linear interpolation between order statistics.

The checks (``alpha`` is one-sided; intervals are two-sided at 1 - 2 alpha so that each end is a
one-sided 1 - alpha bound):

* ``latency_p99_ratio`` FAILS only when the lower bound of the p99 ratio challenger/champion is
  above ``max_latency_p99_ratio`` AND the lower bound of the p99 difference challenger - champion
  is above ``max_latency_p99_margin_ms``. Both are one-sided tests at level alpha; rejecting only
  when both reject is an intersection-union test, so the chance of failing a challenger whose
  p99 is within either limit is at most alpha. The bounds: each model's p99 gets a
  distribution-free standard error from the width of its order-statistic confidence interval
  (ranks from the binomial distribution of the count below the quantile; the exact coverage of
  that interval sets the divisor), on the log scale for the ratio and the linear scale for the
  difference, and the two are combined as independent samples (Bonett & Price 2002's interval
  for a ratio of quantiles). Latencies of the two models on the same request are positively
  correlated if anything (a large request is slow for both), which only makes this conservative.
  No resampling, no density estimate, any latency distribution. STATISTICS.md has the size and
  power by simulation.
* **Slow calls that cluster in time** (a cold start: the first calls after Triton loads a model;
  a stall: one model's Python stub starved by machine load for a hundred consecutive calls) are
  not independent observations, and the binomial count behind the order-statistic interval then
  understates the p99's variance — in CI one stall made an equally fast challenger look 2.8x
  slower with a tight bound. So each model's latencies are put in time order (``ts``) and the
  variance of the count of exceedances of its p99 is estimated by non-overlapping batch means
  over 25 contiguous time blocks (``latency_time_blocks``; blocks of n/25 calls are longer than
  the stalls seen, and 24 degrees of freedom keep the estimate usable); its ratio to the binomial
  variance, floored at 1, is the variance inflation ``vif`` (summaries.tail_vif). A p99's
  variance is that count's variance over the density squared, so its standard errors (both
  scales) are multiplied by sqrt(vif): the effective sample size is n / vif. An estimated vif
  carries 24 degrees of freedom, so the bounds use Student's t with the Welch-Satterthwaite
  degrees of freedom of the two models' variances (z when neither was inflated). The bound is
  never narrower than the independent one, so a check can only move from fail towards pass or
  insufficient. Every latency check reports ``vif``, ``n_effective`` (and the champion's) and the
  detail says how much clustering widened the bounds.
* ``latency_p99_ms`` (absolute ceiling, off by default) FAILS only when the challenger's
  one-sided order-statistic lower bound for its p99 is above ``max_latency_p99_ms`` AND the same
  difference bound as above exceeds the margin: a ceiling the champion breaks just as much is not
  a reason to keep the champion. The bound is exact for independent latencies; with vif > 1 its
  rank is that of the effective sample (n / vif, at the t tail) carried back to the full one
  (summaries.p99_bounds).
* A latency check is **insufficient** (``passed=None``), never a failure, while either model has
  fewer than ``min_requests`` measured latencies or fewer than 368 (the smallest sample whose
  largest value is a 97.5% upper bound for a p99: below it no distribution-free statement about
  a p99's upper side exists), and also when a model's slow calls cluster beyond chance (its vif
  above the 95% point of its independent-data distribution, chi2(24) / 24) and leave it fewer
  than that many effective latencies: its tail then rests on a few episodes — often one stall —
  and no sample of that size says what the model's p99 is, whichever way it points. Beyond
  chance, so that a p99 resting on four tail values, two of which happen to share a block, is
  judged (with the widened bound) rather than called thin. The same question is also asked over
  10 blocks (chi2(9) / 9): an episode longer than a 25th of the run (a stall spread over a
  lagging lane's backlog, interleaved with fast calls) spans several of the 25 blocks and looks
  only mildly clustered there.
* ``error_rate_delta`` FAILS only when the lower end of the Newcombe hybrid-score interval for
  challenger rate - champion rate (Newcombe 1998, method 10: Wilson intervals of each rate
  combined) is above ``max_error_rate_delta``. The two rates are treated as independent; pairing
  on the same requests (a malformed request fails on both) can only make that conservative.
* ``error_rate`` (absolute ceiling, off by default) FAILS only when the challenger's Wilson lower
  bound is above ``max_error_rate``.
* An error-rate check is insufficient while a model it involves has fewer than ``min_requests``
  attempted requests.

``status`` is "fail" when any check failed, else "insufficient" when any check lacked data, else
"pass" ("pass" means: enough data to see a breach, and none seen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import numpy as np
from scipy import special

from evaluator.dataset import Array, ModelColumn
from evaluator.gates.summaries import (
    TIME_BLOCKS,
    LatencySummary,
    OutcomeSummary,
    QuantileEstimate,
    latency_summary,
    measured_in_time_order,
    measured_latencies,
    min_latency_samples,
    newcombe_interval,
    outcome_summary,
    p99_bounds,
    p99_estimate,
    quantile_ranks,
    tail_vif,
    unmeasured,
)
from evaluator.stats.common import JsonFields
from evaluator.stats.metrics import wilson_interval

GuardrailStatus = Literal["pass", "fail", "insufficient"]


@dataclass(frozen=True)
class GuardrailLimits(JsonFields):
    """Configured limits; ``None`` disables a check."""

    max_latency_p99_ratio: float | None = 1.5  # challenger p99 / champion p99
    max_latency_p99_ms: float | None = None  # absolute ceiling on the challenger's p99
    max_latency_p99_margin_ms: float = 2.0  # a latency check also needs p99 diff above this
    max_error_rate_delta: float | None = 0.01  # challenger rate - champion rate (absolute)
    max_error_rate: float | None = None  # absolute ceiling on the challenger's error rate
    min_requests: int = 100
    # Contiguous time blocks for the latency checks' clustering estimate; 0 takes the measured
    # latencies as independent (the former rule, kept so simulations can compare the two).
    latency_time_blocks: int = TIME_BLOCKS


@dataclass(frozen=True)
class GuardrailCheck(JsonFields):
    """One check. ``observed`` is the quantity compared with ``limit`` (ratio, ms, delta or rate)
    and ``interval`` its two-sided 1 - 2 alpha interval, whose low end is the bound judged.
    Latency checks also carry the p99 difference (ms) and its interval, judged against
    ``margin``, and each model's effective sample size: its measured latencies divided by
    ``vif``, the variance inflation of its p99 from slow calls clustered in time (1 when they
    look independent); a large vif is why a bound is wide."""

    name: str
    champion: float | None
    challenger: float | None
    observed: float | None
    limit: float
    passed: bool | None  # None: not enough data to judge
    detail: str
    interval: tuple[float | None, float | None] | None = None
    n: int = 0  # the challenger's requests behind the check (measured latencies or attempted)
    n_champion: int | None = None  # the champion's, when the check compares the two
    confidence: float | None = None  # one-sided level of each bound (1 - alpha)
    margin: float | None = None
    difference: float | None = None  # latency checks: challenger p99 - champion p99 (ms)
    difference_interval: tuple[float | None, float | None] | None = None
    n_effective: float | None = None  # latency checks: n / vif, the challenger's
    n_effective_champion: float | None = None
    vif: float | None = None  # latency checks: the challenger's p99 variance inflation
    vif_champion: float | None = None
    df: float | None = None  # latency checks: t degrees of freedom of the ratio bound (None: z)


class _CheckContext(TypedDict, total=False):
    """The fields every check of one kind shares (keyword arguments of GuardrailCheck)."""

    n: int
    n_champion: int | None
    confidence: float | None
    margin: float | None
    n_effective: float | None
    n_effective_champion: float | None
    vif: float | None
    vif_champion: float | None


@dataclass(frozen=True)
class GuardrailResult(JsonFields):
    champion: str
    challenger: str
    status: GuardrailStatus
    alpha: float
    checks: list[GuardrailCheck]
    latency: dict[str, LatencySummary]
    outcomes: dict[str, OutcomeSummary]
    limits: GuardrailLimits = field(default_factory=GuardrailLimits)

    @property
    def passed(self) -> bool:
        return self.status == "pass"


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LatencyCompare:
    """The p99 ratio and difference, their 1 - 2 alpha intervals, from two samples."""

    ratio: float
    ratio_interval: tuple[float, float]
    difference: float
    difference_interval: tuple[float, float]
    df: float  # Welch-Satterthwaite degrees of freedom of the log-ratio's variance (inf: z)


def _critical(alpha: float, parts: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """One-sided 1 - alpha critical value of a sum of variances (v, df), with its degrees of
    freedom by Welch-Satterthwaite: z when no part was estimated (df inf), else Student's t."""
    total = sum(v for v, _ in parts)
    denom = sum(v * v / df for v, df in parts if math.isfinite(df))
    df = total * total / denom if denom > 0 else math.inf
    if math.isinf(df):
        return float(special.ndtri(1 - alpha)), df
    return float(special.stdtrit(df, 1 - alpha)), df


def _compare_p99(
    champ: QuantileEstimate, chall: QuantileEstimate, alpha: float
) -> _LatencyCompare | None:
    if champ.se_log is None or chall.se_log is None or champ.se_ms is None or chall.se_ms is None:
        return None
    log_ratio = math.log(chall.value) - math.log(champ.value)
    se_log = math.hypot(champ.se_log, chall.se_log)
    t_log, df = _critical(alpha, ((champ.se_log ** 2, champ.df), (chall.se_log ** 2, chall.df)))
    diff = chall.value - champ.value
    se_ms = math.hypot(champ.se_ms, chall.se_ms)
    t_ms, _ = _critical(alpha, ((champ.se_ms ** 2, champ.df), (chall.se_ms ** 2, chall.df)))
    return _LatencyCompare(
        math.exp(log_ratio),
        (math.exp(log_ratio - t_log * se_log), math.exp(log_ratio + t_log * se_log)),
        diff,
        (diff - t_ms * se_ms, diff + t_ms * se_ms),
        df,
    )


def _latency_shortfall(qc: QuantileEstimate | None, qh: QuantileEstimate | None, need: int,
                       compared: bool, challenger: ModelColumn) -> str | None:
    """Why the latency checks cannot judge (None when they can)."""
    nc = qc.n if qc is not None else 0
    nh = qh.n if qh is not None else 0
    if nc < need or nh < need:
        short = (
            f"insufficient data: {nh:,} measured challenger latencies and {nc:,} champion "
            f"(need {need:,} each for a distribution-free bound on a p99)"
        )
    elif qc is not None and qh is not None and (qc.thin(need) or qh.thin(need)):
        eh, ec = qh.thin(need) or qh.n_effective, qc.thin(need) or qc.n_effective
        short = (
            f"insufficient data: slow calls clustered in time leave an effective {eh:,.0f} of "
            f"{nh:,} challenger latencies (variance inflation {nh / eh:.1f}) and {ec:,.0f} of "
            f"{nc:,} champion ({nc / ec:.1f}); need {need:,} each for a bound on a p99"
        )
    elif not compared:
        short = "insufficient data: a p99 bound is not positive (zero latencies)"
    else:
        return None
    n_unmeasured = unmeasured(challenger) if nh < need else 0
    if n_unmeasured:
        short += (f"; {n_unmeasured:,} of the challenger's copies shared a batched "
                  "Triton call and carry no comparable latency (the gateway sends every "
                  "latency_probe_every-th copy alone)")
    return short


def _latency_checks(
    champion: ModelColumn,
    challenger: ModelColumn,
    limits: GuardrailLimits,
    alpha: float,
    ts: Array | None,
) -> list[GuardrailCheck]:
    tc = measured_in_time_order(champion.latency_ms, champion.status, ts)
    th = measured_in_time_order(challenger.latency_ms, challenger.status, ts)
    xc, xh = np.sort(tc), np.sort(th)
    nc, nh = int(xc.size), int(xh.size)
    need = max(limits.min_requests, min_latency_samples())
    conf = 1 - alpha
    margin = limits.max_latency_p99_margin_ms
    blocks = limits.latency_time_blocks
    qc = p99_estimate(xc, tc, blocks) if nc else None
    qh = p99_estimate(xh, th, blocks) if nh else None
    cmp = _compare_p99(qc, qh, alpha) if qc is not None and qh is not None else None
    short = _latency_shortfall(qc, qh, need, cmp is not None, challenger)
    p99c = qc.value if qc is not None else None
    p99h = qh.value if qh is not None else None
    common: _CheckContext = {
        "n": nh, "n_champion": nc, "confidence": conf, "margin": margin,
        "n_effective": qh.n_effective if qh is not None else None,
        "n_effective_champion": qc.n_effective if qc is not None else None,
        "vif": qh.vif if qh is not None else None,
        "vif_champion": qc.vif if qc is not None else None,
    }
    margin_text = ""
    margin_ok = False
    if cmp is not None:
        d_lo = cmp.difference_interval[0]
        margin_ok = d_lo > margin
        margin_text = (
            f"p99 excess over the champion {cmp.difference:+.2f} ms, lower bound {d_lo:+.2f} ms "
            f"{'>' if margin_ok else '<='} {margin:g} ms margin"
        )
        if qc is not None and qh is not None and max(qc.vif, qh.vif) > 1.0:
            margin_text += (
                f"; slow calls clustered in time widen the bounds: effective n "
                f"{qh.n_effective:,.0f} of {nh:,} challenger latencies (variance inflation "
                f"{qh.vif:.2f}), {qc.n_effective:,.0f} of {nc:,} champion ({qc.vif:.2f}), "
                f"t with {cmp.df:.0f} df"
            )

    def unjudged(name: str, observed: float | None, limit: float) -> GuardrailCheck:
        return GuardrailCheck(name, p99c, p99h, observed, limit, None,
                              short or "insufficient data", **common)

    def judged(name: str, limit: float, observed: float | None, interval: tuple[float, float],
               what: str, unit: str, compared: _LatencyCompare, df: float) -> GuardrailCheck:
        """Failed only when the interval's low end is above ``limit`` and the p99 difference's
        is beyond the margin."""
        lo = interval[0]
        fail = lo > limit and margin_ok
        return GuardrailCheck(
            name,
            p99c,
            p99h,
            observed,
            limit,
            not fail,
            f"{what}, {conf:.0%} lower bound {lo:.2f}{unit} {'>' if lo > limit else '<='} "
            f"{limit:g}{unit}; " + margin_text,
            interval,
            difference=compared.difference,
            difference_interval=compared.difference_interval,
            df=df if math.isfinite(df) else None,
            **common,
        )

    checks: list[GuardrailCheck] = []
    if limits.max_latency_p99_ratio is not None:
        limit = limits.max_latency_p99_ratio
        if short is not None or cmp is None:
            checks.append(unjudged("latency_p99_ratio", None, limit))
        else:
            checks.append(judged(
                "latency_p99_ratio", limit, cmp.ratio, cmp.ratio_interval,
                f"p99 {p99h:.2f} ms vs champion {p99c:.2f} ms: ratio {cmp.ratio:.2f}", "", cmp,
                cmp.df,
            ))
    if limits.max_latency_p99_ms is not None:
        limit = limits.max_latency_p99_ms
        if short is not None or cmp is None or qh is None:
            checks.append(unjudged("latency_p99_ms", p99h, limit))
        else:
            checks.append(judged("latency_p99_ms", limit, p99h, p99_bounds(qh, xh, alpha),
                                 f"p99 {p99h:.2f} ms", " ms", cmp, qh.df))
    return checks


def _error_checks(
    oc: OutcomeSummary, oh: OutcomeSummary, limits: GuardrailLimits, alpha: float
) -> list[GuardrailCheck]:
    need = limits.min_requests
    conf = 1 - alpha
    kc, kh = oc.error + oc.timeout, oh.error + oh.timeout
    short = (
        f"insufficient data: {oh.attempted:,} attempted challenger requests and "
        f"{oc.attempted:,} champion (need {need:,} each)"
    )
    common: _CheckContext = {"n": oh.attempted, "confidence": conf}
    paired: _CheckContext = {**common, "n_champion": oc.attempted}
    checks: list[GuardrailCheck] = []
    if limits.max_error_rate_delta is not None:
        limit = limits.max_error_rate_delta
        if oc.attempted < need or oh.attempted < need or not oc.attempted or not oh.attempted:
            checks.append(GuardrailCheck("error_rate_delta", oc.error_rate, oh.error_rate, None,
                                         limit, None, short, **paired))
        else:
            rc, rh = kc / oc.attempted, kh / oh.attempted
            lo, hi = newcombe_interval(kh, oh.attempted, kc, oc.attempted, 2 * alpha)
            fail = lo > limit
            checks.append(
                GuardrailCheck(
                    "error_rate_delta",
                    rc,
                    rh,
                    rh - rc,
                    limit,
                    not fail,
                    f"error+timeout rate {rh:.2%} vs champion {rc:.2%}: "
                    f"{(rh - rc) * 100:+.2f} pp, {conf:.0%} lower bound {lo * 100:+.2f} pp "
                    f"{'>' if fail else '<='} {limit * 100:.2f} pp",
                    (lo, hi),
                    **paired,
                )
            )
    if limits.max_error_rate is not None:
        limit = limits.max_error_rate
        if oh.attempted < need or not oh.attempted:
            short_h = (f"insufficient data: {oh.attempted:,} attempted challenger requests "
                       f"(need {need:,})")
            checks.append(GuardrailCheck("error_rate", oc.error_rate, oh.error_rate, None,
                                         limit, None, short_h, **common))
        else:
            rh = kh / oh.attempted
            lo, hi = wilson_interval(kh, oh.attempted, 2 * alpha)
            fail = lo > limit
            checks.append(
                GuardrailCheck(
                    "error_rate",
                    oc.error_rate,
                    rh,
                    rh,
                    limit,
                    not fail,
                    f"error+timeout rate {rh:.2%}, {conf:.0%} lower bound {lo:.2%} "
                    f"{'>' if fail else '<='} {limit:.2%}",
                    (lo, hi),
                    **common,
                )
            )
    return checks


def check_guardrails(
    champion: ModelColumn,
    challenger: ModelColumn,
    limits: GuardrailLimits | None = None,
    alpha: float = 0.05,
    ts: Array | None = None,
) -> GuardrailResult:
    """Compare the challenger's p99 latency and error rate with the champion's on the same rows.

    ``alpha`` is each check's one-sided level: a challenger exactly at a limit fails it with
    probability at most alpha (see the module docstring for the tests). ``ts`` (the dataset's
    request times, row for row) orders the latencies in time for the clustering estimate; without
    it the rows are taken to be in time order (the store builds them so).
    """
    limits = limits or GuardrailLimits()
    if not 0 < alpha < 0.5:
        raise ValueError("alpha must be in (0, 0.5)")
    lat = {
        champion.name: latency_summary(champion.latency_ms, champion.status, alpha),
        challenger.name: latency_summary(challenger.latency_ms, challenger.status, alpha),
    }
    out = {
        champion.name: outcome_summary(champion.status, alpha),
        challenger.name: outcome_summary(challenger.status, alpha),
    }
    checks = _latency_checks(champion, challenger, limits, alpha, ts)
    checks += _error_checks(out[champion.name], out[challenger.name], limits, alpha)
    if any(c.passed is False for c in checks):
        status: GuardrailStatus = "fail"
    elif any(c.passed is None for c in checks):
        status = "insufficient"
    else:
        status = "pass"
    return GuardrailResult(champion.name, challenger.name, status, alpha, checks, lat, out, limits)


# The summaries and bounds live in evaluator/gates/summaries.py; these names stay importable here.
__all__ = [
    "GuardrailCheck",
    "GuardrailLimits",
    "GuardrailResult",
    "LatencySummary",
    "OutcomeSummary",
    "check_guardrails",
    "latency_summary",
    "measured_latencies",
    "newcombe_interval",
    "outcome_summary",
    "p99_estimate",
    "quantile_ranks",
    "tail_vif",
]

