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

Modules: ``policy`` (metrics, ``DecisionPolicy``), ``analysis`` (one challenger's paired rows and
tests), ``evidence`` (the booleans and bounds the rules read), ``rules`` (the verdict as a
sequence of small checks, ``decide``), ``reasons`` (the reason lines), ``result``
(``ChallengerDecision`` and its JSON).
"""

from evaluator.decision.policy import (
    METRICS,
    Correction,
    DecisionPolicy,
    MetricSpec,
    PrimaryMetric,
    Verdict,
)
from evaluator.decision.result import (
    ChallengerDecision,
    DataHealth,
    HealthCheck,
    PrimaryResult,
    decisions_to_dict,
)
from evaluator.decision.rules import decide

__all__ = [
    "METRICS",
    "ChallengerDecision",
    "Correction",
    "DataHealth",
    "DecisionPolicy",
    "HealthCheck",
    "MetricSpec",
    "PrimaryMetric",
    "PrimaryResult",
    "Verdict",
    "decide",
    "decisions_to_dict",
]
