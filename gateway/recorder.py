"""Builds the inference log record once every model has answered, and emits it.

Runs as a background task per request, after the client already has its response: decoding
tensors, waiting for shadow copies, comparing predictions and serialising all happen here, off
the critical path. Each wait is bounded by the lane's timeout, so these tasks cannot pile up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import metrics
from gateway.logsink import LogSink
from gateway.policies import Decision, sticky_uniform
from gateway.protocol import InferRequest, decode_inputs, decode_response
from gateway.records import INFERENCES, SCHEMA_VERSION, ModelOutcome, Tensor
from gateway.routes import RouteRuntime
from gateway.shadow import ShadowResult

log = logging.getLogger(__name__)


# (route, request id, served arm, served score): what exploration needs to credit a label later.
ExploredHook = Callable[[str, str, str, float | None], None]


@dataclass(slots=True)
class RequestContext:
    """Everything about one request the record needs, captured on the hot path."""

    runtime: RouteRuntime
    request_id: str
    ts: float
    key: str | None
    request: InferRequest | None
    decision: Decision
    served_model: str
    served: ShadowResult
    status: int
    gateway_latency_s: float
    error: str | None = None
    fallback: bool = False


def first_score(outputs: Mapping[str, Tensor] | None) -> float | None:
    """The first element of the first output: the score the prediction metrics look at."""
    if not outputs:
        return None
    data = next(iter(outputs.values()))["data"]
    if not data:
        return None
    value = data[0]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Recorder:
    """Turns finished requests into records on the sink and prediction metrics."""

    def __init__(self, sink: LogSink, on_explored: ExploredHook | None = None) -> None:
        self.sink = sink
        self.on_explored = on_explored
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def submit(
        self, ctx: RequestContext, copies: Mapping[str, asyncio.Future[ShadowResult]]
    ) -> None:
        task = asyncio.create_task(self._complete(ctx, copies))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every pending record (shutdown: shadows finish or time out first)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _complete(
        self, ctx: RequestContext, copies: Mapping[str, asyncio.Future[ShadowResult]]
    ) -> None:
        try:
            results = dict(zip(copies, await asyncio.gather(*copies.values()), strict=True))
            record = self.build(ctx, results)
            self._observe(ctx, record)
            if self.on_explored is not None and ctx.status == 200 and (
                ctx.runtime.config.policy.type != "champion"
            ):
                served = record["outputs"][ctx.served_model]["outputs"]
                self.on_explored(ctx.runtime.name, ctx.request_id, ctx.served_model,
                                 first_score(served))
            # Sampling below 100% is hash-stable: the same key is always in, or always out.
            if ctx.runtime.config.log_sample_rate >= 1.0 or sticky_uniform(
                f"log:{ctx.runtime.name}", ctx.key or ctx.request_id
            ) < ctx.runtime.config.log_sample_rate:
                self.sink.emit(INFERENCES, ctx.request_id, orjson.dumps(record))
                metrics.LOG_RECORDS.labels(INFERENCES, "accepted").inc()
        except Exception:
            log.exception("failed to record request %s", ctx.request_id)
            metrics.LOG_RECORDS.labels(INFERENCES, "dropped").inc()

    def build(self, ctx: RequestContext, copies: Mapping[str, ShadowResult]) -> dict[str, Any]:
        config = ctx.runtime.config
        outputs: dict[str, ModelOutcome] = {}
        role_of = {config.champion.model: "champion"}
        mode_of = {c.model: c.mode for c in config.challengers}
        for model, result in {ctx.served_model: ctx.served, **copies}.items():
            outputs[model] = _outcome(
                result,
                role=role_of.get(model, "challenger"),
                mode="served" if model == ctx.served_model else mode_of.get(model, "shadow"),
                version=ctx.runtime.version_of.get(model, ""),
            )
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": "inference",
            "request_id": ctx.request_id,
            "ts": ctx.ts,
            "route": config.name,
            "policy": ctx.runtime.policy.describe(),
            "served": {"model": ctx.served_model,
                       "version": outputs[ctx.served_model]["version"]},
            "propensity": ctx.decision.propensity,
            "arms": dict(ctx.decision.probabilities),
            "key": ctx.key,
            "inputs": decode_inputs(ctx.request) if ctx.request is not None else {},
            "outputs": outputs,
            "status": ctx.status,
            "gateway_latency_ms": round(ctx.gateway_latency_s * 1000, 3),
            "task": config.task,
        }
        if ctx.error is not None:
            record["error"] = ctx.error
        if ctx.fallback:
            record["fallback"] = True
        return record

    def _observe(self, ctx: RequestContext, record: Mapping[str, Any]) -> None:
        config = ctx.runtime.config
        served_score = first_score(record["outputs"][ctx.served_model]["outputs"])
        for model, outcome in record["outputs"].items():
            score = first_score(outcome["outputs"])
            if score is None:
                continue
            metrics.SCORE.labels(config.name, model).observe(score)
            if config.task != "classification":
                continue
            predicted = int(score >= config.threshold)
            metrics.PREDICTED_CLASS.labels(config.name, model, str(predicted)).inc()
            if model != ctx.served_model and served_score is not None:
                agree = predicted == int(served_score >= config.threshold)
                metrics.AGREEMENT.labels(
                    config.name, model, "agree" if agree else "disagree"
                ).inc()


def _outcome(result: ShadowResult, *, role: str, mode: str, version: str) -> ModelOutcome:
    outputs: dict[str, Tensor] | None = None
    error = result.error
    status = result.status
    if result.response is not None:
        try:
            decoded = decode_response(result.response.body, result.response.header_length)
            outputs = decoded["outputs"]
            version = str(decoded.get("model_version") or version)
        except Exception as exc:
            status, error = "error", f"undecodable response: {exc!r}"
    return {
        "role": role,  # type: ignore[typeddict-item]
        "mode": mode,  # type: ignore[typeddict-item]
        "version": version,
        "status": status,  # type: ignore[typeddict-item]
        "latency_ms": None if result.latency_s is None else round(result.latency_s * 1000, 3),
        "outputs": outputs,
        "error": error,
    }
