"""The always-valid sequential test: formula, bookkeeping, and error control under peeking."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from evaluator.stats import sequential as Q
from evaluator.stats import significance as S

DAY = 86_400.0


def test_log_lr_matches_johari_formula() -> None:
    """Johari et al.: Lambda_n = sqrt(s2/(s2+n t2)) exp(n^2 t2 ybar^2 / (2 s2 (s2+n t2)))."""
    s2, t2 = 0.7, 0.01**2
    for n, ybar in [(10, 0.3), (1000, 0.02), (50_000, -0.004)]:
        direct = 0.5 * math.log(s2 / (s2 + n * t2)) + n * n * t2 * ybar**2 / (
            2 * s2 * (s2 + n * t2)
        )
        ours = Q.normal_mixture_log_lr(np.array([ybar]), np.array([s2 / n]), math.sqrt(t2))
        assert ours[0] == pytest.approx(direct, rel=1e-12)


def test_paired_path_matches_prefix_statistics() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    d = rng.normal(0.05, 1.0, n)
    ts = np.sort(rng.uniform(0, 10 * DAY, n))
    res = Q.msprt_paired(d, ts, design=Q.SequentialDesign(tau=0.05, burn_in=50))
    ends = np.searchsorted(ts, (np.arange(10) + 1) * DAY)
    np.testing.assert_array_equal(res.n, ends)
    for j, k in enumerate(res.n):
        x = d[:k]
        assert res.estimate[j] == pytest.approx(x.mean(), abs=1e-12)
        assert res.se[j] == pytest.approx(x.std(ddof=1) / math.sqrt(k), rel=1e-9)
    assert np.all(np.diff(res.p_value_path) <= 0)  # running minimum
    assert np.all(np.diff(res.cs_low) >= 0)  # running intersection
    assert np.all(np.diff(res.cs_high) <= 0)
    lam = Q.normal_mixture_log_lr(res.estimate, res.se**2, 0.05)
    assert res.p_value == pytest.approx(min(1.0, float(np.exp(-lam).min())))
    # the running p-value reaches alpha exactly when 0 leaves the confidence sequence
    assert (res.p_value <= 0.05) == (res.cs_low[-1] > 0 or res.cs_high[-1] < 0)
    json.dumps(res.to_dict(), allow_nan=False)


def test_confidence_sequence_inverts_the_test() -> None:
    est, var, tau, alpha = np.array([0.03]), np.array([1e-4]), 0.02, 0.05
    res = Q.msprt(est, var, np.array([1000]), tau=tau, alpha=alpha, burn_in=1)
    for theta in (res.cs_low[0], res.cs_high[0]):
        assert Q.normal_mixture_log_lr(est - theta, var, tau)[0] == pytest.approx(
            math.log(1 / alpha)
        )


def test_look_points() -> None:
    ts = np.array([0.5, 0.7, 1.2, 1.3, 1.9, 4.5]) * DAY
    np.testing.assert_array_equal(Q.look_points(ts, 6, "daily"), [2, 5, 6])
    np.testing.assert_array_equal(Q.look_points(None, 10, 4), [3, 5, 8, 10])
    np.testing.assert_array_equal(Q.look_points(None, 5, "each"), [1, 2, 3, 4, 5])
    many = np.arange(100) * DAY + 1
    thinned = Q.look_points(many, 100, "daily", max_looks=10)
    assert thinned.size == 10
    assert (thinned[0], thinned[-1]) == (1, 100)
    np.testing.assert_array_equal(Q.look_points(None, 10, [3, 7]), [3, 7, 10])
    assert Q.look_points(None, 0).size == 0


def test_burn_in_and_empty() -> None:
    res = Q.msprt_paired(np.ones(30) * 0.5, design=Q.SequentialDesign(tau=0.1, burn_in=100))
    assert res.p_value == 1.0
    assert res.reason
    empty = Q.msprt_paired(np.array([]), design=Q.SequentialDesign(tau=0.1))
    assert empty.p_value == 1.0
    assert empty.reason == "no paired requests"
    json.dumps(empty.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="tau"):
        Q.msprt_paired(np.ones(5), design=Q.SequentialDesign(tau=0.0))


def test_always_valid_under_continuous_peeking_but_fixed_test_is_not() -> None:
    """A/A: peeking after every request keeps the mSPRT under alpha; a t-test read 20 times
    does not."""
    rng = np.random.default_rng(1)
    reps, n, alpha = 300, 2000, 0.05
    seq_hits = peek_hits = 0
    looks = np.linspace(100, n, 20).astype(int)
    for _ in range(reps):
        d = rng.standard_t(4, n) * 0.5  # heavy-tailed per-request loss differences
        each = Q.SequentialDesign(tau=0.05, looks="each")
        seq_hits += Q.msprt_paired(d, design=each).p_value <= alpha
        cs, cs2 = np.cumsum(d), np.cumsum(d * d)
        k = looks.astype(float)
        mean = cs[looks - 1] / k
        sd = np.sqrt((cs2[looks - 1] - k * mean**2) / (k - 1))
        p = 2 * stats.t.sf(np.abs(mean / (sd / np.sqrt(k))), k - 1)
        peek_hits += bool((p <= alpha).any())
    mcse = math.sqrt(alpha * (1 - alpha) / reps)
    assert seq_hits / reps <= alpha + 2 * mcse
    assert peek_hits / reps > alpha + 3 * mcse


def test_detects_a_real_effect() -> None:
    rng = np.random.default_rng(2)
    d = rng.normal(0.1, 1.0, 5000)
    res = Q.msprt_paired(d, design=Q.SequentialDesign(tau=0.1, looks=25))
    assert res.p_value < 1e-4
    assert res.cs_low[-1] > 0


def test_delong_path_final_look_equals_delong_test() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    y = (rng.random(n) < 0.3).astype(float)
    base = rng.normal(size=n)
    sc = np.round(base + y + rng.normal(size=n), 2)
    sh = np.round(base + 1.2 * y + rng.normal(size=n), 2)
    ts = rng.uniform(0, 7 * DAY, n)  # unsorted on purpose
    res = Q.msprt_delong(y, sc, sh, ts, design=Q.SequentialDesign(tau=0.02))
    fixed = S.delong_test(y, sc, sh)
    assert res.n[-1] == n
    assert res.estimate[-1] == pytest.approx(fixed.difference, abs=1e-12)
    assert res.se[-1] == pytest.approx(fixed.se, rel=1e-9)
    order = np.argsort(ts, kind="stable")
    k = int(res.n[2])
    prefix = S.delong_test(y[order][:k], sc[order][:k], sh[order][:k])
    assert res.estimate[2] == pytest.approx(prefix.difference, abs=1e-12)
    assert res.se[2] == pytest.approx(prefix.se, rel=1e-9)


def test_delong_path_skips_looks_without_both_classes() -> None:
    y = np.r_[np.zeros(300), (np.arange(700) % 3 == 0).astype(float)]
    rng = np.random.default_rng(4)
    s1, s2 = rng.normal(size=1000) + y, rng.normal(size=1000) + y
    design = Q.SequentialDesign(tau=0.02, looks=10, burn_in=50)
    res = Q.msprt_delong(y, s1, s2, min_per_class=10, design=design)
    assert np.isnan(res.se[:3]).all()  # first 300 rows: negatives only
    assert np.isfinite(res.se[-1])


def test_rmse_path_final_look_equals_delta_test() -> None:
    rng = np.random.default_rng(5)
    ec = rng.normal(0, 1.0, 2000)
    eh = 0.8 * ec + rng.normal(0, 0.5, 2000)
    res = Q.msprt_rmse(ec, eh, design=Q.SequentialDesign(tau=0.05, looks=5))
    fixed = S.rmse_difference_test(ec, eh)
    assert res.estimate[-1] == pytest.approx(-fixed.difference)  # improvement = -difference
    assert res.se[-1] == pytest.approx(fixed.se, rel=1e-6)


def test_confidence_sequence_at_another_level_and_its_state() -> None:
    rng = np.random.default_rng(21)
    d = rng.normal(0.05, 1.0, 5000)
    res = Q.msprt_paired(d, design=Q.SequentialDesign(looks=20, tau=0.05, alpha=0.05))
    low, high = Q.confidence_sequence(res, 0.05)
    assert np.allclose(low, res.cs_low)
    assert np.allclose(high, res.cs_high)
    low2, high2 = Q.confidence_sequence(res, 0.05 / 3)  # a Bonferroni/Holm level: wider
    assert np.all(low2 <= low) and np.all(high2 >= high)
    assert Q.cs_state(0.01, 0.02) == "above"
    assert Q.cs_state(-0.02, -0.01) == "below"
    assert Q.cs_state(-0.01, 0.02) == "contains"
    assert Q.cs_state(0.002, -0.03) == "empty"
    assert Q.cs_state(-np.inf, np.inf) == "not_started"
    assert Q.cs_state(-0.004, 0.02, threshold=-0.005) == "above"  # non-inferiority at margin 0.005
