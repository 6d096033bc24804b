"""Operational guardrails: a challenger that is more accurate but slower or flakier is not better.

A promotion swaps the model that answers clients, so the challenger's tail latency and its
error/timeout rate while shadowing are checked against the champion on the same requests, with
pass/fail against configured limits. Definitions (and why):

* **Attempted** requests are those the model actually received: status ok, error or timeout.
  ``shed`` copies (the gateway dropped them to protect the champion) and ``skipped`` ones (not
  sampled) say nothing about the model, so they are counted and reported but are not failures.
* **Error rate** = (error + timeout) / attempted. A timeout is a failure the client would see.
* **p99 latency** is over attempted requests with a known latency — timeouts included, because
  dropping them would flatter exactly the slow model the guardrail exists to catch. Linear
  interpolation between order statistics (numpy's default); the CI shown next to it is the
  distribution-free order-statistic interval for a quantile (binomial ranks, normal
  approximation), for information.
* Limits apply to point estimates, but only once both models have ``min_requests`` attempted
  requests: p99 from fifty requests is the second-largest value, noise. Below that the guardrail
  is ``insufficient`` — it blocks a promotion without forcing a KEEP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import special

from evaluator.dataset import STATUS_CODES, ModelColumn
from evaluator.metrics import wilson_interval
from evaluator.significance import _dataclass_dict

GuardrailStatus = Literal["pass", "fail", "insufficient"]


@dataclass(frozen=True)
class GuardrailLimits:
    """Configured limits; ``None`` disables a check."""

    max_latency_p99_ratio: float | None = 1.5  # challenger p99 / champion p99
    max_latency_p99_ms: float | None = None  # absolute ceiling on the challenger's p99
    max_error_rate_delta: float | None = 0.01  # challenger rate - champion rate (absolute)
    max_error_rate: float | None = None  # absolute ceiling on the challenger's error rate
    min_requests: int = 100

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


@dataclass(frozen=True)
class LatencySummary:
    n: int
    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    p99_ci_low_ms: float | None
    p99_ci_high_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


@dataclass(frozen=True)
class OutcomeSummary:
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

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


@dataclass(frozen=True)
class GuardrailCheck:
    name: str
    champion: float | None
    challenger: float | None
    observed: float | None  # the quantity compared with the limit (ratio, delta or value)
    limit: float
    passed: bool | None  # None: not enough requests to judge
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


@dataclass(frozen=True)
class GuardrailResult:
    champion: str
    challenger: str
    status: GuardrailStatus
    checks: list[GuardrailCheck]
    latency: dict[str, LatencySummary]
    outcomes: dict[str, OutcomeSummary]
    limits: GuardrailLimits = field(default_factory=GuardrailLimits)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        return {
            "champion": self.champion,
            "challenger": self.challenger,
            "status": self.status,
            "checks": [c.to_dict() for c in self.checks],
            "latency": {k: v.to_dict() for k, v in self.latency.items()},
            "outcomes": {k: v.to_dict() for k, v in self.outcomes.items()},
            "limits": self.limits.to_dict(),
        }


_ATTEMPTED = (STATUS_CODES["ok"], STATUS_CODES["error"], STATUS_CODES["timeout"])


def outcome_summary(status: np.ndarray, alpha: float = 0.05) -> OutcomeSummary:
    """Counts per outcome and the error/timeout rate over attempted requests."""
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


def latency_summary(
    latency_ms: np.ndarray, status: np.ndarray, alpha: float = 0.05
) -> LatencySummary:
    """Latency over attempted requests with a finite latency; p99 with an order-statistic CI."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    x = lat[_attempted(status) & np.isfinite(lat)]
    n = int(x.size)
    if n == 0:
        return LatencySummary(0, None, None, None, None, None)
    # 1-based ranks of the order statistics bracketing the 99th percentile: the binomial
    # count of requests below it, normal approximation (informational; n >= min_requests).
    half = float(special.ndtri(1 - alpha / 2)) * math.sqrt(n * 0.99 * 0.01)
    lo_rank = min(max(math.floor(n * 0.99 - half), 1), n)
    hi_rank = min(max(math.ceil(n * 0.99 + half) + 1, 1), n)
    p50, p99 = (float(v) for v in np.quantile(x, [0.5, 0.99]))
    # inverted_cdf at (r - 0.5) / n is exactly the r-th order statistic (partition, no sort)
    lo, hi = (
        float(v)
        for v in np.quantile(x, [(lo_rank - 0.5) / n, (hi_rank - 0.5) / n], method="inverted_cdf")
    )
    return LatencySummary(n, float(x.mean()), p50, p99, lo, hi)


def _attempted(status: np.ndarray) -> np.ndarray:
    st = np.asarray(status)
    return (st == _ATTEMPTED[0]) | (st == _ATTEMPTED[1]) | (st == _ATTEMPTED[2])


def _unmeasured(model: ModelColumn) -> int:
    """Attempted requests without a latency: batched shadow copies (gateway/records.py)."""
    latency = np.asarray(model.latency_ms, dtype=np.float64)
    return int((_attempted(model.status) & ~np.isfinite(latency)).sum())


