"""The verdict on one challenger and everything that produced it, as typed results and JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from evaluator.dataset import ExperimentInfo
from evaluator.decision.policy import DecisionPolicy, Verdict
from evaluator.gates.guardrails import GuardrailResult
from evaluator.stats.common import JsonFields
from evaluator.stats.sequential import SequentialResult
from evaluator.stats.significance import NonInferiorityResult, PowerResult, jsonable


@dataclass(frozen=True)
class PrimaryResult(JsonFields):
    """The primary comparison, normalised across tests. ``difference`` = challenger - champion;
    ``improvement`` has the sign flipped for losses so that positive always means better."""

    metric: str
    test: str
    higher_is_better: bool
    n: int
    champion: float | None = None
    challenger: float | None = None
    difference: float | None = None
    improvement: float | None = None
    se: float | None = None
    statistic: float | None = None
    df: float | None = None
    p_value: float | None = None
    ci_low: float | None = None  # CI of the difference, level 1 - alpha (unadjusted)
    ci_high: float | None = None
    sd_per_request: float | None = None  # what the power analysis scales
    reason: str | None = None


class DataHealth(Protocol):
    """What the decision needs from ``evaluator.gates.health.check_data_health``'s result."""

    @property
    def status(self) -> str: ...  # "pass" | "fail" | "insufficient" (read-only: a Literal fits)
    @property
    def reasons(self) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


HealthCheck = Callable[..., DataHealth]


def _experiment_dict(info: ExperimentInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "id": info.id,
        "started": jsonable(info.started),
        "data_end": jsonable(info.data_end),
        "champion": info.champion,
        "registry_version": info.registry_version,
    }


@dataclass
class ChallengerDecision:
    """The verdict on one challenger and everything that produced it.

    ``to_dict()`` (strict JSON: NaN/inf become null) has the keys: ``route``, ``champion``,
    ``challenger``, ``decision`` ("PROMOTE" | "KEEP" | "BLOCKED" | "INCONCLUSIVE"),
    ``reasons`` (headline first, then one line per check with its numbers),
    ``primary_metric``, ``n_labelled``, ``n_positive``, ``n_negative``, ``excluded`` (counts by
    cause), ``checks`` (the booleans the rules used), ``primary`` (metric, test, champion,
    challenger, difference, improvement, se, statistic, df, p_value, p_adjusted, correction,
    ci_low, ci_high, ...), ``non_inferiority``, ``sequential`` (p_value, p_adjusted,
    used_for_decision, ``alpha`` = the CS's level after the correction, ``family_alpha``,
    ``cs_state``, the confidence sequence and the per-look ``path`` for the
    cumulative-statistic plot), ``power`` (required_n, achieved_power, ...), ``guardrails``
    (status, checks, latency and outcome summaries per model), ``data_health`` (the gate's
    ``to_dict()``, null when not run), ``experiment`` (id, started, data_end, champion,
    registry_version of the experiment judged; null when the dataset has none), ``secondary``
    (the other paired tests, keyed by name) and ``policy``.
    """

    route: str
    champion: str
    challenger: str
    decision: Verdict
    reasons: list[str]
    policy: DecisionPolicy
    n_labelled: int
    n_positive: int | None
    n_negative: int | None
    excluded: dict[str, int]
    checks: dict[str, Any]
    primary: PrimaryResult
    p_adjusted: float | None
    non_inferiority: NonInferiorityResult | None
    sequential: SequentialResult | None
    sequential_p_adjusted: float | None
    power: PowerResult | None
    guardrails: GuardrailResult
    secondary: dict[str, Any] = field(default_factory=dict)
    data_health: DataHealth | None = None
    experiment: ExperimentInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        primary = self.primary.to_dict()
        primary["p_adjusted"] = jsonable(self.p_adjusted)
        primary["correction"] = self.policy.correction
        sequential = None
        if self.sequential is not None:
            sequential = self.sequential.to_dict()
            sequential["p_adjusted"] = jsonable(self.sequential_p_adjusted)
            sequential["used_for_decision"] = self.policy.use_sequential
            sequential["family_alpha"] = self.policy.alpha
            sequential["cs_state"] = self.checks.get("cs_state")
        return {
            "route": self.route,
            "champion": self.champion,
            "challenger": self.challenger,
            "decision": self.decision,
            "reasons": list(self.reasons),
            "primary_metric": self.policy.primary_metric,
            "n_labelled": self.n_labelled,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "excluded": jsonable(self.excluded),
            "checks": jsonable(self.checks),
            "primary": primary,
            "non_inferiority": jsonable(self.non_inferiority),
            "sequential": sequential,
            "power": None if self.power is None else self.power.to_dict(),
            "guardrails": self.guardrails.to_dict(),
            "data_health": None if self.data_health is None else self.data_health.to_dict(),
            "experiment": _experiment_dict(self.experiment),
            "secondary": jsonable(self.secondary),
            "policy": self.policy.to_dict(),
        }



def decisions_to_dict(decisions: list[ChallengerDecision]) -> list[dict[str, Any]]:
    """JSON-ready list for the report."""
    return [d.to_dict() for d in decisions]
