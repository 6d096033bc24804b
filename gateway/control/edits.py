"""What each admin change does to a route: pure functions from the stored state to the new
config and promotion history (no store, no Triton, no audit: gateway/control/registry.py runs
them inside its compare-and-set loop, so each may run again on a newer state after a race).

A refused edit raises the `GatewayError` the client gets (400, 404, 409); a config that does
not parse is a 400 naming the bad field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from typing import Any

from gateway.config import (
    ChallengerConfig,
    PolicyConfig,
    RouteConfig,
    check_model_name,
    parse_challenger,
    parse_route,
)
from gateway.control.state import (
    MAX_HISTORY,
    READ_ONLY_KEYS,
    Experiment,
    Promotion,
    RouteState,
    route_to_raw,
)
from gateway.errors import BadRequest, ConfigError, Conflict, NotFound

# What an edit returns: the new config (None deletes the route) and the new history.
Built = tuple[RouteConfig | None, tuple[Promotion, ...]]
Build = Callable[[RouteState | None], Built]


def parse_or_400(fn: Callable[[], Any]) -> Any:
    """Run a config parser; its ConfigError becomes a 400 naming the bad field."""
    try:
        return fn()
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None


def require(state: RouteState | None, route: str) -> RouteConfig:
    """The route's config, or 404 when the store has no live route of that name."""
    if state is None or state.config is None:
        raise NotFound(f"unknown route '{route}'")
    return state.config


def _reparse(config: RouteConfig) -> RouteConfig:
    """Re-validate a composed route as a whole (duplicates, fallback, rates)."""
    result: RouteConfig = parse_or_400(lambda: parse_route(config.name, route_to_raw(config)))
    return result


def model_name(model: Any, where: str) -> str:
    """A model name from a URL or body: a 400 naming the field when Triton could not take it."""
    return str(parse_or_400(lambda: check_model_name(model, where)))


def without_read_only(body: Mapping[str, Any]) -> dict[str, Any]:
    """A PUT body minus what `route_view` adds (so GET -> edit -> PUT works)."""
    raw = {k: v for k, v in body.items() if k not in READ_ONLY_KEYS}
    if isinstance(raw.get("challengers"), list):
        raw["challengers"] = [
            {k: v for k, v in c.items() if k != "experiment"} if isinstance(c, Mapping) else c
            for c in raw["challengers"]
        ]
    return raw


def _experiment_key(config: RouteConfig, model: str) -> tuple[Any, ...]:
    """What an experiment is defined by: a change of any of these starts a new one."""
    challenger = config.challenger(model)
    assert challenger is not None
    return (config.champion, config.policy, challenger.version, challenger.mode,
            challenger.sample_rate)


def next_experiments(
    base: RouteState | None, config: RouteConfig, version: int, now: float
) -> tuple[dict[str, Experiment], dict[str, Experiment]]:
    """Every challenger's experiment after a change, and the ones the change starts.

    A challenger keeps its experiment only when it was on the route before with the same
    champion, policy, version, mode and sample rate; anything else starts a new one (an added
    challenger, a PATCHed mode or rate, a policy change, a promotion or rollback).
    """
    old = base.config if base is not None else None
    current: dict[str, Experiment] = {}
    started: dict[str, Experiment] = {}
    for challenger in config.challengers:
        kept = base.experiments.get(challenger.model) if base is not None else None
        if kept is None or old is None or old.challenger(challenger.model) is None \
                or _experiment_key(old, challenger.model) \
                != _experiment_key(config, challenger.model):
            kept = started[challenger.model] = Experiment.new(version, now)
        current[challenger.model] = kept
    return current, started


def delete_route(base: RouteState | None, name: str) -> Built:
    require(base, name)
    return None, ()


def add_challenger(base: RouteState | None, name: str, challenger: ChallengerConfig) -> Built:
    config = require(base, name)
    assert base is not None
    if challenger.model == config.champion.model:
        raise Conflict(f"model '{challenger.model}' is the champion of route '{name}'")
    if config.challenger(challenger.model) is not None:
        raise Conflict(
            f"challenger '{challenger.model}' is already registered on route '{name}' "
            "(change its settings with PATCH /admin/routes/{route}/challengers/{model})"
        )
    new = replace(config, challengers=(*config.challengers, challenger))
    return _reparse(new), base.history


