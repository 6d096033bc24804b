"""Data and prediction drift: a reference window against the live window, per feature and model.

Why: labels arrive days late, so the first sign that a model is being asked about a world it was
not trained on is in its inputs (data drift) and its own scores (prediction drift), both of which
are available the moment a request is served (seed lesson, "Data Drift" / "Prediction Drift").

Reference: a training snapshot file (CSV, JSONL, or Parquet when pyarrow is installed) or a past
window of the inference log. Live: the route's newest window of the log.

Per numeric feature:
* **PSI** over `bins` bins cut at the reference's quantiles (interior edges; the outer bins are
  open, so live values beyond the reference range land in the first/last bin; intervals are
  (a, b]; edges are reference values, so ties collapse into fewer bins). A bin empty on one
  side would make PSI infinite; its share is replaced by `epsilon` (1e-4: a bin empty in the
  live window then contributes about p·ln(p/1e-4), 4.6 for p = 0.5 — "very large", not
  infinity) and shares are not renormalised, so the value stays comparable across runs.
  Conventions (configurable): < 0.1 negligible, 0.1–0.2 investigate (`warn`), > 0.2
  significant.
* **Kolmogorov–Smirnov** (scipy `ks_2samp`): statistic and p-value.
* **Wasserstein-1** (scipy), also divided by the reference SD so features compare.
* mean and SD of both windows, the mean shift in reference SDs and the SD ratio.
A numeric feature *drifts* when PSI >= its threshold **and** KS p < `ks_alpha`: PSI says the
shift is big enough to matter, KS that it is not sampling noise. With a million rows KS alone
flags shifts nobody cares about; with fifty rows PSI alone flags noise.

Per categorical feature (BYTES tensors, strings in the reference, or listed in
`drift.categorical`): chi-squared test of homogeneity on the 2 x k table of counts, the
Jensen–Shannon distance (base 2, in [0, 1]) between the category shares, PSI on the categories,
and **unseen categories** (live values the whole reference never had) with their share. It
drifts when (JS >= `js_alert` and chi-squared p < `chi2_alpha`), or when the unseen share is
surprising given the reference's own rate of new values (`unseen_baseline`: each past window's
share of values found nowhere else in the reference, else the Good–Turing singleton share): at
least `unseen_alert` above that rate, binomial p < `chi2_alpha`, and above median + sigma x
robust SD of the past windows' shares. A long-tail identifier shows new values every day and
stays quiet; a category nobody has seen before pages. Live categories new to the segment keep
their own column in the table only with >= 5 rows; one-off identifiers join "(other)".

Every feature, numeric or categorical: **missing-value drift** (`_missing_check`), the share of
missing or non-finite values against the reference — drift when it moved by >= `missing_alert`
and a chi-squared test on (present, missing) x (reference, live) gives p < `chi2_alpha`. It is
judged even when too few values are left for the other statistics (an 89%-NaN feature drifts).
Each feature says why it was or was not flagged (`rules`, `reasons`, `why`) and what it can see:
`min_detectable_shift_sd`, the smallest mean shift in reference SDs the rule flags about half
the time at the current sample sizes, and the `detection_limit` that binds (the PSI threshold,
or the sample size through the KS test).

Dataset verdict (`dataset_rule`): `dataset_drift` when the share of evaluated features the
dataset rule counts reaches `drift_share` (0.3, as in the seed's
`DataDriftPreset(drift_share=0.3)`). It counts every drifted feature, and every feature whose
distribution test (KS, chi-squared) survives a Benjamini–Hochberg correction across the
features at `ks_alpha`/`chi2_alpha` with an effect at or above its *dataset floor* — PSI >=
`psi_warn` (0.1) instead of `psi_alert`, JS >= `js_alert` x sqrt(psi_warn / psi_alert), or the
adaptive bar from past windows on that base: a broad 0.5 SD shift sits right at one feature's
PSI floor, and a share of flags alone pages on some days of it and not others. `share` stays
the share of drifted features. A feature in the reference but absent from the live window
counts as drifted (it stopped arriving).

Prediction drift, per model (champion and every challenger, whether served or shadow): PSI, KS
and Wasserstein of the score distribution, the predicted-positive share (score >= the route's
threshold) and the shares of confidence buckets (max(p, 1 - p), lower edges from
`confidence_buckets`) against the reference, with a PSI over the buckets. A model drifts when
its score PSI >= threshold and KS p < `ks_alpha`. Scores outside [0, 1] (regression) skip the


class and confidence parts.

Alert fatigue (seed: "Production pitfall"). Traffic has weekly and daily rhythms; a model trained
on weekday traffic sees "drift" every Saturday. Two remedies, both configurable:
* `seasonality`: the reference is cut into segments (hour of day, day of week, both, or
  weekday/weekend, in local time `utc_offset_hours`) and the live window is compared only with
  the reference rows of the segments it covers: Saturday with past Saturdays.
* `adaptive`: the reference is cut into past windows as long as the live window and aligned
  to it (with a 1-day live window: each past day). Each past window is compared with the rest
  of *its own* segment exactly as the live window is with its segment (a past Saturday with the
  other Saturdays, a past Tuesday with the other Tuesdays); pooled over all windows, those values
  are the statistic's normal variation, and the threshold becomes max(fixed convention,
  median + `adaptive_sigma` x 1.4826 MAD) of them — for PSI on the square-root scale, where a
  noise shift is close to half-normal (PSI itself is chi-square-like and skewed). Robust
  estimates, because a shifted day inside the reference is an outlier of this null, and mean +
  3 SD would follow it upward. It never goes below the fixed convention, so it only removes
  pages caused by a feature that is always this variable. Past windows are binned at the whole
  reference's quantile edges (one sort per feature rather than one per window; the difference
  is within sampling noise). Fewer than `adaptive_min_periods` usable past windows keeps the
  fixed thresholds, and the result says so.

A reference that cannot learn an ongoing incident (the log reference ends where the live window
starts, so a shift walks into it day after day):
* past windows that would themselves have paged (a first pass of thresholds; the dataset rule or
  any model's score PSI), and a feature's own flagged windows, leave that feature's null and its
  reference rows (`_paged_windows`);
* while a drift episode is open, the log reference stays where it was when the episode began
  (`reference_bounds`, the `reference_until` kept in the episode state by `WebhookNotifier`;
  `drift --no-webhook` keeps the state too), so the run keeps paging — and the features stay
  flagged — until the live window is back within the thresholds for `episode_clear_runs` runs.
Segments in the live window's proportions: a window from Friday 18:00 to Saturday 18:00 faces
25% Friday and 75% Saturday reference rows (`_segment_rows`, a deterministic stratified pick, so
the statistics stay the exact unweighted ones); each past window's "rest" is weighted the same.
`devtools/simulate/drift.py` measures both on a weekly-seasonal stream (docs/DRIFT.md).

Outputs: `DriftResult.to_dict()` (drift.json: data, never text; the report renders its drift
section and drift.md from it, `evaluator.report.drift`), a per-feature text table for the
terminal (`table`), Prometheus gauges in the evaluator's own `CollectorRegistry`
(`DriftMetrics`; `start_metrics_server` for a long-running process, `push` for batch runs via the
Pushgateway), and an optional webhook (`WebhookNotifier`) that fires once per drift or guardrail
episode, with retries, its state in a small JSON file.

Errors: a reference that cannot be used raises a `BadReferenceError` subclass naming the problem
(`ReferenceFormatError`, `EmptyReferenceError`, `MissingFeaturesError`, `FeatureTypeError`);
an empty live window raises `EmptyWindowError`.

Modules: `data` (a window's columns), `reference` (snapshot files), `windows` (the log),
`statistics`, `seasonal` (segments, past windows), `thresholds` (adaptive), `features`,
`predictions`, `compute` (the comparison and the dataset rule), `result` (drift.json),
`table`, `prometheus`, `webhook`, `command` (`python -m evaluator drift`).
"""

