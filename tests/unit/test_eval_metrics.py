"""Per-model metrics against independent implementations (scikit-learn, statsmodels, loops)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve as sk_calibration_curve
from statsmodels.stats.proportion import proportion_confint

from evaluator.dataset import STATUS_CODES, EvalDataset, ModelColumn
from evaluator.stats import metrics as M


def _data(seed: int, n: int = 400, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(float)
    p = 1 / (1 + np.exp(-(1.2 * y - 0.6 + rng.normal(size=n))))
    if ties:
        p = np.round(p, 2)  # plenty of tied scores
    return y, p


def _slow_delong_var(y: np.ndarray, s: np.ndarray) -> float:
    """DeLong variance straight from the definition, O(n^2)."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_and_delong_ci(seed: int) -> None:
    y, p = _data(seed)
    m = M.auroc(y, p, alpha=0.05)
    assert m.value == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    half = 1.959963984540054 * math.sqrt(_slow_delong_var(y, p))
    assert m.ci_low == pytest.approx(m.value - half, abs=1e-10)
    assert m.ci_high == pytest.approx(m.value + half, abs=1e-10)
    assert m.ci_method == "delong"


def test_auroc_is_never_flipped() -> None:
    y, p = _data(3)
    m = M.auroc(y, 1 - p)
    assert m.value is not None
    assert m.value < 0.5
    assert m.value == pytest.approx(skm.roc_auc_score(y, 1 - p))


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_sklearn(seed: int) -> None:
    y, p = _data(seed, ties=False)
    ll, br = M.log_loss(y, p), M.brier(y, p)
    assert ll.value == pytest.approx(skm.log_loss(y, p), rel=1e-12)
    assert br.value == pytest.approx(skm.brier_score_loss(y, p), rel=1e-12)
    # normal-approximation CI from the per-request losses
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    half = 1.959963984540054 * per.std(ddof=1) / math.sqrt(per.size)
    assert (ll.ci_low, ll.ci_high) == pytest.approx((per.mean() - half, per.mean() + half))


def test_log_loss_clips_like_sklearn() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    p = np.array([0.0, 1.0, 1.0, 0.0, 0.7])  # two confident misses
    m = M.log_loss(y, p)
    assert m.value is not None
    assert math.isfinite(m.value)
    assert m.value == pytest.approx(skm.log_loss(y, p, labels=[0, 1]), rel=1e-9)


def test_threshold_metrics_match_sklearn() -> None:
    y, p = _data(4)
    boot = M.MetricOptions(n_boot=500, seed=7)
    out = M.classification_metrics(y, p, threshold=0.4, options=boot)
    pred = (p >= 0.4).astype(int)
    assert out["accuracy"].value == pytest.approx(skm.accuracy_score(y, pred))
    assert out["precision"].value == pytest.approx(skm.precision_score(y, pred))
    assert out["recall"].value == pytest.approx(skm.recall_score(y, pred))
    assert out["f1"].value == pytest.approx(skm.f1_score(y, pred))
    correct = int((pred == y).sum())
    lo, hi = proportion_confint(correct, y.size, alpha=0.05, method="wilson")
    assert (out["accuracy"].ci_low, out["accuracy"].ci_high) == pytest.approx((lo, hi))
    f1 = out["f1"]
    assert f1.ci_low is not None
    assert f1.ci_high is not None
    assert f1.ci_low < f1.value < f1.ci_high  # type: ignore[operator]
    again = M.classification_metrics(y, p, threshold=0.4, options=boot)["f1"]
    assert (again.ci_low, again.ci_high) == (f1.ci_low, f1.ci_high)  # seeded


@pytest.mark.parametrize("k", [0, 1, 7, 50, 100])
def test_wilson_matches_statsmodels(k: int) -> None:
    lo, hi = proportion_confint(k, 100, alpha=0.1, method="wilson")
    assert M.wilson_interval(k, 100, alpha=0.1) == pytest.approx((lo, hi))


