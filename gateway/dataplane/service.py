"""The transport-independent data plane: route, decide, call, mirror, record.

`InferenceService.infer` is what the HTTP handler calls; it knows nothing about aiohttp, so the
same core could sit behind gRPC or a Kafka consumer. The client's answer depends only on the
served model's call: shadow copies are started after it returns and finish in the background.

Each step is written once (`_admit`, `_proceed`, `_answered`, `_served`, `_failed`) and driven
by callbacks: `start` runs them with no Task or Future (the lean HTTP server's common path),
`infer` awaits the same steps (gRPC, aiohttp, and a route whose champion signature is not
cached yet).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway import metrics
from gateway.dataplane.protocol import (
    HEADER_LENGTH,
    InferRequest,
    TensorSpec,
    check_key,
    check_request_id,
    parse_request,
    validate_against,
)
from gateway.dataplane.recorder import Recorder, RequestContext
from gateway.dataplane.routes import RouteRuntime, RouteTable
from gateway.errors import GatewayError, UpstreamClientError
from gateway.mirror.shadow import ShadowResult
from gateway.upstream.callback import Cancellable, wait_for
from gateway.upstream.client import TritonUpstream, UpstreamResponse
from understudy.records import Transport

log = logging.getLogger(__name__)

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
        cannot diverge. After the champion's input signature is known this is `start`'s
        callback path, awaited.
        """
        call = _Call(self, self.routes.get(route_name), protocol)
        try:
            self._admit(call, body, headers)
            inputs = await self.routes.champion_inputs(call.runtime)
        except GatewayError as exc:
            raise self._failed(call, exc) from None
        result: InferResult = await wait_for(lambda done: self._proceed(call, inputs, done))
        return result

    def start(self, route_name: str, body: bytes, headers: Mapping[str, str],
              done: Callable[[InferResult | Exception], None]) -> bool:
        """Serve one HTTP request without a Task or Future: `done` gets the result or the
        exception (`GatewayError` or a bug) exactly once, possibly before this returns.

        False, having done nothing, when the request needs `infer` (the champion's input
        signature is not cached yet: fetching it is a coroutine). Raises only what `infer`
        raises before recording anything (an unknown route).
        """
        runtime = self.routes.get(route_name)
        inputs = runtime.champion_inputs
        if inputs is None:
            return False
        call = _Call(self, runtime, "http")
        try:
            self._admit(call, body, headers)
        except GatewayError as exc:
            done(self._failed(call, exc))
            return True
        self._proceed(call, inputs, done)
        return True

    def _admit(self, call: _Call, body: bytes | BodyEncoder, headers: Mapping[str, str]
               ) -> None:
        """Check the request's ids and sticky key, parse its body: the steps needing no model."""
        key_header = call.runtime.key_header
        raw_key = headers.get(key_header) if key_header is not None else None
        header_id = headers.get(REQUEST_ID_HEADER)
        if header_id:
            call.request_id = check_request_id(header_id, f"{REQUEST_ID_HEADER} header")
        if raw_key is not None:
            call.key = check_key(raw_key, f"{key_header} header")
        if callable(body):
            body, header_length = body()
            request = parse_request(body, str(header_length))
        else:
            request = parse_request(body, headers.get(HEADER_LENGTH))
        call.request = request
        call.request_id = request.id or call.request_id or self._new_id()

    def _proceed(self, call: _Call, inputs: tuple[TensorSpec, ...],
                 done: Callable[[InferResult | Exception], None]) -> _Call:
        """Validate, decide the arm and call it; `done` gets the outcome."""
        call.done = done
        runtime = call.runtime
        config = runtime.config
        request = call.request
        assert request is not None
        try:
            validate_against(request, config.champion.model, inputs)
            if config.policy.type != "champion":
                # A rollout is sticky by request id when the route names no sticky header.
                key = call.key
                sticky = (key if key is not None or config.policy.type != "rollout"
                          else call.request_id)
                decision = call.decision = runtime.policy.decide(config.explore_arms, sticky,
                                                                 self.rng)
                call.served_model = decision.arm
                policy_type = config.policy.type
                metrics.child(metrics.ARM_SELECTIONS, runtime.name, decision.arm,
                              policy_type).inc()
                metrics.child(metrics.PROPENSITY, runtime.name, policy_type).observe(
                    decision.propensity
                )
        except GatewayError as exc:
            call.finish(self._failed(call, exc))
            return call
        self._call_model(call, call.served_model)
        return call

    def _call_model(self, call: _Call, model: str) -> None:
        request = call.request
        assert request is not None
        call.upstream_call = self.upstream.infer_cb(
            model, call.runtime.version_of.get(model, ""), request.body, request.content_type,
            request.header_length, call.answered,
        )

    def _answered(self, call: _Call, outcome: UpstreamResponse | Exception) -> None:
        """The served call's outcome: the answer, the route's fallback, or the failure."""
        result: InferResult | Exception
        served: UpstreamResponse | None = None
        call.upstream_call = None  # done: no cycle back through the call's callback
        try:
            if isinstance(outcome, UpstreamResponse):
                result = self._answer(call, outcome)
                served = outcome
            elif isinstance(outcome, GatewayError):
                # On a server-side failure try the route's fallback, if any (once).
                fallback = call.runtime.config.fallback
                if not (call.fallback is not None or isinstance(outcome, UpstreamClientError)
                        or fallback is None or fallback == call.served_model):
                    call.fallback = fallback
                    self._call_model(call, fallback)
                    return
                result = self._failed(call, outcome)
            else:
                result = outcome
        except Exception as exc:  # a bug: the caller answers 500 and logs it
            result = exc
        call.finish(result)
        if served is not None:
            # The client's answer went out first (the lean server writes it inside `finish`);
            # the copies, the record and the metrics follow in this same callback.
            try:
                self._served(call, served)
            except Exception:  # a bug: the client has its answer, so it is logged only
                log.exception("route %s: recording a served request failed", call.runtime.name)

    def _answer(self, call: _Call, response: UpstreamResponse) -> InferResult:
        """A served request's answer: Triton's body as it is, with the gateway's headers. The
        gateway's latency is taken here, when the answer is ready."""
        call.elapsed = time.perf_counter() - call.started
        served_model = call.fallback or call.served_model
        # Triton's content headers (the body passes through as it is), then the gateway's.
        headers = {"Content-Type": response.content_type}
        if response.header_length is not None:
            headers[HEADER_LENGTH] = response.header_length
        headers[REQUEST_ID_HEADER] = call.request_id
        headers["X-Served-Model"] = served_model
        headers["X-Route-Policy"] = call.runtime.config.policy.type
        return InferResult(200, response.body, headers)

    def _served(self, call: _Call, response: UpstreamResponse) -> None:
        """After the answer: start the copies, record the request and count it."""
        runtime = call.runtime
        served_model = call.fallback or call.served_model
        latency = response.latency_s
        runtime.served_call.note(latency)  # the yardstick of slow shadow lanes
        elapsed = call.elapsed
        served = ShadowResult("ok", latency, response)
        copies = self._dispatch_copies(runtime, call.request, served_model)
        self.recorder.submit(
            RequestContext(runtime, call.request_id, call.ts, call.key, call.request,
                           call.decision, served_model, served, 200, elapsed,
                           fallback=call.fallback is not None, protocol=call.protocol),
            copies,
        )
        counted = (runtime.served_metrics.get((served_model, call.protocol))
                   or runtime.add_served_metrics(served_model, call.protocol))
        counted.requests.inc()
        counted.request_latency.observe(elapsed)
        counted.model_latency.observe(latency)
        overhead = elapsed - latency
        counted.overhead.observe(0.0 if overhead < 0.0 else overhead)  # max(overhead, 0.0)

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

    def _failed(self, call: _Call, exc: GatewayError) -> GatewayError:
        """Log a failed request too (users of other gateways miss exactly these); the error,
        carrying the request's id and model, is returned for the caller to answer."""
        runtime = call.runtime
        served_model = call.served_model
        call.request_id = call.request_id or self._new_id()
        metrics.child(metrics.REQUESTS, runtime.name, served_model, str(exc.status),
                      call.protocol).inc()
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
            RequestContext(runtime, call.request_id, call.ts, call.key,
                           call.request if status != "skipped" else None, call.decision,
                           served_model, ShadowResult(status, error=exc.message), exc.status,
                           time.perf_counter() - call.started, error=exc.message,
                           protocol=call.protocol),
            copies,
        )
        exc.request_id = call.request_id
        exc.served_model = served_model
        return exc


