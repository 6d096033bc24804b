"""`python -m gateway serve` as users run it: a real process serving HTTP and gRPC, SIGTERM
drains and flushes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.grpc.aio as aiogrpcclient
import yaml

from tests.conftest import fraud_body, read_stream
from understudy_demo.run import wait_http
from understudy_demo.traffic import FraudTraffic
from understudy_demo.triton import free_port

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_flushes_every_record(triton, tmp_path: Path, workers: int) -> None:
    port, grpc_port = free_port(), free_port()
    config = {
        "triton": {"url": triton.url},
        "listen": {"host": "127.0.0.1", "port": port, "grpc_port": grpc_port},
        "log": {"path": str(tmp_path / "log")},
        "admin": {"state_path": str(tmp_path / "state.json"),
                  "rewards_path": str(tmp_path / "rewards.jsonl")},
        "routes": {"fraud": {"champion": "fraud_v3",
                             "challengers": [{"model": "fraud_v4", "max_queue": 400,
                                              "timeout_ms": 20_000}]}},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(tmp_path / "gateway.log", "wb") as log_file:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited here
            [sys.executable, "-m", "gateway", "serve", "--config", str(path),
             "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )
    try:
        await wait_http(f"http://127.0.0.1:{port}/v2/health/ready")
        x, _ = FraudTraffic(seed=21).sample(200)
        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> int:
                async with session.post(f"http://127.0.0.1:{port}/v2/models/fraud/infer",
                                        data=orjson.dumps(fraud_body([x[i].tolist()], f"p{i}"))
                                        ) as resp:
                    await resp.read()
                    return resp.status
            statuses = await asyncio.gather(*(one(i) for i in range(200)))
        assert statuses == [200] * 200
        # The same process answers gRPC on its own port (every worker, via SO_REUSEPORT).
        client = aiogrpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            async def one_grpc(i: int) -> None:
                features = aiogrpcclient.InferInput("features", [1, 8], "FP32")
                features.set_data_from_numpy(np.asarray(x[i : i + 1], dtype=np.float32))
                await client.infer("fraud", [features], request_id=f"g{i}")
            await asyncio.gather(*(one_grpc(i) for i in range(50)))
        finally:
            await client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, (tmp_path / "gateway.log").read_text()[-2000:]
    records = read_stream(tmp_path / "log", "inferences")
    assert sorted(r["request_id"] for r in records) == sorted(
        [f"p{i}" for i in range(200)] + [f"g{i}" for i in range(50)])
    assert {r["protocol"] for r in records if r["request_id"].startswith("g")} == {"grpc"}
    # Copies still in flight at SIGTERM were awaited, not cut off: every one answered.
    assert all(r["outputs"]["fraud_v4"]["status"] == "ok" for r in records)


def test_sigterm_while_workers_start_is_a_clean_stop(tmp_path: Path) -> None:
    """A SIGTERM that reaches workers while they are still importing (before aiohttp installs its
    handler) kills them by the signal; they had served nothing, so `serve` still exits 0."""
    config = {
        "triton": {"url": "http://127.0.0.1:1"},
        "listen": {"host": "127.0.0.1", "port": free_port(), "grpc_port": free_port()},
        "log": {"path": str(tmp_path / "log")},
        "admin": {"state_path": str(tmp_path / "state.json")},
        "routes": {},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    # The banner comes once the parent relays signals; its spawned workers are still importing.
    assert proc.stdout.readline().startswith(b"understudy gateway on")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