def _ratio(challenger: float, champion: float) -> float:
    if champion > 0:
        return challenger / champion
    return math.inf if challenger > 0 else 1.0


def check_guardrails(
    champion: ModelColumn,
    challenger: ModelColumn,
    limits: GuardrailLimits | None = None,
    alpha: float = 0.05,
) -> GuardrailResult:
    """Compare the challenger's p99 latency and error rate with the champion's on the same rows."""
    limits = limits or GuardrailLimits()
    lat = {
        champion.name: latency_summary(champion.latency_ms, champion.status, alpha),
        challenger.name: latency_summary(challenger.latency_ms, challenger.status, alpha),
    }
    out = {
        champion.name: outcome_summary(champion.status, alpha),
        challenger.name: outcome_summary(challenger.status, alpha),
    }
    lc, lh = lat[champion.name], lat[challenger.name]
    oc, oh = out[champion.name], out[challenger.name]
    need = limits.min_requests
    checks: list[GuardrailCheck] = []

    lat_enough = lc.n >= need and lh.n >= need
    lat_short = f"not enough latency samples (champion {lc.n}, challenger {lh.n}; need {need} each)"
    unmeasured = _unmeasured(challenger) if lh.n < need else 0
    if unmeasured:
        lat_short += (f"; {unmeasured:,} of the challenger's copies shared a batched "
                      "Triton call and carry no comparable latency (the gateway sends every "
                      "latency_probe_every-th copy alone)")
    if limits.max_latency_p99_ratio is not None:
        limit = limits.max_latency_p99_ratio
        if not lat_enough or lc.p99_ms is None or lh.p99_ms is None:
            checks.append(
                GuardrailCheck(
                    "latency_p99_ratio", lc.p99_ms, lh.p99_ms, None, limit, None, lat_short
                )
            )
        else:
            ratio = _ratio(lh.p99_ms, lc.p99_ms)
            ok = ratio <= limit
            checks.append(
                GuardrailCheck(
                    "latency_p99_ratio",
                    lc.p99_ms,
                    lh.p99_ms,
                    ratio,
                    limit,
                    ok,
                    f"p99 latency {lh.p99_ms:.2f} ms vs champion {lc.p99_ms:.2f} ms: "
                    f"ratio {ratio:.2f} {'<=' if ok else '>'} {limit:g}",
                )
            )
    if limits.max_latency_p99_ms is not None:
        limit = limits.max_latency_p99_ms
        if lh.n < need or lh.p99_ms is None:
            checks.append(
                GuardrailCheck("latency_p99_ms", lc.p99_ms, lh.p99_ms, None, limit, None, lat_short)
            )
        else:
            ok = lh.p99_ms <= limit
            checks.append(
                GuardrailCheck(
                    "latency_p99_ms",
                    lc.p99_ms,
                    lh.p99_ms,
                    lh.p99_ms,
                    limit,
                    ok,
                    f"p99 latency {lh.p99_ms:.2f} ms {'<=' if ok else '>'} {limit:g} ms",
                )
            )

    err_enough = oc.attempted >= need and oh.attempted >= need
    err_short = (
        f"not enough attempted requests (champion {oc.attempted}, challenger {oh.attempted}; "
        f"need {need} each)"
    )
    if limits.max_error_rate_delta is not None:
        limit = limits.max_error_rate_delta
        if not err_enough or oc.error_rate is None or oh.error_rate is None:
            checks.append(
                GuardrailCheck(
                    "error_rate_delta", oc.error_rate, oh.error_rate, None, limit, None, err_short
                )
            )
        else:
            delta = oh.error_rate - oc.error_rate
            ok = delta <= limit
            checks.append(
                GuardrailCheck(
                    "error_rate_delta",
                    oc.error_rate,
                    oh.error_rate,
                    delta,
                    limit,
                    ok,
                    f"error+timeout rate {oh.error_rate:.2%} vs champion {oc.error_rate:.2%}: "
                    f"{delta * 100:+.2f} pp {'<=' if ok else '>'} {limit * 100:.2f} pp",
                )
            )
    if limits.max_error_rate is not None:
        limit = limits.max_error_rate
        if oh.attempted < need or oh.error_rate is None:
            checks.append(
                GuardrailCheck(
                    "error_rate", oc.error_rate, oh.error_rate, None, limit, None, err_short
                )
            )
        else:
            ok = oh.error_rate <= limit
            checks.append(
                GuardrailCheck(
                    "error_rate",
                    oc.error_rate,
                    oh.error_rate,
                    oh.error_rate,
                    limit,
                    ok,
                    f"error+timeout rate {oh.error_rate:.2%} {'<=' if ok else '>'} {limit:.2%}",
                )
            )

    if any(c.passed is False for c in checks):
        status: GuardrailStatus = "fail"
    elif any(c.passed is None for c in checks):
        status = "insufficient"
    else:
        status = "pass"
    return GuardrailResult(champion.name, challenger.name, status, checks, lat, out, limits)
