"""Analysis of one challenger: its paired rows and every test on them, before the
cross-challenger correction and the verdict."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluator.dataset import Array, EvalDataset, ExperimentInfo
from evaluator.decision.policy import METRICS, DecisionPolicy
from evaluator.decision.result import DataHealth, HealthCheck, PrimaryResult
from evaluator.gates.guardrails import GuardrailResult, check_guardrails
from evaluator.stats.metrics import LossName, per_request_loss, probability_violations
from evaluator.stats.sequential import (
    SequentialDesign,
    SequentialResult,
    msprt_delong,
    msprt_paired,
    msprt_rmse,
)
from evaluator.stats.significance import (
    DeLongResult,
    DeltaRmseResult,
    McNemarResult,
    NonInferiorityResult,
    PairedTestResult,
    PowerResult,
    delong_test,
    mcnemar_test,
    non_inferiority_test,
    paired_t_test,
    power_normal,
    rmse_difference_test,
    sample_size_normal,
    sample_size_paired_t,
    wilcoxon_signed_rank,
)


@dataclass
class Pair:
    """The paired labelled requests of one challenger and the champion, in look order."""

    y: Array
    champion: Array
    challenger: Array
    ts: Array  # the sequential test's order: label receipt time (inference time if unknown)
    excluded: dict[str, int]
    order: str = "label-arrival"  # or "inference-time" when no label receipt time is known

    @property
    def n(self) -> int:
        return int(self.y.size)


def _experiment_rows(dataset: EvalDataset, challenger: str) -> Array | None:
    """Mask of the challenger's current-experiment rows; None when the dataset has no
    experiment for it (every row counts, as before experiments existed)."""
    info = dataset.experiments.get(challenger)
    ids = dataset.models[challenger].experiment
    if info is None or ids is None:
        return None
    return np.asarray(ids == info.id, dtype=bool)


def _order_ts(dataset: EvalDataset) -> Array:
    """When each row became visible to a report: its label's receipt time, else (records from
    before label_ts was logged) its inference time. See evaluator/stats/sequential.py for why."""
    ts = np.asarray(dataset.ts, dtype=np.float64)
    if dataset.label_ts is None:
        return ts
    label_ts = np.asarray(dataset.label_ts, dtype=np.float64)
    return np.where(np.isfinite(label_ts), label_ts, ts)


def _paired_rows(dataset: EvalDataset, challenger: str, other_experiment: int = 0) -> Pair:
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
    return Pair(
        y[keep][order],
        champ.scores[keep][order],
        chall.scores[keep][order],
        ts[order],
        excluded,
        "label-arrival" if labelled else "inference-time",
    )


def _primary(
    metric: str,
    pair: Pair,
    threshold: float,
    alpha: float,
    orders: tuple[Array, Array] | None = None,
) -> PrimaryResult:
    """The primary metric's paired test, normalised into a PrimaryResult."""
    spec = METRICS[metric]
    base = PrimaryResult(metric, spec.test, spec.higher_is_better, pair.n)
    if pair.n == 0:
        return dataclasses.replace(base, reason="no paired labelled requests")
    if metric in ("log_loss", "brier"):
        bad = probability_violations(pair.champion) + probability_violations(pair.challenger)
        if bad:
            return dataclasses.replace(
                base, reason=f"{bad} scores outside [0, 1]: {spec.label} needs probabilities"
            )
    test = _PRIMARY_TESTS.get(metric, _mean_loss)
    return test(base, pair, threshold, alpha, orders)


# What every primary test's result carries: difference (challenger - champion), se, p_value,
# ci_low, ci_high and the reason when there is no estimate.
_PairedTest = DeLongResult | McNemarResult | DeltaRmseResult | PairedTestResult


