"""Drift over time (issue 20): a reference that cannot learn an ongoing incident, the unseen
rule against the reference's own rate of new values, missing-value drift, segment-weighted
references and what each feature's monitor can detect — unit checks, the fast incident
simulation, and `python -m evaluator drift` run day after day on a log in the gateway's
format."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from devtools.simulate.drift import FAST_INCIDENT, simulate_incident
from evaluator import cli
from evaluator.config import DriftConfig
from evaluator.drift import (
    DriftMetrics,
    FeatureData,
    WebhookNotifier,
    categorical_drift,
    compute_drift,
    min_detectable_shift,
    numeric_drift,
    reference_bounds,
    unseen_baseline,
)
from evaluator.drift.seasonal import _segment_rows
from evaluator.drift.thresholds import _adaptive

CFG = DriftConfig()
DAY = 86400.0
T0 = 1_704_067_200.0  # Monday 2024-01-01


def _obj(values: Any) -> np.ndarray:
    items = list(values)
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# -- the null cannot learn an incident ---------------------------------------------------------


def test_robust_threshold_barely_moves_when_incident_days_enter_the_null() -> None:
    rng = np.random.default_rng(1)
    normal = list(np.abs(rng.normal(0, 0.05, 28)) ** 2 + 0.01)  # PSI of 28 normal days
    clean = _adaptive(0.05, normal, CFG, sqrt_scale=True)
    incident = [*normal[:-3], 0.3, 0.6, 0.9]  # three shifted days inside the reference
    robust = _adaptive(0.05, incident, CFG, sqrt_scale=True)
    assert robust.value < 1.5 * clean.value
    assert robust.null_center is not None and robust.periods == 28
    # mean + 3 SD, the old estimator, would have more than tripled
    x = np.sqrt(incident)
    assert (x.mean() + 3 * x.std(ddof=1)) ** 2 > 3 * clean.value


def _days(n_days: int, per_day: int, rng: np.random.Generator, shift_from: int | None = None,
          shift: float = 0.0, t0: float = T0) -> FeatureData:
    ts = t0 + np.repeat(np.arange(n_days) * DAY, per_day) + np.tile(
        np.linspace(0, DAY - 1, per_day), n_days)
    day = np.repeat(np.arange(n_days), per_day)
    moved = (day >= shift_from) if shift_from is not None else np.zeros(ts.size, dtype=bool)
    x = rng.normal(0, 1, (3, ts.size))
    x[:2] += moved * shift  # a and b move, c does not
    score = 1 / (1 + np.exp(-(x[0] + x[1] - 1)))
    return FeatureData(columns={"a": x[0], "b": x[1], "c": x[2]}, ts=ts, scores={"m": score},
                       score_ts={"m": ts}, roles={"m": "champion"}, source="sim",
                       since=float(ts[0]), until=float(ts[-1]) + 1)


def test_paged_past_windows_leave_the_null_and_the_reference() -> None:
    """Five days of a 0.6 SD shift in `a` and `b` already sit in the 21-day reference: the
    sixth day still pages, against the clean days, and the result says what was left out."""
    rng = np.random.default_rng(2)
    ref = _days(21, 400, rng, shift_from=16, shift=0.6)
    live_all = _days(1, 400, rng, shift_from=0, shift=0.6, t0=T0 + 21 * DAY)
    live = FeatureData(columns=live_all.columns, ts=live_all.ts, scores=live_all.scores,
                       score_ts=live_all.score_ts, roles=live_all.roles, source="live",
                       since=T0 + 21 * DAY, until=T0 + 22 * DAY)
    result = compute_drift(ref, live, DriftConfig(), route="r")
    assert result.seasonal["paged_windows_excluded"] == 5
    assert result.significant
    assert sorted(result.drifted_features) == ["a", "b"]
    by = {f.name: f for f in result.features}
    assert by["a"].threshold is not None and by["a"].threshold.excluded >= 5
    assert by["a"].n_ref == 16 * 400  # the five shifted days are not part of the reference
    assert "left out of the reference" in by["a"].why


def test_episode_pins_the_log_reference_until_it_closes(tmp_path: Path) -> None:
    n = WebhookNotifier(None, tmp_path / "state.json", clear_runs=2)
    assert n.pinned_until("r") is None
    assert reference_bounds(100.0, 30.0, None) == (70.0, 100.0)
    assert n.observe("r:drift", True, {}, reference_until=100.0) == "disabled"
    assert n.pinned_until("r") == 100.0
    assert n.observe("r:drift", True, {}, reference_until=150.0) == "disabled"
    assert n.pinned_until("r") == 100.0  # kept from the run that opened the episode
    assert reference_bounds(200.0, 30.0, n.pinned_until("r")) == (70.0, 100.0)
    n.observe("r:drift", False, {})
    assert n.pinned_until("r") == 100.0  # one quiet run: still open
    assert n.observe("r:drift", False, {}) == "cleared"
    assert n.pinned_until("r") is None


# -- unseen categories against the reference's own rate ----------------------------------------


def _zipf(rng: np.random.Generator, n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, 5001) ** 1.1
    return _obj(f"m{i}" for i in rng.choice(5000, n, p=p / p.sum()))


def test_long_tail_identifiers_are_quiet_and_a_new_category_is_not() -> None:
    rng = np.random.default_rng(3)
    days, per_day = 28, 1000
    hist = _zipf(rng, days * per_day)
    periods = np.repeat(np.arange(days), per_day)
    rate, spread, how = unseen_baseline(hist, periods, CFG)
    assert 0.02 < rate < 0.1 and spread is not None and "28 past windows" in how
    flags = 0
    for _ in range(20):
        live = _zipf(rng, per_day)
        f = categorical_drift("merchant_id", hist[-4 * per_day:], live, CFG, history=hist,
                              periods=periods)
        assert f.unseen_share is not None and f.unseen_share > 0.02  # new ids every day
        flags += f.drifted
    assert flags == 0
    # a real new category: 5% of traffic on a channel nobody has seen
    ref = _obj(rng.choice(["web", "app", "pos"], 4000))
    live = _obj(["kiosk" if rng.random() < 0.05 else v for v in rng.choice(["web", "app"], 1000)])
    f = categorical_drift("channel", ref, live, CFG)
    assert f.drifted and "unseen" in f.rules
    assert f.unseen_baseline == 0.0 and f.unseen_baseline_source is not None
    # Good–Turing without past windows: the share of singletons in the reference
    gt, _, how = unseen_baseline(_obj(["a", "a", "b", "c"]), None, CFG)
    assert gt == pytest.approx(2 / 4) and "Good-Turing" in how


# -- missing values ----------------------------------------------------------------------------


def test_a_feature_that_goes_89_percent_missing_drifts_even_with_few_values_left() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(0, 1, 4000)
    ref[rng.random(4000) < 0.01] = np.nan
    live = rng.normal(0, 1, 1000)
    live[rng.random(1000) < 0.89] = np.inf  # non-finite counts as missing
    f = numeric_drift("x", ref, live, CFG)
    assert f.drifted and f.status == "drift" and f.rules == ["missing"]
    assert f.missing_live == pytest.approx(np.mean(~np.isfinite(live)))
    assert f.missing_pvalue is not None and f.missing_pvalue < 1e-10
    assert "missing values" in f.why
    # 95% missing leaves < min_samples values: still judged on its missing share
    live2 = rng.normal(0, 1, 1000)
    live2[:950] = np.nan
    g = numeric_drift("x", ref, live2, CFG)
    assert g.drifted and g.status == "drift" and g.psi is None
    # a stable missing share is fine, and categorical features get the same rule
    ok = numeric_drift("x", ref, np.where(rng.random(4000) < 0.012, np.nan,
                                          rng.normal(0, 1, 4000)), CFG)
    assert not ok.drifted and ok.min_detectable_missing_change == pytest.approx(0.05)
    cat = categorical_drift("c", _obj(rng.choice(["a", "b"], 2000)),
                            _obj([None if rng.random() < 0.5 else "a" for _ in range(1000)]),
                            CFG)
    assert "missing" in cat.rules


def test_missing_feature_counts_in_the_dataset_share() -> None:
    rng = np.random.default_rng(5)
    ref = _days(7, 300, rng)
    live = _days(1, 300, rng, t0=T0 + 7 * DAY)
    live.columns["c"] = live.columns["c"].copy()
    live.columns["c"][: int(0.89 * 300)] = np.nan
    result = compute_drift(ref, live, DriftConfig(adaptive=False), route="r")
    assert result.drifted_features == ["c"]
    assert result.share == pytest.approx(1 / 3)
    assert result.dataset_drift


# -- segments in the live window's proportions ---------------------------------------------------


def test_segment_rows_follow_the_live_mix() -> None:
    keys = np.repeat([4, 5, 6], 1000)  # Friday, Saturday, Sunday rows
    rows = _segment_rows(keys, {4: 0.25, 5: 0.75}, None, keys.size)
    assert rows is not None
    assert int(rows[keys == 5].sum()) == 1000
    assert int(rows[keys == 4].sum()) == pytest.approx(333, abs=1)
    assert int(rows[keys == 6].sum()) == 0
    assert _segment_rows(None, {}, None, 10) is None
    eligible = keys != 5
    rows = _segment_rows(keys, {4: 0.25, 5: 0.75}, eligible, keys.size)
    assert rows is not None and int(rows[keys == 5].sum()) == 0  # no history: unweighted rest


def test_window_straddling_friday_night_compares_with_its_own_mix() -> None:
    """A weekend effect of 1 SD; the live window is Friday 18:00 to Saturday 18:00."""
    rng = np.random.default_rng(6)
    per_day = 2400
    ts = T0 + np.arange(28 * per_day) * (DAY / per_day)
    weekend = ((np.floor((ts - T0) / DAY) % 7) >= 5)
    ref = FeatureData(columns={"a": rng.normal(weekend * 1.0, 1.0)}, ts=ts, source="ref")
    since = T0 + 32 * DAY + 18 * 3600  # Friday 18:00 of week 5
    lts = since + np.arange(per_day) * (DAY / per_day)
    lweekend = ((np.floor((lts - T0) / DAY) % 7) >= 5)
    live = FeatureData(columns={"a": rng.normal(lweekend * 1.0, 1.0)}, ts=lts, source="live",
                       since=since, until=since + DAY)
    cfg = DriftConfig(seasonality="day_of_week", adaptive=False, psi_alert=0.05)
    result = compute_drift(ref, live, cfg, route="r")
    f = result.features[0]
    assert result.seasonal["segment_weights"] == {"Fri": 0.25, "Sat": 0.75}
    assert abs(f.mean_shift_sd or 0.0) < 0.1
    assert not f.drifted


# -- what each monitor can detect ----------------------------------------------------------------


def test_min_detectable_shift_is_what_the_rule_actually_flags() -> None:
    rng = np.random.default_rng(7)
    ref = rng.normal(0, 1, 20_000)
    big, limit = min_detectable_shift(ref, 20_000, 0.2, CFG)
    assert big is not None and 0.4 < big < 0.5 and limit.startswith("PSI")
    small, limit = min_detectable_shift(ref[:150], 100, 0.2, CFG)
    assert small is not None and small > big and limit.startswith("sample size")
    flagged = {}
    for d in (big - 0.1, big + 0.1):
        flagged[d] = sum(numeric_drift("x", ref, rng.normal(d, 1, 20_000), CFG).drifted
                         for _ in range(10))
    assert flagged[big - 0.1] <= 2 and flagged[big + 0.1] >= 8
    f = numeric_drift("x", ref, rng.normal(0, 1, 5000), CFG)
    assert f.min_detectable_shift_sd is not None and "smallest shift" in f.why
    registry = CollectorRegistry()
    result = compute_drift(_days(7, 300, rng), _days(1, 300, rng, t0=T0 + 7 * DAY),
                           DriftConfig(adaptive=False), route="r")
    DriftMetrics(registry).update(result)
    text = generate_latest(registry).decode()
    assert 'understudy_drift_min_detectable_shift_sd{feature="a",route="r"}' in text
    assert 'understudy_drift_feature_rule{feature="a",route="r",rule="missing"} 0.0' in text
    assert 'understudy_drift_missing_share{feature="a",route="r",window="live"} 0.0' in text


# -- the recommended setup over weeks ----------------------------------------------------------


@pytest.mark.parametrize("scenario", ["missing", "wide"])
def test_incident_simulation_fast(scenario: str) -> None:
    """Day-of-week segments, adaptive thresholds, a rolling log reference: the shift pages on
    every day it lasts (through prediction drift, or the dataset rule when >= 30% of the
    features move), normal weeks with a weekend pattern and a long-tail id never page, the
    89%-missing feature is flagged, and the episode closes after the shift."""
    from dataclasses import replace

    # 0.5 SD at 500 rows a day sits at one feature's PSI floor (min_detectable_shift); the
    # dataset rule counts the shifted features through its lower floor and BH-corrected KS.
    res = simulate_incident(replace(FAST_INCIDENT, scenario=scenario, shift_sd=0.5))
    assert res["false_pages"] == 0
    assert res["shift_pages"] >= res["shift_days"] - 1
    assert "merchant_id" not in res["normal_feature_flags"]
    assert "merchant_id" not in res["shift_feature_flags"]
    assert not any(res["after_pages"][1:])
    if scenario == "missing":
        assert res["shift_feature_flags"].get("x10", 0) == res["shift_days"]
    else:
        assert res["shift_dataset_pages"] >= res["shift_days"] - 1
        assert res["normal_max_dataset_share"] < CFG.drift_share


# -- `python -m evaluator drift`, day after day, on a log in the gateway's format ---------------


def _day_records(day: int, rng: np.random.Generator, shifted: bool) -> list[bytes]:
    weekend = day % 7 >= 5
    out = []
    for k in range(24):
        rows = 50
        x = rng.normal(0, 1, (rows, 3))
        if weekend:
            x[:, 1] += 0.8
        if shifted:
            x[:, 0] += 0.8
        score = 1 / (1 + np.exp(-(x[:, 0] - 1)))
        data: list[Any] = x.ravel().tolist()
        if shifted:
            for i in range(rows):
                if rng.random() < 0.89:
                    data[3 * i + 2] = None  # what the gateway's log holds for a NaN
        out.append(orjson.dumps({
            "schema_version": 1, "kind": "inference", "request_id": f"d{day}-{k}",
            "ts": T0 + day * DAY + k * 3600 + 60, "route": "fraud",
            "policy": {"type": "champion"}, "served": {"model": "m1", "version": "1"},
            "propensity": 1.0, "arms": {"m1": 1.0}, "key": None,
            "inputs": {"x": {"datatype": "FP64", "shape": [rows, 3], "data": data}},
            "outputs": {"m1": {"role": "champion", "mode": "served", "version": "1",
                               "status": "ok", "latency_ms": 1.0, "error": None,
                               "outputs": {"p": {"datatype": "FP32", "shape": [rows, 1],
                                                 "data": score.tolist()}}}},
            "status": 200, "gateway_latency_ms": 1.0}))
    return out


def test_drift_command_pages_every_day_of_a_shift_with_the_reference_pinned(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evaluator.config import load_config
    from evaluator.ingest import FileIngestor
    from evaluator.store import Store

    rng = np.random.default_rng(11)
    log = tmp_path / "log" / "inferences"
    log.mkdir(parents=True)
    config_path = tmp_path / "evaluator.yaml"
    config_path.write_text(yaml.safe_dump({
        "source": {"path": str(tmp_path / "log")},
        "store": {"path": str(tmp_path / "store.duckdb")},
        "features": {"names": {"x": ["a", "b", "c"]}},
        "drift": {"state_path": str(tmp_path / "state.json"), "out": str(tmp_path / "out"),
                  "seasonality": "day_of_week", "reference_window": "28d", "adaptive": True},
    }))
    config = load_config(config_path, env={})
    plan = [(d, False) for d in range(28)] + [(28, False), (29, True), (30, True), (31, True),
                                              (32, False)]
    seen: list[dict[str, Any]] = []
    for i, (day, shifted) in enumerate(plan):
        (log / f"{i:020d}.jsonl").write_bytes(b"\n".join(_day_records(day, rng, shifted))
                                              + b"\n")
        if day < 28:
            continue
        with Store.open(config.store) as store:
            FileIngestor(config, store).drain()
        code = cli.main(["drift", "--config", str(config_path), "--route", "fraud",
                         "--no-webhook"])
        out = capsys.readouterr().out
        assert code == 0, out
        data = json.loads((tmp_path / "out" / "drift.json").read_text())
        data["stdout"] = out
        seen.append(data)
    verdicts = [d["verdict"] for d in seen]
    assert verdicts == ["STABLE", "DRIFT", "DRIFT", "DRIFT", "STABLE"]
    shift_start = T0 + 29 * DAY + 23 * 3600 + 60  # the first shifted run's live window start
    for d in seen[1:4]:
        assert d["drifted_models"] == ["m1"]
        assert set(d["drifted_features"]) == {"a", "c"}
        by = {f["name"]: f for f in d["features"]}
        assert "missing" in by["c"]["rules"] and by["c"]["missing_live"] > 0.8
        assert "distribution" in by["a"]["rules"]
        assert by["b"]["drifted"] is False and "not flagged" in by["b"]["why"]
        assert 0.2 < by["b"]["min_detectable_shift_sd"] < 1.5
    # the second and third shifted days compare with the days before the episode began
    for d in seen[2:4]:
        assert "pinned at" in d["stdout"]
        assert d["reference"]["until"] == pytest.approx(shift_start - DAY, abs=1.0)
    assert "pinned at" not in seen[1]["stdout"]
    assert math.isfinite(seen[-1]["share"])
    md = (tmp_path / "out" / "drift.md").read_text()
    assert "detects ≥ (sd)" in md and "Why each feature" in md
