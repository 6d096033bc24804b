"""The distribution statistics: PSI, KS, chi-squared, Jensen-Shannon, Wasserstein."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

from evaluator.drift.data import KS_EXACT_MAX


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
