"""Drift statistics against scipy, PSI by hand, bad references, seasonal alert fatigue (fast
simulation), Prometheus export, the once-per-episode webhook and the `drift` command."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from devtools.simulate.drift import FAST, MODES, simulate
from evaluator import cli, drift
from evaluator.config import DriftConfig
from evaluator.drift import (
    DriftMetrics,
    EmptyReferenceError,
    EmptyWindowError,
    FeatureData,
    FeatureTypeError,
    MissingFeaturesError,
    ReferenceFormatError,
    WebhookNotifier,
    categorical_drift,
    chi_squared,
    compute_drift,
    js_distance,
    ks_test,
    load_reference,
    numeric_drift,
    psi,
    psi_from_counts,
    wasserstein,
)
from evaluator.report.document import render_markdown
from evaluator.report.drift import drift_blocks, drift_section
from tests.conftest import PushCapture

CFG = DriftConfig()


def _obj(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# -- PSI by hand ------------------------------------------------------------------------------


def test_psi_worked_example_two_bins() -> None:
    # Reference 1..10, 2 bins: the (lower) median 5 is the only edge; shares 5/10 and 5/10.
    # Live: 1, 2, 3 fall at or below 5 (3/10), 7..13 above (7/10).
    # PSI = (0.3 - 0.5) ln(0.3 / 0.5) + (0.7 - 0.5) ln(0.7 / 0.5)
    #     = (-0.2)(-0.510826) + (0.2)(0.336472) = 0.102165 + 0.067294 = 0.169460
    ref = np.arange(1, 11, dtype=float)
    live = np.array([1, 2, 3, 7, 8, 9, 10, 11, 12, 13], dtype=float)
    assert psi(ref, live, bins=2) == pytest.approx(0.169460, abs=1e-6)


def test_psi_worked_example_four_bins_from_counts() -> None:
    # Reference shares .25 each; live .1 .2 .3 .4:
    # (-.15) ln(.4) + (-.05) ln(.8) + (.05) ln(1.2) + (.15) ln(1.6)
    # = .137444 + .011157 + .009116 + .070500 = .228217
    assert psi_from_counts(np.array([25, 25, 25, 25]), np.array([10, 20, 30, 40])) == \
        pytest.approx(0.228217, abs=1e-6)


def test_psi_empty_bin_uses_epsilon() -> None:
    # Every live value above the edge 5: live shares (0, 1); the empty bin counts as 1e-4.
    # (1e-4 - .5) ln(1e-4 / .5) + (1 - .5) ln(1 / .5) = (-.4999)(-8.517193) + .5 (.693147)
    # = 4.257745 + 0.346574 = 4.604319 (finite, "very large")
    ref = np.arange(1, 11, dtype=float)
    live = np.array([6, 7, 8, 9, 10], dtype=float)
    assert psi(ref, live, bins=2, epsilon=1e-4) == pytest.approx(4.604319, abs=1e-5)
    # identical samples: 0
    assert psi(ref, ref, bins=4) == pytest.approx(0.0)


def test_psi_ties_collapse_bins_and_values_equal_to_an_edge_go_down() -> None:
    ref = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=float)  # deciles: only 0 and 1
    edges = drift.quantile_edges(ref, 10)
    assert edges.tolist() == [0.0, 1.0]  # bins (-inf, 0], (0, 1], (1, inf)
    assert drift.bin_counts(np.array([0.0, 0.5, 1.0, 2.0]), edges).tolist() == [1, 2, 1]
    # a live value beyond the reference's support lands in a bin the reference never filled
    assert psi(ref, np.array([0.0] * 6 + [1.0] * 3 + [2.0]), bins=10) > 0.5


# -- every statistic against scipy --------------------------------------------------------------


@pytest.mark.parametrize(("n_ref", "n_live"), [(300, 200), (5000, 400)])
def test_ks_and_wasserstein_match_scipy(n_ref: int, n_live: int) -> None:
    rng = np.random.default_rng(1)
    ref, live = rng.normal(0, 1, n_ref), rng.normal(0.2, 1.3, n_live)
    method = "auto" if n_ref * n_live <= drift.KS_EXACT_MAX else "asymp"
    expected = stats.ks_2samp(ref, live, method=method)
    assert ks_test(ref, live) == (pytest.approx(expected.statistic),
                                  pytest.approx(expected.pvalue))
    assert wasserstein(ref, live) == pytest.approx(stats.wasserstein_distance(ref, live))
    f = numeric_drift("x", ref, live, CFG)
    assert f.ks_statistic == pytest.approx(expected.statistic)
    assert f.ks_pvalue == pytest.approx(expected.pvalue)
    assert f.wasserstein == pytest.approx(stats.wasserstein_distance(ref, live))
    assert f.wasserstein_norm == pytest.approx(f.wasserstein / np.std(ref, ddof=1))
    assert f.mean_shift_sd == pytest.approx((live.mean() - ref.mean()) / ref.std(ddof=1))
    assert f.std_ratio == pytest.approx(live.std(ddof=1) / ref.std(ddof=1))


def test_numeric_drift_drops_nan_and_counts_missing() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 1, 500)
    live = rng.normal(0, 1, 500)
    live[:50] = np.nan
    f = numeric_drift("x", ref, live, CFG)
    assert f.n_live == 450
    assert f.missing_live == pytest.approx(0.1)
    assert f.ks_pvalue == pytest.approx(stats.ks_2samp(ref, live[50:]).pvalue)


def test_chi_squared_matches_scipy() -> None:
    ref, live = np.array([50, 30, 20, 0]), np.array([30, 45, 20, 5])
    stat, p, dof = chi_squared(ref, live)
    expected = stats.chi2_contingency(np.vstack([ref, live]), correction=False)
    assert stat == pytest.approx(expected.statistic)
    assert p == pytest.approx(expected.pvalue)
    assert dof == expected.dof == 3
    # one category: nothing to test
    assert chi_squared(np.array([5]), np.array([7])) == (0.0, 1.0, 0)


def test_js_distance_matches_scipy() -> None:
    p, q = np.array([0.5, 0.3, 0.2, 0.0]), np.array([0.3, 0.5, 0.1, 0.1])
    assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2))
    assert js_distance(p, p) == pytest.approx(0.0)
    assert js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_categorical_drift_statistics_match_scipy_on_raw_categories() -> None:
    rng = np.random.default_rng(3)
    ref = _obj(list(rng.choice(["web", "app", "pos"], 2000, p=[0.5, 0.3, 0.2])))
    live_vals = list(rng.choice(["web", "app", "pos"], 1000, p=[0.3, 0.5, 0.2]))
    live_vals[:30] = ["kiosk"] * 30  # unseen in the reference
    live = _obj([*live_vals, None, None])
    f = categorical_drift("channel", ref, live, CFG)
    cats = ["web", "app", "pos", "kiosk"]
    ref_counts = np.array([sum(v == c for v in ref) for c in cats])
    live_counts = np.array([sum(v == c for v in live_vals) for c in cats])
    expected = stats.chi2_contingency(np.vstack([ref_counts, live_counts]), correction=False)
    assert f.chi2 == pytest.approx(expected.statistic)
    assert f.chi2_pvalue == pytest.approx(expected.pvalue)
    assert f.js_distance == pytest.approx(jensenshannon(ref_counts / ref_counts.sum(),
                                                        live_counts / live_counts.sum(), base=2))
    assert f.unseen == {"kiosk": 30}
    assert f.unseen_share == pytest.approx(30 / 1000)
    assert f.missing_live == pytest.approx(2 / 1002)
    assert f.drifted
    assert any("unseen" in r for r in f.reasons)


def test_stable_feature_is_ok_and_insufficient_samples_say_so() -> None:
    rng = np.random.default_rng(4)
    f = numeric_drift("x", rng.normal(size=3000), rng.normal(size=3000), CFG)
    assert f.status == "ok"
    assert not f.drifted
    small = numeric_drift("x", rng.normal(size=3000), rng.normal(size=20), CFG)
    assert small.status == "insufficient"
    assert "min_samples" in small.reasons[0]


def _frame(n: int, rng: np.random.Generator, shift: dict[str, float] | None = None,
           t0: float = 0.0, score_shift: float = 0.0, **kw: Any) -> FeatureData:
    shift = shift or {}
    cols = {name: rng.normal(shift.get(name, 0.0), 1.0, n) for name in ("a", "b", "c", "d")}
    cols["channel"] = _obj(list(rng.choice(["web", "app"], n)))
    scores = 1 / (1 + np.exp(-(cols["a"] - 1 + score_shift)))
    ts = t0 + np.arange(n, dtype=float)
    return FeatureData(columns=cols, ts=ts, scores={"m_champ": scores, "m_chal": scores * 0.9},
                       score_ts={"m_champ": ts, "m_chal": ts},
                       roles={"m_champ": "champion", "m_chal": "challenger"}, source="t",
                       **kw)


def test_compute_drift_flags_shifted_features_only_and_prediction_drift_per_model() -> None:
    rng = np.random.default_rng(5)
    ref = _frame(4000, rng)
    live = _frame(2000, rng, shift={"a": 0.8, "b": 0.8}, t0=10_000)
    result = compute_drift(ref, live, DriftConfig(adaptive=False), route="fraud")
    assert result.drifted_features == ["a", "b"]
    assert result.share == pytest.approx(2 / 5)
    assert result.dataset_drift
    assert [p.model for p in result.predictions] == ["m_champ", "m_chal"]  # champion first
    champ = result.predictions[0]
    assert champ.drifted
    assert champ.role == "champion"
    assert champ.positive_share_live > champ.positive_share_ref
    assert sum(b["ref"] for b in champ.confidence) == pytest.approx(1.0)
    # JSON-safe everywhere (strict JSON: no NaN)
    json.dumps(result.to_dict(), allow_nan=False)


# -- bad references --------------------------------------------------------------------------


LIVE = FeatureData(columns={"amount": np.array([1.0, 2.0, 3.0]),
                            "merchant_risk": np.array([0.1, 0.2, 0.3])},
                   ts=np.array([1.0, 2.0, 3.0]), source="live")


@pytest.mark.parametrize(("name", "content", "error", "words"), [
    ("empty.csv", "", EmptyReferenceError, ["empty"]),
    ("header.csv", "amount,merchant_risk\n", EmptyReferenceError, ["header but no rows"]),
    ("ragged.csv", "amount,merchant_risk\n1,2\n3\n", ReferenceFormatError, ["line 3", "1 fields"]),
    ("blank.csv", "amount,merchant_risk\n,1\n,2\n", EmptyReferenceError, ["'amount'", "no values"]),
    ("bad.jsonl", '{"amount": 1, "merchant_risk": 2}\n{"amount": \n', ReferenceFormatError,
     ["line 2", "invalid JSON"]),
    ("list.jsonl", "[1, 2]\n", ReferenceFormatError, ["line 1", "JSON object"]),
    ("nested.jsonl", '{"amount": {"v": 1}, "merchant_risk": 1}\n', FeatureTypeError,
     ["'amount'", "object"]),
    ("ref.xlsx", "whatever", ReferenceFormatError, ["unknown format", ".csv"]),
    ("nothing.jsonl", "\n\n", EmptyReferenceError, ["no records"]),
])
def test_bad_reference_files_raise_clear_errors(tmp_path: Path, name: str, content: str,
                                                error: type[Exception], words: list[str]) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(error) as exc:
        load_reference(path)
    for word in words:
        assert word in str(exc.value)
    assert isinstance(exc.value, drift.BadReferenceError)


def test_missing_reference_file(tmp_path: Path) -> None:
    with pytest.raises(ReferenceFormatError, match="does not exist"):
        load_reference(tmp_path / "nope.csv")


def test_parquet_needs_pyarrow_or_reads(tmp_path: Path) -> None:
    path = tmp_path / "ref.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ReferenceFormatError, match="pyarrow"):
            load_reference(path)
        return
    pq.write_table(pa.table({"amount": [1.0, 2.0], "merchant_risk": [0.5, 0.1]}), path)
    assert set(load_reference(path).columns) == {"amount", "merchant_risk"}


def test_reference_missing_a_live_feature(tmp_path: Path) -> None:
    path = tmp_path / "ref.csv"
    path.write_text("amount,other\n1,2\n3,4\n")
    with pytest.raises(MissingFeaturesError) as exc:
        compute_drift(load_reference(path), LIVE, CFG, route="fraud")
    assert exc.value.missing == ["merchant_risk"]
    assert "merchant_risk" in str(exc.value)
    assert "amount, other" in str(exc.value)  # says what the reference does have


def test_reference_with_text_in_a_numeric_feature(tmp_path: Path) -> None:
    path = tmp_path / "ref.csv"
    path.write_text("amount,merchant_risk\n1,0.5\nabc,0.7\n")
    with pytest.raises(FeatureTypeError) as exc:
        compute_drift(load_reference(path), LIVE, CFG, route="fraud")
    assert exc.value.feature == "amount"
    assert "'abc' in data row 2" in str(exc.value)
    assert "numeric in the live window" in str(exc.value)


def test_empty_live_window_and_empty_reference() -> None:
    empty = FeatureData(columns={}, ts=np.empty(0), source="live")
    with pytest.raises(EmptyWindowError, match="no predictions"):
        compute_drift(LIVE, empty, CFG, route="fraud")
    no_rows = FeatureData(columns={"amount": np.empty(0), "merchant_risk": np.empty(0)},
                          ts=np.empty(0), source="ref")
    with pytest.raises(EmptyReferenceError):
        compute_drift(no_rows, LIVE, CFG, route="fraud")


def test_reference_files_csv_and_jsonl_tensors(tmp_path: Path) -> None:
    csv_path = tmp_path / "ref.csv"
    csv_path.write_text("ts,amount,zip,score,label\n2024-01-06T10:00:00Z,1.5,01234,0.2,1\n"
                        "1704535200,2.5,99999,0.4,0\n")
    ref = load_reference(csv_path, categorical=["zip"])
    assert ref.columns["amount"].tolist() == [1.5, 2.5]
    assert ref.columns["zip"].tolist() == ["1234", "99999"]  # forced categorical
    assert ref.raw_text["zip"].tolist() == ["01234", "99999"]  # original spelling kept
    assert ref.ts.tolist() == [1704535200.0, 1704535200.0]
    assert ref.scores[drift.ALL_MODELS].tolist() == [0.2, 0.4]
    assert "label" not in ref.columns
    jsonl = tmp_path / "ref.jsonl"
    jsonl.write_text('{"features": [1, 2, 3], "device": "ios"}\n'
                     '{"features": [4, 5, 6], "device": null}\n')
    ref = load_reference(jsonl, names={"features": ["a", "b", "c"]})
    assert ref.columns["b"].tolist() == [2.0, 5.0]
    assert ref.columns["device"].tolist() == ["ios", None]
    ref = load_reference(jsonl)
    assert sorted(ref.columns) == ["device", "features[0]", "features[1]", "features[2]"]


# -- seasonality and adaptive thresholds --------------------------------------------------------


def test_segment_keys() -> None:
    sat_10h = 1_704_535_200.0  # 2024-01-06 (Saturday) 10:00 UTC
    assert drift.segment_keys(np.array([sat_10h]), "day_of_week").tolist() == [5]
    assert drift.segment_keys(np.array([sat_10h]), "hour_of_day").tolist() == [10]
    assert drift.segment_keys(np.array([sat_10h]), "day_of_week_hour").tolist() == [5 * 24 + 10]
    assert drift.segment_keys(np.array([sat_10h]), "weekday_weekend").tolist() == [1]
    # 15 hours east it is already Sunday 01:00
    assert drift.segment_keys(np.array([sat_10h]), "day_of_week", 15).tolist() == [6]


def test_seasonal_simulation_fast() -> None:
    """A weekday-trained reference pages on weekends; segments + adaptive thresholds do not,
    and both page on a real shift."""
    res = simulate(FAST, modes=[MODES[0], MODES[3]])
    pooled = res["modes"][MODES[0][0]]
    seasonal = res["modes"][MODES[3][0]]
    assert pooled["weekend_false_alert_rate"] >= 0.5
    # A pooled reference is 2/7 weekend, so a weekday's amount_z sits near PSI 0.1 against it;
    # with fixed thresholds and 5 features, that plus promo_depth's day effect is 2 of 5 for
    # the dataset rule on a few weekdays of the fast run (0 of 30 weekdays in the full run).
    assert pooled["weekday_false_alert_rate"] < pooled["weekend_false_alert_rate"]
    assert seasonal["false_alert_rate"] == 0.0
    assert pooled["detection_rate"] == 1.0
    assert seasonal["detection_rate"] == 1.0
    # the always-noisy feature is flagged less once thresholds learn its day-to-day variation
    assert seasonal["feature_false_flag_rate"]["promo_depth"] < \
        pooled["feature_false_flag_rate"]["promo_depth"]
    assert seasonal["shifted_feature_detection"]["velocity_1h"] == 1.0


def test_adaptive_threshold_never_below_the_convention_and_reports_its_source() -> None:
    rng = np.random.default_rng(6)
    day = 86400.0
    n_days, per_day = 14, 300
    ts = np.repeat(np.arange(n_days) * day, per_day) + np.tile(np.linspace(0, day - 1, per_day),
                                                               n_days)
    steady = rng.normal(size=ts.size)
    noisy = rng.normal(np.repeat(rng.normal(0, 0.5, n_days), per_day), 1.0)
    ref = FeatureData(columns={"steady": steady, "noisy": noisy}, ts=ts, source="ref")
    live_ts = n_days * day + np.linspace(0, day - 1, per_day)
    live = FeatureData(columns={"steady": rng.normal(size=per_day),
                                "noisy": rng.normal(0.6, 1.0, per_day)}, ts=live_ts,
                       source="live", since=n_days * day, until=(n_days + 1) * day)
    result = compute_drift(ref, live, CFG, route="r")
    by = {f.name: f for f in result.features}
    assert by["steady"].threshold.source == "fixed"
    assert by["steady"].threshold.value == CFG.psi_alert
    assert by["steady"].threshold.periods == n_days
    assert by["noisy"].threshold.source == "adaptive"
    assert by["noisy"].threshold.value > CFG.psi_alert
    assert not by["noisy"].drifted  # a 0.6 SD day is normal for this feature
    fixed = compute_drift(ref, live, DriftConfig(adaptive=False), route="r")
    assert "noisy" in fixed.drifted_features


# -- report fragments -------------------------------------------------------------------------


def test_drift_section_and_markdown_from_result_and_from_json() -> None:
    rng = np.random.default_rng(7)
    result = compute_drift(_frame(3000, rng), _frame(1500, rng, shift={"a": 1.0}, t0=5000),
                           DriftConfig(adaptive=False), route="fraud")
    section = drift_section(result)
    assert section["verdict"] == "DRIFT"
    assert section["drifted_features"] == ["a"]
    assert {f["name"] for f in section["features"]} == {"a", "b", "c", "d", "channel"}
    again = drift_section(json.loads(json.dumps(result.to_dict())))
    assert again == json.loads(json.dumps(section))
    md = render_markdown(drift_blocks(result))
    assert drift_blocks(result) == drift_blocks(section)  # the report renders what it embeds
    assert "dataset drift at 30%" in md
    assert md.startswith("## Drift: DRIFT")
    assert "| a | numeric |" in md
    assert "| m_champ | champion |" in md
    table = drift.feature_table(result)
    assert "DRIFT" in table.splitlines()[2]  # feature a is the first row


# -- Prometheus ------------------------------------------------------------------------------


async def test_metrics_own_registry_scrape_and_pushgateway(pushgateway: PushCapture) -> None:
    rng = np.random.default_rng(8)
    result = compute_drift(_frame(2000, rng), _frame(1000, rng, shift={"a": 1.0}, t0=5000),
                           DriftConfig(adaptive=False), route="fraud")
    registry = CollectorRegistry()
    m = DriftMetrics(registry)
    m.update(result)
    text = generate_latest(registry).decode()
    assert 'understudy_drift_psi{feature="a",route="fraud"}' in text
    assert 'understudy_drift_ks_pvalue{feature="b",route="fraud"}' in text
    assert 'understudy_drift_share{route="fraud"} 0.2' in text
    assert 'understudy_prediction_drift_psi{model="m_champ",route="fraud"}' in text
    assert b"understudy_drift_psi" not in generate_latest(REGISTRY)  # not the default registry

    # a feature that disappears leaves no stale series
    stable = compute_drift(_frame(2000, rng), _frame(1000, rng, t0=5000),
                           DriftConfig(adaptive=False), route="fraud")
    stable.features = [f for f in stable.features if f.name != "d"]
    m.update(stable)
    assert 'feature="d"' not in generate_latest(registry).decode()

    server, thread = drift.start_metrics_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"

        def scrape() -> bytes:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read()

        body = await asyncio.to_thread(scrape)
        assert b"understudy_drift_share" in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    await asyncio.to_thread(m.push, pushgateway.url, "understudy_drift", {"route": "fraud"})
    pushed = pushgateway.pushes
    assert pushed[0][0] == "PUT"
    assert pushed[0][1] == "/metrics/job/understudy_drift/route/fraud"
    assert b"understudy_drift_share" in pushed[0][2]


# -- webhook ---------------------------------------------------------------------------------


class Hook:
    """A local webhook receiver: answers the scripted statuses, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.calls: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append({"headers": dict(request.headers), "body": await request.json()})
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


