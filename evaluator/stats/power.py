"""Family-wise correction across challengers, and the fixed-horizon power analysis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special
from statsmodels.stats.multitest import multipletests

from evaluator.stats.common import JsonFields, norm_ppf, norm_sf, t_ppf, z_crit

# ----------------------------------------------------------------------------------------------
# Multiple challengers
# ----------------------------------------------------------------------------------------------


def adjust_pvalues(
    p_values: Sequence[float | None], alpha: float = 0.05, method: str = "holm"
) -> tuple[list[float | None], list[bool]]:
    """Family-wise correction across challengers (statsmodels ``multipletests``).

    Why: with k challengers each tested at alpha, the chance that *some* useless challenger gets
    promoted is up to k * alpha. Holm controls that family-wise rate and is uniformly more
    powerful than Bonferroni. ``fdr_bh`` (Benjamini-Hochberg) is available for teams that run
    many challengers and accept a controlled false-discovery rate instead. A missing p-value
    (test undefined) counts as 1 so it still occupies its place in the family — dropping it
    would quietly make the correction less strict.
    """
    if method not in {"holm", "bonferroni", "fdr_bh", "none"}:
        raise ValueError(f"unknown correction {method!r}")
    if not p_values:
        return [], []
    missing = [p is None or not math.isfinite(p) for p in p_values]
    raw = np.array([float(p) if p is not None and math.isfinite(p) else 1.0 for p in p_values])
    raw = np.clip(raw, 0.0, 1.0)
    if method == "none" or raw.size == 1:  # one test: every method leaves p unchanged
        adjusted = raw
    else:
        _, adjusted, _, _ = multipletests(raw, alpha=alpha, method=method)
    out: list[float | None] = [
        None if m else float(p) for p, m in zip(adjusted, missing, strict=True)
    ]
    reject = [(p is not None and p <= alpha) for p in out]
    return out, reject


def corrected_levels(
    p_values: Sequence[float | None], alpha: float = 0.05, method: str = "holm"
) -> list[float]:
    """The level each test of a family is held to, for confidence sets that carry a direction.

    Why: a confidence sequence at level alpha_j excludes zero exactly when the matching
    always-valid p-value is <= alpha_j, so giving each challenger's CS the level at which the
    correction would reject it reproduces the correction's rejections and adds the sign.
    ``holm``: the j-th smallest p (1-based) gets alpha / (k - j + 1) while every smaller one is
    rejected; from the first non-rejection on, alpha / k (Bonferroni: simultaneous coverage for
    the undecided). ``bonferroni``: alpha / k. ``fdr_bh``: the r hypotheses Benjamini-Hochberg
    rejects get r * alpha / k, the rest alpha / k. ``none``: alpha. Missing p-values count as 1.
    """
    if method not in {"holm", "bonferroni", "fdr_bh", "none"}:
        raise ValueError(f"unknown correction {method!r}")
    k = len(p_values)
    if k == 0:
        return []
    if method == "none" or k == 1:
        return [alpha] * k
    raw = np.array([1.0 if p is None or not math.isfinite(p) else float(p) for p in p_values])
    levels = np.full(k, alpha / k)
    order = np.argsort(raw, kind="stable")
    if method == "holm":
        for j, i in enumerate(order):
            level = alpha / (k - j)
            if raw[i] > level:
                break
            levels[i] = level
    elif method == "fdr_bh":
        passing = np.nonzero(raw[order] <= alpha * np.arange(1, k + 1) / k)[0]
        if passing.size:
            r = int(passing[-1]) + 1
            levels[order[:r]] = r * alpha / k
    return [float(x) for x in levels]


# ----------------------------------------------------------------------------------------------
# Power analysis
# ----------------------------------------------------------------------------------------------


def power_normal(se: float, effect: float, alpha: float = 0.05) -> float:
    """Power of a two-sided z-test at level alpha when the true difference is ``effect``."""
    if se <= 0:
        return 1.0 if effect != 0 else alpha
    z = z_crit(alpha)
    shift = abs(effect) / se
    return norm_sf(z - shift) + norm_sf(z + shift)


def sample_size_normal(
    se_pilot: float, n_pilot: int, mde: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Labelled requests for ``power`` to detect ``mde`` with a z-test whose SE scales 1/sqrt(n).

    Used for the DeLong AUROC difference, the RMSE delta method and the paired accuracy
    difference: the pilot window's SE is turned into a per-request standard deviation
    sigma = se * sqrt(n_pilot) (for AUROC this assumes the class balance stays as in the pilot),
    and n = ((z_{1-alpha/2} + z_power) * sigma / mde)^2, the standard formula that ignores the
    negligible far tail.
    """
    if mde <= 0:
        raise ValueError("minimum detectable effect must be > 0")
    sigma = se_pilot * math.sqrt(n_pilot)
    if not math.isfinite(sigma):
        raise ValueError("pilot standard error must be finite")
    z = z_crit(alpha) + norm_ppf(power)
    return max(2, math.ceil((z * sigma / mde) ** 2))


def _t_power(n: int, effect_size: float, alpha: float) -> float:
    df = n - 1
    crit = t_ppf(1.0 - alpha / 2.0, df)
    nc = effect_size * math.sqrt(n)
    return float(1.0 - special.nctdtr(df, nc, crit) + special.nctdtr(df, nc, -crit))


def sample_size_paired_t(
    sd_diff: float, mde: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Pairs needed for a two-sided paired t-test to reach ``power`` at a mean difference ``mde``.

    ``sd_diff`` is the pilot standard deviation of the per-request loss differences: pairing
    enters through it (sd_diff^2 = var_c + var_h - 2 cov), which is why shadow comparisons need
    far fewer labels than an A/B split. Exact noncentral-t power, searched upward from the normal
    approximation (matches statsmodels' ``TTestPower().solve_power`` rounded up).
    """
    if mde <= 0:
        raise ValueError("minimum detectable effect must be > 0")
    if sd_diff <= 0:
        return 2
    d = mde / sd_diff
    z = z_crit(alpha) + norm_ppf(power)
    # Guenther's correction (+ z_{1-alpha/2}^2 / 2) puts the start within a step of the answer.
    n = max(2, math.floor((z / d) ** 2 + z_crit(alpha) ** 2 / 2))
    if n > 10_000_000:  # the t correction is irrelevant there; avoid a long search
        return math.ceil((z / d) ** 2)
    while _t_power(n, d, alpha) < power:
        n += 1
    while n > 2 and _t_power(n - 1, d, alpha) >= power:
        n -= 1
    return n


@dataclass(frozen=True)
class PowerResult(JsonFields):
    """How many labelled requests a fixed-horizon test needs to detect the configured effect."""

    method: str
    mde: float
    alpha: float  # the per-test level used (alpha / number of challengers under a correction)
    power: float
    current_n: int
    required_n: int | None
    achieved_power: float | None  # power at the current n for an effect of size mde
    sd_per_request: float | None  # pilot per-request standard deviation behind the estimate
    reason: str | None = None
