"""Off-policy value of "always serve model X", from exploration logs.

When a route explores (epsilon-greedy, Thompson sampling), every request logs the served arm, the
probability the policy gave it (the propensity) and, later, a reward. That is enough to estimate
what the reward *would have been* under a policy that was never run — in particular "always serve
X" for each arm — without an A/B test. Four estimators, because each fails differently:

* **IPS** (inverse propensity scoring): mean of 1[a_i = X] r_i / p_i(X). Unbiased when every
  request had p_i(X) > 0 and the logged propensities are right; high variance when some p are
  tiny.
* **SNIPS** (self-normalised IPS): the same weighted rewards divided by the sum of the weights
  instead of n. Slightly biased, much less variable, and immune to a global error in the
  propensities' scale.
* **DM** (direct method): the mean of a reward model's prediction for X on every request. Low
  variance, but biased by whatever the reward model gets wrong.
* **DR** (doubly robust): DM plus the IPS-weighted residual of the reward model on the requests
  where X was served. Consistent if either the propensities or the reward model is right, and
  usually the one to read.

The reward model (used by DM and DR): Understudy logs every arm's score on every request, so the
model for arm X is a regression of the observed reward on **X's own logged score**, fitted on the
requests where X was served — piecewise constant over equal-mass score bins (at most ``n_bins``,
with at least ``min_per_bin`` served requests per bin; requests whose X score is missing get the
mean reward of such requests, or X's overall mean when there are too few). It is nonparametric in
the one dimension that matters (a V-shaped "reward = decision was right" curve is captured,
which a logistic fit would miss) and, because the logging policies here choose arms without
looking at the features, E[r | score_X, served X] is the reward X would earn at that score.

The reward model is **cross-fitted**: the requests are split into ``folds`` (default 5, seeded,
stratified by served arm) and each request's prediction comes from the model fitted on the other
folds. Without it, DR collapses onto DM whenever the logging propensity of X is constant
(epsilon-greedy): in-sample bin means make the residuals of the served requests sum to zero in
every bin, so the correction term is exactly 0 and "doubly robust" silently becomes "direct
method". Out of fold, a request's own reward never enters its own prediction, so the correction
measures the model's error instead of being fitted away, and the per-request DR terms keep the
usual sample-variance standard error (Chernozhukov et al. 2018, double/debiased ML).

Intervals are normal, from influence functions: the per-request terms for IPS and DR, the
linearisation w_i (r_i - V) / mean(w) for SNIPS, and for DM the spread of its predictions plus
the sampling variance of the bin means it is built from (the fold models' contributions added
as if perfectly correlated, an upper bound; so DM's interval is honest about the reward model's
noise, though not about its bias). Requests without a reward, or without a valid
propensity for the served arm, are excluded and counted.

Identification: "always X" is only estimable by IPS/SNIPS if X could have been served on every
request (p_i(X) > 0). Under the `champion` policy challengers are never served; the estimators
then return a reason instead of a number. When only some requests lack support, IPS/SNIPS are
withheld (they would silently estimate a different population) while DM/DR are reported with the
count of unsupported requests, on which they rest on the reward model alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from evaluator.dataset import Array, EvalDataset
from evaluator.stats.common import JsonFields

ESTIMATORS = ("ips", "snips", "dm", "dr")


@dataclass(frozen=True)
class PolicyEstimate(JsonFields):
    """One estimator's value of one target policy, with a normal confidence interval."""

    estimator: str
    value: float | None
    se: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    reason: str | None = None

    @classmethod
    def missing(cls, estimator: str, n: int, reason: str) -> PolicyEstimate:
        """No value for ``estimator`` on these ``n`` requests, and why."""
        return cls(estimator, None, None, None, None, n, reason)


@dataclass(frozen=True)
class ArmValue(JsonFields):
    """Estimates of the value of always serving ``arm``, with the diagnostics that qualify them."""

    arm: str
    n: int  # requests used (with a reward and a valid propensity)
    n_served: int  # of which this arm was served
    unsupported: int | None  # requests where this arm had probability 0 (None: unknown)
    effective_sample_size: float | None  # (sum w)^2 / sum w^2 of the IPS weights
    max_weight: float | None
    reward_model: str
    estimates: dict[str, PolicyEstimate]


