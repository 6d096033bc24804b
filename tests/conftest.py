"""Shared fixtures: real Triton and Kafka (tests/support), in-process gateways on real sockets."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.backends.file_sink import segment_paths
from gateway.config import GatewayConfig, parse_config
from gateway.rest.serving import Serving, start_serving
from gateway.rpc.server import GRPC_PORT, install_grpc

pytest_plugins = ["tests.support.triton", "tests.support.kafka"]


def read_stream(log_dir: Path, stream: str) -> list[dict[str, Any]]:
    """Every complete record of one stream under a file-sink directory (all workers)."""
    records: list[dict[str, Any]] = []
    for directory in sorted(p for p in log_dir.rglob(stream) if p.is_dir()):
        for segment in segment_paths(directory):
            data = segment.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            records.extend(orjson.loads(line) for line in complete.splitlines() if line)
    return records


@dataclass
class GatewayHandle:
    url: str
    app: web.Application
    config: GatewayConfig
    server: Serving
    session: aiohttp.ClientSession
    grpc_target: str | None = None  # host:port of the gRPC service, when started with grpc=True

    @property
    def log_dir(self) -> Path:
        return Path(self.config.log.path)

    async def stop(self) -> None:
        """Shut down like SIGTERM does: drain shadows, flush the sink."""
        await self.server.close()

    def records(self, stream: str = "inferences") -> list[dict[str, Any]]:
        return read_stream(self.log_dir, stream)

    async def post_json(self, path: str, payload: Any,
                        headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        resp = await self.session.post(self.url + path, data=orjson.dumps(payload),
                                       headers={"Content-Type": "application/json",
                                                **(headers or {})})
        await resp.read()
        return resp


GatewayFactory = Callable[..., Awaitable[GatewayHandle]]


def fraud_body(rows: list[list[float]], request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "features", "datatype": "FP32",
                                        "shape": [len(rows), 8],
                                        "data": [x for r in rows for x in r]}]}
    if request_id is not None:
        body["id"] = request_id
    return body


@pytest.fixture
async def make_gateway(triton: Any, tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    handles: list[GatewayHandle] = []

    async def factory(routes: dict[str, Any], *, grpc: bool = False,
                      **sections: Any) -> GatewayHandle:
        raw: dict[str, Any] = {
            "triton": {"url": triton.url, "timeout_ms": 5000},
            "log": {"path": str(tmp_path / f"log{len(handles)}"), "fsync": "never"},
            # Each gateway its own registry state unless a test shares one on purpose.
            "admin": {"state_path": str(tmp_path / f"state{len(handles)}" / "registry.json"),
                      "rewards_path": str(tmp_path / f"state{len(handles)}" / "rewards.jsonl")},
            "routes": routes,
        }
        for name, value in sections.items():
            raw[name] = {**raw.get(name, {}), **value}
        config = parse_config(raw, env={})
        app = create_app(config)
        if grpc:
            install_grpc(app, "127.0.0.1", 0, config.listen.max_body_bytes)
        # The configured server (`listen.server`, lean by default) on a real socket.
        server = await start_serving(app, config.listen.server, "127.0.0.1", 0)
        handle = GatewayHandle(server.url, app, config, server,
                               aiohttp.ClientSession(),
                               f"127.0.0.1:{app[GRPC_PORT]}" if grpc else None)
        handles.append(handle)
        return handle

    yield factory
    for handle in handles:
        await handle.session.close()
        await handle.server.close()
    await asyncio.sleep(0)


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fresh random write and read tokens in the gateway's environment."""
    write, read = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", write)
    monkeypatch.setenv("UNDERSTUDY_ADMIN_READ_TOKEN", read)
    return {"write": write, "read": read}


@dataclass
class PushCapture:
    """A local receiver of Prometheus Pushgateway pushes (its `/metrics/job/...` API)."""

    url: str
    pushes: list[tuple[str, str, bytes]]  # (method, path, body), in arrival order


@pytest.fixture
async def pushgateway() -> AsyncIterator[PushCapture]:
    """Records what a batch job pushes, so a test can read it as the Pushgateway would."""
    pushes: list[tuple[str, str, bytes]] = []

    async def push(request: web.Request) -> web.Response:
        pushes.append((request.method, request.path, await request.read()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/metrics/job/{tail:.*}", push)
    async with TestServer(app, host="127.0.0.1", port=0) as server:
        yield PushCapture(str(server.make_url("")).rstrip("/"), pushes)


_SERVICE_FIXTURES = {"triton": "triton", "kafka": "kafka", "helm": "helm"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the real services or tools it reaches, so `make unit` (-m "not triton
    and not kafka and not helm") never starts one; a test under tests/unit/ that needs one is a
    layout error."""
    misplaced = []
    for item in items:
        needs = [m for f, m in _SERVICE_FIXTURES.items() if f in getattr(item, "fixturenames", ())]
        for marker in needs:
            item.add_marker(marker)
        if needs and "/tests/unit/" in str(item.path):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError(f"unit tests that need Triton, Kafka or helm: {misplaced}")
