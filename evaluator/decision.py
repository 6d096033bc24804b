"""PROMOTE / KEEP / BLOCKED / INCONCLUSIVE for each challenger, with every reason and number.

The data: each challenger is judged on the rows of its **current experiment** only
(``dataset.experiments[c].id`` against the challenger's per-row ``experiment``; no entry: every
row) — a config change starts a new experiment, and rows from before it describe another
comparison. Paired rows exclude requests where the challenger errored, timed out, was shed or
skipped (the guardrails account for those); every exclusion is counted in ``excluded``.

The rules (``decide``), in order of precedence, for reports read every day:

1. **BLOCKED** when a guardrail failed — judged with its own uncertainty by
   ``check_guardrails`` (a one-sided bound past the limit and an absolute margin exceeded);
   "insufficient" guardrails never block, they only withhold a PROMOTE.
2. **INCONCLUSIVE "data health: ..."** when the data-health gate (``evaluator.gates.health``: sample
   ratio, coverage vs sample_rate, non-random shedding) fails: a biased sample cannot decide.
3. **INCONCLUSIVE** when the primary metric is undefined or there are fewer than
   ``min_samples`` paired labelled requests (classifiers: also ``min_per_class`` of each label).
4. **INCONCLUSIVE "effect not stable"** when the always-valid confidence sequence (CS) of the
   improvement is empty (no single effect fits every look: e.g. worse for two days, better
   after) or lies on the other side of zero from the current estimate.
5. **KEEP (worse)** when the CS's upper bound is below zero.
6. **PROMOTE** when the CS's lower bound is above zero (superiority; ``margin`` never lowers
   this bar) and every guardrail passes; above zero with guardrails lacking data is
   INCONCLUSIVE.
7. **KEEP (not better)** when the CS's upper bound is below ``min_effect``: the challenger is
   shown not to be better by the smallest improvement worth a swap (futility).
8. Otherwise **INCONCLUSIVE**, with non-inferiority (the CS's lower bound against ``-margin``)
   and the fixed-horizon sample size as information.

Why the CS and not the two-sided always-valid p-value: the p-value is a running minimum over
looks with no direction, so "p <= alpha" after a challenger was worse for two days and better
afterwards "confirmed" a promotion on evidence of the opposite sign. The CS carries the
direction, and its running intersection turns such a history into an empty set. Every rule that
decides (4-7) reads the CS, which is valid however often it is read; the fixed-horizon test,
non-inferiority at fixed horizon and the power analysis are reported for information only
(re-reading a fixed-horizon test daily inflates false decisions; docs/STATISTICS.md measures
it). With ``use_sequential: false`` (one pre-planned look) rules 5-7 use the fixed-horizon test
instead: significant in either direction, or KEEP when the power analysis' n is reached and
non-inferiority is not shown.

Multiplicity: challengers form one family. Each one's CS is computed at a level from Holm's
step-down on the always-valid p-values (``correction``: ``holm`` — the j-th smallest p is held
to alpha / (k - j + 1) while all before it were rejected, the rest get alpha / k; ``bonferroni``
— alpha / k for all; ``fdr_bh`` — r * alpha / k for the r Benjamini-Hochberg rejects; ``none``
— alpha). A CS excludes zero exactly when its always-valid p-value
is below the CS's level, so the CS rules reproduce Holm's rejections and add the direction.

Primary metrics and their tests (all paired on the requests both models answered):
``auroc`` — DeLong; ``accuracy`` — McNemar (difference CI and margin via the paired Wald SE);
``log_loss``, ``brier``, ``mae`` — paired t-test on per-request losses; ``rmse`` — delta-method
z-test. ``margin`` and ``min_effect`` are in the primary metric's own units (AUROC points, nats,
Brier units, accuracy share, or the target's units for RMSE/MAE). Every number in the reasons is
an **improvement** (positive = the challenger is better), whatever the metric's direction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from evaluator.dataset import EvalDataset, ExperimentInfo
from evaluator.gates.guardrails import GuardrailLimits, GuardrailResult, check_guardrails
from evaluator.gates.health import check_data_health
from evaluator.stats.metrics import LossName, per_request_loss, probability_violations
from evaluator.stats.sequential import (
    CsState,
    SequentialResult,
    confidence_sequence,
    cs_state,
    msprt_delong,
    msprt_paired,
    msprt_rmse,
)
from evaluator.stats.significance import (
    NonInferiorityResult,
    PowerResult,
    adjust_pvalues,
    corrected_levels,
    delong_test,
    jsonable,
    mcnemar_test,
    non_inferiority_test,
    paired_t_test,
    power_normal,
    rmse_difference_test,
    sample_size_normal,
    sample_size_paired_t,
    wilcoxon_signed_rank,
)

PrimaryMetric = Literal["auroc", "log_loss", "brier", "accuracy", "rmse", "mae"]
Verdict = Literal["PROMOTE", "KEEP", "BLOCKED", "INCONCLUSIVE"]
Correction = Literal["holm", "bonferroni", "fdr_bh", "none"]


@dataclass(frozen=True)
class _MetricSpec:
    task: str
    higher_is_better: bool
    test: str
    label: str
    loss: LossName | None  # per-request loss behind the paired tests


METRICS: dict[str, _MetricSpec] = {
    "auroc": _MetricSpec("classification", True, "delong", "AUROC", "log_loss"),
    "accuracy": _MetricSpec("classification", True, "mcnemar", "accuracy", "zero_one"),
    "log_loss": _MetricSpec("classification", False, "paired_t", "log loss", "log_loss"),
    "brier": _MetricSpec("classification", False, "paired_t", "Brier score", "brier"),
    "rmse": _MetricSpec("regression", False, "delta_method_z", "RMSE", "squared_error"),
    "mae": _MetricSpec("regression", False, "paired_t", "MAE", "absolute_error"),
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
class DecisionPolicy:
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

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class PrimaryResult:
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

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


class DataHealth(Protocol):
    """What the decision needs from ``evaluator.gates.health.check_data_health``'s result."""

    status: str  # "pass" | "fail" | "insufficient"
    reasons: list[str]

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


