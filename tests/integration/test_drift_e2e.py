"""Drift end to end: gateway + real Triton -> the gateway's segment files -> evaluator ingest ->
drift on exactly the features that moved, prediction drift for every model, one webhook call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from evaluator.config import parse_config
from evaluator.drift import WebhookNotifier, Windows, alert_drift, drift_for_route
from evaluator.ingest import FileIngestor
from evaluator.store import Store
from tests.conftest import GatewayFactory, fraud_body
from understudy_demo.traffic import FraudTraffic
from understudy_demo.truth import FRAUD_FEATURES

pytestmark = pytest.mark.triton

ROUTE = {
    "champion": {"model": "fraud_v3"},
    "challengers": [{"model": "fraud_v4", "sample_rate": 1.0, "timeout_ms": 10_000},
                    {"model": "fraud_v5", "sample_rate": 1.0, "timeout_ms": 10_000}],
}
SHIFTED = {0: 1.0, 1: 1.0, 4: -1.0}  # amount_z, merchant_risk up 1 SD; distance_home down
ROWS, BATCH = 1200, 40


async def _send(gw: Any, traffic: FraudTraffic, prefix: str) -> None:
    x = traffic.features(ROWS)

    async def one(k: int) -> None:
        rows = x[k * BATCH:(k + 1) * BATCH].tolist()
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body(rows, f"{prefix}{k}"))
        assert resp.status == 200

    for start in range(0, ROWS // BATCH, 10):
        await asyncio.gather(*(one(k) for k in range(start, min(start + 10, ROWS // BATCH))))


async def test_shift_halfway_is_detected_on_the_shifted_features_only(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append({"body": await request.json(), "auth": request.headers.get("Authorization")})
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = TestServer(app, host="127.0.0.1", port=0)
    await receiver.start_server()

    gw = await make_gateway({"fraud": ROUTE})
    traffic = FraudTraffic(seed=31)
    await _send(gw, traffic, "before-")
    await asyncio.sleep(0.05)
    t_mid = time.time()
    await asyncio.sleep(0.05)
    await _send(gw, traffic.shifted(mean_shift=SHIFTED, seed=32), "after-")
    await gw.stop()  # drains the shadows and flushes the log, like SIGTERM

    config = parse_config({
        "source": {"path": str(gw.log_dir)},
        "store": {"path": str(tmp_path / "store.duckdb")},
        "features": {"names": {"features": list(FRAUD_FEATURES)}},
        "drift": {"adaptive": False, "state_path": str(tmp_path / "drift_state.json"),
                  "webhook_url": str(receiver.make_url("/hook"))},
    }, env={})
    try:
        with Store.open(config.store) as store:
            await asyncio.to_thread(FileIngestor(config, store).drain)
            assert store.join_stats("fraud", require_label=False).inferences == 2 * ROWS
            windows = Windows(live_since=t_mid, live_until=None, ref_since=None,
                              ref_until=t_mid)
            result = await asyncio.to_thread(drift_for_route, store, config, "fraud", windows)
        assert result.reference["n"] == ROWS
        assert result.live["n"] == ROWS
        shifted = sorted(FRAUD_FEATURES[i] for i in SHIFTED)
        assert sorted(result.drifted_features) == shifted
        by = {f.name: f for f in result.features}
        for name in FRAUD_FEATURES:
            f = by[name]
            assert f.kind == "numeric"
            if name in shifted:
                assert f.psi > 0.2
                assert f.ks_pvalue < 1e-6
                assert abs(abs(f.mean_shift_sd) - 1.0) < 0.25
            else:
                assert f.psi < 0.1, (name, f.psi)
        assert result.share == pytest.approx(3 / 8)
        assert result.dataset_drift

        # prediction drift for the champion and every challenger, champion first
        models = [(p.model, p.role) for p in result.predictions]
        assert models == [("fraud_v3", "champion"), ("fraud_v4", "challenger"),
                          ("fraud_v5", "challenger")]
        for p in result.predictions:
            assert p.n_live == ROWS
            assert p.positive_share_live is not None
            assert p.confidence

        # webhook: exactly one call for the episode, however often drift is re-checked (a
        # fresh notifier per check, like an hourly CronJob reading the state file)
        env = {"UNDERSTUDY_WEBHOOK_TOKEN": "hook-token"}
        outcomes = [await asyncio.to_thread(
            alert_drift, WebhookNotifier.from_config(config.drift, env=env), result)
            for _ in range(3)]
        assert outcomes == ["fired", "already_fired", "already_fired"]
        assert len(calls) == 1
        assert calls[0]["auth"] == "Bearer hook-token"
        assert calls[0]["body"]["route"] == "fraud"
        assert calls[0]["body"]["event"] == "drift"
        assert sorted(calls[0]["body"]["drifted_features"]) == shifted
        assert calls[0]["body"]["drifted_models"]  # the scores moved too
    finally:
        await receiver.close()


async def test_drift_command_on_gateway_logs_keeps_paging_while_the_episode_is_open(
        make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m evaluator drift` on two gateways' logs: normal traffic, then a shift seen by
    run 1, then more of the shift seen by run 2. Run 2 compares with the traffic before the
    episode began (the reference is pinned in the episode state), so it still pages; a run
    without that state compares with the shifted traffic just before it and does not."""
    import json

    import yaml

    from evaluator import cli

    src = tmp_path / "src"
    route = {"champion": {"model": "fraud_v3"}}
    traffic = FraudTraffic(seed=41)
    shifted = traffic.shifted(mean_shift=SHIFTED, seed=42)
    gap = 1.0  # between phases; windows keep gap / 2 of slack on each side

    gw1 = await make_gateway({"fraud": route}, log={"path": str(src / "worker-0")})
    ta0 = time.time()
    await _send(gw1, traffic, "a-")
    ta1 = time.time()
    await asyncio.sleep(gap)
    tb0 = time.time()
    await _send(gw1, shifted, "b-")
    tb1 = time.time()
    await gw1.stop()

    def write_config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "source": {"path": str(src)},
            "store": {"path": str(tmp_path / "store.duckdb")},
            "features": {"names": {"features": list(FRAUD_FEATURES)}},
            "drift": {"adaptive": False, "out": str(tmp_path / name),
                      "state_path": str(tmp_path / f"{name}-state.json")},
        }))
        return path

    pinned_cfg, fresh_cfg = write_config("pinned"), write_config("fresh")
    config = parse_config(yaml.safe_load(pinned_cfg.read_text()), env={})
    ms = lambda s: f"{max(1, round(s * 1000))}ms"  # noqa: E731 - a local formatter

    def run(cfg_path: Path, live: float, ref_window: float) -> tuple[dict[str, Any], str]:
        with Store.open(config.store) as store:
            FileIngestor(config, store).drain()
        code = cli.main(["drift", "--config", str(cfg_path), "--route", "fraud",
                         "--window", ms(live), "--reference-window", ms(ref_window),
                         "--no-webhook"])
        out = capsys.readouterr().out
        assert code == 0, out
        name = cfg_path.stem
        return json.loads((tmp_path / name / "drift.json").read_text()), out

    first, out1 = await asyncio.to_thread(run, pinned_cfg, tb1 - tb0 + gap / 2,
                                          ta1 - ta0 + gap)
    shifted_names = sorted(FRAUD_FEATURES[i] for i in SHIFTED)
    assert first["verdict"] == "DRIFT"
    assert sorted(first["drifted_features"]) == shifted_names
    assert first["reference"]["n"] == ROWS and first["live"]["n"] == ROWS
    assert "pinned at" not in out1
    for f in first["features"]:
        assert f["why"]
        assert f["min_detectable_shift_sd"] is not None
        assert f["missing_live"] == 0.0 and "missing" not in f["rules"]
        assert ("distribution" in f["rules"]) == (f["name"] in shifted_names)

    await asyncio.sleep(gap)
    gw2 = await make_gateway({"fraud": route}, log={"path": str(src / "worker-1")})
    tc0 = time.time()
    await _send(gw2, shifted, "c-")
    tc1 = time.time()
    await gw2.stop()
    assert tc0 - tb1 > gap

    # A reference window as long as the time from the shift's start to this live window: just
    # the shifted traffic before it, unless the episode pins it before the shift began.
    ref_len = tc0 - tb0
    second, out2 = await asyncio.to_thread(run, pinned_cfg, tc1 - tc0 + gap / 2, ref_len)
    assert "pinned at" in out2
    assert second["verdict"] == "DRIFT"
    assert sorted(second["drifted_features"]) == shifted_names
    assert second["reference"]["n"] == ROWS  # the normal traffic, not the shift
    # without the episode state the reference is the shifted traffic right before: no page
    control, out3 = await asyncio.to_thread(run, fresh_cfg, tc1 - tc0 + gap / 2, ref_len)
    assert "pinned at" not in out3
    assert control["reference"]["n"] == ROWS  # the first shifted batch
    assert not set(control["drifted_features"]) & set(shifted_names)