async def _hook_server(hook: Hook) -> TestServer:
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


async def test_webhook_fires_once_per_episode_with_retry(tmp_path: Path) -> None:
    hook = Hook([500])
    server = await _hook_server(hook)
    state = tmp_path / "state.json"
    sleeps: list[float] = []

    def notifier() -> WebhookNotifier:
        return WebhookNotifier(str(server.make_url("/hook")), state, token="s3cret",
                               retries=3, backoff_s=0.01, clear_runs=2, sleep=sleeps.append)

    def observe(n: WebhookNotifier, active: bool) -> str:
        return n.observe("fraud:drift", active, {"event": "drift", "route": "fraud"})

    try:
        n = notifier()
        assert await asyncio.to_thread(observe, n, True) == "fired"
        assert len(hook.calls) == 2  # a 500, then the retry got through
        assert sleeps == [0.01]
        first_key = hook.calls[0]["headers"]["Idempotency-Key"]
        assert hook.calls[1]["headers"]["Idempotency-Key"] == first_key
        assert hook.calls[1]["headers"]["Authorization"] == "Bearer s3cret"
        assert hook.calls[1]["body"]["episode_id"] == first_key
        assert hook.calls[1]["body"]["route"] == "fraud"
        # the same episode, in this process and in a fresh one (a CronJob's next run)
        assert await asyncio.to_thread(observe, n, True) == "already_fired"
        assert await asyncio.to_thread(observe, notifier(), True) == "already_fired"
        # one quiet run does not end the episode (hysteresis): drifting again is the same one
        assert await asyncio.to_thread(observe, n, False) == "quiet"
        assert await asyncio.to_thread(observe, n, True) == "already_fired"
        assert len(hook.calls) == 2
        # two quiet runs end it; the next drift is a new episode and fires once more
        assert await asyncio.to_thread(observe, n, False) == "quiet"
        assert await asyncio.to_thread(observe, n, False) == "cleared"
        assert await asyncio.to_thread(observe, n, True) == "fired"
        assert len(hook.calls) == 3
        assert hook.calls[2]["headers"]["Idempotency-Key"] != first_key
        saved = json.loads(state.read_text())
        assert saved["episodes"]["fraud:drift"]["fired"] is True
    finally:
        await server.close()


