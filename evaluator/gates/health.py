"""Data-health gate: is the data behind a verdict the data the experiment was supposed to produce?

A paired comparison and an off-policy value are only as good as the process that produced their
rows. Three ways that process breaks silently, each a test of "what was logged" against "what the
configuration says should have happened" (a sample ratio mismatch check, in A/B-testing terms):

* ``sample_ratio`` — when the route's policy explores, the served count of every arm against the
  sum of the probabilities the policy logged for it. Logged propensities that are not the
  probabilities actually used (a fallback that serves another arm, a policy bug, rows lost on the
  way) bias every off-policy value. The statistic is the Wald form of the chi-squared goodness of
  fit, d' V^+ d with d = observed - expected counts and V = sum_i (diag(pi_i) - pi_i pi_i'),
  pi_i the request's logged arm probabilities: exact first two moments even when the
  probabilities change from request to request (Thompson sampling), because the per-request
  terms are martingale differences; chi-squared with rank(V) degrees of freedom. Arms expected
  fewer than 5 times are pooled (and the pool dropped if still below 5, which loses nothing: the
  differences sum to zero).
* ``coverage`` — the challenger's copies that were attempted (any status but ``skipped``) against
  its logged ``sample_rate``, on the requests where a copy was due: the served answer succeeded
  (the gateway sends no copies for a failed request), the challenger was not the served arm, and
  the sample rate is known (NaN: skipped). An ``explore`` challenger under an exploring policy is
  scored on every request (probability 1). Exact binomial test when the rate is constant, else
  the normal approximation of the Poisson-binomial count.
* ``shedding`` — whether the challenger's copies that were sent but not scored (shed under load,
  timed out, failed) are a random subset: the champion's score distribution on those requests
  against the requests the challenger scored (two-sample Kolmogorov-Smirnov). The paired
  comparison only sees scored copies; if the lost ones are the busy hour's traffic, the verdict
  is about a different population. Skipped when fewer than ``MIN_GROUP`` copies were lost (too
  few to move the comparison), insufficient when fewer than ``MIN_GROUP`` were scored.

Multiplicity: Bonferroni over the checks that produced a p-value (at most three), so a healthy
experiment fails the gate with probability at most ``alpha`` per report. A report is read daily,
and the same data is re-tested each day; the daily tests are strongly positively correlated, and
a failure only makes the verdict INCONCLUSIVE, never BLOCKED or KEEP. STATISTICS.md has the
false-fail rate on healthy data and the detection rate by simulation.

Rows: the challenger's current experiment (``dataset.experiments``) when known, else all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import special, stats

from evaluator.dataset import STATUS_CODES, Array, EvalDataset
from evaluator.stats.common import JsonFields

HealthStatus = Literal["pass", "fail", "insufficient"]
CheckStatus = Literal["pass", "fail", "insufficient", "skipped"]

MIN_EXPECTED = 5.0  # chi-squared cells
MIN_GROUP = 10  # shed/scored groups for the KS test
_LOST = (STATUS_CODES["shed"], STATUS_CODES["timeout"], STATUS_CODES["error"])


@dataclass(frozen=True)
class HealthCheck(JsonFields):
    """One check. ``p_adjusted`` is Bonferroni over the checks with a p-value; fail below alpha."""

    name: str
    status: CheckStatus
    detail: str
    n: int = 0
    statistic: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    observed: dict[str, float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DataHealthResult(JsonFields):
    challenger: str
    status: HealthStatus
    alpha: float
    n: int  # rows considered (the challenger's experiment)
    experiment: str | None
    checks: list[HealthCheck]
    reasons: list[str]  # why it failed (or why it could not judge); empty on pass

    @property
    def passed(self) -> bool:
        return self.status == "pass"


# ----------------------------------------------------------------------------------------------
# The three checks (on already restricted rows)
# ----------------------------------------------------------------------------------------------


def sample_ratio_check(
    served: Array, arm_probs: dict[str, Array]
) -> tuple[HealthCheck, float | None]:
    """Served counts per arm vs the sum of logged probabilities (Wald chi-squared)."""
    arms = list(arm_probs)
    if not arms:
        return HealthCheck("sample_ratio", "skipped", "no arm probabilities logged"), None
    probs = np.column_stack([np.asarray(arm_probs[a], dtype=np.float64) for a in arms])
    served_names = np.asarray(served, dtype=object)
    index = {a: k for k, a in enumerate(arms)}
    idx = np.array([index.get(s, -1) for s in served_names.tolist()], dtype=np.int64)
    total = probs.sum(axis=1)
    valid = np.all(np.isfinite(probs), axis=1) & (np.abs(total - 1.0) < 1e-6) & (idx >= 0)
    explores = valid & (probs.max(axis=1) < 1.0)
    n = int(np.count_nonzero(explores))
    if n == 0:
        return HealthCheck(
            "sample_ratio", "skipped",
            "the policy does not explore (one arm had probability 1 on every request)",
        ), None
    p = probs[explores]
    observed = np.bincount(idx[explores], minlength=len(arms)).astype(np.float64)
    expected = p.sum(axis=0)
    obs = {a: float(observed[k]) for k, a in enumerate(arms)}
    exp = {a: float(expected[k]) for k, a in enumerate(arms)}
    # groups: arms expected >= MIN_EXPECTED times, the rest pooled (pool dropped if still small)
    big = expected >= MIN_EXPECTED
    cols = [np.eye(len(arms))[:, k] for k in np.flatnonzero(big)]
    small = np.flatnonzero(~big & (expected > 0))
    if small.size and expected[small].sum() >= MIN_EXPECTED:
        pool = np.zeros(len(arms))
        pool[small] = 1.0
        cols.append(pool)
    if len(cols) < 2:
        return HealthCheck(
            "sample_ratio", "insufficient",
            f"{n:,} exploring requests, but fewer than {MIN_EXPECTED:g} expected on every arm "
            "but one",
            n, observed=obs, expected=exp,
        ), None
    g = np.column_stack(cols)  # arms x groups
    d = (observed - expected) @ g
    pg = p @ g
    cov = np.diag(pg.sum(axis=0)) - pg.T @ pg
    # d' V^+ d on V's numerically non-null eigenvectors (the counts sum to the row count, so
    # with every arm in a group V has an exact null direction that rounding must not revive)
    w, u = np.linalg.eigh(cov)
    keep = w > 1e-9 * max(float(w.max()), 1e-300)
    stat = float(np.sum((u[:, keep].T @ d) ** 2 / w[keep]))
    df = int(np.count_nonzero(keep))
    pval = float(special.chdtrc(df, stat)) if df > 0 else 1.0
    worst = max(arms, key=lambda a: abs(obs[a] - exp[a]) / math.sqrt(max(exp[a], 1.0)))
    detail = (
        f"served counts vs logged propensities over {n:,} exploring requests: chi-squared "
        f"{stat:.2f} on {df} df, p = {pval:.3g} (largest gap: {worst} served {obs[worst]:,.0f} "
        f"times, expected {exp[worst]:,.1f})"
    )
    return HealthCheck("sample_ratio", "pass", detail, n, stat, pval, None, obs, exp), pval


def coverage_check(
    dataset: EvalDataset, challenger: str, rows: Array
) -> tuple[HealthCheck, float | None]:
    """Attempted copies vs the logged sample rate, on requests where a copy was due."""
    col = dataset.models[challenger]
    if col.sample_rate is None:
        return HealthCheck("coverage", "skipped", "no sample rate logged (older records)"), None
    rate = np.asarray(col.sample_rate, dtype=np.float64)
    served = np.asarray(dataset.served, dtype=object)
    served_ok = np.zeros(len(dataset), dtype=bool)
    for name, model in dataset.models.items():
        mine = served == name
        served_ok |= mine & (model.status == STATUS_CODES["ok"])
    policy = np.asarray(dataset.policy_types, dtype=object)
    exploring = policy != "champion"
    modes = set(col.modes) - {"served"}  # a served explore arm is still an explore arm
    due = rows & np.isfinite(rate) & served_ok & (served != challenger)
    if modes >= {"explore", "shadow"}:
        due &= ~exploring  # mode per row unknown: only rows where both modes use the rate
    pi = np.where(exploring & (modes == {"explore"}), 1.0, rate)
    n = int(np.count_nonzero(due))
    if n == 0:
        return HealthCheck(
            "coverage", "skipped",
            "no request with a logged sample rate on which a copy was due",
        ), None
    pi = np.clip(pi[due], 0.0, 1.0)
    attempted = int(np.count_nonzero(col.status[due] != STATUS_CODES["skipped"]))
    expected = float(pi.sum())
    var = float((pi * (1 - pi)).sum())
    if np.all(pi == pi[0]):
        p0 = float(pi[0])
        if 0.0 < p0 < 1.0:
            pval = float(stats.binomtest(attempted, n, p0).pvalue)
            method = f"exact binomial test at sample rate {p0:g}"
        else:
            pval = 1.0 if attempted == round(expected) else 0.0
            method = f"sample rate {p0:g} leaves no room for chance"
    elif var > 0:
        z = (attempted - expected) / math.sqrt(var)
        pval = float(2 * special.ndtr(-abs(z)))
        method = "normal approximation (the sample rate varied)"
    else:
        pval = 1.0 if attempted == round(expected) else 0.0
        method = "sample rates of 0 and 1 leave no room for chance"
    detail = (
        f"{attempted:,} of {n:,} due copies attempted ({attempted / n:.1%}), expected "
        f"{expected:,.1f} ({expected / n:.1%}) from the logged sample rate: {method}, "
        f"p = {pval:.3g}"
    )
    return HealthCheck(
        "coverage", "pass", detail, n, float(attempted - expected), pval, None,
        {"attempted": float(attempted)}, {"attempted": expected},
    ), pval


def shedding_check(
    dataset: EvalDataset, challenger: str, rows: Array
) -> tuple[HealthCheck, float | None]:
    """Champion scores where the challenger's copy was lost vs where it was scored (KS)."""
    champ = dataset.models.get(dataset.champion)
    if champ is None or challenger == dataset.champion:
        return HealthCheck("shedding", "skipped", "no champion column to compare"), None
    st = dataset.models[challenger].status
    scores = np.asarray(champ.scores, dtype=np.float64)
    have = rows & np.isfinite(scores)
    lost = have & np.isin(st, _LOST)
    scored = have & (st == STATUS_CODES["ok"])
    n_lost, n_scored = int(np.count_nonzero(lost)), int(np.count_nonzero(scored))
    counts = {"lost": float(n_lost), "scored": float(n_scored)}
    if n_lost < MIN_GROUP:
        return HealthCheck(
            "shedding", "skipped",
            f"{n_lost} copies shed, timed out or failed (fewer than {MIN_GROUP}: too few to bias "
            f"the comparison of {n_scored:,} scored)",
            n_lost + n_scored, observed=counts,
        ), None
    if n_scored < MIN_GROUP:
        return HealthCheck(
            "shedding", "insufficient",
            f"only {n_scored} scored copies against {n_lost:,} shed, timed out or failed",
            n_lost + n_scored, observed=counts,
        ), None
    a, b = scores[lost], scores[scored]
    res = stats.ks_2samp(a, b)
    stat, pval = float(res.statistic), float(res.pvalue)
    share = n_lost / (n_lost + n_scored)
    detail = (
        f"{n_lost:,} of {n_lost + n_scored:,} sent copies ({share:.0%}) shed, timed out or "
        f"failed; champion score on them vs on the scored ones: median {np.median(a):.4g} vs "
        f"{np.median(b):.4g}, Kolmogorov-Smirnov D = {stat:.3f}, p = {pval:.3g}"
    )
    return HealthCheck("shedding", "pass", detail, n_lost + n_scored, stat, pval, None,
                       counts), pval


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------


