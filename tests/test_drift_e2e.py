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
from gateway.demo.traffic import FraudTraffic
from gateway.demo.truth import FRAUD_FEATURES
from tests.conftest import GatewayFactory, fraud_body

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
