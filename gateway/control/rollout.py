"""The guarded progressive rollout controller: steps live traffic to a challenger, or rolls back.

`POST /admin/routes/{route}/rollout` (or `python -m gateway rollout ROUTE MODEL`) stores a
`RolloutPlan` on the route and sets its policy to `rollout` at the first step's fraction. From
then on every replica's controller watches the records of the current step (`observe`, fed by
the recorder) and, every `tick_s`:

- rolls back as soon as a guard breaches (errors, latency over the champion's p99, or — when
  labels arrive through /v2/feedback — reward; always-valid tests, gateway/control/guard.py):
  the route's previous policy and the challenger's previous mode come back, the challenger stops
  serving, the champion serves 100% again;
- advances to the next step once the current one has `min_requests` requests served by the
  challenger, has lasted `min_seconds`, and no guard breached;
- after the last step, ends the rollout and promotes the challenger in one registry change
  (`rollout_complete`: the route's pre-rollout policy back, then the ordinary promote edit on
  it). One change, so no reader ever sees `completed` with the old champion, and a process that
  dies mid-way leaves either the running last step (the next tick completes it) or the promoted
  route, never a completed-but-unpromoted one. If that change is refused on its merits (e.g.
  Triton says the challenger is no longer ready: a 4xx), the rollout ends `rolled_back` with
  the refusal as its reason; a 409 (another replica acted) or a 5xx (store or Triton
  unreachable) leaves it running, and the next tick judges it again.

Every transition is one registry change made by actor `rollout`, compare-and-set on the route's
version: when replicas race, exactly one change applies per step and the others are refused
(and audited as such). Evidence is per replica and in memory (each replica tests the requests
it served; any replica's breach rolls back for all); after a restart a step starts collecting
again while its clock, stored in the plan, keeps running. The plan itself is in the registry,
so a restarted gateway carries on at the step it was at.

A rollback or completion is also POSTed, as JSON, to `admin.rollout_webhook_url` when set, and
counted in `understudy_rollout_transitions_total` (the alert in deploy/prometheus/rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiohttp
import numpy as np

from gateway import metrics
from gateway.config import PolicyConfig, RouteConfig, parse_policy, parse_route
from gateway.control import edits
from gateway.control.audit import Actor
from gateway.control.edits import Built
from gateway.control.guard import GuardResult, harm_test
from gateway.control.plan import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_MIN_SECONDS,
    DEFAULT_STEPS,
    RolloutPlan,
    check_limits,
    parse_steps,
)
from gateway.control.registry import Registry
from gateway.control.state import RouteState, route_to_raw
from gateway.dataplane.routes import RouteTable
from gateway.errors import BadRequest, ConfigError, Conflict, GatewayError, NotFound
from gateway.explore.rollout import RolloutPolicy

log = logging.getLogger(__name__)

ROLLOUT_ACTOR = Actor("rollout")  # who made a change: the rollout controller
LATENCY_WARMUP = 100  # champion latencies that fix the step's p99 threshold
LATENCY_QUANTILE = 0.99
WEBHOOK_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 15.0  # how long `close` lets a tick in flight finish its registry change
COMPLETED_REASON = "every step passed its guards"
START_FIELDS = frozenset({"model", "steps", "min_requests", "min_seconds", "alpha"})


@dataclass
class StepEvidence:
    """What this replica saw of the current step: requests and bad events per arm.

    Arms are "challenger" (the target) and "champion". A model error is a 5xx answer (a
    fallback answer counts against the arm that failed); a slow request is a served latency
    above the champion's p99, fixed from the step's first `LATENCY_WARMUP` champion requests
    (only requests after that count, so the threshold is independent of what it judges).
    """

    plan_id: str
    step: int
    target: str
    champion: str
    fraction: float
    served: dict[str, int] = field(default_factory=lambda: {"challenger": 0, "champion": 0})
    errors: dict[str, int] = field(default_factory=lambda: {"challenger": 0, "champion": 0})
    slow: dict[str, int] = field(default_factory=lambda: {"challenger": 0, "champion": 0})
    timed: dict[str, int] = field(default_factory=lambda: {"challenger": 0, "champion": 0})
    warmup: list[float] = field(default_factory=list)
    threshold_ms: float | None = None

    def observe(self, record: Mapping[str, Any]) -> None:
        status = int(record.get("status") or 0)
        if 400 <= status < 500:
            return  # refused before or by the model for the request's own sake: no evidence
        served = str((record.get("served") or {}).get("model") or "")
        arm = "challenger" if served == self.target else "champion"
        if record.get("fallback"):
            arm = "champion" if arm == "challenger" else "challenger"  # the arm that failed
            status = 502
        self.served[arm] += 1
        if status >= 500:
            self.errors[arm] += 1
            return
        latency = ((record.get("outputs") or {}).get(served) or {}).get("latency_ms")
        if not isinstance(latency, int | float):
            return
        if self.threshold_ms is None:
            if arm == "champion":
                self.warmup.append(float(latency))
                if len(self.warmup) >= LATENCY_WARMUP:
                    self.threshold_ms = float(np.quantile(self.warmup, LATENCY_QUANTILE))
            return
        self.timed[arm] += 1
        if latency > self.threshold_ms:
            self.slow[arm] += 1

    def guards(self, alpha: float, rewards: tuple[float, float] | None) -> list[GuardResult]:
        """The step's harm tests; `rewards` is (challenger loss, champion loss) when known."""
        p = self.fraction
        results = [harm_test("errors", self.errors["challenger"], self.errors["champion"], p,
                             alpha)]
        if self.threshold_ms is not None:
            results.append(harm_test("latency", self.slow["challenger"], self.slow["champion"],
                                     p, alpha))
        if rewards is not None:
            results.append(harm_test("reward", rewards[0], rewards[1], p, alpha))
        return results

    def to_json(self, guards: list[GuardResult]) -> dict[str, Any]:
        return {
            "step": self.step, "fraction": self.fraction, "served": dict(self.served),
            "errors": dict(self.errors), "latency_threshold_ms": self.threshold_ms,
            "slow": dict(self.slow), "timed": dict(self.timed),
            "guards": [g.to_json() for g in guards],
        }