def _unset(_: InferResult | Exception) -> None:
    raise AssertionError("a call answered before it started or twice")  # pragma: no cover


class _Call:
    """One request between the steps of `InferenceService` (the same steps in both styles).
    `request_id` is only ever a validated id: it is echoed in a header and keys the log."""

    __slots__ = ("decision", "done", "elapsed", "fallback", "key", "protocol", "request",
                 "request_id", "runtime", "served_model", "service", "started", "ts",
                 "upstream_call")

    def __init__(self, service: InferenceService, runtime: RouteRuntime, protocol: Transport
                 ) -> None:
        self.service = service
        self.started = time.perf_counter()
        self.elapsed = 0.0  # start to answer, once answered
        self.ts = time.time()
        self.runtime = runtime
        self.protocol = protocol
        self.served_model = runtime.config.champion.model
        self.decision = runtime.champion_decision
        self.key: str | None = None
        self.request_id = ""
        self.request: InferRequest | None = None
        self.fallback: str | None = None  # the route's fallback model, once it is called
        self.done: Callable[[InferResult | Exception], None] = _unset
        self.upstream_call: Cancellable | None = None

    def answered(self, outcome: UpstreamResponse | Exception) -> None:
        self.service._answered(self, outcome)

    def finish(self, result: InferResult | Exception) -> None:
        """Hand the result over, once. The callback is dropped first: an error's traceback
        holds the awaiting frame, which holds this call, and must not cycle back to it."""
        done, self.done = self.done, _unset
        done(result)

    def cancel(self) -> None:
        """The waiter gave up: abandon the upstream call (nothing is recorded, as before)."""
        if self.upstream_call is not None:
            self.upstream_call.cancel()
