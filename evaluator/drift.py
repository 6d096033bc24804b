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

Outputs: `DriftResult.to_dict()` (drift.json), `drift_section` / `drift_markdown` for the report,
a per-feature text table, Prometheus gauges in the evaluator's own `CollectorRegistry`
(`DriftMetrics`; `start_metrics_server` for a long-running process, `push` for batch runs via the
Pushgateway), and an optional webhook (`WebhookNotifier`) that fires once per drift or guardrail
episode, with retries, its state in a small JSON file.

Errors: a reference that cannot be used raises a `BadReferenceError` subclass naming the problem
(`ReferenceFormatError`, `EmptyReferenceError`, `MissingFeaturesError`, `FeatureTypeError`);
an empty live window raises `EmptyWindowError`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from evaluator.config import DriftConfig, EvaluatorConfig, format_duration, parse_duration

log = logging.getLogger(__name__)

DAY = 86400.0
HOUR = 3600.0
OTHER = "(other)"
TS_COLUMNS = ("ts", "timestamp")
IGNORED_COLUMNS = ("request_id", "id", "label", "labels", "target", "y", "reward")
SCORE_PREFIXES = ("score:", "score.")
ALL_MODELS = "*"  # reference scores that apply to every model (a bare `score` column)
KS_EXACT_MAX = 1_000_000  # n_ref * n_live above which KS uses the asymptotic distribution
DRIFT_FILE = "drift.json"
DRIFT_MD = "drift.md"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class DriftError(Exception):
    """Drift cannot be computed as asked; the message says why and what to do."""


class BadReferenceError(DriftError):
    """The reference cannot be compared with the live window."""


class ReferenceFormatError(BadReferenceError):
    """The reference file is unreadable, of an unknown format, or malformed (line named)."""


class EmptyReferenceError(BadReferenceError):
    """The reference has no rows (or no usable values)."""


class MissingFeaturesError(BadReferenceError):
    """The live window has features the reference lacks."""

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


class FeatureTypeError(BadReferenceError):
    """A feature's type differs between reference and live (or within the reference)."""

    def __init__(self, message: str, feature: str) -> None:
        super().__init__(message)
        self.feature = feature


class EmptyWindowError(DriftError):
    """The live window holds no predictions for the route."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureData:
    """One side of a comparison: feature columns, optional timestamps, scores per model.

    Numeric columns are float64 (NaN = missing); categorical ones are object arrays of str
    (None = missing). `scores[model]` pairs with `score_ts[model]` when timestamps are known;
    `scores["*"]` (a reference file's bare `score` column) applies to every model.
    """

    columns: dict[str, np.ndarray]
    ts: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    score_ts: dict[str, np.ndarray] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    source: str = ""
    since: float | None = None
    until: float | None = None
    # CSV only: the original text of numeric-looking columns, so a feature that is categorical
    # live compares with the reference's own spelling ("01" stays "01").
    raw_text: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.ts is not None:
            return int(self.ts.shape[0])
        return max((int(c.shape[0]) for c in self.columns.values()), default=0)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n": len(self), "since": self.since, "until": self.until,
                "since_iso": _iso(self.since), "until_iso": _iso(self.until)}


def _iso(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _is_numeric(col: np.ndarray) -> bool:
    return col.dtype.kind in "fiub"


# -- reference files ---------------------------------------------------------------------------


def load_reference(path: str | Path, *, categorical: Iterable[str] = (),
                   names: Mapping[str, Sequence[str]] | None = None) -> FeatureData:
    """Read a training snapshot: `.csv`, `.jsonl`/`.ndjson`, or `.parquet` (needs pyarrow).

    One row per prediction, one column per feature. Optional columns: `ts`/`timestamp` (unix
    seconds or ISO 8601; needed for seasonal segments), `score` (reference scores for every
    model) or `score:<model>`; `request_id`, `label` and similar are ignored. A JSONL value that
    is a list of numbers is a tensor: its columns are named like the store names them
    (`features.names` in the config, else `name[j]`).
    """
    p = Path(path)
    if not p.exists():
        raise ReferenceFormatError(f"reference file {p} does not exist")
    if not p.is_file():
        raise ReferenceFormatError(f"reference {p} is not a file")
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    if p.stat().st_size == 0:
        raise EmptyReferenceError(f"reference file {p} is empty")
    if suffix == ".csv":
        raw, texts = _read_csv(p)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        raw, texts = _read_jsonl(p, names or {}), {}
    elif suffix == ".parquet":
        raw, texts = _read_parquet(p), {}
    else:
        raise ReferenceFormatError(f"reference file {p}: unknown format {suffix or '(none)'}; "
                                   f"use .csv, .jsonl or .parquet")
    return _reference_frame(raw, texts, str(p), set(categorical))


def _read_csv(path: Path) -> tuple[dict[str, list[Any]], dict[str, np.ndarray]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReferenceFormatError(f"reference file {path}: cannot read CSV: {exc}") from None
    rows = [r for r in rows if r and any(cell.strip() for cell in r)]
    if not rows:
        raise EmptyReferenceError(f"reference file {path} is empty")
    header = [h.strip() for h in rows[0]]
    if any(not h for h in header) or len(set(header)) != len(header):
        raise ReferenceFormatError(f"reference file {path}: the header row needs unique, "
                                   f"non-empty column names, got {header}")
    body = rows[1:]
    if not body:
        raise EmptyReferenceError(f"reference file {path} has a header but no rows")
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise ReferenceFormatError(f"reference file {path} line {i}: {len(r)} fields, the "
                                       f"header has {len(header)}")
    out: dict[str, list[Any]] = {}
    texts: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        cells = [r[j].strip() for r in body]
        values: list[Any] = []
        numeric = True
        for cell in cells:
            if cell == "" or cell.lower() in ("na", "nan", "null", "none"):
                values.append(None)
                continue
            try:
                values.append(float(cell))
            except ValueError:
                numeric = False
                values.append(cell)
        out[name] = values
        if numeric:
            texts[name] = _obj([c if c else None for c in cells])
    return out, texts


def _read_jsonl(path: Path, names: Mapping[str, Sequence[str]]) -> dict[str, list[Any]]:
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise ReferenceFormatError(f"reference file {path} line {i}: invalid JSON "
                                               f"({exc})") from None
                if not isinstance(rec, dict):
                    raise ReferenceFormatError(f"reference file {path} line {i}: expected a "
                                               f"JSON object per line, got "
                                               f"{type(rec).__name__}")
                rows.append(_flatten(rec, names, path, i))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceFormatError(f"reference file {path}: cannot read: {exc}") from None
    if not rows:
        raise EmptyReferenceError(f"reference file {path} has no records")
    keys: list[str] = []
    seen: set[str] = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    return {k: [r.get(k) for r in rows] for k in keys}


def _flatten(rec: dict[str, Any], names: Mapping[str, Sequence[str]], path: Path,
             line: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rec.items():
        if isinstance(value, list):
            cols = names.get(key)
            if cols is None or len(cols) != len(value):
                cols = [key] if len(value) == 1 else [f"{key}[{j}]" for j in range(len(value))]
            for c, v in zip(cols, value, strict=True):
                if isinstance(v, dict | list):
                    raise FeatureTypeError(f"reference file {path} line {line}: {key!r} holds "
                                           f"nested values; expected a flat list", str(c))
                out[c] = v
        elif isinstance(value, dict):
            raise FeatureTypeError(f"reference file {path} line {line}: feature {key!r} is an "
                                   f"object; expected a number or a string", key)
        else:
            out[key] = value
    return out


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq  # optional: only for Parquet references
    except ImportError:
        raise ReferenceFormatError(f"reference file {path}: reading Parquet needs pyarrow "
                                   f"(pip install pyarrow), or convert it to CSV or "
                                   f"JSONL") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types
        raise ReferenceFormatError(f"reference file {path}: cannot read Parquet: {exc}") from None
    if table.num_rows == 0:
        raise EmptyReferenceError(f"reference file {path} has no rows")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _reference_frame(raw: Mapping[str, list[Any]], texts: Mapping[str, np.ndarray], source: str,
                     categorical: set[str]) -> FeatureData:
    """Typed columns from raw per-column values; splits off ts and score columns."""
    columns: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    ts: np.ndarray | None = None
    for name, values in raw.items():
        lowered = name.lower()
        if lowered in IGNORED_COLUMNS:
            continue
        if lowered in TS_COLUMNS:
            ts = _parse_ts(values, source, name)
            continue
        if lowered == "score" or lowered.startswith(SCORE_PREFIXES):
            model = ALL_MODELS if lowered == "score" else name[len("score:"):]
            col = _typed(values, source, name, force_categorical=False)
            if not _is_numeric(col):
                raise FeatureTypeError(f"{source}: score column {name!r} must be numeric", name)
            scores[model] = col
            continue
        columns[name] = _typed(values, source, name, force_categorical=name in categorical)
    if not columns:
        raise EmptyReferenceError(f"{source}: no feature columns (only "
                                  f"{', '.join(raw) or 'nothing'})")
    since = float(np.nanmin(ts)) if ts is not None and ts.size else None
    until = float(np.nanmax(ts)) if ts is not None and ts.size else None
    score_ts = {m: ts for m in scores} if ts is not None else {}
    return FeatureData(columns=columns, ts=ts, scores=scores, score_ts=score_ts, source=source,
                       since=since, until=until,
                       raw_text={k: v for k, v in texts.items() if k in columns})


def _typed(values: list[Any], source: str, name: str, *, force_categorical: bool) -> np.ndarray:
    """float64 when every present value is a number (bool excluded), else str objects."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and
                                                           math.isnan(v))]
    if not present:
        raise EmptyReferenceError(f"{source}: feature {name!r} has no values (every row is "
                                  f"empty)")
    numbers = [isinstance(v, int | float) and not isinstance(v, bool) for v in present]
    if all(numbers) and not force_categorical:
        return np.asarray([math.nan if v is None else float(v) for v in values], dtype=float)
    return _obj([None if v is None or (isinstance(v, float) and math.isnan(v)) else
                 _category(v) for v in values])


def _category(v: Any) -> str:
    """Canonical text of a category value: 3.0 -> '3', True -> 'true'."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _parse_ts(values: list[Any], source: str, name: str) -> np.ndarray:
    out = np.empty(len(values))
    for i, v in enumerate(values):
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[i] = float(v)
            continue
        if isinstance(v, str):
            try:
                out[i] = float(v)
                continue
            except ValueError:
                pass
            try:
                from datetime import datetime, timezone

                dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
                if dt.tzinfo is None:
                    dt = dt.replace(tzinfo=timezone.utc)  # noqa: UP017 - explicit for readers
                out[i] = dt.timestamp()
                continue
            except ValueError:
                pass
        raise FeatureTypeError(f"{source}: column {name!r} row {i + 1}: {v!r} is not a "
                               f"timestamp (unix seconds or ISO 8601)", name)
    return out


def _obj(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


# -- windows of the log ------------------------------------------------------------------------


def window_data(store: Any, route: str, since: float | None, until: float | None, *,
                names: Mapping[str, Sequence[str]] | None = None) -> FeatureData:
    """Features and per-model scores (with timestamps) of the route's predictions in a window."""
    frame = store.feature_columns(route, since, until, names=names)
    scores, score_ts, roles = _read_scores(store, route, since, until)
    desc = f"log {route} [{_iso(since) or '…'}, {_iso(until) or '…'})"
    return FeatureData(columns=dict(frame.columns), ts=np.asarray(frame.ts, dtype=float),
                       scores=scores, score_ts=score_ts, roles=roles, source=desc,
                       since=since, until=until)


