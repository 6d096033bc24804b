"""The rollout guards' statistics by simulation, and the plan/policy rules (no services).

The harm test (gateway/control/guard.py) must be always valid: under no difference between
challenger and champion its false-rollback rate stays below alpha *however often it is looked
at* (here: after every request, for thousands of requests); and it must catch a broken model
quickly. Both are checked by simulating the request stream of a rollout step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.config import parse_route
from gateway.control.guard import harm_test, log_wealth, null_share, ratio_lower_bound
from gateway.errors import ConfigError
from gateway.explore.policies import sticky_uniform
from gateway.explore.rollout import RolloutPolicy

ALPHA = 0.01


def _ever_breached(rng: np.random.Generator, runs: int, requests: int, p: float,
                   rate_challenger: float, rate_champion: float) -> np.ndarray:
    """For each simulated step: the first request (1-based) at which the guard breached when
    checked after every request, or 0 when it never did within `requests`.

    Simulated at the bad events only (the wealth moves nowhere else), which is exact: a request
    is a bad event with probability r = p r_x + (1 - p) r_c, so events are Geometric(r) apart,
    and an event is the challenger's with probability p r_x / r, independently.
    """
    rate = p * rate_challenger + (1 - p) * rate_champion
    events = int(requests * rate + 6 * math.sqrt(requests * rate) + 10)
    at = np.cumsum(rng.geometric(rate, (runs, events)), axis=1)  # request index of each event
    from_challenger = rng.random((runs, events)) < p * rate_challenger / rate
    k, n = np.cumsum(from_challenger, axis=1), np.arange(1, events + 1)
    breached = (log_wealth(k, n, null_share(p)) >= math.log(1 / ALPHA)) & (at <= requests)
    first = np.take_along_axis(at, breached.argmax(axis=1)[:, None], axis=1)[:, 0]
    return np.where(breached.any(axis=1), first, 0)


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5])
@pytest.mark.parametrize("rate", [0.01, 0.1])
def test_type_one_error_under_no_difference_stays_below_alpha(p: float, rate: float) -> None:
    """Equal error rates, the check looked at after each of 3,000 requests: breaches in at most
    alpha of the runs (plus Monte Carlo slack of 3 standard errors)."""
    runs = 4000
    first = _ever_breached(np.random.default_rng(7), runs, 3000, p, rate, rate)
    false_rate = float(np.mean(first > 0))
    slack = 3 * math.sqrt(ALPHA * (1 - ALPHA) / runs)
    assert false_rate <= ALPHA + slack, false_rate


@pytest.mark.parametrize(("p", "champion", "within"), [(0.05, 0.01, 2000), (0.05, 0.0, 800),
                                                      (0.25, 0.01, 600)])
def test_power_against_a_ten_percent_error_model(p: float, champion: float,
                                                 within: int) -> None:
    """A challenger failing 10% of its requests is caught in >= 95% of the runs, and within
    `within` requests of the step in the median run."""
    first = _ever_breached(np.random.default_rng(11), 1000, 5000, p, 0.10, champion)
    assert np.mean(first > 0) >= 0.95
    assert float(np.median(first[first > 0])) <= within


def test_a_fully_broken_challenger_is_caught_after_a_handful_of_its_requests() -> None:
    # At 5%, every challenger request an error, the champion clean: three errors in a row.
    assert not harm_test("errors", 1, 0, 0.05, ALPHA).breached
    assert harm_test("errors", 3, 0, 0.05, ALPHA).breached


def test_no_events_no_evidence() -> None:
    result = harm_test("errors", 0, 0, 0.25, ALPHA)
    assert (result.e_value, result.breached, result.ratio_lower) == (1.0, False, 0.0)


def test_the_ratio_bound_is_the_test_inverted() -> None:
    """The lower confidence bound on the rate ratio exceeds 1 exactly when the no-harm test
    rejects, and it grows with the evidence."""
    for k, n in [(2, 2), (5, 15), (1, 20), (30, 100), (10, 200)]:
        result = harm_test("errors", k, n - k, 0.05, ALPHA)
        assert (result.ratio_lower > 1.0) == result.breached
    assert ratio_lower_bound(10, 10, 0.05, ALPHA) > ratio_lower_bound(4, 4, 0.05, ALPHA)


def test_the_ratio_bound_covers_the_true_ratio() -> None:
    """Time-uniform coverage: a challenger with 3x the champion's error rate; the bound, looked
    at after every request, stays at or below 3 in >= 1 - alpha of the runs. (The bound exceeds
    3 exactly when the test at margin 3 rejects, which is what is simulated.)"""
    rng = np.random.default_rng(5)
    p, runs, requests = 0.25, 1000, 1000
    arm = rng.random((runs, requests)) < p
    error = rng.random((runs, requests)) < np.where(arm, 0.06, 0.02)
    k, n = np.cumsum(error & arm, axis=1), np.cumsum(error, axis=1)
    misses = (log_wealth(k, n, null_share(p, 3.0)) >= math.log(1 / ALPHA)).any(axis=1)
    assert misses.mean() <= ALPHA + 3 * math.sqrt(ALPHA / runs)
    assert ratio_lower_bound(float(k[0, -1]), float(n[0, -1]), p, ALPHA) <= 3.0


def test_rollout_policy_serves_its_fraction_sticky_and_monotone() -> None:
    arms = ("fraud_v3", "fraud_v4", "fraud_v5")
    small, large = RolloutPolicy("fraud_v4", 0.05, "fraud"), RolloutPolicy("fraud_v4", 0.5, "fraud")
    assert small.probabilities(arms) == {"fraud_v3": 0.95, "fraud_v4": 0.05, "fraud_v5": 0.0}
    keys = [f"req-{i}" for i in range(20000)]
    first = [small.decide(arms, k, None).arm for k in keys]  # type: ignore[arg-type]
    second = [large.decide(arms, k, None).arm for k in keys]  # type: ignore[arg-type]
    assert abs(first.count("fraud_v4") / len(keys) - 0.05) < 0.01
    assert abs(second.count("fraud_v4") / len(keys) - 0.5) < 0.02
    assert "fraud_v5" not in first + second
    # a key on the challenger stays there when the step grows (no flapping between steps)
    assert all(b == "fraud_v4" for a, b in zip(first, second, strict=True) if a == "fraud_v4")
    decision = small.decide(arms, "req-1", None)  # type: ignore[arg-type]
    assert decision.propensity == (0.05 if decision.arm == "fraud_v4" else 0.95)
    assert small.describe() == {"type": "rollout", "target": "fraud_v4", "fraction": 0.05}
    assert sticky_uniform("fraud", "req-1") >= 0.95 or decision.arm == "fraud_v3"


ROUTE = {"champion": "fraud_v3", "challengers": [{"model": "fraud_v4", "mode": "explore"}]}
PLAN = {"id": "abc", "target": "fraud_v4", "steps": [5, 25, 100], "step": 1}


def test_a_running_plan_owns_the_routes_policy() -> None:
    policy = {"type": "rollout", "target": "fraud_v4", "fraction": 0.25}
    route = parse_route("fraud", {**ROUTE, "policy": policy, "rollout": PLAN})
    assert route.rollout is not None and route.rollout.fraction == 0.25
    with pytest.raises(ConfigError, match="abort it first"):
        parse_route("fraud", {**ROUTE, "rollout": PLAN})  # policy replaced under the rollout
    with pytest.raises(ConfigError, match="mode 'explore'"):
        parse_route("fraud", {"champion": "fraud_v3", "challengers": [{"model": "fraud_v4"}],
                              "policy": policy, "rollout": PLAN})
    with pytest.raises(ConfigError, match="running rollout only"):
        parse_route("fraud", {**ROUTE, "policy": policy})
    done = parse_route("fraud", {**ROUTE, "rollout": {**PLAN, "status": "rolled_back"}})
    assert done.rollout is not None and not done.rollout.running


@pytest.mark.parametrize("steps", [[], [50, 25], [0, 50], [100], [5, 150]])
def test_bad_steps_are_refused(steps: list[float]) -> None:
    with pytest.raises(ConfigError, match="steps"):
        parse_route("fraud", {**ROUTE, "rollout": {**PLAN, "steps": steps, "step": 0,
                                                   "status": "aborted"}})
