"""The gateway logging to a real Kafka broker: every request's record arrives, through a broker
restart and a gateway restart; labels from /v2/feedback arrive in the labels topic."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayFactory, fraud_body
from tests.support.kafka import consume_all, unique_topic
from understudy_demo.traffic import FraudTraffic

pytestmark = [pytest.mark.kafka, pytest.mark.triton]

# Generous shadow limits: these tests are about the log, not about shedding under a burst.
ROUTE = {"fraud": {"champion": {"model": "fraud_v3"},
                   "challengers": [{"model": "fraud_v4", "max_queue": 500, "timeout_ms": 30_000},
                                   {"model": "fraud_v5", "max_queue": 500, "timeout_ms": 30_000}]}}


def kafka_log(kafka: Any, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"sink": "kafka", "path": str(tmp_path / "kafka-log"), "kafka": {
        "bootstrap": kafka.bootstrap,
        "topic": unique_topic("inferences"),
        "labels_topic": unique_topic("labels"),
        "audit_topic": unique_topic("audit"),
        "registry_topic": unique_topic("registry"),
        "rewards_topic": unique_topic("rewards"),
        **extra,
    }}


async def send(gw, x, prefix: str, concurrency: int = 50) -> None:
    async def one(i: int) -> None:
        resp = await gw.post_json("/v2/models/fraud/infer",
                                  fraud_body([x[i].tolist()], f"{prefix}{i}"))
        assert resp.status == 200

    for start in range(0, len(x), concurrency):
        await asyncio.gather(*(one(i) for i in range(start, min(start + concurrency, len(x)))))


async def test_n_concurrent_requests_give_n_records_with_every_models_outputs(
    make_gateway: GatewayFactory, kafka, tmp_path: Path
) -> None:
    log = kafka_log(kafka, tmp_path)
    gw = await make_gateway(ROUTE, log=log)
    x, _ = FraudTraffic(seed=31).sample(400)
    await send(gw, x, "k", concurrency=100)
    labels = [{"request_id": f"k{i}", "label": 1} for i in range(10)]
    resp = await gw.post_json("/v2/feedback", [*labels, {"request_id": "bad"}])
    assert resp.status == 400
    await gw.stop()
    records = await consume_all(kafka.bootstrap, log["kafka"]["topic"], count=400)
    values = [orjson.loads(r.value) for r in records]
    assert sorted(r.key.decode() for r in records) == sorted(f"k{i}" for i in range(400))
    for value in values:
        assert {m: o["status"] for m, o in value["outputs"].items()} == {
            "fraud_v3": "ok", "fraud_v4": "ok", "fraud_v5": "ok"}
    got = await consume_all(kafka.bootstrap, log["kafka"]["labels_topic"], count=10)
    assert sorted(r.key.decode() for r in got) == sorted(f"k{i}" for i in range(10))


async def test_broker_restart_under_load_loses_nothing(
    make_gateway: GatewayFactory, kafka, tmp_path: Path
) -> None:
    log = kafka_log(kafka, tmp_path)
    gw = await make_gateway(ROUTE, log=log)
    traffic = FraudTraffic(seed=32)
    await send(gw, traffic.sample(150)[0], "before-")
    await asyncio.to_thread(kafka.stop)
    try:
        await send(gw, traffic.sample(150)[0], "during-")  # clients never wait for the log
    finally:
        await asyncio.to_thread(kafka.start)
    await send(gw, traffic.sample(150)[0], "after-")
    await gw.stop()
    # What the stop could not send while the producer was still reconnecting stays in the
    # fsynced spill, which the next start replays (the documented guarantee): restart once.
    again = await make_gateway(ROUTE, log=log)
    await again.stop()
    records = await consume_all(kafka.bootstrap, log["kafka"]["topic"], count=450, wait_s=90)
    keys = [r.key.decode() for r in records]
    expected = {f"{p}{i}" for p in ("before-", "during-", "after-") for i in range(150)}
    assert set(keys) == expected
    duplicates = len(keys) - len(set(keys))
    print(f"broker restart: {len(keys)} records for {len(expected)} requests, "
          f"{duplicates} duplicates (the evaluator de-duplicates by request id)")


async def test_records_spilled_at_shutdown_are_delivered_by_the_next_start(
    make_gateway: GatewayFactory, kafka, tmp_path: Path
) -> None:
    log = kafka_log(kafka, tmp_path)
    await asyncio.to_thread(kafka.stop)
    try:
        gw = await make_gateway(ROUTE, log=log)
        await send(gw, FraudTraffic(seed=33).sample(100)[0], "spilled-")
        await gw.stop()  # broker still down: the records go to the local spill, fsynced
    finally:
        await asyncio.to_thread(kafka.start)
    spill = Path(log["path"]) / "spill"
    assert any(p.stat().st_size for p in spill.rglob("*") if p.is_file())
    again = await make_gateway(ROUTE, log=log)
    await again.stop()
    records = await consume_all(kafka.bootstrap, log["kafka"]["topic"], count=100, wait_s=60)
    assert {r.key.decode() for r in records} == {f"spilled-{i}" for i in range(100)}
