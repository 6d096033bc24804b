"""Helpers every statistic here shares: strict-JSON conversion, normal and t tails, ranks,
paired finite values. Nothing here imports the rest of the evaluator but its array aliases."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypedDict

import numpy as np
from scipy import special

from evaluator.dataset import Array

# ----------------------------------------------------------------------------------------------
# JSON helper (every result here and in the modules above it has a to_dict() built on this)
# ----------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Convert results to plain JSON types: numpy scalars/arrays, tuples, dataclasses, NaN/inf.

    Non-finite floats become ``None`` because strict JSON has no NaN, and a report that silently
    prints ``NaN`` as a number is exactly the kind of mistake this evaluator exists to prevent.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence):
        return [jsonable(v) for v in obj]
    raise TypeError(f"cannot make {type(obj).__name__} JSON-serialisable")


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


class JsonFields:
    """Base of a result dataclass whose JSON is its fields, in declaration order, made strict
    (``jsonable``): one ``to_dict`` for all of them instead of one written out per class."""

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


class NamedTest(JsonFields):
    """A test's result whose JSON leads with the test's name (``TEST``), then its fields."""

    TEST: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"test": self.TEST, **dataclass_dict(self)}


# scipy.special directly: the scipy.stats distribution objects cost ~1 ms per call in argument
# checking, which dominates a decision on a few thousand rows (and the simulations run many).


def norm_sf(x: float) -> float:
    return float(special.ndtr(-x))


def norm_ppf(q: float) -> float:
    return float(special.ndtri(q))


def t_sf(x: float, df: float) -> float:
    return float(special.stdtr(df, -x))


def t_ppf(q: float, df: float) -> float:
    return float(special.stdtrit(df, q))


def z_crit(alpha: float) -> float:
    """Two-sided normal critical value z_{1-alpha/2}."""
    return norm_ppf(1.0 - alpha / 2.0)


def two_sided_normal_p(z: float) -> float:
    return 2.0 * norm_sf(abs(z))


def finite_pairs(a: Array, b: Array) -> tuple[Array, Array, int]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired inputs differ in length: {a.size} vs {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    excluded = int(a.size - np.count_nonzero(ok))
    if excluded:
        a, b = a[ok], b[ok]
    return a, b, excluded



def sorted_midranks(values_sorted: Array) -> Array:
    """1-based midranks of an ascending array: tied values share the mean of their ranks."""
    n = values_sorted.size
    if n == 0:
        return np.empty(0, dtype=np.float64)
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(values_sorted[1:], values_sorted[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], n)
    # ranks start+1 .. end (1-based) average to (start + 1 + end) / 2
    return np.repeat((starts + ends + 1) / 2.0, ends - starts)


def midranks(x: Array) -> Array:
    """Midranks of ``x`` in its own order (equivalent to scipy.stats.rankdata(method='average'))."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = sorted_midranks(x[order])
    return ranks


def z_and_p(estimate: float, se: float) -> tuple[float, float]:
    """z and two-sided p; a zero SE means identical rankings (diff 0 → p=1) or certainty."""
    if se > 0:
        z = estimate / se
        return z, two_sided_normal_p(z)
    if estimate == 0:
        return 0.0, 1.0
    return math.copysign(math.inf, estimate), 0.0


class ZInterval(TypedDict):
    """The fields a z-test result shares: the difference, its SE, z, two-sided p, Wald CI."""

    difference: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float


def z_interval(difference: float, se: float, alpha: float) -> ZInterval:
    """z, the two-sided p and the 1 - alpha Wald interval of ``difference`` (standard error
    ``se``), as the keyword fields of a result."""
    z, p = z_and_p(difference, se)
    half = z_crit(alpha) * se
    return {
        "difference": difference,
        "se": se,
        "z": z,
        "p_value": p,
        "ci_low": difference - half,
        "ci_high": difference + half,
    }
