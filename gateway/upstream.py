"""Pooled HTTP client for Triton, one connection pool per model.

Why aiohttp directly rather than tritonclient's aio client: the gateway forwards the client's
body bytes as they are, and tritonclient would decode them into numpy and encode them again
(measured in docs/BENCHMARKS.md, "upstream client"). A separate pool per model is what keeps a
slow or dead challenger from holding the champion's connections: each pool has its own limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.errors import (
    GatewayError,
    NotFound,
    UpstreamBadGateway,
    UpstreamClientError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.protocol import HEADER_LENGTH


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    header_length: str | None
    latency_s: float


def _model_path(model: str, version: str) -> str:
    return f"/v2/models/{model}/versions/{version}" if version else f"/v2/models/{model}"


def _error_message(body: bytes, fallback: str) -> str:
    try:
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            return parsed["error"]
    except orjson.JSONDecodeError:
        pass
    return body[:200].decode("utf-8", "replace") or fallback


class TritonUpstream:
    """Talks to one Triton server; owns its sessions (closed by `close`)."""

    def __init__(self, base_url: str, *, timeout_ms: int, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_ms / 1000
        self.max_connections = max_connections
        self._pools: dict[str, aiohttp.ClientSession] = {}
        self._control: aiohttp.ClientSession | None = None

    def _session(self, limit: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=limit, limit_per_host=limit, keepalive_timeout=30, ttl_dns_cache=300
        )
        # No session-level timeout: each call sets its own with asyncio.timeout, so aiohttp's
        # default 5-minute timer (one TimeoutHandle per request, ~1% of CPU) is not needed.
        return aiohttp.ClientSession(
            self.base_url,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
            auto_decompress=False,
            # Never ask Triton to compress: bodies pass through to clients as they are.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    def pool(self, name: str, limit: int | None = None) -> aiohttp.ClientSession:
        """The connection pool for one model (created on first use)."""
        session = self._pools.get(name)
        if session is None or session.closed:
            session = self._session(limit or self.max_connections)
            self._pools[name] = session
        return session

    @property
    def control(self) -> aiohttp.ClientSession:
        """A small pool for metadata and health so they never queue behind inference."""
        if self._control is None or self._control.closed:
            self._control = self._session(8)
        return self._control

    async def infer(
        self,
        model: str,
        version: str,
        body: bytes,
        content_type: str,
        header_length: int | None,
        *,
        pool: str | None = None,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        headers = {"Content-Type": content_type}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        session = self.pool(pool or model)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                async with session.post(
                    _model_path(model, version) + "/infer", data=body, headers=headers
                ) as resp:
                    payload = await resp.read()
                    status = resp.status
                    resp_type = resp.headers.get("Content-Type", "application/json")
                    resp_length = resp.headers.get(HEADER_LENGTH)
        except TimeoutError:
            limit_ms = (timeout_s or self.timeout_s) * 1000
            message = f"model '{model}' did not answer within {limit_ms:.0f} ms"
            raise UpstreamTimeout(message) from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnavailable(f"Triton unreachable for model '{model}': {exc}") from None
        latency = time.perf_counter() - started
        if status >= 400:
            message = _error_message(payload, f"HTTP {status}")
            if status >= 500:
                raise UpstreamBadGateway(f"model '{model}' failed: {message}")
            raise UpstreamClientError(message, status)
        return UpstreamResponse(status, payload, resp_type, resp_length, latency)

    async def _get(self, path: str) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.control.get(path) as resp:
                    return resp.status, await resp.read()
        except TimeoutError:
            raise UpstreamTimeout(f"Triton did not answer GET {path} in time") from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnavailable(f"Triton unreachable: {exc}") from None

    async def metadata(self, model: str, version: str = "") -> dict[str, Any]:
        status, body = await self._get(_model_path(model, version))
        if status in (400, 404):
            raise NotFound(f"model '{model}' {('version ' + version + ' ') if version else ''}"
                           f"is not known to Triton: {_error_message(body, 'not found')}")
        if status != 200:
            raise UpstreamBadGateway(f"metadata for '{model}': HTTP {status}")
        parsed = orjson.loads(body)
        if not isinstance(parsed, dict):
            raise UpstreamBadGateway(f"metadata for '{model}' is not a JSON object")
        return parsed

    async def model_ready(self, model: str, version: str = "") -> bool:
        try:
            status, _ = await self._get(_model_path(model, version) + "/ready")
        except GatewayError:
            return False
        return status == 200

    async def server_ready(self) -> bool:
        try:
            status, _ = await self._get("/v2/health/ready")
        except GatewayError:
            return False
        return status == 200

    async def close(self) -> None:
        sessions: list[aiohttp.ClientSession] = list(self._pools.values())
        if self._control is not None:
            sessions.append(self._control)
        await asyncio.gather(*(s.close() for s in sessions if not s.closed))
        self._pools.clear()
        self._control = None


def passthrough_headers(resp: UpstreamResponse) -> Mapping[str, str]:
    headers = {"Content-Type": resp.content_type}
    if resp.header_length is not None:
        headers[HEADER_LENGTH] = resp.header_length
    return headers
