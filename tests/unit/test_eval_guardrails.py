"""Guardrails judge one-sided confidence bounds: exact pieces against references, the decision
rule on constructed cases, and fast Monte Carlo versions of the STATISTICS.md simulations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from devtools.simulate.guardrails import guardrail_pair, guardrail_study
from evaluator.dataset import STATUS_CODES, ModelColumn
from evaluator.gates.guardrails import (
    GuardrailLimits,
    check_guardrails,
    latency_summary,
    newcombe_interval,
    p99_estimate,
    quantile_ranks,
)

OK, ERR = STATUS_CODES["ok"], STATUS_CODES["error"]


def _col(name: str, latency: np.ndarray, status: np.ndarray | None = None) -> ModelColumn:
    n = latency.size
    st = np.full(n, OK, dtype=np.int8) if status is None else status.astype(np.int8)
    return ModelColumn(name, "champion" if name == "c" else "challenger", np.zeros(n), st,
                       latency)


def _checks(result: object) -> dict[str, object]:
    return {c.name: c for c in result.checks}  # type: ignore[attr-defined]


# -- exact pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 50, 367, 368, 400, 1000, 4321])
@pytest.mark.parametrize("tail", [0.025, 0.05, 0.1])
def test_quantile_ranks_match_a_brute_force_binomial_search(n: int, tail: float) -> None:
    cdf = stats.binom.cdf(np.arange(-1, n + 1), n, 0.99)  # cdf[j] = P(B <= j - 1)
    lower = [r for r in range(1, n + 1) if cdf[r] <= tail]  # P(B <= r - 1) <= tail
    upper = [s for s in range(1, n + 1) if cdf[s] >= 1 - tail]  # P(B <= s - 1) >= 1 - tail
    assert quantile_ranks(n, 0.99, tail) == (max(lower, default=None), min(upper, default=None))


def test_p99_interval_covers_the_true_quantile() -> None:
    rng = np.random.default_rng(3)
    truth = math.exp(math.log(3.0) + 0.5 * stats.norm.ppf(0.99))
    reps, hits, n = 300, 0, 1000
    for _ in range(reps):
        s = latency_summary(rng.lognormal(math.log(3.0), 0.5, n), np.zeros(n, dtype=np.int8))
        hits += s.p99_ci_low_ms <= truth <= s.p99_ci_high_ms  # type: ignore[operator]
    assert hits / reps >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / reps)


def test_p99_standard_error_is_right_on_average() -> None:
    rng = np.random.default_rng(4)
    est = [p99_estimate(np.sort(rng.lognormal(0.0, 0.5, 2000))) for _ in range(400)]
    values = np.array([e.value for e in est])
    se_log = np.array([e.se_log for e in est])
    # the order-statistic standard error tracks the estimator's real spread (within 20%)
    assert np.median(se_log) == pytest.approx(np.log(values).std(ddof=1), rel=0.2)


@pytest.mark.parametrize(("k1", "n1", "k2", "n2"), [(5, 100, 2, 100), (0, 150, 3, 120),
                                                    (60, 1000, 20, 1000), (40, 40, 0, 30)])
def test_newcombe_matches_statsmodels(k1: int, n1: int, k2: int, n2: int) -> None:
    ref = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff",
                                     alpha=0.1)
    assert newcombe_interval(k1, n1, k2, n2, 0.1) == pytest.approx(ref, abs=1e-12)


# -- the decision rule --------------------------------------------------------------------------


def test_clearly_slower_challenger_fails_with_its_interval() -> None:
    rng = np.random.default_rng(5)
    lat = rng.lognormal(math.log(3.0), 0.5, 5000)
    res = check_guardrails(_col("c", lat), _col("h", lat * 3))
    check = _checks(res)["latency_p99_ratio"]
    assert res.status == "fail" and check.passed is False
    low, high = check.interval
    assert 1.5 < low < 3.0 < high  # the true ratio is 3 on every request
    assert check.difference_interval[0] > 2.0
    assert (check.n, check.n_champion, check.margin, check.confidence) == (5000, 5000, 2.0, 0.95)
    assert "lower bound" in check.detail and "margin" in check.detail
    json.dumps(res.to_dict(), allow_nan=False)


def test_a_large_ratio_on_tiny_latencies_passes_on_the_margin() -> None:
    rng = np.random.default_rng(6)
    lat = rng.lognormal(math.log(0.1), 0.3, 5000)  # 0.1 ms models: 3x slower is +0.4 ms
    check = _checks(check_guardrails(_col("c", lat), _col("h", lat * 3)))["latency_p99_ratio"]
    assert check.interval[0] > 1.5  # the ratio is clearly past the limit ...
    assert check.difference_interval[0] < 2.0  # ... but not by the absolute margin
    assert check.passed is True
    assert "<= 2 ms margin" in check.detail


def test_few_latencies_are_insufficient_never_a_failure() -> None:
    rng = np.random.default_rng(7)
    lat = rng.lognormal(math.log(3.0), 0.5, 300)
    res = check_guardrails(_col("c", lat), _col("h", lat * 10))  # 10x slower, 300 requests
    check = _checks(res)["latency_p99_ratio"]
    assert check.passed is None and check.observed is None
    assert "need 368 each" in check.detail
    assert res.status == "insufficient"


def test_batched_copies_are_left_out_and_named() -> None:
    rng = np.random.default_rng(8)
    lat = rng.lognormal(math.log(3.0), 0.5, 4000)
    batched = lat * 5
    batched[np.arange(4000) % 20 != 0] = np.nan  # batched: only every 20th copy measured
    check = _checks(check_guardrails(_col("c", lat), _col("h", batched)))["latency_p99_ratio"]
    assert check.passed is None and check.n == 200
    assert "3,800 of the challenger's copies shared a batched Triton call" in check.detail


def test_identical_error_rates_at_small_n_do_not_fail() -> None:
    # 4 vs 1 errors in 150: the point estimate is +2 pp, past the 1 pp limit; the bound is not
    status_c = np.full(150, OK)
    status_c[:1] = ERR
    status_h = np.full(150, OK)
    status_h[:4] = ERR
    lat = np.ones(150)
    res = check_guardrails(_col("c", lat, status_c), _col("h", lat, status_h))
    check = _checks(res)["error_rate_delta"]
    assert check.observed == pytest.approx(3 / 150) and check.observed > 0.01
    assert check.passed is True
    assert check.interval == pytest.approx(newcombe_interval(4, 150, 1, 150, 0.1))


def test_absolute_ceilings_judge_lower_bounds() -> None:
    rng = np.random.default_rng(9)
    lat_c = rng.lognormal(math.log(3.0), 0.5, 3000)
    lat_h = rng.lognormal(math.log(12.0), 0.5, 3000)  # p99 about 38 ms
    status_h = np.where(rng.random(3000) < 0.06, ERR, OK)
    limits = GuardrailLimits(max_latency_p99_ratio=None, max_latency_p99_ms=30.0,
                             max_error_rate_delta=None, max_error_rate=0.03)
    res = check_guardrails(_col("c", lat_c), _col("h", lat_h, status_h), limits)
    checks = _checks(res)
    assert set(checks) == {"latency_p99_ms", "error_rate"}
    assert checks["latency_p99_ms"].passed is False and checks["latency_p99_ms"].interval[0] > 30
    k = int((status_h == ERR).sum())
    lo, hi = proportion_confint(k, 3000, alpha=0.1, method="wilson")
    assert checks["error_rate"].interval == pytest.approx((lo, hi), abs=1e-12)
    assert checks["error_rate"].passed is False
    loose = check_guardrails(_col("c", lat_c), _col("h", lat_h, status_h),
                             GuardrailLimits(max_latency_p99_ratio=None, max_latency_p99_ms=45.0,
                                             max_error_rate_delta=None, max_error_rate=0.07))
    assert loose.status == "pass"


# -- fast versions of the simulations (STATISTICS.md has the full runs) -------------------------


def _at_most(rate: float, target: float, reps: int) -> bool:
    return rate <= target + 3 * math.sqrt(target * (1 - target) / reps)


@pytest.mark.parametrize("n", [100, 1000, 10_000])
def test_identical_challenger_is_rarely_blocked(n: int) -> None:
    reps = 60 if n == 10_000 else 150
    r = guardrail_study(n, "identical", "lognormal", reps, seed=70_000 + n)
    assert _at_most(r["blocked"].rate, 0.05, reps), r["blocked"]
    if n == 100:  # the rule this replaces blocked about a third of these
        assert r["former_rule"].rate > 0.2
        assert r["latency_insufficient"].rate == 1.0


def test_latency_test_size_at_the_limit() -> None:
    reps = 150
    r = guardrail_study(3000, "latency_at_limit", "tail", reps, seed=71_000)
    assert _at_most(r["latency_fail"].rate, 0.05, reps), r["latency_fail"]


@pytest.mark.parametrize(("scenario", "key"), [("slower", "latency_fail"),
                                               ("flakier", "error_fail")])
def test_truly_worse_challengers_are_blocked(scenario: str, key: str) -> None:
    r = guardrail_study(10_000, scenario, "lognormal", 30, seed=72_000)
    assert r[key].rate >= 0.9, r[key]


def test_simulated_pair_is_what_the_docstring_says() -> None:
    champ, chall = guardrail_pair(1, 200_000, "slower")
    p99c, p99h = np.quantile(champ.latency_ms, 0.99), np.quantile(chall.latency_ms, 0.99)
    assert p99h / p99c == pytest.approx(2.0, abs=0.15) and p99h - p99c > 5
