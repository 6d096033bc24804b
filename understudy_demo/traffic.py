"""Simulated live traffic with ground truth, for the demo, tests, load tests and evaluator tests.

The samplers draw from exactly the processes in `understudy_demo.truth` that the demo models were
fitted on, so a model's measured quality on simulated traffic is its real quality. Each sampler
owns a seeded generator: the same seed and the same sequence of calls give the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from understudy_demo import truth

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class FraudTraffic:
    """Fraud-scoring requests (features [n, 8] float32) and their eventual 0/1 labels.

    `mean_shift`/`scale` move chosen features away from the training distribution (covariate
    shift: labels still follow the true P(fraud | x)), which is what drift detection must catch.
    """

    n_features = truth.FRAUD_N_FEATURES
    feature_names = truth.FRAUD_FEATURES

    def __init__(
        self,
        seed: int = 0,
        mean_shift: Mapping[int, float] | None = None,
        scale: Mapping[int, float] | None = None,
    ) -> None:
        self.seed = seed
        self.mean_shift: dict[int, float] = dict(mean_shift or {})
        self.scale: dict[int, float] = dict(scale or {})
        self._rng = np.random.default_rng(seed)
        self._chol = np.linalg.cholesky(truth.fraud_covariance())
        self._mean = np.asarray(truth.FRAUD_MEAN, dtype=np.float64)

    def shifted(
        self,
        mean_shift: Mapping[int, float] | None = None,
        scale: Mapping[int, float] | None = None,
        seed: int | None = None,
    ) -> FraudTraffic:
        """A new sampler whose features i are scaled by scale[i] and moved by mean_shift[i] SDs."""
        return FraudTraffic(self.seed if seed is None else seed, mean_shift, scale)

    def features(self, n: int) -> F32Array:
        """n feature rows, without labels (what a client sends)."""
        x = self._rng.standard_normal((n, self.n_features)) @ self._chol.T + self._mean
        for i, s in self.scale.items():
            x[:, i] *= s
        for i, m in self.mean_shift.items():
            x[:, i] += m
        return x.astype(np.float32)

    def labels(self, features: npt.ArrayLike) -> IntArray:
        """Draw 0/1 outcomes for given rows from the true P(fraud | x)."""
        p = truth.fraud_probability(np.asarray(features, dtype=np.float32))
        return (self._rng.random(p.shape[0]) < p).astype(np.int64)

    def sample(self, n: int) -> tuple[F32Array, IntArray]:
        """n rows of features [n, 8] float32 and their labels [n] int64."""
        x = self.features(n)
        return x, self.labels(x)

    @staticmethod
    def true_probability(features: npt.ArrayLike) -> F64Array:
        """The Bayes-optimal score for given rows (an oracle model for comparisons)."""
        return truth.fraud_probability(np.asarray(features, dtype=np.float32))


class PriceTraffic:
    """Price-prediction requests (features [n, 4] float32) and their observed prices."""

    n_features = truth.PRICE_N_FEATURES
    feature_names = truth.PRICE_FEATURES

    def __init__(
        self,
        seed: int = 0,
        mean_shift: Mapping[int, float] | None = None,
        scale: Mapping[int, float] | None = None,
    ) -> None:
        self.seed = seed
        self.mean_shift: dict[int, float] = dict(mean_shift or {})
        self.scale: dict[int, float] = dict(scale or {})
        self._rng = np.random.default_rng(seed)

    def shifted(
        self,
        mean_shift: Mapping[int, float] | None = None,
        scale: Mapping[int, float] | None = None,
        seed: int | None = None,
    ) -> PriceTraffic:
        """A new sampler with features scaled and shifted like FraudTraffic.shifted."""
        return PriceTraffic(self.seed if seed is None else seed, mean_shift, scale)

    def features(self, n: int) -> F32Array:
        """n feature rows, without targets."""
        x = self._rng.standard_normal((n, self.n_features))
        for i, s in self.scale.items():
            x[:, i] *= s
        for i, m in self.mean_shift.items():
            x[:, i] += m
        return x.astype(np.float32)

    def targets(self, features: npt.ArrayLike) -> F64Array:
        """Observed prices for given rows: true mean plus noise."""
        mu = truth.price_mean(np.asarray(features, dtype=np.float32))
        return mu + self._rng.normal(0.0, truth.PRICE_NOISE_SD, mu.shape[0])

    def sample(self, n: int) -> tuple[F32Array, F64Array]:
        """n rows of features [n, 4] float32 and their observed prices [n] float64."""
        x = self.features(n)
        return x, self.targets(x)


def v2_infer_body(
    features: npt.ArrayLike,
    input_name: str = "features",
    request_id: str | None = None,
    outputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A KServe V2 JSON inference body for a batch of FP32 rows [n, d] (or one row [d])."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim == 1:
        x = x[np.newaxis, :]
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    if request_id is not None:
        body["id"] = request_id
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body