from __future__ import annotations

from evaluator.drift.compute import compute_drift, dataset_rule
from evaluator.drift.data import ALL_MODELS, DAY, HOUR, KS_EXACT_MAX, OTHER, FeatureData
from evaluator.drift.errors import (
    BadReferenceError,
    DriftError,
    EmptyReferenceError,
    EmptyWindowError,
    FeatureTypeError,
    MissingFeaturesError,
    ReferenceFormatError,
)
from evaluator.drift.features import categorical_drift, min_detectable_shift, numeric_drift
from evaluator.drift.predictions import confidence_shares, prediction_drift
from evaluator.drift.prometheus import DriftMetrics, metrics, start_metrics_server
from evaluator.drift.reference import load_reference
from evaluator.drift.result import DriftResult, FeatureDrift, PredictionDrift, Threshold
from evaluator.drift.seasonal import period_ids, reference_bounds, segment_keys
from evaluator.drift.statistics import (
    bin_counts,
    chi_squared,
    js_distance,
    ks_test,
    psi,
    psi_from_counts,
    quantile_edges,
    wasserstein,
)
from evaluator.drift.table import feature_table
from evaluator.drift.thresholds import categorical_null, numeric_null, unseen_baseline
from evaluator.drift.webhook import WebhookError, WebhookNotifier, alert_drift, alert_guardrails
from evaluator.drift.windows import Windows, drift_for_route, plan_windows, window_data

__all__ = [
    "ALL_MODELS",
    "DAY",
    "HOUR",
    "KS_EXACT_MAX",
    "OTHER",
    "BadReferenceError",
    "DriftError",
    "DriftMetrics",
    "DriftResult",
    "EmptyReferenceError",
    "EmptyWindowError",
    "FeatureData",
    "FeatureDrift",
    "FeatureTypeError",
    "MissingFeaturesError",
    "PredictionDrift",
    "ReferenceFormatError",
    "Threshold",
    "WebhookError",
    "WebhookNotifier",
    "Windows",
    "alert_drift",
    "alert_guardrails",
    "bin_counts",
    "categorical_drift",
    "categorical_null",
    "chi_squared",
    "compute_drift",
    "confidence_shares",
    "dataset_rule",
    "drift_for_route",
    "feature_table",
    "js_distance",
    "ks_test",
    "load_reference",
    "metrics",
    "min_detectable_shift",
    "numeric_drift",
    "numeric_null",
    "period_ids",
    "plan_windows",
    "prediction_drift",
    "psi",
    "psi_from_counts",
    "quantile_edges",
    "reference_bounds",
    "segment_keys",
    "start_metrics_server",
    "unseen_baseline",
    "wasserstein",
    "window_data",
]
