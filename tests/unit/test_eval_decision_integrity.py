"""Issue 13's decision rules: directional always-valid verdicts, BLOCKED, the data-health gate,
experiment rows, label-arrival order, and a fast version of the daily-schedule simulation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from devtools.simulate.tests import (
    Schedule,
    World,
    _report_view,
    schedule_study,
    simulate_dataset,
    simulate_schedule_route,
    world_with_gain,
)
from evaluator.config import load_config, parse_config
from evaluator.dataset import STATUS_CODES, EvalDataset, ExperimentInfo
from evaluator.decision import ChallengerDecision, DecisionPolicy, decide
from evaluator.stats.significance import corrected_levels

BETTER = World(sigma_challenger=0.5)
WORSE = World(sigma_champion=0.5)


@dataclass
class FakeHealth:
    """Test double of evaluator.gates.health's DataHealthResult (status / reasons / to_dict)."""

    status: str
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": list(self.reasons), "checks": []}


class HealthSpy:
    """Stands in for check_data_health: records what it was given, answers ``result``."""

    def __init__(self, result: FakeHealth) -> None:
        self.result = result
        self.calls: list[tuple[int, str, float]] = []

    def __call__(self, dataset: EvalDataset, challenger: str, alpha: float = 0.001) -> FakeHealth:
        self.calls.append((len(dataset), challenger, alpha))
        return self.result


def _one(ds: EvalDataset, policy: DecisionPolicy | None = None, **kw: Any) -> ChallengerDecision:
    decisions = decide(ds, policy, **kw)
    assert len(decisions) == 1
    json.dumps(decisions[0].to_dict(), allow_nan=False)
    return decisions[0]


def _worse_then_better(
    seed: int = 2, per_day: int = 500, after: float = 0.5, label_order: bool = True
) -> EvalDataset:
    """Worse for 2 days (sigma 2.0), better after; the report at the end of day 14."""
    schedule = Schedule(days=14, per_day=per_day, label_order=label_order)
    ds = simulate_schedule_route(
        np.random.default_rng(seed),
        World(sigma_challenger=after),
        schedule,
        before=World(sigma_challenger=2.0),
        switch_days=2.0,
    )
    return _report_view(ds, 14, schedule)


def test_worse_then_better_is_inconclusive_effect_not_stable() -> None:
    d = _one(_worse_then_better())
    assert d.sequential is not None
    low, high = d.sequential.cs_low[-1], d.sequential.cs_high[-1]
    assert low > high  # the confidence sequence is empty
    # What used to promote it: a two-sided always-valid p <= alpha, a significant fixed-horizon
    # test and a positive estimate.
    assert d.sequential_p_adjusted is not None and d.sequential_p_adjusted <= 0.05
    assert d.p_adjusted is not None and d.p_adjusted <= 0.05
    assert d.primary.improvement is not None and d.primary.improvement > 0
    assert d.decision == "INCONCLUSIVE"
    assert d.reasons[0].startswith("INCONCLUSIVE: effect not stable")
    assert d.checks["cs_state"] == "empty"
    assert d.checks["effect_stable"] is False
    assert d.to_dict()["sequential"]["cs_state"] == "empty"


def test_cs_on_the_other_side_of_the_estimate_is_not_stable() -> None:
    d = _one(_worse_then_better(seed=0, per_day=300, after=0.6))
    assert d.sequential is not None
    assert d.sequential.cs_low[-1] <= d.sequential.cs_high[-1] < 0  # not empty: below zero
    assert d.primary.improvement is not None and d.primary.improvement > 0  # but now better
    assert d.decision == "INCONCLUSIVE"
    assert d.reasons[0].startswith("INCONCLUSIVE: effect not stable")
    assert "below 0 but the current estimate is +" in d.reasons[0]
    assert d.checks["significantly_worse"] is False


def test_promote_needs_the_cs_above_zero_and_keep_the_cs_below() -> None:
    better = _one(simulate_dataset(np.random.default_rng(1), 6000, BETTER))
    assert better.decision == "PROMOTE"
    assert better.sequential is not None
    assert better.sequential.cs_low[-1] > 0
    assert better.checks["cs_state"] == "above"
    assert "lower bound" in better.reasons[0]
    worse = _one(simulate_dataset(np.random.default_rng(2), 6000, WORSE))
    assert worse.decision == "KEEP"
    assert worse.sequential is not None
    assert worse.sequential.cs_high[-1] < 0
    assert worse.checks["cs_state"] == "below"
    # Sign convention: every number in the reasons is an improvement (positive = better).
    assert any("improvement -" in r for r in worse.reasons)
    assert not any("difference" in r for r in worse.reasons)