@dataclass(frozen=True)
class OffPolicyReport(JsonFields):
    n_total: int
    n: int
    excluded: dict[str, int]
    policy_types: dict[str, int]
    logging_value: PolicyEstimate  # the mean reward actually obtained (on-policy)
    arms: dict[str, ArmValue]
    alpha: float
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmBins:
    """One arm's piecewise-constant E[reward | its own score]: inner bin ``edges``, the fitted
    reward per bin (the last slot is "score missing") and each bin mean's sampling variance."""

    edges: Array
    means: Array
    mean_var: Array

    def ids(self, scores: Array) -> Array:
        """Each request's bin (``len(edges) + 1`` = the score-missing slot)."""
        s = np.asarray(scores, dtype=np.float64)
        ids = np.full(s.size, self.edges.size + 1, dtype=np.int64)
        have = np.isfinite(s)
        ids[have] = np.searchsorted(self.edges, s[have], side="left")
        return ids


@dataclass(frozen=True)
class BinnedRewardModel:
    """Per-arm piecewise-constant E[reward | that arm's logged score], fitted where it was served
    (one ``ArmBins`` per arm)."""

    arms: tuple[str, ...]
    bins: tuple[ArmBins, ...]

    def predict(self, scores: Array) -> Array:
        """(n, K) predicted reward for every request under every arm, from (n, K) scores."""
        return np.column_stack(
            [b.means[b.ids(scores[:, k])] for k, b in enumerate(self.bins)]
        )

    def dm_variance(self, scores: Array, target: Array, n_total: int) -> float:
        """Sampling variance this model's bin means add to a DM average over ``n_total``
        requests, of which these rows (scores, target probabilities) use this model."""
        total = 0.0
        for k, b in enumerate(self.bins):
            weights = np.bincount(b.ids(scores[:, k]), weights=target[:, k],
                                  minlength=b.means.size)
            used = weights > 0
            total += float(np.sum((weights[used] / n_total) ** 2 * b.mean_var[used]))
        return total


def _bin_stats(
    ids: Array,
    r: Array,
    n_slots: int,
    fallback_mean: float,
    fallback_var: float,
    min_count: Array,
) -> tuple[Array, Array]:
    counts = np.bincount(ids, minlength=n_slots).astype(np.float64)
    sums = np.bincount(ids, weights=r, minlength=n_slots)
    sq = np.bincount(ids, weights=r * r, minlength=n_slots)
    enough = counts >= np.maximum(min_count, 1)
    safe = np.maximum(counts, 1.0)
    means = np.where(enough, sums / safe, fallback_mean)
    var = np.where(counts > 1, (sq - sums * sums / safe) / np.maximum(counts - 1, 1.0), 0.0)
    var_mean = np.where(enough, np.maximum(var, 0.0) / safe, fallback_var)
    return means, var_mean


@dataclass(frozen=True)
class RewardLogs:
    """What a reward model is fitted on: each request's reward, served arm (its column in
    ``arms``) and every arm's logged score (n, K)."""

    rewards: Array
    served_idx: Array
    scores: Array
    arms: tuple[str, ...]

    def take(self, rows: Array) -> RewardLogs:
        """The same logs restricted to ``rows`` (a mask or indices)."""
        return RewardLogs(self.rewards[rows], self.served_idx[rows], self.scores[rows], self.arms)