async def test_webhook_gives_up_on_client_errors_and_retries_next_run(tmp_path: Path) -> None:
    hook = Hook([400, 503, 503])
    server = await _hook_server(hook)
    n = WebhookNotifier(str(server.make_url("/hook")), tmp_path / "s.json", retries=1,
                        backoff_s=0.0, sleep=lambda s: None)
    try:
        # 400: not retried, the episode stays unfired
        assert await asyncio.to_thread(n.observe, "r:drift", True, {}) == "failed"
        assert len(hook.calls) == 1
        # next run: 503, 503 (retries exhausted) -> failed; the run after: delivered
        assert await asyncio.to_thread(n.observe, "r:drift", True, {}) == "failed"
        assert len(hook.calls) == 3
        assert await asyncio.to_thread(n.observe, "r:drift", True, {}) == "fired"
        assert len({c["headers"]["Idempotency-Key"] for c in hook.calls}) == 1
    finally:
        await server.close()


def test_guardrail_breach_is_an_episode_per_challenger(tmp_path: Path) -> None:
    n = WebhookNotifier(None, tmp_path / "s.json")  # no URL: state still tracked
    fail = {"challenger": "fraud_v4", "guardrails": {"status": "fail", "checks": [
        {"name": "latency_p99_ratio", "passed": False}]}}
    ok = {"challenger": "fraud_v5", "guardrails": {"status": "pass", "checks": []}}
    assert drift.alert_guardrails(n, "fraud", [fail, ok]) == {"fraud_v4": "disabled",
                                                              "fraud_v5": "quiet"}
    assert n.episodes()["fraud:guardrail:fraud_v4"]["active"] is True


