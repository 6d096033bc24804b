"""The KServe V2 / Triton gRPC service: a thin adapter over the same core as HTTP.

`tritonclient.grpc` (and perf_analyzer) talk to the gateway as to Triton: the route's name takes
the model's place. Inference requests are converted to the KServe V2 HTTP body the core takes
(gateway/rpc/codec.py) and run through `InferenceService.infer`, so routing, shadows,
exploration, fallback and logging are the HTTP ones; the record's `protocol` says "grpc".
`GatewayError`s become gRPC status codes in one place (`_grpc_errors`, via `errors.grpc_code`).

The server runs on the aiohttp application's event loop (started and stopped by a cleanup
context), so it shares the app's upstream pools, recorder and readiness, and SIGTERM drains it
before the recorder flushes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias, TypeVar

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from multidict import CIMultiDict
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.dataplane.catalog import RouteCatalog
from gateway.dataplane.service import REQUEST_ID_HEADER, InferenceService, InferResult
from gateway.errors import GatewayError, UpstreamUnavailable, grpc_code
from gateway.rest.inference import CATALOG, SERVICE
from gateway.rpc import codec as grpc_codec

log = logging.getLogger(__name__)

GRPC_PORT = web.AppKey("grpc_port", int)  # the bound port (useful when configured as 0 -> free)
READY_SERVICE = "inference.GRPCInferenceService"  # the health service name probes ask for readiness
DRAIN_GRACE_S = 30.0  # as long as aiohttp's shutdown_timeout for HTTP requests in flight

# A servicer's call context; Triton's generated request/response classes are untyped (Any).
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Unary = Callable[["TritonServicer", Req, Context], Awaitable[Resp]]
Metadata = tuple[tuple[str, str], ...]


def _echo_metadata(headers: Mapping[str, str]) -> Metadata:
    """The request id, served model and policy, as the HTTP adapter echoes them in headers."""
    return tuple((key.lower(), headers[key]) for key in
                 (REQUEST_ID_HEADER, "X-Served-Model", "X-Route-Policy") if key in headers)


def _error_metadata(exc: GatewayError) -> Metadata:
    pairs = (("x-request-id", exc.request_id), ("x-served-model", exc.served_model))
    return tuple((k, v) for k, v in pairs if v is not None)


def _grpc_errors(method: Unary[Req, Resp]) -> Unary[Req, Resp]:
    """Run a unary RPC; a GatewayError aborts it with its gRPC status (the one mapping), and
    anything else is INTERNAL (a gateway bug, logged) rather than grpc's UNKNOWN."""

    @functools.wraps(method)
    async def handler(self: TritonServicer, request: Req,
                      context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except GatewayError as exc:
            code = grpc_code(exc)
            if code in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
                log.warning("gRPC %s -> %s: %s", method.__name__, code, exc.message)
            await context.abort(grpc.StatusCode[code], exc.message, _error_metadata(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal gateway error")
        raise AssertionError("unreachable: context.abort raises")

    return handler


def _headers(context: Context) -> CIMultiDict[str]:
    """Invocation metadata as the case-insensitive headers the core reads (request id, sticky
    key); binary (`-bin`) values are not text headers and are left out."""
    headers: CIMultiDict[str] = CIMultiDict()
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            headers.add(key, value)
    return headers


def _forget(inflight: set[asyncio.Future[InferResult]]
            ) -> Callable[[asyncio.Future[InferResult]], None]:
    """Drop a finished call; retrieve its exception (the caller may have stopped waiting)."""
    def done(call: asyncio.Future[InferResult]) -> None:
        inflight.discard(call)
        if not call.cancelled():
            call.exception()
    return done


class TritonServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over the gateway's core; unimplemented RPCs answer UNIMPLEMENTED."""

    def __init__(self, service: InferenceService, catalog: RouteCatalog) -> None:
        self.service = service
        self.catalog = catalog
        self._inflight: set[asyncio.Future[InferResult]] = set()  # strong refs while shielded

    async def drain(self, within_s: float) -> None:
        """Wait for calls whose client stopped waiting (they still get served and logged)."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=within_s)

    @_grpc_errors
    async def ServerLive(self, request: service_pb2.ServerLiveRequest,
                         context: Context) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    @_grpc_errors
    async def ServerReady(self, request: service_pb2.ServerReadyRequest,
                          context: Context) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=await self.catalog.server_ready())

    @_grpc_errors
    async def ModelReady(self, request: service_pb2.ModelReadyRequest,
                         context: Context) -> service_pb2.ModelReadyResponse:
        try:  # an unknown route stays NOT_FOUND; a champion that is down is "not ready"
            await self.catalog.check_ready(request.name)
        except UpstreamUnavailable:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @_grpc_errors
    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: Context
    ) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(**self.catalog.server_metadata())

    @_grpc_errors
    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Context
    ) -> service_pb2.ModelMetadataResponse:
        return grpc_codec.model_metadata(await self.catalog.metadata(request.name))

    @_grpc_errors
    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: Context
    ) -> service_pb2.ModelConfigResponse:
        return grpc_codec.model_config(await self.catalog.config(request.name))

    @_grpc_errors
    async def ModelStatistics(
        self, request: service_pb2.ModelStatisticsRequest, context: Context
    ) -> service_pb2.ModelStatisticsResponse:
        stats = (await self.catalog.stats(request.name) if request.name
                 else await self.catalog.all_stats())
        return grpc_codec.model_statistics(stats)

    @_grpc_errors
    async def RepositoryIndex(
        self, request: service_pb2.RepositoryIndexRequest, context: Context
    ) -> service_pb2.RepositoryIndexResponse:
        return service_pb2.RepositoryIndexResponse(models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(**entry)
            for entry in self.catalog.index()
        ])

    async def _infer(self, request: service_pb2.ModelInferRequest,
                     headers: CIMultiDict[str]) -> tuple[service_pb2.ModelInferResponse, Metadata]:
        # A client's deadline or cancel must not cut the core short: as for an HTTP client that
        # hangs up (aiohttp lets the handler finish), the request is served to the end and
        # logged; the client has its DEADLINE_EXCEEDED / CANCELLED from grpc already.
        call = asyncio.ensure_future(self.service.infer(
            request.model_name, lambda: grpc_codec.infer_request_body(request), headers,
            protocol="grpc",
        ))
        self._inflight.add(call)
        call.add_done_callback(_forget(self._inflight))
        result = await asyncio.shield(call)
        response = grpc_codec.infer_response(result.body, result.headers,
                                             result.headers.get(REQUEST_ID_HEADER, ""))
        return response, _echo_metadata(result.headers)

    @_grpc_errors
    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: Context
    ) -> service_pb2.ModelInferResponse:
        response, metadata = await self._infer(request, _headers(context))
        # Trailing, not initial: it travels with the status (as an error's does), where a
        # separate initial-metadata send cost ~5% of the gateway's CPU per call (py-spy).
        context.set_trailing_metadata(metadata)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
        context: Context,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """One response per request, in order. A failed request answers with `error_message`
        (as Triton's stream does) and the stream goes on; a gateway bug ends it with INTERNAL."""
        base = _headers(context)
        async for request in request_iterator:
            try:
                response, _ = await self._infer(request, base)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except GatewayError as exc:
                yield service_pb2.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=service_pb2.ModelInferResponse(
                        model_name=request.model_name, id=exc.request_id or ""),
                )
                continue
            except Exception:
                log.exception("gRPC ModelStreamInfer failed")
                await context.abort(grpc.StatusCode.INTERNAL, "internal gateway error")
            yield service_pb2.ModelStreamInferResponse(infer_response=response)


class GatewayHealth(health_aio.HealthServicer):
    """grpc.health.v1 for Kubernetes' gRPC probes and load balancers.

    The overall service ("") is liveness: SERVING until the drain starts. READY_SERVICE is
    readiness, the very check HTTP's /v2/health/ready makes (Triton ready), so both transports
    go in and out of rotation together.
    """

    def __init__(self, catalog: RouteCatalog) -> None:
        super().__init__()
        self.catalog = catalog
        self.draining = False

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: Context) -> health_pb2.HealthCheckResponse:
        if request.service != READY_SERVICE:
            return await super().Check(request, context)
        ready = not self.draining and await self.catalog.server_ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else (
            health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)

    async def drain(self) -> None:
        self.draining = True
        await self.enter_graceful_shutdown()


def build_server(servicer: TritonServicer, health: GatewayHealth, max_message_bytes: int
                 ) -> grpc.aio.Server:
    """A grpc.aio server with the request-size limit; SO_REUSEPORT (grpc's default on Linux)
    lets `serve --workers N` processes share the port as they share the HTTP one."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1),
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server


def install_grpc(app: web.Application, host: str, port: int, max_message_bytes: int) -> None:
    """Serve gRPC on `host:port` for the life of `app` (port 0: a free one, see GRPC_PORT).

    Registered last, so on shutdown it stops first: new RPCs are refused, those in flight get
    DRAIN_GRACE_S to finish, and only then does the recorder drain and the sink flush.
    """

    async def grpc_ctx(app: web.Application) -> AsyncIterator[None]:
        health = GatewayHealth(app[CATALOG])
        servicer = TritonServicer(app[SERVICE], app[CATALOG])
        server = build_server(servicer, health, max_message_bytes)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        app[GRPC_PORT] = server.add_insecure_port(address)
        await server.start()
        log.info("gRPC (KServe V2 / Triton) on %s:%d", host, app[GRPC_PORT])
        yield
        await health.drain()
        await server.stop(DRAIN_GRACE_S)
        await servicer.drain(DRAIN_GRACE_S)

    app.cleanup_ctx.append(grpc_ctx)