def _read_scores(store: Any, route: str, since: float | None, until: float | None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """Scores with their timestamps and each model's role.

    Seasonal matching needs the time of every score, which `Store.prediction_scores` does not
    return; this reads the same rows with `ts` and `role` through the store's engine and falls
    back to the public call (no timestamps, no roles) if the store's internals change.
    """
    try:
        from evaluator.store import ROLE_NAMES, Store, _num

        where, params = Store._window(route, since, until)
        with store._lock:
            e = store._connect()
            outs = e.columns(
                "SELECT o.model, o.role, o.score, i.ts FROM outcomes o "  # noqa: S608
                f"JOIN inferences i ON i.id = o.inf_id WHERE {where} AND o.status = 0 "
                "ORDER BY i.ts, i.id", params)
            lookup = store._name_lookup(e)
        models = _num(outs["model"], np.int64)
        role = _num(outs["role"], np.int64)
        score, ts = _num(outs["score"]), _num(outs["ts"])
        scores: dict[str, np.ndarray] = {}
        times: dict[str, np.ndarray] = {}
        roles: dict[str, str] = {}
        for mid in sorted(set(models.tolist())):
            mask = models == mid
            name = str(lookup[mid])
            scores[name], times[name] = score[mask], ts[mask]
            # champion when it held that role on its newest row (a promotion mid-window)
            roles[name] = ROLE_NAMES.get(int(role[mask][-1]), "challenger")
        return scores, times, roles
    except (AttributeError, ImportError, KeyError, TypeError) as exc:
        log.debug("scores without timestamps (%s): seasonal prediction drift unavailable", exc)
        return dict(store.prediction_scores(route, since, until)), {}, {}


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Interior PSI bin edges at the reference's quantiles.

    Edges are reference values (numpy's `lower` quantile, no interpolation), so a discrete
    feature's bins are its own values and ties collapse into fewer bins instead of edges at
    values that never occur.
    """
    ref = np.asarray(reference, dtype=float)
    qs = np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="lower")
    return np.unique(qs)


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin for interior `edges`: bins (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=float), side="left")
    return np.bincount(idx, minlength=edges.size + 1)


def psi_from_counts(ref_counts: np.ndarray, live_counts: np.ndarray,
                    epsilon: float = 1e-4) -> Any:
    """PSI = sum((q - p) * ln(q / p)) over bins; a share of 0 on either side becomes epsilon.

    2-D counts (one comparison per row, as the adaptive null makes) give one PSI per row."""
    ref = np.asarray(ref_counts, dtype=float)
    live = np.asarray(live_counts, dtype=float)
    rs, ls = ref.sum(axis=-1, keepdims=True), live.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(ref > 0, ref / rs, epsilon)
        q = np.where(live > 0, live / ls, epsilon)
        out = np.sum((q - p) * np.log(q / p), axis=-1)
    out = np.where((rs[..., 0] > 0) & (ls[..., 0] > 0), out, math.nan)
    return float(out) if out.ndim == 0 else out


def psi(reference: np.ndarray, live: np.ndarray, bins: int = 10, epsilon: float = 1e-4) -> float:
    """PSI of a numeric feature with bins at the reference's quantiles (NaN dropped)."""
    ref = _finite(reference)
    cur = _finite(live)
    if ref.size == 0 or cur.size == 0:
        return math.nan
    edges = quantile_edges(ref, bins)
    return psi_from_counts(bin_counts(ref, edges), bin_counts(cur, edges), epsilon)


def ks_test(reference: np.ndarray, live: np.ndarray) -> tuple[float, float]:
    """Two-sample KS (scipy); asymptotic p-value once n_ref * n_live > KS_EXACT_MAX."""
    ref, cur = _finite(reference), _finite(live)
    method = "auto" if ref.size * cur.size <= KS_EXACT_MAX else "asymp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "exact failed, using asymp"
        res = stats.ks_2samp(ref, cur, method=method)
    return float(res.statistic), float(res.pvalue)


def chi_squared(ref_counts: np.ndarray, live_counts: np.ndarray) -> tuple[float, float, int]:
    """Chi-squared test of homogeneity on the 2 x k table (no continuity correction).

    Categories absent from both sides are dropped; with one category left there is nothing to
    test (statistic 0, p 1).
    """
    table = np.vstack([np.asarray(ref_counts, dtype=float), np.asarray(live_counts, dtype=float)])
    table = table[:, table.sum(axis=0) > 0]
    k = table.shape[1]
    if k < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0, max(k - 1, 0)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = k - 1
    return statistic, float(stats.chi2.sf(statistic, dof)), dof


def js_distance(p: np.ndarray, q: np.ndarray) -> Any:
    """Jensen–Shannon distance (square root of the divergence), base 2: 0 same, 1 disjoint.

    2-D inputs give one distance per row."""
    a = np.asarray(p, dtype=float)
    b = np.asarray(q, dtype=float)
    sa, sb = a.sum(axis=-1, keepdims=True), b.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = a / sa, b / sb
        m = 0.5 * (a + b)

        def kl(x: np.ndarray) -> np.ndarray:
            return np.sum(np.where(x > 0, x * np.log2(np.where(x > 0, x, 1.0) /
                                                      np.where(m > 0, m, 1.0)), 0.0), axis=-1)

        out = np.sqrt(np.maximum(0.5 * kl(a) + 0.5 * kl(b), 0.0))
    out = np.where((sa[..., 0] > 0) & (sb[..., 0] > 0), out, math.nan)
    return float(out) if out.ndim == 0 else out


def wasserstein(reference: np.ndarray, live: np.ndarray) -> float:
    """Earth mover's distance between the two empirical distributions (scipy)."""
    return float(stats.wasserstein_distance(_finite(reference), _finite(live)))


def _finite(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class Threshold:
    """A threshold and where it came from (`fixed` convention or `adaptive` from history).

    `null_center`/`null_scale`: median and robust SD (1.4826 MAD; on the square-root scale for
    PSI) of the statistic over `periods` past windows; `excluded` windows paged and were left
    out."""

    value: float
    source: str = "fixed"
    null_center: float | None = None
    null_scale: float | None = None
    periods: int = 0
    excluded: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _clean(self.__dict__.copy())


@dataclass
class FeatureDrift:
    """One feature's comparison. `status`: ok | warn | drift | insufficient | missing."""

    name: str
    kind: str  # numeric | categorical
    status: str
    drifted: bool
    n_ref: int
    n_live: int
    missing_ref: float  # share of rows without a value
    missing_live: float
    psi: float | None = None
    threshold: Threshold | None = None  # PSI (numeric) or JS distance (categorical)
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    wasserstein: float | None = None
    wasserstein_norm: float | None = None
    mean_ref: float | None = None
    mean_live: float | None = None
    std_ref: float | None = None
    std_live: float | None = None
    mean_shift_sd: float | None = None
    std_ratio: float | None = None
    chi2: float | None = None
    chi2_pvalue: float | None = None
    chi2_dof: int | None = None
    js_distance: float | None = None
    unseen_share: float | None = None
    unseen: dict[str, int] = field(default_factory=dict)  # top unseen categories, live counts
    unseen_baseline: float | None = None  # the reference's own rate of new values
    unseen_baseline_source: str | None = None
    unseen_pvalue: float | None = None  # binomial, live unseen count vs the baseline rate
    unseen_threshold: float | None = None  # unseen share from which the feature is flagged
    missing_pvalue: float | None = None  # chi-squared on (present, missing) x (ref, live)
    min_detectable_missing_change: float | None = None
    min_detectable_shift_sd: float | None = None  # numeric: see min_detectable_shift
    detection_limit: str | None = None  # what bounds the smallest detectable change
    shares: dict[str, list[float]] = field(default_factory=dict)  # category -> [ref, live]
    rules: list[str] = field(default_factory=list)  # distribution | unseen | missing | absent
    reasons: list[str] = field(default_factory=list)
    why: str = ""  # why it was or was not flagged, and what it can detect
    # The dataset rule (`dataset_rule`): the lower effect floor (PSI or JS) a feature must
    # reach to count towards the dataset share, its BH-adjusted distribution p-value, and
    # whether it counts (every drifted feature does).
    dataset_floor: Threshold | None = None
    dataset_qvalue: float | None = None
    dataset_counted: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["threshold"] = self.threshold.to_dict() if self.threshold else None
        d["dataset_floor"] = self.dataset_floor.to_dict() if self.dataset_floor else None
        return _clean(d)


@dataclass
class PredictionDrift:
    """One model's score distribution against the reference."""

    model: str
    role: str
    status: str
    drifted: bool
    n_ref: int
    n_live: int
    psi: float | None = None
    threshold: Threshold | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    wasserstein: float | None = None
    mean_ref: float | None = None
    mean_live: float | None = None
    positive_share_ref: float | None = None
    positive_share_live: float | None = None
    confidence: list[dict[str, Any]] = field(default_factory=list)  # bucket, ref, live
    confidence_psi: float | None = None
    min_detectable_shift_sd: float | None = None  # see min_detectable_shift
    detection_limit: str | None = None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["threshold"] = self.threshold.to_dict() if self.threshold else None
        return _clean(d)


@dataclass
class DriftResult:
    """Everything one drift run found; `to_dict()` is drift.json."""

    route: str
    generated_at: float
    reference: dict[str, Any]
    live: dict[str, Any]
    features: list[FeatureDrift]
    predictions: list[PredictionDrift]
    share: float | None  # share of evaluated features that drift (the feature rules)
    dataset_drift: bool
    seasonal: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    dataset_share: float | None = None  # share the dataset rule counts (`dataset_rule`)

    @property
    def drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    @property
    def dataset_features(self) -> list[str]:
        """Features the dataset rule counts: the drifted ones and those in a broad shift."""
        return [f.name for f in self.features if f.dataset_counted]

    @property
    def drifted_models(self) -> list[str]:
        return [p.model for p in self.predictions if p.drifted]

    @property
    def significant(self) -> bool:
        """Worth a page: dataset drift, or any model's score distribution moved."""
        return self.dataset_drift or bool(self.drifted_models)

    @property
    def verdict(self) -> str:
        if self.share is None:
            return "INSUFFICIENT"
        return "DRIFT" if self.significant else "STABLE"

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "route": self.route,
            "generated_at": self.generated_at,
            "generated_at_iso": _iso(self.generated_at),
            "verdict": self.verdict,
            "dataset_drift": self.dataset_drift,
            "share": self.share,
            "dataset_share": self.dataset_share,
            "drifted_features": self.drifted_features,
            "dataset_features": self.dataset_features,
            "drifted_models": self.drifted_models,
            "reference": self.reference,
            "live": self.live,
            "seasonal": self.seasonal,
            "settings": self.settings,
            "features": [f.to_dict() for f in self.features],
            "predictions": [p.to_dict() for p in self.predictions],
            "notes": list(self.notes),
        })


# --------------------------------------------------------------------------------------------
# Seasonal segments and past windows
# --------------------------------------------------------------------------------------------


def segment_keys(ts: np.ndarray, mode: str, utc_offset_hours: float = 0.0) -> np.ndarray:
    """The segment of each timestamp: hour (0-23), weekday (Mon=0), weekday*24+hour, or
    weekend flag; all zeros for `none`."""
    local = np.asarray(ts, dtype=float) + utc_offset_hours * HOUR
    days = np.floor(local / DAY)
    dow = ((days + 3) % 7).astype(np.int64)  # 1970-01-01 was a Thursday (Mon = 0)
    hour = np.floor((local - days * DAY) / HOUR).astype(np.int64)
    if mode == "hour_of_day":
        return hour
    if mode == "day_of_week":
        return dow
    if mode == "day_of_week_hour":
        return dow * 24 + hour
    if mode == "weekday_weekend":
        return (dow >= 5).astype(np.int64)
    return np.zeros(local.shape, dtype=np.int64)


def period_ids(ts: np.ndarray, anchor: float, length: float) -> np.ndarray:
    """Past windows as long as the live window, aligned to its start (`anchor`)."""
    return np.floor((np.asarray(ts, dtype=float) - anchor) / length).astype(np.int64)


@dataclass
class _Null:
    """Past windows of the reference: the period id and segment key of every reference row.

    Each past window is compared with the rest of *its own* segment(s) (a past Saturday with
    the other Saturdays, a past Monday with the other Mondays), and those values, pooled over
    all windows, are the statistic's normal variation. Pooling over segments is what makes the
    estimate usable: four weeks of history hold four Saturdays but twenty-eight days.
    """

    periods: np.ndarray
    keys: np.ndarray


@dataclass
class _Plan:
    """Which reference rows face the live window, and the past windows for thresholds.

    `ref_keys` (None: no segments, every row) is the segment of each reference row and
    `live_mix` the share of live rows per segment: the reference rows that face the live
    window are those segments in the live window's proportions (`_segment_rows`)."""

    ref_keys: np.ndarray | None
    live_mix: dict[int, float]
    null: _Null | None  # None: fixed thresholds
    score_keys: dict[str, np.ndarray]
    score_null: dict[str, _Null]
    info: dict[str, Any]


def _plan(reference: FeatureData, live: FeatureData, cfg: DriftConfig,
          notes: list[str]) -> _Plan:
    mode = cfg.seasonality
    info: dict[str, Any] = {"mode": mode, "applied": False, "segments": [],
                            "adaptive": False, "utc_offset_hours": cfg.utc_offset_hours}
    ref_ts, live_ts = reference.ts, live.ts
    have_time = bool(ref_ts is not None and ref_ts.size and live_ts is not None and live_ts.size)
    ref_keys: np.ndarray | None = None
    live_mix: dict[int, float] = {}
    if mode != "none":
        if not have_time:
            notes.append(f"seasonality {mode} needs timestamps on both sides (a `ts` column in "
                         f"the reference file); compared with the whole reference instead")
        else:
            assert ref_ts is not None
            assert live_ts is not None
            keys, counts = np.unique(segment_keys(live_ts, mode, cfg.utc_offset_hours),
                                     return_counts=True)
            all_keys = segment_keys(ref_ts, mode, cfg.utc_offset_hours)
            mask = np.isin(all_keys, keys)
            if int(mask.sum()) < cfg.min_samples:
                notes.append(f"the reference has {int(mask.sum())} rows in the live window's "
                             f"{mode} segment(s) (< min_samples {cfg.min_samples}); compared "
                             f"with the whole reference instead")
            else:
                ref_keys = all_keys
                live_mix = {int(k): float(c / counts.sum()) for k, c in
                            zip(keys, counts, strict=True)}
                info.update(applied=True, segments=[_segment_name(int(k), mode) for k in keys],
                            segment_weights={_segment_name(k, mode): round(w, 4)
                                             for k, w in live_mix.items()},
                            reference_rows=int(mask.sum()))
    applied = mode if ref_keys is not None else "none"
    null: _Null | None = None
    score_keys: dict[str, np.ndarray] = {}
    score_null: dict[str, _Null] = {}
    length = _window_length(live)
    anchor = live.since if live.since is not None else (
        float(np.min(live_ts)) if live_ts is not None and live_ts.size else None)
    adaptive = bool(cfg.adaptive and have_time and length and anchor is not None)
    if adaptive:
        assert ref_ts is not None
        assert length is not None
        assert anchor is not None
        null = _Null(period_ids(ref_ts, anchor, length),
                     segment_keys(ref_ts, applied, cfg.utc_offset_hours))
        info.update(adaptive=True, period_s=length)
    elif cfg.adaptive:
        notes.append("adaptive thresholds need timestamps on both sides and a live window "
                     "length; fixed thresholds used")
    for model, sts in reference.score_ts.items():
        if ref_keys is not None:
            score_keys[model] = segment_keys(sts, mode, cfg.utc_offset_hours)
        if adaptive:
            assert length is not None
            assert anchor is not None
            score_null[model] = _Null(period_ids(sts, anchor, length),
                                      segment_keys(sts, applied, cfg.utc_offset_hours))
    return _Plan(ref_keys, live_mix, null, score_keys, score_null, info)


def _segment_rows(keys: np.ndarray | None, mix: Mapping[int, float],
                  eligible: np.ndarray | None, size: int) -> np.ndarray | None:
    """Reference rows of the live window's segments, in the live window's proportions.

    A live window from Friday 18:00 to Saturday 18:00 is 25% Friday and 75% Saturday; taking
    every Friday and Saturday row would compare it with a 50/50 mix and see the weekend
    pattern as drift. Each segment keeps `share x N` of its rows, N the largest total every
    segment can supply, picked evenly through time (deterministic; the statistics stay the
    unweighted, exact ones). `eligible` (None: all) drops rows of excluded past windows.
    None: every eligible row (no segments)."""
    if keys is None:
        return eligible
    ok = np.ones(size, dtype=bool) if eligible is None else eligible
    rows = [(w, np.flatnonzero(ok & (keys == k))) for k, w in mix.items() if w > 0]
    if any(idx.size == 0 for _, idx in rows):  # a segment with no history: the rest, unweighted
        return ok & np.isin(keys, list(mix))
    total = min(idx.size / w for w, idx in rows)
    out = np.zeros(size, dtype=bool)
    for w, idx in rows:
        take = min(idx.size, round(w * total))
        if take:
            out[idx[np.unique(np.linspace(0, idx.size - 1, take).round().astype(np.int64))]] = True
    return out


def reference_bounds(live_since: float, length: float, pinned_until: float | None = None
                     ) -> tuple[float, float]:
    """[since, until) of a log reference: the `length` before the live window, or before
    `pinned_until` while a drift episode is open — so the reference never learns the incident
    it is paging about (the pin is where the episode's first live window started)."""
    until = live_since if pinned_until is None else min(live_since, pinned_until)
    return until - length, until


def _window_length(live: FeatureData) -> float | None:
    if live.since is not None and live.until is not None and live.until > live.since:
        return float(live.until - live.since)
    if live.ts is not None and live.ts.size > 1:
        span = float(np.max(live.ts) - np.min(live.ts))
        return span if span > 0 else None
    return None


_DOW = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _segment_name(key: int, mode: str) -> str:
    if mode == "hour_of_day":
        return f"{key:02d}h"
    if mode == "day_of_week":
        return _DOW[key]
    if mode == "day_of_week_hour":
        return f"{_DOW[key // 24]} {key % 24:02d}h"
    if mode == "weekday_weekend":
        return "weekend" if key else "weekday"
    return "all"


def _robust(x: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x MAD (the SD for normal data). A few windows of an incident inside
    the reference barely move them, where one shifted day in 28 lifts mean + 3 SD a lot.
    A MAD of 0 (more than half the values equal) falls back to 1.2533 x the mean absolute
    deviation."""
    center = float(np.median(x))
    dev = np.abs(x - center)
    scale = 1.4826 * float(np.median(dev))
    if scale <= 0:
        scale = 1.2533 * float(np.mean(dev))
    return center, scale


def _adaptive(base: float, null: Sequence[float] | None, cfg: DriftConfig, *,
              sqrt_scale: bool = False, excluded: int = 0) -> Threshold:
    """max(base, median + sigma x 1.4826 MAD) of the statistic between past windows and their
    segment.

    `sqrt_scale` (PSI): the rule is applied to sqrt(PSI) and squared back. PSI behaves like
    a squared distance (a mean shift of d SDs gives about d²), so under day-to-day noise it is
    right-skewed like a chi-square; its square root, like the Jensen–Shannon distance, is close
    to half-normal. `excluded`: past windows left out because they paged (reported only).
    """
    if null is None:
        return Threshold(base)
    vals = np.asarray([v for v in null if math.isfinite(v)], dtype=float)
    if vals.size < cfg.adaptive_min_periods:
        return Threshold(base, "fixed", periods=int(vals.size), excluded=excluded)
    x = np.sqrt(np.maximum(vals, 0.0)) if sqrt_scale else vals
    center, scale = _robust(x)
    value = center + cfg.adaptive_sigma * scale
    if sqrt_scale:
        value, center = value ** 2, center ** 2
    source = "adaptive" if value > base else "fixed"
    return Threshold(max(value, base), source, center, scale, int(vals.size), excluded)


def _null_stat(codes: np.ndarray, null: _Null, nb: int,
               stat: Callable[[np.ndarray, np.ndarray], float], cfg: DriftConfig,
               exclude: Iterable[int] = ()) -> dict[int, float]:
    """`stat(rest, own)` per past window with enough rows (keyed by period id), from
    per-(window, segment, bin) counts built in one bincount. `codes` is the bin/category of
    each reference row (-1: missing); rows of `exclude`d windows take no part at all.

    `rest` is the rest of the window's own segments weighted by the window's segment mix, as
    the live window's reference is (`_segment_rows`)."""
    ok = codes >= 0
    excl = list(exclude)
    if excl:
        ok &= ~np.isin(null.periods, excl)
    if not ok.any():
        return {}
    codes = codes[ok]
    pid, pi = np.unique(null.periods[ok], return_inverse=True)
    _, ki = np.unique(null.keys[ok], return_inverse=True)
    n_p, n_k = int(pi.max()) + 1, int(ki.max()) + 1
    counts = np.bincount((pi * n_k + ki) * nb + codes,
                         minlength=n_p * n_k * nb).reshape(n_p, n_k, nb).astype(float)
    by_key = counts.sum(axis=0)
    seg_n = counts.sum(axis=2)  # [window, segment] rows
    own = counts.sum(axis=1)
    rest_k = np.where(seg_n[:, :, None] > 0, by_key[None] - counts, 0.0)
    rest_n = rest_k.sum(axis=2)
    ok_p = (own.sum(axis=1) >= cfg.min_samples) & (rest_n.sum(axis=1) >= cfg.min_samples) \
        & ~((seg_n > 0) & (rest_n <= 0)).any(axis=1)
    if not ok_p.any():
        return {}
    w = seg_n / seg_n.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(rest_n[:, :, None] > 0, rest_k / rest_n[:, :, None], 0.0)
    rest = (w[:, :, None] * shares).sum(axis=1) * rest_n.sum(axis=1, keepdims=True)
    values = np.atleast_1d(stat(rest[ok_p], own[ok_p]))
    return {int(p): float(v) for p, v in zip(pid[ok_p], values, strict=True)}


def _numeric_codes(values: np.ndarray, cfg: DriftConfig) -> tuple[np.ndarray, int]:
    """PSI bin of each reference row (-1: missing) at the whole reference's quantile edges
    (one sort per feature rather than one per window; the difference is within noise)."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    if not finite.any():
        return np.full(values.size, -1, dtype=np.int64), 1
    edges = quantile_edges(values[finite], cfg.bins)
    return np.where(finite, np.searchsorted(edges, values, side="left"), -1), edges.size + 1


def _category_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Category index of each reference row (-1: missing)."""
    values = np.asarray(values, dtype=object)
    present = _present_text(values)
    codes = np.full(values.size, -1, dtype=np.int64)
    if not present.any():
        return codes, 1
    cats, inv = np.unique(values[present].astype(str), return_inverse=True)
    codes[present] = inv
    return codes, int(cats.size)


def numeric_null(values: np.ndarray, null: _Null, cfg: DriftConfig,
                 exclude: Iterable[int] = ()) -> dict[int, float]:
    """PSI of each past window of the reference against the rest of its segment(s)."""
    codes, nb = _numeric_codes(values, cfg)
    return _null_stat(codes, null, nb, lambda a, b: psi_from_counts(a, b, cfg.epsilon), cfg,
                      exclude)


def categorical_null(values: np.ndarray, null: _Null, cfg: DriftConfig,
                     exclude: Iterable[int] = ()) -> dict[int, float]:
    """Jensen–Shannon distance of each past window against the rest of its segment(s)."""
    codes, nb = _category_codes(values)
    return _null_stat(codes, null, nb, js_distance, cfg, exclude)


def unseen_baseline(values: np.ndarray, periods: np.ndarray | None, cfg: DriftConfig
                    ) -> tuple[float, float | None, str]:
    """The reference's own rate of new values: (rate, robust SD across windows or None, how).

    With past windows: each window's share of rows whose value appears nowhere else in the
    reference (leave one window out — the live window against the reference, replayed), the
    median over windows. Without: the Good–Turing estimate of the unseen mass, the share of
    reference rows whose value occurs exactly once. A long-tail identifier (Zipf over 5,000
    ids) shows 15% new values every day; a category that never existed shows 0."""
    codes, _ = _category_codes(values)
    ok = codes >= 0
    codes = codes[ok]
    if codes.size == 0:
        return 0.0, None, "none"
    total = np.bincount(codes)
    if periods is not None:
        per = np.asarray(periods)[ok]
        pid, pi = np.unique(per, return_inverse=True)
        pair = pi.astype(np.int64) * (int(total.size) + 1) + codes
        _, pinv, pcount = np.unique(pair, return_inverse=True, return_counts=True)
        only_here = pcount[pinv] == total[codes]
        n_p = np.bincount(pi, minlength=pid.size)
        shares = np.bincount(pi, weights=only_here, minlength=pid.size)[n_p >= cfg.min_samples]
        shares = shares / n_p[n_p >= cfg.min_samples]
        if shares.size >= cfg.adaptive_min_periods:
            center, scale = _robust(shares)
            return center, scale, f"median over {shares.size} past windows"
    return float((total == 1).sum() / codes.size), None, "Good-Turing (reference singletons)"


# --------------------------------------------------------------------------------------------
# Per-feature comparison
# --------------------------------------------------------------------------------------------


def _missing_check(f: FeatureDrift, n_ref: int, present_ref: int, n_live: int,
                   present_live: int, cfg: DriftConfig) -> None:
    """Missing-value drift: the share of missing/non-finite values against the reference.

    Its own rule, because every other statistic runs on the values that are present: a feature
    that goes 89% NaN keeps a perfectly normal-looking remainder. Drift when the share moved by
    at least `missing_alert` and a chi-squared test on (present, missing) x (reference, live)
    gives p < `chi2_alpha`."""
    if n_ref < cfg.min_samples or n_live < cfg.min_samples:
        return
    _, p, _ = chi_squared(np.array([present_ref, n_ref - present_ref]),
                          np.array([present_live, n_live - present_live]))
    f.missing_pvalue = p
    pooled = min(max((n_ref + n_live - present_ref - present_live) / (n_ref + n_live),
                     1.0 / (n_ref + n_live)), 0.5)
    noise = float(stats.norm.isf(cfg.chi2_alpha / 2)) * math.sqrt(
        pooled * (1 - pooled) * (1 / n_ref + 1 / n_live))
    f.min_detectable_missing_change = max(cfg.missing_alert, noise)
    change = f.missing_live - f.missing_ref
    if abs(change) >= cfg.missing_alert and p < cfg.chi2_alpha:
        f.drifted = True
        f.rules.append("missing")
        f.reasons.append(f"missing values {f.missing_ref:.1%} -> {f.missing_live:.1%} "
                         f"(|change| >= {cfg.missing_alert:.0%}, chi-squared p {p:.2g} < "
                         f"{cfg.chi2_alpha:g})")


def min_detectable_shift(reference: np.ndarray, n_live: int, psi_threshold: float,
                         cfg: DriftConfig, max_sd: float = 10.0) -> tuple[float | None, str]:
    """The smallest mean shift, in reference SDs, this feature's rule flags about half the
    time at the current sample sizes, and what limits it.

    Both parts of the rule must pass: the reference shifted by d SDs must reach the PSI
    threshold (its expected noise PSI, (bins - 1)(1/n_ref + 1/n_live), added) and a KS
    statistic past the level-`ks_alpha` critical value for these n. Computed on the reference's
    own distribution (4,000 interpolated quantiles). The larger of the two is the answer; with
    a large n the PSI threshold binds (a 0.2 PSI needs about 0.45 SD whatever n is)."""
    r = np.sort(_finite(reference))
    n_ref = r.size
    sd = float(r.std(ddof=1)) if n_ref > 1 else 0.0
    if n_ref < 2 or n_live < 1 or sd <= 0:
        return None, "the reference has no spread"
    edges = quantile_edges(r, cfg.bins)
    # 4,000 linearly interpolated quantiles (r is sorted: no partition needed) stand in for
    # the reference in the PSI part.
    sample = np.interp(np.linspace(0, n_ref - 1, 4000), np.arange(n_ref), r)
    base = bin_counts(sample, edges)
    noise = edges.size * (1 / n_ref + 1 / n_live)
    d_crit = math.sqrt(-math.log(cfg.ks_alpha / 2) / 2 * (n_ref + n_live) / (n_ref * n_live))
    # KS distance of a shift: on a kernel-smoothed reference CDF (Silverman bandwidth; a
    # histogram on 2,048 points convolved with the kernel), since the raw sample's own jumps
    # overstate it for small reference windows.
    iqr = float(r[int(0.75 * (n_ref - 1))] - r[int(0.25 * (n_ref - 1))])
    h = 0.9 * (min(sd, iqr / 1.34) if iqr > 0 else sd) * n_ref ** -0.2
    grid = np.linspace(r[0] - 4 * h, r[-1] + 4 * h, 2048)
    step = float(grid[1] - grid[0])
    hist = np.bincount(np.clip(np.searchsorted(grid, r), 0, grid.size - 1),
                       minlength=grid.size).astype(float)
    half = max(1, math.ceil(4 * h / step))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * step / h) ** 2)
    smooth = np.convolve(hist, kernel / kernel.sum(), mode="same")
    cdf = np.cumsum(smooth) / smooth.sum()

    def psi_at(d: float) -> float:
        return psi_from_counts(base, bin_counts(sample + d * sd, edges), cfg.epsilon) + noise

    def ks_at(d: float) -> float:
        return float(np.max(cdf - np.interp(grid - d * sd, grid, cdf, left=0.0, right=1.0)))

    def solve(fn: Callable[[float], float], target: float) -> float | None:
        if fn(0.0) >= target:
            return 0.0
        if fn(max_sd) < target:
            return None
        lo, hi = 0.0, max_sd
        for _ in range(20):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if fn(mid) >= target else (mid, hi)
        return hi

    d_psi, d_ks = solve(psi_at, psi_threshold), solve(ks_at, d_crit)
    if d_psi is None or d_ks is None:
        return None, f"no shift up to {max_sd:g} SD reaches the rule"
    if d_psi >= d_ks:
        return d_psi, f"PSI threshold {psi_threshold:.3f}"
    return d_ks, f"sample size (KS at n_ref {n_ref}, n_live {n_live})"