def update_challenger(
    base: RouteState | None, name: str, model: str, raw: Mapping[str, Any]
) -> Built:
    config = require(base, name)
    assert base is not None
    current = config.challenger(model)
    if current is None:
        raise NotFound(f"route '{name}' has no challenger '{model}'")
    merged = {**asdict(current), **raw}
    updated: ChallengerConfig = parse_or_400(lambda: parse_challenger(merged, "challenger"))
    challengers = tuple(updated if c.model == model else c for c in config.challengers)
    return _reparse(replace(config, challengers=challengers)), base.history


def remove_challenger(base: RouteState | None, name: str, model: str) -> Built:
    config = require(base, name)
    assert base is not None
    if config.challenger(model) is None:
        raise NotFound(f"route '{name}' has no challenger '{model}'")
    if config.fallback == model:
        raise Conflict(
            f"challenger '{model}' is the fallback of route '{name}'; change the "
            "route's fallback (PUT /admin/routes/{route}) before removing it"
        )
    challengers = tuple(c for c in config.challengers if c.model != model)
    return replace(config, challengers=challengers), base.history


def set_policy(base: RouteState | None, name: str, policy: PolicyConfig) -> Built:
    config = require(base, name)
    assert base is not None
    return replace(config, policy=policy), base.history


def promote(base: RouteState | None, name: str, model: str, experiment: str | None) -> Built:
    """The challenger becomes champion; the old champion stays on as a challenger (see
    `Registry.promote`). `experiment`: refused with 409 unless it is the challenger's current
    experiment."""
    config = require(base, name)
    assert base is not None
    if model == config.champion.model:
        raise Conflict(f"'{model}' is already the champion of route '{name}'")
    promoted = config.challenger(model)
    if promoted is None:
        raise NotFound(
            f"route '{name}' has no challenger '{model}'; add it as a challenger first"
        )
    current = base.experiments.get(model)
    if experiment is not None and (current is None or current.id != experiment):
        raise Conflict(
            f"challenger '{model}' of route '{name}' is in experiment "
            f"'{current.id if current else None}', not '{experiment}': the evidence is "
            "from an earlier experiment (its mode, sample rate, the policy or the "
            "champion changed since); evaluate the current experiment first"
        )
    old = config.champion
    mode = promoted.mode if config.policy.type != "champion" else "shadow"
    demoted = replace(promoted, model=old.model, version=old.version, mode=mode,
                      sample_rate=1.0)
    challengers = tuple(demoted if c.model == model else c for c in config.challengers)
    fallback = old.model if config.fallback == model else config.fallback
    new = replace(config, champion=promoted.ref, challengers=challengers,
                  fallback=fallback)
    history = (*base.history, Promotion(old, promoted))[-MAX_HISTORY:]
    return _reparse(new), history


def rollback(base: RouteState | None, name: str) -> Built:
    """Undo the last promotion (see `Registry.rollback`)."""
    config = require(base, name)
    assert base is not None
    if not base.history:
        raise Conflict(f"route '{name}' has no promotion to roll back")
    last = base.history[-1]
    current = config.champion
    if last.previous.model == current.model:
        raise Conflict(f"'{current.model}' is already the champion of route '{name}'")
    back = (
        replace(last.promoted, version=current.version)
        if last.promoted.model == current.model
        else ChallengerConfig(model=current.model, version=current.version)
    )
    challengers = list(config.challengers)
    position = next(
        (i for i, c in enumerate(challengers) if c.model == last.previous.model),
        len(challengers),
    )
    challengers = [c for c in challengers if c.model != last.previous.model]
    challengers.insert(min(position, len(challengers)), back)
    fallback = current.model if config.fallback == last.previous.model \
        else config.fallback
    new = replace(config, champion=last.previous, challengers=tuple(challengers),
                  fallback=fallback)
    return _reparse(new), base.history[:-1]
