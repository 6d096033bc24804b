"""Windows of the inference log: the live window, the log reference, and reading both."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluator.config import DriftConfig, EvaluatorConfig
from evaluator.drift.compute import compute_drift
from evaluator.drift.data import FeatureData, _iso
from evaluator.drift.errors import EmptyReferenceError, EmptyWindowError
from evaluator.drift.reference import load_reference
from evaluator.drift.result import DriftResult
from evaluator.drift.seasonal import reference_bounds

log = logging.getLogger(__name__)


def window_data(store: Any, route: str, since: float | None, until: float | None, *,
                names: Mapping[str, Sequence[str]] | None = None) -> FeatureData:
    """Features and per-model scores (with timestamps) of the route's predictions in a window."""
    frame = store.feature_columns(route, since, until, names=names)
    scores, score_ts, roles = _read_scores(store, route, since, until)
    desc = f"log {route} [{_iso(since) or '…'}, {_iso(until) or '…'})"
    return FeatureData(columns=dict(frame.columns), ts=np.asarray(frame.ts, dtype=float),
                       scores=scores, score_ts=score_ts, roles=roles, source=desc,
                       since=since, until=until)


def _read_scores(store: Any, route: str, since: float | None, until: float | None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """Scores with their timestamps and each model's role.

    Seasonal matching needs the time of every score, which `Store.prediction_scores` does not
    return; this reads the same rows with `ts` and `role` through the store's engine and falls
    back to the public call (no timestamps, no roles) if the store's internals change.
    """
    try:
        from evaluator.store import ROLE_NAMES, Store, _num

        where, params = Store._window(route, since, until)
        with store._lock:
            e = store._connect()
            outs = e.columns(
                "SELECT o.model, o.role, o.score, i.ts FROM outcomes o "  # noqa: S608
                f"JOIN inferences i ON i.id = o.inf_id WHERE {where} AND o.status = 0 "
                "ORDER BY i.ts, i.id", params)
            lookup = store._name_lookup(e)
        models = _num(outs["model"], np.int64)
        role = _num(outs["role"], np.int64)
        score, ts = _num(outs["score"]), _num(outs["ts"])
        scores: dict[str, np.ndarray] = {}
        times: dict[str, np.ndarray] = {}
        roles: dict[str, str] = {}
        for mid in sorted(set(models.tolist())):
            mask = models == mid
            name = str(lookup[mid])
            scores[name], times[name] = score[mask], ts[mask]
            # champion when it held that role on its newest row (a promotion mid-window)
            roles[name] = ROLE_NAMES.get(int(role[mask][-1]), "challenger")
        return scores, times, roles
    except (AttributeError, ImportError, KeyError, TypeError) as exc:
        log.debug("scores without timestamps (%s): seasonal prediction drift unavailable", exc)
        return dict(store.prediction_scores(route, since, until)), {}, {}


@dataclass(frozen=True)
class Windows:
    """The live window [since, until) and the reference: a file or a past window of the log."""

    live_since: float | None
    live_until: float | None
    ref_since: float | None = None
    ref_until: float | None = None
    reference_path: str | None = None


def plan_windows(store: Any, route: str, cfg: DriftConfig, *, reference_path: str | None,
                 reference_window: float | None = None, window: float | None = None,
                 pinned_until: float | None = None) -> Windows:
    """Live window ending at the route's newest inference; the log reference right before it,
    or before `pinned_until` while a drift episode is open (`reference_bounds`)."""
    span = store.time_range(route)
    if span is None:
        known = ", ".join(store.routes()) or "none (nothing ingested yet)"
        raise EmptyWindowError(f"route {route!r}: no inferences in the store; routes: {known}")
    length = window or cfg.window
    until = span[1] + 1e-6  # half-open windows: keep the newest inference
    since = until - length
    if reference_path:
        return Windows(since, until, reference_path=reference_path)
    ref_since, ref_until = reference_bounds(since, reference_window or cfg.reference_window,
                                            pinned_until)
    return Windows(since, until, ref_since, ref_until)


def drift_for_route(store: Any, config: EvaluatorConfig, route: str, windows: Windows,
                    cfg: DriftConfig | None = None, now: float | None = None) -> DriftResult:
    """Read both sides from the store (and the reference file) and compare them."""
    cfg = cfg or config.drift
    names = dict(config.features)
    score_note: str | None = None
    live = window_data(store, route, windows.live_since, windows.live_until, names=names)
    if windows.reference_path:
        reference = load_reference(windows.reference_path, categorical=cfg.categorical,
                                   names=names)
        if not reference.scores:
            # Prediction drift against the log just before the live window, when it has one.
            past = window_data(store, route, windows.live_since - cfg.reference_window,
                               windows.live_since, names=names) \
                if windows.live_since is not None else None
            if past is not None and past.scores:
                reference.scores, reference.score_ts = past.scores, past.score_ts
                score_note = (f"prediction drift: {reference.source} has no score columns; "
                              f"scores compared with {past.source}")
    else:
        reference = window_data(store, route, windows.ref_since, windows.ref_until, names=names)
        if len(reference) == 0:
            raise EmptyReferenceError(
                f"route {route!r}: the reference window {reference.source} holds no "
                f"predictions; use a longer --reference-window or a --reference file")
    route_cfg = config.route(route)
    result = compute_drift(reference, live, cfg, route=route, threshold=route_cfg.threshold,
                           now=now)
    if score_note:
        result.notes.append(score_note)
    return result