def _explain(f: FeatureDrift, cfg: DriftConfig) -> None:
    """`why`: one sentence on why the feature was or was not flagged and what it can see."""
    thr = f.threshold
    if f.status == "insufficient" and not f.drifted:
        f.why = "not judged: " + "; ".join(f.reasons)
        return
    parts: list[str] = []
    if f.drifted:
        parts.append("flagged by " + ", ".join(f.rules) + ": " + "; ".join(f.reasons))
    else:
        if f.kind == "numeric" and f.psi is not None and thr is not None:
            ks = f"KS p {f.ks_pvalue:.2g}" if f.ks_pvalue is not None else "KS -"
            parts.append(f"not flagged: PSI {f.psi:.3f} vs threshold {thr.value:.3f} "
                         f"({thr.source}), {ks} vs {cfg.ks_alpha:g}")
        elif f.kind == "categorical" and f.js_distance is not None and thr is not None:
            parts.append(f"not flagged: JS {f.js_distance:.3f} vs {thr.value:.3f} "
                         f"({thr.source}), unseen {f.unseen_share:.1%} vs "
                         f"{_f(f.unseen_threshold, '.1%')} needed")
        parts.append(f"missing {f.missing_ref:.1%} -> {f.missing_live:.1%}")
    if f.min_detectable_shift_sd is not None:
        parts.append(f"smallest shift it flags about half the time: "
                     f"{f.min_detectable_shift_sd:.2f} SD (limited by {f.detection_limit})")
    elif f.detection_limit:
        parts.append(f"detection limit: {f.detection_limit}")
    if thr is not None and thr.excluded:
        parts.append(f"{thr.excluded} past window(s) that paged left out of the reference")
    f.why = "; ".join(parts)


