"""What a comparison compares: feature columns, timestamps and scores of one window, and the
vocabulary (column names, constants) both sides share."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DAY = 86400.0
HOUR = 3600.0
OTHER = "(other)"
TS_COLUMNS = ("ts", "timestamp")
IGNORED_COLUMNS = ("request_id", "id", "label", "labels", "target", "y", "reward")
SCORE_PREFIXES = ("score:", "score.")
ALL_MODELS = "*"  # reference scores that apply to every model (a bare `score` column)
KS_EXACT_MAX = 1_000_000  # n_ref * n_live above which KS uses the asymptotic distribution


@dataclass
class FeatureData:
    """One side of a comparison: feature columns, optional timestamps, scores per model.

    Numeric columns are float64 (NaN = missing); categorical ones are object arrays of str
    (None = missing). `scores[model]` pairs with `score_ts[model]` when timestamps are known;
    `scores["*"]` (a reference file's bare `score` column) applies to every model.
    """

    columns: dict[str, np.ndarray]
    ts: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    score_ts: dict[str, np.ndarray] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    source: str = ""
    since: float | None = None
    until: float | None = None
    # CSV only: the original text of numeric-looking columns, so a feature that is categorical
    # live compares with the reference's own spelling ("01" stays "01").
    raw_text: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.ts is not None:
            return int(self.ts.shape[0])
        return max((int(c.shape[0]) for c in self.columns.values()), default=0)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n": len(self), "since": self.since, "until": self.until,
                "since_iso": _iso(self.since), "until_iso": _iso(self.until)}


def _iso(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _is_numeric(col: np.ndarray) -> bool:
    return col.dtype.kind in "fiub"


def _obj(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _missing_share(total: int, present: int) -> float:
    return float((total - present) / total) if total else 0.0


def _present_text(col: np.ndarray) -> np.ndarray:
    mask = np.fromiter((v is not None for v in col), dtype=bool, count=col.size)
    return mask
