"""PROMOTE / KEEP / INCONCLUSIVE for each challenger, with every reason and number behind it.

The rules (``decide``), in order of precedence:

1. **KEEP** when a guardrail fails (p99 latency or error rate beyond its limit, judged once both
   models have enough requests): a more accurate model that times out is not an upgrade.
2. **INCONCLUSIVE** when the primary metric is undefined (e.g. one class only) or there are fewer
   than ``min_samples`` paired labelled requests (for classifiers also fewer than
   ``min_per_class`` of either label): asymptotic tests are not trusted on thin data.
3. **KEEP** when the challenger is significantly *worse* on the primary metric (two-sided test,
   p-value corrected across challengers; when ``use_sequential`` the always-valid test must agree).
4. **PROMOTE** when it is significantly *better* (same test and correction), the always-valid
   sequential test agrees (when ``use_sequential``), and every guardrail passes. Significantly
   better but with a disagreeing sequential test or guardrails without enough data is
   INCONCLUSIVE: keep collecting.
5. **KEEP** when non-inferiority is not shown although the sample is large enough to detect the
   minimum effect (n >= the power analysis' requirement): a well-powered test cannot rule out
   that the challenger is worse by ``margin``. With ``margin = 0`` this reads "adequately powered
   and still not better".
6. Otherwise **INCONCLUSIVE**, with the number of labelled requests the power analysis says
   are needed.

Why the primary test is two-sided while promotion is one-directional: it keeps one test for both
verdicts (better → PROMOTE, worse → KEEP) with a total error rate of alpha; the chance of
promoting an equal challenger is alpha / 2 per look, which the A/A simulations confirm.

Primary metrics and their tests (all paired on the requests both models answered):
``auroc`` — DeLong; ``accuracy`` — McNemar (difference CI and margin via the paired Wald SE);
``log_loss``, ``brier``, ``mae`` — paired t-test on per-request losses; ``rmse`` — delta-method
z-test. ``margin`` and ``min_effect`` are in the primary metric's own units (AUROC points, nats,
Brier units, accuracy share, or the target's units for RMSE/MAE). The power analysis uses the
current window as its pilot and alpha / (number of challengers) under a correction — Holm's
first step, so it is conservative for the rest.

Paired rows exclude requests where the challenger errored, timed out, was shed or skipped: the
quality comparison is conditional on the challenger answering, and the guardrails account for
the requests where it did not. All exclusions are counted in ``excluded``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from evaluator.dataset import EvalDataset
from evaluator.guardrails import GuardrailLimits, GuardrailResult, check_guardrails
from evaluator.metrics import LossName, per_request_loss, probability_violations
from evaluator.sequential import SequentialResult, msprt_delong, msprt_paired, msprt_rmse
from evaluator.significance import (
    NonInferiorityResult,
    PowerResult,
    adjust_pvalues,
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
Verdict = Literal["PROMOTE", "KEEP", "INCONCLUSIVE"]
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


@dataclass
class ChallengerDecision:
    """The verdict on one challenger and everything that produced it.

    ``to_dict()`` (strict JSON: NaN/inf become null) has the keys: ``route``, ``champion``,
    ``challenger``, ``decision`` ("PROMOTE" | "KEEP" | "INCONCLUSIVE"), ``reasons`` (headline
    first, then one line per check with its numbers), ``primary_metric``, ``n_labelled``,
    ``n_positive``, ``n_negative``, ``excluded`` (counts by cause), ``checks`` (the booleans the
    rules used), ``primary`` (metric, test, champion, challenger, difference, improvement, se,
    statistic, df, p_value, p_adjusted, correction, ci_low, ci_high, ...), ``non_inferiority``,
    ``sequential`` (p_value, p_adjusted, used_for_decision, confidence sequence and the per-look
    ``path`` for the cumulative-statistic plot), ``power`` (required_n, achieved_power, ...),
    ``guardrails`` (status, checks, latency and outcome summaries per model), ``secondary``
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

    def to_dict(self) -> dict[str, Any]:
        primary = self.primary.to_dict()
        primary["p_adjusted"] = jsonable(self.p_adjusted)
        primary["correction"] = self.policy.correction
        sequential = None
        if self.sequential is not None:
            sequential = self.sequential.to_dict()
            sequential["p_adjusted"] = jsonable(self.sequential_p_adjusted)
            sequential["used_for_decision"] = self.policy.use_sequential
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
    ts: np.ndarray
    excluded: dict[str, int]

    @property
    def n(self) -> int:
        return int(self.y.size)


