"""A model may live on another Triton (`triton.models`, issue 14 item 6).

A challenger placed on a second server gets its own pools, metadata and health calls there; a
challenger whose server refuses connections fails its own copies fast while the champion serves
every request as before.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.config import parse_config
from gateway.dataplane.protocol import decode_response
from gateway.errors import ConfigError, UpstreamUnavailable
from gateway.rest.inference import UPSTREAM
from gateway.upstream.client import TritonUpstream
from tests.conftest import GatewayFactory, GatewayHandle, fraud_body
from tests.support.triton import DEMO_MODELS
from understudy_demo.triton import TritonServer

pytestmark = pytest.mark.triton


async def _post(gw: GatewayHandle, route: str, rows: list[list[float]], rid: str) -> Any:
    async with gw.session.post(f"{gw.url}/v2/models/{route}/infer",
                               data=orjson.dumps(fraud_body(rows, rid)),
                               headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Served-Model"] == "fraud_v3"
        return decode_response(await resp.read(), None)["outputs"]["score"]["data"]


async def test_a_challenger_on_a_dead_upstream_is_isolated(
    make_gateway: GatewayFactory, unused_tcp_port: int,
) -> None:
    route = "dead_upstream"
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    gw = await make_gateway(
        {route: {"champion": {"model": "fraud_v3"},
                 # A long timeout: a copy that waited for it would not be "failing fast".
                 "challengers": [{"model": "fraud_v4", "timeout_ms": 60_000}]}},
        triton={"models": {"fraud_v4": {"url": dead}}},
    )
    upstream = gw.app[UPSTREAM]
    assert upstream.server_url("fraud_v4") == dead
    assert upstream.server_url("fraud_v3") == gw.config.triton.url.rstrip("/")
    assert not await upstream.model_ready("fraud_v4")
    assert await upstream.model_ready("fraud_v3")
    with pytest.raises(UpstreamUnavailable, match=f"model 'fraud_v4' at {dead}"):
        await upstream.metadata("fraud_v4")

    rng = np.random.default_rng(3)
    n = 60
    await asyncio.gather(*(_post(gw, route, rng.standard_normal((1, 8)).tolist(), f"d{i}")
                           for i in range(n)))
    async with gw.session.get(f"{gw.url}/v2/health/ready") as resp:
        assert resp.status == 200  # the default server (the champion's) is what readiness means
    await gw.stop()

    records = gw.records()
    assert len(records) == n
    for record in records:
        assert record["status"] == 200
        assert record["outputs"]["fraud_v3"]["status"] == "ok"
        copy = record["outputs"]["fraud_v4"]
        assert copy["status"] == "error", copy  # refused at once: not a timeout, not queued
        assert "unreachable" in copy["error"] and dead in copy["error"]
    labels = {"route": route, "model": "fraud_v4"}
    assert REGISTRY.get_sample_value("understudy_shadow_copies_total",
                                     {**labels, "outcome": "error"}) == n
    assert not REGISTRY.get_sample_value("understudy_shadow_copies_total",
                                         {**labels, "outcome": "timeout"})


async def test_readiness_follows_the_servers_of_the_champions(
    make_gateway: GatewayFactory, triton: Any, unused_tcp_port: int,
) -> None:
    """`/v2/health/ready` asks the servers the champions live on, not just `triton.url`."""
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    # The default server is dead, the champion lives on the real Triton: ready.
    gw = await make_gateway({"elsewhere": {"champion": {"model": "fraud_v3"}}},
                            triton={"url": dead, "models": {"fraud_v3": {"url": triton.url}}})
    async with gw.session.get(f"{gw.url}/v2/health/ready") as resp:
        assert resp.status == 200, await resp.text()
    # A champion placed on a dead server: not ready, though the default server is alive.
    upstream = gw.app[UPSTREAM]
    upstream._server_of["fraud_v3"] = upstream._default  # the dead default server
    async with gw.session.get(f"{gw.url}/v2/health/ready") as resp:
        assert resp.status == 503
    upstream._server_of.pop("fraud_v3")
    assert not await upstream.server_ready()  # no models: the default server
    await gw.stop()

    live = TritonUpstream(triton.url, timeout_ms=2000, max_connections=2,
                          model_urls={"far": dead})
    try:
        assert await live.server_ready()
        assert await live.server_ready(["fraud_v3", "fraud_v4"])
        assert not await live.server_ready(["fraud_v3", "far"])
    finally:
        await live.close()


@pytest.fixture(scope="module")
def second_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Another tritonserver serving one model the session's Triton does not have:
    `fraud_remote`, fraud_v4 under another name."""
    repo = tmp_path_factory.mktemp("remote-models")
    target = repo / "fraud_remote"
    shutil.copytree(DEMO_MODELS / "fraud_v4", target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = target / "config.pbtxt"
    config.write_text(config.read_text().replace('"fraud_v4"', '"fraud_remote"'))
    with TritonServer([repo], log_file=repo.parent / "tritonserver.log") as server:
        yield server


async def test_a_challenger_on_a_second_triton_is_served_from_there(
    make_gateway: GatewayFactory, second_triton: TritonServer, triton: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = secrets.token_urlsafe(32)
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", token)
    route = "two_tritons"
    gw = await make_gateway(
        {route: {"champion": {"model": "fraud_v3"}}},
        triton={"models": {"fraud_remote": {"url": second_triton.url}}},
    )
    # The registry validates the new challenger against the server it lives on.
    resp = await gw.post_json(f"/admin/routes/{route}/challengers",
                              {"model": "fraud_remote", "batch_max_rows": 1},
                              headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 201, await resp.text()

    rng = np.random.default_rng(5)
    rows = {f"r{i}": rng.standard_normal((1, 8)).tolist() for i in range(20)}
    for rid, row in rows.items():
        await _post(gw, route, row, rid)
    await gw.stop()

    # fraud_remote is fraud_v4 by another name: its copies must score exactly like fraud_v4
    # on the session's Triton, which never heard of fraud_remote.
    direct = await _post_direct(triton.url, "fraud_v4", list(rows.values()))
    for record in gw.records():
        copy = record["outputs"]["fraud_remote"]
        assert copy["status"] == "ok", copy
        assert copy["latency_ms"] > 0
        assert copy["outputs"]["score"]["data"] == direct[record["request_id"]]


async def _post_direct(url: str, model: str, rows: list[list[list[float]]]) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for i, row in enumerate(rows):
            async with session.post(f"{url}/v2/models/{model}/infer",
                                    data=orjson.dumps(fraud_body(row))) as resp:
                assert resp.status == 200
                answers[f"r{i}"] = (await resp.json())["outputs"][0]["data"]
    return answers


def test_model_locations_are_validated() -> None:
    config = parse_config({"triton": {"models": {"m": {"url": "http://10.0.0.2:8000"}}}},
                          env={})
    assert config.triton.model_urls() == {"m": "http://10.0.0.2:8000"}
    env = {"UNDERSTUDY_TRITON_MODELS": '{m: {url: "http://h:1"}}'}
    assert parse_config({}, env=env).triton.model_urls() == {"m": "http://h:1"}
    for bad, message in [({"m": {"url": "https://h"}}, "triton.models.m.url"),
                         ({"m": {"host": "h"}}, "unknown key"),
                         ({"m": "http://h:1"}, "expected a mapping"),
                         (["m"], "triton.models"),
                         ({"m/../m": {"url": "http://h:1"}}, "not a valid Triton model name"),
                         ({"m?x=1": {"url": "http://h:1"}}, "not a valid Triton model name")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"triton": {"models": bad}}, env={})
