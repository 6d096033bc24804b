"""The data-health gate: each check against a reference or a constructed fault, fast Monte Carlo
versions of the STATISTICS.md runs, and the gate on a dataset read through the real store."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from devtools.simulate.guardrails import health_dataset, health_study
from evaluator.config import parse_config
from evaluator.dataset import STATUS_CODES, ExperimentInfo
from evaluator.gates.health import check_data_health, sample_ratio_check
from evaluator.ingest import FileIngestor
from evaluator.stats.offpolicy import estimate_policy_values
from evaluator.store import Store
from tests.conftest import GatewayFactory
from tests.integration.test_exploration import explore_route, serve
from tests.unit.test_eval_store import CHAL, CHAMP, T0, LogDir, inference, label, outcome
from understudy_demo.traffic import FraudTraffic


def test_healthy_route_passes_with_three_p_values() -> None:
    res = check_data_health(health_dataset(1, 5000), "h")
    assert res.status == "pass" and res.reasons == []
    assert [c.name for c in res.checks] == ["sample_ratio", "coverage", "shedding"]
    for c in res.checks:
        assert c.status == "pass" and c.p_value is not None
        assert c.p_adjusted == pytest.approx(min(1.0, 3 * c.p_value))
    json.dumps(res.to_dict(), allow_nan=False)


def test_sample_ratio_reduces_to_pearson_with_constant_probabilities() -> None:
    rng = np.random.default_rng(2)
    n, probs = 3000, np.array([0.7, 0.2, 0.1])
    served = np.array(["a", "b", "c"], dtype=object)[rng.choice(3, n, p=probs)]
    check, p = sample_ratio_check(served, {a: np.full(n, q) for a, q in zip("abc", probs,
                                                                              strict=True)})
    observed = [np.count_nonzero(served == a) for a in "abc"]
    ref = stats.chisquare(observed, n * probs)
    assert check.statistic == pytest.approx(ref.statistic, rel=1e-9)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)


def test_sample_ratio_skips_a_policy_that_does_not_explore() -> None:
    n = 100
    check, p = sample_ratio_check(np.full(n, "a", dtype=object), {"a": np.ones(n),
                                                                  "b": np.zeros(n)})
    assert check.status == "skipped" and p is None


@pytest.mark.parametrize(("fault", "check"), [("skewed_serving", "sample_ratio"),
                                              ("low_coverage", "coverage"),
                                              ("load_shedding", "shedding")])
def test_each_fault_fails_its_check_with_a_reason(fault: str, check: str) -> None:
    res = check_data_health(health_dataset(3, 20_000, fault), "h")
    assert res.status == "fail"
    failed = [c.name for c in res.checks if c.status == "fail"]
    assert failed == [check]
    assert len(res.reasons) == 1


def test_coverage_uses_the_exact_binomial_test() -> None:
    ds = health_dataset(4, 4000, "low_coverage")
    res = check_data_health(ds, "h")
    cov = next(c for c in res.checks if c.name == "coverage")
    attempted = int(np.count_nonzero(ds.models["h"].status != STATUS_CODES["skipped"]))
    assert cov.observed["attempted"] == attempted
    assert cov.p_value == pytest.approx(stats.binomtest(attempted, 4000, 0.5).pvalue)


def test_unknown_sample_rate_skips_coverage_and_few_lost_copies_skip_shedding() -> None:
    ds = health_dataset(5, 3000)
    h = ds.models["h"]
    status = np.where(h.status == STATUS_CODES["shed"], STATUS_CODES["ok"], h.status)
    status[:5] = STATUS_CODES["timeout"]
    models = dict(ds.models)
    models["h"] = replace(h, sample_rate=np.full(3000, np.nan), status=status.astype(np.int8))
    res = check_data_health(replace(ds, models=models), "h")
    by = {c.name: c for c in res.checks}
    assert by["coverage"].status == "skipped"
    assert by["shedding"].status == "skipped" and "too few" in by["shedding"].detail
    assert res.status == "pass"
    assert by["sample_ratio"].p_adjusted == by["sample_ratio"].p_value  # one test: no correction


def test_only_the_current_experiment_is_judged() -> None:
    bad = health_dataset(6, 20_000, "low_coverage")
    good = health_dataset(7, 20_000)
    exp = np.where(np.arange(20_000) < 10_000, "h-1", "h-2").astype(object)
    h_bad, h_good = bad.models["h"], good.models["h"]
    # first half of the rows from the broken experiment, second half from the healthy one
    status = np.where(np.arange(20_000) < 10_000, h_bad.status, h_good.status).astype(np.int8)
    models = dict(good.models)
    models["h"] = replace(h_good, status=status, experiment=exp)
    ds = replace(good, models=models)
    assert check_data_health(ds, "h").status == "fail"  # all rows: the broken half shows
    ds.experiments["h"] = ExperimentInfo("h-2", T0, T0, "c", 3)
    res = check_data_health(ds, "h")
    assert res.status == "pass" and res.experiment == "h-2" and res.n == 10_000


# -- fast versions of the simulations -----------------------------------------------------------


def test_healthy_data_rarely_fails_the_gate() -> None:
    reps = 150
    r = health_study(2000, "healthy", reps, seed=80_000)
    # alpha 0.001: a single false fail in 150 would already be surprising
    assert r["gate"].hits <= 1, r["gate"]


def test_non_random_shedding_is_detected_at_10k() -> None:
    r = health_study(10_000, "load_shedding", 20, seed=81_000)
    assert r["shedding"].rate >= 0.9, r["shedding"]


# -- through the real store ---------------------------------------------------------------------


def test_gate_on_records_read_through_the_store(tmp_path: Path) -> None:
    """Epsilon-greedy logs with correct propensities, but the challenger's copies are shed when
    the champion's score is high (load peaks): the gate fails on shedding, nothing else."""
    config = parse_config({"source": {"path": str(tmp_path / "log")},
                           "store": {"path": str(tmp_path / "store.duckdb")}}, env={})
    log = LogDir(tmp_path / "log")
    rng = np.random.default_rng(9)
    n = 3000
    champ_score = rng.random(n)
    records = []
    for i in range(n):
        served_chal = rng.random() < 0.1
        shed = rng.random() < (0.7 if champ_score[i] > 0.6 else 0.1)
        chal = outcome(float(rng.random()), mode="explore", status="shed" if shed else "ok")
        chal["sample_rate"] = 1.0
        champ = outcome(float(champ_score[i]), role="champion",
                        mode="shadow" if served_chal else "served")
        if served_chal:
            chal = outcome(float(rng.random()), mode="served")
        records.append(inference(
            f"r{i}", T0 + i, policy={"type": "epsilon_greedy", "epsilon": 0.2},
            served={"model": CHAL if served_chal else CHAMP, "version": "1"},
            propensity=0.1 if served_chal else 0.9, arms={CHAMP: 0.9, CHAL: 0.1},
            outputs={CHAMP: champ, CHAL: chal}))
    log.inferences(*records)
    log.labels(*(label(f"r{i}", float(rng.random() < 0.3), T0 + n + 60) for i in range(n)))
    with Store.open(config.store) as store:
        FileIngestor(config, store).drain()
        ds = store.load_dataset("fraud")
    assert len(ds) == n
    res = check_data_health(ds, CHAL)
    by = {c.name: c for c in res.checks}
    assert by["sample_ratio"].status == "pass"
    assert by["sample_ratio"].observed[CHAL] == np.count_nonzero(ds.served == CHAL)
    assert by["coverage"].status in ("skipped", "pass")  # pass once ingest reads sample_rate
    assert by["shedding"].status == "fail" and by["shedding"].p_value < 1e-6
    assert res.status == "fail" and res.reasons[0].startswith("lost copies are not random")
    assert math.isfinite(by["shedding"].statistic)


