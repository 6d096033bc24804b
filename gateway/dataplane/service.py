"""The transport-independent data plane: route, decide, call, mirror, record.

`InferenceService.infer` is what the HTTP handler calls; it knows nothing about aiohttp, so the
same core could sit behind gRPC or a Kafka consumer. The client's answer depends only on the
served model's call: shadow copies are started after it returns and finish in the background.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway import metrics
from gateway.dataplane.protocol import (
    HEADER_LENGTH,
    InferRequest,
    check_key,
    check_request_id,
    parse_request,
    validate_against,
)
from gateway.dataplane.recorder import Recorder, RequestContext
from gateway.dataplane.routes import RouteRuntime, RouteTable
from gateway.errors import GatewayError, UpstreamClientError
from gateway.explore.policies import Decision
from gateway.mirror.shadow import ShadowResult
from gateway.upstream.client import TritonUpstream, UpstreamResponse, passthrough_headers
from understudy.records import Transport

REQUEST_ID_HEADER = "X-Request-Id"
BodyEncoder = Callable[[], tuple[bytes, int]]


@dataclass(slots=True)
class InferResult:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class InferenceService:
    def __init__(
        self,
        routes: RouteTable,
        upstream: TritonUpstream,
        recorder: Recorder,
        rng: random.Random | None = None,
    ) -> None:
        self.routes = routes
        self.upstream = upstream
        self.recorder = recorder
        self.rng = rng or random.Random()
        # Generated request ids: a random per-process prefix and a counter, 32 hex characters
        # like a uuid4's hex, unique across restarts and workers without a syscall per request.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    async def infer(
        self, route_name: str, body: bytes | BodyEncoder, headers: Mapping[str, str],
        protocol: Transport = "http",
    ) -> InferResult:
        """Serve one request; raises GatewayError (mapped to HTTP or gRPC by the caller).

        `body` is the KServe V2 HTTP body, or (gRPC) an encoder producing it and its JSON
        header's length: called where parsing starts, so a message that cannot be encoded is
        refused, counted and logged exactly like a malformed HTTP body. `protocol` names the
        transport for the log record only; both hand the core the same body, so behaviour
        cannot diverge.
        """
        started = time.perf_counter()
        ts = time.time()
        runtime = self.routes.get(route_name)
        config = runtime.config
        key_header = config.policy.sticky_header or config.sample_key_header
        raw_key = headers.get(key_header) if key_header else None
        key: str | None = None
        request_id = ""  # only ever a validated id: it is echoed in a header and keys the log
        request: InferRequest | None = None
        decision = Decision(config.champion.model, 1.0, {config.champion.model: 1.0})
        served_model = config.champion.model
        try:
            header_id = headers.get(REQUEST_ID_HEADER) or ""
            if header_id:
                request_id = check_request_id(header_id, f"{REQUEST_ID_HEADER} header")
            if raw_key is not None:
                key = check_key(raw_key, f"{key_header} header")
            if callable(body):
                body, header_length = body()
                request = parse_request(body, str(header_length))
            else:
                request = parse_request(body, headers.get(HEADER_LENGTH))
            request_id = request.id or request_id or self._new_id()
            validate_against(
                request, config.champion.model, await self.routes.champion_inputs(runtime)
            )
            if config.policy.type != "champion":
                # A rollout is sticky by request id when the route names no sticky header.
                sticky = key if key is not None or config.policy.type != "rollout" else request_id
                decision = runtime.policy.decide(config.explore_arms, sticky, self.rng)
                served_model = decision.arm
                policy_type = config.policy.type
                metrics.child(metrics.ARM_SELECTIONS, route_name, served_model, policy_type).inc()
                metrics.child(metrics.PROPENSITY, route_name, policy_type).observe(
                    decision.propensity
                )
            response, fallback = await self._call_served(runtime, served_model, request)
        except GatewayError as exc:
            request_id = request_id or self._new_id()
            self._record_failure(runtime, request_id, ts, key, request, decision, served_model,
                                 exc, started, protocol)
            exc.request_id = request_id
            exc.served_model = served_model
            raise
        if fallback is not None:
            served_model = fallback
        runtime.served_call.note(response.latency_s)  # the yardstick of slow shadow lanes
        elapsed = time.perf_counter() - started
        served = ShadowResult("ok", response.latency_s, response)
        copies = self._dispatch_copies(runtime, request, served_model)
        self.recorder.submit(
            RequestContext(runtime, request_id, ts, key, request, decision, served_model, served,
                           200, elapsed, fallback=fallback is not None, protocol=protocol),
            copies,
        )
        role = "champion" if served_model == config.champion.model else "challenger"
        metrics.child(metrics.REQUESTS, route_name, served_model, "200", protocol).inc()
        metrics.child(metrics.REQUEST_LATENCY, route_name).observe(elapsed)
        metrics.child(metrics.MODEL_LATENCY, route_name, served_model, role, "served").observe(
            response.latency_s
        )
        metrics.child(metrics.OVERHEAD, route_name).observe(
            max(elapsed - response.latency_s, 0.0)
        )
        out_headers = dict(passthrough_headers(response))
        out_headers[REQUEST_ID_HEADER] = request_id
        out_headers["X-Served-Model"] = served_model
        out_headers["X-Route-Policy"] = config.policy.type
        return InferResult(200, response.body, out_headers)

    async def _call_served(
        self, runtime: RouteRuntime, model: str, request: InferRequest
    ) -> tuple[UpstreamResponse, str | None]:
        """Call the chosen arm; on a server-side failure try the route's fallback, if any."""
        version = runtime.version_of.get(model, "")
        try:
            return await self.upstream.infer(
                model, version, request.body, request.content_type, request.header_length
            ), None
        except GatewayError as exc:
            fallback = runtime.config.fallback
            if isinstance(exc, UpstreamClientError) or fallback is None or fallback == model:
                raise
            response = await self.upstream.infer(
                fallback, runtime.version_of.get(fallback, ""), request.body,
                request.content_type, request.header_length,
            )
            return response, fallback

    def _dispatch_copies(
        self, runtime: RouteRuntime, request: InferRequest | None, served_model: str
    ) -> dict[str, asyncio.Future[ShadowResult]]:
        """Start a copy for every model that should score this request besides the served one.

        Shadow challengers are sampled at their rate; under exploration every arm that was not
        served is scored, so the evaluator sees each arm's prediction for each request.
        """
        config = runtime.config
        copies: dict[str, asyncio.Future[ShadowResult]] = {}
        exploring = config.policy.type != "champion"
        if exploring and served_model != config.champion.model:
            lane = runtime.lanes[config.champion.model]
            copies[config.champion.model] = (
                lane.submit(request, "shadow") if request is not None else lane.skipped()
            )
        for ch in config.challengers:
            if ch.model == served_model:
                continue
            lane = runtime.lanes[ch.model]
            must_score = exploring and ch.mode == "explore"
            if request is None or not (must_score or self.rng.random() < ch.sample_rate):
                copies[ch.model] = lane.skipped()
            else:
                copies[ch.model] = lane.submit(request, ch.mode)
        return copies

    def _record_failure(
        self,
        runtime: RouteRuntime,
        request_id: str,
        ts: float,
        key: str | None,
        request: InferRequest | None,
        decision: Decision,
        served_model: str,
        exc: GatewayError,
        started: float,
        protocol: Transport,
    ) -> None:
        """Failed requests are logged too (users of other gateways miss exactly these)."""
        metrics.child(metrics.REQUESTS, runtime.name, served_model, str(exc.status),
                      protocol).inc()
        metrics.child(metrics.REQUEST_ERRORS, runtime.name, type(exc).__name__).inc()
        status = "timeout" if exc.status == 504 else "error"
        if exc.status < 500 and not isinstance(exc, UpstreamClientError):
            status = "skipped"  # rejected by the gateway before any model was called
        # Copies are not sent for a failed request: a bad request would fail everywhere, and a
        # champion outage should not be amplified by mirrored load.
        copies = {
            m: lane.skipped() for m, lane in runtime.lanes.items() if m != served_model
            and (m in {c.model for c in runtime.config.challengers})
        }
        self.recorder.submit(
            RequestContext(runtime, request_id, ts, key, request if status != "skipped" else None,
                           decision, served_model,
                           ShadowResult(status, error=exc.message), exc.status,
                           time.perf_counter() - started, error=exc.message, protocol=protocol),
            copies,
        )
