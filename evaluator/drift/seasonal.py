"""Seasonal segments and past windows: which reference rows face the live window."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluator.config import DriftConfig
from evaluator.drift.data import DAY, HOUR, FeatureData


def segment_keys(ts: np.ndarray, mode: str, utc_offset_hours: float = 0.0) -> np.ndarray:
    """The segment of each timestamp: hour (0-23), weekday (Mon=0), weekday*24+hour, or
    weekend flag; all zeros for `none`."""
    local = np.asarray(ts, dtype=float) + utc_offset_hours * HOUR
    days = np.floor(local / DAY)
    dow = ((days + 3) % 7).astype(np.int64)  # 1970-01-01 was a Thursday (Mon = 0)
    hour = np.floor((local - days * DAY) / HOUR).astype(np.int64)
    if mode == "hour_of_day":
        return hour
    if mode == "day_of_week":
        return dow
    if mode == "day_of_week_hour":
        return dow * 24 + hour
    if mode == "weekday_weekend":
        return (dow >= 5).astype(np.int64)
    return np.zeros(local.shape, dtype=np.int64)


def period_ids(ts: np.ndarray, anchor: float, length: float) -> np.ndarray:
    """Past windows as long as the live window, aligned to its start (`anchor`)."""
    return np.floor((np.asarray(ts, dtype=float) - anchor) / length).astype(np.int64)


@dataclass
class _Null:
    """Past windows of the reference: the period id and segment key of every reference row.

    Each past window is compared with the rest of *its own* segment(s) (a past Saturday with
    the other Saturdays, a past Monday with the other Mondays), and those values, pooled over
    all windows, are the statistic's normal variation. Pooling over segments is what makes the
    estimate usable: four weeks of history hold four Saturdays but twenty-eight days.
    """

    periods: np.ndarray
    keys: np.ndarray


@dataclass
class _Plan:
    """Which reference rows face the live window, and the past windows for thresholds.

    `ref_keys` (None: no segments, every row) is the segment of each reference row and
    `live_mix` the share of live rows per segment: the reference rows that face the live
    window are those segments in the live window's proportions (`_segment_rows`)."""

    ref_keys: np.ndarray | None
    live_mix: dict[int, float]
    null: _Null | None  # None: fixed thresholds
    score_keys: dict[str, np.ndarray]
    score_null: dict[str, _Null]
    info: dict[str, Any]


def _plan(reference: FeatureData, live: FeatureData, cfg: DriftConfig,
          notes: list[str]) -> _Plan:
    mode = cfg.seasonality
    info: dict[str, Any] = {"mode": mode, "applied": False, "segments": [],
                            "adaptive": False, "utc_offset_hours": cfg.utc_offset_hours}
    ref_ts, live_ts = reference.ts, live.ts
    have_time = bool(ref_ts is not None and ref_ts.size and live_ts is not None and live_ts.size)
    ref_keys: np.ndarray | None = None
    live_mix: dict[int, float] = {}
    if mode != "none":
        if not have_time:
            notes.append(f"seasonality {mode} needs timestamps on both sides (a `ts` column in "
                         f"the reference file); compared with the whole reference instead")
        else:
            assert ref_ts is not None
            assert live_ts is not None
            keys, counts = np.unique(segment_keys(live_ts, mode, cfg.utc_offset_hours),
                                     return_counts=True)
            all_keys = segment_keys(ref_ts, mode, cfg.utc_offset_hours)
            mask = np.isin(all_keys, keys)
            if int(mask.sum()) < cfg.min_samples:
                notes.append(f"the reference has {int(mask.sum())} rows in the live window's "
                             f"{mode} segment(s) (< min_samples {cfg.min_samples}); compared "
                             f"with the whole reference instead")
            else:
                ref_keys = all_keys
                live_mix = {int(k): float(c / counts.sum()) for k, c in
                            zip(keys, counts, strict=True)}
                info.update(applied=True, segments=[_segment_name(int(k), mode) for k in keys],
                            segment_weights={_segment_name(k, mode): round(w, 4)
                                             for k, w in live_mix.items()},
                            reference_rows=int(mask.sum()))
    applied = mode if ref_keys is not None else "none"
    null: _Null | None = None
    score_keys: dict[str, np.ndarray] = {}
    score_null: dict[str, _Null] = {}
    length = _window_length(live)
    anchor = live.since if live.since is not None else (
        float(np.min(live_ts)) if live_ts is not None and live_ts.size else None)
    adaptive = bool(cfg.adaptive and have_time and length and anchor is not None)
    if adaptive:
        assert ref_ts is not None
        assert length is not None
        assert anchor is not None
        null = _Null(period_ids(ref_ts, anchor, length),
                     segment_keys(ref_ts, applied, cfg.utc_offset_hours))
        info.update(adaptive=True, period_s=length)
    elif cfg.adaptive:
        notes.append("adaptive thresholds need timestamps on both sides and a live window "
                     "length; fixed thresholds used")
    for model, sts in reference.score_ts.items():
        if ref_keys is not None:
            score_keys[model] = segment_keys(sts, mode, cfg.utc_offset_hours)
        if adaptive:
            assert length is not None
            assert anchor is not None
            score_null[model] = _Null(period_ids(sts, anchor, length),
                                      segment_keys(sts, applied, cfg.utc_offset_hours))
    return _Plan(ref_keys, live_mix, null, score_keys, score_null, info)


