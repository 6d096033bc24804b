"""Prediction drift: one model's score distribution against the reference."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from evaluator.config import DriftConfig
from evaluator.drift.features import _compare_numeric, min_detectable_shift
from evaluator.drift.result import PredictionDrift
from evaluator.drift.statistics import _finite, psi_from_counts
from evaluator.drift.thresholds import _adaptive


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
    (p.psi, p.ks_statistic, p.ks_pvalue, p.wasserstein, p.mean_ref,
     p.mean_live) = _compare_numeric(r, c, cfg)
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
