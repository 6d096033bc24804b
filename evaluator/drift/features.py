"""Per-feature comparison: numeric and categorical drift, missing values, detection limits."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from evaluator.config import DriftConfig
from evaluator.dataset import Array
from evaluator.drift.data import OTHER, _f, _missing_share, _present_text
from evaluator.drift.result import FeatureDrift
from evaluator.drift.statistics import (
    _finite,
    bin_counts,
    chi_squared,
    js_distance,
    ks_test,
    psi_from_counts,
    quantile_edges,
    wasserstein,
)
from evaluator.drift.thresholds import _adaptive, _dataset_base, unseen_baseline


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


def _compare_numeric(r: Array, c: Array, cfg: DriftConfig
                     ) -> tuple[float, float, float, float, float, float]:
    """(PSI on the reference's quantile bins, KS statistic, KS p, Wasserstein, reference mean,
    live mean) of the finite reference `r` and live `c` values (a feature's or a model's)."""
    edges = quantile_edges(r, cfg.bins)
    psi = psi_from_counts(bin_counts(r, edges), bin_counts(c, edges), cfg.epsilon)
    ks_statistic, ks_pvalue = ks_test(r, c)
    return (psi, ks_statistic, ks_pvalue, wasserstein(r, c), float(r.mean()),
            float(c.mean()))


def _start_feature(name: str, kind: str, n_ref: int, present_ref: int, n_live: int,
                   present_live: int, cfg: DriftConfig) -> tuple[FeatureDrift, bool]:
    """The feature's counts, missing shares and missing-value check, and whether both sides
    have `min_samples` present values; when not, the result is already finished."""
    f = FeatureDrift(name=name, kind=kind, status="ok", drifted=False,
                     n_ref=int(present_ref), n_live=int(present_live),
                     missing_ref=_missing_share(n_ref, present_ref),
                     missing_live=_missing_share(n_live, present_live))
    _missing_check(f, n_ref, present_ref, n_live, present_live, cfg)
    if present_ref < cfg.min_samples or present_live < cfg.min_samples:
        f.status = "drift" if f.drifted else "insufficient"
        f.reasons.append(f"{present_ref} reference / {present_live} live values (< min_samples "
                         f"{cfg.min_samples})")
        _explain(f, cfg)
        return f, False
    return f, True


def numeric_drift(name: str, ref: np.ndarray, live: np.ndarray, cfg: DriftConfig,
                  null: Sequence[float] | None = None, *, excluded: int = 0) -> FeatureDrift:
    """PSI, KS, Wasserstein, mean/SD shift and missing share of one numeric feature.

    `null`: the PSI of past reference windows against their segment (`numeric_null`), for an
    adaptive threshold; None keeps `psi_alert`. `excluded`: past windows left out (reported)."""
    ref_all = np.asarray(ref, dtype=float)
    live_all = np.asarray(live, dtype=float)
    r, c = _finite(ref_all), _finite(live_all)
    f, enough = _start_feature(name, "numeric", ref_all.size, r.size, live_all.size, c.size, cfg)
    if not enough:
        return f
    (f.psi, f.ks_statistic, f.ks_pvalue, f.wasserstein, f.mean_ref,
     f.mean_live) = _compare_numeric(r, c, cfg)
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
    f, enough = _start_feature(name, "categorical", ref.size, r.size, live.size, c.size, cfg)
    if not enough:
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
