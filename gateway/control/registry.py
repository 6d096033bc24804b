"""The challenger registry: the control plane's core, independent of HTTP.

Every change (add/remove a challenger, set a policy, promote, roll back, create/delete a route)
goes through `Registry._change`, which

1. reads the route's freshest state from the store (not this replica's possibly older view),
2. builds the new route config from it (gateway/control/edits.py) and validates it: the
   structure (rates in [0, 1], no duplicate models, ...) and, against Triton
   (gateway/control/checks.py), that every new or changed model exists, is ready and has the
   champion's input signature (names, datatypes, shapes),
3. commits it to the store as a compare-and-set on the route's version, and
4. audits it, whether applied or refused.

Nothing touches the live route table before the store has the change: the table is updated
only by the store's `on_change` callback, on this replica and on every other one alike, so all
replicas apply the same sequence of states. A refused change therefore leaves the route exactly
as it was, everywhere.

Conflicts: a change without `expected_version` is retried on the newer state when another
writer got there first (up to `MAX_ATTEMPTS` times, revalidating each time), so concurrent
writers never lose each other's update. With `expected_version` the caller asked for a
compare-and-set, and a stale version is a 409.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from gateway import metrics
from gateway.backends.registry_store import RegistryStore, StaleWrite
from gateway.config import (
    ChallengerConfig,
    RouteConfig,
    exploration_problem,
    parse_challenger,
    parse_policy,
    parse_route,
)
from gateway.control import edits
from gateway.control.audit import CONFIG_ACTOR, Actor, AuditLog, new_entry
from gateway.control.checks import ChangeChecks, InvalidChange
from gateway.control.edits import Build, Built, model_name, next_experiments, parse_or_400
from gateway.control.plan import rollout_problem
from gateway.control.state import RouteState, route_to_raw, route_view
from gateway.dataplane.routes import RouteTable
from gateway.errors import BadRequest, Conflict, GatewayError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _AlreadyDeclared(Exception):
    """A config sync found the route already as declared (another replica applied it)."""


def replica_id() -> str:
    """Names this gateway process in audit entries (host, pid, random suffix)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _snapshot(state: RouteState | None) -> dict[str, Any] | None:
    """A route as an audit entry's before/after: config plus version."""
    if state is None or state.config is None:
        return None
    return {"version": state.version, **route_to_raw(state.config)}


