"""aiohttp handlers: the thin HTTP adapter over the transport-independent core.

Errors are mapped to KServe-style `{"error": "..."}` bodies in exactly one place,
`error_reply` (used by `error_middleware` here and by the lean server,
gateway/rest/lean_server.py, which answers inference and health itself); handlers and the core
raise `GatewayError` subclasses. With `listen.server: lean` (the default) these handlers still
answer every other path, and inference too when a request needs aiohttp (`Expect`, odd paths).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.dataplane.catalog import RouteCatalog
from gateway.dataplane.protocol import error_body
from gateway.dataplane.routes import RouteTable
from gateway.dataplane.service import REQUEST_ID_HEADER, InferenceService
from gateway.errors import GatewayError, PayloadTooLarge
from gateway.rest.feedback import FeedbackService
from gateway.upstream.client import TritonUpstream

log = logging.getLogger(__name__)

TRITON_NOT_READY = "Triton is not ready"

SERVICE = web.AppKey("service", InferenceService)
ROUTES = web.AppKey("routes", RouteTable)
UPSTREAM = web.AppKey("upstream", TritonUpstream)
FEEDBACK = web.AppKey("feedback", FeedbackService)
CATALOG = web.AppKey("catalog", RouteCatalog)
MAX_BODY = web.AppKey("max_body_bytes", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json"
    )


def _error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=error_body(message), status=status, content_type="application/json", headers=headers
    )


def error_reply(exc: GatewayError, method: str, path: str) -> tuple[bytes, dict[str, str]]:
    """The JSON body and headers a `GatewayError` is answered with, by either HTTP server
    (aiohttp's middleware below, gateway/rest/lean_server.py): the one place errors map."""
    headers: dict[str, str] = {}
    if exc.request_id is not None:
        headers[REQUEST_ID_HEADER] = exc.request_id
    if exc.served_model is not None:
        headers["X-Served-Model"] = exc.served_model
    headers.update(exc.headers)  # e.g. the admin API's WWW-Authenticate
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", method, path, exc.status, exc.message)
    return error_body(exc.message), headers


def body_too_large(limit: int) -> PayloadTooLarge:
    """The 413 for a request body over `listen.max_body_bytes` (both HTTP servers)."""
    return PayloadTooLarge(
        f"request body exceeds the limit of {limit} bytes (listen.max_body_bytes)"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        body, headers = error_reply(exc, request.method, request.path)
        return web.Response(body=body, status=exc.status, content_type="application/json",
                            headers=headers)
    except web.HTTPRequestEntityTooLarge:
        error = body_too_large(request.app[MAX_BODY])
        return _error_response(error.status, error.message)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return _error_response(exc.status, exc.reason or exc.text or "error")
        raise


async def infer(request: web.Request) -> web.Response:
    body = await request.read()
    result = await request.app[SERVICE].infer(request.match_info["route"], body, request.headers)
    return web.Response(body=result.body, status=result.status, headers=result.headers)


async def model_metadata(request: web.Request) -> web.Response:
    return json_response(await request.app[CATALOG].metadata(request.match_info["route"]))


async def model_config(request: web.Request) -> web.Response:
    return json_response(await request.app[CATALOG].config(request.match_info["route"]))


async def model_stats(request: web.Request) -> web.Response:
    return json_response(await request.app[CATALOG].stats(request.match_info["route"]))


async def model_ready(request: web.Request) -> web.Response:
    await request.app[CATALOG].check_ready(request.match_info["route"])
    return web.Response(status=200)


async def health_live(_: web.Request) -> web.Response:
    return web.Response(status=200)


async def health_ready(request: web.Request) -> web.Response:
    if await request.app[CATALOG].server_ready():
        return web.Response(status=200)
    return _error_response(503, TRITON_NOT_READY)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(request.app[CATALOG].server_metadata())


async def list_models(request: web.Request) -> web.Response:
    return json_response(request.app[CATALOG].index())


async def feedback(request: web.Request) -> web.Response:
    request.app[FEEDBACK].authorize(request.headers.get("Authorization"))  # feedback scope
    body = await request.read()
    status, payload = await request.app[FEEDBACK].accept(body)
    return json_response(payload, status)


async def prometheus(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v2/models/{route}/infer", infer)
    app.router.add_post("/v2/models/{route}/versions/{version}/infer", infer)
    app.router.add_get("/v2/models/{route}", model_metadata)
    app.router.add_get("/v2/models/{route}/versions/{version}", model_metadata)
    app.router.add_get("/v2/models/{route}/config", model_config)
    app.router.add_get("/v2/models/{route}/versions/{version}/config", model_config)
    app.router.add_get("/v2/models/{route}/stats", model_stats)
    app.router.add_get("/v2/models/{route}/versions/{version}/stats", model_stats)
    app.router.add_get("/v2/models/{route}/ready", model_ready)
    app.router.add_get("/v2/models/{route}/versions/{version}/ready", model_ready)
    app.router.add_get("/v2/health/live", health_live)
    app.router.add_get("/v2/health/ready", health_ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_post("/v2/repository/index", list_models)
    app.router.add_post("/v2/feedback", feedback)
    app.router.add_get("/metrics", prometheus)