def experiment_rows(dataset: EvalDataset, challenger: str) -> tuple[Array, str | None]:
    """Rows of the challenger's current experiment (all rows when it is not known)."""
    info = dataset.experiments.get(challenger)
    col = dataset.models[challenger]
    if info is None or col.experiment is None:
        return np.ones(len(dataset), dtype=bool), None
    return np.asarray(col.experiment == info.id, dtype=bool), info.id


def check_data_health(
    dataset: EvalDataset, challenger: str, alpha: float = 0.001
) -> DataHealthResult:
    """Sample ratio, coverage and shedding checks for one challenger (module docstring)."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if challenger not in dataset.models:
        raise KeyError(f"unknown challenger {challenger!r}")
    rows, experiment = experiment_rows(dataset, challenger)
    served = np.asarray(dataset.served, dtype=object)[rows]
    probs = {a: np.asarray(p)[rows] for a, p in dataset.arm_probs.items()}
    results = [
        sample_ratio_check(served, probs),
        coverage_check(dataset, challenger, rows),
        shedding_check(dataset, challenger, rows),
    ]
    m = sum(p is not None for _, p in results)
    checks: list[HealthCheck] = []
    reasons: list[str] = []
    for check, pval in results:
        if pval is not None:
            adj = min(1.0, pval * m)
            fail = adj < alpha
            check = HealthCheck(
                check.name, "fail" if fail else "pass",
                check.detail + (f" (Bonferroni over {m}: {adj:.3g})" if m > 1 else ""),
                check.n, check.statistic, pval, adj, check.observed, check.expected,
            )
            if fail:
                reasons.append(f"{_TITLES[check.name]}: {check.detail}")
        checks.append(check)
    status: HealthStatus
    if reasons:
        status = "fail"
    elif any(c.status == "insufficient" for c in checks):
        status = "insufficient"
        reasons = [f"{_TITLES[c.name]}: {c.detail}" for c in checks if c.status == "insufficient"]
    else:
        status = "pass"
    return DataHealthResult(challenger, status, alpha, int(rows.sum()), experiment, checks,
                            reasons)


_TITLES = {
    "sample_ratio": "sample ratio mismatch",
    "coverage": "coverage differs from the sample rate",
    "shedding": "lost copies are not random",
}

__all__ = [
    "DataHealthResult",
    "HealthCheck",
    "check_data_health",
    "coverage_check",
    "experiment_rows",
    "sample_ratio_check",
    "shedding_check",
]