def _paired_rows(dataset: EvalDataset, challenger: str) -> _Pair:
    """Requests with a valid label on which both models answered with a finite score."""
    champ = dataset.models[dataset.champion]
    chall = dataset.models[challenger]
    y = np.asarray(dataset.labels, dtype=np.float64)
    classification = dataset.task == "classification"
    label_ok = ((y == 0) | (y == 1)) if classification else np.isfinite(y)
    c_ok = champ.ok & np.isfinite(champ.scores)
    h_ok = chall.ok & np.isfinite(chall.scores)
    keep = label_ok & c_ok & h_ok
    excluded = {
        "invalid_label": int(np.count_nonzero(~label_ok)),
        "champion_no_score": int(np.count_nonzero(label_ok & ~c_ok)),
        "challenger_no_score": int(np.count_nonzero(label_ok & c_ok & ~h_ok)),
        "challenger_not_ok": int(np.count_nonzero(label_ok & c_ok & ~chall.ok)),
    }
    ts = np.asarray(dataset.ts, dtype=np.float64)[keep]
    order = np.argsort(np.where(np.isfinite(ts), ts, np.inf), kind="stable")
    return _Pair(
        y[keep][order], champ.scores[keep][order], chall.scores[keep][order], ts[order], excluded
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


def _analyse(
    dataset: EvalDataset, challenger: str, policy: DecisionPolicy, n_tests: int
) -> _Analysis:
    metric = policy.primary_metric
    pair = _paired_rows(dataset, challenger)
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
    )


