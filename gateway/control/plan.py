"""A guarded progressive rollout as the registry stores it: part of the route's config.

Keeping the plan *in* the route (`RouteConfig.rollout`) rather than beside it gives it, for free,
what the rollout needs from the control plane: it persists with the route in both registry
stores (file and Kafka), every replica applies it with the route, each step is one audited
compare-and-set change on the route's version, and any other change that would break it (a
policy PUT, a PATCH of the target's mode, a hand promotion) is refused by `rollout_problem`.

While a rollout runs, the route's policy is `{"type": "rollout", "target", "fraction"}` and the
target is an explore arm; the policy that was there before is kept in `restore_policy` and put
back when the rollout ends (completed, rolled back or aborted). A finished plan stays on the
route, with its outcome, until the next rollout replaces it.

This module imports nothing from `gateway.config` at run time (config imports it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import RouteConfig

STATUSES: tuple[str, ...] = ("running", "completed", "rolled_back", "aborted")
DEFAULT_STEPS: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
DEFAULT_MIN_REQUESTS = 200
DEFAULT_MIN_SECONDS = 60.0
DEFAULT_ALPHA = 0.01


@dataclass(frozen=True)
class RolloutPlan:
    """One rollout: where it is, what it needs per step, and how to undo it.

    `steps` are percents of traffic served by `target`; a step below 100 is guarded (it must
    collect `min_requests` requests served by the target and last `min_seconds` with no guard
    breached), and passing the last one promotes `target` (a final 100 is implied).
    `alpha` is each guard's type I error per step (docs/ADMIN.md, "Guarded rollout").
    """

    id: str
    target: str
    steps: tuple[float, ...] = DEFAULT_STEPS
    step: int = 0
    status: str = "running"
    min_requests: int = DEFAULT_MIN_REQUESTS
    min_seconds: float = DEFAULT_MIN_SECONDS
    alpha: float = DEFAULT_ALPHA
    started_at: float = 0.0
    step_started_at: float = 0.0
    ended_at: float | None = None
    reason: str | None = None
    started_by: Mapping[str, Any] = field(default_factory=dict)
    restore_policy: Mapping[str, Any] = field(default_factory=dict)
    restore_mode: str = "shadow"
    restore_sample_rate: float = 1.0
    evidence: Mapping[str, Any] = field(default_factory=dict)  # the last step's, when it ended

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def guarded_steps(self) -> tuple[float, ...]:
        return tuple(s for s in self.steps if s < 100.0)

    @property
    def fraction(self) -> float:
        """The target's share of traffic in the current step."""
        return self.guarded_steps[self.step] / 100.0

    @property
    def last_step(self) -> bool:
        return self.step == len(self.guarded_steps) - 1


def parse_steps(raw: Any, where: str) -> tuple[float, ...]:
    """Percents, strictly increasing, in (0, 100], with at least one below 100."""
    if isinstance(raw, str):
        raw = [s for s in raw.split(",") if s.strip()]
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigError(f"{where}: a list of percents such as [5, 25, 50, 100]")
    try:
        steps = tuple(float(s) for s in raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: percents must be numbers, got {raw!r}") from None
    if not all(math.isfinite(s) and 0.0 < s <= 100.0 for s in steps):
        raise ConfigError(f"{where}: every step must be in (0, 100]")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ConfigError(f"{where}: steps must increase")
    if steps[0] >= 100.0:
        raise ConfigError(f"{where}: at least one step below 100 (the guarded part)")
    return steps


def check_limits(min_requests: Any, min_seconds: Any, alpha: Any, where: str) -> None:
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
        raise ConfigError(f"{where}.min_requests: an integer >= 1")
    if not isinstance(min_seconds, int | float) or not 0.0 <= float(min_seconds) < 1e7:
        raise ConfigError(f"{where}.min_seconds: a number of seconds >= 0")
    if not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 0.5:
        raise ConfigError(f"{where}.alpha: in (0, 0.5)")


def parse_plan(raw: Any, where: str) -> RolloutPlan | None:
    """A stored plan (the shape `dataclasses.asdict` gives); None stays None."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    try:
        plan = RolloutPlan(
            id=str(raw["id"]),
            target=str(raw["target"]),
            steps=parse_steps(raw.get("steps", DEFAULT_STEPS), f"{where}.steps"),
            step=int(raw.get("step", 0)),
            status=str(raw.get("status", "running")),
            min_requests=raw.get("min_requests", DEFAULT_MIN_REQUESTS),
            min_seconds=float(raw.get("min_seconds", DEFAULT_MIN_SECONDS)),
            alpha=float(raw.get("alpha", DEFAULT_ALPHA)),
            started_at=float(raw.get("started_at", 0.0)),
            step_started_at=float(raw.get("step_started_at", 0.0)),
            ended_at=None if raw.get("ended_at") is None else float(raw["ended_at"]),
            reason=None if raw.get("reason") is None else str(raw["reason"]),
            started_by=dict(raw.get("started_by") or {}),
            restore_policy=dict(raw.get("restore_policy") or {}),
            restore_mode=str(raw.get("restore_mode", "shadow")),
            restore_sample_rate=float(raw.get("restore_sample_rate", 1.0)),
            evidence=dict(raw.get("evidence") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid rollout ({exc!r})") from None
    check_limits(plan.min_requests, plan.min_seconds, plan.alpha, where)
    if plan.status not in STATUSES:
        raise ConfigError(f"{where}.status: one of {STATUSES}")
    if not 0 <= plan.step < len(plan.guarded_steps):
        raise ConfigError(f"{where}.step: {plan.step} is not one of the guarded steps")
    return plan


def rollout_problem(route: RouteConfig) -> str | None:
    """Why the route's policy and its rollout plan disagree, else None.

    This is what refuses ordinary admin changes that would pull the rug from under a running
    rollout: abort it first (`DELETE /admin/routes/{route}/rollout`).
    """
    plan, policy = route.rollout, route.policy
    running = plan is not None and plan.running
    if policy.type == "rollout" and not running:
        return "policy type 'rollout' is set by a running rollout only (POST .../rollout)"
    if plan is None or not running:
        return None
    if policy.type != "rollout" or policy.target != plan.target \
            or not math.isclose(policy.fraction, plan.fraction):
        return (f"a rollout of '{plan.target}' is running and owns the route's policy; abort it "
                "first (python -m gateway rollout abort ROUTE)")
    target = route.challenger(plan.target)
    if target is None or target.mode != "explore":
        return (f"a rollout of '{plan.target}' is running: it must stay a challenger in mode "
                "'explore'; abort the rollout first")
    return None