def _ece_loop(y: np.ndarray, p: np.ndarray, n_bins: int, strategy: str) -> float:
    if strategy == "uniform":
        edges = np.linspace(0, 1, n_bins + 1)
    else:
        edges = np.percentile(p, np.linspace(0, 100, n_bins + 1))
    total = 0.0
    for i in range(n_bins):
        lo, hi = edges[i], edges[i + 1]
        inside = (p >= lo) & (p <= hi) if i == 0 else (p > lo) & (p <= hi)
        if i == n_bins - 1:
            inside = p > lo if i else np.ones_like(p, dtype=bool)
        if inside.any():
            total += inside.sum() / p.size * abs(y[inside].mean() - p[inside].mean())
    return total


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_and_calibration_curve(strategy: str) -> None:
    y, p = _data(5, n=600, ties=False)
    m = M.expected_calibration_error(y, p, n_bins=10, strategy=strategy, n_boot=300)
    assert m.value == pytest.approx(_ece_loop(y, p, 10, strategy), abs=1e-12)
    assert m.ci_low is not None
    assert m.ci_high is not None
    assert m.ci_low <= m.value <= m.ci_high  # type: ignore[operator]
    table = M.calibration_curve(y, p, 10, strategy)  # type: ignore[arg-type]
    prob_true, prob_pred = sk_calibration_curve(y, p, n_bins=10, strategy=strategy)
    np.testing.assert_allclose(table.observed_rate, prob_true)
    np.testing.assert_allclose(table.mean_predicted, prob_pred)
    # the same value from the table
    ece = float(np.sum(table.counts / table.counts.sum() * abs(prob_true - prob_pred)))
    assert m.value == pytest.approx(ece)


def test_ece_large_sample_uses_bin_bootstrap_and_brackets_row_bootstrap() -> None:
    y, p = _data(6, n=M.ECE_ROW_BOOTSTRAP_MAX_N + 1000, ties=False)
    big = M.expected_calibration_error(y, p, n_boot=400)
    assert big.ci_method is not None
    assert big.ci_method.startswith("bootstrap-bins")
    assert big.ci_low is not None
    assert big.ci_high is not None
    assert big.ci_low < big.value < big.ci_high  # type: ignore[operator]
    width = big.ci_high - big.ci_low
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(200):
        idx = rng.integers(0, y.size, y.size)
        draws.append(_ece_loop(y[idx], p[idx], 10, "uniform"))
    row_width = float(np.diff(np.quantile(draws, [0.025, 0.975]))[0])
    assert width == pytest.approx(row_width, rel=0.35)


def test_regression_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(8)
    y = rng.normal(10, 3, 500)
    pred = y + rng.normal(0.5, 2, 500)
    out = M.regression_metrics(y, pred)
    assert out["rmse"].value == pytest.approx(math.sqrt(skm.mean_squared_error(y, pred)))
    assert out["mae"].value == pytest.approx(skm.mean_absolute_error(y, pred))
    sq = (pred - y) ** 2
    se = sq.std(ddof=1) / (2 * out["rmse"].value * math.sqrt(sq.size))  # type: ignore[operator]
    assert out["rmse"].ci_high - out["rmse"].value == pytest.approx(1.959963984540054 * se)  # type: ignore[operator]


def test_roc_curve_matches_sklearn() -> None:
    y, p = _data(9)
    ours = M.roc_curve(y, p)
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)
    thin = M.roc_curve(y, p, max_points=10)
    assert thin.fpr.size <= 10
    assert (thin.fpr[0], thin.fpr[-1], thin.tpr[-1]) == (0.0, 1.0, 1.0)


def test_auroc_ci_coverage() -> None:
    """DeLong intervals cover the population AUROC (binormal, known) about 95% of the time."""
    from scipy.stats import norm

    true_auc = float(norm.cdf(1.0 / math.sqrt(2)))
    rng = np.random.default_rng(10)
    hits = 0
    reps = 300
    for _ in range(reps):
        y = (rng.random(150) < 0.4).astype(float)
        s = rng.normal(size=150) + y
        m = M.auroc(y, s)
        hits += m.ci_low <= true_auc <= m.ci_high  # type: ignore[operator]
    assert 0.91 <= hits / reps <= 0.98


# ------------------------------------------------------------------------------------------
# Robustness
# ------------------------------------------------------------------------------------------