def test_loss_metrics_report_improvements_with_positive_better() -> None:
    d = _one(
        simulate_dataset(np.random.default_rng(1), 6000, BETTER),
        DecisionPolicy(primary_metric="log_loss"),
    )
    assert d.decision == "PROMOTE"
    line = next(r for r in d.reasons if r.startswith("log loss (lower is better)"))
    assert "improvement +" in line
    power = next(r for r in d.reasons if r.startswith("power analysis"))
    assert "achieved power at the minimum effect:" in power
    assert "required n " in power


def test_guardrail_failure_is_blocked_not_keep() -> None:
    ds = simulate_dataset(np.random.default_rng(5), 6000, BETTER)
    models = dict(ds.models)
    status = models["challenger"].status.copy()
    status[::10] = STATUS_CODES["error"]  # 10% errors against the champion's 0%
    scores = models["challenger"].scores.copy()
    scores[::10] = np.nan
    models["challenger"] = replace(models["challenger"], status=status, scores=scores)
    d = _one(replace(ds, models=models))
    assert d.decision == "BLOCKED"
    assert d.reasons[0] == "BLOCKED: guardrail failed (error_rate_delta)"
    assert d.checks["significantly_better"] is True  # quality alone would have promoted
    assert d.to_dict()["decision"] == "BLOCKED"


def test_data_health_failure_is_inconclusive_with_the_reason() -> None:
    ds = simulate_dataset(np.random.default_rng(1), 6000, BETTER)
    policy = DecisionPolicy(health_alpha=0.002)
    spy = HealthSpy(FakeHealth("fail", ["shedding is not random (74% of copies shed)"]))
    d = _one(ds, policy, health_check=spy)
    assert spy.calls == [(6000, "challenger", 0.002)]
    assert d.decision == "INCONCLUSIVE"
    assert d.reasons[0] == "INCONCLUSIVE: data health: shedding is not random (74% of copies shed)"
    assert d.checks["data_health"] == "fail"
    assert d.to_dict()["data_health"]["status"] == "fail"
    ok = _one(ds, policy, health_check=HealthSpy(FakeHealth("pass")))
    assert ok.decision == "PROMOTE"
    assert ok.to_dict()["data_health"] == {"status": "pass", "reasons": [], "checks": []}
    unsure = _one(ds, policy, health_check=HealthSpy(FakeHealth("insufficient")))
    assert unsure.decision == "PROMOTE"  # "insufficient" informs, it does not block