# ----------------------------------------------------------------------------------------------
# Analysis of one challenger (everything but the cross-challenger correction)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Pair:
    y: np.ndarray
    champion: np.ndarray
    challenger: np.ndarray
    ts: np.ndarray  # the sequential test's order: label receipt time (inference time if unknown)
    excluded: dict[str, int]
    order: str = "label-arrival"  # or "inference-time" when no label receipt time is known

    @property
    def n(self) -> int:
        return int(self.y.size)


def _experiment_rows(dataset: EvalDataset, challenger: str) -> np.ndarray | None:
    """Mask of the challenger's current-experiment rows; None when the dataset has no
    experiment for it (every row counts, as before experiments existed)."""
    info = dataset.experiments.get(challenger)
    ids = dataset.models[challenger].experiment
    if info is None or ids is None:
        return None
    return np.asarray(ids == info.id, dtype=bool)


def _order_ts(dataset: EvalDataset) -> np.ndarray:
    """When each row became visible to a report: its label's receipt time, else (records from
    before label_ts was logged) its inference time. See evaluator/stats/sequential.py for why."""
    ts = np.asarray(dataset.ts, dtype=np.float64)
    if dataset.label_ts is None:
        return ts
    label_ts = np.asarray(dataset.label_ts, dtype=np.float64)
    return np.where(np.isfinite(label_ts), label_ts, ts)


def _paired_rows(dataset: EvalDataset, challenger: str, other_experiment: int = 0) -> _Pair:
    """Requests with a valid label on which both models answered with a finite score, in the
    order their labels arrived."""
    champ = dataset.models[dataset.champion]
    chall = dataset.models[challenger]
    y = np.asarray(dataset.labels, dtype=np.float64)
    classification = dataset.task == "classification"
    label_ok = ((y == 0) | (y == 1)) if classification else np.isfinite(y)
    c_ok = champ.ok & np.isfinite(champ.scores)
    h_ok = chall.ok & np.isfinite(chall.scores)
    keep = label_ok & c_ok & h_ok
    excluded = {
        "other_experiment": other_experiment,
        "invalid_label": int(np.count_nonzero(~label_ok)),
        "champion_no_score": int(np.count_nonzero(label_ok & ~c_ok)),
        "challenger_no_score": int(np.count_nonzero(label_ok & c_ok & ~h_ok)),
        "challenger_not_ok": int(np.count_nonzero(label_ok & c_ok & ~chall.ok)),
    }
    ts = _order_ts(dataset)[keep]
    order = np.argsort(np.where(np.isfinite(ts), ts, np.inf), kind="stable")
    labelled = dataset.label_ts is not None and bool(np.isfinite(dataset.label_ts[keep]).any())
    return _Pair(
        y[keep][order],
        champ.scores[keep][order],
        chall.scores[keep][order],
        ts[order],
        excluded,
        "label-arrival" if labelled else "inference-time",
    )