def _segment_rows(keys: np.ndarray | None, mix: Mapping[int, float],
                  eligible: np.ndarray | None, size: int) -> np.ndarray | None:
    """Reference rows of the live window's segments, in the live window's proportions.

    A live window from Friday 18:00 to Saturday 18:00 is 25% Friday and 75% Saturday; taking
    every Friday and Saturday row would compare it with a 50/50 mix and see the weekend
    pattern as drift. Each segment keeps `share x N` of its rows, N the largest total every
    segment can supply, picked evenly through time (deterministic; the statistics stay the
    unweighted, exact ones). `eligible` (None: all) drops rows of excluded past windows.
    None: every eligible row (no segments)."""
    if keys is None:
        return eligible
    ok = np.ones(size, dtype=bool) if eligible is None else eligible
    rows = [(w, np.flatnonzero(ok & (keys == k))) for k, w in mix.items() if w > 0]
    if any(idx.size == 0 for _, idx in rows):  # a segment with no history: the rest, unweighted
        return ok & np.isin(keys, list(mix))
    total = min(idx.size / w for w, idx in rows)
    out = np.zeros(size, dtype=bool)
    for w, idx in rows:
        take = min(idx.size, round(w * total))
        if take:
            out[idx[np.unique(np.linspace(0, idx.size - 1, take).round().astype(np.int64))]] = True
    return out


def reference_bounds(live_since: float, length: float, pinned_until: float | None = None
                     ) -> tuple[float, float]:
    """[since, until) of a log reference: the `length` before the live window, or before
    `pinned_until` while a drift episode is open — so the reference never learns the incident
    it is paging about (the pin is where the episode's first live window started)."""
    until = live_since if pinned_until is None else min(live_since, pinned_until)
    return until - length, until


def _window_length(live: FeatureData) -> float | None:
    if live.since is not None and live.until is not None and live.until > live.since:
        return float(live.until - live.since)
    if live.ts is not None and live.ts.size > 1:
        span = float(np.max(live.ts) - np.min(live.ts))
        return span if span > 0 else None
    return None


_DOW = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _segment_name(key: int, mode: str) -> str:
    if mode == "hour_of_day":
        return f"{key:02d}h"
    if mode == "day_of_week":
        return _DOW[key]
    if mode == "day_of_week_hour":
        return f"{_DOW[key // 24]} {key % 24:02d}h"
    if mode == "weekday_weekend":
        return "weekend" if key else "weekday"
    return "all"