def _valid(config: RouteConfig) -> RouteConfig:
    """Re-parse a composed route as a whole; its ConfigError is a 400 naming the field."""
    try:
        return parse_route(config.name, route_to_raw(config))
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None


def _running(base: RouteState | None, route: str) -> tuple[RouteConfig, RolloutPlan]:
    if base is None or base.config is None:
        raise NotFound(f"unknown route '{route}'")
    plan = base.config.rollout
    if plan is None or not plan.running:
        raise Conflict(f"route '{route}' has no running rollout")
    return base.config, plan


def _ended(config: RouteConfig, plan: RolloutPlan, status: str, reason: str,
           evidence: Mapping[str, Any], now: float) -> RouteConfig:
    """The route with its pre-rollout policy and challenger mode back, and the plan closed."""
    policy: PolicyConfig = parse_policy(dict(plan.restore_policy), "rollout.restore_policy")
    challengers = tuple(
        replace(c, mode=plan.restore_mode, sample_rate=plan.restore_sample_rate)  # type: ignore[arg-type]
        if c.model == plan.target else c for c in config.challengers
    )
    closed = replace(plan, status=status, reason=reason, ended_at=now, evidence=dict(evidence))
    return replace(config, policy=policy, challengers=challengers, rollout=closed)


def parse_start(body: Mapping[str, Any]) -> dict[str, Any]:
    """A start request's settings, validated (400 naming the field)."""
    unknown = sorted(set(body) - START_FIELDS - {"expected_version"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(START_FIELDS))}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("the body must name the challenger to roll out: {\"model\": \"...\"}")
    try:
        steps = parse_steps(body.get("steps", list(DEFAULT_STEPS)), "steps")
        settings = {
            "min_requests": body.get("min_requests", DEFAULT_MIN_REQUESTS),
            "min_seconds": body.get("min_seconds", DEFAULT_MIN_SECONDS),
            "alpha": body.get("alpha", DEFAULT_ALPHA),
        }
        check_limits(settings["min_requests"], settings["min_seconds"], settings["alpha"],
                     "rollout")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    return {"model": model, "steps": steps, **settings}