def fit_binned_reward_model(
    logs: RewardLogs, n_bins: int = 10, min_per_bin: int = 30
) -> BinnedRewardModel:
    """Fit the per-arm binned reward model on these rows (see the module docstring for why)."""
    r = np.asarray(logs.rewards, dtype=np.float64)
    fitted = []
    for k in range(len(logs.arms)):
        s = logs.scores[:, k]
        served = logs.served_idx == k
        have = np.isfinite(s)
        r_served = r[served]
        if r_served.size:
            arm_mean = float(r_served.mean())
            arm_var = float(r_served.var(ddof=1)) / r_served.size if r_served.size > 1 else 0.0
        else:
            arm_mean, arm_var = math.nan, math.nan
        fit_rows = served & have
        n_fit = int(np.count_nonzero(fit_rows))
        b = max(1, min(n_bins, n_fit // max(min_per_bin, 1)))
        if n_fit:
            edges = np.quantile(s[fit_rows], np.linspace(0.0, 1.0, b + 1)[1:-1])
        else:
            edges = np.empty(0)
        ids = ArmBins(edges, np.empty(0), np.empty(0)).ids(s[served])
        # Score bins are equal-mass by construction; the missing-score slot needs min_per_bin
        # served requests of its own, otherwise it falls back to the arm's mean reward.
        min_count = np.ones(b + 1, dtype=np.int64)
        min_count[b] = min_per_bin
        means, var_mean = _bin_stats(ids, r_served, b + 1, arm_mean, arm_var, min_count)
        fitted.append(ArmBins(edges, means, var_mean))
    return BinnedRewardModel(tuple(logs.arms), tuple(fitted))


@dataclass(frozen=True)
class CrossFitRewardModel:
    """Out-of-fold predictions of the binned reward model: each request's prediction comes from
    the model fitted on the other folds, so its own reward never enters its own prediction."""

    arms: tuple[str, ...]
    fold: Array  # int [n], each request's fold
    models: tuple[BinnedRewardModel, ...]  # model f: fitted on every fold but f
    predictions: Array  # (n, K)
    n_bins: int

    def dm_variance(self, scores: Array, target: Array) -> float:
        """Variance the fitted bin means add to DM. The fold models share training rows (for
        more than two folds), so their contributions are added as if perfectly correlated:
        (sum_f sd_f)^2, an upper bound whatever their correlation."""
        n = target.shape[0]
        sd = 0.0
        for f, model in enumerate(self.models):
            rows = self.fold == f
            sd += math.sqrt(max(model.dm_variance(scores[rows], target[rows], n), 0.0))
        return sd * sd

    def describe(self, k: int) -> str:
        return (
            f"binned regression of reward on {self.arms[k]}'s own logged score (at most "
            f"{self.n_bins} equal-mass bins over requests where it was served), cross-fitted "
            f"over {len(self.models)} folds"
        )


def fold_assignment(served_idx: Array, folds: int, seed: int) -> Array:
    """Seeded fold of every request, stratified by the served arm (each fold sees every arm)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(served_idx.size, dtype=np.int64)
    for k in np.unique(served_idx):
        rows = np.flatnonzero(served_idx == k)
        fold[rng.permutation(rows)] = (np.arange(rows.size) + rng.integers(folds)) % folds
    return fold


def fit_cross_fitted_reward_model(
    logs: RewardLogs, n_bins: int = 10, min_per_bin: int = 30, folds: int = 5, seed: int = 0
) -> CrossFitRewardModel:
    """K-fold cross-fitting of ``fit_binned_reward_model`` (out-of-fold predictions)."""
    if folds < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    fold = fold_assignment(logs.served_idx, folds, seed)
    pred = np.empty((fold.size, len(logs.arms)))
    models = []
    for f in range(folds):
        train, test = fold != f, fold == f
        model = fit_binned_reward_model(logs.take(train), n_bins, min_per_bin)
        if test.any():
            pred[test] = model.predict(logs.scores[test])
        models.append(model)
    return CrossFitRewardModel(tuple(logs.arms), fold, tuple(models), pred, n_bins)


# ----------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------


def _normal(
    name: str, value: float, se: float, n: int, alpha: float, reason: str | None = None
) -> PolicyEstimate:
    z = float(special.ndtri(1.0 - alpha / 2.0))
    return PolicyEstimate(name, value, se, value - z * se, value + z * se, n, reason)


def _mean_estimate(name: str, terms: Array, alpha: float) -> PolicyEstimate:
    n = int(terms.size)
    if n < 2:
        return PolicyEstimate.missing(name, n, "fewer than 2 requests")
    return _normal(name, float(terms.mean()), float(terms.std(ddof=1)) / math.sqrt(n), n, alpha)


def policy_value_estimates(
    rewards: Array,
    served_idx: Array,
    propensity: Array,
    target: Array,
    reward_hat: Array,
    *,
    dm_model_var: float = 0.0,
    unsupported: int | None = 0,
    alpha: float = 0.05,
) -> dict[str, PolicyEstimate]:
    """IPS, SNIPS, DM and DR values of a target policy on cleaned logs (numpy only).

    ``served_idx`` is the served arm's column, ``propensity`` its logging probability (> 0),
    ``target`` the (n, K) target-policy probabilities, ``reward_hat`` the (n, K) reward model.
    ``dm_model_var`` adds the reward model's own sampling variance to DM's standard error.
    """
    r = np.asarray(rewards, dtype=np.float64)
    n = int(r.size)
    rows = np.arange(n)
    w = target[rows, served_idx] / propensity
    rhat_served = reward_hat[rows, served_idx]
    # 0 * NaN must be 0: an arm the target never picks may have no reward model at all.
    dm_terms = np.where(target > 0, target * reward_hat, 0.0).sum(axis=1)
    out: dict[str, PolicyEstimate] = {}
    if unsupported:
        why = (
            f"target arm had logging probability 0 on {unsupported} of {n} requests: "
            "IPS/SNIPS would estimate a different population"
        )
        out["ips"] = PolicyEstimate.missing("ips", n, why)
        out["snips"] = PolicyEstimate.missing("snips", n, why)
    else:
        out["ips"] = _mean_estimate("ips", w * r, alpha)
        sw = float(w.sum())
        if sw <= 0 or n < 2:
            out["snips"] = PolicyEstimate.missing(
                "snips", n, "no request was served by the target arm"
            )
        else:
            v = float((w * r).sum() / sw)
            phi = w * (r - v) / (sw / n)
            out["snips"] = _normal("snips", v, float(phi.std(ddof=1)) / math.sqrt(n), n, alpha)
    if n < 2 or not np.all(np.isfinite(dm_terms)):
        why = "reward model could not be fitted (target arm never served)"
        out["dm"] = PolicyEstimate.missing("dm", n, why)
        out["dr"] = PolicyEstimate.missing("dr", n, why)
        return out
    dm = float(dm_terms.mean())
    dm_se = math.sqrt(float(dm_terms.var(ddof=1)) / n + max(dm_model_var, 0.0))
    note = (
        f"{unsupported} requests without support rely on the reward model alone"
        if unsupported
        else None
    )
    out["dm"] = _normal("dm", dm, dm_se, n, alpha, note)
    dr_terms = dm_terms + w * (r - rhat_served)
    dr = _mean_estimate("dr", dr_terms, alpha)
    out["dr"] = dataclasses.replace(dr, reason=note)
    return out


def estimate_policy_values(
    dataset: EvalDataset,
    *,
    alpha: float = 0.05,
    n_bins: int = 10,
    min_per_bin: int = 30,
    arms: tuple[str, ...] | None = None,
    folds: int = 5,
    seed: int = 0,
) -> OffPolicyReport:
    """Value of "always serve X" for every arm (every model, by default) from the logged rewards.

    Rewards come from ``dataset.rewards`` (requests without one are excluded); the served arm's
    logging probability from ``dataset.propensity``; the other arms' from ``dataset.arm_probs``
    (used to check support). Scores for the reward model from each model's column.
    """
    n_total = len(dataset)
    served_names = np.asarray(dataset.served, dtype=object)
    arm_list = list(arms) if arms is not None else list(dataset.models)
    for name in dict.fromkeys(served_names.tolist()):
        if arms is None and isinstance(name, str) and name not in arm_list:
            arm_list.append(name)
    arm_tuple = tuple(arm_list)
    index = {a: i for i, a in enumerate(arm_tuple)}
    served_idx_all = np.array([index.get(s, -1) for s in served_names.tolist()], dtype=np.int64)
    r_all = np.asarray(dataset.rewards, dtype=np.float64)
    p_all = np.asarray(dataset.propensity, dtype=np.float64)
    has_reward = np.isfinite(r_all)
    good_p = np.isfinite(p_all) & (p_all > 0) & (p_all <= 1)
    known_arm = served_idx_all >= 0
    keep = has_reward & good_p & known_arm
    excluded = {
        "no_reward": int(np.count_nonzero(~has_reward)),
        "invalid_propensity": int(np.count_nonzero(has_reward & ~good_p)),
        "unknown_served_arm": int(np.count_nonzero(has_reward & good_p & ~known_arm)),
    }
    policy_types: dict[str, int] = {}
    for t in np.asarray(dataset.policy_types, dtype=object)[keep].tolist():
        policy_types[str(t)] = policy_types.get(str(t), 0) + 1
    r = r_all[keep]
    served_idx = served_idx_all[keep]
    prop = p_all[keep]
    n = int(r.size)
    logging_value = _mean_estimate("on_policy_mean", r, alpha)
    notes: list[str] = []
    if n == 0:
        empty = PolicyEstimate.missing("on_policy_mean", 0, "no rewarded requests")
        return OffPolicyReport(n_total, 0, excluded, policy_types, empty, {}, alpha, notes)

    scores = np.column_stack(
        [
            dataset.models[a].scores[keep] if a in dataset.models else np.full(n, np.nan)
            for a in arm_tuple
        ]
    )
    model = fit_cross_fitted_reward_model(
        RewardLogs(r, served_idx, scores, arm_tuple), n_bins, min_per_bin, folds, seed
    )
    reward_hat = model.predictions
    out: dict[str, ArmValue] = {}
    for k, arm in enumerate(arm_tuple):
        target = np.zeros((n, len(arm_tuple)))
        target[:, k] = 1.0
        probs = dataset.arm_probs.get(arm)
        if probs is not None:
            pk = np.asarray(probs, dtype=np.float64)[keep]
            pk = np.where(served_idx == k, prop, pk)
            unsupported: int | None = int(np.count_nonzero(~(pk > 0)))
        else:
            unsupported = None
            notes.append(f"no logged probabilities for arm {arm}: support could not be checked")
        n_served = int(np.count_nonzero(served_idx == k))
        w = np.where(served_idx == k, 1.0 / prop, 0.0)
        ess = float(w.sum() ** 2 / (w * w).sum()) if n_served else None
        if n_served == 0:
            why = f"{arm} was never served in these logs: its value is not identified"
            estimates = {e: PolicyEstimate.missing(e, n, why) for e in ESTIMATORS}
        else:
            estimates = policy_value_estimates(
                r,
                served_idx,
                prop,
                target,
                reward_hat,
                dm_model_var=model.dm_variance(scores, target),
                unsupported=unsupported,
                alpha=alpha,
            )
        out[arm] = ArmValue(
            arm,
            n,
            n_served,
            unsupported,
            ess,
            float(w.max()) if n_served else None,
            model.describe(k),
            estimates,
        )
    return OffPolicyReport(n_total, n, excluded, policy_types, logging_value, out, alpha, notes)


def values_table(report: OffPolicyReport) -> list[dict[str, Any]]:
    """Flat rows (arm x estimator) for a report table."""
    rows: list[dict[str, Any]] = []
    for arm, value in report.arms.items():
        for est in value.estimates.values():
            rows.append({"arm": arm, **est.to_dict()})
    return rows


__all__ = [
    "ESTIMATORS",
    "ArmBins",
    "ArmValue",
    "BinnedRewardModel",
    "CrossFitRewardModel",
    "OffPolicyReport",
    "PolicyEstimate",
    "RewardLogs",
    "estimate_policy_values",
    "fit_binned_reward_model",
    "fit_cross_fitted_reward_model",
    "fold_assignment",
    "policy_value_estimates",
    "values_table",
]
