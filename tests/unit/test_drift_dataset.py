"""The dataset-level drift rule (issue 20 follow-up): a broad shift that moves many features a
little pages on every day, while null data, tiny effects at a huge n and noise at a small n do
not."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import generate_latest

from evaluator.config import DriftConfig
from evaluator.drift import (
    DriftMetrics,
    FeatureData,
    FeatureDrift,
    Threshold,
    compute_drift,
    dataset_rule,
    feature_table,
    numeric_drift,
)
from evaluator.drift.thresholds import _dataset_base
from evaluator.report.document import render_markdown
from evaluator.report.drift import drift_blocks

CFG = DriftConfig(adaptive=False)


def _frames(rng: np.random.Generator, n_ref: int, n_live: int, n_features: int,
            shifted: int, shift_sd: float) -> tuple[FeatureData, FeatureData]:
    ref = {f"x{j:02d}": rng.normal(0, 1, n_ref) for j in range(n_features)}
    live = {f"x{j:02d}": rng.normal(shift_sd if j < shifted else 0.0, 1, n_live)
            for j in range(n_features)}
    return FeatureData(columns=ref, source="ref"), FeatureData(columns=live, source="live")


def test_dataset_floors_are_a_step_below_the_feature_floors() -> None:
    assert _dataset_base(CFG.psi_alert, True, CFG) == pytest.approx(0.1)
    assert _dataset_base(CFG.js_alert, False, CFG) == pytest.approx(0.1 * np.sqrt(0.5))
    f = numeric_drift("x", np.random.default_rng(0).normal(0, 1, 2000),
                      np.random.default_rng(1).normal(0, 1, 1000), CFG)
    assert f.dataset_floor is not None and f.dataset_floor.value == pytest.approx(0.1)
    assert f.threshold is not None and f.threshold.value == pytest.approx(0.2)


def test_broad_half_sd_shift_is_dataset_drift_on_every_seed() -> None:
    """12 of 32 features 0.5 SD (the simulation's geometry: 4,000 reference rows of the same
    weekday, 1,000 live): each feature's own PSI >= 0.2 flag is a coin toss at 0.5 SD, the
    dataset rule counts all twelve."""
    flagged_shares = []
    for seed in range(8):
        ref, live = _frames(np.random.default_rng(seed), 4000, 1000, 32, 12, 0.5)
        result = compute_drift(ref, live, CFG, route="r")
        assert result.dataset_drift and result.significant
        assert result.dataset_share is not None and result.dataset_share >= 12 / 32
        assert set(result.dataset_features) >= {f"x{j:02d}" for j in range(12)}
        assert set(result.dataset_features) <= {f"x{j:02d}" for j in range(12)}
        flagged_shares.append(result.share)
        broad = [f for f in result.features if f.dataset_counted and not f.drifted]
        assert all("counted by the dataset rule" in f.why for f in broad)
    # the share of flagged features alone falls below 30% on some seeds: what the rule fixes
    assert min(flagged_shares) < CFG.drift_share


def test_broad_shift_below_the_single_feature_floor() -> None:
    """0.4 SD in 40% of the features (PSI about 0.16 each, under the 0.2 a feature alone
    needs): few features are flagged, the dataset rule counts the shifted ones and pages."""
    ref, live = _frames(np.random.default_rng(11), 4000, 1000, 20, 8, 0.4)
    result = compute_drift(ref, live, CFG, route="r")
    assert result.share is not None and result.share < CFG.drift_share
    assert result.dataset_drift
    assert result.dataset_features == [f"x{j:02d}" for j in range(8)]
    # the report and the gauges say what the dataset rule counted
    assert "Dataset rule: 8 feature(s) counted (40%)" in render_markdown(drift_blocks(result))
    assert "the dataset rule counts 8 (40%" in feature_table(result)
    metrics = DriftMetrics()
    metrics.update(result)
    text = generate_latest(metrics.registry).decode()
    assert 'understudy_drift_dataset_share{route="r"} 0.4' in text
    assert 'understudy_drift_dataset_counted{feature="x00",route="r"} 1.0' in text
    assert 'understudy_drift_dataset_counted{feature="x19",route="r"} 0.0' in text


@pytest.mark.parametrize(("n_ref", "n_live"), [(4000, 1000), (100, 100)])
def test_dataset_rule_is_quiet_on_null_data(n_ref: int, n_live: int) -> None:
    """No shift: the dataset rule counts nothing beyond the feature rule's own (rare) flags.
    At 100 rows a side the PSI noise alone is about 0.18, above the 0.1 floor, so there the
    BH-corrected KS test is what keeps the features out."""
    for seed in range(20):
        ref, live = _frames(np.random.default_rng(100 + seed), n_ref, n_live, 32, 0, 0.0)
        result = compute_drift(ref, live, CFG, route="r")
        assert not result.dataset_drift
        assert result.dataset_features == result.drifted_features
        assert len(result.drifted_features) <= 2


def test_huge_n_does_not_count_a_trivial_shift() -> None:
    """0.05 SD in every feature at 200k/50k rows: KS p is ~1e-20 (BH keeps them all), PSI
    is ~0.003, below the 0.1 floor: not a shift anyone needs paging for."""
    ref, live = _frames(np.random.default_rng(7), 200_000, 50_000, 6, 6, 0.05)
    result = compute_drift(ref, live, CFG, route="r")
    assert all(f.dataset_qvalue is not None and f.dataset_qvalue < 1e-6
               for f in result.features)
    assert result.dataset_share == 0.0 and not result.dataset_drift


def _feature(name: str, p: float, psi: float, drifted: bool = False) -> FeatureDrift:
    return FeatureDrift(name=name, kind="numeric", status="drift" if drifted else "ok",
                        drifted=drifted, n_ref=1000, n_live=1000, missing_ref=0.0,
                        missing_live=0.0, psi=psi, ks_pvalue=p,
                        dataset_floor=Threshold(0.1))


def test_multiplicity_correction_and_effect_floor() -> None:
    # p = 0.009 < ks_alpha, but one of 20 tests: BH q = 0.18, not counted
    feats = [_feature("a", 0.009, 0.15)] + [_feature(f"n{i}", 0.5, 0.01) for i in range(19)]
    assert dataset_rule(feats, CFG) == 0.0
    assert feats[0].dataset_qvalue == pytest.approx(0.18)
    # significant but below the floor: not counted; a drifted feature always is
    feats = [_feature("a", 1e-9, 0.09), _feature("b", 1e-9, 0.12),
             _feature("c", 0.2, 0.5, drifted=True), _feature("d", 0.9, 0.0)]
    assert dataset_rule(feats, CFG) == pytest.approx(2 / 4)
    assert [f.dataset_counted for f in feats] == [False, True, True, False]
    insufficient = FeatureDrift(name="e", kind="numeric", status="insufficient", drifted=False,
                                n_ref=10, n_live=10, missing_ref=0.0, missing_live=0.0)
    assert dataset_rule([insufficient], CFG) is None
