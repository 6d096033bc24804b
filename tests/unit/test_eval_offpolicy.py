"""Off-policy estimators recover known policy values from simulated bandit logs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import expit

from devtools.simulate.bandits import offpolicy_study
from evaluator.dataset import EvalDataset, ModelColumn
from evaluator.stats.offpolicy import (
    RewardLogs,
    estimate_policy_values,
    fit_cross_fitted_reward_model,
    policy_value_estimates,
)

ARMS = ("m0", "m1", "m2")


def reward_prob(arm: str, x: np.ndarray) -> np.ndarray:
    """P(reward = 1 | context, arm): different, nonlinear, so the arms' values differ."""
    k = ARMS.index(arm)
    return expit(-0.5 + 0.6 * k * x - 0.3 * k + 0.8 * np.sin(x + k))


def true_values() -> dict[str, float]:
    x = np.random.default_rng(12345).standard_normal(1_000_000)
    return {a: float(reward_prob(a, x).mean()) for a in ARMS}


def bandit_logs(
    seed: int, n: int = 2000, *, probs: np.ndarray | None = None, epsilon: float = 0.3
) -> EvalDataset:
    """Epsilon-greedy logs (greedy arm m0), every arm's score logged, Bernoulli rewards."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    k = len(ARMS)
    if probs is None:
        probs = np.full((n, k), epsilon / k)
        probs[:, 0] += 1 - epsilon
    served = np.minimum((rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1), k - 1)
    p_true = np.column_stack([reward_prob(a, x) for a in ARMS])
    rewards = (rng.random(n) < p_true[np.arange(n), served]).astype(float)
    models = {
        a: ModelColumn(
            a,
            "champion" if a == "m0" else "challenger",
            p_true[:, i] + 0.05 * rng.standard_normal(n),  # each model's (noisy) score
            np.zeros(n, dtype=np.int8),
            np.ones(n),
        )
        for i, a in enumerate(ARMS)
    }
    return EvalDataset(
        route="r",
        task="classification",
        champion="m0",
        request_ids=np.arange(n).astype(object),
        ts=np.arange(n, dtype=float),
        labels=np.zeros(n),
        rewards=rewards,
        served=np.array([ARMS[i] for i in served], dtype=object),
        propensity=probs[np.arange(n), served],
        arm_probs={a: probs[:, i] for i, a in enumerate(ARMS)},
        policy_types=np.full(n, "epsilon_greedy", dtype=object),
        models=models,
    )


def test_estimates_cover_the_true_value_across_seeds() -> None:
    truth = true_values()
    reps = 120
    hits = {(a, e): 0 for a in ARMS for e in ("ips", "snips", "dm", "dr")}
    errors = {k: 0.0 for k in hits}
    for seed in range(reps):
        report = estimate_policy_values(bandit_logs(seed))
        for a in ARMS:
            for e, est in report.arms[a].estimates.items():
                assert est.value is not None
                hits[(a, e)] += est.ci_low <= truth[a] <= est.ci_high  # type: ignore[operator]
                errors[(a, e)] += (est.value - truth[a]) / reps
    mcse = math.sqrt(0.05 * 0.95 / reps)
    for key, h in hits.items():
        assert h / reps >= 0.95 - 3.5 * mcse, (key, h / reps)
    for key, bias in errors.items():
        assert abs(bias) < 0.01, (key, bias)


def test_ips_snips_dr_by_hand() -> None:
    r = np.array([1.0, 0.0, 1.0, 1.0])
    served = np.array([0, 1, 0, 1])
    prop = np.array([0.5, 0.25, 0.8, 0.5])
    target = np.zeros((4, 2))
    target[:, 1] = 1.0  # always arm 1
    rhat = np.array([[0.6, 0.3], [0.5, 0.2], [0.7, 0.4], [0.6, 0.5]])
    out = policy_value_estimates(r, served, prop, target, rhat)
    w = np.array([0, 4.0, 0, 2.0])
    assert out["ips"].value == pytest.approx(np.mean(w * r))
    assert out["snips"].value == pytest.approx(np.sum(w * r) / np.sum(w))
    assert out["dm"].value == pytest.approx(rhat[:, 1].mean())
    dr = rhat[:, 1] + w * (r - rhat[np.arange(4), served])
    assert out["dr"].value == pytest.approx(dr.mean())
    assert out["dr"].se == pytest.approx(dr.std(ddof=1) / 2)


def test_champion_only_logs_do_not_identify_challengers() -> None:
    n = 500
    ds = bandit_logs(0, n, probs=np.tile([1.0, 0.0, 0.0], (n, 1)))
    report = estimate_policy_values(ds)
    champ = report.arms["m0"].estimates
    assert champ["ips"].value == pytest.approx(ds.rewards.mean())  # on-policy: IPS = mean
    assert report.logging_value.value == pytest.approx(ds.rewards.mean())
    for arm in ("m1", "m2"):
        for est in report.arms[arm].estimates.values():
            assert est.value is None
            assert "never served" in (est.reason or "")
    json.dumps(report.to_dict(), allow_nan=False)


def test_partial_support_withholds_ips_but_keeps_dr() -> None:
    n = 2000
    probs = np.full((n, 3), 0.1)
    probs[:, 0] = 0.8
    probs[:200] = [1.0, 0.0, 0.0]  # a champion-only stretch before exploration began
    report = estimate_policy_values(bandit_logs(1, n, probs=probs))
    m1 = report.arms["m1"]
    assert m1.unsupported == 200
    assert m1.estimates["ips"].value is None
    assert "probability 0 on 200" in (m1.estimates["ips"].reason or "")
    assert m1.estimates["dr"].value is not None
    assert "200 requests without support" in (m1.estimates["dr"].reason or "")


def test_missing_rewards_and_bad_propensities_are_excluded_and_counted() -> None:
    ds = bandit_logs(2, 1000)
    ds.rewards[:50] = np.nan
    ds.propensity[50:60] = 0.0
    report = estimate_policy_values(ds)
    assert report.excluded == {"no_reward": 50, "invalid_propensity": 10, "unknown_served_arm": 0}
    assert report.n == 940
    assert report.policy_types == {"epsilon_greedy": 940}
    diag = report.arms["m1"]
    assert diag.effective_sample_size is not None
    assert 0 < diag.effective_sample_size <= diag.n_served + 1e-9
    assert "own logged score" in diag.reward_model


def test_no_rewards_at_all() -> None:
    ds = bandit_logs(3, 100)
    ds.rewards[:] = np.nan
    report = estimate_policy_values(ds)
    assert report.n == 0
    assert report.arms == {}
    assert report.logging_value.reason == "no rewarded requests"


# -- cross-fitted reward model (DR must not collapse onto DM) ------------------------------------


def test_dr_is_not_dm_under_constant_propensities() -> None:
    """Epsilon-greedy: every arm's propensity is constant. With in-sample bin means the DR
    correction summed to exactly zero (DR == DM, 0.218204792867346 both in issue 13)."""
    ds = bandit_logs(21)
    report = estimate_policy_values(ds, folds=5, seed=3)
    n = len(ds)
    arms = ARMS
    served_idx = np.array([arms.index(s) for s in ds.served])
    scores = np.column_stack([ds.models[a].scores for a in arms])
    model = fit_cross_fitted_reward_model(
        RewardLogs(ds.rewards, served_idx, scores, arms), folds=5, seed=3
    )
    for k, a in enumerate(arms):
        est = report.arms[a].estimates
        assert est["dr"].value != pytest.approx(est["dm"].value, abs=1e-6)
        w = np.where(served_idx == k, 1.0 / ds.propensity, 0.0)
        correction = np.mean(w * (ds.rewards - model.predictions[np.arange(n), served_idx]))
        assert est["dm"].value == pytest.approx(model.predictions[:, k].mean(), abs=1e-12)
        assert est["dr"].value == pytest.approx(est["dm"].value + correction, abs=1e-12)
        assert "cross-fitted over 5 folds" in report.arms[a].reward_model


def test_cross_fitted_predictions_never_see_their_own_rewards() -> None:
    ds = bandit_logs(22, 1500)
    served_idx = np.array([ARMS.index(s) for s in ds.served])
    scores = np.column_stack([ds.models[a].scores for a in ARMS])
    first = fit_cross_fitted_reward_model(RewardLogs(ds.rewards, served_idx, scores, ARMS),
                                          folds=3, seed=1)
    fold0 = first.fold == 0
    assert 0.25 < fold0.mean() < 0.42  # stratified folds of about a third
    flipped = np.where(fold0, 1.0 - ds.rewards, ds.rewards)  # change only fold 0's rewards
    second = fit_cross_fitted_reward_model(RewardLogs(flipped, served_idx, scores, ARMS),
                                           folds=3, seed=1)
    assert np.array_equal(first.predictions[fold0], second.predictions[fold0])
    assert not np.array_equal(first.predictions[~fold0], second.predictions[~fold0])


def test_folds_and_seed_change_only_the_model_based_estimators() -> None:
    ds = bandit_logs(23)
    a = estimate_policy_values(ds, folds=2, seed=0)
    b = estimate_policy_values(ds, folds=4, seed=9)
    assert a.to_dict() == estimate_policy_values(ds, folds=2, seed=0).to_dict()  # seeded
    for arm in ARMS:
        for e in ("ips", "snips"):
            assert a.arms[arm].estimates[e] == b.arms[arm].estimates[e]
        assert a.arms[arm].estimates["dr"].value != b.arms[arm].estimates["dr"].value
    with pytest.raises(ValueError, match="at least 2 folds"):
        estimate_policy_values(ds, folds=1)


def test_dr_stays_unbiased_when_the_reward_model_is_wrong() -> None:
    """Fast version of the STATISTICS.md run: m1's reward drifts while the policy explores it
    less and less; its score does not know. DM is biased, DR (and IPS) are not."""
    runs = 80
    res = offpolicy_study("drift", runs=runs, n=2000, seed=5)["m1"]
    assert abs(res["dr"]["bias"]) < 3 * res["dr"]["bias_se"] + 0.002, res["dr"]
    assert res["dm"]["bias"] > 3 * res["dm"]["bias_se"], res["dm"]
    assert res["dr"]["mean_abs_minus_dm"] > 0.01
    assert res["dr"]["coverage"] >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / runs)