def _primary(
    metric: str,
    pair: _Pair,
    threshold: float,
    alpha: float,
    orders: tuple[np.ndarray, np.ndarray] | None = None,
) -> PrimaryResult:
    spec = METRICS[metric]
    n = pair.n
    base = PrimaryResult(metric, spec.test, spec.higher_is_better, n)
    if n == 0:
        return dataclasses.replace(base, reason="no paired labelled requests")
    sign = 1.0 if spec.higher_is_better else -1.0
    if metric in ("log_loss", "brier"):
        bad = probability_violations(pair.champion) + probability_violations(pair.challenger)
        if bad:
            return dataclasses.replace(
                base, reason=f"{bad} scores outside [0, 1]: {spec.label} needs probabilities"
            )
    if metric == "auroc":
        r = delong_test(pair.y, pair.champion, pair.challenger, alpha, orders)
        if r.reason is not None or r.difference is None or r.se is None:
            return dataclasses.replace(base, reason=r.reason)
        return dataclasses.replace(
            base,
            champion=r.auc_champion,
            challenger=r.auc_challenger,
            difference=r.difference,
            improvement=r.difference,
            se=r.se,
            statistic=r.z,
            p_value=r.p_value,
            ci_low=r.ci_low,
            ci_high=r.ci_high,
            sd_per_request=r.se * math.sqrt(n),
        )
    if metric == "accuracy":
        correct_c = (pair.champion >= threshold) == (pair.y == 1)
        correct_h = (pair.challenger >= threshold) == (pair.y == 1)
        m = mcnemar_test(correct_c, correct_h, alpha)
        if m.difference is None or m.se is None:
            return dataclasses.replace(base, reason=m.reason)
        return dataclasses.replace(
            base,
            champion=m.accuracy_champion,
            challenger=m.accuracy_challenger,
            difference=m.difference,
            improvement=m.difference,
            se=m.se,
            statistic=m.statistic,
            p_value=m.p_value,
            ci_low=m.ci_low,
            ci_high=m.ci_high,
            sd_per_request=m.se * math.sqrt(n),
        )
    if metric == "rmse":
        d = rmse_difference_test(pair.champion - pair.y, pair.challenger - pair.y, alpha)
        if d.reason is not None or d.difference is None or d.se is None:
            return dataclasses.replace(base, reason=d.reason)
        return dataclasses.replace(
            base,
            champion=d.rmse_champion,
            challenger=d.rmse_challenger,
            difference=d.difference,
            improvement=-d.difference,
            se=d.se,
            statistic=d.z,
            p_value=d.p_value,
            ci_low=d.ci_low,
            ci_high=d.ci_high,
            sd_per_request=d.se * math.sqrt(n),
        )
    loss = spec.loss
    assert loss is not None
    lc = per_request_loss(loss, pair.y, pair.champion, threshold)
    lh = per_request_loss(loss, pair.y, pair.challenger, threshold)
    t = paired_t_test(lc, lh, alpha)
    if t.reason is not None or t.difference is None or t.se is None:
        return dataclasses.replace(base, reason=t.reason)
    return dataclasses.replace(
        base,
        champion=t.mean_champion,
        challenger=t.mean_challenger,
        difference=t.difference,
        improvement=sign * t.difference,
        se=t.se,
        statistic=t.statistic,
        df=t.df,
        p_value=t.p_value,
        ci_low=t.ci_low,
        ci_high=t.ci_high,
        sd_per_request=t.se * math.sqrt(n),
    )


