"""The drift section of a report (and drift.md), rendered from drift.json's data.

`evaluator drift` writes its result as data (drift.json); the report embeds the part it shows
(`drift_section`) and builds its blocks from that dict (`drift_blocks`), the same way it builds
every other section from the payload: no text is parsed back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evaluator.drift.data import _f
from evaluator.drift.result import DriftResult
from evaluator.report.document import Block, _h, _table

FEATURE_HEADER = (
    "feature", "kind", "PSI", "threshold", "KS p", "Wasserstein/sd", "mean shift (sd)", "JS",
    "chi² p", "unseen (flag from)", "missing ref → live", "detects ≥ (sd)", "status",
)
MODEL_HEADER = (
    "model", "role", "score PSI", "KS p", "mean score", "predicted positive", "confidence PSI",
    "detects ≥ (sd)", "status",
)


def _as_dict(result: DriftResult | Mapping[str, Any]) -> dict[str, Any]:
    return result.to_dict() if isinstance(result, DriftResult) else dict(result)


def drift_section(result: DriftResult | Mapping[str, Any]) -> dict[str, Any]:
    """The drift part of report.json, JSON-safe, from a DriftResult or a loaded drift.json.

    `drift_blocks(drift_section(r))` is the same as `drift_blocks(r)`."""
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
    return f"**{row['status']}**" if row.get("drifted") else str(row["status"])


def _summary(d: Mapping[str, Any]) -> str:
    """Windows, seasonality, the drifted features and what the dataset rule counts."""
    seasonal = d.get("seasonal") or {}
    ref, live = d.get("reference") or {}, d.get("live") or {}
    drifted = d.get("drifted_features", [])
    counted = d.get("dataset_features", [])
    seg = (f"segments {', '.join(seasonal.get('segments') or [])} ({seasonal.get('mode')})"
           if seasonal.get("applied") else f"no segments ({seasonal.get('mode', 'none')})")
    broad = [n for n in counted if n not in drifted]
    return " ".join([
        f"Reference: {ref.get('source')} ({ref.get('n')} rows). Live: {live.get('source')} "
        f"({live.get('n')} rows).",
        f"Seasonality: {seg}; thresholds "
        f"{'adaptive from past windows' if seasonal.get('adaptive') else 'fixed'}.",
        f"Drifted features: {len(drifted)} ({_f(d.get('share'), '.0%')}; dataset drift at "
        f"{_f((d.get('settings') or {}).get('drift_share'), '.0%')}): "
        f"{', '.join(drifted) or 'none'}.",
        f"Dataset rule: {len(counted)} feature(s) counted ({_f(d.get('dataset_share'), '.0%')}): "
        "the drifted ones"
        + (f", and {', '.join(broad)} (distribution test significant after "
           f"Benjamini–Hochberg, effect above the dataset floor)" if broad else "")
        + ".",
    ])


def _feature_row(f: Mapping[str, Any]) -> list[str]:
    thr = f.get("threshold") or {}
    adaptive = " (adaptive)" if thr.get("source") == "adaptive" else ""
    unseen_from = (f" ({_f(f['unseen_threshold'], '.1%')})"
                   if f.get("unseen_threshold") is not None else "")
    return [
        str(f["name"]), str(f["kind"]), _f(f.get("psi")),
        f"{_f(thr.get('value'), '.3f')}{adaptive}", _f(f.get("ks_pvalue"), ".2g"),
        _f(f.get("wasserstein_norm"), ".3f"), _f(f.get("mean_shift_sd"), "+.2f"),
        _f(f.get("js_distance")), _f(f.get("chi2_pvalue"), ".2g"),
        f"{_f(f.get('unseen_share'), '.1%')}{unseen_from}",
        f"{_f(f.get('missing_ref'), '.1%')} → {_f(f.get('missing_live'), '.1%')}",
        _f(f.get("min_detectable_shift_sd"), ".2f"), _status(f),
    ]


def _model_row(p: Mapping[str, Any]) -> list[str]:
    return [
        str(p["model"]), str(p["role"]), _f(p.get("psi")), _f(p.get("ks_pvalue"), ".2g"),
        f"{_f(p.get('mean_ref'))} → {_f(p.get('mean_live'))}",
        f"{_f(p.get('positive_share_ref'), '.1%')} → {_f(p.get('positive_share_live'), '.1%')}",
        _f(p.get("confidence_psi")), _f(p.get("min_detectable_shift_sd"), ".2f"), _status(p),
    ]


def drift_blocks(result: DriftResult | Mapping[str, Any], level: int = 2) -> list[Block]:
    """The drift section: heading, summary, feature and model tables, why each feature was or
    was not flagged, and the run's notes. `level`: the heading's level."""
    d = _as_dict(result)
    blocks = [_h(level, f"Drift: {d.get('verdict')}"), Block("p", _summary(d)),
              _table(FEATURE_HEADER, [_feature_row(f) for f in d.get("features", [])])]
    preds = d.get("predictions", [])
    if preds:
        blocks.append(_table(MODEL_HEADER, [_model_row(p) for p in preds]))
    whys = tuple(f"**{f['name']}**: {f['why']}" for f in d.get("features", []) if f.get("why"))
    if whys:
        blocks += [Block("p", "Why each feature was or was not flagged, and the smallest shift "
                              "its rule can see at these sample sizes:"),
                   Block("ul", items=whys)]
    if d.get("notes"):
        blocks.append(Block("ul", items=tuple(str(n) for n in d["notes"])))
    return blocks