def _from_test(
    base: PrimaryResult,
    test: _PairedTest,
    champion: float | None,
    challenger: float | None,
    statistic: float | None,
    df: float | None = None,
) -> PrimaryResult:
    """The test's result normalised: the improvement is the difference signed so that positive
    is better; a test without an estimate passes on its reason."""
    if test.reason is not None or test.difference is None or test.se is None:
        return dataclasses.replace(base, reason=test.reason)
    sign = 1.0 if base.higher_is_better else -1.0
    return dataclasses.replace(
        base,
        champion=champion,
        challenger=challenger,
        difference=test.difference,
        improvement=sign * test.difference,
        se=test.se,
        statistic=statistic,
        df=df,
        p_value=test.p_value,
        ci_low=test.ci_low,
        ci_high=test.ci_high,
        sd_per_request=test.se * math.sqrt(base.n),
    )


def _auroc(base: PrimaryResult, pair: Pair, threshold: float, alpha: float,
           orders: tuple[Array, Array] | None) -> PrimaryResult:
    r = delong_test(pair.y, pair.champion, pair.challenger, alpha, orders)
    return _from_test(base, r, r.auc_champion, r.auc_challenger, r.z)


def _accuracy(base: PrimaryResult, pair: Pair, threshold: float, alpha: float,
              orders: tuple[Array, Array] | None) -> PrimaryResult:
    correct_c = (pair.champion >= threshold) == (pair.y == 1)
    correct_h = (pair.challenger >= threshold) == (pair.y == 1)
    m = mcnemar_test(correct_c, correct_h, alpha)
    return _from_test(base, m, m.accuracy_champion, m.accuracy_challenger, m.statistic)


def _rmse(base: PrimaryResult, pair: Pair, threshold: float, alpha: float,
          orders: tuple[Array, Array] | None) -> PrimaryResult:
    d = rmse_difference_test(pair.champion - pair.y, pair.challenger - pair.y, alpha)
    return _from_test(base, d, d.rmse_champion, d.rmse_challenger, d.z)


def _mean_loss(base: PrimaryResult, pair: Pair, threshold: float, alpha: float,
               orders: tuple[Array, Array] | None) -> PrimaryResult:
    """Log loss, Brier, MAE: a paired t-test on the per-request losses."""
    loss = METRICS[base.metric].loss
    assert loss is not None
    lc = per_request_loss(loss, pair.y, pair.champion, threshold)
    lh = per_request_loss(loss, pair.y, pair.challenger, threshold)
    t = paired_t_test(lc, lh, alpha)
    return _from_test(base, t, t.mean_champion, t.mean_challenger, t.statistic, t.df)


_PRIMARY_TESTS: dict[str, Callable[[PrimaryResult, Pair, float, float,
                                     tuple[Array, Array] | None], PrimaryResult]] = {
    "auroc": _auroc,
    "accuracy": _accuracy,
    "rmse": _rmse,
}


def _secondary(
    metric: str,
    pair: Pair,
    task: str,
    threshold: float,
    alpha: float,
    orders: tuple[Array, Array] | None = None,
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
    pair: Pair,
    policy: DecisionPolicy,
    threshold: float,
    orders: tuple[Array, Array] | None = None,
) -> SequentialResult:
    design = SequentialDesign(
        policy.tau,
        policy.alpha,
        policy.sequential_looks,
        policy.sequential_max_looks,
        policy.sequential_burn_in,
    )
    if metric == "auroc":
        return msprt_delong(
            pair.y,
            pair.champion,
            pair.challenger,
            pair.ts,
            min_per_class=policy.min_per_class,
            orders=orders,
            design=design,
        )
    if metric == "rmse":
        return msprt_rmse(pair.champion - pair.y, pair.challenger - pair.y, pair.ts,
                          design=design)
    loss = METRICS[metric].loss
    assert loss is not None
    lc = per_request_loss(loss, pair.y, pair.champion, threshold)
    lh = per_request_loss(loss, pair.y, pair.challenger, threshold)
    # improvement: champion loss - challenger's
    return msprt_paired(lc - lh, pair.ts, design=design)


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
class Analysis:
    """Everything measured on one challenger; the verdict only reads it."""

    challenger: str
    pair: Pair
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


def analyse(
    dataset: EvalDataset,
    challenger: str,
    policy: DecisionPolicy,
    n_tests: int,
    health_check: HealthCheck | None,
) -> Analysis:
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
    return Analysis(
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
            dataset.ts,
        ),
        health,
        dataset.experiments.get(challenger),
    )

