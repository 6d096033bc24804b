"""The comparison of a live window with its reference, and the dataset rule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from evaluator.config import DriftConfig
from evaluator.drift.data import ALL_MODELS, FeatureData, _is_numeric, _obj
from evaluator.drift.errors import (
    EmptyReferenceError,
    EmptyWindowError,
    FeatureTypeError,
    MissingFeaturesError,
)
from evaluator.drift.features import categorical_drift, numeric_drift
from evaluator.drift.predictions import prediction_drift
from evaluator.drift.reference import _category
from evaluator.drift.result import DriftResult, FeatureDrift, PredictionDrift
from evaluator.drift.seasonal import _plan, _segment_rows
from evaluator.drift.statistics import js_distance, psi_from_counts
from evaluator.drift.thresholds import (
    _adaptive,
    _category_codes,
    _dataset_base,
    _null_stat,
    _numeric_codes,
    numeric_null,
)


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
