"""aiohttp handlers: the thin HTTP adapter over the transport-independent core.

Errors are mapped to KServe-style `{"error": "..."}` bodies in exactly one place,
`error_middleware`; handlers and the core raise `GatewayError` subclasses.
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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        headers = {}
        if (request_id := getattr(exc, "request_id", None)) is not None:
            headers[REQUEST_ID_HEADER] = request_id
        if (served := getattr(exc, "served_model", None)) is not None:
            headers["X-Served-Model"] = served
        headers.update(getattr(exc, "headers", None) or {})  # e.g. the admin API's WWW-Authenticate
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return _error_response(exc.status, exc.message, headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY]
        error = PayloadTooLarge(
            f"request body exceeds the limit of {limit} bytes (listen.max_body_bytes)"
        )
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
    return _error_response(503, "Triton is not ready")


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
