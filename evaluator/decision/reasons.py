"""The reason lines under a verdict's headline: one per check, with its numbers.

Every number is an improvement (positive = the challenger is better), whatever the metric's
direction. Formatting only: the numbers come from `Analysis` and `Evidence`.
"""

from __future__ import annotations

import math

from evaluator.decision.analysis import Analysis
from evaluator.decision.evidence import Evidence
from evaluator.decision.policy import DecisionPolicy, MetricSpec


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def bound(x: float) -> str:
    """A threshold like -margin without "-0" or "> -0" noise."""
    return "0" if x == 0 else format(x, "+g")


def count(x: int) -> str:
    return format(x, ",")


_CS_WORDS: dict[str, str] = {
    "above": "above 0: better",
    "below": "below 0: worse",
    "contains": "contains 0: undecided",
    "empty": "empty: the improvement changed during the experiment",
    "not_started": "not started",
}


def sample(a: Analysis, policy: DecisionPolicy) -> str:
    """The sample size (and the experiment it comes from)."""
    text = f"{count(a.pair.n)} paired labelled requests (minimum {count(policy.min_samples)})"
    if a.n_pos is not None and a.n_neg is not None:
        text += (
            f"; {count(a.n_pos)} positive / {count(a.n_neg)} negative "
            f"(minimum {policy.min_per_class} each)"
        )
    excluded = {k: v for k, v in a.pair.excluded.items() if v}
    if excluded:
        text += "; excluded: " + ", ".join(f"{k} {count(v)}" for k, v in excluded.items())
    if a.experiment is not None:
        text += f"; experiment {a.experiment.id} (champion {a.experiment.champion})"
    return text


def fixed_horizon(a: Analysis, ev: Evidence, p_adj: float | None, policy: DecisionPolicy,
                  spec: MetricSpec) -> str:
    """The fixed-horizon test (decides only with use_sequential off)."""
    pr = a.primary
    if not ev.defined:
        return f"{spec.label}: no test — {pr.reason}"
    lo, hi = pr.ci_low, pr.ci_high
    if not spec.higher_is_better:  # CI of the improvement = -(CI of the difference)
        lo, hi = (None if hi is None else -hi), (None if lo is None else -lo)
    direction = "" if spec.higher_is_better else " (lower is better)"
    result = "significant" if ev.fixed_rejected else "not significant"
    return (
        f"{spec.label}{direction}: challenger {fmt(pr.challenger)} vs champion "
        f"{fmt(pr.champion)}, improvement {fmt(pr.improvement, '+.4f')} "
        f"({1 - policy.alpha:.0%} CI {fmt(lo, '+.4f')} to {fmt(hi, '+.4f')}); fixed-horizon "
        f"{pr.test} p = {fmt(pr.p_value, '.3g')}, {policy.correction}-adjusted "
        f"{fmt(p_adj, '.3g')}: {result}"
        + (" (for information: a test re-read daily does not decide)"
           if policy.use_sequential else "")
    )


def confidence_sequence(a: Analysis, ev: Evidence, seq_p_adj: float | None, cs_level: float,
                        n_challengers: int, policy: DecisionPolicy) -> str | None:
    """The always-valid confidence sequence (decides with use_sequential on)."""
    seq = ev.sequential
    if seq is None or not ev.defined:
        return None
    family = (
        f" after {policy.correction} across {n_challengers} challengers"
        if n_challengers > 1 and policy.correction != "none"
        else ""
    )
    text = (
        f"always-valid {100 * (1 - cs_level):.4g}% confidence sequence of the improvement "
        f"(mSPRT, tau {policy.tau:g}, {seq.n.size} look{'' if seq.n.size == 1 else 's'} "
        f"in {a.pair.order} order{family}): "
        f"[{fmt(ev.cs_lo, '+.4f')}, {fmt(ev.cs_hi, '+.4f')}] — {_CS_WORDS[ev.state]}; "
        f"always-valid p = {fmt(seq.p_value, '.3g')} (adjusted {fmt(seq_p_adj, '.3g')})"
    )
    if ev.flipped:
        text += f"; but the current estimate is {fmt(a.primary.improvement, '+.4f')}"
    if seq.reason:
        text += f" ({seq.reason})"
    if not policy.use_sequential:
        text += " — informational (use_sequential off)"
    return text


def non_inferiority(a: Analysis, ev: Evidence, policy: DecisionPolicy) -> str | None:
    """Non-inferiority: the CS's lower bound against -margin (fixed-horizon when off)."""
    if ev.ni_shown is None:
        return None
    shown = "shown" if ev.ni_shown else "not shown"
    if policy.use_sequential:
        return (
            f"non-inferiority (margin {policy.margin:g}, always-valid): lower bound "
            f"{fmt(ev.cs_lo, '+.4f')} {'>' if ev.ni_shown else '<='} {bound(-policy.margin)}: "
            f"{shown}"
        )
    ni = a.non_inferiority
    assert ni is not None  # ni_shown comes from it with use_sequential off
    return (
        f"non-inferiority (margin {policy.margin:g}, fixed-horizon): one-sided "
        f"{1 - policy.alpha:.0%} lower bound {fmt(ni.lower_bound, '+.4f')} "
        f"{'>' if ni.passed else '<='} {bound(-policy.margin)}, "
        f"p = {fmt(ni.p_value, '.3g')}: {shown}"
    )


def power(a: Analysis, policy: DecisionPolicy, spec: MetricSpec) -> str | None:
    """The fixed-horizon power figure; informs, never decides with use_sequential."""
    pw = a.power
    if pw.required_n is not None:
        achieved = None if pw.achieved_power is None else 100 * pw.achieved_power
        return (
            f"power analysis (fixed-horizon): required n {count(pw.required_n)} paired "
            f"labelled requests for {pw.power:.0%} power at an improvement of {pw.mde:g} in "
            f"{spec.label} (alpha {pw.alpha:.3g}, pilot sd {fmt(pw.sd_per_request, '.4g')}); "
            f"have {count(a.pair.n)}; achieved power at the minimum effect: "
            f"{fmt(achieved, '.0f')}%"
            + ("; the always-valid test needs more" if policy.use_sequential else "")
        )
    if pw.reason:
        return f"power analysis: {pw.reason}"
    return None


def gates(a: Analysis) -> list[str]:
    """One line per guardrail, then the data-health gate's."""
    lines = []
    for check in a.guardrails.checks:
        tag = {True: "pass", False: "FAIL", None: "insufficient"}[check.passed]
        lines.append(f"guardrail {check.name}: {check.detail} — {tag}")
    health = a.health
    if health is not None:
        lines.append(
            f"data health: {health.status}"
            + (" — " + "; ".join(health.reasons) if health.reasons else "")
        )
    return lines


def all_lines(a: Analysis, ev: Evidence, p_adj: float | None, seq_p_adj: float | None,
              cs_level: float, n_challengers: int, policy: DecisionPolicy,
              spec: MetricSpec) -> list[str]:
    """Every reason line below the headline, in the report's order."""
    lines = [
        sample(a, policy),
        fixed_horizon(a, ev, p_adj, policy, spec),
        confidence_sequence(a, ev, seq_p_adj, cs_level, n_challengers, policy),
        non_inferiority(a, ev, policy),
        power(a, policy, spec),
    ]
    return [line for line in lines if line is not None] + gates(a)
