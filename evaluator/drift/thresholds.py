"""Adaptive thresholds: each statistic's normal variation over the reference's past windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from evaluator.config import DriftConfig
from evaluator.drift.data import _present_text
from evaluator.drift.result import Threshold
from evaluator.drift.seasonal import _Null
from evaluator.drift.statistics import js_distance, psi_from_counts, quantile_edges


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


def _dataset_base(base: float, sqrt_scale: bool, cfg: DriftConfig) -> float:
    """The dataset rule's fixed effect floor for a feature whose own rule needs `base`.

    PSI: `psi_warn` (0.1, the "investigate" convention) where a feature alone needs
    `psi_alert` (0.2). JS distance scales like the square root of PSI, so its floor is
    `js_alert` x sqrt(psi_warn / psi_alert): the same relative step down."""
    ratio = min(cfg.psi_warn / cfg.psi_alert, 1.0) if cfg.psi_alert > 0 else 1.0
    return base * (ratio if sqrt_scale else math.sqrt(ratio))
