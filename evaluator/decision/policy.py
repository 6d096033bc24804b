"""What counts as evidence for a promotion: the primary metrics and the decision policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from evaluator.gates.guardrails import GuardrailLimits
from evaluator.stats.common import JsonFields
from evaluator.stats.metrics import LossName

PrimaryMetric = Literal["auroc", "log_loss", "brier", "accuracy", "rmse", "mae"]
Verdict = Literal["PROMOTE", "KEEP", "BLOCKED", "INCONCLUSIVE"]
Correction = Literal["holm", "bonferroni", "fdr_bh", "none"]


@dataclass(frozen=True)
class MetricSpec:
    """A primary metric: its task, direction, paired test, display label and per-request loss."""

    task: str
    higher_is_better: bool
    test: str
    label: str
    loss: LossName | None  # per-request loss behind the paired tests


METRICS: dict[str, MetricSpec] = {
    "auroc": MetricSpec("classification", True, "delong", "AUROC", "log_loss"),
    "accuracy": MetricSpec("classification", True, "mcnemar", "accuracy", "zero_one"),
    "log_loss": MetricSpec("classification", False, "paired_t", "log loss", "log_loss"),
    "brier": MetricSpec("classification", False, "paired_t", "Brier score", "brier"),
    "rmse": MetricSpec("regression", False, "delta_method_z", "RMSE", "squared_error"),
    "mae": MetricSpec("regression", False, "paired_t", "MAE", "absolute_error"),
}

# Keys the evaluator config (evaluator/config.py, `decision:`) may use for the same fields.
_ALIASES = {
    "sequential": "use_sequential",
    "non_inferiority_margin": "margin",
    "min_labelled": "min_samples",
    "min_detectable_effect": "min_effect",
    "mde": "min_effect",
}


@dataclass(frozen=True)
class DecisionPolicy(JsonFields):
    """What counts as evidence for a promotion. Units of ``margin``/``min_effect``: the metric's."""

    primary_metric: PrimaryMetric = "auroc"
    alpha: float = 0.05
    margin: float = 0.0  # non-inferiority margin (0: none allowed)
    min_samples: int = 1000  # paired labelled requests before any verdict on quality
    min_per_class: int = 30  # classifiers: minimum of each label as well
    min_effect: float = 0.01  # minimum detectable effect for the power analysis (and tau)
    power: float = 0.8
    correction: Correction = "holm"
    use_sequential: bool = True  # require the always-valid test to agree (reports read daily)
    sequential_tau: float | None = None  # mixture scale; None: min_effect
    sequential_looks: Literal["daily"] | int = "daily"
    sequential_max_looks: int = 30
    sequential_burn_in: int = 100
    max_latency_p99_ratio: float | None = 1.5
    max_latency_p99_ms: float | None = None
    max_error_rate_delta: float | None = 0.01
    max_error_rate: float | None = None
    guardrail_min_requests: int = 100
    max_latency_p99_margin_ms: float = 2.0  # a latency guardrail fails only beyond this too
    health_alpha: float = 0.001  # level of the data-health gate's tests
    max_report_age: str | float = "26h"  # `evaluator promote` refuses older reports (evx)

    def __post_init__(self) -> None:
        if self.primary_metric not in METRICS:
            raise ValueError(
                f"primary_metric must be one of {', '.join(METRICS)}, got {self.primary_metric!r}"
            )
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be in (0, 1)")
        if not 0 < self.power < 1:
            raise ValueError("power must be in (0, 1)")
        if self.margin < 0:
            raise ValueError("margin must be >= 0")
        if self.min_effect < 0:
            raise ValueError("min_effect must be >= 0")
        if self.min_samples < 1 or self.min_per_class < 1:
            raise ValueError("min_samples and min_per_class must be >= 1")
        if self.correction not in ("holm", "bonferroni", "fdr_bh", "none"):
            raise ValueError(f"unknown correction {self.correction!r}")
        if self.sequential_tau is not None and self.sequential_tau <= 0:
            raise ValueError("sequential_tau must be > 0")
        if not 0 < self.health_alpha < 1:
            raise ValueError("health_alpha must be in (0, 1)")
        if self.max_latency_p99_margin_ms < 0:
            raise ValueError("max_latency_p99_margin_ms must be >= 0")

    @property
    def tau(self) -> float:
        """Mixture scale of the mSPRT: the configured one, else the minimum effect, else 0.01."""
        if self.sequential_tau is not None:
            return self.sequential_tau
        return self.min_effect if self.min_effect > 0 else 0.01

    @property
    def guardrail_limits(self) -> GuardrailLimits:
        return GuardrailLimits(
            max_latency_p99_ratio=self.max_latency_p99_ratio,
            max_latency_p99_ms=self.max_latency_p99_ms,
            max_latency_p99_margin_ms=self.max_latency_p99_margin_ms,
            max_error_rate_delta=self.max_error_rate_delta,
            max_error_rate=self.max_error_rate,
            min_requests=self.guardrail_min_requests,
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> DecisionPolicy:
        """Build from the config's ``decision:`` mapping (its key names, e.g. ``sequential``, are
        accepted). Unknown keys raise: a typo must not silently fall back to a default."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in (values or {}).items():
            name = _ALIASES.get(str(key), str(key))
            if name not in known:
                raise ValueError(f"unknown decision policy key {key!r}")
            kwargs[name] = value
        return cls(**kwargs)

