"""Pooled HTTP client for Triton, one connection pool per model.

Why not tritonclient's aio client: the gateway forwards the client's body bytes as they are, and
tritonclient would decode them into numpy and encode them again (measured in docs/BENCHMARKS.md,
"upstream client"). Inference calls go through `KeepAlivePool` (gateway/upstream/keepalive.py: one
write
per call, httptools parsing, ~5x less CPU than aiohttp's client); metadata and health use
aiohttp. A separate pool per model is what keeps a slow or dead challenger from holding the
champion's connections: each pool has its own limit. A model may live on another Triton
(`triton.models`); its pools and its metadata/health calls then go to that server. A server
configured with `protocol: grpc` is called over gRPC instead (gateway/upstream/grpc_client.py): same
bodies in and out, same error types, so the rest of the gateway does not know the difference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import yarl

from gateway.dataplane.protocol import HEADER_LENGTH
from gateway.errors import (
    GatewayError,
    UpstreamBadGateway,
    UpstreamClientError,
    UpstreamTimeout,
    UpstreamUnavailable,
    unknown_model,
    upstream_timeout,
    upstream_unreachable,
)
from gateway.upstream.callback import Cancellable, wait_for
from gateway.upstream.grpc_client import GrpcServer
from gateway.upstream.keepalive import KeepAlivePool, MalformedResponse, RawResponse

_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()
_HEADER_LENGTH_LINE = HEADER_LENGTH.encode() + b": %d\r\n"  # one request's header line


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    header_length: str | None
    # Service time of the call that produced this answer: request written -> answer read
    # (gateway/upstream/keepalive.py). Pool waits, connecting and lane queueing are not in it, so
    # the
    # champion's served call and a challenger's copy are timed the same way.
    latency_s: float


def _model_path(model: str, version: str) -> str:
    path = f"/v2/models/{quote(model, safe='')}"  # names are validated; quoting is a backstop
    return f"{path}/versions/{quote(version, safe='')}" if version else path


def _error_message(body: bytes, fallback: str) -> str:
    try:
        parsed = orjson.loads(body)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, str):
            return error
    except orjson.JSONDecodeError:
        pass
    return body[:200].decode("utf-8", "replace") or fallback


class _Server:
    """One Triton server: its address and its small control (metadata/health) session."""

    def __init__(self, base_url: str, grpc_target: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # Set when this server is called over gRPC (`protocol: grpc`): inference, metadata and
        # health then all go to its gRPC port; the HTTP pools are never opened.
        self.grpc = GrpcServer(grpc_target) if grpc_target else None
        url = yarl.URL(self.base_url)
        if url.scheme != "http" or not url.host:
            raise ValueError(f"Triton URL must be http://host:port, got {base_url!r}")
        self.host, self.port = url.host, url.port or 80
        self._control: aiohttp.ClientSession | None = None

    @property
    def control(self) -> aiohttp.ClientSession:
        """A small aiohttp pool for metadata and health so they never queue behind inference."""
        if self._control is None or self._control.closed:
            connector = aiohttp.TCPConnector(limit=8, keepalive_timeout=30, ttl_dns_cache=300)
            self._control = aiohttp.ClientSession(
                self.base_url,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
                skip_auto_headers=("User-Agent",),
            )
        return self._control

    async def close(self) -> None:
        if self.grpc is not None:
            await self.grpc.close()
        if self._control is not None and not self._control.closed:
            await self._control.close()
        self._control = None


class TritonUpstream:
    """Talks to the Triton servers; owns their connection pools (closed by `close`).

    Models live on the default server (`base_url`) unless `model_urls` places them elsewhere
    (config `triton.models: {name: {url: ...}}`): a challenger on another Triton gets its own
    pools and its own control session on that server, so a dead or slow server only fails the
    calls of the models that live there.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_ms: int,
        max_connections: int,
        model_urls: Mapping[str, str] | None = None,
        grpc_target: str | None = None,
        model_grpc_targets: Mapping[str, str] | None = None,
    ) -> None:
        self.timeout_s = timeout_ms / 1000
        self.max_connections = max_connections
        self._default = _Server(base_url, grpc_target)
        self.base_url = self._default.base_url
        servers = {self.base_url: self._default}
        self._server_of: dict[str, _Server] = {}
        grpc_of = model_grpc_targets or {}
        for model, url in (model_urls or {}).items():
            key = url.rstrip("/")
            server = servers.get(key) or servers.setdefault(key, _Server(key, grpc_of.get(model)))
            self._server_of[model] = server
        self._servers = tuple(servers.values())
        # Checked first on every call, so an all-HTTP gateway pays one attribute read for gRPC.
        self._any_grpc = any(server.grpc is not None for server in self._servers)
        self._pools: dict[str, KeepAlivePool] = {}
        # (pool name, model, version) -> its pool and inference path: looked up once, not
        # quoted and found again on every call.
        self._targets: dict[tuple[str | None, str, str], tuple[KeepAlivePool, str]] = {}
        self._tasks: set[asyncio.Task[UpstreamResponse]] = set()  # gRPC calls started by infer_cb

    def server_url(self, model: str) -> str:
        """The base URL of the Triton server that serves `model`."""
        return self._server(model).base_url

    def _server(self, model: str | None) -> _Server:
        return self._server_of.get(model, self._default) if model else self._default

    def pool(self, name: str, limit: int | None = None, *, model: str | None = None
             ) -> KeepAlivePool:
        """The inference connection pool `name` (one per model or lane; created on first use,
        on the server of `model`, or of the model called `name` when `model` is not given)."""
        pool = self._pools.get(name)
        if pool is None:
            server = self._server(model or name)
            pool = KeepAlivePool(server.host, server.port, limit or self.max_connections)
            self._pools[name] = pool
        elif limit is not None and limit > pool.limit:
            pool.raise_limit(limit)  # a lane rebuilt with more concurrency shares the pool name
        return pool

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
        """One inference call; raises the call's `GatewayError` (503, 504, 502, a 4xx)."""
        if self._any_grpc and (server := self._server(model)).grpc is not None:
            out, out_type, out_length, latency = await server.grpc.infer(
                model, version, body, header_length, timeout_s or self.timeout_s)
            return UpstreamResponse(200, out, out_type, out_length, latency)
        return await wait_for(lambda on_done: self.infer_cb(
            model, version, body, content_type, header_length, on_done, pool=pool,
            timeout_s=timeout_s))

    def infer_cb(self, model: str, version: str, body: bytes, content_type: str,
                 header_length: int | None,
                 on_done: Callable[[UpstreamResponse | Exception], None], *,
                 pool: str | None = None, timeout_s: float | None = None) -> Cancellable:
        """Start one inference call; `on_done` gets the answer or its `GatewayError`. Over
        HTTP no Task or Future is made (gateway/upstream/keepalive.py); a gRPC call runs as
        `infer` in a Task."""
        timeout = timeout_s or self.timeout_s
        if self._any_grpc and self._server(model).grpc is not None:
            task = asyncio.get_running_loop().create_task(self.infer(
                model, version, body, content_type, header_length, pool=pool,
                timeout_s=timeout))
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._grpc_done(t, on_done))
            return task
        target = self._targets.get((pool, model, version)) or self._target(pool, model, version)
        # Never ask Triton to compress (no Accept-Encoding): bodies pass through as they are.
        extra = b"" if header_length is None else _HEADER_LENGTH_LINE % header_length
        return target[0].post_cb(
            target[1], body, content_type, extra,
            partial(self._answered, on_done, model, timeout), timeout,
        )

    def _target(self, pool: str | None, model: str, version: str
                ) -> tuple[KeepAlivePool, str]:
        """The pool and inference path of a (pool name, model, version), on its first call."""
        target = self._targets[(pool, model, version)] = (
            self.pool(pool or model, model=model), _model_path(model, version) + "/infer"
        )
        return target

    def _grpc_done(self, task: asyncio.Task[UpstreamResponse],
                   on_done: Callable[[UpstreamResponse | Exception], None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            on_done(task.result())
        elif isinstance(exc, Exception):
            on_done(exc)

    def _answered(self, on_done: Callable[[UpstreamResponse | Exception], None], model: str,
                  timeout_s: float, outcome: RawResponse | Exception) -> None:
        """Hand a pool call's outcome to `on_done` as the gateway sees it: the answer, or its
        `GatewayError` (`_failure`)."""
        if isinstance(outcome, RawResponse) and outcome.status == 200:
            headers = outcome.headers
            resp_length = headers.get(_HEADER_LENGTH_KEY)
            on_done(UpstreamResponse(
                200, outcome.body,
                headers.get(b"content-type", b"application/json").decode("latin-1"),
                resp_length.decode("latin-1") if resp_length is not None else None,
                outcome.latency_s,
            ))
        else:
            on_done(self._failure(model, timeout_s, outcome))

    def _failure(self, model: str, timeout_s: float, outcome: RawResponse | Exception
                 ) -> Exception:
        """A failed pool call's `GatewayError` (the one place upstream HTTP failures are
        mapped): timed out, unreachable, malformed, or a status other than 200."""
        if isinstance(outcome, TimeoutError):  # before OSError: TimeoutError is one
            return upstream_timeout(f"model '{model}'", timeout_s)
        if isinstance(outcome, OSError):  # refused, reset, closed mid-answer (ConnectionClosed)
            return upstream_unreachable(f"model '{model}'", self.server_url(model), outcome)
        if isinstance(outcome, MalformedResponse):
            return UpstreamBadGateway(f"model '{model}': {outcome}")
        if isinstance(outcome, Exception):
            return outcome
        status = outcome.status
        message = _error_message(outcome.body, f"HTTP {status}")
        if 400 <= status < 500:
            return UpstreamClientError(message, status)
        return UpstreamBadGateway(f"model '{model}' failed: {message}")

    async def _get(self, path: str, model: str | None = None) -> tuple[int, bytes]:
        return await self._get_on(self._server(model), path, model)

    async def _get_on(self, server: _Server, path: str, model: str | None = None
                      ) -> tuple[int, bytes]:
        where = f"for model '{model}' at {server.base_url}" if model else f"at {server.base_url}"
        try:
            async with asyncio.timeout(self.timeout_s):
                async with server.control.get(path) as resp:
                    return resp.status, await resp.read()
        except TimeoutError:
            raise UpstreamTimeout(f"Triton {where} did not answer GET {path} in time") from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnavailable(f"Triton unreachable {where}: {exc}") from None

    async def metadata(self, model: str, version: str = "") -> dict[str, Any]:
        return await self._model_json(model, version, "", "metadata")

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        """The model's Triton config: shadow lanes batch copies only if `max_batch_size` > 0."""
        return await self._model_json(model, version, "/config", "config")

    async def model_stats(self, model: str, version: str = "") -> dict[str, Any]:
        """Triton's inference statistics for the model (`{"model_stats": [...]}`)."""
        return await self._model_json(model, version, "/stats", "statistics")

    async def _model_json(self, model: str, version: str, suffix: str, what: str
                          ) -> dict[str, Any]:
        grpc_server = self._server(model).grpc
        if grpc_server is not None:
            return await grpc_server.model_json(what, model, version, self.timeout_s)
        status, body = await self._get(_model_path(model, version) + suffix, model)
        if status in (400, 404):
            raise unknown_model(model, version, _error_message(body, "not found"))
        if status != 200:
            raise UpstreamBadGateway(f"{what} for '{model}': HTTP {status}")
        parsed = orjson.loads(body)
        if not isinstance(parsed, dict):
            raise UpstreamBadGateway(f"{what} for '{model}' is not a JSON object")
        return parsed

    async def model_ready(self, model: str, version: str = "") -> bool:
        grpc_server = self._server(model).grpc
        if grpc_server is not None:
            return await grpc_server.model_ready(model, version, self.timeout_s)
        try:
            status, _ = await self._get(_model_path(model, version) + "/ready", model)
        except GatewayError:
            return False
        return status == 200

    async def server_ready(self, models: Iterable[str] = ()) -> bool:
        """Every server that hosts one of `models` is ready (the default server when `models` is
        empty). The gateway asks this for its champions: a champion on another Triton
        (`triton.models`) makes readiness depend on that server; a server holding only
        challengers does not, so a dead challenger upstream stays isolated."""
        servers = {id(s): s for s in (self._server(m) for m in models)} or {0: self._default}

        async def ready(server: _Server) -> bool:
            if server.grpc is not None:
                return await server.grpc.server_ready(self.timeout_s)
            try:
                status, _ = await self._get_on(server, "/v2/health/ready")
            except GatewayError:
                return False
            return status == 200

        return all(await asyncio.gather(*(ready(s) for s in servers.values())))

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._targets.clear()
        for server in self._servers:
            await server.close()

