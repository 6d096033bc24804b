"""The registry's unit of state: one route's full configuration plus its version and history.

A `RouteState` is what the registry stores (state file or compacted Kafka topic, keyed by route)
and what every replica applies. It carries the *whole* route, not a diff: a replica that has
missed any number of changes (or starts from a compacted topic) needs only the latest state per
route. It also carries the audit entry of the change that produced it, so a replica applying a
change made elsewhere can show it in its own `GET /admin/audit`.

Each challenger also has an *experiment* (`Experiment`: an id and a start time): the span of
traffic over which its comparison with the champion is one experiment. A new one starts when the
challenger is added, when its mode, sample rate or version changes, and for every challenger of
the route when the route's policy or champion changes; the evaluator decides on all rows of a
challenger's current experiment. Experiments live here, in the state, so they persist with it
and every replica agrees on them.

Deleting a route leaves a tombstone (`config=None`) rather than removing the key: otherwise the
YAML config would seed the deleted route again on the next start.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.config import (
    ChallengerConfig,
    ModelRef,
    RouteConfig,
    check_model_name,
    check_model_version,
    parse_challenger,
    parse_route,
)
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

STATE_FORMAT = 1
MAX_HISTORY = 20  # promotions remembered per route, i.e. how many rollbacks in a row are possible


@dataclass(frozen=True)
class Promotion:
    """One promotion, remembered so that `rollback` can undo it.

    `previous` is the champion that was replaced; `promoted` is the challenger entry (mode,
    rates, limits) of the model that became champion, so a rollback can put it back exactly.
    """

    previous: ModelRef
    promoted: ChallengerConfig

    def to_json(self) -> dict[str, Any]:
        return {"previous": asdict(self.previous), "promoted": asdict(self.promoted)}

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> Promotion:
        prev = raw["previous"]
        return Promotion(
            ModelRef(str(prev["model"]), str(prev.get("version") or "")),
            parse_challenger(raw["promoted"], "history.promoted"),
        )


EXPERIMENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class Experiment:
    """A challenger's current experiment: `id` ([A-Za-z0-9._:-], <= 64 chars) and unix start."""

    id: str
    started: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "started": self.started}

    @staticmethod
    def new(version: int, now: float | None = None) -> Experiment:
        """A fresh experiment, named after the route version that starts it (readable in logs)."""
        started = time.time() if now is None else now
        return Experiment(f"v{version}-{uuid.uuid4().hex[:12]}", started)

    @staticmethod
    def from_json(raw: Any) -> Experiment:
        if not isinstance(raw, Mapping):
            raise TypeError(f"experiment must be an object, got {type(raw).__name__}")
        exp_id = str(raw["id"])
        if EXPERIMENT_ID.fullmatch(exp_id) is None:
            raise ValueError(f"experiment id {exp_id!r} must match {EXPERIMENT_ID.pattern}")
        return Experiment(exp_id, float(raw["started"]))


def _drop_unservable(name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """A stored route minus challengers whose names Triton cannot serve from a URL.

    Older gateways accepted names such as `fraud_v4?x=1`; every copy to them failed. Dropping
    them (loudly) lets such a state load instead of stopping the gateway; the next change
    stores the cleaned route.
    """
    kept: list[Any] = []
    for i, challenger in enumerate(raw.get("challengers") or ()):
        try:
            if isinstance(challenger, Mapping):
                check_model_name(challenger.get("model"), f"routes.{name}.challengers[{i}].model")
                check_model_version(challenger.get("version"),
                                    f"routes.{name}.challengers[{i}].version")
        except ConfigError as exc:
            log.error("registry: dropping challenger %r of route '%s' from the stored state: %s",
                      challenger.get("model"), name, exc)
            continue
        kept.append(challenger)
    if len(kept) == len(raw.get("challengers") or ()):
        return dict(raw)
    models = {c.get("model") for c in kept if isinstance(c, Mapping)}
    fallback = raw.get("fallback")
    return {**raw, "challengers": kept,
            "fallback": fallback if fallback is None or fallback in models else None}


def _legacy_experiment(route: str, version: int, model: str, change: Mapping[str, Any]
                       ) -> Experiment:
    """For a state written before experiments existed: deterministic, so replicas agree."""
    digest = hashlib.blake2b(f"{route}/{version}/{model}".encode(), digest_size=6).hexdigest()
    return Experiment(f"v{version}-{digest}", float(change.get("ts") or 0.0))


@dataclass(frozen=True)
class RouteState:
    """The versioned state of one route; `config is None` marks a deleted route (tombstone)."""

    name: str
    version: int
    config: RouteConfig | None
    history: tuple[Promotion, ...] = ()
    change: Mapping[str, Any] = field(default_factory=dict)
    experiments: Mapping[str, Experiment] = field(default_factory=dict)  # challenger -> current

    @property
    def change_id(self) -> str:
        return str(self.change.get("id", ""))

    @property
    def deleted(self) -> bool:
        return self.config is None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "route": self.name,
            "version": self.version,
            "config": route_to_raw(self.config) if self.config is not None else None,
            "history": [p.to_json() for p in self.history],
            "change": dict(self.change),
            "experiments": {m: e.to_json() for m, e in self.experiments.items()},
        }

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> RouteState:
        """Parse a stored state; raises ConfigError when it is not a valid route state."""
        try:
            name = str(raw["route"])
            config_raw = raw.get("config")
            version = int(raw["version"])
            if isinstance(config_raw, Mapping):
                config_raw = _drop_unservable(name, config_raw)
            config = parse_route(name, config_raw) if config_raw is not None else None
            change = dict(raw.get("change") or {})
            stored = {str(m): Experiment.from_json(e)
                      for m, e in (raw.get("experiments") or {}).items()}
            experiments = {
                c.model: stored.get(c.model) or _legacy_experiment(name, version, c.model, change)
                for c in (config.challengers if config is not None else ())
            }
            return RouteState(
                name=name,
                version=version,
                config=config,
                history=tuple(Promotion.from_json(p) for p in raw.get("history") or ()),
                change=change,
                experiments=experiments,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid registry state: {exc!r}") from None


def route_to_raw(config: RouteConfig) -> dict[str, Any]:
    """A route as the plain mapping `parse_route` accepts (the YAML shape, minus the name)."""
    raw = asdict(config)
    raw.pop("name")
    raw["challengers"] = list(raw["challengers"])  # JSON-shaped: equal after a round trip
    return raw


def route_view(state: RouteState) -> dict[str, Any]:
    """The admin API's JSON view of a route: its config plus version and last change."""
    assert state.config is not None
    last = state.history[-1] if state.history else None
    raw = route_to_raw(state.config)
    for challenger in raw["challengers"]:
        experiment = state.experiments.get(challenger["model"])
        challenger["experiment"] = experiment.to_json() if experiment is not None else None
    return {
        "name": state.name,
        "version": state.version,
        **raw,
        "rollback_to": asdict(last.previous) if last is not None else None,
        "updated_at": state.change.get("ts"),
        "updated_by": state.change.get("actor"),
        "last_action": state.change.get("action"),
    }


# Keys of `route_view` that are not part of a route's config: accepted (and ignored) in a PUT
# body so that GET -> edit -> PUT works.
READ_ONLY_KEYS = frozenset(
    {"name", "version", "rollback_to", "updated_at", "updated_by", "last_action",
     "expected_version"}
)
