"""A stalled model process must not BLOCK a challenger as fast as the champion (the CI case).

In CI, machine load starved fraud_v4's Triton Python stub for ~110 consecutive calls and the
latency guardrail, taking every call as independent, BLOCKED it. Here the same thing happens on
purpose on the real path: requests through the gateway to fraud_v3 (champion) and its twin
fraud_v4 (challenger, every copy measured alone), while a thread stops and resumes fraud_v4's stub
process (SIGSTOP 50 ms / SIGCONT 1 ms, for 1.5 s): a stretch of consecutive slow calls. The
evaluator's guardrail on the gateway's records (ordered by their ``ts``) sees the slow calls
clustered in time and does not fail the twin.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from evaluator.gates.guardrails import GuardrailLimits, check_guardrails
from tests.conftest import GatewayFactory, fraud_body
from tests.integration.test_model_latency import _column
from understudy_demo.triton import process_group_members

pytestmark = pytest.mark.triton

REQUESTS = 1500
STALL_AT = 600  # the request whose sending starts the stall
STALL_S = 1.5  # how long fraud_v4's stub keeps being stopped and resumed
STOP_S, RUN_S = 0.05, 0.001  # each cycle: stopped, then running (about a call per cycle)
CONCURRENCY = 2
# Per request and client: slower than fraud_v4's one-call-at-a-time lane, which then keeps up, so
# the stall slows consecutive requests as in CI. (A lane far behind its clients spreads a stall's
# slow calls over its backlog, interleaved with fast ones: docs/STATISTICS.md, the limits.)
PACE_S = 0.008


def _stub_pid(triton: Any, model: str) -> int:
    """The Python-backend stub process serving ``model`` in this session's tritonserver."""
    for pid in process_group_members(os.getpgid(triton.pid)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"python_backend_stub" in a for a in cmd[:1]) and any(
                f"/{model}/".encode() in a for a in cmd):
            return pid
    raise AssertionError(f"no Python stub process for {model}")


async def test_a_stalled_stub_does_not_block_its_twin(make_gateway: GatewayFactory,
                                                      triton: Any) -> None:
    route = "latency_stall"
    gw = await make_gateway({route: {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v4", "max_concurrency": 1, "max_queue": REQUESTS,
                         "timeout_ms": 60_000, "batch_max_rows": 1}],
    }})
    stub = _stub_pid(triton, "fraud_v4")
    stalling = threading.Event()
    done = threading.Event()
    stalled = 0

    def stall() -> None:
        """Once ``stalling`` is set, stop and resume the stub for STALL_S: every call then is
        slow, as under the machine load that starved it in CI."""
        nonlocal stalled
        try:
            while not stalling.wait(0.05):
                if done.is_set():
                    return
            for _ in range(round(STALL_S / (STOP_S + RUN_S))):
                if done.is_set():
                    return
                os.kill(stub, signal.SIGSTOP)
                done.wait(STOP_S)
                os.kill(stub, signal.SIGCONT)
                stalled += 1
                done.wait(RUN_S)
        finally:
            os.kill(stub, signal.SIGCONT)

    thread = threading.Thread(target=stall, daemon=True)
    thread.start()
    rng = np.random.default_rng(17)
    limit = asyncio.Semaphore(CONCURRENCY)

    async def post(i: int) -> None:
        body = orjson.dumps(fraud_body(rng.standard_normal((1, 8)).tolist(), f"s{i}"))
        async with limit:
            if i == STALL_AT:
                stalling.set()
            async with gw.session.post(f"{gw.url}/v2/models/{route}/infer", data=body,
                                       headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            await asyncio.sleep(PACE_S)

    try:
        await asyncio.gather(*(post(i) for i in range(REQUESTS)))
        await gw.stop()  # drains the lane: every copy resolved and recorded
    finally:
        done.set()
        thread.join(5)

    assert stalled > 0
    records = gw.records()
    assert len(records) == REQUESTS
    ts = np.array([r["ts"] for r in records], np.float64)
    champion = _column("fraud_v3", "champion", [r["outputs"]["fraud_v3"] for r in records])
    challenger = _column("fraud_v4", "challenger", [r["outputs"]["fraud_v4"] for r in records])
    assert np.isfinite(challenger.latency_ms).all()  # every copy measured alone
    result = check_guardrails(champion, challenger, GuardrailLimits(), 0.05, ts)
    check = next(c for c in result.checks if c.name == "latency_p99_ratio")
        # The stalled calls are the challenger's tail, seen as a cluster in time (the lane runs
    # behind the client, so they belong to requests received somewhat before the stall). The
    # champion's own tail may cluster too on a busy machine: either way the twin is not failed.
    assert check.vif is not None and check.vif > 1.5, check
    assert check.passed is not False, check.detail
    assert "clustered in time" in check.detail
