"""Builds the inference log record once every model has answered, and emits it.

Runs in the background, after the client already has its response: decoding tensors, waiting
for shadow copies, comparing predictions and serialising all happen here, off the critical path.
Each wait is bounded by the lane's timeout, so pending records cannot pile up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from gateway import metrics
from gateway.backends import LogSink
from gateway.config import ChallengerConfig
from gateway.dataplane.protocol import InferRequest, decode_response, log_inputs
from gateway.dataplane.routes import RouteRuntime
from gateway.explore.policies import Decision, sticky_uniform
from gateway.mirror.shadow import ShadowCopy, ShadowResult
from understudy.records import (
    INFERENCES,
    SCHEMA_VERSION,
    InferenceRecord,
    ModelOutcome,
    Tensor,
    Transport,
)
from understudy.vocabulary import Mode, OutcomeStatus, Role

log = logging.getLogger(__name__)


# (route, request id, served arm, served score): what exploration needs to credit a label later.
ExploredHook = Callable[[str, str, str, float | None], None]
RECENT_IDS = 100_000


class RecentIds:
    """The last `capacity` request ids this replica recorded: what feedback calls "known"."""

    __slots__ = ("_ids", "capacity")

    def __init__(self, capacity: int = RECENT_IDS) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        ids = self._ids
        ids[request_id] = None
        if len(ids) > self.capacity:
            ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


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
    protocol: Transport = "http"


def first_score(outputs: Mapping[str, Tensor] | None) -> float | None:
    """The first element of the first output: the score the prediction metrics look at."""
    if outputs:
        for tensor in outputs.values():  # only the first
            data = tensor["data"]
            if not data:
                return None
            value = data[0]
            if type(value) is float:  # nearly always: no isinstance calls
                return value
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            return None
    return None


class _Waiting:
    """A request whose record waits for its shadow copies; ready when the last one resolves.

    `copy_done` is a lane copy's `listener` (called by the lane as it resolves the copy), or a
    done-callback for any other future."""

    __slots__ = ("copies", "ctx", "recorder", "remaining")

    def __init__(self, recorder: Recorder, ctx: RequestContext,
                 copies: Mapping[str, asyncio.Future[ShadowResult]], remaining: int) -> None:
        self.recorder = recorder
        self.ctx = ctx
        self.copies = copies
        self.remaining = remaining

    def copy_done(self, _: object = None) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.recorder._settle(self.ctx, self.copies)


class Recorder:
    """Turns finished requests into records on the sink and prediction metrics.

    Records are built in time slices of `slice_s`, each a plain loop callback that schedules the
    next while records are ready (no Task: at a moderate rate nearly every request would start
    one). A batch of shadow answers arriving together (a challenger's dynamic batcher answers
    many copies at once) therefore never holds the loop, and the champion requests behind it,
    for longer than one slice. Past `backlog`
    ready records the worker stops yielding until it is back under it: under overload a loop
    iteration can accept more requests than one slice records, and the records (each holding
    its request and answers) must not pile up in memory.
    """

    def __init__(self, sink: LogSink, on_explored: ExploredHook | None = None, *,
                 slice_s: float = 0.0005, backlog: int = 256) -> None:
        self.sink = sink
        self.on_explored = on_explored
        self.slice_s = slice_s
        self.backlog = backlog
        self._ready: deque[tuple[RequestContext, Mapping[str, asyncio.Future[ShadowResult]]]] = (
            deque()
        )
        self._waiting = 0  # requests whose copies are still running
        self._settled: asyncio.Future[None] | None = None  # drain(): set when _waiting is 0
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once (see _push)
        self._slice: asyncio.Handle | None = None  # the next slice, when records are ready
        self._idle: asyncio.Future[None] | None = None  # drain(): set when _ready empties
        self.seen = RecentIds()
        # Called with every record built (sampled out of the log or not), e.g. by the rollout
        # controller's guards; off the request path like the rest of the recorder.
        self.observers: list[Callable[[InferenceRecord], None]] = []
        self._families: dict[tuple[str, str], _ModelMetrics] = {}  # see _family
        self._plans: dict[str, _RoutePlan] = {}  # by route name, see _plan
        self._accepted = metrics.child(metrics.LOG_RECORDS, INFERENCES, "accepted")
        self._dropped = metrics.child(metrics.LOG_RECORDS, INFERENCES, "dropped")

    @property
    def pending(self) -> int:
        return self._waiting + len(self._ready)

    def submit(
        self, ctx: RequestContext, copies: Mapping[str, asyncio.Future[ShadowResult]]
    ) -> None:
        """Record `ctx` once every copy has resolved. Lane copies (`ShadowCopy`) call back
        directly as their lane resolves them; skipped copies are already done."""
        running: list[asyncio.Future[ShadowResult]] = []
        for future in copies.values():
            if not future.done():
                running.append(future)
        if not running:
            self._push(ctx, copies)
            return
        self._waiting += 1
        # One running copy (the usual case) settles the record itself; several count down.
        settle = (functools.partial(self._settle, ctx, copies) if len(running) == 1
                  else _Waiting(self, ctx, copies, len(running)).copy_done)
        for future in running:
            if type(future) is ShadowCopy and future.listener is None:
                future.listener = settle
            else:
                future.add_done_callback(settle)

    async def drain(self) -> None:
        """Wait for every pending record (shutdown: shadows finish or time out first)."""
        while self._waiting or self._slice is not None:
            if self._waiting:
                self._settled = asyncio.get_running_loop().create_future()
                await self._settled
            if self._slice is not None:
                self._idle = asyncio.get_running_loop().create_future()
                await self._idle

    def _settle(
        self, ctx: RequestContext, copies: Mapping[str, asyncio.Future[ShadowResult]],
        _: object = None,
    ) -> None:
        """The last copy of a waiting request resolved: its record is ready (the third
        argument: the future, when called back as a done-callback)."""
        self._waiting -= 1
        self._push(ctx, copies)
        if not self._waiting and self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    def _push(
        self, ctx: RequestContext, copies: Mapping[str, asyncio.Future[ShadowResult]]
    ) -> None:
        self._ready.append((ctx, copies))
        if self._slice is None:
            # `get_running_loop` costs a getpid syscall per call: the loop is looked up once
            # (again only if the recorder outlives its loop, as in tests).
            loop = self._loop
            if loop is None or loop.is_closed():
                loop = self._loop = asyncio.get_running_loop()
            self._slice = loop.call_soon(self._work)

    def _work(self) -> None:
        """Record for one slice; schedule the next slice if records are still ready."""
        ready = self._ready
        deadline = time.perf_counter() + self.slice_s
        accepted = 0
        while ready:
            accepted += self._record(*ready.popleft())
            if time.perf_counter() >= deadline and len(ready) <= self.backlog:
                break
        if accepted:
            self._accepted.inc(accepted)  # once per slice, not per record
        if ready:
            assert self._loop is not None
            self._slice = self._loop.call_soon(self._work)
            return
        self._slice = None
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _record(
        self, ctx: RequestContext, copies: Mapping[str, asyncio.Future[ShadowResult]]
    ) -> bool:
        """Build, observe and (if sampled in) emit one record; True if the sink took it."""
        try:
            self.seen.add(ctx.request_id)
            plan = self._plan(ctx.runtime)
            results: dict[str, ShadowResult] = {}
            for model, future in copies.items():
                # a copy cancelled at shutdown still gets its line in the record
                results[model] = _CANCELLED if future.cancelled() else future.result()
            record = self._build(ctx, results, plan)
            served_score = self._observe(ctx, record, plan)
            for observe in self.observers:
                observe(record)
            if self.on_explored is not None and ctx.status == 200 and plan.explores:
                self.on_explored(plan.route, ctx.request_id, ctx.served_model, served_score)
            # Sampling below 100% is hash-stable: the same key is always in, or always out.
            if plan.sample_rate >= 1.0 or sticky_uniform(
                plan.sample_salt, ctx.key or ctx.request_id
            ) < plan.sample_rate:
                self.sink.emit(INFERENCES, ctx.request_id, orjson.dumps(record))
                return True
        except Exception:
            log.exception("failed to record request %s", ctx.request_id)
            self._dropped.inc()
        return False

    def _plan(self, runtime: RouteRuntime) -> _RoutePlan:
        """The record parts `runtime` fixes, built on its first record and again whenever the
        registry gives it a new version, experiments or versions (gateway/control/registry.py
        sets them on the runtime after `RouteTable.apply`). One per route: while a route change
        is in flight, records of its old and new runtimes may alternate, each rebuilding it."""
        plan = self._plans.get(runtime.config.name)
        if (plan is None or plan.runtime is not runtime
                or plan.registry_version != runtime.registry_version
                or plan.experiments is not runtime.experiments
                or plan.version_of is not runtime.version_of):
            plan = self._plans[runtime.config.name] = _RoutePlan(runtime)
        return plan

    def build(self, ctx: RequestContext, copies: Mapping[str, ShadowResult]) -> InferenceRecord:
        """The request's record, typed as the contract writes it (serialised once by `_record`).

        The served model's outcome comes first, then the copies' in their order (a copy under
        the served model's name, which service.py never makes, would take its place)."""
        return self._build(ctx, copies, self._plan(ctx.runtime))

    def _build(self, ctx: RequestContext, copies: Mapping[str, ShadowResult],
               plan: _RoutePlan) -> InferenceRecord:
        served_model = ctx.served_model
        models = plan.models
        served = copies.get(served_model, ctx.served) if copies else ctx.served
        model_plan = models.get(served_model) or plan.add(served_model)
        served_outcome = _outcome(served, model_plan.role, "served", model_plan.version,
                                  model_plan.experiment)
        outputs: dict[str, ModelOutcome] = {served_model: served_outcome}
        for model, result in copies.items():
            if model == served_model:
                continue
            model_plan = models.get(model) or plan.add(model)
            outputs[model] = _outcome(result, model_plan.role, model_plan.mode,
                                      model_plan.version, model_plan.experiment)
        decision = ctx.decision
        record: InferenceRecord = {
            "schema_version": SCHEMA_VERSION,
            "kind": "inference",
            "request_id": ctx.request_id,
            "ts": ctx.ts,
            "route": plan.route,
            "registry_version": plan.registry_version,
            "policy": plan.policy,  # shared by the route's records: never mutated
            "served": {"model": served_model, "version": served_outcome["version"]},
            "propensity": decision.propensity,
            # The decision's own dict, not a copy: `Policy.decide` makes one per decision and
            # the champion's shared decision (RouteRuntime.champion_decision) never changes.
            "arms": decision.probabilities,
            "key": ctx.key,
            "inputs": log_inputs(ctx.request) if ctx.request is not None else {},
            "outputs": outputs,
            "status": ctx.status,
            "gateway_latency_ms": _ms(ctx.gateway_latency_s),
            "task": plan.task,
        }
        if ctx.error is not None:
            record["error"] = ctx.error
        if ctx.fallback:
            record["fallback"] = True
        record["protocol"] = ctx.protocol
        return record

    def _observe(self, ctx: RequestContext, record: InferenceRecord, plan: _RoutePlan
                 ) -> float | None:
        """Prediction metrics: each model's score, and (classification) its predicted class and
        agreement with the served model. Each score is read once (the served one is returned
        for exploration); metric children are held by the route plan's models."""
        outputs = record["outputs"]
        served_model = ctx.served_model
        served_score = first_score(outputs[served_model]["outputs"])
        classify = plan.classify
        threshold = plan.threshold
        served_class = None if served_score is None else served_score >= threshold
        models = plan.models
        for model, outcome in outputs.items():
            score = served_score if model == served_model else first_score(outcome["outputs"])
            if score is None:
                continue
            model_plan = models[model]  # `_build` added every model of the record
            family = model_plan.family
            if family is None:
                family = model_plan.family = self._family(plan.route, model)
            family.score.observe(score)
            if not classify:
                continue
            predicted = score >= threshold
            family.count(int(predicted))
            if served_class is not None and model != served_model:
                family.count(AGREE if predicted == served_class else DISAGREE)
        return served_score

    def _family(self, route: str, model: str) -> _ModelMetrics:
        """(route, model)'s metric children: one object for the recorder's life, whichever route
        runtimes come and go."""
        family = self._families.get((route, model))
        if family is None:
            family = self._families[(route, model)] = _ModelMetrics(route, model)
        return family


class _ModelPlan:
    """What a model's outcome in a route's records takes from the runtime: its role, its mode
    as a copy, its configured version, its experiment (challengers) and metric children."""

    __slots__ = ("experiment", "family", "mode", "role", "version")

    def __init__(self, role: Role, mode: Mode, version: str,
                 experiment: tuple[str, float] | None) -> None:
        self.role = role
        self.mode = mode
        self.version = version
        self.experiment = experiment
        self.family: _ModelMetrics | None = None  # set by the model's first score


class _RoutePlan:
    """The parts of a route's records that only change with its runtime, worked out once rather
    than per record: the policy's description, the models' roles, modes, versions and
    experiments, and the sampling and scoring settings. The records share `policy` (nothing
    mutates a built record)."""

    __slots__ = ("classify", "experiments", "explores", "models", "policy", "registry_version",
                 "route", "runtime", "sample_rate", "sample_salt", "task", "threshold",
                 "version_of")

    def __init__(self, runtime: RouteRuntime) -> None:
        config = runtime.config
        # what `Recorder._plan` checks the runtime against
        self.runtime = runtime
        self.registry_version = runtime.registry_version
        self.experiments = runtime.experiments
        self.version_of = runtime.version_of
        self.route = config.name
        self.policy = runtime.policy.describe()  # the policy's configuration: fixed per runtime
        self.task = config.task
        self.classify = config.task == "classification"
        self.threshold = config.threshold
        self.explores = config.policy.type != "champion"
        self.sample_rate = config.log_sample_rate
        self.sample_salt = f"log:{config.name}"
        self.models: dict[str, _ModelPlan] = {}

    def add(self, model: str) -> _ModelPlan:
        """`model`'s plan, on its first record under this runtime."""
        config = self.runtime.config
        plan = self.models[model] = _ModelPlan(
            "champion" if model == config.champion.model else "challenger",
            _mode_of(config.challengers, model), self.version_of.get(model, ""),
            self.experiments.get(model))
        return plan


# `_ModelMetrics.count`'s counters: class 0 and class 1 (by the predicted class), then the
# copies' agreement with the served model.
DISAGREE, AGREE = 2, 3


class _ModelMetrics:
    """One (route, model)'s prediction metric children, made on first use (a child that exists
    is exported, so none is made before it has a value). They are `BatchedCounter`s, so a count
    is a plain addition."""

    __slots__ = ("_counters", "model", "route", "score")

    def __init__(self, route: str, model: str) -> None:
        self.route = route
        self.model = model
        self.score = metrics.child(metrics.SCORE, route, model)
        self._counters: list[metrics.BatchedCounter | None] = [None, None, None, None]

    def count(self, i: int) -> None:
        """Count one prediction of class `i` (0, 1), or one agreement (AGREE, DISAGREE)."""
        counter = self._counters[i]
        if counter is None:
            if i < DISAGREE:
                counter = metrics.child(metrics.PREDICTED_CLASS, self.route, self.model, str(i))
            else:
                counter = metrics.child(metrics.AGREEMENT, self.route, self.model,
                                        "agree" if i == AGREE else "disagree")
            self._counters[i] = counter
        counter.inc()


def _mode_of(challengers: Sequence[ChallengerConfig], model: str) -> Mode:
    """A copy's mode: its challenger's, or "shadow" (the champion scored under exploration)."""
    for challenger in challengers:
        if challenger.model == model:
            return challenger.mode
    return "shadow"


def _ms(seconds: float) -> float:
    """`round(seconds * 1000, 3)`: the very same float, for a third of `round`'s cost (it
    converts to a decimal string and back; a record has three of these).

    Rounding `ms` to 3 decimals is rounding z = ms * 1000 (exactly) to the integer k, half to
    even, then taking the float nearest k / 1000, which `k / 1000` is (IEEE division is
    correctly rounded, and k / 1000 is never a tie between two floats). `micros` is z within
    2**-24 (below 2**30 a float's spacing is at most 2**-23), so unless its fraction is near
    .5 it rounds to the same k as z, and `micros + 0.5` is exact. Anything else (near a tie,
    zero, negative, huge, NaN) goes to `round` itself."""
    ms = seconds * 1000
    micros = ms * 1000
    if 0.0 < micros < 1073741824.0:  # 2**30 µs: about 18 minutes
        fraction = micros - int(micros)
        if not 0.4999 < fraction < 0.5001:
            return int(micros + 0.5) / 1000
    return round(ms, 3)


# A copy cancelled at shutdown: the result its record gets.
_CANCELLED = ShadowResult("error", error="copy cancelled (gateway shutting down)")


def _outcome(result: ShadowResult, role: Role, mode: Mode, version: str,
             experiment: tuple[str, float] | None = None) -> ModelOutcome:
    """One model's outcome; `version` is the configured one, unless its answer names one."""
    outputs: dict[str, Tensor] | None = None
    error = result.error
    # ShadowResult speaks the vocabulary's statuses (typed as str there): no per-record check.
    status: OutcomeStatus = result.status  # type: ignore[assignment]
    if result.outputs is not None:  # a batched copy: its rows were split out of the batch answer
        outputs = result.outputs
        version = result.model_version or version
    elif result.response is not None:
        try:
            decoded = decode_response(result.response.body, result.response.header_length)
            outputs = decoded["outputs"]
            version = str(decoded.get("model_version") or version)
        except Exception as exc:
            status, error = "error", f"undecodable response: {exc!r}"
    outcome: ModelOutcome = {
        "role": role,
        "mode": mode,
        "version": version,
        "status": status,
        "latency_ms": None if result.latency_s is None else _ms(result.latency_s),
        "outputs": outputs,
        "error": error,
    }
    if result.outputs is not None and result.batch_rows is not None:
        outcome["batch_rows"] = result.batch_rows  # shared its call: latency not comparable
    if experiment is not None:  # challengers only: the champion has no experiment
        outcome["experiment"], outcome["sample_rate"] = experiment
    return outcome