def _status_numeric(f: FeatureDrift, cfg: DriftConfig) -> None:
    thr = f.threshold.value if f.threshold else cfg.psi_alert
    p_ok = f.ks_pvalue is not None and f.ks_pvalue < cfg.ks_alpha
    value = f.psi if f.psi is not None else 0.0
    if value >= thr and p_ok:
        f.drifted = True
        f.rules.append("distribution")
        source = f.threshold.source if f.threshold else "fixed"
        f.reasons.append(f"PSI {value:.3f} >= {thr:.3f} ({source}) "
                         f"and KS p {f.ks_pvalue:.2g} < {cfg.ks_alpha:g}")
    elif value >= min(cfg.psi_warn, thr):
        f.status = "warn"
        f.reasons.append(f"PSI {value:.3f} >= {cfg.psi_warn:g} (investigate)"
                         + ("" if p_ok else f"; KS p {f.ks_pvalue:.2g} not significant"))


def numeric_drift(name: str, ref: np.ndarray, live: np.ndarray, cfg: DriftConfig,
                  null: Sequence[float] | None = None, *, excluded: int = 0) -> FeatureDrift:
    """PSI, KS, Wasserstein, mean/SD shift and missing share of one numeric feature.

    `null`: the PSI of past reference windows against their segment (`numeric_null`), for an
    adaptive threshold; None keeps `psi_alert`. `excluded`: past windows left out (reported)."""
    ref_all = np.asarray(ref, dtype=float)
    live_all = np.asarray(live, dtype=float)
    r, c = _finite(ref_all), _finite(live_all)
    f = FeatureDrift(name=name, kind="numeric", status="ok", drifted=False,
                     n_ref=int(r.size), n_live=int(c.size),
                     missing_ref=_missing_share(ref_all.size, r.size),
                     missing_live=_missing_share(live_all.size, c.size))
    _missing_check(f, ref_all.size, r.size, live_all.size, c.size, cfg)
    if r.size < cfg.min_samples or c.size < cfg.min_samples:
        f.status = "drift" if f.drifted else "insufficient"
        f.reasons.append(f"{r.size} reference / {c.size} live values (< min_samples "
                         f"{cfg.min_samples})")
        _explain(f, cfg)
        return f
    edges = quantile_edges(r, cfg.bins)
    f.psi = psi_from_counts(bin_counts(r, edges), bin_counts(c, edges), cfg.epsilon)
    f.ks_statistic, f.ks_pvalue = ks_test(r, c)
    f.wasserstein = wasserstein(r, c)
    f.mean_ref, f.mean_live = float(r.mean()), float(c.mean())
    f.std_ref, f.std_live = float(r.std(ddof=1)), float(c.std(ddof=1))
    if f.std_ref > 0:
        f.wasserstein_norm = f.wasserstein / f.std_ref
        f.mean_shift_sd = (f.mean_live - f.mean_ref) / f.std_ref
        f.std_ratio = f.std_live / f.std_ref
    f.threshold = _adaptive(cfg.psi_alert, null, cfg, sqrt_scale=True, excluded=excluded)
    f.dataset_floor = _adaptive(_dataset_base(cfg.psi_alert, True, cfg), null, cfg,
                                sqrt_scale=True, excluded=excluded)
    _status_numeric(f, cfg)
    f.min_detectable_shift_sd, f.detection_limit = min_detectable_shift(
        r, int(c.size), f.threshold.value, cfg)
    if f.drifted:
        f.status = "drift"
    _explain(f, cfg)
    return f


def _missing_share(total: int, present: int) -> float:
    return float((total - present) / total) if total else 0.0


def _present_text(col: np.ndarray) -> np.ndarray:
    mask = np.fromiter((v is not None for v in col), dtype=bool, count=col.size)
    return mask


