"""report.json: every number of the report, computed once from the dataset and the decisions."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from evaluator.dataset import EvalDataset, ExperimentInfo
from evaluator.decision import ChallengerDecision
from evaluator.gates.guardrails import latency_summary, outcome_summary
from evaluator.report.disagreement import disagreement
from evaluator.report.format import VERDICTS, _iso
from evaluator.report.notes import _notes, headline
from evaluator.stats.metrics import (
    MetricOptions,
    common_rows,
    evaluate_models,
)
from understudy.vocabulary import POLICY_TYPES

REPORT_SCHEMA_VERSION = 1
KNOWN_POLICY_TYPES = POLICY_TYPES


def _value_counts(values: np.ndarray, known: Sequence[str]) -> dict[str, int]:
    """Counts of an object column, vectorised: one comparison per expected value, and
    ``np.unique`` only on the (usually empty) rest — sorting a million Python strings would cost
    more than the whole report."""
    arr = np.asarray(values, dtype=object)
    rest = np.ones(arr.size, dtype=bool)
    out: dict[str, int] = {}
    for name in dict.fromkeys(known):
        if not rest.any():
            break  # the usual case after the first value: one arm, one policy type
        hit = arr == name
        count = int(np.count_nonzero(hit))
        if count:
            out[str(name)] = count
        rest &= ~hit
    if rest.any():
        names, counts = np.unique(arr[rest].astype(str), return_counts=True)
        for name, count in zip(names.tolist(), counts.tolist(), strict=True):
            out[name] = out.get(name, 0) + int(count)
    return out


def _model_summaries(dataset: EvalDataset, alpha: float) -> dict[str, Any]:
    """Operational summary per model. Keeps the keys of the CLI's summary report.json (role,
    modes, scored, status, error_rate, latency_p99_ms) so scripts written against it still work;
    error rate and latency use the guardrails' definitions (shed/skipped are not failures)."""
    out: dict[str, Any] = {}
    for name, col in dataset.models.items():
        outcomes = outcome_summary(col.status, alpha)
        latency = latency_summary(col.latency_ms, col.status, alpha)
        out[name] = {
            "role": col.role,
            "modes": list(col.modes),
            "scored": int(outcomes.total - outcomes.skipped),
            "status": {
                "ok": outcomes.ok,
                "error": outcomes.error,
                "timeout": outcomes.timeout,
                "shed": outcomes.shed,
                "skipped": outcomes.skipped,
            },
            "error_rate": outcomes.error_rate,
            "latency_p50_ms": latency.p50_ms,
            "latency_p99_ms": latency.p99_ms,
            "outcomes": outcomes.to_dict(),
            "latency": latency.to_dict(),
        }
    return out


def _exploration(dataset: EvalDataset) -> dict[str, Any]:
    """Arm shares and whether the window explored (propensity < 1 anywhere, or more than one
    arm served): off-policy estimates only make sense on exploration logs."""
    n = len(dataset)
    served = _value_counts(dataset.served, [dataset.champion, *dataset.models])
    prop = np.asarray(dataset.propensity, dtype=np.float64)
    finite = prop[np.isfinite(prop)]
    below_one = int(np.count_nonzero(finite < 1.0))
    policy_types = _value_counts(
        dataset.policy_types,
        [*(dataset.policy_types[:1].tolist() if n else []), *KNOWN_POLICY_TYPES],
    )
    exploring = below_one > 0 or len(served) > 1
    if not n:
        why = "no requests"
    elif exploring:
        parts = []
        if below_one:
            parts.append(f"{below_one} requests served with propensity < 1")
        if len(served) > 1:
            parts.append(f"{len(served)} arms served")
        why = "; ".join(parts)
    else:
        only = next(iter(served), "the champion")
        why = f"every request served by {only} with propensity 1"
    return {
        "exploring": exploring,
        "reason": why,
        "arm_shares": {
            arm: {"served": count, "share": count / n if n else None}
            for arm, count in served.items()
        },
        "policy_types": policy_types,
        "min_propensity": float(finite.min()) if finite.size else None,
        "requests_with_propensity_below_1": below_one,
    }


def _window(
    dataset: EvalDataset, window: tuple[float | None, float | None] | None
) -> dict[str, Any]:
    ts = np.asarray(dataset.ts, dtype=np.float64)
    finite = ts[np.isfinite(ts)]
    first = float(finite.min()) if finite.size else None
    last = float(finite.max()) if finite.size else None
    since, until = window if window is not None else (first, last)
    return {
        "since": since,
        "until": until,
        "since_iso": _iso(since),
        "until_iso": _iso(until),
        "first_request": first,
        "last_request": last,
        "first_request_iso": _iso(first),
        "last_request_iso": _iso(last),
    }


def _experiment_entry(
    dataset: EvalDataset, challenger: str, info: ExperimentInfo | None
) -> dict[str, Any]:
    """What a verdict is bound to. Without an experiment (records from before experiment ids)
    the implicit one is the dataset itself: no id, its first and last request, and the highest
    registry version its rows carry (None when they carry none)."""
    started: float | None
    end: float | None
    if info is not None:
        started, end, version = info.started, info.data_end, info.registry_version
        champion, exp_id = info.champion, info.id
    else:
        ts = np.asarray(dataset.ts, dtype=np.float64)
        finite = ts[np.isfinite(ts)]
        started = float(finite.min()) if finite.size else None
        end = float(finite.max()) if finite.size else None
        rv = dataset.registry_version
        version = int(rv.max()) if rv is not None and rv.size else -1
        champion, exp_id = dataset.champion, None
    return {
        "id": exp_id,
        "route": dataset.route,
        "champion": champion,
        "challenger": challenger,
        "started": started,
        "started_iso": _iso(started),
        "data_end": end,
        "data_end_iso": _iso(end),
        "registry_version": version if version is not None and version >= 0 else None,
    }