def _secondary(
    metric: str,
    pair: _Pair,
    task: str,
    threshold: float,
    alpha: float,
    orders: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The other paired tests, reported for context; only the primary decides."""
    out: dict[str, Any] = {}
    if pair.n == 0:
        return out
    if task == "classification":
        if metric != "auroc":
            out["delong"] = delong_test(pair.y, pair.champion, pair.challenger, alpha, orders)
        correct_c = (pair.champion >= threshold) == (pair.y == 1)
        correct_h = (pair.challenger >= threshold) == (pair.y == 1)
        if metric != "accuracy":
            out["mcnemar"] = mcnemar_test(correct_c, correct_h, alpha)
        loss: LossName = "brier" if metric == "brier" else "log_loss"
        if probability_violations(pair.champion) + probability_violations(pair.challenger):
            out[f"paired_t_{loss}"] = {"reason": "scores outside [0, 1]: not probabilities"}
            return out
    else:
        if metric != "rmse":
            out["rmse_delta"] = rmse_difference_test(
                pair.champion - pair.y, pair.challenger - pair.y, alpha
            )
        loss = "absolute_error" if metric == "mae" else "squared_error"
    lc = per_request_loss(loss, pair.y, pair.champion, threshold)
    lh = per_request_loss(loss, pair.y, pair.challenger, threshold)
    if METRICS[metric].test != "paired_t":
        out[f"paired_t_{loss}"] = paired_t_test(lc, lh, alpha)
    out[f"wilcoxon_{loss}"] = wilcoxon_signed_rank(lc, lh, alpha)
    return out


def _sequential(
    metric: str,
    pair: _Pair,
    policy: DecisionPolicy,
    threshold: float,
    orders: tuple[np.ndarray, np.ndarray] | None = None,
) -> SequentialResult:
    common: dict[str, Any] = {
        "tau": policy.tau,
        "alpha": policy.alpha,
        "looks": policy.sequential_looks,
        "max_looks": policy.sequential_max_looks,
        "burn_in": policy.sequential_burn_in,
    }
    if metric == "auroc":
        return msprt_delong(
            pair.y,
            pair.champion,
            pair.challenger,
            pair.ts,
            min_per_class=policy.min_per_class,
            orders=orders,
            **common,
        )
    if metric == "rmse":
        return msprt_rmse(pair.champion - pair.y, pair.challenger - pair.y, pair.ts, **common)
    loss = METRICS[metric].loss
    assert loss is not None
    lc = per_request_loss(loss, pair.y, pair.champion, threshold)
    lh = per_request_loss(loss, pair.y, pair.challenger, threshold)
    return msprt_paired(lc - lh, pair.ts, **common)  # improvement: champion loss - challenger's


def _power(primary: PrimaryResult, policy: DecisionPolicy, n_tests: int) -> PowerResult:
    alpha = policy.alpha
    if policy.correction != "none" and n_tests > 1:
        alpha = policy.alpha / n_tests
    method = "paired t (noncentral t)" if primary.test == "paired_t" else "normal (pilot SE)"
    base = PowerResult(method, policy.min_effect, alpha, policy.power, primary.n, None, None, None)
    if policy.min_effect <= 0:
        return dataclasses.replace(base, reason="no minimum detectable effect configured")
    sd = primary.sd_per_request
    if sd is None or primary.se is None or not math.isfinite(sd):
        return dataclasses.replace(base, reason=primary.reason or "no pilot variance estimate")
    if primary.test == "paired_t":
        required = sample_size_paired_t(sd, policy.min_effect, alpha, policy.power)
    else:
        required = sample_size_normal(primary.se, primary.n, policy.min_effect, alpha, policy.power)
    achieved = power_normal(primary.se, policy.min_effect, alpha)
    return dataclasses.replace(
        base, required_n=required, achieved_power=achieved, sd_per_request=sd
    )


@dataclass
class _Analysis:
    challenger: str
    pair: _Pair
    n_pos: int | None
    n_neg: int | None
    primary: PrimaryResult
    secondary: dict[str, Any]
    non_inferiority: NonInferiorityResult | None
    sequential: SequentialResult | None
    power: PowerResult
    guardrails: GuardrailResult
    health: DataHealth | None
    experiment: ExperimentInfo | None


def _analyse(
    dataset: EvalDataset,
    challenger: str,
    policy: DecisionPolicy,
    n_tests: int,
    health_check: HealthCheck | None,
) -> _Analysis:
    metric = policy.primary_metric
    rows = _experiment_rows(dataset, challenger)
    other = 0
    if rows is not None and not rows.all():
        other = int(np.count_nonzero(~rows))
        dataset = dataset.take(rows)  # this experiment only: guardrails and health too
    pair = _paired_rows(dataset, challenger, other)
    classification = dataset.task == "classification"
    # One sort per model, shared by the DeLong test and every look of the sequential path.
    orders = (np.argsort(pair.champion), np.argsort(pair.challenger)) if classification else None
    primary = _primary(metric, pair, dataset.threshold, policy.alpha, orders)
    ni = None
    if primary.improvement is not None:
        ni = non_inferiority_test(
            primary.improvement, primary.se, policy.margin, policy.alpha, primary.df
        )
    sequential = _sequential(metric, pair, policy, dataset.threshold, orders) if pair.n else None
    n_pos = n_neg = None
    if classification:
        n_pos = int(np.count_nonzero(pair.y == 1))
        n_neg = pair.n - n_pos
    health = None
    if health_check is not None:
        health = health_check(dataset, challenger, alpha=policy.health_alpha)
    return _Analysis(
        challenger,
        pair,
        n_pos,
        n_neg,
        primary,
        _secondary(metric, pair, dataset.task, dataset.threshold, policy.alpha, orders),
        ni,
        sequential,
        _power(primary, policy, n_tests),
        check_guardrails(
            dataset.models[dataset.champion],
            dataset.models[challenger],
            policy.guardrail_limits,
            policy.alpha,
        ),
        health,
        dataset.experiments.get(challenger),
    )


# ----------------------------------------------------------------------------------------------
# The verdict
# ----------------------------------------------------------------------------------------------


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _bound(x: float) -> str:
    """A threshold like -margin without "-0" or "> -0" noise."""
    return "0" if x == 0 else format(x, "+g")


def _n(x: int) -> str:
    return format(x, ",")


_CS_WORDS: dict[str, str] = {
    "above": "above 0: better",
    "below": "below 0: worse",
    "contains": "contains 0: undecided",
    "empty": "empty: the improvement changed during the experiment",
    "not_started": "not started",
}


def _verdict(
    a: _Analysis,
    p_adj: float | None,
    seq_p_adj: float | None,
    cs_level: float,
    n_challengers: int,
    policy: DecisionPolicy,
    dataset: EvalDataset,
) -> ChallengerDecision:
    spec = METRICS[policy.primary_metric]
    alpha = policy.alpha
    pr = a.primary
    reasons: list[str] = []

    # -- sample size (and the experiment it comes from)
    enough = a.pair.n >= policy.min_samples
    sample = f"{_n(a.pair.n)} paired labelled requests (minimum {_n(policy.min_samples)})"
    if a.n_pos is not None and a.n_neg is not None:
        enough = enough and min(a.n_pos, a.n_neg) >= policy.min_per_class
        sample += (
            f"; {_n(a.n_pos)} positive / {_n(a.n_neg)} negative "
            f"(minimum {policy.min_per_class} each)"
        )
    excluded = {k: v for k, v in a.pair.excluded.items() if v}
    if excluded:
        sample += "; excluded: " + ", ".join(f"{k} {_n(v)}" for k, v in excluded.items())
    if a.experiment is not None:
        sample += f"; experiment {a.experiment.id} (champion {a.experiment.champion})"
    reasons.append(sample)

    # -- fixed-horizon test (decides only with use_sequential off)
    defined = pr.reason is None and pr.p_value is not None and pr.improvement is not None
    fixed_better = fixed_worse = fixed_rejected = False
    if defined:
        assert pr.improvement is not None
        fixed_rejected = p_adj is not None and p_adj <= alpha
        fixed_better = fixed_rejected and pr.improvement > 0
        fixed_worse = fixed_rejected and pr.improvement < 0
        lo, hi = pr.ci_low, pr.ci_high
        if not spec.higher_is_better:  # CI of the improvement = -(CI of the difference)
            lo, hi = (None if hi is None else -hi), (None if lo is None else -lo)
        direction = "" if spec.higher_is_better else " (lower is better)"
        result = "significant" if fixed_rejected else "not significant"
        reasons.append(
            f"{spec.label}{direction}: challenger {_f(pr.challenger)} vs champion "
            f"{_f(pr.champion)}, improvement {_f(pr.improvement, '+.4f')} "
            f"({1 - alpha:.0%} CI {_f(lo, '+.4f')} to {_f(hi, '+.4f')}); fixed-horizon "
            f"{pr.test} p = {_f(pr.p_value, '.3g')}, {policy.correction}-adjusted "
            f"{_f(p_adj, '.3g')}: {result}"
            + (" (for information: a test re-read daily does not decide)"
               if policy.use_sequential else "")
        )
    else:
        reasons.append(f"{spec.label}: no test — {pr.reason}")

    # -- always-valid confidence sequence (decides with use_sequential on)
    seq = a.sequential
    state: CsState = "not_started"
    cs_lo = cs_hi = math.nan
    if seq is not None:
        low, high = confidence_sequence(seq, cs_level)
        seq = dataclasses.replace(seq, alpha=cs_level, cs_low=low, cs_high=high)
        if low.size:
            cs_lo, cs_hi = float(low[-1]), float(high[-1])
            state = cs_state(cs_lo, cs_hi)
    flipped = defined and (
        (state == "above" and pr.improvement is not None and pr.improvement <= 0)
        or (state == "below" and pr.improvement is not None and pr.improvement >= 0)
    )
    if seq is not None and defined:
        family = (
            f" after {policy.correction} across {n_challengers} challengers"
            if n_challengers > 1 and policy.correction != "none"
            else ""
        )
        text = (
            f"always-valid {100 * (1 - cs_level):.4g}% confidence sequence of the improvement "
            f"(mSPRT, tau {policy.tau:g}, {seq.n.size} look{'' if seq.n.size == 1 else 's'} "
            f"in {a.pair.order} order{family}): "
            f"[{_f(cs_lo, '+.4f')}, {_f(cs_hi, '+.4f')}] — {_CS_WORDS[state]}; always-valid "
            f"p = {_f(seq.p_value, '.3g')} (adjusted {_f(seq_p_adj, '.3g')})"
        )
        if flipped:
            text += f"; but the current estimate is {_f(pr.improvement, '+.4f')}"
        if seq.reason:
            text += f" ({seq.reason})"
        if not policy.use_sequential:
            text += " — informational (use_sequential off)"
        reasons.append(text)

    # -- non-inferiority: the CS's lower bound against -margin (fixed-horizon when off)
    ni = a.non_inferiority
    ni_shown: bool | None = None
    if policy.use_sequential and defined and state != "not_started":
        ni_shown = state != "empty" and cs_lo > -policy.margin
        reasons.append(
            f"non-inferiority (margin {policy.margin:g}, always-valid): lower bound "
            f"{_f(cs_lo, '+.4f')} {'>' if ni_shown else '<='} {_bound(-policy.margin)}: "
            f"{'shown' if ni_shown else 'not shown'}"
        )
    elif not policy.use_sequential and ni is not None and ni.passed is not None:
        ni_shown = ni.passed
        reasons.append(
            f"non-inferiority (margin {policy.margin:g}, fixed-horizon): one-sided "
            f"{1 - alpha:.0%} lower bound {_f(ni.lower_bound, '+.4f')} "
            f"{'>' if ni.passed else '<='} {_bound(-policy.margin)}, "
            f"p = {_f(ni.p_value, '.3g')}: {'shown' if ni.passed else 'not shown'}"
        )

    # -- power (fixed-horizon figure; informs, never decides with use_sequential)
    pw = a.power
    powered = pw.required_n is not None and a.pair.n >= pw.required_n
    if pw.required_n is not None:
        reasons.append(
            f"power analysis (fixed-horizon): required n {_n(pw.required_n)} paired labelled "
            f"requests for {pw.power:.0%} power at an improvement of {pw.mde:g} in "
            f"{spec.label} (alpha {pw.alpha:.3g}, pilot sd {_f(pw.sd_per_request, '.4g')}); "
            f"have {_n(a.pair.n)}; achieved power at the minimum effect: "
            f"{_f(None if pw.achieved_power is None else 100 * pw.achieved_power, '.0f')}%"
            + ("; the always-valid test needs more" if policy.use_sequential else "")
        )
    elif pw.reason:
        reasons.append(f"power analysis: {pw.reason}")

    # -- guardrails and data health
    g = a.guardrails
    for check in g.checks:
        tag = {True: "pass", False: "FAIL", None: "insufficient"}[check.passed]
        reasons.append(f"guardrail {check.name}: {check.detail} — {tag}")
    health = a.health
    if health is not None:
        reasons.append(
            f"data health: {health.status}"
            + (" — " + "; ".join(health.reasons) if health.reasons else "")
        )

    # -- the rules
    if policy.use_sequential:
        unstable = defined and (state == "empty" or flipped)
        better = not unstable and state == "above"
        worse = not unstable and state == "below"
        futile = (
            not unstable
            and policy.min_effect > 0
            and math.isfinite(cs_hi)
            and cs_hi < policy.min_effect
        )
    else:
        unstable = False
        better, worse = fixed_better, fixed_worse
        futile = ni is not None and ni.passed is False and powered

    decision: Verdict
    if g.status == "fail":
        decision = "BLOCKED"
        failed = ", ".join(c.name for c in g.checks if c.passed is False)
        head = f"BLOCKED: guardrail failed ({failed})"
    elif health is not None and health.status == "fail":
        decision = "INCONCLUSIVE"
        head = "INCONCLUSIVE: data health: " + ("; ".join(health.reasons) or "gate failed")
    elif not defined:
        decision = "INCONCLUSIVE"
        head = f"INCONCLUSIVE: primary metric undefined ({pr.reason})"
    elif not enough:
        decision = "INCONCLUSIVE"
        head = "INCONCLUSIVE: not enough labelled requests yet"
    elif unstable:
        decision = "INCONCLUSIVE"
        if state == "empty":
            head = (
                "INCONCLUSIVE: effect not stable — the always-valid confidence sequence is "
                f"empty ([{_f(cs_lo, '+.4f')}, {_f(cs_hi, '+.4f')}]): no single improvement "
                "fits every look; start a new experiment once the challenger is fixed"
            )
        else:
            head = (
                "INCONCLUSIVE: effect not stable — the always-valid confidence sequence is "
                f"{state} 0 but the current estimate is {_f(pr.improvement, '+.4f')}"
            )
    elif worse:
        decision = "KEEP"
        head = f"KEEP: challenger significantly worse on {spec.label}"
        if policy.use_sequential:
            head += f" (always-valid confidence sequence below 0, upper bound {_f(cs_hi, '+.4f')})"
    elif better and g.status == "pass":
        decision = "PROMOTE"
        head = f"PROMOTE: challenger significantly better on {spec.label}"
        if policy.use_sequential:
            head += (
                ", confirmed by the always-valid confidence sequence (lower bound "
                f"{_f(cs_lo, '+.4f')} > 0),"
            )
        head += " and guardrails pass"
    elif better:
        decision = "INCONCLUSIVE"
        head = "INCONCLUSIVE: better, but guardrails lack data"
    elif futile:
        decision = "KEEP"
        if policy.use_sequential:
            head = (
                f"KEEP: not better by the minimum effect — the always-valid upper bound of the "
                f"improvement {_f(cs_hi, '+.4f')} is below min_effect {policy.min_effect:g}"
            )
        else:
            head = (
                f"KEEP: with enough data to detect {policy.min_effect:g}, non-inferiority "
                f"(margin {policy.margin:g}) is not shown"
            )
    elif fixed_rejected and policy.use_sequential:
        decision = "INCONCLUSIVE"
        head = (
            "INCONCLUSIVE: the fixed-horizon test is significant but the always-valid test "
            "does not confirm it yet (reading a fixed-horizon test daily inflates false "
            "decisions)"
        )
    else:
        decision = "INCONCLUSIVE"
        if pw.required_n is not None and not powered:
            need = max(pw.required_n, policy.min_samples)
            head = (
                f"INCONCLUSIVE: need about {_n(need)} paired labelled requests "
                f"(have {_n(a.pair.n)})"
            )
            if policy.use_sequential:
                head += "; that is the fixed-horizon figure, the always-valid test needs more"
        elif ni_shown:
            head = (
                f"INCONCLUSIVE: non-inferior (margin {policy.margin:g}) but not shown better; "
                "the true improvement is probably below the minimum effect"
            )
        else:
            head = "INCONCLUSIVE: no significant difference yet"
    reasons.insert(0, head)

    checks: dict[str, Any] = {
        "enough_samples": enough,
        "primary_defined": defined,
        "significantly_better": better,
        "significantly_worse": worse,
        "sequential_agrees": (state in ("above", "below")) if seq is not None else None,
        "cs_state": state,
        "cs_level": cs_level,
        "effect_stable": not unstable,
        "non_inferior": ni_shown,
        "not_better_by_min_effect": futile,
        "adequately_powered": powered if pw.required_n is not None else None,
        "guardrails": g.status,
        "data_health": None if health is None else health.status,
    }
    return ChallengerDecision(
        route=dataset.route,
        champion=dataset.champion,
        challenger=a.challenger,
        decision=decision,
        reasons=reasons,
        policy=policy,
        n_labelled=a.pair.n,
        n_positive=a.n_pos,
        n_negative=a.n_neg,
        excluded=a.pair.excluded,
        checks=checks,
        primary=pr,
        p_adjusted=p_adj,
        non_inferiority=ni,
        sequential=seq,
        sequential_p_adjusted=seq_p_adj,
        power=pw,
        guardrails=g,
        secondary=a.secondary,
        data_health=health,
        experiment=a.experiment,
    )


def decide(
    dataset: EvalDataset,
    policy: DecisionPolicy | None = None,
    *,
    health_check: HealthCheck | None = None,
) -> list[ChallengerDecision]:
    """Decide PROMOTE / KEEP / BLOCKED / INCONCLUSIVE for every challenger in ``dataset``.

    Challengers are tested as one family: their fixed-horizon p-values and, separately, their
    always-valid p-values are corrected with ``policy.correction`` (Holm by default), and each
    challenger's confidence sequence is computed at the level the correction gives it
    (``corrected_levels``). ``health_check`` replaces ``evaluator.gates.health.check_data_health``
    (called as ``health_check(dataset, challenger, alpha=policy.health_alpha)``).
    """
    policy = policy or DecisionPolicy()
    spec = METRICS[policy.primary_metric]
    if spec.task != dataset.task:
        raise ValueError(
            f"primary metric {policy.primary_metric!r} is for {spec.task}, "
            f"but route {dataset.route!r} is {dataset.task}"
        )
    if dataset.champion not in dataset.models:
        raise ValueError(f"champion {dataset.champion!r} has no scores in the dataset")
    challengers = dataset.challengers
    if not challengers:
        return []
    check = health_check or check_data_health
    analyses = [_analyse(dataset, c, policy, len(challengers), check) for c in challengers]
    p_adj, _ = adjust_pvalues(
        [a.primary.p_value for a in analyses], policy.alpha, policy.correction
    )
    seq_raw = [a.sequential.p_value if a.sequential is not None else None for a in analyses]
    seq_adj, _ = adjust_pvalues(seq_raw, policy.alpha, policy.correction)
    levels = corrected_levels(seq_raw, policy.alpha, policy.correction)
    return [
        _verdict(a, p_adj[i], seq_adj[i], levels[i], len(challengers), policy, dataset)
        for i, a in enumerate(analyses)
    ]


def decisions_to_dict(decisions: list[ChallengerDecision]) -> list[dict[str, Any]]:
    """JSON-ready list for the report."""
    return [d.to_dict() for d in decisions]