def categorical_drift(name: str, ref: np.ndarray, live: np.ndarray, cfg: DriftConfig,
                      null: Sequence[float] | None = None, *,
                      history: np.ndarray | None = None, periods: np.ndarray | None = None,
                      excluded: int = 0) -> FeatureDrift:
    """Chi-squared, Jensen–Shannon, PSI on categories, unseen categories and the missing share
    of one feature.

    `ref`: the reference rows facing the live window (its segments). `history` (default `ref`)
    is the whole reference: a value is *unseen* when the reference never had it, on any day,
    and the unseen share is judged against the reference's own rate of new values
    (`unseen_baseline`, leave-one-window-out over `periods` when given, else Good–Turing):
    drift when it exceeds that rate by at least `unseen_alert`, a binomial test gives
    p < `chi2_alpha`, and (with past windows) it is above median + sigma x robust SD of their
    shares. `null`: JS distances of past reference windows (`categorical_null`) for an
    adaptive threshold; None keeps `js_alert`."""
    ref = np.asarray(ref, dtype=object)
    live = np.asarray(live, dtype=object)
    hist = ref if history is None else np.asarray(history, dtype=object)
    rmask, lmask = _present_text(ref), _present_text(live)
    r, c = ref[rmask].astype(str), live[lmask].astype(str)
    f = FeatureDrift(name=name, kind="categorical", status="ok", drifted=False,
                     n_ref=int(r.size), n_live=int(c.size),
                     missing_ref=_missing_share(ref.size, r.size),
                     missing_live=_missing_share(live.size, c.size))
    _missing_check(f, ref.size, r.size, live.size, c.size, cfg)
    if r.size < cfg.min_samples or c.size < cfg.min_samples:
        f.status = "drift" if f.drifted else "insufficient"
        f.reasons.append(f"{r.size} reference / {c.size} live values (< min_samples "
                         f"{cfg.min_samples})")
        _explain(f, cfg)
        return f
    ref_cats, ref_n = np.unique(r, return_counts=True)
    live_cats, live_n = np.unique(c, return_counts=True)
    known = set(ref_cats.tolist())
    ever = known | set(hist[_present_text(hist)].astype(str).tolist())
    unseen = {str(k): int(n) for k, n in zip(live_cats, live_n, strict=True) if k not in ever}
    f.unseen_share = sum(unseen.values()) / c.size
    f.unseen = dict(sorted(unseen.items(), key=lambda kv: -kv[1])[:10])
    # Categories: the reference's most frequent (max_categories - 1), the rest as "(other)";
    # a live category new to these segments keeps its own column when it has >= 5 rows (the
    # chi-squared rule of thumb), else it joins "(other)": a long tail of one-off identifiers
    # must not look like a distribution shift.
    novel = {str(k): int(n) for k, n in zip(live_cats, live_n, strict=True) if k not in known}
    order = np.argsort(-ref_n, kind="stable")
    keep = [str(x) for x in ref_cats[order][: cfg.max_categories - 1]]
    heavy = [k for k in sorted(novel, key=lambda k: -novel[k]) if novel[k] >= 5]
    heavy = heavy[: cfg.max_categories]
    cats = keep + ([OTHER] if len(ref_cats) > len(keep) or len(heavy) < len(novel) else [])
    cats += heavy
    index = {k: i for i, k in enumerate(cats)}
    other = index.get(OTHER, -1)
    ref_codes = np.fromiter((index.get(v, other) for v in r), dtype=np.int64, count=r.size)
    live_codes = np.fromiter((index.get(v, other) for v in c), dtype=np.int64, count=c.size)
    k = len(cats)
    rc = np.bincount(ref_codes, minlength=k)
    lc = np.bincount(live_codes, minlength=k)
    f.chi2, f.chi2_pvalue, f.chi2_dof = chi_squared(rc, lc)
    f.js_distance = js_distance(rc, lc)
    f.psi = psi_from_counts(rc, lc, cfg.epsilon)
    top = np.argsort(-(rc / rc.sum() + lc / lc.sum()), kind="stable")[:20]
    f.shares = {cats[i]: [float(rc[i] / rc.sum()), float(lc[i] / lc.sum())] for i in top}
    f.threshold = _adaptive(cfg.js_alert, null, cfg, excluded=excluded)
    f.dataset_floor = _adaptive(_dataset_base(cfg.js_alert, False, cfg), null, cfg,
                                excluded=excluded)
    thr = f.threshold.value
    rate, spread, how = unseen_baseline(hist, periods, cfg)
    f.unseen_baseline, f.unseen_baseline_source = rate, how
    n_unseen = sum(unseen.values())
    f.unseen_pvalue = float(stats.binom.sf(n_unseen - 1, c.size, rate)) if rate > 0 else (
        0.0 if n_unseen else 1.0)
    crit = float(stats.binom.isf(cfg.chi2_alpha, c.size, rate)) / c.size if rate > 0 else 0.0
    f.unseen_threshold = max(rate + cfg.unseen_alert, crit + 1.0 / c.size,
                             rate + cfg.adaptive_sigma * spread if spread is not None else 0.0)
    if f.unseen_share >= f.unseen_threshold and f.unseen_pvalue < cfg.chi2_alpha:
        f.drifted = True
        f.rules.append("unseen")
        f.reasons.append(f"{f.unseen_share:.1%} of live rows in {len(unseen)} unseen "
                         f"categor{'y' if len(unseen) == 1 else 'ies'} "
                         f"({', '.join(list(f.unseen)[:3])}); the reference's own rate of new "
                         f"values is {rate:.1%} ({how}), flagged from "
                         f"{f.unseen_threshold:.1%}, binomial p {f.unseen_pvalue:.2g}")
    if f.js_distance >= thr and f.chi2_pvalue < cfg.chi2_alpha:
        f.drifted = True
        f.rules.append("distribution")
        f.reasons.append(f"JS distance {f.js_distance:.3f} >= {thr:.3f} "
                         f"({f.threshold.source}) and chi-squared p {f.chi2_pvalue:.2g} < "
                         f"{cfg.chi2_alpha:g}")
    elif not f.drifted and (f.psi >= cfg.psi_warn or f.js_distance >= 0.5 * thr):
        f.status = "warn"
        f.reasons.append(f"category shares moved (JS {f.js_distance:.3f}, PSI {f.psi:.3f})")
    if f.drifted:
        f.status = "drift"
    f.detection_limit = (f"JS distance {thr:.3f} with chi-squared p < {cfg.chi2_alpha:g}; "
                         f"unseen share {f.unseen_threshold:.1%}")
    _explain(f, cfg)
    return f


# --------------------------------------------------------------------------------------------
# Prediction drift
# --------------------------------------------------------------------------------------------


def _bucket_labels(edges: Sequence[float]) -> list[str]:
    bounds = [*edges, 1.0]
    return [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(bounds)]


