"""The log guarantee measured from outside: SIGKILL the gateway during a broker outage.

A real `python -m gateway serve` process logs to a real broker and forwards real HTTP traffic to
real Triton. The broker is stopped, traffic goes on, and 7 s (or 0.5 s) into the outage the
gateway is SIGKILLed. Then the broker and the gateway are started again and the gateway
replays its spill.
Every answered request must be in Kafka, except those the documented bound allows: the ones the
client saw answered within the last `log.kafka.max_unspilled_ms` before the kill (the window is
computed from the client's own receive timestamps, which are never earlier than the gateway's
answers, so nothing here is a wall-clock threshold on speed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.config import KafkaConfig
from tests.conftest import fraud_body
from tests.support.kafka import KafkaBroker, consume_all, load_broker_module, unique_topic
from understudy_demo.run import wait_http
from understudy_demo.traffic import FraudTraffic
from understudy_demo.triton import free_port

pytestmark = [pytest.mark.kafka, pytest.mark.triton]

BOUND_MS = KafkaConfig().max_unspilled_ms  # the default is what the docs promise and measure
CLIENTS = 8
RATE = 200.0  # requests/s offered (paced; the gateway answers what it can)


def gateway_config(triton_url: str, kafka: KafkaBroker, tmp_path: Path, port: int,
                   topic: str) -> dict[str, Any]:
    return {
        "triton": {"url": triton_url},
        "listen": {"host": "127.0.0.1", "port": port, "grpc_port": 0},
        "log": {"sink": "kafka", "path": str(tmp_path / "log"), "kafka": {
            "bootstrap": kafka.bootstrap,
            "topic": topic,
            "labels_topic": unique_topic("labels"),
            "audit_topic": unique_topic("audit"),
            "registry_topic": unique_topic("registry"),
            "rewards_topic": unique_topic("rewards"),
        }},
        "admin": {"state_path": str(tmp_path / "state.json"),
                  "rewards_path": str(tmp_path / "rewards.jsonl")},
        # Champion only: a record reaches the sink as soon as the request is answered, so the
        # window the test allows is the sink's bound alone (copies would add their own time).
        "routes": {"fraud": {"champion": "fraud_v3"}},
    }


def spawn(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )


class Traffic:
    """Paced concurrent clients; remembers when each request was seen answered (200)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.answered: dict[str, float] = {}  # request id -> monotonic receive time
        self.failed = 0
        self._stop = asyncio.Event()
        self._x, _ = FraudTraffic(seed=77).sample(512)
        self._next = 0

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await asyncio.gather(*(self._client(session) for _ in range(CLIENTS)))

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, session: aiohttp.ClientSession) -> None:
        period = CLIENTS / RATE
        while not self._stop.is_set():
            began = time.monotonic()
            i = self._next
            self._next += 1
            body = orjson.dumps(fraud_body([self._x[i % len(self._x)].tolist()], f"c{i}"))
            try:
                async with session.post(f"{self.base}/v2/models/fraud/infer", data=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        self.answered[f"c{i}"] = time.monotonic()
                    else:
                        self.failed += 1
            except (aiohttp.ClientError, TimeoutError):
                self.failed += 1
            await asyncio.sleep(max(0.0, period - (time.monotonic() - began)))


def broker_state(kafka: KafkaBroker) -> Any:
    state = load_broker_module().status(kafka.directory)
    assert state is not None, "the test broker is not running"
    return state


async def metric(base: str, name: str) -> float | None:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


# stopped 7 s: issue 14's case. stopped 0.5 s: killed around the moment the sink notices.
# frozen 3 s (SIGSTOP): the broker's port still accepts connections, so the sink cannot tell it
# is down: only the age rule puts records on disk, and records younger than the bound are lost.
@pytest.mark.parametrize(("how", "outage_s"), [("stopped", 7.0), ("stopped", 0.5),
                                               ("frozen", 3.0)])
async def test_sigkill_during_broker_outage_loses_at_most_the_documented_bound(
    triton: Any, kafka: KafkaBroker, tmp_path: Path, how: str, outage_s: float
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    topic = unique_topic("crash")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(gateway_config(triton.url, kafka, tmp_path, port,
                                                         topic)))
    log_path = tmp_path / "gateway.log"
    proc = spawn(config_path, log_path)
    traffic = Traffic(base)
    restarted: subprocess.Popen[bytes] | None = None
    broker_pid: int | None = None
    try:
        await wait_http(f"{base}/v2/health/ready")
        running = asyncio.ensure_future(traffic.run())
        await asyncio.sleep(2.0)
        if how == "stopped":
            await asyncio.to_thread(kafka.stop)  # returns once the broker process has exited
        else:
            broker_pid = broker_state(kafka).pid
            os.kill(broker_pid, signal.SIGSTOP)
        outage_began = time.monotonic()
        await asyncio.sleep(outage_s)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
        traffic.stop()
        await running
    finally:
        if proc.poll() is None:
            proc.kill()
        if broker_pid is not None:
            os.kill(broker_pid, signal.SIGCONT)
        await asyncio.to_thread(kafka.start)
    outage_log = log_path.read_text()
    try:
        restarted = spawn(config_path, log_path)
        await wait_http(f"{base}/v2/health/ready")
        for _ in range(600):  # the replay of the dead process's spill (0.1 s per poll)
            if (await metric(base, "understudy_log_spill_bytes") == 0
                    and await metric(base, "understudy_kafka_connected") == 1):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the restarted gateway did not drain the spill")
    finally:
        if restarted is not None:
            restarted.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(restarted.wait, 60) == 0

    records = await consume_all(kafka.bootstrap, topic, count=None, wait_s=60, linger=3.0)
    keys = [r.key.decode() for r in records]
    found = set(keys) & set(traffic.answered)
    missing = set(traffic.answered) - found
    window_start = killed_at - BOUND_MS / 1000
    allowed = {k for k, t in traffic.answered.items() if t >= window_start}
    oldest_lost_ms = max((killed_at - traffic.answered[k] for k in missing), default=0) * 1000
    in_outage = sum(1 for t in traffic.answered.values() if t >= outage_began)
    print(f"\nSIGKILL {outage_s:.1f} s into a broker outage ({how}; "
          f"max_unspilled_ms={BOUND_MS}): "
          f"answered={len(traffic.answered)} (during the outage {in_outage}), "
          f"found={len(found)}, lost={len(missing)} (the oldest answered {oldest_lost_ms:.0f} ms "
          f"before the kill), "
          f"allowed-by-bound={len(allowed)} (answered in the last {BOUND_MS} ms), "
          f"duplicates={len(keys) - len(set(keys))}, client errors={traffic.failed}")
    assert in_outage > 0, "no request was answered during the outage: nothing was tested"
    # The WARNING during the outage: "unreachable" (refused), or records going to the spill.
    assert ("unreachable" if how == "stopped" else "going to the local spill") in outage_log, (
        outage_log[-3000:])
    assert missing <= allowed, (
        f"{len(missing - allowed)} answered requests lost beyond the bound, e.g. "
        f"{sorted(missing - allowed)[:5]}; last lines of the gateway log:\n{outage_log[-3000:]}")