def _bind_decision(dataset: EvalDataset, d: dict[str, Any]) -> dict[str, Any]:
    """The decision dict with a complete ``experiment`` entry: the decision module's values
    win, the dataset's experiment fills what they leave out."""
    ours = _experiment_entry(dataset, str(d.get("challenger")),
                             dataset.experiments.get(str(d.get("challenger"))))
    entry = d.get("experiment")
    theirs: Mapping[str, Any] = entry if isinstance(entry, Mapping) else {}
    merged = {**ours, **{k: v for k, v in theirs.items() if v is not None}}
    for key in ("started", "data_end"):
        merged[f"{key}_iso"] = _iso(merged.get(key))
    return {**d, "experiment": merged}


def _verdict_counts(decisions: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICTS, 0)
    for d in decisions:
        counts[str(d.get("decision"))] = counts.get(str(d.get("decision")), 0) + 1
    return counts


def _alpha(decisions: Sequence[ChallengerDecision]) -> float:
    """The decision policy's alpha, so the metrics' CIs have the level the tests use."""
    return decisions[0].policy.alpha if decisions else 0.05


def build_report(
    dataset: EvalDataset,
    decisions: list[ChallengerDecision],
    *,
    drift: Any | None = None,
    generated_at: float | None = None,
    window: tuple[float | None, float | None] | None = None,
) -> dict[str, Any]:
    """Everything report.json holds (plain Python; NaN/inf still possible until ``jsonable``)."""
    timings: dict[str, float] = {}
    now = time.time() if generated_at is None else float(generated_at)
    alpha = _alpha(decisions)
    n = len(dataset)
    t = time.perf_counter()
    common = common_rows(dataset) if dataset.models else np.zeros(n, dtype=bool)
    n_common = int(np.count_nonzero(common))
    metrics = evaluate_models(dataset, options=MetricOptions(alpha=alpha)) if dataset.models else {}
    timings["metrics"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    exploration = _exploration(dataset)
    offpolicy: dict[str, Any] | None = None
    if exploration["exploring"]:
        from evaluator.stats.offpolicy import estimate_policy_values

        offpolicy = estimate_policy_values(dataset, alpha=alpha).to_dict()
    timings["offpolicy"] = round(time.perf_counter() - t, 3)
    drift_part: dict[str, Any] | None = None
    if drift is not None:
        from evaluator.report.drift import drift_section  # drift's modules only when shown

        drift_part = drift_section(drift)

    status, message = "ok", None
    if n == 0:
        status = "empty"
        message = (
            f"No labelled requests for route {dataset.route!r} in this window: there is nothing "
            "to evaluate, and no challenger can be promoted. Check that labels are being "
            "ingested and that the window covers labelled traffic."
        )
    elif not dataset.challengers:
        status = "no_challengers"
        message = (
            f"No challenger scored route {dataset.route!r}'s requests in this window: there is "
            "nothing to decide (metrics of the champion only)."
        )
    elif n_common == 0:
        status = "no_common_rows"
        message = (
            "No request was answered by every model, so the per-model metrics are empty; the "
            "paired tests below use each challenger's own paired requests."
        )

    decision_dicts = [_bind_decision(dataset, d.to_dict()) for d in decisions]
    # challengers judged on replayed traffic (`evaluator replay`), not on live shadowing
    replayed = [c for c in dataset.challengers if "replay" in dataset.models[c].modes]
    rv = dataset.registry_version
    registry_version = int(rv.max()) if rv is not None and rv.size else -1
    payload: dict[str, Any] = {
        "report_schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": now,
        "generated_at_iso": _iso(now),
        "status": status,
        "message": message,
        "route": dataset.route,
        "task": dataset.task,
        "champion": dataset.champion,
        "challengers": dataset.challengers,
        "threshold": dataset.threshold,
        "alpha": alpha,
        "window": {**_window(dataset, window),
                   "basis": "experiments" if dataset.experiments else "window"},
        "registry_version": registry_version if registry_version >= 0 else None,
        "experiments": {
            c: _experiment_entry(dataset, c, x) for c, x in dataset.experiments.items()
        },
        "n": n,
        "join_stats": asdict(dataset.stats),
        "models": _model_summaries(dataset, alpha),
        "metrics": {
            "rows": "common",
            "n": n_common,
            "alpha": alpha,
            "models": {k: v.to_dict() for k, v in metrics.items()},
        },
        "decisions": decision_dicts,
        "verdict_counts": _verdict_counts(decision_dicts),
        "summary": [
            {"challenger": d["challenger"], "decision": d["decision"],
             "headline": ("[replay] " if d["challenger"] in replayed else "") + headline(d)}
            for d in decision_dicts
        ],
        "replay": replayed,
        "disagreement": disagreement(dataset),
        "exploration": exploration,
        "offpolicy": offpolicy,
        "drift": drift_part,
        "notes": [],
        "figures": [],
        "timings_s": timings,
    }
    payload["notes"] = _notes(payload)
    return payload
