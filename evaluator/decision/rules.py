"""The verdict rules, in order of precedence (the package docstring numbers them): each rule
looks at one challenger's case and either gives the headline or passes to the next."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from evaluator.dataset import EvalDataset
from evaluator.decision import reasons
from evaluator.decision.analysis import Analysis, analyse
from evaluator.decision.evidence import Evidence, weigh
from evaluator.decision.policy import METRICS, DecisionPolicy, MetricSpec, Verdict
from evaluator.decision.reasons import count, fmt
from evaluator.decision.result import ChallengerDecision, HealthCheck
from evaluator.gates.health import check_data_health
from evaluator.stats.significance import adjust_pvalues, corrected_levels


@dataclass(frozen=True)
class Case:
    """What a rule reads: the analysis, the evidence and the policy it is judged under."""

    a: Analysis
    ev: Evidence
    policy: DecisionPolicy
    spec: MetricSpec


Headline = tuple[Verdict, str]
Rule = Callable[[Case], Headline | None]


def guardrail_failed(c: Case) -> Headline | None:
    """1. A failed guardrail blocks whatever the quality says."""
    g = c.a.guardrails
    if g.status != "fail":
        return None
    failed = ", ".join(check.name for check in g.checks if check.passed is False)
    return "BLOCKED", f"BLOCKED: guardrail failed ({failed})"


def health_failed(c: Case) -> Headline | None:
    """2. A biased sample (the data-health gate) cannot decide."""
    health = c.a.health
    if health is None or health.status != "fail":
        return None
    return "INCONCLUSIVE", "INCONCLUSIVE: data health: " + ("; ".join(health.reasons)
                                                          or "gate failed")


def undefined(c: Case) -> Headline | None:
    """3a. No primary metric, no verdict on quality."""
    if c.ev.defined:
        return None
    return "INCONCLUSIVE", f"INCONCLUSIVE: primary metric undefined ({c.a.primary.reason})"


def too_few(c: Case) -> Headline | None:
    """3b. Fewer than min_samples (classifiers: min_per_class) paired labelled requests."""
    if c.ev.enough:
        return None
    return "INCONCLUSIVE", "INCONCLUSIVE: not enough labelled requests yet"


def unstable(c: Case) -> Headline | None:
    """4. The CS is empty, or on the other side of zero from the current estimate."""
    ev = c.ev
    if not ev.unstable:
        return None
    if ev.state == "empty":
        return "INCONCLUSIVE", (
            "INCONCLUSIVE: effect not stable — the always-valid confidence sequence is "
            f"empty ([{fmt(ev.cs_lo, '+.4f')}, {fmt(ev.cs_hi, '+.4f')}]): no single improvement "
            "fits every look; start a new experiment once the challenger is fixed"
        )
    return "INCONCLUSIVE", (
        "INCONCLUSIVE: effect not stable — the always-valid confidence sequence is "
        f"{ev.state} 0 but the current estimate is {fmt(c.a.primary.improvement, '+.4f')}"
    )


def worse(c: Case) -> Headline | None:
    """5. KEEP: shown worse."""
    if not c.ev.worse:
        return None
    head = f"KEEP: challenger significantly worse on {c.spec.label}"
    if c.policy.use_sequential:
        head += (" (always-valid confidence sequence below 0, upper bound "
                 f"{fmt(c.ev.cs_hi, '+.4f')})")
    return "KEEP", head


def better(c: Case) -> Headline | None:
    """6. PROMOTE: shown better and every guardrail passes; better without guardrail data is
    INCONCLUSIVE."""
    if not c.ev.better:
        return None
    if c.a.guardrails.status != "pass":
        return "INCONCLUSIVE", "INCONCLUSIVE: better, but guardrails lack data"
    head = f"PROMOTE: challenger significantly better on {c.spec.label}"
    if c.policy.use_sequential:
        head += (
            ", confirmed by the always-valid confidence sequence (lower bound "
            f"{fmt(c.ev.cs_lo, '+.4f')} > 0),"
        )
    return "PROMOTE", head + " and guardrails pass"


def futile(c: Case) -> Headline | None:
    """7. KEEP: shown not better by the smallest improvement worth a swap."""
    if not c.ev.futile:
        return None
    policy = c.policy
    if policy.use_sequential:
        return "KEEP", (
            f"KEEP: not better by the minimum effect — the always-valid upper bound of the "
            f"improvement {fmt(c.ev.cs_hi, '+.4f')} is below min_effect {policy.min_effect:g}"
        )
    return "KEEP", (
        f"KEEP: with enough data to detect {policy.min_effect:g}, non-inferiority "
        f"(margin {policy.margin:g}) is not shown"
    )


def unconfirmed(c: Case) -> Headline | None:
    """8a. A fixed-horizon win the always-valid test does not confirm yet."""
    if not (c.ev.fixed_rejected and c.policy.use_sequential):
        return None
    return "INCONCLUSIVE", (
        "INCONCLUSIVE: the fixed-horizon test is significant but the always-valid test "
        "does not confirm it yet (reading a fixed-horizon test daily inflates false "
        "decisions)"
    )


def undecided(c: Case) -> Headline:
    """8b. Otherwise INCONCLUSIVE, saying what would help: more data, or nothing to find."""
    policy, pw, n = c.policy, c.a.power, c.a.pair.n
    if pw.required_n is not None and not c.ev.powered:
        need = max(pw.required_n, policy.min_samples)
        head = f"INCONCLUSIVE: need about {count(need)} paired labelled requests (have {count(n)})"
        if policy.use_sequential:
            head += "; that is the fixed-horizon figure, the always-valid test needs more"
        return "INCONCLUSIVE", head
    if c.ev.ni_shown:
        return "INCONCLUSIVE", (
            f"INCONCLUSIVE: non-inferior (margin {policy.margin:g}) but not shown better; "
            "the true improvement is probably below the minimum effect"
        )
    return "INCONCLUSIVE", "INCONCLUSIVE: no significant difference yet"


RULES: tuple[Rule, ...] = (guardrail_failed, health_failed, undefined, too_few, unstable, worse,
                           better, futile, unconfirmed)


def headline(c: Case) -> Headline:
    """The first rule that applies."""
    for rule in RULES:
        found = rule(c)
        if found is not None:
            return found
    return undecided(c)


def verdict(a: Analysis, p_adj: float | None, seq_p_adj: float | None, cs_level: float,
            n_challengers: int, policy: DecisionPolicy, dataset: EvalDataset
            ) -> ChallengerDecision:
    """One challenger's decision from its analysis and its family-corrected levels."""
    spec = METRICS[policy.primary_metric]
    ev = weigh(a, p_adj, cs_level, policy)
    decision, head = headline(Case(a, ev, policy, spec))
    lines = reasons.all_lines(a, ev, p_adj, seq_p_adj, cs_level, n_challengers, policy, spec)
    return ChallengerDecision(
        route=dataset.route,
        champion=dataset.champion,
        challenger=a.challenger,
        decision=decision,
        reasons=[head, *lines],
        policy=policy,
        n_labelled=a.pair.n,
        n_positive=a.n_pos,
        n_negative=a.n_neg,
        excluded=a.pair.excluded,
        checks=ev.checks(a, cs_level),
        primary=a.primary,
        p_adjusted=p_adj,
        non_inferiority=a.non_inferiority,
        sequential=ev.sequential,
        sequential_p_adjusted=seq_p_adj,
        power=a.power,
        guardrails=a.guardrails,
        secondary=a.secondary,
        data_health=a.health,
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
    analyses = [analyse(dataset, c, policy, len(challengers), check) for c in challengers]
    p_adj, _ = adjust_pvalues(
        [a.primary.p_value for a in analyses], policy.alpha, policy.correction
    )
    seq_raw = [a.sequential.p_value if a.sequential is not None else None for a in analyses]
    seq_adj, _ = adjust_pvalues(seq_raw, policy.alpha, policy.correction)
    levels = corrected_levels(seq_raw, policy.alpha, policy.correction)
    return [
        verdict(a, p_adj[i], seq_adj[i], levels[i], len(challengers), policy, dataset)
        for i, a in enumerate(analyses)
    ]
