"""PROMOTE / KEEP / INCONCLUSIVE end to end on simulated routes, and a fast A/A + power study."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from devtools.simulate.tests import (
    World,
    aa_study,
    power_study,
    simulate_dataset,
    subset,
)
from evaluator.dataset import STATUS_CODES, EvalDataset, ModelColumn
from evaluator.decision import ChallengerDecision, DecisionPolicy, decide

BETTER = World(sigma_challenger=0.5)
WORSE = World(sigma_champion=0.5)


def _one(ds: EvalDataset, policy: DecisionPolicy | None = None) -> ChallengerDecision:
    decisions = decide(ds, policy)
    assert len(decisions) == 1
    json.dumps(decisions[0].to_dict(), allow_nan=False)  # the report's contract
    return decisions[0]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_clearly_better_challenger_is_promoted_with_reasons() -> None:
    d = _one(simulate_dataset(_rng(1), 6000, BETTER))
    assert d.decision == "PROMOTE"
    assert d.reasons[0].startswith("PROMOTE: challenger significantly better on AUROC")
    assert d.checks["significantly_better"] is True
    assert d.checks["sequential_agrees"] is True
    assert d.checks["guardrails"] == "pass"
    out = d.to_dict()
    assert out["primary"]["test"] == "delong"
    assert out["primary"]["improvement"] > 0
    assert out["primary"]["p_adjusted"] == out["primary"]["p_value"]  # one challenger
    assert out["sequential"]["used_for_decision"] is True
    assert len(out["sequential"]["path"]["p_value"]) == 14  # one look per day
    assert {"mcnemar", "paired_t_log_loss", "wilcoxon_log_loss"} <= set(out["secondary"])
    assert out["power"]["required_n"] > 0
    assert out["policy"]["primary_metric"] == "auroc"


@pytest.mark.parametrize("metric", ["auroc", "log_loss", "brier", "accuracy"])
def test_clearly_worse_challenger_is_kept(metric: str) -> None:
    d = _one(simulate_dataset(_rng(2), 6000, WORSE), DecisionPolicy(primary_metric=metric))  # type: ignore[arg-type]
    assert d.decision == "KEEP"
    assert "significantly worse" in d.reasons[0]
    assert d.primary.improvement is not None
    assert d.primary.improvement < 0


def test_aa_with_little_data_is_inconclusive_with_sample_size() -> None:
    d = _one(simulate_dataset(_rng(3), 1500, World()))
    assert d.decision == "INCONCLUSIVE"
    assert d.power is not None
    assert d.power.required_n is not None
    assert f"need about {max(d.power.required_n, 1000):,}" in d.reasons[0]


def test_not_enough_samples_blocks_any_quality_verdict() -> None:
    d = _one(simulate_dataset(_rng(4), 600, BETTER))  # clearly better, but n < min_samples
    assert d.decision == "INCONCLUSIVE"
    assert d.checks["enough_samples"] is False
    assert "not enough labelled requests" in d.reasons[0]


def _with_challenger(ds: EvalDataset, **changes: object) -> EvalDataset:
    models = dict(ds.models)
    models["challenger"] = replace(models["challenger"], **changes)  # type: ignore[arg-type]
    return replace(ds, models=models)


def test_latency_guardrail_breach_blocks_even_a_better_model() -> None:
    ds = simulate_dataset(_rng(5), 6000, BETTER)
    slow = _with_challenger(ds, latency_ms=ds.models["challenger"].latency_ms * 3)
    d = _one(slow)
    assert d.decision == "BLOCKED"
    assert d.reasons[0] == "BLOCKED: guardrail failed (latency_p99_ratio)"
    assert any("latency_p99_ratio" in r and "FAIL" in r for r in d.reasons)
    assert d.checks["significantly_better"] is True


def test_error_rate_guardrail_breach_and_exclusions() -> None:
    ds = simulate_dataset(_rng(6), 6000, BETTER)
    status = ds.models["challenger"].status.copy()
    scores = ds.models["challenger"].scores.copy()
    status[::20] = STATUS_CODES["timeout"]  # 5% timeouts
    scores[::20] = np.nan
    status[1::50] = STATUS_CODES["shed"]  # shed copies: not the challenger's failures
    scores[1::50] = np.nan
    d = _one(_with_challenger(ds, status=status, scores=scores))
    assert d.decision == "BLOCKED"
    check = next(c for c in d.guardrails.checks if c.name == "error_rate_delta")
    assert check.passed is False
    assert check.challenger == pytest.approx(300 / (6000 - 120))
    assert d.excluded["challenger_not_ok"] == 420
    assert d.n_labelled == 6000 - 420


def test_guardrails_without_enough_requests_block_promotion_only() -> None:
    ds = simulate_dataset(_rng(7), 3000, BETTER)
    policy = DecisionPolicy(guardrail_min_requests=5000, min_samples=500)
    d = _one(ds, policy)
    assert d.guardrails.status == "insufficient"
    assert d.decision == "INCONCLUSIVE"
    assert d.reasons[0] == "INCONCLUSIVE: better, but guardrails lack data"


def test_single_class_and_empty_windows() -> None:
    ds = simulate_dataset(_rng(8), 2000, World())
    zeros = replace(ds, labels=np.zeros(len(ds)))
    d = _one(zeros)
    assert d.decision == "INCONCLUSIVE"
    assert "AUROC undefined" in d.reasons[0]
    empty = subset(ds, slice(0, 0))
    d = _one(empty)
    assert d.decision == "INCONCLUSIVE"
    assert d.n_labelled == 0


def test_policy_validation_and_task_mismatch() -> None:
    ds = simulate_dataset(_rng(9), 500, World())
    with pytest.raises(ValueError, match="is for regression"):
        decide(ds, DecisionPolicy(primary_metric="rmse"))
    with pytest.raises(ValueError, match="primary_metric"):
        DecisionPolicy(primary_metric="f1")  # type: ignore[arg-type]
    only_champion = replace(ds, models={"champion": ds.models["champion"]})
    assert decide(only_champion) == []


def test_policy_from_config_mapping() -> None:
    config_keys = {
        "primary_metric": "log_loss",
        "alpha": 0.01,
        "margin": 0.005,
        "min_samples": 2000,
        "min_effect": 0.02,
        "max_latency_p99_ratio": 2.0,
        "max_error_rate_delta": 0.02,
        "sequential": False,
    }
    policy = DecisionPolicy.from_mapping(config_keys)
    assert policy.use_sequential is False
    assert policy.margin == 0.005
    assert policy.guardrail_limits.max_latency_p99_ratio == 2.0
    assert DecisionPolicy.from_mapping(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="unknown decision policy key"):
        DecisionPolicy.from_mapping({"alpah": 0.05})


def test_holm_across_challengers() -> None:
    ds = simulate_dataset(_rng(10), 4000, World(sigma_challenger=0.9), challengers=3)
    decisions = decide(ds, DecisionPolicy(min_samples=500))
    assert [d.challenger for d in decisions] == ["challenger1", "challenger2", "challenger3"]
    raw = [d.primary.p_value for d in decisions]
    expected = multipletests(raw, alpha=0.05, method="holm")[1]
    assert [d.p_adjusted for d in decisions] == pytest.approx(list(expected))
    seq_raw = [d.sequential.p_value for d in decisions if d.sequential is not None]
    seq_expected = multipletests(seq_raw, alpha=0.05, method="holm")[1]
    assert [d.sequential_p_adjusted for d in decisions] == pytest.approx(list(seq_expected))
    assert all(d.power is not None and d.power.alpha == pytest.approx(0.05 / 3) for d in decisions)


def test_futility_keep_is_always_valid_and_fixed_horizon_rule_only_when_sequential_off() -> None:
    ds = simulate_dataset(_rng(11), 8000, World())
    strict = DecisionPolicy(primary_metric="log_loss", min_effect=0.02, margin=0.0)
    d = _one(ds, strict)
    assert d.decision == "KEEP"
    assert d.reasons[0].startswith("KEEP: not better by the minimum effect")
    assert d.sequential is not None
    assert d.checks["not_better_by_min_effect"] is True
    assert d.sequential.cs_high[-1] < 0.02 < d.sequential.cs_high[0]
    assert d.checks["significantly_worse"] is False
    # One pre-planned look (use_sequential off): the fixed-horizon non-inferiority rule.
    fixed = replace(strict, use_sequential=False)
    f = _one(ds, fixed)
    assert f.power is not None
    assert f.power.required_n is not None
    assert f.n_labelled >= f.power.required_n
    assert f.decision == "KEEP"
    assert "non-inferiority (margin 0) is not shown" in f.reasons[0]
    lenient = _one(ds, replace(fixed, margin=0.02))
    assert lenient.decision == "INCONCLUSIVE"
    assert lenient.checks["non_inferior"] is True
    assert "non-inferior (margin 0.02) but not shown better" in lenient.reasons[0]
    assert not any("> -0 " in r or "a AUROC" in r for r in d.reasons + f.reasons)


def test_sequential_test_must_confirm_a_fixed_horizon_win() -> None:
    world = World(sigma_challenger=0.93)
    for seed in range(60):
        ds = simulate_dataset(_rng(100 + seed), 3000, world)
        d = _one(ds, DecisionPolicy(min_samples=500))
        fixed_win = d.p_adjusted is not None and d.p_adjusted <= 0.05
        if fixed_win and d.primary.improvement > 0 and d.checks["sequential_agrees"] is False:  # type: ignore[operator]
            break
    else:
        pytest.fail("no seed where the fixed-horizon test wins alone")
    assert d.decision == "INCONCLUSIVE"
    assert "always-valid test does not confirm" in d.reasons[0]
    off = _one(ds, DecisionPolicy(min_samples=500, use_sequential=False))
    assert off.decision == "PROMOTE"


def _regression(seed: int, n: int, sigma_c: float, sigma_h: float) -> EvalDataset:
    rng = _rng(seed)
    y = rng.normal(50, 10, n)
    common = rng.standard_normal(n)
    ok = np.zeros(n, dtype=np.int8)

    def col(name: str, role: str, sigma: float) -> ModelColumn:
        pred = y + sigma * (0.6 * common + 0.8 * rng.standard_normal(n))
        return ModelColumn(name, role, pred, ok, rng.lognormal(1.5, 0.2, n))  # type: ignore[arg-type]

    ones = np.ones(n)
    return EvalDataset(
        "price",
        "regression",
        "reg_v1",
        np.arange(n).astype(object),
        np.sort(rng.uniform(0, 7 * 86_400, n)),
        y,
        np.full(n, np.nan),
        np.full(n, "reg_v1", dtype=object),
        ones,
        {"reg_v1": ones},
        np.full(n, "champion", dtype=object),
        {
            "reg_v1": col("reg_v1", "champion", sigma_c),
            "reg_v2": col("reg_v2", "challenger", sigma_h),
        },
    )


@pytest.mark.parametrize("metric", ["rmse", "mae"])
def test_regression_promote_and_keep(metric: str) -> None:
    policy = DecisionPolicy(primary_metric=metric, min_effect=0.1)  # type: ignore[arg-type]
    better = _one(_regression(12, 3000, 3.0, 2.5), policy)
    assert better.decision == "PROMOTE"
    assert better.primary.test == ("delta_method_z" if metric == "rmse" else "paired_t")
    assert better.n_positive is None
    worse = _one(_regression(13, 3000, 2.5, 3.0), policy)
    assert worse.decision == "KEEP"


# ------------------------------------------------------------------------------------------
# Fast version of devtools/simulate/tests.py (the full run is recorded in docs/STATISTICS.md)
# ------------------------------------------------------------------------------------------


def test_fast_aa_simulation_controls_false_promotions() -> None:
    reps, alpha = 60, 0.05
    rates = aa_study("log_loss", reps=reps, n=1000, days=5, min_samples=150, seed=500)
    mcse = (alpha * (1 - alpha) / reps) ** 0.5
    assert rates["fixed_once"].rate <= alpha + 2 * mcse
    assert rates["sequential_once"].rate <= alpha + 2 * mcse
    assert rates["sequential_daily"].rate <= alpha + 2 * mcse
    assert rates["fixed_daily"].rate >= rates["fixed_once"].rate
    assert rates["fixed_daily"].rate > rates["sequential_daily"].rate


def test_fast_power_simulation_matches_power_analysis() -> None:
    study = power_study(
        "log_loss", 0.02, reps=80, seed=900, pilot_n=8000, mc_n=60_000, with_sequential=False
    )
    rate = study["fixed"]
    assert abs(rate.rate - study["target_power"]) <= 3 * (0.8 * 0.2 / rate.reps) ** 0.5


def test_guardrail_summaries_against_numpy() -> None:
    from evaluator.gates.guardrails import GuardrailLimits, check_guardrails, latency_summary

    rng = _rng(14)
    n = 2000
    lat = rng.lognormal(2.0, 0.5, n)
    status = np.zeros(n, dtype=np.int8)
    status[:40] = STATUS_CODES["error"]
    status[40:60] = STATUS_CODES["timeout"]
    status[60:160] = STATUS_CODES["shed"]
    lat[60:160] = np.nan  # shed copies have no latency
    s = latency_summary(lat, status)
    attempted = lat[160:].tolist() + lat[:60].tolist()
    assert s.n == n - 100
    assert s.p99_ms == pytest.approx(np.percentile(attempted, 99))
    assert s.p99_ci_low_ms <= s.p99_ms <= s.p99_ci_high_ms  # type: ignore[operator]
    champ = ModelColumn("c", "champion", np.zeros(n), np.zeros(n, dtype=np.int8), lat)
    chall = ModelColumn("h", "challenger", np.zeros(n), status, lat * 1.2)
    result = check_guardrails(champ, chall, GuardrailLimits(max_error_rate_delta=0.05))
    outcome = result.outcomes["h"]
    assert (outcome.attempted, outcome.error, outcome.timeout, outcome.shed) == (1900, 40, 20, 100)
    assert outcome.error_rate == pytest.approx(60 / 1900)
    assert result.status == "pass"
    ratio = next(c for c in result.checks if c.name == "latency_p99_ratio")
    assert ratio.observed == pytest.approx(1.2)  # same requests, every latency x 1.2
    json.dumps(result.to_dict(), allow_nan=False)


def test_batched_copies_without_latency_are_named_when_latency_samples_are_short() -> None:
    ds = simulate_dataset(_rng(9), 3000, BETTER)
    latency = ds.models["challenger"].latency_ms.copy()
    latency[np.arange(len(latency)) % 20 != 0] = np.nan  # batched: only every 20th measured
    d = _one(_with_challenger(ds, latency_ms=latency),
             DecisionPolicy(guardrail_min_requests=200, min_samples=500))
    check = next(c for c in d.guardrails.checks if c.name == "latency_p99_ratio")
    assert check.passed is None  # insufficient: blocks a promotion, does not force a KEEP
    assert "2,850 of the challenger's copies shared a batched Triton call" in check.detail
    assert d.decision == "INCONCLUSIVE"
