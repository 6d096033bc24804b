"""What a drift run found, per feature and per model; `DriftResult.to_dict()` is drift.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evaluator.drift.data import _iso
from evaluator.stats.common import JsonFields, jsonable


@dataclass
class Threshold(JsonFields):
    """A threshold and where it came from (`fixed` convention or `adaptive` from history).

    `null_center`/`null_scale`: median and robust SD (1.4826 MAD; on the square-root scale for
    PSI) of the statistic over `periods` past windows; `excluded` windows paged and were left
    out."""

    value: float
    source: str = "fixed"
    null_center: float | None = None
    null_scale: float | None = None
    periods: int = 0
    excluded: int = 0


@dataclass
class FeatureDrift(JsonFields):
    """One feature's comparison. `status`: ok | warn | drift | insufficient | missing."""

    name: str
    kind: str  # numeric | categorical
    status: str
    drifted: bool
    n_ref: int
    n_live: int
    missing_ref: float  # share of rows without a value
    missing_live: float
    psi: float | None = None
    threshold: Threshold | None = None  # PSI (numeric) or JS distance (categorical)
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    wasserstein: float | None = None
    wasserstein_norm: float | None = None
    mean_ref: float | None = None
    mean_live: float | None = None
    std_ref: float | None = None
    std_live: float | None = None
    mean_shift_sd: float | None = None
    std_ratio: float | None = None
    chi2: float | None = None
    chi2_pvalue: float | None = None
    chi2_dof: int | None = None
    js_distance: float | None = None
    unseen_share: float | None = None
    unseen: dict[str, int] = field(default_factory=dict)  # top unseen categories, live counts
    unseen_baseline: float | None = None  # the reference's own rate of new values
    unseen_baseline_source: str | None = None
    unseen_pvalue: float | None = None  # binomial, live unseen count vs the baseline rate
    unseen_threshold: float | None = None  # unseen share from which the feature is flagged
    missing_pvalue: float | None = None  # chi-squared on (present, missing) x (ref, live)
    min_detectable_missing_change: float | None = None
    min_detectable_shift_sd: float | None = None  # numeric: see min_detectable_shift
    detection_limit: str | None = None  # what bounds the smallest detectable change
    shares: dict[str, list[float]] = field(default_factory=dict)  # category -> [ref, live]
    rules: list[str] = field(default_factory=list)  # distribution | unseen | missing | absent
    reasons: list[str] = field(default_factory=list)
    why: str = ""  # why it was or was not flagged, and what it can detect
    # The dataset rule (`dataset_rule`): the lower effect floor (PSI or JS) a feature must
    # reach to count towards the dataset share, its BH-adjusted distribution p-value, and
    # whether it counts (every drifted feature does).
    dataset_floor: Threshold | None = None
    dataset_qvalue: float | None = None
    dataset_counted: bool = False


@dataclass
class PredictionDrift(JsonFields):
    """One model's score distribution against the reference."""

    model: str
    role: str
    status: str
    drifted: bool
    n_ref: int
    n_live: int
    psi: float | None = None
    threshold: Threshold | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    wasserstein: float | None = None
    mean_ref: float | None = None
    mean_live: float | None = None
    positive_share_ref: float | None = None
    positive_share_live: float | None = None
    confidence: list[dict[str, Any]] = field(default_factory=list)  # bucket, ref, live
    confidence_psi: float | None = None
    min_detectable_shift_sd: float | None = None  # see min_detectable_shift
    detection_limit: str | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class DriftResult:
    """Everything one drift run found; `to_dict()` is drift.json."""

    route: str
    generated_at: float
    reference: dict[str, Any]
    live: dict[str, Any]
    features: list[FeatureDrift]
    predictions: list[PredictionDrift]
    share: float | None  # share of evaluated features that drift (the feature rules)
    dataset_drift: bool
    seasonal: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    dataset_share: float | None = None  # share the dataset rule counts (`dataset_rule`)

    @property
    def drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    @property
    def dataset_features(self) -> list[str]:
        """Features the dataset rule counts: the drifted ones and those in a broad shift."""
        return [f.name for f in self.features if f.dataset_counted]

    @property
    def drifted_models(self) -> list[str]:
        return [p.model for p in self.predictions if p.drifted]

    @property
    def significant(self) -> bool:
        """Worth a page: dataset drift, or any model's score distribution moved."""
        return self.dataset_drift or bool(self.drifted_models)

    @property
    def verdict(self) -> str:
        if self.share is None:
            return "INSUFFICIENT"
        return "DRIFT" if self.significant else "STABLE"

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "route": self.route,
            "generated_at": self.generated_at,
            "generated_at_iso": _iso(self.generated_at),
            "verdict": self.verdict,
            "dataset_drift": self.dataset_drift,
            "share": self.share,
            "dataset_share": self.dataset_share,
            "drifted_features": self.drifted_features,
            "dataset_features": self.dataset_features,
            "drifted_models": self.drifted_models,
            "reference": self.reference,
            "live": self.live,
            "seasonal": self.seasonal,
            "settings": self.settings,
            "features": [f.to_dict() for f in self.features],
            "predictions": [p.to_dict() for p in self.predictions],
            "notes": list(self.notes),
        })
