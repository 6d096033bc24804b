"""The ground-truth data-generating processes behind the demo models.

One source of truth shared by `deploy/triton/generate_models.py` (which fits the demo models on
samples from these processes) and `understudy_demo.traffic` (which simulates live traffic and the
labels that arrive later). Changing a constant here changes what "better" means for the demo
models, so regenerate the model repository afterwards.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# --- fraud: binary classification, 8 features, ~15% positives ---------------------------------

FRAUD_FEATURES: tuple[str, ...] = (
    "amount_z",
    "merchant_risk",
    "account_age_z",
    "velocity_1h",
    "distance_home",
    "night_time",
    "card_present",
    "prior_chargebacks",
)
FRAUD_N_FEATURES = len(FRAUD_FEATURES)

# Features are standard normal with mild correlation (amount ~ velocity, distance ~ card_present).
FRAUD_MEAN: tuple[float, ...] = (0.0,) * FRAUD_N_FEATURES
FRAUD_CORRELATIONS: tuple[tuple[int, int, float], ...] = (
    (0, 3, 0.3),
    (4, 6, -0.25),
    (1, 7, 0.2),
)

# True log-odds: intercept + w·x + interaction(amount × velocity) + curvature(merchant_risk).
# The nonlinear terms are what separates a good model (fraud_v4) from the linear champion.
FRAUD_INTERCEPT = -2.7
FRAUD_WEIGHTS: tuple[float, ...] = (0.50, 0.63, -0.32, 0.40, 0.27, 0.18, -0.27, 0.36)
FRAUD_INTERACTIONS: tuple[tuple[int, int, float], ...] = ((0, 3, 0.70),)
FRAUD_SQUARES: tuple[tuple[int, float], ...] = ((1, 0.40),)

# --- price: regression, 4 features --------------------------------------------------------------

PRICE_FEATURES: tuple[str, ...] = ("size_z", "location_z", "age_z", "condition_z")
PRICE_N_FEATURES = len(PRICE_FEATURES)
PRICE_INTERCEPT = 250.0
PRICE_WEIGHTS: tuple[float, ...] = (40.0, 25.0, -15.0, 10.0)
PRICE_INTERACTIONS: tuple[tuple[int, int, float], ...] = ((0, 1, 12.0),)
PRICE_SQUARES: tuple[tuple[int, float], ...] = ((2, 6.0),)
PRICE_NOISE_SD = 10.0


def fraud_covariance() -> FloatArray:
    """Covariance of the fraud features (unit variances plus FRAUD_CORRELATIONS)."""
    cov = np.eye(FRAUD_N_FEATURES)
    for i, j, rho in FRAUD_CORRELATIONS:
        cov[i, j] = cov[j, i] = rho
    return cov


def _log_odds(
    x: npt.ArrayLike,
    intercept: float,
    weights: tuple[float, ...],
    interactions: tuple[tuple[int, int, float], ...],
    squares: tuple[tuple[int, float], ...],
) -> FloatArray:
    """intercept + w·x + Σ c·x_i·x_j + Σ d·(x_i² − 1), evaluated in float64."""
    xs = np.asarray(x, dtype=np.float64)
    out = intercept + xs @ np.asarray(weights, dtype=np.float64)
    for i, j, c in interactions:
        out = out + c * xs[:, i] * xs[:, j]
    for i, d in squares:
        out = out + d * (xs[:, i] ** 2 - 1.0)
    return out


def fraud_logit(x: npt.ArrayLike) -> FloatArray:
    """True log-odds of fraud for rows of x [n, 8]."""
    return _log_odds(x, FRAUD_INTERCEPT, FRAUD_WEIGHTS, FRAUD_INTERACTIONS, FRAUD_SQUARES)


def fraud_probability(x: npt.ArrayLike) -> FloatArray:
    """True P(fraud | x) for rows of x [n, 8]: the Bayes-optimal score."""
    return 1.0 / (1.0 + np.exp(-fraud_logit(x)))


def price_mean(x: npt.ArrayLike) -> FloatArray:
    """True E[price | x] for rows of x [n, 4]; observed prices add N(0, PRICE_NOISE_SD²) noise."""
    return _log_odds(x, PRICE_INTERCEPT, PRICE_WEIGHTS, PRICE_INTERACTIONS, PRICE_SQUARES)
