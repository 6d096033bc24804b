"""Paired tests against independent implementations: O(n^2) DeLong, scipy, statsmodels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_paired

from evaluator.stats import significance as S


def _slow_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong (1988) from the definition: the Mann-Whitney kernel over all pairs, O(n^2)."""
    k = scores.shape[0]
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    v10, v01 = np.zeros((k, m)), np.zeros((k, n))
    for r in range(k):
        psi = (pos[r][:, None] > neg[r][None, :]) + 0.5 * (pos[r][:, None] == neg[r][None, :])
        v10[r], v01[r] = psi.mean(axis=1), psi.mean(axis=0)
    return v10.mean(axis=1), np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def _correlated(seed: int, n: int, k: int = 2, decimals: int | None = 1) -> tuple:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    base = rng.normal(size=n)
    scores = np.vstack([0.6 * base + rng.normal(size=n) + (0.8 + 0.3 * i) * y for i in range(k)])
    if decimals is not None:
        scores = np.round(scores, decimals)  # ties within and across classes
    return y, scores


@pytest.mark.parametrize(("seed", "k", "decimals"), [(0, 2, 1), (1, 2, None), (2, 3, 0), (3, 2, 2)])
def test_fast_delong_equals_quadratic_definition(seed: int, k: int, decimals: int | None) -> None:
    y, scores = _correlated(seed, 180, k, decimals)
    aucs, cov = S.delong_covariance(y, scores)
    slow_aucs, slow_cov = _slow_delong(y, scores)
    np.testing.assert_allclose(aucs, slow_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, atol=1e-14)
    for i in range(k):
        assert aucs[i] == pytest.approx(roc_auc_score(y, scores[i]))


def test_delong_test_statistic_and_ci() -> None:
    y, scores = _correlated(4, 250)
    r = S.delong_test(y, scores[0], scores[1], alpha=0.1)
    aucs, cov = _slow_delong(y, scores)
    diff = aucs[1] - aucs[0]
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert r.difference == pytest.approx(diff)
    assert r.se == pytest.approx(se)
    assert r.z == pytest.approx(diff / se)
    assert r.p_value == pytest.approx(2 * stats.norm.sf(abs(diff / se)))
    assert r.ci_low == pytest.approx(diff - stats.norm.ppf(0.95) * se)
    assert r.correlation == pytest.approx(cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]))


def test_delong_edge_cases() -> None:
    y, scores = _correlated(5, 100)
    same = S.delong_test(y, scores[0], scores[0])
    assert (same.difference, same.p_value) == (0.0, 1.0)
    one_class = S.delong_test(np.ones(20), scores[0][:20], scores[1][:20])
    assert one_class.p_value is None
    assert "all 20 labels are positive" in (one_class.reason or "")
    empty = S.delong_test(np.array([]), np.array([]), np.array([]))
    assert empty.reason
    dirty = scores[1].copy()
    dirty[:3] = np.nan
    r = S.delong_test(y, scores[0], dirty)
    assert r.n_excluded == 3
    assert r.difference == pytest.approx(
        roc_auc_score(y[3:], dirty[3:]) - roc_auc_score(y[3:], scores[0][3:])
    )
    json.dumps(r.to_dict(), allow_nan=False)


def test_midranks_match_scipy() -> None:
    x = np.round(np.random.default_rng(6).normal(size=500), 1)
    np.testing.assert_allclose(S.midranks(x), stats.rankdata(x))


@pytest.mark.parametrize(("b", "c"), [(3, 9), (12, 5), (0, 4), (7, 7), (40, 60), (130, 95)])
def test_mcnemar_matches_statsmodels(b: int, c: int) -> None:
    both, neither = 200, 30
    champ = np.r_[np.ones(both), np.ones(b), np.zeros(c), np.zeros(neither)].astype(bool)
    chall = np.r_[np.ones(both), np.zeros(b), np.ones(c), np.zeros(neither)].astype(bool)
    table = [[both, b], [c, neither]]
    r = S.mcnemar_test(champ, chall)
    exact = b + c <= 25
    ref = sm_mcnemar(table, exact=exact, correction=True)
    assert r.method == ("exact" if exact else "asymptotic")
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue)
    forced = S.mcnemar_test(champ, chall, exact=True)
    assert forced.p_value == pytest.approx(sm_mcnemar(table, exact=True).pvalue)
    assert r.difference == pytest.approx((c - b) / champ.size)


def test_paired_t_matches_scipy() -> None:
    rng = np.random.default_rng(7)
    champ = rng.gamma(2.0, 0.3, 400)
    chall = champ * 0.9 + rng.normal(0, 0.2, 400)
    r = S.paired_t_test(champ, chall, alpha=0.05)
    ref = stats.ttest_rel(chall, champ)
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high))
    assert r.df == 399