def test_decision_uses_only_the_current_experiments_rows() -> None:
    ds = simulate_dataset(np.random.default_rng(1), 6000, BETTER)
    n = len(ds)
    old = np.arange(n) < n // 2
    exp_ids = np.where(old, "exp-a", "exp-b").astype(object)
    chall = ds.models["challenger"]
    # In the old experiment the challenger was a different (terrible) configuration.
    scores = np.where(old, 1.0 - chall.scores, chall.scores)
    models = dict(ds.models)
    models["challenger"] = replace(chall, scores=scores, experiment=exp_ids)
    mixed = replace(ds, models=models)
    # No experiment entry: every row, as before — terrible, then better: not stable.
    assert _one(mixed).reasons[0].startswith("INCONCLUSIVE: effect not stable")
    info = ExperimentInfo("exp-b", float(ds.ts[n // 2]), float(ds.ts[-1]), "champion", 7)
    current = replace(mixed, experiments={"challenger": info})
    spy = HealthSpy(FakeHealth("pass"))
    d = _one(current, health_check=spy)
    assert d.decision == "PROMOTE"
    assert d.n_labelled == n - n // 2
    assert d.excluded["other_experiment"] == n // 2
    assert spy.calls[0][0] == n - n // 2  # the health gate sees the same rows
    assert d.guardrails.outcomes["challenger"].total == n - n // 2
    out = d.to_dict()["experiment"]
    assert out == {
        "id": "exp-b",
        "started": info.started,
        "data_end": info.data_end,
        "champion": "champion",
        "registry_version": 7,
    }
    assert "experiment exp-b" in d.reasons[1]


def test_sequential_observations_follow_label_arrival() -> None:
    schedule = Schedule(days=10, per_day=400)
    ds = simulate_schedule_route(np.random.default_rng(3), BETTER, schedule)
    view = _report_view(ds, 10, schedule)
    d = _one(view)
    assert d.sequential is not None
    assert view.label_ts is not None
    # Each daily look ends at a label-arrival day boundary: n matches labels received by then.
    day = np.floor(view.label_ts / 86_400.0)
    expected = np.array([np.count_nonzero(day <= k) for k in np.unique(day)])
    assert d.sequential.n.tolist() == expected.tolist()
    assert d.sequential.ts[-1] == pytest.approx(view.label_ts.max())
    by_inference = _one(replace(view, label_ts=None))
    assert by_inference.sequential is not None
    assert by_inference.sequential.n.tolist() != expected.tolist()


@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh", "none"])
def test_corrected_levels_reproduce_the_correction(method: str) -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):  # statsmodels' multipletests takes ~0.1 s a call
        k = int(rng.integers(1, 6))
        p = (rng.random(k) ** 3).tolist()
        levels = corrected_levels(p, 0.05, method)
        ours = [pi <= lv for pi, lv in zip(p, levels, strict=True)]
        if method == "none" or k == 1:
            expected = [pi <= 0.05 for pi in p]
        else:
            expected = list(multipletests(p, alpha=0.05, method=method)[0])
        assert ours == expected


def test_holm_levels_reach_each_challengers_confidence_sequence() -> None:
    world = World(sigma_challenger=0.6)
    ds = simulate_dataset(np.random.default_rng(10), 4000, world, challengers=3)
    decisions = decide(ds, DecisionPolicy(min_samples=500))
    raw = [d.sequential.p_value for d in decisions if d.sequential is not None]
    levels = corrected_levels(raw, 0.05, "holm")
    for d, level in zip(decisions, levels, strict=True):
        assert d.sequential is not None
        assert d.checks["cs_level"] == pytest.approx(level)
        assert d.sequential.alpha == pytest.approx(level)
        assert d.to_dict()["sequential"]["family_alpha"] == 0.05
        assert (d.checks["cs_state"] == "above") == (d.decision == "PROMOTE")


def test_policy_carries_the_new_keys_from_the_config() -> None:
    config = load_config("configs/evaluator.yaml", env={})
    policy = DecisionPolicy.from_mapping(config.decision_for("fraud"))
    assert policy.max_latency_p99_margin_ms == 2.0
    assert policy.health_alpha == 0.001
    raw = {"decision": {"max_latency_p99_margin_ms": 5, "health_alpha": 0.01,
                        "max_report_age": "12h"}}
    custom = DecisionPolicy.from_mapping(parse_config(raw, env={}).decision_for("fraud"))
    assert custom.max_latency_p99_margin_ms == 5
    assert custom.health_alpha == 0.01
    assert DecisionPolicy.from_mapping(custom.to_dict()) == custom
    with pytest.raises(ValueError, match="health_alpha"):
        DecisionPolicy(health_alpha=0.0)


# ------------------------------------------------------------------------------------------
# Fast versions of the schedule studies (full runs: docs/STATISTICS.md)
# ------------------------------------------------------------------------------------------

FAST = Schedule(days=20, per_day=300, label_delay_days=1.5)


def test_fast_schedule_aa_false_promotions_below_alpha() -> None:
    reps, alpha = 40, 0.05
    study = schedule_study(World(), FAST, reps, seed=50_000)
    # Binomial tolerance: more than this many PROMOTEs has probability < 0.1% at rate alpha.
    assert study["promote"].hits <= stats.binom.ppf(0.999, reps, alpha)
    assert study["promote_wrong_side"].hits == 0


def test_fast_worse_then_better_never_promoted_on_the_wrong_side() -> None:
    schedule = replace(FAST, per_day=500)
    study = schedule_study(
        World(sigma_challenger=0.5), schedule, 12, seed=70_000,
        before=World(sigma_challenger=2.0), switch_days=2.0,
    )
    assert study["promote_wrong_side"].hits == 0
    inference = schedule_study(
        World(sigma_challenger=0.5), replace(schedule, label_order=False), 12, seed=70_000,
        before=World(sigma_challenger=2.0), switch_days=2.0,
    )
    assert inference["promote_wrong_side"].hits == 0


def test_fast_truly_better_challenger_is_never_kept_as_worse() -> None:
    world = world_with_gain("auroc", 0.02, mc_n=60_000)
    study = schedule_study(world, FAST, 12, seed=60_000)
    assert study["keep_worse_ever"].hits == 0
    assert study["promote"].hits >= 6
