"""The application factory: builds every part from the config and wires them explicitly.

Resources live in aiohttp `cleanup_ctx` so they open on start-up and close, in reverse order,
on shutdown: the Triton pools, then the log sink, then the request recorder. On SIGTERM
aiohttp runs the cleanups: pending shadow copies finish (or time out), their records are
emitted, the sink flushes, and only then do the upstream pools close.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.backends.factory import Backends, build_backends
from gateway.config import GatewayConfig
from gateway.dataplane.catalog import RouteCatalog
from gateway.dataplane.recorder import Recorder
from gateway.dataplane.routes import RouteTable
from gateway.dataplane.service import InferenceService
from gateway.explore.credit import RewardTracker
from gateway.explore.rewards import PolicyLearner
from gateway.rest.admin import install_admin
from gateway.rest.feedback import FeedbackService
from gateway.rest.inference import (
    CATALOG,
    FEEDBACK,
    MAX_BODY,
    ROUTES,
    SERVICE,
    UPSTREAM,
    add_routes,
    error_middleware,
)
from gateway.rest.openapi import add_openapi_routes
from gateway.rest.rollout import add_rollout_endpoints, install_rollout
from gateway.upstream.client import TritonUpstream

log = logging.getLogger(__name__)


def create_app(
    config: GatewayConfig,
    *,
    backends_factory: Callable[[GatewayConfig], Backends] = build_backends,
) -> web.Application:
    """The gateway for `config`; its backends (files or Kafka) come from `backends_factory`."""
    app = web.Application(
        client_max_size=config.listen.max_body_bytes, middlewares=[error_middleware]
    )
    upstream = TritonUpstream(
        config.triton.url,
        timeout_ms=config.triton.timeout_ms,
        max_connections=config.triton.max_connections,
        model_urls=config.triton.model_urls(),
        grpc_target=config.triton.grpc_target(),
        model_grpc_targets=config.triton.model_grpc_targets(),
    )
    routes = RouteTable(upstream)
    backends = backends_factory(config)
    sink = backends.sink
    learner = PolicyLearner(routes, backends.bus, RewardTracker())
    recorder = Recorder(sink, on_explored=learner.remember)
    service = InferenceService(routes, upstream, recorder)
    app[UPSTREAM] = upstream
    app[ROUTES] = routes
    app[SERVICE] = service
    app[CATALOG] = RouteCatalog(routes, upstream)
    # With Kafka every replica reads labels from the topic; locally they go straight in.
    app[FEEDBACK] = FeedbackService(
        sink, listeners=[] if backends.labels_on_bus else [learner.on_labels],
        known=recorder.seen.__contains__, reward=learner.reward_for,
    )
    app[MAX_BODY] = config.listen.max_body_bytes

    async def upstream_ctx(_: web.Application) -> AsyncIterator[None]:
        routes.apply_all(config.routes)
        await routes.warm()
        yield
        await upstream.close()

    async def sink_ctx(_: web.Application) -> AsyncIterator[None]:
        await sink.start()
        yield
        await sink.close()

    async def learner_ctx(_: web.Application) -> AsyncIterator[None]:
        await learner.bus.start(learner.apply, learner.on_labels)
        yield
        await learner.drain()
        await learner.bus.close()

    async def recorder_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        log.info("draining %d pending records", recorder.pending)
        await recorder.drain()

    # Control plane: challenger registry + /admin API (gateway/rest/admin.py). Its context starts
    # after the sink (audit entries go there) and stops before it.
    registry_ctx = install_admin(app, config, routes, backends, endpoints=[add_rollout_endpoints])
    # Guarded rollouts (gateway/control/rollout.py): after the reward bus replayed its history.
    rollout_ctx = install_rollout(app, config, routes, recorder)

    app.cleanup_ctx.extend([upstream_ctx, sink_ctx, registry_ctx, learner_ctx, rollout_ctx,
                            recorder_ctx])
    add_routes(app)
    add_openapi_routes(app)  # documents the routes above (gateway/rest/openapi.py)
    return app