def test_nan_and_inf_scores_are_excluded_and_counted() -> None:
    y, p = _data(11, ties=False)
    dirty = p.copy()
    dirty[[0, 5, 9]] = [np.nan, np.inf, -np.inf]
    labels = y.copy()
    labels[3] = 0.5  # not a 0/1 label
    out = M.classification_metrics(labels, dirty)
    keep = np.isfinite(dirty) & np.isin(labels, (0, 1))
    assert out["auroc"].excluded == {"nonfinite_score": 3, "invalid_label": 1}
    assert out["auroc"].n == int(keep.sum())
    assert out["auroc"].value == pytest.approx(skm.roc_auc_score(labels[keep], dirty[keep]))
    assert out["log_loss"].value == pytest.approx(skm.log_loss(labels[keep], dirty[keep]))


def test_single_class_window_gives_reasons_not_numbers() -> None:
    y = np.zeros(50)
    p = np.linspace(0.01, 0.99, 50)
    out = M.classification_metrics(y, p)
    assert out["auroc"].value is None
    assert "all 50 labels are 0" in (out["auroc"].reason or "")
    assert out["recall"].value is None
    assert out["recall"].reason
    assert out["log_loss"].value is not None  # still defined on one class
    one_pos = y.copy()
    one_pos[-1] = 1
    m = M.auroc(one_pos, p)
    assert m.value == pytest.approx(1.0)
    assert m.ci_low is None
    assert "CI undefined" in (m.reason or "")


def test_empty_inputs() -> None:
    out = M.classification_metrics(np.array([]), np.array([]))
    assert all(v.value is None and v.reason for v in out.values())
    reg = M.regression_metrics(np.array([]), np.array([]))
    assert all(v.value is None and v.reason for v in reg.values())
    with pytest.raises(ValueError, match="differ in length"):
        M.auroc(np.zeros(3), np.zeros(4))


def test_scores_outside_unit_interval_are_not_probabilities() -> None:
    y, p = _data(12)
    logits = np.log(p.clip(0.01, 0.99) / (1 - p.clip(0.01, 0.99)))
    out = M.classification_metrics(y, logits)
    assert out["auroc"].value == pytest.approx(skm.roc_auc_score(y, logits))
    for name in ("log_loss", "brier", "ece"):
        assert out[name].value is None
        assert "outside [0, 1]" in (out[name].reason or "")


def _dataset() -> EvalDataset:
    y, p = _data(13, n=300)
    n = y.size
    rng = np.random.default_rng(13)
    ok = np.zeros(n, dtype=np.int8)
    status = ok.copy()
    status[:20] = STATUS_CODES["timeout"]
    chall_scores = np.clip(p + rng.normal(0, 0.05, n), 0, 1)
    chall_scores[:20] = np.nan
    models = {
        "a": ModelColumn("a", "champion", p, ok, np.full(n, 3.0)),
        "b": ModelColumn("b", "challenger", chall_scores, status, np.full(n, 4.0)),
    }
    ones = np.ones(n)
    return EvalDataset(
        "fraud",
        "classification",
        "a",
        np.arange(n).astype(object),
        np.arange(n, dtype=float),
        y,
        np.full(n, np.nan),
        np.full(n, "a", dtype=object),
        ones,
        {"a": ones},
        np.full(n, "champion", dtype=object),
        models,
    )


def test_dataset_metrics_common_and_own_rows_are_json() -> None:
    ds = _dataset()
    common = M.evaluate_models(ds, options=M.MetricOptions(n_boot=200))
    assert common["a"].n == common["b"].n == 280
    assert common["a"].excluded["not_in_common_rows"] == 20
    assert common["b"].excluded["status_not_ok"] == 20
    own = M.evaluate_models(ds, rows="own", options=M.MetricOptions(n_boot=200))
    assert own["a"].n == 300
    assert own["a"].metrics["auroc"].value == pytest.approx(
        skm.roc_auc_score(ds.labels, ds.models["a"].scores)
    )
    text = json.dumps({k: v.to_dict() for k, v in common.items()}, allow_nan=False)
    assert '"auroc"' in text