# -- the command -----------------------------------------------------------------------------

T0 = 1_704_067_200.0  # Monday 2024-01-01


def _write_log(root: Path, rng: np.random.Generator) -> None:
    """Two days of batched inference records (features a, b, c): day 2 shifts `b`."""
    directory = root / "inferences"
    directory.mkdir(parents=True)
    lines = []
    for day in range(2):
        for k in range(24):
            rows = 40
            x = rng.normal(0, 1, (rows, 3))
            if day == 1:
                x[:, 1] += 1.0
            score = 1 / (1 + np.exp(-x[:, 0]))
            lines.append(orjson.dumps({
                "schema_version": 1, "kind": "inference", "request_id": f"d{day}-{k}",
                "ts": T0 + day * 86400 + k * 3600, "route": "fraud",
                "policy": {"type": "champion"}, "served": {"model": "m1", "version": "1"},
                "propensity": 1.0, "arms": {"m1": 1.0}, "key": None,
                "inputs": {"x": {"datatype": "FP64", "shape": [rows, 3],
                                 "data": x.ravel().tolist()}},
                "outputs": {"m1": {"role": "champion", "mode": "served", "version": "1",
                                   "status": "ok", "latency_ms": 1.0, "error": None,
                                   "outputs": {"p": {"datatype": "FP32", "shape": [rows, 1],
                                                     "data": score.tolist()}}}},
                "status": 200, "gateway_latency_ms": 1.0}))
    (directory / f"{0:020d}.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def test_drift_command_end_to_end_on_a_store(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from evaluator.config import load_config
    from evaluator.ingest import FileIngestor
    from evaluator.store import Store

    _write_log(tmp_path / "log", np.random.default_rng(9))
    config_path = tmp_path / "evaluator.yaml"
    config_path.write_text(yaml.safe_dump({
        "source": {"path": str(tmp_path / "log")},
        "store": {"path": str(tmp_path / "store.duckdb")},
        "features": {"names": {"x": ["a", "b", "c"]}},
        "drift": {"state_path": str(tmp_path / "state.json"), "out": str(tmp_path / "out")},
    }))
    config = load_config(config_path, env={})
    with Store.open(config.store) as store:
        FileIngestor(config, store).drain()
    code = cli.main(["drift", "--config", str(config_path), "--route", "fraud",
                     "--reference-window", "1d", "--window", "1d", "--no-webhook"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict DRIFT" in out
    data = json.loads((tmp_path / "out" / "drift.json").read_text())
    assert data["drifted_features"] == ["b"]
    assert data["live"]["n"] == 24 * 40
    assert data["reference"]["n"] == 24 * 40  # the day before the live window
    assert [p["model"] for p in data["predictions"]] == ["m1"]
    assert data["predictions"][0]["role"] == "champion"
    assert (tmp_path / "out" / "drift.md").read_text().startswith("## Drift: DRIFT")

    # a bad reference file: exit 1 with the reason
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    code = cli.main(["drift", "--config", str(config_path), "--route", "fraud",
                     "--reference", str(bad), "--no-webhook"])
    assert code == 1
    assert "lacks feature(s) c" in capsys.readouterr().err
    # an unknown route: exit 3
    assert cli.main(["drift", "--config", str(config_path), "--route", "nope",
                     "--no-webhook"]) == 3
    assert math.isfinite(data["share"])
