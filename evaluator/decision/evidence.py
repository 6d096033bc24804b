"""What the rules read: the booleans and bounds derived from one challenger's analysis.

Everything here is computed before any reason is written, so the reasons (`reasons`) and the
rules (`rules`) read the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from evaluator.decision.analysis import Analysis
from evaluator.decision.policy import DecisionPolicy
from evaluator.stats.sequential import CsState, SequentialResult, confidence_sequence, cs_state


@dataclass(frozen=True)
class Evidence:
    """One challenger's evidence after the family correction."""

    enough: bool  # min_samples (and min_per_class) paired labelled requests
    defined: bool  # the primary metric's fixed-horizon test has a p-value and an improvement
    fixed_rejected: bool  # fixed-horizon: significant after the correction
    fixed_better: bool
    fixed_worse: bool
    sequential: SequentialResult | None  # at the corrected level, with the CS bounds filled
    state: CsState  # where the CS's last look lies relative to 0
    cs_lo: float  # the CS's last look (NaN before it starts)
    cs_hi: float
    flipped: bool  # the CS and the current estimate point opposite ways
    ni_shown: bool | None  # non-inferiority (always-valid with use_sequential, else fixed)
    powered: bool  # the fixed-horizon power analysis' n is reached
    unstable: bool  # rule 4: the CS is empty or flipped
    better: bool
    worse: bool
    futile: bool  # not better by min_effect

    def checks(self, a: Analysis, cs_level: float) -> dict[str, Any]:
        """The booleans the rules used, as the report's ``checks``."""
        health = a.health
        return {
            "enough_samples": self.enough,
            "primary_defined": self.defined,
            "significantly_better": self.better,
            "significantly_worse": self.worse,
            "sequential_agrees": (self.state in ("above", "below"))
            if self.sequential is not None else None,
            "cs_state": self.state,
            "cs_level": cs_level,
            "effect_stable": not self.unstable,
            "non_inferior": self.ni_shown,
            "not_better_by_min_effect": self.futile,
            "adequately_powered": self.powered if a.power.required_n is not None else None,
            "guardrails": a.guardrails.status,
            "data_health": None if health is None else health.status,
        }


def _enough(a: Analysis, policy: DecisionPolicy) -> bool:
    enough = a.pair.n >= policy.min_samples
    if a.n_pos is not None and a.n_neg is not None:
        enough = enough and min(a.n_pos, a.n_neg) >= policy.min_per_class
    return enough


def _confidence_sequence(a: Analysis, cs_level: float
                         ) -> tuple[SequentialResult | None, CsState, float, float]:
    """The challenger's CS at its corrected level: (result, state, lower, upper)."""
    seq = a.sequential
    state: CsState = "not_started"
    cs_lo = cs_hi = math.nan
    if seq is not None:
        low, high = confidence_sequence(seq, cs_level)
        seq = dataclasses.replace(seq, alpha=cs_level, cs_low=low, cs_high=high)
        if low.size:
            cs_lo, cs_hi = float(low[-1]), float(high[-1])
            state = cs_state(cs_lo, cs_hi)
    return seq, state, cs_lo, cs_hi


def weigh(a: Analysis, p_adj: float | None, cs_level: float, policy: DecisionPolicy) -> Evidence:
    """The evidence on one challenger, given its adjusted p-value and its CS level."""
    pr = a.primary
    defined = pr.reason is None and pr.p_value is not None and pr.improvement is not None
    fixed_rejected = defined and p_adj is not None and p_adj <= policy.alpha
    improvement = pr.improvement if pr.improvement is not None else math.nan
    fixed_better = fixed_rejected and improvement > 0
    fixed_worse = fixed_rejected and improvement < 0
    seq, state, cs_lo, cs_hi = _confidence_sequence(a, cs_level)
    flipped = defined and (
        (state == "above" and pr.improvement is not None and pr.improvement <= 0)
        or (state == "below" and pr.improvement is not None and pr.improvement >= 0)
    )
    ni = a.non_inferiority
    ni_shown: bool | None = None
    if policy.use_sequential and defined and state != "not_started":
        ni_shown = state != "empty" and cs_lo > -policy.margin
    elif not policy.use_sequential and ni is not None and ni.passed is not None:
        ni_shown = ni.passed
    pw = a.power
    powered = pw.required_n is not None and a.pair.n >= pw.required_n
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
    return Evidence(
        enough=_enough(a, policy), defined=defined, fixed_rejected=fixed_rejected,
        fixed_better=fixed_better, fixed_worse=fixed_worse, sequential=seq, state=state,
        cs_lo=cs_lo, cs_hi=cs_hi, flipped=flipped, ni_shown=ni_shown, powered=powered,
        unstable=unstable, better=better, worse=worse, futile=futile,
    )