# ----------------------------------------------------------------------------------------------
# The verdict
# ----------------------------------------------------------------------------------------------


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _verdict(
    a: _Analysis,
    p_adj: float | None,
    seq_p_adj: float | None,
    policy: DecisionPolicy,
    dataset: EvalDataset,
) -> ChallengerDecision:
    spec = METRICS[policy.primary_metric]
    alpha = policy.alpha
    pr = a.primary
    reasons: list[str] = []

    # -- sample size
    enough = a.pair.n >= policy.min_samples
    sample = f"{a.pair.n} paired labelled requests (minimum {policy.min_samples})"
    if a.n_pos is not None and a.n_neg is not None:
        enough = enough and min(a.n_pos, a.n_neg) >= policy.min_per_class
        sample += f"; {a.n_pos} positive / {a.n_neg} negative (minimum {policy.min_per_class} each)"
    excluded = {k: v for k, v in a.pair.excluded.items() if v}
    if excluded:
        sample += "; excluded: " + ", ".join(f"{k} {v}" for k, v in excluded.items())
    reasons.append(sample)

    # -- primary test
    defined = pr.reason is None and pr.p_value is not None and pr.improvement is not None
    better = worse = fixed_rejected = False
    if defined:
        assert pr.improvement is not None
        fixed_rejected = p_adj is not None and p_adj <= alpha
        better = fixed_rejected and pr.improvement > 0
        worse = fixed_rejected and pr.improvement < 0
        verdict = "not significant"
        if better or worse:
            verdict = "significantly better" if better else "significantly worse"
        reasons.append(
            f"{spec.label}: challenger {_f(pr.challenger)} vs champion {_f(pr.champion)}, "
            f"difference {_f(pr.difference, '+.4f')} ({1 - alpha:.0%} CI {_f(pr.ci_low, '+.4f')} "
            f"to {_f(pr.ci_high, '+.4f')}); {pr.test} p = {_f(pr.p_value, '.3g')}, "
            f"{policy.correction}-adjusted p = {_f(p_adj, '.3g')} at alpha {alpha:g}: {verdict}"
        )
    else:
        reasons.append(f"{spec.label}: no test — {pr.reason}")

    # -- sequential
    seq = a.sequential
    seq_agrees: bool | None = None
    if seq is not None and defined:
        seq_rejects = seq_p_adj is not None and seq_p_adj <= alpha
        seq_agrees = seq_rejects
        text = (
            f"always-valid sequential test (mSPRT, tau {policy.tau:g}, {seq.n.size} looks): "
            f"p = {_f(seq.p_value, '.3g')}, adjusted {_f(seq_p_adj, '.3g')}"
        )
        if seq.reason:
            text += f" ({seq.reason})"
        if policy.use_sequential:
            text += " — agrees" if seq_rejects else " — does not (yet) confirm"
        else:
            text += " — informational (use_sequential off)"
        reasons.append(text)
    if policy.use_sequential:
        better = better and bool(seq_agrees)
        worse = worse and bool(seq_agrees)

    # -- non-inferiority
    ni = a.non_inferiority
    if ni is not None and ni.passed is not None:
        reasons.append(
            f"non-inferiority (margin {policy.margin:g}): one-sided {1 - alpha:.0%} lower bound "
            f"of the improvement {_f(ni.lower_bound, '+.4f')} "
            f"{'>' if ni.passed else '<='} {-policy.margin:g}, p = {_f(ni.p_value, '.3g')}: "
            f"{'shown' if ni.passed else 'not shown'}"
        )

    # -- power
    pw = a.power
    powered = pw.required_n is not None and a.pair.n >= pw.required_n
    if pw.required_n is not None:
        reasons.append(
            f"power analysis: {pw.required_n} paired labelled requests give {pw.power:.0%} power "
            f"to detect a {spec.label} difference of {pw.mde:g} "
            f"at alpha {pw.alpha:.3g} (pilot sd {_f(pw.sd_per_request, '.4g')}); have {a.pair.n}"
            + (
                " (fixed-horizon figure: the always-valid test needs more; see STATISTICS.md)"
                if policy.use_sequential
                else ""
            )
        )
    elif pw.reason:
        reasons.append(f"power analysis: {pw.reason}")

    # -- guardrails
    g = a.guardrails
    for check in g.checks:
        tag = {True: "pass", False: "FAIL", None: "insufficient"}[check.passed]
        reasons.append(f"guardrail {check.name}: {check.detail} — {tag}")

    # -- verdict
    decision: Verdict
    if g.status == "fail":
        decision = "KEEP"
        head = "KEEP: a guardrail failed"
    elif not defined:
        decision = "INCONCLUSIVE"
        head = f"INCONCLUSIVE: primary metric undefined ({pr.reason})"
    elif not enough:
        decision = "INCONCLUSIVE"
        head = "INCONCLUSIVE: not enough labelled requests yet"
    elif worse:
        decision = "KEEP"
        head = f"KEEP: challenger significantly worse on {spec.label}"
    elif better and g.status == "pass":
        decision = "PROMOTE"
        head = f"PROMOTE: challenger significantly better on {spec.label}"
        if policy.use_sequential:
            head += ", confirmed by the always-valid test,"
        head += " and guardrails pass"
    elif better:
        decision = "INCONCLUSIVE"
        head = "INCONCLUSIVE: better, but guardrails lack data"
    elif ni is not None and ni.passed is False and powered:
        decision = "KEEP"
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
            head = f"INCONCLUSIVE: need about {need} paired labelled requests (have {a.pair.n})"
        elif ni is not None and ni.passed:
            head = (
                "INCONCLUSIVE: non-inferior but not significantly better; at this sample size "
                "the true improvement is probably below the minimum effect"
            )
        else:
            head = "INCONCLUSIVE: no significant difference"
    reasons.insert(0, head)

    checks: dict[str, Any] = {
        "enough_samples": enough,
        "primary_defined": defined,
        "significantly_better": better,
        "significantly_worse": worse,
        "sequential_agrees": seq_agrees,
        "non_inferior": None if ni is None else ni.passed,
        "adequately_powered": powered if pw.required_n is not None else None,
        "guardrails": g.status,
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
    )


def decide(dataset: EvalDataset, policy: DecisionPolicy | None = None) -> list[ChallengerDecision]:
    """Decide PROMOTE / KEEP / INCONCLUSIVE for every challenger in ``dataset``.

    Challengers are tested as one family: their primary p-values (and, separately, their
    always-valid p-values) are corrected together with ``policy.correction`` (Holm by default).
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
    analyses = [_analyse(dataset, c, policy, len(challengers)) for c in challengers]
    p_adj, _ = adjust_pvalues(
        [a.primary.p_value for a in analyses], policy.alpha, policy.correction
    )
    seq_adj, _ = adjust_pvalues(
        [a.sequential.p_value if a.sequential is not None else None for a in analyses],
        policy.alpha,
        policy.correction,
    )
    return [_verdict(a, p_adj[i], seq_adj[i], policy, dataset) for i, a in enumerate(analyses)]


def decisions_to_dict(decisions: list[ChallengerDecision]) -> list[dict[str, Any]]:
    """JSON-ready list for the report."""
    return [d.to_dict() for d in decisions]