def confidence_shares(scores: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Shares of max(p, 1 - p) in buckets [e0, e1), ..., [e_last, 1]."""
    conf = np.maximum(scores, 1.0 - scores)
    idx = np.clip(np.searchsorted(np.asarray(edges), conf, side="right") - 1, 0, len(edges) - 1)
    counts = np.bincount(idx, minlength=len(edges)).astype(float)
    return counts / max(counts.sum(), 1.0)


def prediction_drift(model: str, role: str, ref: np.ndarray, live: np.ndarray,
                     cfg: DriftConfig, threshold: float = 0.5,
                     null: Sequence[float] | None = None, *, excluded: int = 0
                     ) -> PredictionDrift:
    """Score distribution, predicted-positive share and confidence buckets of one model."""
    r, c = _finite(ref), _finite(live)
    p = PredictionDrift(model=model, role=role, status="ok", drifted=False,
                        n_ref=int(r.size), n_live=int(c.size))
    if r.size < cfg.min_samples or c.size < cfg.min_samples:
        p.status = "insufficient"
        p.reasons.append(f"{r.size} reference / {c.size} live scores (< min_samples "
                         f"{cfg.min_samples})")
        return p
    edges = quantile_edges(r, cfg.bins)
    p.psi = psi_from_counts(bin_counts(r, edges), bin_counts(c, edges), cfg.epsilon)
    p.ks_statistic, p.ks_pvalue = ks_test(r, c)
    p.wasserstein = wasserstein(r, c)
    p.mean_ref, p.mean_live = float(r.mean()), float(c.mean())
    p.threshold = _adaptive(cfg.psi_alert, null, cfg, sqrt_scale=True, excluded=excluded)
    p.min_detectable_shift_sd, p.detection_limit = min_detectable_shift(
        r, int(c.size), p.threshold.value, cfg)
    if r.min() >= 0.0 and r.max() <= 1.0 and c.min() >= 0.0 and c.max() <= 1.0:
        p.positive_share_ref = float((r >= threshold).mean())
        p.positive_share_live = float((c >= threshold).mean())
        ref_b = confidence_shares(r, cfg.confidence_buckets)
        live_b = confidence_shares(c, cfg.confidence_buckets)
        p.confidence = [{"bucket": b, "ref": float(x), "live": float(y)} for b, x, y in
                        zip(_bucket_labels(cfg.confidence_buckets), ref_b, live_b, strict=True)]
        p.confidence_psi = psi_from_counts(ref_b, live_b, cfg.epsilon)
    else:
        p.reasons.append("scores outside [0, 1]: no class or confidence shares (regression?)")
    thr = p.threshold.value
    p_ok = p.ks_pvalue < cfg.ks_alpha
    if p.psi >= thr and p_ok:
        p.status, p.drifted = "drift", True
        p.reasons.insert(0, f"score PSI {p.psi:.3f} >= {thr:.3f} ({p.threshold.source}) and "
                            f"KS p {p.ks_pvalue:.2g} < {cfg.ks_alpha:g}")
    elif p.psi >= min(cfg.psi_warn, thr):
        p.status = "warn"
        p.reasons.insert(0, f"score PSI {p.psi:.3f} >= {cfg.psi_warn:g} (investigate)")
    if p.positive_share_ref is not None and p.positive_share_live is not None:
        p.reasons.append(f"predicted positive {p.positive_share_ref:.1%} -> "
                         f"{p.positive_share_live:.1%}")
    return p


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def _check_types(reference: FeatureData, live: FeatureData, cfg: DriftConfig
                 ) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """(kind, reference column, live column) per live feature; raises on a bad reference."""
    missing = [n for n in live.columns if n not in reference.columns]
    if missing:
        raise MissingFeaturesError(
            f"reference ({reference.source}) lacks feature(s) {', '.join(missing)} that the live "
            f"window has; reference features: {', '.join(reference.columns) or 'none'}. Use a "
            f"reference with the same features (check features.names in the config)", missing)
    out: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    forced = set(cfg.categorical)
    for name, col in live.columns.items():
        ref = reference.columns[name]
        live_numeric = _is_numeric(col) and name not in forced
        if live_numeric:
            if not _is_numeric(ref):
                row, bad = _first_text(ref)
                raise FeatureTypeError(
                    f"feature {name!r} is numeric in the live window but the reference "
                    f"({reference.source}) holds text ({bad!r} in data row {row}); fix the "
                    f"reference or list it in drift.categorical", name)
            out[name] = ("numeric", ref.astype(float), col.astype(float))
        else:
            out[name] = ("categorical", _as_text(ref, reference.raw_text.get(name)),
                         _as_text(col, None))
    return out


def _first_text(col: np.ndarray) -> tuple[int, Any]:
    """(1-based row, value) of the first value that is not a number."""
    for i, v in enumerate(col, start=1):
        if v is None:
            continue
        try:
            float(v)
        except (TypeError, ValueError):
            return i, v
    return 0, None


def _as_text(col: np.ndarray, raw: np.ndarray | None) -> np.ndarray:
    if raw is not None:
        return raw
    if col.dtype == object:
        return col
    return _obj([None if not math.isfinite(v) else _category(float(v)) for v in col.tolist()])


def _feature_codes(kind: str, col: np.ndarray, cfg: DriftConfig
                   ) -> tuple[np.ndarray, int, Callable[[np.ndarray, np.ndarray], float], float,
                              bool]:
    """(codes, n codes, statistic, fixed threshold, sqrt scale) of a feature's null."""
    if kind == "numeric":
        codes, nb = _numeric_codes(col, cfg)
        return codes, nb, lambda a, b: psi_from_counts(a, b, cfg.epsilon), cfg.psi_alert, True
    codes, nb = _category_codes(col)
    return codes, nb, js_distance, cfg.js_alert, False


def _dataset_base(base: float, sqrt_scale: bool, cfg: DriftConfig) -> float:
    """The dataset rule's fixed effect floor for a feature whose own rule needs `base`.

    PSI: `psi_warn` (0.1, the "investigate" convention) where a feature alone needs
    `psi_alert` (0.2). JS distance scales like the square root of PSI, so its floor is
    `js_alert` x sqrt(psi_warn / psi_alert): the same relative step down."""
    ratio = min(cfg.psi_warn / cfg.psi_alert, 1.0) if cfg.psi_alert > 0 else 1.0
    return base * (ratio if sqrt_scale else math.sqrt(ratio))


def dataset_rule(features: Sequence[FeatureDrift], cfg: DriftConfig) -> float | None:
    """The share of evaluated features the dataset rule counts (None: none evaluated); sets
    each feature's `dataset_qvalue` and `dataset_counted`.

    Why a rule of its own: a broad shift moves many features a little, and one feature's
    flag (PSI >= 0.2, about 0.45 SD) then lands on either side of its floor day by day, so
    "30% of the features flagged" pages on some days of a 0.5 SD shift and not others. A
    feature counts when it drifts, or when its distribution test (KS numeric, chi-squared
    categorical) survives a Benjamini–Hochberg correction across the features at the feature
    rule's own alpha *and* its effect reaches `dataset_floor` (PSI >= 0.1, or the adaptive
    bar from the feature's past windows on that base; JS likewise). BH controls the expected
    share of false features among those counted, the quantity the share rule is about; the
    effect floor keeps a huge n from counting shifts nobody cares about."""
    evaluated = [f for f in features if f.status != "insufficient"]
    if not evaluated:
        return None
    tested = [f for f in evaluated if f.dataset_floor is not None and
              (f.ks_pvalue if f.kind == "numeric" else f.chi2_pvalue) is not None]
    if tested:
        pvals = np.asarray([f.ks_pvalue if f.kind == "numeric" else f.chi2_pvalue
                            for f in tested], dtype=float)
        qvals = stats.false_discovery_control(np.clip(pvals, 0.0, 1.0), method="bh")
        for f, q in zip(tested, qvals, strict=True):
            assert f.dataset_floor is not None
            f.dataset_qvalue = float(q)
            alpha = cfg.ks_alpha if f.kind == "numeric" else cfg.chi2_alpha
            effect = f.psi if f.kind == "numeric" else f.js_distance
            f.dataset_counted = bool(q < alpha and effect is not None
                                     and effect >= f.dataset_floor.value)
    for f in evaluated:
        f.dataset_counted = f.dataset_counted or f.drifted
        if f.dataset_counted and not f.drifted:
            stat = "PSI" if f.kind == "numeric" else "JS"
            effect = f.psi if f.kind == "numeric" else f.js_distance
            assert f.dataset_floor is not None
            f.why += (f"; counted by the dataset rule: {stat} {effect:.3f} >= "
                      f"{f.dataset_floor.value:.3f} and BH q {f.dataset_qvalue:.2g}")
    return sum(f.dataset_counted for f in evaluated) / len(evaluated)


def _paged_windows(feature_nulls: Mapping[str, Mapping[int, float]],
                   score_nulls: Mapping[str, Mapping[int, float]],
                   bases: Mapping[str, tuple[float, bool]], n_features: int, cfg: DriftConfig
                   ) -> tuple[set[int], dict[str, set[int]]]:
    """Past windows that would have paged, and per feature/model the windows it was flagged in.

    A first pass of thresholds from every past window; a window pages when the share of
    features whose statistic reaches its dataset floor (`_dataset_base`, adaptive) reaches
    `drift_share`, or any model's score PSI passes its own threshold (the run's rules, on the
    PSI/JS part alone). Those windows are an incident, not normal variation: they leave the
    null and the reference rows, so a shift that has lasted a few days cannot raise the bar
    that should catch it."""
    flagged: dict[str, set[int]] = {}
    broad: dict[str, set[int]] = {}
    for name, vals in (*feature_nulls.items(), *score_nulls.items()):
        base, sq = bases[name]
        null = list(vals.values())
        thr = _adaptive(base, null, cfg, sqrt_scale=sq)
        enough = thr.periods >= cfg.adaptive_min_periods
        flagged[name] = {p for p, v in vals.items() if v >= thr.value} if enough else set()
        if name in feature_nulls:
            floor = _adaptive(_dataset_base(base, sq, cfg), null, cfg, sqrt_scale=sq)
            broad[name] = {p for p, v in vals.items() if v >= floor.value} if enough else set()
    periods = set().union(*(set(v) for v in feature_nulls.values()), set())
    paged = {p for p in periods if n_features and
             sum(p in broad[n] for n in feature_nulls) / n_features >= cfg.drift_share}
    for model in score_nulls:
        paged |= flagged[model]
    return paged, flagged


def compute_drift(reference: FeatureData, live: FeatureData, cfg: DriftConfig, *, route: str,
                  threshold: float = 0.5, now: float | None = None) -> DriftResult:
    """Compare the live window with the reference, per feature and per model.

    Raises EmptyWindowError when the live window is empty, EmptyReferenceError when the
    reference is, MissingFeaturesError / FeatureTypeError when they do not line up.
    """
    if len(live) == 0:
        raise EmptyWindowError(f"route {route!r}: no predictions in the live window "
                               f"({live.source})")
    if len(reference) == 0:
        raise EmptyReferenceError(f"reference ({reference.source}) has no rows")
    notes: list[str] = []
    typed = _check_types(reference, live, cfg)
    plan = _plan(reference, live, cfg, notes)
    n_ref = len(reference)

    # Past windows: a first pass finds those that paged; they leave the null and the reference.
    prepared = {name: _feature_codes(kind, ref_col, cfg)
                for name, (kind, ref_col, _) in typed.items()}
    score_models = [m for m in reference.scores if m in plan.score_null
                    and plan.score_null[m].periods.size == reference.scores[m].size]
    excluded: dict[str, set[int]] = {}
    f_null: dict[str, dict[int, float]] = {}
    if plan.null is not None:
        f_null = {n: _null_stat(c, plan.null, nb, st, cfg)
                  for n, (c, nb, st, _, _) in prepared.items()}
        s_codes = {m: _numeric_codes(reference.scores[m], cfg) for m in score_models}
        s_null = {m: _null_stat(c, plan.score_null[m], nb,
                                lambda a, b: psi_from_counts(a, b, cfg.epsilon), cfg)
                  for m, (c, nb) in s_codes.items()}
        bases = {n: (p[3], p[4]) for n, p in prepared.items()}
        bases.update({m: (cfg.psi_alert, True) for m in score_models})
        paged, flagged = _paged_windows(f_null, s_null, bases, len(prepared), cfg)
        excluded = {n: paged | flagged[n] for n in (*prepared, *score_models)}
        if paged:
            plan.info["paged_windows_excluded"] = len(paged)
            notes.append(f"{len(paged)} past window(s) of the reference would have paged; "
                         f"left out of the reference and of the adaptive thresholds")

    features: list[FeatureDrift] = []
    for name, (kind, ref_col, live_col) in typed.items():
        excl = excluded.get(name, set())
        eligible = ~np.isin(plan.null.periods, list(excl)) \
            if plan.null is not None and excl else None
        rows = _segment_rows(plan.ref_keys, plan.live_mix, eligible, n_ref)
        ref_sel = ref_col if rows is None else ref_col[rows]
        null = None
        if plan.null is not None:
            codes, nb, stat, _, _ = prepared[name]
            null = list((_null_stat(codes, plan.null, nb, stat, cfg, excl) if excl
                         else f_null[name]).values())
        if kind == "numeric":
            features.append(numeric_drift(name, ref_sel, live_col, cfg, null,
                                          excluded=len(excl)))
        else:
            hist = ref_col if eligible is None else ref_col[eligible]
            periods = None
            if plan.null is not None:
                periods = plan.null.periods if eligible is None else plan.null.periods[eligible]
            features.append(categorical_drift(name, ref_sel, live_col, cfg, null, history=hist,
                                              periods=periods, excluded=len(excl)))
    if plan.null is not None:
        used = [f.threshold.periods for f in features if f.threshold is not None]
        if used and max(used) < cfg.adaptive_min_periods:
            notes.append(f"adaptive thresholds: the reference holds {max(used)} usable past "
                         f"window(s) as long as the live one (need "
                         f"{cfg.adaptive_min_periods}, each with min_samples rows and the "
                         f"rest of its segment to compare with); fixed thresholds used")
    for name in reference.columns:
        if name not in live.columns:
            absent = FeatureDrift(
                name=name, kind="numeric" if _is_numeric(reference.columns[name]) else
                "categorical", status="missing", drifted=True, n_ref=len(reference), n_live=0,
                missing_ref=0.0, missing_live=1.0, rules=["absent"],
                reasons=["in the reference but absent from the live window"])
            absent.why = "flagged: in the reference but absent from the live window"
            features.append(absent)

    evaluated = [f for f in features if f.status != "insufficient"]
    share = (sum(f.drifted for f in evaluated) / len(evaluated)) if evaluated else None
    dataset_share = dataset_rule(features, cfg)
    dataset_drift = dataset_share is not None and dataset_share >= cfg.drift_share
    if share is None:
        notes.append(f"no feature has min_samples ({cfg.min_samples}) values on both sides")

    predictions: list[PredictionDrift] = []
    for model in sorted(live.scores, key=lambda m: (live.roles.get(m) != "champion", m)):
        key = model if model in reference.scores else ALL_MODELS
        role = live.roles.get(model, "unknown")
        if key not in reference.scores:
            notes.append(f"no reference scores for model {model}: prediction drift skipped")
            continue
        all_scores = reference.scores[key]
        excl = excluded.get(key, set())
        score_null = plan.score_null.get(key) if key in score_models else None
        eligible = ~np.isin(score_null.periods, list(excl)) \
            if score_null is not None and excl else None
        keys = plan.score_keys.get(key)
        if keys is not None and keys.size != all_scores.size:
            keys = None
        rows = _segment_rows(keys, plan.live_mix, eligible, all_scores.size) \
            if keys is not None else eligible
        ref_scores = all_scores if rows is None else all_scores[rows]
        null = list(numeric_null(all_scores, score_null, cfg, excl).values()) \
            if score_null is not None else None
        predictions.append(prediction_drift(model, role, ref_scores, live.scores[model], cfg,
                                            threshold, null, excluded=len(excl)))

    settings = {k: getattr(cfg, k) for k in (
        "bins", "epsilon", "psi_warn", "psi_alert", "ks_alpha", "chi2_alpha", "js_alert",
        "unseen_alert", "missing_alert", "drift_share", "min_samples", "seasonality",
        "adaptive", "adaptive_sigma", "adaptive_min_periods")}
    settings["categorical"] = list(cfg.categorical)
    settings["classification_threshold"] = threshold
    return DriftResult(route=route, generated_at=time.time() if now is None else now,
                       reference=reference.describe(), live=live.describe(), features=features,
                       predictions=predictions, share=share, dataset_drift=dataset_drift,
                       seasonal=plan.info, settings=settings, notes=notes,
                       dataset_share=dataset_share)


@dataclass(frozen=True)
class Windows:
    """The live window [since, until) and the reference: a file or a past window of the log."""

    live_since: float | None
    live_until: float | None
    ref_since: float | None = None
    ref_until: float | None = None
    reference_path: str | None = None


def plan_windows(store: Any, route: str, cfg: DriftConfig, *, reference_path: str | None,
                 reference_window: float | None = None, window: float | None = None,
                 pinned_until: float | None = None) -> Windows:
    """Live window ending at the route's newest inference; the log reference right before it,
    or before `pinned_until` while a drift episode is open (`reference_bounds`)."""
    span = store.time_range(route)
    if span is None:
        known = ", ".join(store.routes()) or "none (nothing ingested yet)"
        raise EmptyWindowError(f"route {route!r}: no inferences in the store; routes: {known}")
    length = window or cfg.window
    until = span[1] + 1e-6  # half-open windows: keep the newest inference
    since = until - length
    if reference_path:
        return Windows(since, until, reference_path=reference_path)
    ref_since, ref_until = reference_bounds(since, reference_window or cfg.reference_window,
                                            pinned_until)
    return Windows(since, until, ref_since, ref_until)


def drift_for_route(store: Any, config: EvaluatorConfig, route: str, windows: Windows,
                    cfg: DriftConfig | None = None, now: float | None = None) -> DriftResult:
    """Read both sides from the store (and the reference file) and compare them."""
    cfg = cfg or config.drift
    names = dict(config.features)
    score_note: str | None = None
    live = window_data(store, route, windows.live_since, windows.live_until, names=names)
    if windows.reference_path:
        reference = load_reference(windows.reference_path, categorical=cfg.categorical,
                                   names=names)
        if not reference.scores:
            # Prediction drift against the log just before the live window, when it has one.
            past = window_data(store, route, windows.live_since - cfg.reference_window,
                               windows.live_since, names=names) \
                if windows.live_since is not None else None
            if past is not None and past.scores:
                reference.scores, reference.score_ts = past.scores, past.score_ts
                score_note = (f"prediction drift: {reference.source} has no score columns; "
                              f"scores compared with {past.source}")
    else:
        reference = window_data(store, route, windows.ref_since, windows.ref_until, names=names)
        if len(reference) == 0:
            raise EmptyReferenceError(
                f"route {route!r}: the reference window {reference.source} holds no "
                f"predictions; use a longer --reference-window or a --reference file")
    route_cfg = config.route(route)
    result = compute_drift(reference, live, cfg, route=route, threshold=route_cfg.threshold,
                           now=now)
    if score_note:
        result.notes.append(score_note)
    return result


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _as_dict(result: DriftResult | Mapping[str, Any]) -> dict[str, Any]:
    return result.to_dict() if isinstance(result, DriftResult) else dict(result)


def drift_section(result: DriftResult | Mapping[str, Any]) -> dict[str, Any]:
    """The drift part of a report, JSON-safe (a DriftResult or a loaded drift.json).

    `drift_markdown(drift_section(r))` renders the same as `drift_markdown(r)`."""
    d = _as_dict(result)
    return {
        "route": d.get("route"),
        "verdict": d.get("verdict"),
        "dataset_drift": d.get("dataset_drift"),
        "share": d.get("share"),
        "dataset_share": d.get("dataset_share"),
        "drift_share_threshold": (d.get("settings") or {}).get("drift_share"),
        "drifted_features": d.get("drifted_features", []),
        "dataset_features": d.get("dataset_features", []),
        "drifted_models": d.get("drifted_models", []),
        "reference": d.get("reference"),
        "live": d.get("live"),
        "seasonal": d.get("seasonal"),
        "settings": d.get("settings"),
        "features": d.get("features", []),
        "predictions": d.get("predictions", []),
        "notes": d.get("notes", []),
    }


def _status(row: Mapping[str, Any]) -> str:
    return str(row["status"]).upper() if row.get("drifted") else str(row["status"])


def feature_table(result: DriftResult | Mapping[str, Any]) -> str:
    """The per-feature table the CLI prints (plain text, fixed width)."""
    d = _as_dict(result)
    head = (f"{'feature':<22} {'kind':<11} {'n_ref':>7} {'n_live':>7} {'PSI':>7} {'thr':>6} "
            f"{'KS p':>8} {'W1/sd':>6} {'dmean':>6} {'JS':>6} {'chi2 p':>8} {'unseen':>7} "
            f"{'miss':>6} {'mds':>5} status")
    lines = [head, "-" * len(head)]
    for f in d.get("features", []):
        thr = (f.get("threshold") or {}).get("value")
        lines.append(
            f"{f['name'][:22]:<22} {f['kind']:<11} {f['n_ref']:>7} {f['n_live']:>7} "
            f"{_f(f.get('psi')):>7} {_f(thr, '.2f'):>6} {_f(f.get('ks_pvalue'), '.1e'):>8} "
            f"{_f(f.get('wasserstein_norm'), '.2f'):>6} {_f(f.get('mean_shift_sd'), '+.2f'):>6} "
            f"{_f(f.get('js_distance')):>6} {_f(f.get('chi2_pvalue'), '.1e'):>8} "
            f"{_f(f.get('unseen_share'), '.1%'):>7} {_f(f.get('missing_live'), '.1%'):>6} "
            f"{_f(f.get('min_detectable_shift_sd'), '.2f'):>5} {_status(f)}"
            + (f" ({', '.join(f['rules'])})" if f.get("rules") else ""))
    preds = d.get("predictions", [])
    if preds:
        lines.append("")
        head2 = (f"{'model':<22} {'role':<10} {'n_ref':>7} {'n_live':>7} {'PSI':>7} {'KS p':>8} "
                 f"{'mean':>13} {'positive':>15} status")
        lines += [head2, "-" * len(head2)]
        for p in preds:
            mean = f"{_f(p.get('mean_ref'))}->{_f(p.get('mean_live'))}"
            pos = (f"{_f(p.get('positive_share_ref'), '.1%')}->"
                   f"{_f(p.get('positive_share_live'), '.1%')}")
            lines.append(
                f"{p['model'][:22]:<22} {p['role'][:10]:<10} {p['n_ref']:>7} {p['n_live']:>7} "
                f"{_f(p.get('psi')):>7} {_f(p.get('ks_pvalue'), '.1e'):>8} {mean:>13} "
                f"{pos:>15} {_status(p)}")
    models = d.get("drifted_models") or []
    lines.append("")
    lines.append(f"verdict {d.get('verdict')}: {len(d.get('drifted_features', []))} drifted "
                 f"feature(s) ({_f(d.get('share'), '.0%')}); the dataset rule counts "
                 f"{len(d.get('dataset_features', []))} ({_f(d.get('dataset_share'), '.0%')}; "
                 f"{_f((d.get('settings') or {}).get('drift_share'), '.0%')} is dataset drift)"
                 f"{'; models: ' + ', '.join(models) if models else ''}")
    for note in d.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def drift_markdown(result: DriftResult | Mapping[str, Any], heading: str = "##") -> str:
    """A Markdown fragment (heading, summary, feature and model tables) for the report."""
    d = _as_dict(result)
    seasonal = d.get("seasonal") or {}
    ref, live = d.get("reference") or {}, d.get("live") or {}
    out = [f"{heading} Drift: {d.get('verdict')}", ""]
    out.append(f"Reference: {ref.get('source')} ({ref.get('n')} rows). Live: {live.get('source')} "
               f"({live.get('n')} rows).")
    seg = (f"segments {', '.join(seasonal.get('segments') or [])} ({seasonal.get('mode')})"
           if seasonal.get("applied") else f"no segments ({seasonal.get('mode', 'none')})")
    out.append(f"Seasonality: {seg}; thresholds "
               f"{'adaptive from past windows' if seasonal.get('adaptive') else 'fixed'}.")
    out.append(f"Drifted features: {len(d.get('drifted_features', []))} "
               f"({_f(d.get('share'), '.0%')}; dataset drift at "
               f"{_f((d.get('settings') or {}).get('drift_share'), '.0%')}): "
               f"{', '.join(d.get('drifted_features', [])) or 'none'}.")
    broad = [n for n in d.get("dataset_features", []) if n not in d.get("drifted_features", [])]
    out.append(f"Dataset rule: {len(d.get('dataset_features', []))} feature(s) counted "
               f"({_f(d.get('dataset_share'), '.0%')}): the drifted ones"
               + (f", and {', '.join(broad)} (distribution test significant after "
                  f"Benjamini–Hochberg, effect above the dataset floor)" if broad else "")
               + ".")
    out += ["", "| feature | kind | PSI | threshold | KS p | Wasserstein/sd | mean shift (sd) | "
                "JS | chi² p | unseen (flag from) | missing ref → live | detects ≥ (sd) | "
                "status |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for f in d.get("features", []):
        thr = f.get("threshold") or {}
        adaptive = " (adaptive)" if thr.get("source") == "adaptive" else ""
        status = f"**{f['status']}**" if f.get("drifted") else f["status"]
        out.append(f"| {f['name']} | {f['kind']} | {_f(f.get('psi'))} | "
                   f"{_f(thr.get('value'), '.3f')}{adaptive} | "
                   f"{_f(f.get('ks_pvalue'), '.2g')} | {_f(f.get('wasserstein_norm'), '.3f')} | "
                   f"{_f(f.get('mean_shift_sd'), '+.2f')} | {_f(f.get('js_distance'))} | "
                   f"{_f(f.get('chi2_pvalue'), '.2g')} | {_f(f.get('unseen_share'), '.1%')}"
                   f"{_unseen_from(f)} | {_f(f.get('missing_ref'), '.1%')} → "
                   f"{_f(f.get('missing_live'), '.1%')} | "
                   f"{_f(f.get('min_detectable_shift_sd'), '.2f')} | {status} |")
    preds = d.get("predictions", [])
    if preds:
        out += ["", "| model | role | score PSI | KS p | mean score | predicted positive | "
                    "confidence PSI | detects ≥ (sd) | status |",
                "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for p in preds:
            status = f"**{p['status']}**" if p.get("drifted") else p["status"]
            out.append(f"| {p['model']} | {p['role']} | {_f(p.get('psi'))} | "
                       f"{_f(p.get('ks_pvalue'), '.2g')} | {_f(p.get('mean_ref'))} → "
                       f"{_f(p.get('mean_live'))} | {_f(p.get('positive_share_ref'), '.1%')} → "
                       f"{_f(p.get('positive_share_live'), '.1%')} | "
                       f"{_f(p.get('confidence_psi'))} | "
                       f"{_f(p.get('min_detectable_shift_sd'), '.2f')} | {status} |")
    whys = [f"- **{f['name']}**: {f['why']}" for f in d.get("features", []) if f.get("why")]
    if whys:
        out += ["", "Why each feature was or was not flagged, and the smallest shift its rule "
                    "can see at these sample sizes:", "", *whys]
    if d.get("notes"):
        out += [""] + [f"- {n}" for n in d["notes"]]
    return "\n".join(out) + "\n"


def _unseen_from(f: Mapping[str, Any]) -> str:
    thr = f.get("unseen_threshold")
    return f" ({_f(thr, '.1%')})" if thr is not None else ""


def write_result(result: DriftResult, out_dir: str | Path) -> Path:
    """drift.json and drift.md into out_dir; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DRIFT_FILE
    path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    (out / DRIFT_MD).write_text(drift_markdown(result))
    return path


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


class DriftMetrics:
    """Drift gauges in the evaluator's own registry (never the gateway's default one).

    Label sets a route no longer has (a feature that went away) are removed on update, so a
    dashboard does not show yesterday's value as today's.
    """

    def __init__(self, registry: Any | None = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        rf, rm = ["route", "feature"], ["route", "model"]

        def g(name: str, doc: str, labels: list[str]) -> Any:
            return Gauge(name, doc, labels, registry=self.registry)

        self.psi = g("understudy_drift_psi", "PSI of a feature, live vs reference", rf)
        self.psi_threshold = g("understudy_drift_threshold",
                               "Drift threshold in force for a feature (PSI or JS)", rf)
        self.ks_pvalue = g("understudy_drift_ks_pvalue", "KS test p-value of a feature", rf)
        self.ks_statistic = g("understudy_drift_ks_statistic", "KS statistic of a feature", rf)
        self.wasserstein = g("understudy_drift_wasserstein",
                             "Wasserstein distance of a feature in reference SDs", rf)
        self.js = g("understudy_drift_js_distance",
                    "Jensen-Shannon distance (base 2) of a categorical feature", rf)
        self.chi2_pvalue = g("understudy_drift_chi2_pvalue",
                             "Chi-squared p-value of a categorical feature", rf)
        self.unseen = g("understudy_drift_unseen_share",
                        "Share of live rows in categories unseen in the reference", rf)
        self.drifted = g("understudy_drift_feature_drifted", "1 when a feature drifts", rf)
        self.rule = g("understudy_drift_feature_rule",
                      "1 when this rule flags the feature (distribution, unseen, missing, "
                      "absent), else 0: why a feature was or was not flagged",
                      ["route", "feature", "rule"])
        self.min_shift = g("understudy_drift_min_detectable_shift_sd",
                           "Smallest mean shift (reference SDs) the feature's rule flags about "
                           "half the time at the current n", rf)
        self.missing = g("understudy_drift_missing_share",
                         "Share of rows with a missing or non-finite value",
                         ["route", "feature", "window"])
        self.unseen_threshold = g("understudy_drift_unseen_threshold",
                                  "Unseen-category share from which a feature is flagged (the "
                                  "reference's own rate of new values plus its margin)", rf)
        self.share = g("understudy_drift_share", "Share of features that drift", ["route"])
        self.dataset_share = g("understudy_drift_dataset_share",
                               "Share of features the dataset rule counts (drifted, or "
                               "BH-significant above the lower dataset floor)", ["route"])
        self.dataset_counted = g("understudy_drift_dataset_counted",
                                 "1 when the dataset rule counts the feature", rf)
        self.detected = g("understudy_drift_detected",
                          "1 on dataset drift or prediction drift", ["route"])
        self.live_rows = g("understudy_drift_live_rows", "Rows in the live window", ["route"])
        self.last_run = g("understudy_drift_last_run_timestamp_seconds",
                          "When drift was last computed", ["route"])
        self.pred_psi = g("understudy_prediction_drift_psi", "Score PSI of a model", rm)
        self.pred_ks = g("understudy_prediction_drift_ks_pvalue", "Score KS p-value", rm)
        self.pred_drifted = g("understudy_prediction_drift_detected",
                              "1 when a model's scores drift", rm)
        self.pred_min_shift = g("understudy_prediction_drift_min_detectable_shift_sd",
                                "Smallest score shift (reference SDs) flagged about half the "
                                "time at the current n", rm)
        self.pred_positive = g("understudy_prediction_positive_share",
                               "Predicted-positive share", ["route", "model", "window"])
        self.pred_conf = g("understudy_prediction_confidence_share",
                           "Share of predictions per confidence bucket (live window)",
                           ["route", "model", "bucket"])
        self._labels: dict[str, list[tuple[Any, tuple[str, ...]]]] = {}

    def update(self, result: DriftResult) -> None:
        route = result.route
        for gauge, labels in self._labels.pop(route, []):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        used: list[tuple[Any, tuple[str, ...]]] = []

        def put(gauge: Any, labels: tuple[str, ...], value: float | None) -> None:
            if value is None or not math.isfinite(value):
                return
            gauge.labels(*labels).set(value)
            used.append((gauge, labels))

        for f in result.features:
            lab = (route, f.name)
            put(self.psi, lab, f.psi)
            put(self.psi_threshold, lab, f.threshold.value if f.threshold else None)
            put(self.ks_pvalue, lab, f.ks_pvalue)
            put(self.ks_statistic, lab, f.ks_statistic)
            put(self.wasserstein, lab, f.wasserstein_norm)
            put(self.js, lab, f.js_distance)
            put(self.chi2_pvalue, lab, f.chi2_pvalue)
            put(self.unseen, lab, f.unseen_share)
            put(self.drifted, lab, float(f.drifted))
            for rule in ("distribution", "unseen", "missing", "absent"):
                if rule != "unseen" or f.kind == "categorical":
                    put(self.rule, (*lab, rule), float(rule in f.rules))
            put(self.min_shift, lab, f.min_detectable_shift_sd)
            put(self.missing, (*lab, "reference"), f.missing_ref)
            put(self.missing, (*lab, "live"), f.missing_live)
            put(self.unseen_threshold, lab, f.unseen_threshold)
            if f.status != "insufficient":
                put(self.dataset_counted, lab, float(f.dataset_counted))
        for p in result.predictions:
            lab = (route, p.model)
            put(self.pred_psi, lab, p.psi)
            put(self.pred_ks, lab, p.ks_pvalue)
            put(self.pred_drifted, lab, float(p.drifted))
            put(self.pred_min_shift, lab, p.min_detectable_shift_sd)
            put(self.pred_positive, (*lab, "reference"), p.positive_share_ref)
            put(self.pred_positive, (*lab, "live"), p.positive_share_live)
            for b in p.confidence:
                put(self.pred_conf, (*lab, str(b["bucket"])), b["live"])
        put(self.share, (route,), result.share)
        put(self.dataset_share, (route,), result.dataset_share)
        put(self.detected, (route,), float(result.significant))
        put(self.live_rows, (route,), float(result.live.get("n") or 0))
        put(self.last_run, (route,), result.generated_at)
        self._labels[route] = used

    def push(self, url: str, job: str = "understudy_drift",
             grouping_key: Mapping[str, str] | None = None, timeout: float = 10.0) -> None:
        """Push every gauge to a Prometheus Pushgateway (batch runs: CronJob pattern)."""
        from prometheus_client import push_to_gateway

        push_to_gateway(url, job=job, registry=self.registry,
                        grouping_key=dict(grouping_key or {}), timeout=timeout)


_metrics: DriftMetrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> DriftMetrics:
    """The process-wide drift gauges (the evaluator's registry, created on first use)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = DriftMetrics()
        return _metrics


def start_metrics_server(port: int, addr: str = "0.0.0.0",  # noqa: S104 - scraped in-cluster
                         registry: Any | None = None) -> tuple[Any, threading.Thread]:
    """Serve /metrics for the evaluator's registry from a daemon thread; returns (server,
    thread) — `server.shutdown(); server.server_close()` stops it. For a long-running process
    (`evaluator run`, `drift --serve`); batch runs push to a Pushgateway instead."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr,
                             registry=registry if registry is not None else metrics().registry)


# --------------------------------------------------------------------------------------------
# Webhook, once per episode
# --------------------------------------------------------------------------------------------


class WebhookError(DriftError):
    """The webhook could not be delivered after every retry."""


class WebhookNotifier:
    """POSTs a JSON alert when an episode (drift, or a guardrail breach) starts — once.

    An episode starts on the first run where its condition holds and ends after
    `clear_runs` quiet runs in a row (hysteresis: a statistic hovering at its threshold does
    not page on every crossing). State lives in a small JSON file (written atomically) so
    a CronJob that starts fresh every hour still fires once per episode. Delivery retries on
    connection errors, 429 and 5xx with exponential backoff; a delivery that fails every retry
    is tried again on the next run. Every attempt carries the episode's `Idempotency-Key`, so a
    receiver that answered 500 after acting on the call can drop the repeat.
    """

    def __init__(self, url: str | None, state_path: str | Path, *, token: str | None = None,
                 retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 5.0,
                 clear_runs: int = 2, sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url
        self.token = token
        self.state_path = Path(state_path)
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.clear_runs = clear_runs
        self._sleep = sleep
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: DriftConfig, env: Mapping[str, str] | None = None
                    ) -> WebhookNotifier:
        env = os.environ if env is None else env
        return cls(cfg.webhook_url, cfg.state_path, token=env.get(cfg.webhook_token_env) or None,
                   retries=cfg.webhook_retries, backoff_s=cfg.webhook_backoff_s,
                   timeout_s=cfg.webhook_timeout_s, clear_runs=cfg.episode_clear_runs)

    # -- state ------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("drift episode state %s unreadable (%s); starting afresh",
                        self.state_path, exc)
            return {}
        episodes = data.get("episodes") if isinstance(data, dict) else None
        return episodes if isinstance(episodes, dict) else {}

    def _save(self, episodes: Mapping[str, Any]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".drift_state.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "episodes": episodes}, fh, indent=1)
            os.replace(tmp, self.state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def episodes(self) -> dict[str, Any]:
        return self._load()

    def pinned_until(self, route: str) -> float | None:
        """Where the log reference ends while the route's drift episode is open (None: no
        open episode, or it started on a file reference)."""
        st = self._load().get(f"{route}:drift")
        if not isinstance(st, dict) or not st.get("active"):
            return None
        value = st.get("reference_until")
        return float(value) if isinstance(value, int | float) else None

    # -- delivery ---------------------------------------------------------------------------

    def send(self, payload: Mapping[str, Any], idempotency_key: str) -> int:
        """POST with retries; returns the attempts used. Raises WebhookError when it fails."""
        if not self.url:
            raise WebhookError("no webhook URL configured (drift.webhook_url / "
                               "UNDERSTUDY_DRIFT_WEBHOOK_URL)")
        body = json.dumps(_clean(dict(payload))).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key,
                   "User-Agent": "understudy-evaluator"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            req = urllib.request.Request(self.url, data=body, method="POST",  # noqa: S310
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                    resp.read()
                return attempt + 1
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code != 429 and exc.code < 500:
                    raise WebhookError(f"webhook {self.url} refused the alert ({last}); not "
                                       f"retrying a client error") from None
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            log.warning("webhook attempt %d/%d failed: %s", attempt + 1, self.retries + 1, last)
        raise WebhookError(f"webhook {self.url}: {self.retries + 1} attempts failed (last: "
                           f"{last})")

    def observe(self, key: str, active: bool, payload: Mapping[str, Any],
                now: float | None = None, reference_until: float | None = None) -> str:
        """Record one run's state of episode `key`; fire when an episode starts.

        `reference_until`: where this run's log reference ended; kept from the run that opens
        the episode, it pins the reference until the episode ends (`pinned_until`).

        Returns `fired`, `already_fired` (same episode), `failed` (retried next run),
        `disabled` (no URL: state is still kept), `quiet` or `cleared` (episode ended).
        """
        now = time.time() if now is None else now
        with self._lock:
            episodes = self._load()
            st = episodes.get(key)
            if not active:
                if not st or not st.get("active"):
                    return "quiet"
                st["quiet_runs"] = int(st.get("quiet_runs", 0)) + 1
                outcome = "quiet"
                if st["quiet_runs"] >= self.clear_runs:
                    st.update(active=False, ended_at=now)
                    outcome = "cleared"
                self._save(episodes)
                return outcome
            if not st or not st.get("active"):
                st = {"id": uuid.uuid4().hex, "active": True, "started_at": now, "fired": False,
                      "attempts": 0, "reference_until": reference_until}
                episodes[key] = st
            st["quiet_runs"] = 0
            st["last_seen"] = now
            if st.get("fired"):
                self._save(episodes)
                return "already_fired"
            if not self.url:
                self._save(episodes)
                return "disabled"
            message = {"episode": key, "episode_id": st["id"], "started_at": st["started_at"],
                       **payload}
            try:
                st["attempts"] = int(st.get("attempts", 0)) + self.send(message, st["id"])
                st.update(fired=True, fired_at=now)
                outcome = "fired"
            except WebhookError as exc:
                log.error("%s", exc)
                st["attempts"] = int(st.get("attempts", 0)) + self.retries + 1
                outcome = "failed"
            self._save(episodes)
            return outcome


def alert_drift(notifier: WebhookNotifier, result: DriftResult,
                reference_until: float | None = None) -> str:
    """One episode per route: significant drift (dataset drift or any model's scores).
    `reference_until`: the end of a log reference, pinned while the episode is open."""
    payload = {
        "event": "drift", "route": result.route, "verdict": result.verdict,
        "share": result.share, "drifted_features": result.drifted_features,
        "drifted_models": result.drifted_models,
        "summary": (f"route {result.route}: drift in {len(result.drifted_features)} feature(s) "
                    f"({', '.join(result.drifted_features) or 'none'})"
                    + (f"; model scores moved: {', '.join(result.drifted_models)}"
                       if result.drifted_models else "")),
        "live": result.live, "reference": result.reference,
    }
    return notifier.observe(f"{result.route}:drift", result.significant, payload,
                            reference_until=reference_until)


def alert_guardrails(notifier: WebhookNotifier, route: str, decisions: Iterable[Any]
                     ) -> dict[str, str]:
    """One episode per challenger whose guardrails fail (latency p99, error rate).

    `decisions` are `evaluator.decision.ChallengerDecision`s (or their dicts).
    """
    out: dict[str, str] = {}
    for d in decisions:
        dd = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        guard = dd.get("guardrails") or {}
        challenger = str(dd.get("challenger"))
        failed = [c for c in guard.get("checks", []) if c.get("passed") is False]
        payload = {"event": "guardrail", "route": route, "challenger": challenger,
                   "summary": f"route {route}: challenger {challenger} breaches "
                              f"{', '.join(str(c.get('name')) for c in failed) or 'guardrails'}",
                   "checks": failed}
        out[challenger] = notifier.observe(f"{route}:guardrail:{challenger}",
                                           guard.get("status") == "fail", payload)
    return out


# --------------------------------------------------------------------------------------------
# Command line: `python -m evaluator drift`
# --------------------------------------------------------------------------------------------


def run_command(args: argparse.Namespace, config: EvaluatorConfig) -> int:
    """`python -m evaluator drift` (arguments defined in evaluator/cli.py).

    Exit status: 0 computed (drift or not), 1 bad reference / webhook failure, 3 nothing to
    compare (empty window).
    """
    from evaluator.store import Store

    cfg = config.drift
    if args.seasonality:
        cfg = replace(cfg, seasonality=args.seasonality)
    if args.fixed_thresholds:
        cfg = replace(cfg, adaptive=False)
    reference_path = args.reference or (None if args.reference_window else cfg.reference)
    ref_window = parse_duration(args.reference_window, "--reference-window") \
        if args.reference_window else None
    window = parse_duration(args.window, "--window") if args.window else None
    out_dir = Path(args.out or cfg.out)
    push_url = args.push or cfg.pushgateway
    # The episode state is kept with --no-webhook too: it pins the log reference while an
    # episode is open, so the check keeps flagging a shift for as long as it lasts.
    notifier = WebhookNotifier.from_config(cfg)
    if args.no_webhook:
        notifier.url = None
    serve_port = args.serve if args.serve is not None else 0
    every = parse_duration(args.every, "--every") if args.every else 3600.0
    if serve_port:
        start_metrics_server(serve_port)
        print(f"drift: serving /metrics on :{serve_port}, every {format_duration(every)}",
              flush=True)
    if not serve_port:
        return _run_once(args.route, config, cfg, reference_path, ref_window, window, out_dir,
                         push_url, notifier, Store)
    from evaluator.store import StoreError

    try:
        while True:
            try:
                _run_once(args.route, config, cfg, reference_path, ref_window, window, out_dir,
                          push_url, notifier, Store)
            except StoreError as exc:  # e.g. the ingest loop held the file: try next round
                print(f"drift: store error: {exc}; retrying in {format_duration(every)}",
                      file=sys.stderr, flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


def _run_once(route: str, config: EvaluatorConfig, cfg: DriftConfig, reference_path: str | None,
              ref_window: float | None, window: float | None, out_dir: Path,
              push_url: str | None, notifier: WebhookNotifier | None, store_cls: Any) -> int:
    store = store_cls.open(config.store, read_only=True)
    try:
        pinned = notifier.pinned_until(route) if notifier is not None and not reference_path \
            else None
        windows = plan_windows(store, route, cfg, reference_path=reference_path,
                               reference_window=ref_window, window=window,
                               pinned_until=pinned)
        ref_len = format_duration(ref_window or cfg.reference_window)
        ref_desc = reference_path or f"log window of {ref_len} before the live one"
        if pinned is not None:
            ref_desc += f", pinned at {_iso(pinned)} while the drift episode is open"
        print(f"drift: route {route!r}, live [{_iso(windows.live_since)}, "
              f"{_iso(windows.live_until)}), reference {ref_desc}; seasonality "
              f"{cfg.seasonality}, {'adaptive' if cfg.adaptive else 'fixed'} thresholds",
              flush=True)
        result = drift_for_route(store, config, route, windows, cfg)
    except EmptyWindowError as exc:
        print(f"drift: {exc}", file=sys.stderr)
        return 3
    except BadReferenceError as exc:
        print(f"drift: bad reference: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(feature_table(result))
    path = write_result(result, out_dir)
    print(f"drift: wrote {path} and {path.with_name(DRIFT_MD)}")
    metrics().update(result)
    if push_url:
        batch = DriftMetrics()
        batch.update(result)
        try:
            batch.push(push_url, job=cfg.push_job, grouping_key={"route": route})
            print(f"drift: pushed metrics to {push_url} (job {cfg.push_job}, route {route})")
        except OSError as exc:
            print(f"drift: Pushgateway {push_url} unreachable: {exc}", file=sys.stderr)
            return 1
    if notifier is not None:
        outcome = alert_drift(notifier, result, windows.ref_until)
        if outcome in ("fired", "failed", "already_fired"):
            print(f"drift: webhook {outcome} (episode {route}:drift)")
        if outcome == "failed":
            return 1
    return 0