class Registry:
    """Owns the route table's contents: seeds it, follows the store, and makes changes."""

    def __init__(
        self,
        routes: RouteTable,
        store: RegistryStore,
        audit: AuditLog,
        seed: Mapping[str, RouteConfig],
        *,
        replica: str | None = None,
        source_of_truth: str = "registry",
    ) -> None:
        self.routes = routes
        self.store = store
        self.audit = audit
        self.seed = dict(seed)
        self.source_of_truth = source_of_truth
        self.replica = replica or replica_id()
        self._states: dict[str, RouteState] = {}
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the store (which applies every stored route), seed routes it never saw, and
        reconcile the YAML with the routes it knows (`admin.source_of_truth`).

        The YAML seeds a route only when the store has no state for it at all (a deleted route
        leaves a tombstone, so it is not seeded again). For a route the store knows and the
        YAML declares differently: with `registry` (default) the stored state is served and a
        WARNING names the route; with `config` the YAML's route is applied as an audited change
        by actor "config" (validated against Triton like any change; refused, it is logged and
        the stored state stays).
        """
        await self.store.start(self._on_change)
        if hasattr(self.store, "on_connected"):
            self.store.on_connected = self._reconcile
        await self._reconcile()
        self._started = True

    def _differing(self) -> list[str]:
        return sorted(
            n for n, c in self.seed.items()
            if (s := self._states.get(n)) is not None and s.config is not None and s.config != c
        )

    async def _reconcile(self) -> None:
        await self._seed_missing()
        differing = self._differing()
        if not differing:
            return
        if self.source_of_truth != "config":
            log.warning(
                "registry: route(s) %s in the YAML config differ from the live registry; the "
                "registry's state is served (admin.source_of_truth: registry). Change them "
                "through the admin API, or set admin.source_of_truth: config to make the YAML "
                "win at start", ", ".join(differing))
            return
        for name in differing:
            declared = self.seed[name]

            def build(base: RouteState | None, declared: RouteConfig = declared) -> Built:
                if base is not None and base.config == declared:
                    raise _AlreadyDeclared
                same = base is not None and base.config is not None
                return declared, base.history if same and base is not None else ()

            try:
                await self._change(CONFIG_ACTOR, "config_sync", name, build, None,
                                   {"source_of_truth": "config"})
            except _AlreadyDeclared:
                continue
            except GatewayError as exc:
                log.error("registry: cannot apply route '%s' from the YAML config (%s); the "
                          "registry's state is served", name, exc.message)
            else:
                log.warning("registry: route '%s' replaced by the YAML config "
                            "(admin.source_of_truth: config)", name)

    async def _seed_missing(self) -> None:
        for name, config in self.seed.items():
            if name in self._states:
                continue
            experiments, _ = next_experiments(None, config, 1, time.time())
            entry = new_entry(CONFIG_ACTOR, "seed", name, replica=self.replica,
                              after={"version": 1, **route_to_raw(config)}, version=1,
                              experiments=experiments)
            try:
                await self.store.commit(
                    RouteState(name, 1, config, (), entry, experiments), 0)
            except StaleWrite:
                continue  # another replica seeded it first; its state was delivered
            except GatewayError as exc:
                log.warning("registry: cannot seed route '%s' into the store (%s); serving it "
                            "from the YAML config for now", name, exc.message)
                continue
            self.audit.emit(entry)

    async def close(self) -> None:
        await self.store.close()

    def _on_change(self, state: RouteState) -> None:
        """Apply a stored state to the live table (called by the store, for every replica)."""
        previous = self._states.get(state.name)
        if previous is not None and previous.change_id == state.change_id \
                and previous.version == state.version:
            return
        self._states[state.name] = state
        try:
            if state.config is None:
                self.routes.remove(state.name)
            else:
                runtime = self.routes.apply(state.config)
                # Precomputed once per state for the recorder (no per-request lookups).
                runtime.registry_version = state.version
                runtime.experiments = {
                    c.model: (state.experiments[c.model].id, c.sample_rate)
                    for c in state.config.challengers if c.model in state.experiments
                }
        except Exception:  # a bad remote state must not stop this replica following the store
            log.exception("registry: could not apply route '%s' version %d; keeping the "
                          "previous runtime", state.name, state.version)
            return
        if state.change:
            self.audit.remember(state.change)
        if self._started:
            action = str(state.change.get("action", "unknown"))
            metrics.REGISTRY_CHANGES.labels(state.name, action).inc()
            log.info("registry: route '%s' now at version %d (%s)", state.name, state.version,
                     action)

    # -- reads ------------------------------------------------------------------------------

    def state(self, name: str) -> RouteState | None:
        """This replica's current state of a route (None: never seen)."""
        return self._states.get(name)

    def states(self) -> list[RouteState]:
        return list(self._states.values())

    async def audit_trail(self, limit: int = 100, route: str | None = None) -> list[dict[str, Any]]:
        """`GET /admin/audit`: the newest entries, once every change any replica applied up to
        now is among them (the store's `changes`; see gateway/control/audit.py)."""
        self.audit.load(await self.store.changes())
        return self.audit.recent(limit, route)

    def list_routes(self) -> list[dict[str, Any]]:
        return [route_view(s) for _, s in sorted(self._states.items()) if s.config is not None]

    def get_route(self, name: str) -> dict[str, Any]:
        state = self._states.get(name)
        edits.require(state, name)
        assert state is not None
        return route_view(state)

    # -- changes ----------------------------------------------------------------------------

    async def put_route(
        self, actor: Actor, name: str, body: Mapping[str, Any], expected: int | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Create or replace a route; returns (view, created)."""
        if not ROUTE_NAME.match(name):
            raise BadRequest(f"route name {name!r} must match {ROUTE_NAME.pattern}")
        raw = edits.without_read_only(body)
        config = parse_or_400(lambda: parse_route(name, raw))
        created = False

        def build(base: RouteState | None) -> Built:
            nonlocal created
            created = base is None or base.config is None
            return config, base.history if base is not None and not created else ()

        state = await self._change(actor, "put_route", name, build, expected, dict(body))
        return route_view(state), created

    async def delete_route(self, actor: Actor, name: str, expected: int | None = None) -> None:
        await self._change(actor, "delete_route", name,
                           lambda base: edits.delete_route(base, name), expected, None)

    async def add_challenger(
        self, actor: Actor, name: str, body: Mapping[str, Any], expected: int | None = None
    ) -> dict[str, Any]:
        raw = {k: v for k, v in body.items() if k != "expected_version"}
        challenger: ChallengerConfig = parse_or_400(lambda: parse_challenger(raw, "challenger"))

        def build(base: RouteState | None) -> Built:
            return edits.add_challenger(base, name, challenger)

        state = await self._change(actor, "add_challenger", name, build, expected, dict(body))
        return route_view(state)

    async def update_challenger(
        self, actor: Actor, name: str, model: str, body: Mapping[str, Any],
        expected: int | None = None,
    ) -> dict[str, Any]:
        """Change a challenger's settings in place (mode, sample_rate, limits); a change of mode,
        sample rate or version starts a new experiment for it."""
        model_name(model, "model")
        raw = {k: v for k, v in body.items() if k != "expected_version"}
        if not raw:
            raise BadRequest("nothing to change: give e.g. {\"mode\": \"explore\"} or "
                             "{\"sample_rate\": 0.5}")
        if raw.get("model", model) != model:
            raise BadRequest("challenger.model: cannot be changed; add the other model instead")

        def build(base: RouteState | None) -> Built:
            return edits.update_challenger(base, name, model, raw)

        state = await self._change(actor, "update_challenger", name, build, expected,
                                   {"model": model, **raw})
        return route_view(state)

    async def remove_challenger(
        self, actor: Actor, name: str, model: str, expected: int | None = None
    ) -> dict[str, Any]:
        def build(base: RouteState | None) -> Built:
            return edits.remove_challenger(base, name, model)

        state = await self._change(
            actor, "remove_challenger", name, build, expected, {"model": model}
        )
        return route_view(state)

    async def set_policy(
        self, actor: Actor, name: str, body: Mapping[str, Any], expected: int | None = None
    ) -> dict[str, Any]:
        raw = {k: v for k, v in body.items() if k != "expected_version"}
        policy = parse_or_400(lambda: parse_policy(raw, "policy"))

        def build(base: RouteState | None) -> Built:
            return edits.set_policy(base, name, policy)

        state = await self._change(actor, "set_policy", name, build, expected, dict(body))
        return route_view(state)

    async def promote(
        self, actor: Actor, name: str, model: str, expected: int | None = None,
        experiment: str | None = None,
    ) -> dict[str, Any]:
        """The challenger becomes champion; the old champion stays on as a challenger (with the
        promoted model's limits) so that one `rollback` restores the route. It is a shadow,
        except on an exploring route where it takes the promoted model's place as an explore
        arm (so the route keeps something to explore).

        `experiment`: the challenger's experiment id the caller's evidence comes from (e.g. the
        evaluator's report); refused with 409 when the challenger's current experiment differs.
        """
        model_name(model, "model")

        def build(base: RouteState | None) -> Built:
            return edits.promote(base, name, model, experiment)

        request: dict[str, Any] = {"model": model}
        if experiment is not None:
            request["experiment"] = experiment
        state = await self._change(actor, "promote", name, build, expected, request)
        return route_view(state)

    async def rollback(
        self, actor: Actor, name: str, expected: int | None = None
    ) -> dict[str, Any]:
        """Undo the last promotion: the previous champion is champion again and the current
        one goes back to the challenger entry it had before it was promoted."""

        def build(base: RouteState | None) -> Built:
            return edits.rollback(base, name)

        state = await self._change(actor, "rollback", name, build, expected, None)
        return route_view(state)

    async def change(
        self, actor: Actor, action: str, route: str, build: Build, expected: int | None,
        request: Mapping[str, Any] | None,
    ) -> RouteState:
        """A change built outside this module (the rollout controller's steps), with the same
        validation, compare-and-set and audit as every other change."""
        return await self._change(actor, action, route, build, expected, request)

    async def _change(
        self,
        actor: Actor,
        action: str,
        route: str,
        build: Build,
        expected: int | None,
        request: Mapping[str, Any] | None,
    ) -> RouteState:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            base = await self.store.latest(route)
            base_version = base.version if base is not None else 0
            try:
                if expected is not None and expected != base_version:
                    raise Conflict(
                        f"route '{route}' is at version {base_version}, not {expected}: it "
                        "changed since you read it; re-read it and retry"
                    )
                config, history = build(base)
                problem = (rollout_problem(config) or exploration_problem(config)
                           if config is not None else None)
                if problem is not None:
                    raise InvalidChange(problem)
                await ChangeChecks(self.routes.upstream).validate(
                    route, config, base.config if base is not None else None)
            except GatewayError as exc:
                self._refused(actor, action, route, base, request, exc)
                raise
            experiments, started = (
                next_experiments(base, config, base_version + 1, time.time())
                if config is not None else ({}, {})
            )
            entry = new_entry(
                actor, action, route, replica=self.replica, before=_snapshot(base),
                version=base_version + 1, request=request,
                after={"version": base_version + 1, **route_to_raw(config)} if config else None,
                experiments=started,
            )
            state = RouteState(route, base_version + 1, config, history, entry, experiments)
            try:
                await self.store.commit(state, base_version)
            except StaleWrite as exc:
                if expected is None and attempt < MAX_ATTEMPTS:
                    log.info("registry: %s on '%s' raced another writer (%s); retrying",
                             action, route, exc)
                    continue
                conflict = Conflict(f"{exc}: another change won; re-read the route and retry")
                self._refused(actor, action, route, base, request, conflict)
                raise conflict from None
            except GatewayError as exc:
                self._refused(actor, action, route, base, request, exc)
                raise
            self.audit.emit(entry)
            return state
        raise AssertionError("unreachable")  # pragma: no cover

    def _refused(
        self,
        actor: Actor,
        action: str,
        route: str,
        base: RouteState | None,
        request: Mapping[str, Any] | None,
        exc: GatewayError,
    ) -> None:
        snapshot = _snapshot(base)
        self.audit.emit(new_entry(
            actor, action, route, replica=self.replica, before=snapshot, after=snapshot,
            version=base.version if base is not None else None, outcome="rejected",
            error=exc.message, request=request,
        ))
        log.info("registry: %s on '%s' refused (%d): %s", action, route, exc.status, exc.message)