@pytest.mark.parametrize("seed", [8, 9])
def test_wilcoxon_matches_scipy_with_ties_and_zeros(seed: int) -> None:
    rng = np.random.default_rng(seed)
    champ = np.round(rng.gamma(2.0, 0.3, 300), 1)
    chall = np.round(champ + rng.normal(-0.05, 0.3, 300), 1)  # ties and zero differences
    r = S.wilcoxon_signed_rank(champ, chall)
    ref = stats.wilcoxon(chall, champ, zero_method="wilcox", method="asymptotic")
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.difference == pytest.approx(np.median(chall - champ))


def test_wilcoxon_all_zero_differences() -> None:
    x = np.ones(10)
    r = S.wilcoxon_signed_rank(x, x)
    assert r.p_value == 1.0
    assert r.reason


def test_non_inferiority_matches_ttost_lower_test() -> None:
    rng = np.random.default_rng(10)
    champ = rng.gamma(2.0, 0.3, 300)
    chall = champ + rng.normal(0.01, 0.1, 300)  # slightly worse (higher loss)
    margin = 0.02
    t = S.paired_t_test(champ, chall)
    improvement = -t.difference  # type: ignore[operator]
    r = S.non_inferiority_test(improvement, t.se, margin, alpha=0.05, df=t.df)
    # ttost_paired(x1, x2, low, upp): the lower test is H0: mean(x1 - x2) <= low
    _, (t1, p1, _), _ = ttost_paired(champ, chall, -margin, 10.0)
    assert r.statistic == pytest.approx(t1)
    assert r.p_value == pytest.approx(p1)
    assert r.passed == (p1 < 0.05)
    assert r.lower_bound == pytest.approx(improvement - stats.t.ppf(0.95, 299) * t.se)
    with pytest.raises(ValueError, match="margin"):
        S.non_inferiority_test(0.0, 0.1, -1.0)


def _holm(p: list[float]) -> list[float]:
    order = np.argsort(p)
    m = len(p)
    out = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def test_holm_and_bh_adjustment() -> None:
    p = [0.01, 0.04, 0.03, 0.2]
    adj, reject = S.adjust_pvalues(p, 0.05, "holm")
    assert adj == pytest.approx(_holm(p))
    assert reject == [x <= 0.05 for x in _holm(p)]
    bh, _ = S.adjust_pvalues(p, 0.05, "fdr_bh")
    assert bh == pytest.approx(multipletests(p, 0.05, "fdr_bh")[1].tolist())
    with_missing, rej = S.adjust_pvalues([0.01, None, 0.04], 0.05, "holm")
    assert with_missing[1] is None
    assert rej[1] is False
    assert with_missing[0] == pytest.approx(0.03)  # the missing test still counts (m = 3)
    assert S.adjust_pvalues([], 0.05) == ([], [])
    assert S.adjust_pvalues([0.02], 0.05, "holm") == ([0.02], [True])


@pytest.mark.parametrize(
    ("sd", "mde", "alpha", "power"),
    [(0.4, 0.01, 0.05, 0.8), (1.0, 0.3, 0.01, 0.9), (2.0, 1.5, 0.05, 0.8)],
)
def test_paired_t_sample_size_matches_statsmodels(
    sd: float, mde: float, alpha: float, power: float
) -> None:
    n = S.sample_size_paired_t(sd, mde, alpha, power)
    ref = TTestPower().solve_power(effect_size=mde / sd, alpha=alpha, power=power)
    assert n == math.ceil(ref)
    assert TTestPower().power(mde / sd, n, alpha) >= power
    assert TTestPower().power(mde / sd, n - 1, alpha) < power


def test_normal_sample_size_and_power() -> None:
    se, n_pilot, mde = 0.012, 2000, 0.01
    n = S.sample_size_normal(se, n_pilot, mde, 0.05, 0.8)
    sigma = se * math.sqrt(n_pilot)
    ref = NormalIndPower().solve_power(effect_size=mde / sigma, alpha=0.05, power=0.8, ratio=0)
    assert abs(n - ref) <= 1
    assert S.power_normal(sigma / math.sqrt(n), mde) == pytest.approx(0.8, abs=2e-3)
    assert S.power_normal(se, mde) == pytest.approx(
        NormalIndPower().power(mde / sigma, n_pilot, 0.05, ratio=0)
    )


def test_rmse_delta_method_against_bootstrap() -> None:
    rng = np.random.default_rng(11)
    y = rng.normal(size=800)
    e_c = rng.normal(0, 1.0, 800)
    e_h = 0.7 * e_c + rng.normal(0, 0.6, 800)
    r = S.rmse_difference_test(e_c, e_h)
    assert r.rmse_champion == pytest.approx(math.sqrt(np.mean(e_c**2)))
    boots = []
    for _ in range(800):
        i = rng.integers(0, 800, 800)
        boots.append(math.sqrt(np.mean(e_h[i] ** 2)) - math.sqrt(np.mean(e_c[i] ** 2)))
    assert r.se == pytest.approx(np.std(boots), rel=0.12)
    # same direction and similar evidence as a paired t-test on squared errors
    t = stats.ttest_rel(e_h**2, e_c**2)
    assert np.sign(r.z) == np.sign(t.statistic)
    assert r.p_value == pytest.approx(t.pvalue, rel=0.5)
    assert y.size == 800