class RolloutController:
    """One per gateway process; see the module docstring."""

    def __init__(self, registry: Registry, routes: RouteTable, *,
                 webhook_url: str | None = None, tick_s: float = 0.25) -> None:
        self.registry = registry
        self.routes = routes
        self.webhook_url = webhook_url
        self.tick_s = tick_s
        self._evidence: dict[str, StepEvidence] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._notifications: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin ticking. Runs after the reward bus replayed its history, so the rollout
        policies' reward counts are reset here: a step judges only rewards that arrive in it."""
        for state in self.registry.states():
            plan = state.config.rollout if state.config is not None else None
            if plan is not None and plan.running and state.name in self.routes:
                policy = self.routes.get(state.name).policy
                if isinstance(policy, RolloutPolicy):
                    policy.load_state({"version": 1, "arms": {}})
        if self.webhook_url:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Stop ticking. A tick in flight finishes first: cancelled between its store commit and
        its audit entry, a transition would be applied everywhere but missing from the audit
        stream (bounded by CLOSE_TIMEOUT_S, after which it is cancelled)."""
        self._stopping.set()
        if self._task is not None:
            _, pending = await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT_S)
            if pending:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._notifications:
            await asyncio.wait(list(self._notifications), timeout=WEBHOOK_TIMEOUT_S)
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.tick_s)
                return  # closing
            try:
                await self.tick()
            except Exception:  # one bad tick must not stop the guards
                log.exception("rollout: tick failed")

    # -- evidence -----------------------------------------------------------------------------

    def _step_evidence(self, config: RouteConfig, plan: RolloutPlan) -> StepEvidence:
        ev = self._evidence.get(config.name)
        if ev is None or (ev.plan_id, ev.step) != (plan.id, plan.step):
            ev = self._evidence[config.name] = StepEvidence(
                plan.id, plan.step, plan.target, config.champion.model, plan.fraction)
        return ev

    def observe(self, record: Mapping[str, Any]) -> None:
        """Recorder observer: count a record of a running rollout's current step."""
        policy = record.get("policy")
        # Called for every record: a plain dict (what the recorder builds) skips the ABC check.
        if (type(policy) is not dict and not isinstance(policy, Mapping)) \
                or policy.get("type") != "rollout":
            return
        state = self.registry.state(str(record.get("route")))
        plan = state.config.rollout if state is not None and state.config is not None else None
        if plan is None or not plan.running or policy.get("target") != plan.target \
                or not math.isclose(float(policy.get("fraction") or 0.0), plan.fraction):
            return  # a record of an earlier step or rollout, still in flight
        assert state is not None
        assert state.config is not None
        self._step_evidence(state.config, plan).observe(record)

    def _losses(self, route: str, champion: str, plan: RolloutPlan
                ) -> tuple[float, float] | None:
        """(challenger, champion) loss sums (1 - reward) credited in this step, if any."""
        if route not in self.routes:
            return None
        policy = self.routes.get(route).policy
        if not isinstance(policy, RolloutPolicy) or not policy.unit_rewards \
                or not math.isclose(policy.fraction, plan.fraction):
            return None
        n_x, s_x = policy.reward_stats(plan.target)
        n_c, s_c = policy.reward_stats(champion)
        if n_x + n_c == 0:
            return None
        return n_x - s_x, n_c - s_c

    def _judge(self, state: RouteState) -> tuple[StepEvidence, list[GuardResult]]:
        config = state.config
        assert config is not None
        assert config.rollout is not None
        plan = config.rollout
        ev = self._step_evidence(config, plan)
        guards = ev.guards(plan.alpha, self._losses(config.name, config.champion.model, plan))
        for g in guards:
            metrics.child(metrics.ROLLOUT_EVALUE, config.name, g.name).set(g.e_value)
        return ev, guards

    # -- the control loop ---------------------------------------------------------------------

    async def tick(self, now: float | None = None) -> None:
        """Check every running rollout once: roll back, advance, complete, or wait."""
        for state in self.registry.states():
            plan = state.config.rollout if state.config is not None else None
            if state.config is None or plan is None:
                continue
            metrics.child(metrics.ROLLOUT_FRACTION, state.name).set(
                plan.fraction if plan.running else 0.0)
            if not plan.running:
                continue
            try:
                await self._step(state, time.time() if now is None else now)
            except Conflict as exc:
                log.info("rollout: route '%s' changed under the controller (%s); another "
                         "replica acted", state.name, exc.message)
            except GatewayError as exc:  # store or Triton unreachable: the next tick retries
                log.warning("rollout: route '%s': transition failed (%d: %s); retrying at the "
                            "next tick", state.name, exc.status, exc.message)

    async def _step(self, state: RouteState, now: float) -> None:
        config = state.config
        assert config is not None
        assert config.rollout is not None
        plan = config.rollout
        ev, guards = self._judge(state)
        evidence = ev.to_json(guards)
        breached = [g for g in guards if g.breached]
        if breached:
            worst = breached[0]
            reason = (f"{worst.name} guard breached at {plan.guarded_steps[plan.step]:g}%: "
                      f"{worst.challenger_events:g} of {worst.events:g} bad events from "
                      f"{plan.target} (expected share {worst.share_null:.3f}); rate ratio >= "
                      f"{worst.ratio_lower:.2f} at alpha {plan.alpha:g}")
            await self._roll_back(state, plan, reason, evidence, now)
            return
        enough = ev.served["challenger"] >= plan.min_requests and ev.threshold_ms is not None
        if not enough or now - plan.step_started_at < plan.min_seconds:
            return
        if plan.last_step:
            await self._complete(state, plan, evidence, now)
            return
        await self._advance(state, plan, evidence, now)

    async def _transition(self, state: RouteState, action: str,
                          make: Callable[[RouteState, RouteConfig, RolloutPlan], Built],
                          request: Mapping[str, Any]) -> RouteState:
        """One controller change, compare-and-set on the version the decision was made at,
        and only while the rollout is still at the step that was judged. `make` gets the
        freshest stored state, its config and the (running) plan."""
        assert state.config is not None
        assert state.config.rollout is not None
        plan = state.config.rollout

        def build(base: RouteState | None) -> Built:
            config, current = _running(base, state.name)
            if (current.id, current.step) != (plan.id, plan.step):
                raise Conflict(f"rollout of route '{state.name}' already left step {plan.step}")
            assert base is not None
            return make(base, config, plan)

        return await self.registry.change(ROLLOUT_ACTOR, action, state.name, build,
                                          state.version, request)

    async def _advance(self, state: RouteState, plan: RolloutPlan,
                       evidence: Mapping[str, Any], now: float) -> None:
        def make(base: RouteState, config: RouteConfig, plan: RolloutPlan) -> Built:
            nxt = replace(plan, step=plan.step + 1, step_started_at=now, evidence=dict(evidence))
            return _valid(replace(config, policy=replace(config.policy, fraction=nxt.fraction),
                                  rollout=nxt)), base.history

        percent = plan.guarded_steps[plan.step + 1]
        new = await self._transition(state, "rollout_step", make,
                                     {"model": plan.target, "step": plan.step + 1,
                                      "percent": percent})
        metrics.child(metrics.ROLLOUT_TRANSITIONS, state.name, "advanced").inc()
        log.info("rollout: route '%s' advanced %s to %g%% (version %d)", state.name,
                 plan.target, percent, new.version)

    async def _complete(self, state: RouteState, plan: RolloutPlan,
                        evidence: Mapping[str, Any], now: float) -> None:
        """End the rollout and promote the challenger as one change (module docstring): the
        route's pre-rollout policy and challenger mode back, then the ordinary promote edit on
        that route, so the old champion stays on as the challenger one `rollback` needs."""

        def make(base: RouteState, config: RouteConfig, plan: RolloutPlan) -> Built:
            ended = _ended(config, plan, "completed", COMPLETED_REASON, evidence, now)
            return edits.promote(replace(base, config=_valid(ended)), state.name, plan.target,
                                 None)

        try:
            new = await self._transition(state, "rollout_complete", make,
                                         {"model": plan.target, "reason": COMPLETED_REASON,
                                          "promote": plan.target})
        except Conflict:
            raise  # another replica acted, or the route moved on: judged again at the next tick
        except GatewayError as exc:
            if exc.status >= 500:
                raise  # the store or Triton is unreachable: the next tick tries again
            log.error("rollout: route '%s' passed every step but promoting %s was refused "
                      "(%d: %s); rolling back", state.name, plan.target, exc.status, exc.message)
            await self._roll_back(state, plan, f"passed every step, but promoting {plan.target} "
                                  f"was refused: {exc.message}", evidence, now)
            return
        await self._ended_by_us(new, plan, "completed", COMPLETED_REASON, evidence, now)

    async def _roll_back(self, state: RouteState, plan: RolloutPlan, reason: str,
                         evidence: Mapping[str, Any], now: float) -> None:
        """Restore the route's pre-rollout policy and challenger mode (one CAS change)."""

        def make(base: RouteState, config: RouteConfig, plan: RolloutPlan) -> Built:
            return (_valid(_ended(config, plan, "rolled_back", reason, evidence, now)),
                    base.history)

        new = await self._transition(state, "rollout_rollback", make,
                                     {"model": plan.target, "reason": reason})
        await self._ended_by_us(new, plan, "rolled_back", reason, evidence, now)

    async def _ended_by_us(self, new: RouteState, plan: RolloutPlan, status: str, reason: str,
                           evidence: Mapping[str, Any], now: float) -> None:
        """The side effects of a rollout's end (metrics, log, webhook), by the replica whose
        change landed last only."""
        if not await self._won(new):
            return
        metrics.child(metrics.ROLLOUT_TRANSITIONS, new.name, status).inc()
        metrics.child(metrics.ROLLOUT_FRACTION, new.name).set(0.0)
        completed = status == "completed"
        (log.info if completed else log.warning)(
            "rollout: route '%s' %s %s (version %d): %s", new.name,
            "completed, promoted" if completed else "rolled back", plan.target, new.version,
            reason)
        self._notify({
            "event": f"rollout.{status}", "route": new.name, "model": plan.target,
            "rollout": plan.id, "step": plan.step, "percent": plan.guarded_steps[plan.step],
            "reason": reason, "evidence": dict(evidence),
            "promoted": plan.target if completed else None, "at": now,
            "replica": self.registry.replica,
        })

    async def _won(self, mine: RouteState) -> bool:
        """Whether our transition is the route's latest. The file store's compare-and-set lets
        one writer through per version; the Kafka store's is last-writer-wins within the
        window of a write, so a replica whose transition was overtaken leaves the side effects
        (metrics, webhook) to the one that landed last. (Two identical completions that both
        land promote once: each one's promotion is built on the same pre-completion state.)"""
        latest = await self.registry.store.latest(mine.name)
        if latest is not None and latest.change_id != mine.change_id:
            log.info("rollout: route '%s': another replica's change landed after ours (version "
                     "%d); it acts", mine.name, latest.version)
            return False
        return True

    def _notify(self, event: dict[str, Any]) -> None:
        if self._session is None or not self.webhook_url:
            return
        task = asyncio.get_running_loop().create_task(self._post(event))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _post(self, event: dict[str, Any]) -> None:
        assert self._session is not None
        assert self.webhook_url is not None
        try:
            async with self._session.post(self.webhook_url, json=event) as resp:
                if resp.status >= 300:
                    log.warning("rollout: webhook answered %d for %s", resp.status,
                                event["event"])
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("rollout: webhook POST for %s failed: %r", event["event"], exc)

    # -- admin API ----------------------------------------------------------------------------

    async def begin(self, actor: Actor, route: str, body: Mapping[str, Any],
                    expected: int | None = None) -> dict[str, Any]:
        """Start a rollout: the route's policy becomes `rollout` at the first step."""
        settings = parse_start(body)
        model = settings["model"]
        now = time.time()

        def build(base: RouteState | None) -> Built:
            if base is None or base.config is None:
                raise NotFound(f"unknown route '{route}'")
            config = base.config
            if config.rollout is not None and config.rollout.running:
                raise Conflict(f"a rollout of '{config.rollout.target}' is already running on "
                               f"route '{route}'; abort it first")
            challenger = config.challenger(model)
            if challenger is None:
                raise NotFound(f"route '{route}' has no challenger '{model}'; add it as a "
                               "challenger first")
            plan = RolloutPlan(
                id=uuid.uuid4().hex[:12], target=model, steps=settings["steps"],
                min_requests=settings["min_requests"],
                min_seconds=float(settings["min_seconds"]), alpha=float(settings["alpha"]),
                started_at=now, step_started_at=now, started_by=actor.to_json(),
                restore_policy=asdict(config.policy), restore_mode=challenger.mode,
                restore_sample_rate=challenger.sample_rate,
            )
            policy = PolicyConfig(type="rollout", target=model, fraction=plan.fraction,
                                  sticky_header=config.policy.sticky_header,
                                  reward=config.policy.reward)
            challengers = tuple(replace(c, mode="explore", sample_rate=1.0)
                                if c.model == model else c for c in config.challengers)
            new = replace(config, policy=policy, challengers=challengers, rollout=plan)
            return _valid(new), base.history

        request = {k: v for k, v in settings.items() if k != "steps"}
        request["steps"] = list(settings["steps"])
        await self.registry.change(actor, "rollout_start", route, build, expected, request)
        metrics.child(metrics.ROLLOUT_TRANSITIONS, route, "started").inc()
        return self.status(route)

    async def abort(self, actor: Actor, route: str, expected: int | None = None
                    ) -> dict[str, Any]:
        """Stop a running rollout by hand: the champion serves 100% again (no promotion)."""
        now = time.time()
        evidence: dict[str, Any] = {}
        state = self.registry.state(route)
        if state is not None and state.config is not None and state.config.rollout is not None \
                and state.config.rollout.running:
            ev, guards = self._judge(state)
            evidence = ev.to_json(guards)

        def build(base: RouteState | None) -> Built:
            config, plan = _running(base, route)
            assert base is not None
            reason = f"aborted by {actor.scope}:{actor.fingerprint or '-'}"
            return _valid(_ended(config, plan, "aborted", reason, evidence, now)), base.history

        await self.registry.change(actor, "rollout_abort", route, build, expected, None)
        metrics.child(metrics.ROLLOUT_TRANSITIONS, route, "aborted").inc()
        metrics.child(metrics.ROLLOUT_FRACTION, route).set(0.0)
        return self.status(route)

    def status(self, route: str) -> dict[str, Any]:
        """The route's current or last rollout, with this replica's evidence for a running one."""
        state = self.registry.state(route)
        if state is None or state.config is None:
            raise NotFound(f"unknown route '{route}'")
        plan = state.config.rollout
        if plan is None:
            raise NotFound(f"route '{route}' has had no rollout (start one: python -m gateway "
                           f"rollout {route} MODEL --steps 5,25,50,100)")
        view: dict[str, Any] = {
            "route": route, "version": state.version, "champion": asdict(state.config.champion),
            **asdict(plan), "percent": plan.guarded_steps[plan.step],
            "replica": self.registry.replica,
        }
        view["steps"] = list(plan.steps)
        if plan.running:
            ev, guards = self._judge(state)
            view["live"] = ev.to_json(guards)
        return view
