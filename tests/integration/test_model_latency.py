"""`latency_ms` measures the model, not the gateway (issue 13 item 3).

Every ModelOutcome's latency is the upstream call's service time: from the request being written
on the connection to the answer read (gateway/upstream/keepalive.py). A challenger behind a lane
with one
call in flight and a burst of copies waits long in the lane; none of that wait may reach its
recorded latency, its Prometheus histogram, or the evaluator's latency guardrail.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from evaluator.dataset import STATUS_CODES, ModelColumn
from evaluator.gates.guardrails import GuardrailLimits, check_guardrails
from gateway.mirror.shadow import ShadowResult
from gateway.rest.inference import ROUTES
from tests.conftest import GatewayFactory, fraud_body

pytestmark = pytest.mark.triton

BURST = 240
CLIENT_CONCURRENCY = 24


def _column(name: str, role: str, outcomes: list[dict[str, Any]]) -> ModelColumn:
    status = np.array([STATUS_CODES[o["status"]] for o in outcomes], np.int8)
    latency = np.array([np.nan if o["latency_ms"] is None else o["latency_ms"]
                        for o in outcomes], np.float64)
    return ModelColumn(name, role, np.full(len(outcomes), np.nan), status,  # type: ignore[arg-type]
                       latency)


async def test_lane_queueing_cannot_move_the_recorded_latency(
    make_gateway: GatewayFactory,
) -> None:
    route = "latency_lane"
    # fraud_v4 and fraud_v5 are fraud_v3's twins in cost (same backend code and config, other
    # weights). fraud_v4's lane sends one copy at a time, unbatched, so a burst queues in the
    # lane for long; fraud_v5's lane micro-batches (the default) behind one call in flight.
    gw = await make_gateway({route: {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v4", "max_concurrency": 1, "max_queue": BURST,
                         "timeout_ms": 60_000, "batch_max_rows": 1},
                        {"model": "fraud_v5", "max_concurrency": 1, "max_queue": BURST,
                         "timeout_ms": 60_000}],
    }})
    lanes = gw.app[ROUTES].get(route).lanes
    assert await lanes["fraud_v5"].load_batching_config() > 1
    lane = lanes["fraud_v4"]
    submit = lane.submit
    waited: list[float] = []  # submission -> resolution of each copy: lane queue + call

    def timed_submit(request: Any, mode: str) -> asyncio.Future[ShadowResult]:
        submitted = time.perf_counter()
        future = submit(request, mode)
        future.add_done_callback(lambda _: waited.append(time.perf_counter() - submitted))
        return future

    lane.submit = timed_submit  # type: ignore[method-assign]
    rng = np.random.default_rng(13)
    limit = asyncio.Semaphore(CLIENT_CONCURRENCY)

    async def post(i: int) -> None:
        body = orjson.dumps(fraud_body(rng.standard_normal((1, 8)).tolist(), f"q{i}"))
        async with limit, gw.session.post(f"{gw.url}/v2/models/{route}/infer", data=body,
                                          headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    await asyncio.gather(*(post(i) for i in range(BURST)))
    await gw.stop()  # drains the lane: every copy resolved and recorded

    records = gw.records()
    assert len(records) == BURST
    champion = [r["outputs"]["fraud_v3"] for r in records]
    challenger = [r["outputs"]["fraud_v4"] for r in records]
    assert all(o["status"] == "ok" and "batch_rows" not in o for o in champion + challenger)
    champ_ms = np.array([o["latency_ms"] for o in champion])
    chall_ms = np.array([o["latency_ms"] for o in challenger])
    waited_ms = np.array(waited) * 1000
    assert len(waited_ms) == BURST

    # The lane queue was long: the median copy waited behind dozens of calls...
    assert np.median(waited_ms) > 20 * np.median(chall_ms)
    # ...and none of it is in the recorded latency: each copy's record is at most its own
    # submission-to-answer time, and the challenger's distribution stays the champion's kind
    # (the champion's calls even queue inside Triton behind each other, 24 at once).
    assert chall_ms.sum() <= waited_ms.sum()
    for q in (50, 90):
        assert np.percentile(chall_ms, q) <= 3 * np.percentile(champ_ms, q) + 2.0, (q, chall_ms)

    # The evaluator's latency guardrail, on exactly these records, does not fail the twin.
    result = check_guardrails(_column("fraud_v3", "champion", champion),
                              _column("fraud_v4", "challenger", challenger),
                              GuardrailLimits(), 0.05)
    latency_checks = [c for c in result.checks if c.name.startswith("latency")]
    assert latency_checks and all(c.passed is not False for c in latency_checks), result.checks

    # Prometheus sees the same per-copy service times as the log (one observation per copy).
    labels = {"route": route, "model": "fraud_v4", "role": "challenger", "mode": "shadow"}
    count = REGISTRY.get_sample_value("understudy_model_latency_seconds_count", labels)
    total = REGISTRY.get_sample_value("understudy_model_latency_seconds_sum", labels)
    assert count == BURST
    assert total == pytest.approx(chall_ms.sum() / 1000, rel=0.01)
    # A batched copy's latency is its whole call's: neither the evaluator (batch_rows) nor the
    # histogram counts it, so the alert and the report judge the same samples.
    batched = [r["outputs"]["fraud_v5"] for r in records]
    alone = [o for o in batched if "batch_rows" not in o]
    assert all(o["status"] == "ok" for o in batched)
    assert 0 < len(alone) < BURST
    labels = {**labels, "model": "fraud_v5"}
    assert REGISTRY.get_sample_value("understudy_model_latency_seconds_count", labels) == len(alone)
    served = {"route": route, "model": "fraud_v3", "role": "champion", "mode": "served"}
    served_total = REGISTRY.get_sample_value("understudy_model_latency_seconds_sum", served)
    assert served_total == pytest.approx(champ_ms.sum() / 1000, rel=0.01)