def test_sample_ratio_p_values_are_calibrated_when_probabilities_change() -> None:
    """Thompson-like logs: the probabilities move from request to request (the Wald form's
    covariance is what keeps this calibrated; Pearson's would be conservative)."""
    rng = np.random.default_rng(10)
    n, reps, small = 2000, 300, 0
    for _ in range(reps):
        p_b = np.clip(0.2 + 0.15 * np.sin(np.arange(n) / 150) + 0.05 * rng.standard_normal(n),
                      0.01, 0.6)
        probs = {"a": 1 - p_b - 0.05, "b": p_b, "c": np.full(n, 0.05)}
        u = rng.random(n)
        served = np.where(u < probs["a"], "a", np.where(u < 1 - 0.05, "b", "c")).astype(object)
        _, p = sample_ratio_check(served, probs)
        small += p is not None and p < 0.05
    assert abs(small / reps - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / reps)


# -- through the real gateway and Triton ---------------------------------------------------------


@pytest.mark.triton
async def test_gate_and_doubly_robust_on_real_gateway_logs(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Epsilon-greedy through the gateway (real Triton), rewards posted as feedback, the logs
    read by the evaluator: the gate passes, and DR is finite and is not DM for the arms served
    (constant propensities: the case where DR used to equal DM to the last digit)."""
    gw = await make_gateway(explore_route({"type": "epsilon_greedy", "epsilon": 0.5}))
    x, y = FraudTraffic(seed=31).sample(600)
    await serve(gw, x, "d")
    await asyncio.sleep(0.3)  # records complete in the background
    feedback = [{"request_id": f"d{i}", "label": int(y[i]), "reward": float(y[i])}
                for i in range(600)]
    assert (await gw.post_json("/v2/feedback", feedback)).status == 200
    await gw.stop()
    config = parse_config({"source": {"path": str(gw.log_dir)},
                           "store": {"path": str(tmp_path / "eval.duckdb")}}, env={})
    with Store.open(config.store) as store:
        FileIngestor(config, store).drain()
        ds = store.load_dataset("fraud")
    assert len(ds) == 600
    health = check_data_health(ds, "fraud_v4")
    by = {c.name: c for c in health.checks}
    assert by["sample_ratio"].p_value is not None  # the policy explores: the check ran
    assert by["sample_ratio"].expected["fraud_v5"] == pytest.approx(150.0)  # 600 x 0.25
    assert health.status == "pass", health.reasons  # fails 0.1% of healthy runs by design
    report = estimate_policy_values(ds)
    assert report.n == 600
    for arm in ("fraud_v3", "fraud_v5"):
        est = report.arms[arm].estimates
        assert all(math.isfinite(est[e].value) for e in ("ips", "snips", "dm", "dr")), est
        assert est["dr"].value != pytest.approx(est["dm"].value, abs=1e-9)
    assert report.arms["fraud_v4"].estimates["dr"].value is None  # a shadow is never served


def test_an_explore_arm_is_due_on_every_exploring_request() -> None:
    ds = health_dataset(11, 3000)
    res = check_data_health(ds, "e")  # modes ("explore", "served"), logged sample rate 1.0
    cov = next(c for c in res.checks if c.name == "coverage")
    not_served = int(np.count_nonzero(ds.served != "e"))
    assert cov.n == not_served and cov.expected["attempted"] == not_served
    assert cov.status == "pass" and cov.p_value == 1.0
    e = ds.models["e"]
    status = e.status.copy()
    status[np.flatnonzero(ds.served != "e")[:3]] = STATUS_CODES["skipped"]  # 3 copies missing
    models = {**ds.models, "e": replace(e, status=status)}
    broken = check_data_health(replace(ds, models=models), "e")
    assert next(c for c in broken.checks if c.name == "coverage").status == "fail"
