"""The promotion report of one route: ``report.json``, ``report.md`` and ``report.html``.

Who reads what, and why there are three files:

* ``report.json`` is the record ``python -m evaluator promote`` acts on (it reads ``route``,
  ``generated_at`` and ``decisions[i]["decision" / "challenger" / "experiment"]``, the last
  binding the verdict to the state it was made in: experiment id and start, route, champion,
  challenger, the data's end and the registry version) and what dashboards or audits parse.
  It is versioned (``report_schema_version``) so consumers can refuse a shape they do not
  know, and strict JSON: NaN/inf become ``null`` (a ``NaN`` that slipped into a p-value must
  read as "missing", never as a number), enforced by ``json.dumps(..., allow_nan=False)``.
* ``report.md`` is for whoever approves the promotion: one headline per challenger with the
  numbers behind the verdict, then the tables (join, metrics with CIs, tests, guardrails,
  off-policy values, notes) so a thin join or a failing guardrail cannot hide behind a verdict.
* ``report.html`` is the same content, self-contained (inline CSS, plots as base64 PNG), so it
  can be mailed or archived as one file and opened offline years later: ROC / calibration /
  score distributions (or predicted-vs-actual and residuals for regression), the always-valid
  test's path over time with its 1/alpha boundary, and arm shares over time when exploring.

Design: every number is computed once into the JSON payload, and the Markdown and HTML are both
rendered from one list of content blocks built from that payload, so the three files cannot
disagree. Only the plots read the dataset again (downsampled: ROC thinned to a few hundred
points, histograms, a few thousand scatter points), which keeps a 1M-row report to a fraction of
the time the statistics take (see ``loadtests/bench_report.py``).

Files are written atomically (temporary file + rename): ``promote`` may read ``report.json``
while a report is being produced and must never see half a file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluator.dataset import EvalDataset, ExperimentInfo
from evaluator.decision import METRICS, ChallengerDecision
from evaluator.gates.guardrails import latency_summary, outcome_summary
from evaluator.stats.metrics import (
    calibration_curve,
    common_rows,
    evaluate_models,
    probability_violations,
)
from evaluator.stats.significance import jsonable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("evaluator.report")

REPORT_SCHEMA_VERSION = 1
JSON_FILE, MARKDOWN_FILE, HTML_FILE = "report.json", "report.md", "report.html"

ROC_POINTS = 400  # per model: more is invisible at report size and only costs rendering time
SCATTER_POINTS = 3000  # per model, predicted vs actual (regression)
HIST_BINS = 50
TIME_BINS = 48  # arm shares over time
CALIBRATION_BINS = 10  # the bins the ECE in the metrics table uses
PNG_DPI = 100

METRIC_LABELS: dict[str, str] = {
    "auroc": "AUROC",
    "log_loss": "log loss",
    "brier": "Brier",
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "ece": "ECE",
    "rmse": "RMSE",
    "mae": "MAE",
}
CORRECTION_LABELS = {"holm": "Holm", "bonferroni": "Bonferroni", "fdr_bh": "BH", "none": ""}
VERDICTS = ("PROMOTE", "KEEP", "BLOCKED", "INCONCLUSIVE")  # the report counts each one
# secondary tests whose difference is challenger - champion of a loss (lower is better)
LOSS_TESTS = ("paired_t_", "wilcoxon_", "rmse_delta")
KNOWN_POLICY_TYPES = ("champion", "epsilon_greedy", "thompson")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def write_report(
    dataset: EvalDataset,
    decisions: list[ChallengerDecision],
    out_dir: Path,
    *,
    drift: Any | None = None,
    generated_at: float | None = None,
    window: tuple[float | None, float | None] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; return their paths.

    ``decisions`` are ``evaluator.decision.decide``'s output for ``dataset`` (the report shows
    them, it never re-decides). ``drift`` is an optional ``DriftResult`` or a loaded drift.json
    (shown as a section). ``window`` is the (since, until) the dataset was loaded for; without
    it the window is the span of the requests' timestamps.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = build_report(
        dataset, decisions, drift=drift, generated_at=generated_at, window=window
    )
    t_figures = time.perf_counter()
    figures = make_figures(dataset, payload)
    payload["figures"] = [f.name for f in figures if f.png_base64]
    payload["notes"].extend(f.note for f in figures if f.note)
    payload["timings_s"]["figures"] = round(time.perf_counter() - t_figures, 3)
    t_render = time.perf_counter()
    blocks = report_blocks(payload)
    markdown = render_markdown(blocks)
    page = render_html(blocks, figures, title=_title(payload))
    payload["timings_s"]["render"] = round(time.perf_counter() - t_render, 3)
    payload["timings_s"]["report_total"] = round(time.perf_counter() - started, 3)
    text = json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n"
    paths = {
        "json": out / JSON_FILE,
        "markdown": out / MARKDOWN_FILE,
        "html": out / HTML_FILE,
    }
    # JSON last: `promote` acts on it, so it should only appear next to a complete report.
    _write_atomic(paths["markdown"], markdown)
    _write_atomic(paths["html"], page)
    _write_atomic(paths["json"], text)
    return paths


def write_marked_block(path: Path, block: str, begin: str, end: str) -> None:
    """Replace the generated block between the `begin` and `end` markers of a document (append
    it if the markers are missing); the hand-written text around it is never touched. `block`
    includes both markers."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> None:
    """Write next to the target, then rename over it: readers see the old file or the new one.

    The temporary name is unique (pid + random) and opened with mode "x" rather than via
    ``tempfile.mkstemp``, whose 0600 permissions would hide the report from other users.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# The payload (report.json)
# ----------------------------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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
    theirs = d.get("experiment") if isinstance(d.get("experiment"), Mapping) else {}
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
    metrics = evaluate_models(dataset, alpha=alpha) if dataset.models else {}
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
        from evaluator.drift import drift_section

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
            {"challenger": d["challenger"], "decision": d["decision"], "headline": headline(d)}
            for d in decision_dicts
        ],
        "exploration": exploration,
        "offpolicy": offpolicy,
        "drift": drift_part,
        "notes": [],
        "figures": [],
        "timings_s": timings,
    }
    payload["notes"] = _notes(payload)
    return payload


# ----------------------------------------------------------------------------------------------
# Number formatting (one place, so Markdown and HTML print the same digits)
# ----------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, spec: str = ".4g") -> str:
    if not _finite(x):
        return "n/a"
    text = format(float(x), spec)
    # never "-0" (or "> -0"): a value that rounds to zero has no sign
    return text.replace("-", "") if not text.strip("+-0.%") else text


def _improvement(p: Mapping[str, Any], lower_is_better: bool | None = None
                 ) -> tuple[Any, Any, Any]:
    """(improvement, CI low, CI high), positive = challenger better: the difference
    (challenger - champion) with its CI flipped for losses. One sign convention everywhere."""
    lower = (not p.get("higher_is_better", True)) if lower_is_better is None else lower_is_better
    diff, lo, hi = p.get("difference"), p.get("ci_low"), p.get("ci_high")
    if not lower:
        imp = p.get("improvement", diff) if lower_is_better is None else diff
        return imp, lo, hi
    neg = [-float(v) if _finite(v) else None for v in (diff, hi, lo)]
    return neg[0], neg[1], neg[2]


def _diff(x: Any) -> str:
    return _num(x, "+.3g")


def _p(x: Any) -> str:
    """p-values: 3 significant digits, scientific below 1e-4, and never a bare 0."""
    if not _finite(x):
        return "n/a"
    if x == 0:
        return "< 1e-300"
    return format(x, ".2e") if x < 1e-4 else format(x, ".3g")


def _pct(x: Any, spec: str = ".2%") -> str:
    return format(float(x), spec) if _finite(x) else "n/a"


def _int(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "n/a"


def _ci(value: Any, lo: Any, hi: Any, fmt: str = ".4g") -> str:
    if not _finite(value):
        return "n/a"
    if _finite(lo) and _finite(hi):
        return f"{_num(value, fmt)} [{_num(lo, fmt)}, {_num(hi, fmt)}]"
    return _num(value, fmt)


def headline(d: Mapping[str, Any]) -> str:
    """One line per challenger: verdict, primary metric both ways, difference with its CI,
    corrected p, always-valid p and the guardrails — the numbers an approver needs first."""
    p = d.get("primary") or {}
    metric = str(d.get("primary_metric") or p.get("metric") or "")
    label = METRICS[metric].label if metric in METRICS else metric
    alpha = float((d.get("policy") or {}).get("alpha", 0.05))
    guard = (d.get("guardrails") or {}).get("status", "n/a")
    head = f"{d.get('challenger')}: {d.get('decision')} —"
    if not _finite(p.get("difference")):
        return f"{head} {label}: no test ({p.get('reason') or 'undefined'}); guardrails {guard}"
    corr = CORRECTION_LABELS.get(str(p.get("correction")), str(p.get("correction")))
    seq = d.get("sequential") or {}
    seq_p = seq.get("p_adjusted", seq.get("p_value"))
    seq_text = f"; sequential p = {_p(seq_p)}" if seq else "; no sequential test"
    imp, lo, hi = _improvement(p)
    return (
        f"{head} {label} {_num(p.get('challenger'))} vs {_num(p.get('champion'))}, "
        f"improvement {_diff(imp)} ({1 - alpha:.0%} CI {_diff(lo)} to {_diff(hi)}), "
        f"{(corr + ' ') if corr else ''}p = {_p(p.get('p_adjusted'))}"
        f"{seq_text}; guardrails {guard}"
    )


def _notes(payload: Mapping[str, Any]) -> list[str]:
    """What the numbers do not say on their own: thin joins, duplicates, exclusions."""
    notes: list[str] = []
    js = payload["join_stats"]
    n = payload["n"]
    if js.get("inferences"):
        share = js.get("joined", 0) / js["inferences"]
        notes.append(
            f"{_int(js.get('joined'))} of {_int(js['inferences'])} inferences in the window "
            f"({share:.1%}) have a label; the report uses {_int(n)} labelled requests."
        )
    if js.get("duplicate_inferences"):
        notes.append(
            f"{_int(js['duplicate_inferences'])} re-delivered inference records were dropped "
            "(at-least-once delivery)."
        )
    if js.get("duplicate_labels"):
        notes.append(
            f"{_int(js['duplicate_labels'])} duplicate labels: the last label for a request wins."
        )
    if js.get("orphan_labels") or js.get("expired_orphans"):
        notes.append(
            f"{_int(js.get('orphan_labels', 0))} orphan labels (no inference record yet) and "
            f"{_int(js.get('expired_orphans', 0))} expired after the join window (store-wide "
            "counts, not only this route and window)."
        )
    m = payload["metrics"]
    if payload["challengers"] and n:
        notes.append(
            f"Per-model metrics use the {_int(m['n'])} requests every model answered (common "
            "rows), so they compare like with like; each test uses its challenger's paired rows."
        )
    for model, mm in m["models"].items():
        excl = {k: v for k, v in (mm.get("excluded") or {}).items() if v}
        if excl:
            notes.append(
                f"{model}: excluded from its metrics: "
                + ", ".join(f"{k.replace('_', ' ')} {_int(v)}" for k, v in excl.items())
                + "."
            )
    for d in payload["decisions"]:
        excl = {k: v for k, v in (d.get("excluded") or {}).items() if v}
        if excl:
            notes.append(
                f"{d['challenger']}: excluded from the paired comparison: "
                + ", ".join(f"{k.replace('_', ' ')} {_int(v)}" for k, v in excl.items())
                + "."
            )
    off = payload.get("offpolicy")
    if off:
        excl = {k: v for k, v in (off.get("excluded") or {}).items() if v}
        if excl:
            notes.append(
                "Off-policy estimates exclude "
                + ", ".join(f"{k.replace('_', ' ')} {_int(v)}" for k, v in excl.items())
                + " requests."
            )
        notes.extend(f"Off-policy: {x}" for x in off.get("notes") or [])
    return notes


# ----------------------------------------------------------------------------------------------
# Content blocks -> Markdown and HTML
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One piece of report content. ``kind``: h1/h2/h3, p, ul, table, verdict, figures.

    Text uses a tiny inline syntax (``**bold**``, ```code```) that both renderers understand.
    """

    kind: str
    text: str = ""
    items: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    verdict: str = ""


def _h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    return Block(
        "table", header=tuple(header), rows=tuple(tuple(str(c) for c in r) for r in rows)
    )


def _title(payload: Mapping[str, Any]) -> str:
    return f"Understudy evaluation report — route {payload['route']}"


def report_blocks(payload: Mapping[str, Any]) -> list[Block]:
    """The report's content, in reading order, from the JSON payload alone."""
    w = payload["window"]
    data = ("data: every row of each challenger's current experiment, "
            if w.get("basis") == "experiments" else "window ")
    blocks: list[Block] = [_h(1, _title(payload))]
    blocks.append(
        Block(
            "p",
            f"Generated {payload['generated_at_iso']} · {data}{w['since_iso'] or '…'} to "
            f"{w['until_iso'] or '…'} · task {payload['task']} · champion "
            f"**{payload['champion']}** · challengers "
            f"{', '.join(payload['challengers']) or 'none'} · {_int(payload['n'])} labelled "
            f"requests · schema v{payload['report_schema_version']}",
        )
    )
    if payload.get("message"):
        blocks.append(Block("p", f"**{payload['message']}**"))

    blocks.append(_h(2, "Decisions"))
    if not payload["decisions"]:
        blocks.append(Block("p", "No decisions: no challenger to compare with the champion."))
    else:
        counts = payload.get("verdict_counts") or _verdict_counts(payload["decisions"])
        blocks.append(Block("p", "Verdicts: " + " · ".join(
            f"{v} {counts.get(v, 0)}" for v in dict.fromkeys([*VERDICTS, *counts]))))
    for d, s in zip(payload["decisions"], payload["summary"], strict=True):
        blocks.append(Block("verdict", s["headline"], verdict=str(d["decision"])))
        context = [_experiment_line(d.get("experiment"))]
        health = d.get("data_health")
        reasons = [str(r) for r in d.get("reasons") or []]
        if isinstance(health, Mapping) and not any(r.startswith("data health") for r in reasons):
            context.append(f"data health: {health.get('status', 'n/a')}"
                           + "".join(f"; {r}" for r in health.get("reasons") or []))
        blocks.append(Block("ul", items=(*context, *reasons)))

    blocks.append(Block("figures"))
    blocks += _experiment_blocks(payload)
    blocks += _join_blocks(payload)
    blocks += _metric_blocks(payload)
    blocks += _test_blocks(payload)
    blocks += _guardrail_blocks(payload)
    blocks += _exploration_blocks(payload)
    if payload.get("drift"):
        from evaluator.drift import drift_markdown

        blocks += markdown_to_blocks(drift_markdown(payload["drift"], heading="##"))
    blocks.append(_h(2, "Notes"))
    blocks.append(Block("ul", items=tuple(payload["notes"]) or ("None.",)))
    return blocks


def _experiment_line(x: Any) -> str:
    """'experiment `id` since ... (data to ..., registry version N, vs champion C)'."""
    if not isinstance(x, Mapping):
        return "experiment: n/a"
    name = f"experiment `{x['id']}`" if x.get("id") else \
        "no experiment id (records from before experiments: the whole window)"
    version = x.get("registry_version")
    return (f"{name} started {x.get('started_iso') or 'n/a'}, data to "
            f"{x.get('data_end_iso') or 'n/a'}, registry version "
            f"{version if version is not None else 'unknown'}, vs champion {x.get('champion')}")


def _health_detail(c: Mapping[str, Any]) -> str:
    """A data-health check's own explanation when it has one (it quotes its numbers), else its
    numbers and per-arm counts (observed / expected) as `key value` pairs."""
    text = str(c.get("reason") or c.get("detail") or c.get("message") or "")
    if text:
        return text
    skip = {"name", "check", "status", "passed", "p_value", "p_adjusted", "reason", "detail",
            "message"}
    parts = []
    for k, v in c.items():
        if k in skip:
            continue
        if _finite(v):
            parts.append(f"{k.replace('_', ' ')} {_num(v)}")
        elif isinstance(v, Mapping) and v:
            parts.append(f"{k.replace('_', ' ')} "
                         + ", ".join(f"{a} {_num(x)}" for a, x in v.items()))
    return "; ".join(parts)


def _experiment_blocks(payload: Mapping[str, Any]) -> list[Block]:
    """Which experiment each verdict is bound to, and the data-health gate it passed (or not)."""
    decisions = payload["decisions"]
    if not decisions:
        return []
    rows = []
    for d in decisions:
        x = d.get("experiment") or {}
        version = x.get("registry_version")
        rows.append([d["challenger"], f"`{x['id']}`" if x.get("id") else "none (pre-experiment)",
                     x.get("started_iso") or "n/a", x.get("data_end_iso") or "n/a",
                     x.get("champion") or "n/a",
                     str(version) if version is not None else "unknown",
                     _int(d.get("n_labelled"))])
    blocks = [
        _h(2, "Experiments"),
        Block("p", "Each verdict uses every labelled request of its challenger's current "
                   "experiment (started when the challenger was added, or its mode, sample rate, "
                   "the route's policy or champion last changed), never a sliding window. "
                   "`evaluator promote` refuses the verdict once the live route has moved on. "
                   "Started: the experiment's first logged request (the exact start of the "
                   "change is in the gateway's audit trail)."),
        _table(["challenger", "experiment", "started (first request)", "data to", "champion",
                "registry version", "labelled"], rows),
    ]
    health_rows = []
    for d in decisions:
        h = d.get("data_health")
        if not isinstance(h, Mapping):
            continue
        checks = [c for c in h.get("checks") or [] if isinstance(c, Mapping)]
        if isinstance(h.get("checks"), Mapping):
            checks = [{"name": k, **v} if isinstance(v, Mapping) else {"name": k, "value": v}
                      for k, v in h["checks"].items()]
        if not checks:
            health_rows.append([d["challenger"], "(gate)", str(h.get("status", "n/a")), "n/a",
                                "; ".join(map(str, h.get("reasons") or []))])
        for c in checks:
            passed = c.get("passed")
            status = c.get("status") or {True: "pass", False: "**FAIL**", None: "n/a"}.get(
                passed if isinstance(passed, bool) else None)
            p_text = _p(c.get("p_value"))
            if _finite(c.get("p_adjusted")):
                p_text += f" ({_p(c['p_adjusted'])})"
            health_rows.append([d["challenger"], str(c.get("name") or c.get("check") or "?"),
                                "**FAIL**" if status in ("fail", "**FAIL**") else str(status),
                                p_text, _health_detail(c)])
    blocks.append(_h(3, "Data health (sample ratio mismatch)"))
    if health_rows:
        blocks += [
            Block("p", "Served counts against the logged propensities, each challenger's "
                       "coverage against its sample rate, and whether shed or timed-out copies "
                       "differ from scored ones. A failed check (p below the health alpha) makes "
                       "the verdict INCONCLUSIVE: the paired comparison would be biased."),
            _table(["challenger", "check", "result", "p (adjusted)", "detail"], health_rows),
        ]
    else:
        blocks.append(Block("p", "Not evaluated by this decision module version."))
    return blocks


def _join_blocks(payload: Mapping[str, Any]) -> list[Block]:
    js = payload["join_stats"]
    rows = [
        ("inferences in the window", _int(js.get("inferences"))),
        ("duplicate inference records dropped", _int(js.get("duplicate_inferences"))),
        ("labels read", _int(js.get("labels"))),
        ("duplicate labels (last wins)", _int(js.get("duplicate_labels"))),
        ("orphan labels (store-wide)", _int(js.get("orphan_labels"))),
        ("expired orphans (store-wide)", _int(js.get("expired_orphans"))),
        ("joined (inference + label)", _int(js.get("joined"))),
        ("labelled requests in this report", _int(payload["n"])),
        ("answered by every model (metric rows)", _int(payload["metrics"]["n"])),
    ]
    return [_h(2, "Join"), _table(["", "count"], rows)]


def _metric_blocks(payload: Mapping[str, Any]) -> list[Block]:
    m = payload["metrics"]
    models = m["models"]
    if not models:
        return []
    names: list[str] = []
    for mm in models.values():
        names += [k for k in mm["metrics"] if k not in names]
    header = ["model", "role", "n", *[METRIC_LABELS.get(k, k) for k in names]]
    rows = []
    reasons = []
    for model, mm in models.items():
        cells = [f"**{model}**" if mm["role"] == "champion" else model, mm["role"], _int(mm["n"])]
        for k in names:
            v = mm["metrics"].get(k) or {}
            cells.append(_ci(v.get("value"), v.get("ci_low"), v.get("ci_high")))
            if v.get("reason"):
                reasons.append(f"{model} {METRIC_LABELS.get(k, k)}: {v['reason']}")
        rows.append(cells)
    level = 1 - float(m["alpha"])
    blocks = [
        _h(2, "Model metrics"),
        Block(
            "p",
            f"Point estimate [{level:.0%} CI] on the {_int(m['n'])} requests every model "
            f"answered; threshold {payload['threshold']:g} for accuracy/precision/recall/F1"
            if payload["task"] == "classification"
            else f"Point estimate [{level:.0%} CI] on the {_int(m['n'])} requests every model "
            "answered.",
        ),
        _table(header, rows),
    ]
    if reasons:
        blocks.append(Block("ul", items=tuple(reasons)))
    return blocks


def _test_blocks(payload: Mapping[str, Any]) -> list[Block]:
    decisions = payload["decisions"]
    if not decisions:
        return []
    header = [
        "challenger",
        "metric (test)",
        "n",
        "champion",
        "challenger value",
        "improvement [CI]",
        "p (adjusted)",
        "sequential p (adj.)",
        "non-inferiority",
        "n for target power",
        "achieved power at min effect",
        "verdict",
    ]
    rows = []
    secondary_rows = []
    for d in decisions:
        p = d.get("primary") or {}
        seq = d.get("sequential") or {}
        ni = d.get("non_inferiority") or {}
        pw = d.get("power") or {}
        margin = float(ni.get("margin") or (d.get("policy") or {}).get("margin") or 0.0)
        if seq.get("used_for_decision") and seq.get("cs_state") not in (None, "not_started") \
                and _finite(seq.get("cs_low")):
            # What decides (and what the decision's reasons say): the always-valid lower bound.
            shown = seq.get("cs_state") != "empty" and float(seq["cs_low"]) > -margin
            ni_text = (f"{'shown' if shown else 'not shown'} (margin {margin:g}, always-valid "
                       f"lower bound {_diff(seq.get('cs_low'))})")
        elif ni.get("passed") is None:
            ni_text = "n/a"
        else:
            ni_text = (
                f"{'shown' if ni['passed'] else 'not shown'} (margin {margin:g}, "
                f"fixed-horizon lower bound {_diff(ni.get('lower_bound'))})"
            )
        target = f" ({_pct(pw.get('power'), '.0%')} power)" if _finite(pw.get("power")) else ""
        required = (f"{_int(pw.get('required_n'))}{target}" if pw.get("required_n") is not None
                    else "n/a")
        achieved = (f"{_pct(pw.get('achieved_power'), '.0%')} (min effect "
                    f"{_num(pw.get('mde'), '.3g')})" if _finite(pw.get("achieved_power"))
                    else "n/a")
        metric = str(d.get("primary_metric"))
        imp, lo, hi = _improvement(p)
        rows.append(
            [
                d["challenger"],
                f"{METRIC_LABELS.get(metric, metric)} ({p.get('test')})",
                _int(p.get("n")),
                _num(p.get("champion")),
                _num(p.get("challenger")),
                _ci(imp, lo, hi, "+.3g"),
                f"{_p(p.get('p_value'))} ({_p(p.get('p_adjusted'))} {p.get('correction')})",
                f"{_p(seq.get('p_value'))} ({_p(seq.get('p_adjusted'))})" if seq else "n/a",
                ni_text,
                required,
                achieved,
                f"**{d['decision']}**",
            ]
        )
        for name, t in (d.get("secondary") or {}).items():
            if not isinstance(t, Mapping):
                continue
            stat = t.get("statistic", t.get("z"))
            lower_is_better = name.startswith(LOSS_TESTS)
            imp, lo, hi = _improvement(t, lower_is_better=lower_is_better)
            if lower_is_better and name.startswith("paired_t") and _finite(stat):
                stat = -float(stat)  # t of champion - challenger loss: the improvement's sign
            secondary_rows.append(
                [
                    d["challenger"],
                    name,
                    _ci(imp, lo, hi, "+.3g"),
                    _num(stat),
                    _p(t.get("p_value")),
                    t.get("reason") or "",
                ]
            )
    blocks = [
        _h(2, "Tests"),
        Block(
            "p",
            "Paired comparison of each challenger with the champion on the requests both "
            "answered. Improvement: positive means the challenger is better (for losses it is "
            "champion - challenger). Adjusted p corrects across challengers; the sequential "
            "(always-valid mSPRT) p stays valid however often the report is read. Power: the "
            "labelled requests a fixed-horizon test needs for the target power at the minimum "
            "effect, and the power the current n has at that effect.",
        ),
        _table(header, rows),
    ]
    if secondary_rows:
        blocks += [
            _h(3, "Secondary tests (context only; the primary metric decides)"),
            _table(
                ["challenger", "test", "improvement [CI]", "statistic", "p", "note"],
                secondary_rows,
            ),
        ]
    return blocks


def _guardrail_blocks(payload: Mapping[str, Any]) -> list[Block]:
    blocks = [_h(2, "Guardrails")]
    rows = []
    for d in payload["decisions"]:
        g = d.get("guardrails") or {}
        for c in g.get("checks") or []:
            passed = c.get("passed")
            result = {True: "pass", False: "**FAIL**"}.get(passed, "insufficient data") \
                if isinstance(passed, bool) or passed is None else str(passed)
            name = str(c.get("name"))
            interval = c.get("interval")
            lo, hi = (interval if isinstance(interval, list | tuple) and len(interval) == 2
                      else (None, None))
            if name.startswith("error_rate"):  # rates, and the delta in percentage points
                cells = [_pct(c.get(k)) for k in ("champion", "challenger", "observed")]
                cells += [f"[{_pct(lo)}, {_pct(hi)}]" if _finite(lo) or _finite(hi) else "n/a",
                          _pct(c.get("limit"))]
            else:  # p99 in ms; the observed value is a ratio or ms, like its limit
                unit = " ms" if name.endswith("_ms") else ""
                margin = ""
                diff = c.get("difference_interval")
                if isinstance(diff, list | tuple) and len(diff) == 2 and _finite(c.get("margin")):
                    margin = (f"; p99 difference {_diff(c.get('difference'))} ms "
                              f"[{_num(diff[0])}, {_num(diff[1])}] vs margin "
                              f"{_num(c['margin'])} ms")
                cells = [
                    f"{_num(c.get('champion'))} ms",
                    f"{_num(c.get('challenger'))} ms",
                    f"{_num(c.get('observed'))}{unit}",
                    (f"[{_num(lo)}, {_num(hi)}]{unit}" if _finite(lo) or _finite(hi) else "n/a")
                    + margin,
                    f"{_num(c.get('limit'))}{unit}",
                ]
            rows.append([d["challenger"], name, *cells, result])
    if rows:
        blocks.append(
            Block("p", "A guardrail fails only when its confidence bound is past the limit (and "
                       "past the absolute margin): the interval is the observed value's "
                       "uncertainty; too few samples read as insufficient data, not a failure.")
        )
        blocks.append(
            _table(["challenger", "check", "champion", "challenger", "observed", "interval",
                    "limit", "result"], rows)
        )
    else:
        blocks.append(Block("p", "No guardrail checks (no challengers)."))
    ops = []
    for model, s in payload["models"].items():
        lat = s.get("latency") or {}
        oc = s.get("outcomes") or {}
        ops.append(
            [
                model,
                s.get("role"),
                _int(oc.get("attempted")),
                _int(oc.get("ok")),
                _int(oc.get("error")),
                _int(oc.get("timeout")),
                _int(oc.get("shed")),
                _int(oc.get("skipped")),
                _ci(oc.get("error_rate"), oc.get("error_rate_ci_low"),
                    oc.get("error_rate_ci_high"), ".3%"),
                _num(lat.get("p50_ms"), ".3g"),
                _ci(lat.get("p99_ms"), lat.get("p99_ci_low_ms"), lat.get("p99_ci_high_ms"), ".3g"),
            ]
        )
    blocks += [
        _h(3, "Latency and outcomes per model"),
        _table(
            ["model", "role", "attempted", "ok", "error", "timeout", "shed", "skipped",
             "error rate [CI]", "p50 ms", "p99 ms [CI]"],
            ops,
        ),
    ]
    return blocks


def _exploration_blocks(payload: Mapping[str, Any]) -> list[Block]:
    ex = payload["exploration"]
    blocks = [_h(2, "Arm shares")]
    shares = [
        [arm, _int(v["served"]), _pct(v["share"], ".1%")] for arm, v in ex["arm_shares"].items()
    ]
    blocks.append(_table(["arm", "requests served", "share"], shares or [["none", "0", "n/a"]]))
    policies = ", ".join(f"{k} {_int(v)}" for k, v in ex["policy_types"].items()) or "none"
    blocks.append(
        Block("p", f"Logging policies: {policies}. Exploring: {'yes' if ex['exploring'] else 'no'}"
                   f" ({ex['reason']}).")
    )
    blocks.append(_h(2, "Off-policy values"))
    off = payload.get("offpolicy")
    if not off:
        blocks.append(
            Block("p", "Not applicable: no exploration in this window "
                       f"({ex['reason']}), so only the champion's value is observed.")
        )
        return blocks
    lv = off.get("logging_value") or {}
    level = 1 - float(off.get("alpha", 0.05))
    blocks.append(
        Block(
            "p",
            f"Estimated mean reward of always serving each arm, from {_int(off.get('n'))} "
            f"rewarded requests ({level:.0%} CI). Logging policy's observed mean reward: "
            f"{_ci(lv.get('value'), lv.get('ci_low'), lv.get('ci_high'))}. DR (doubly robust) "
            "is usually the one to read; IPS/SNIPS are withheld when an arm lacked support.",
        )
    )
    rows = []
    reasons = []
    for arm, v in (off.get("arms") or {}).items():
        est = v.get("estimates") or {}
        cells = [
            arm,
            _int(v.get("n_served")),
            _int(v.get("unsupported")),
            _num(v.get("effective_sample_size"), ".4g"),
            _num(v.get("max_weight"), ".3g"),
        ]
        for name in ("ips", "snips", "dm", "dr"):
            e = est.get(name) or {}
            cells.append(_ci(e.get("value"), e.get("ci_low"), e.get("ci_high")))
            if e.get("reason"):
                reasons.append(f"{arm} {name.upper()}: {e['reason']}")
        rows.append(cells)
    blocks.append(
        _table(
            ["arm", "served", "unsupported", "ESS", "max weight", "IPS", "SNIPS", "DM", "DR"],
            rows,
        )
    )
    if reasons:
        blocks.append(Block("ul", items=tuple(dict.fromkeys(reasons))))
    return blocks


_TABLE_SEPARATOR = re.compile(r":?-{3,}:?")


def markdown_to_blocks(md: str) -> list[Block]:
    """Parse a simple Markdown fragment (headings, pipe tables, bullets, paragraphs) into blocks,
    so a section produced elsewhere (drift_markdown) renders in the HTML as well."""
    blocks: list[Block] = []
    table: list[list[str]] = []
    bullets: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if table:
            blocks.append(_table(table[0], table[1:]))
            table.clear()
        if bullets:
            blocks.append(Block("ul", items=tuple(bullets)))
            bullets.clear()
        if para:
            blocks.append(Block("p", " ".join(para)))
            para.clear()

    for raw in md.splitlines():
        line = raw.strip()
        if line.startswith("|"):
            if not table:
                flush()  # a table ends the paragraph or list before it
            cells = [c.strip() for c in line.strip("|").split("|")]
            if table and all(_TABLE_SEPARATOR.fullmatch(c) for c in cells):
                continue
            table.append(cells)
            continue
        if table:
            flush()
        if not line:
            flush()
        elif line.startswith("#"):
            flush()
            level = min(len(line) - len(line.lstrip("#")), 3)
            blocks.append(_h(level, line.lstrip("#").strip()))
        elif line.startswith(("- ", "* ")):
            if para:
                flush()
            bullets.append(line[2:])
        else:
            if bullets:
                flush()
            para.append(line)
    flush()
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    """report.md from the content blocks."""
    out: list[str] = []
    for b in blocks:
        if b.kind.startswith("h"):
            out += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "verdict":
            out += [f"**{b.text}**", ""]
        elif b.kind == "ul":
            out += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "figures":
            out += ["Plots (ROC or residuals, calibration, score distributions, the sequential "
                    "test over time, arm shares) are in report.html next to this file.", ""]
    return "\n".join(out).rstrip() + "\n"


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = _BOLD.sub(r"<strong>\1</strong>", s)
    return _CODE.sub(r"<code>\1</code>", s)


_CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:1400px;margin:0 auto;padding:24px 28px;background:#fff}
h1{font-size:22px;margin:0 0 6px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.table-wrap{max-width:100%;overflow-x:auto;margin:8px 0 12px}
table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #dde1e6;padding:4px 7px;text-align:left;vertical-align:top}
td{max-width:18em}td:first-child{white-space:nowrap;max-width:none}th{min-width:4em}
th{background:#f0f2f5}tr:nth-child(even) td{background:#fafbfc}
.verdict{border-radius:6px;padding:10px 14px;margin:14px 0 4px;font-weight:600;
border-left:6px solid}
.verdict.PROMOTE{background:#e8f6ec;border-color:#1e8e3e}
.verdict.KEEP{background:#eef1f5;border-color:#5f6b7a}
.verdict.BLOCKED{background:#fdecea;border-color:#c5221f}
.verdict.INCONCLUSIVE{background:#fff6e0;border-color:#e3a008}
ul{margin:4px 0 10px;padding-left:22px}li{margin:2px 0}
.figs{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;border:1px solid #e3e6ea;border-radius:6px;padding:8px;background:#fff}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#555;margin-top:4px;max-width:620px}
code{background:#f0f2f5;padding:0 3px;border-radius:3px}
"""


def render_html(blocks: Sequence[Block], figures: Sequence[FigureImage], *, title: str) -> str:
    """report.html: the same blocks, with inline CSS and the plots embedded as data: URIs."""
    body: list[str] = []
    for b in blocks:
        if b.kind.startswith("h"):
            body.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "verdict":
            cls = b.verdict if b.verdict in VERDICTS else ""
            body.append(f'<div class="verdict {cls}">{_inline(b.text)}</div>')
        elif b.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows
            )
            body.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                        f"<tbody>{rows}</tbody></table></div>")
        elif b.kind == "figures":
            if not any(f.png_base64 for f in figures):
                continue
            body.append("<h2>Plots</h2><div class=\"figs\">")
            for f in (f for f in figures if f.png_base64):
                body.append(
                    f'<figure id="fig-{html.escape(f.name)}"><img alt="{html.escape(f.title)}" '
                    f'src="data:image/png;base64,{f.png_base64}"><figcaption><strong>'
                    f"{html.escape(f.title)}</strong> — {html.escape(f.caption)}</figcaption>"
                    "</figure>"
                )
            body.append("</div>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureImage:
    """A rendered plot. ``note`` is set instead of an image's absence going unexplained."""

    name: str
    title: str
    caption: str
    png_base64: str
    note: str | None = None


def _colors(dataset: EvalDataset) -> dict[str, str]:
    """Stable colours: the champion is always black, so it is found at a glance in every plot."""
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    out = {dataset.champion: "#222222"}
    for i, name in enumerate(m for m in dataset.models if m != dataset.champion):
        out[name] = palette[i % len(palette)]
    return out


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)  # no bbox "tight": it draws twice
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(
    width: float = 6.2, height: float = 4.2, ncols: int = 1, *, dates: bool = False
) -> Figure:
    """A figure with fixed margins (in inches, so they fit any size).

    matplotlib.figure.Figure, not pyplot: no global state, no GUI backend, nothing to close.
    Fixed margins, not a layout engine: constrained layout re-measures every text on every
    draw and cost more than the drawing itself (~0.4 s CPU per three-panel figure).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    bottom = 1.05 if dates else 0.55
    fig.subplots_adjust(
        left=0.7 / width,
        right=1.0 - 0.15 / width,
        bottom=bottom / height,
        top=1.0 - 0.35 / height,
        wspace=0.3,
    )
    fig.subplots(1, ncols, squeeze=False)
    return fig


def make_figures(dataset: EvalDataset, payload: Mapping[str, Any]) -> list[FigureImage]:
    """All plots for the HTML. A plot that cannot be drawn (one label class, non-probability
    scores, an unexpected error) becomes a note, never a missing report."""
    if len(dataset) == 0 or not dataset.models:
        return []
    rows = common_rows(dataset)
    if not rows.any():
        rows = np.ones(len(dataset), dtype=bool)
    colors = _colors(dataset)
    builders: list[tuple[str, Any]]
    if dataset.task == "classification":
        builders = [("roc", _fig_roc), ("calibration", _fig_calibration), ("scores", _fig_scores)]
    else:
        builders = [("predicted_vs_actual", _fig_pred_actual), ("residuals", _fig_residuals)]
    builders.append(("sequential", _fig_sequential))
    if payload["exploration"]["exploring"]:
        builders.append(("arm_shares", _fig_arm_shares))
    out: list[FigureImage] = []
    for name, build in builders:
        try:
            fig = build(dataset, rows, colors, payload)
        except Exception as exc:  # a broken plot must not lose the decision record
            log.exception("report plot %s failed", name)
            fig = FigureImage(name, name, "", "", f"Plot {name} could not be drawn: {exc}")
        if fig is not None:
            out.append(fig)
    return out


def roc_points(
    labels: np.ndarray, scores: np.ndarray, max_points: int = ROC_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, TPR) at up to ``max_points`` thresholds spread evenly over the score mass.

    Why not ``metrics.roc_curve(..., max_points=...)``: it sorts every score before thinning
    (O(n log n), ~0.5 s per model at 1M rows), only to throw away all but a few hundred points.
    Here the thresholds are quantiles of a fixed-seed subsample, and each point's TPR/FPR is
    counted over all rows (one ``searchsorted`` against the thresholds plus two ``bincount``s),
    so every plotted point lies exactly on the empirical ROC curve.
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(s) & ((y == 0) | (y == 1))
    y, s = y[keep], s[keep]
    n_pos = int(np.count_nonzero(y == 1))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC curve needs both classes")
    sample = s if s.size <= 50_000 else np.random.default_rng(0).choice(s, 50_000)
    edges = np.unique(np.quantile(sample, np.linspace(0.0, 1.0, max_points)))
    # idx = number of thresholds <= score: the score is predicted positive at threshold j
    # exactly when idx > j.
    idx = np.searchsorted(edges, s, side="right")
    pos = np.bincount(idx, weights=y, minlength=edges.size + 1)
    tot = np.bincount(idx, minlength=edges.size + 1).astype(np.float64)
    tp = np.cumsum(pos[::-1])[::-1][1:]  # tp[j] = positives with idx >= j + 1
    fp = np.cumsum((tot - pos)[::-1])[::-1][1:]
    fpr = np.concatenate(([0.0], fp[::-1] / n_neg, [1.0]))
    tpr = np.concatenate(([0.0], tp[::-1] / n_pos, [1.0]))
    return fpr, tpr


def _hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Density histogram on equal-width ``edges`` in O(n): ``np.histogram`` given an edge array
    sorts its input in blocks (~0.1 s per million values), which dominated the score plot."""
    v = values[np.isfinite(values)]
    lo, hi = float(edges[0]), float(edges[-1])
    v = v[(v >= lo) & (v <= hi)]
    nb = edges.size - 1
    if v.size == 0:
        return np.zeros(nb)
    idx = np.minimum(((v - lo) * (nb / (hi - lo))).astype(np.int64), nb - 1)
    counts = np.bincount(idx, minlength=nb).astype(np.float64)
    return counts / (counts.sum() * (hi - lo) / nb)


def _central_edges(arrays: Sequence[np.ndarray], bins: int = HIST_BINS) -> np.ndarray:
    """Equal-width bin edges over the central 99% of the finite values (from a fixed-seed
    subsample: percentiles of a few million values are not worth their time for a plot)."""
    finite = [a[np.isfinite(a)] for a in arrays]
    rng = np.random.default_rng(0)
    pooled = np.concatenate([f if f.size <= 20_000 else rng.choice(f, 20_000) for f in finite])
    if pooled.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    lo, hi = (float(v) for v in np.percentile(pooled, [0.5, 99.5]))
    return np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)


def _metric_value(payload: Mapping[str, Any], model: str, metric: str) -> Any:
    """A model's metric value from the report payload, None when it was not computed."""
    metrics = (payload["metrics"]["models"].get(model) or {}).get("metrics") or {}
    return (metrics.get(metric) or {}).get("value")


def _fig_roc(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]
    fig = _new_figure(5.4, 4.6)
    ax = fig.axes[0]
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
    skipped = []
    for name, col in dataset.models.items():
        try:
            fpr, tpr = roc_points(y, col.scores[rows])
        except ValueError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        value = _metric_value(payload, name, "auroc")
        ax.plot(fpr, tpr, color=colors[name], lw=1.6,
                label=f"{name} (AUROC {_num(value, '.3f')})")
    if skipped and len(skipped) == len(dataset.models):
        return FigureImage("roc", "ROC curves", "", "", "ROC not drawn: " + "; ".join(skipped))
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return FigureImage(
        "roc",
        "ROC curves",
        f"All models on the same {_int(int(rows.sum()))} requests, at up to {ROC_POINTS} "
        "thresholds each; AUROC with DeLong CIs is in the metrics table.",
        _png(fig),
        "ROC skipped for " + "; ".join(skipped) if skipped else None,
    )


def _fig_calibration(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]
    fig = _new_figure(5.4, 4.6)
    ax = fig.axes[0]
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", label="perfectly calibrated")
    skipped = []
    drawn = 0
    for name, col in dataset.models.items():
        s = col.scores[rows]
        if probability_violations(s):
            skipped.append(f"{name} (scores outside [0, 1])")
            continue
        table = calibration_curve(y, s, n_bins=CALIBRATION_BINS, strategy="uniform")
        if table.counts.size == 0:
            continue
        ece = _metric_value(payload, name, "ece")
        ax.plot(table.mean_predicted, table.observed_rate, marker="o", ms=3.5, lw=1.4,
                color=colors[name], label=f"{name} (ECE {_num(ece, '.3f')})")
        drawn += 1
    if not drawn:
        return FigureImage("calibration", "Calibration", "", "",
                           "Calibration not drawn: " + ("; ".join(skipped) or "no data"))
    ax.set(xlabel="mean predicted probability (bin)", ylabel="observed positive rate",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return FigureImage(
        "calibration",
        "Calibration (reliability diagram)",
        f"{CALIBRATION_BINS} equal-width bins, empty bins dropped; on the diagonal a predicted "
        "probability means what it says.",
        _png(fig),
        "Calibration skipped for " + "; ".join(skipped) if skipped else None,
    )


def _fig_scores(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]
    k = len(dataset.models)
    fig = _new_figure(min(3.4 * k, 11.0), 3.4, ncols=k)
    all_scores = [col.scores[rows] for col in dataset.models.values()]
    if not any(probability_violations(s) for s in all_scores):
        edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    else:  # logits or a broken model: the central 99% of what was emitted
        edges = _central_edges(all_scores)
    for ax, name, s in zip(fig.axes, dataset.models, all_scores, strict=True):
        for label, ls, txt in ((1.0, "-", "label 1"), (0.0, "--", "label 0")):
            part = s[(y == label) & np.isfinite(s)]
            if part.size:
                ax.stairs(_hist(part, edges), edges, color=colors[name], ls=ls, lw=1.3, label=txt)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.axes[0].set_ylabel("density", fontsize=8)
    return FigureImage(
        "scores",
        "Score distributions",
        "Per model, by label (solid: positives, dashed: negatives); better separation, better "
        "ranking.",
        _png(fig),
    )


def _fig_pred_actual(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    idx = np.flatnonzero(rows & np.isfinite(dataset.labels))
    if idx.size == 0:
        return FigureImage("predicted_vs_actual", "Predicted vs actual", "", "",
                           "Predicted vs actual not drawn: no finite targets")
    if idx.size > SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(idx, SCATTER_POINTS, replace=False))
    y = dataset.labels[idx]
    k = len(dataset.models)
    fig = _new_figure(min(3.6 * k, 11.0), 3.6, ncols=k)
    lo, hi = np.percentile(y, [0.5, 99.5])
    for ax, (name, col) in zip(fig.axes, dataset.models.items(), strict=True):
        ax.scatter(y, col.scores[idx], s=3, alpha=0.35, color=colors[name], linewidths=0)
        ax.plot([lo, hi], [lo, hi], color="#888888", lw=1, ls="--")
        ax.set_title(f"{name} (RMSE {_num(_metric_value(payload, name, 'rmse'))})", fontsize=9)
        ax.set_xlabel("actual", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("predicted", fontsize=8)
    return FigureImage(
        "predicted_vs_actual",
        "Predicted vs actual",
        f"A random {_int(idx.size)} of the common requests (fixed seed); the dashed line is a "
        "perfect prediction.",
        _png(fig),
    )


def _fig_residuals(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]
    res = {name: col.scores[rows] - y for name, col in dataset.models.items()}
    if not any(np.isfinite(r).any() for r in res.values()):
        return FigureImage("residuals", "Residuals", "", "", "Residuals not drawn: no data")
    edges = _central_edges(list(res.values()))
    fig = _new_figure(6.2, 4.0)
    ax = fig.axes[0]
    for name, r in res.items():
        ax.stairs(_hist(r, edges), edges, color=colors[name], lw=1.4, label=name)
    ax.axvline(0.0, color="#888888", lw=1, ls="--")
    ax.set(xlabel="residual (predicted - actual)", ylabel="density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return FigureImage(
        "residuals",
        "Residual distributions",
        "Central 99% of residuals per model on the common requests; narrower and centred on 0 "
        "is better.",
        _png(fig),
    )


def _path_array(values: Sequence[Any] | None) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values or []], dtype=np.float64)


def look_limits(xs: np.ndarray, use_time: bool) -> tuple[float, float] | None:
    """x-axis limits around the sequential test's looks: 5% padding, at least an hour (or one
    request) each side. Explicit because matplotlib gives a single look (a first report) a
    multi-year date axis."""
    xs = xs[np.isfinite(xs)]
    if not xs.size:
        return None
    lo, hi = float(xs.min()), float(xs.max())
    pad = max((hi - lo) * 0.05, 3600.0 if use_time else 1.0)
    return lo - pad, hi + pad


def _fig_sequential(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    """log Lambda (the mSPRT likelihood ratio) per look against log(1/alpha): the always-valid
    p-value is min(1, 1 / max Lambda), so crossing the line is exactly p <= alpha. The right
    panel is the confidence sequence of the improvement, which must leave 0 for the same call."""
    seqs = [(d["challenger"], d["sequential"]) for d in payload["decisions"] if d.get("sequential")]
    if not seqs:
        return None
    use_time = all(
        len(ts) > 0 and bool(np.isfinite(ts).all())
        for ts in (_path_array(s["path"].get("ts")) for _, s in seqs)
    )
    fig = _new_figure(11.0, 3.9, ncols=2, dates=use_time)
    ax_lr, ax_cs = fig.axes
    # The family's alpha: each challenger's own "alpha" is already its corrected (Holm) level,
    # and the lines below apply the correction themselves.
    alpha = float(seqs[0][1].get("family_alpha") or payload["alpha"])
    xs = np.concatenate([_path_array(s["path"].get("ts" if use_time else "n")) for _, s in seqs])
    for name, s in seqs:
        path = s["path"]
        x = (_path_array(path.get("ts")) * 1e6).astype("datetime64[us]") if use_time else \
            _path_array(path.get("n"))
        log_lr = _path_array(path.get("log_lr"))
        color = colors.get(name, "#1f77b4")
        ax_lr.plot(x, log_lr, marker="o", ms=3, lw=1.5, color=color,
                   label=f"{name} (p = {_p(s.get('p_value'))})")
        est = _path_array(path.get("estimate"))
        ax_cs.plot(x, est, marker="o", ms=3, lw=1.5, color=color, label=name)
        cs_low, cs_high = _path_array(path.get("cs_low")), _path_array(path.get("cs_high"))
        ax_cs.fill_between(x, cs_low, cs_high, color=color, alpha=0.15, lw=0)
        if len(x) == 1:  # a band needs two looks: one look shows its interval as a bar
            ax_cs.vlines(x, cs_low, cs_high, color=color, alpha=0.5, lw=6)
    boundary = math.log(1.0 / alpha)
    ax_lr.axhline(boundary, color="#c5221f", lw=1.2, ls="--",
                  label=f"log(1/alpha) = {boundary:.2f}")
    n_ch = len(payload["decisions"])
    corr = (payload["decisions"][0].get("policy") or {}).get("correction", "none")
    if n_ch > 1 and corr != "none":
        ax_lr.axhline(math.log(n_ch / alpha), color="#c5221f", lw=1, ls=":",
                      label=f"log({n_ch}/alpha): first {CORRECTION_LABELS.get(corr, corr)} step")
    if ax_lr.get_ylim()[1] > 50:  # a clear winner dwarfs the boundary on a linear axis
        ax_lr.set_yscale("symlog", linthresh=10.0)
    # Looks are in label-arrival order (inference time only for records without label_ts).
    ax_lr.set(ylabel="log likelihood ratio",
              xlabel="label arrival time (UTC)" if use_time else "paired requests")
    ax_lr.legend(fontsize=7)
    ax_lr.grid(alpha=0.3)
    ax_cs.axhline(0.0, color="#888888", lw=1, ls="--")
    ax_cs.set(ylabel="improvement (+: challenger better)",
              xlabel="label arrival time (UTC)" if use_time else "paired requests")
    ax_cs.legend(fontsize=7)
    ax_cs.grid(alpha=0.3)
    limits = look_limits(xs, use_time)
    if limits is not None:
        lo, hi = limits
        for ax in (ax_lr, ax_cs):
            if use_time:
                ax.set_xlim(np.datetime64(int(lo * 1e6), "us"), np.datetime64(int(hi * 1e6), "us"))
            else:
                ax.set_xlim(lo, hi)
    if use_time:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        for ax in (ax_lr, ax_cs):
            locator = AutoDateLocator(maxticks=8)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    return FigureImage(
        "sequential",
        "Sequential test over time",
        "Left: the always-valid test's log likelihood ratio at each look; reaching the red line "
        "means always-valid p <= alpha (before the correction across challengers). Right: the "
        "improvement estimate with its always-valid confidence sequence.",
        _png(fig),
    )


def _fig_arm_shares(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    ts = np.asarray(dataset.ts, dtype=np.float64)
    ok = np.isfinite(ts)
    if not ok.any():
        return None
    arms = list(payload["exploration"]["arm_shares"])
    served = np.asarray(dataset.served, dtype=object)[ok]
    code = np.full(served.size, len(arms), dtype=np.int64)
    for k, arm in enumerate(arms):
        code[served == arm] = k
    t = ts[ok]
    lo, hi = float(t.min()), float(t.max())
    nb = TIME_BINS if hi > lo else 1
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nb + 1)
    b = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, nb - 1)
    k_all = len(arms) + 1
    counts = np.bincount(b * k_all + code, minlength=nb * k_all).reshape(nb, k_all)[:, :-1]
    totals = counts.sum(axis=1, keepdims=True)
    keep = totals[:, 0] > 0
    shares = counts[keep] / totals[keep]
    # Stacked bars, one per bin with traffic: an idle gap stays empty instead of being bridged
    # by a line interpolated across it.
    left = (edges[:-1][keep] * 1e6).astype("datetime64[us]")
    width = np.timedelta64(max(int((edges[1] - edges[0]) * 1e6), 1), "us")
    fig = _new_figure(7.5, 3.6, dates=True)
    ax = fig.axes[0]
    bottom = np.zeros(int(keep.sum()))
    for k, arm in enumerate(arms):
        ax.bar(left, shares[:, k], width=width, bottom=bottom, align="edge", label=arm,
               color=colors.get(arm, "#999999"), alpha=0.85, linewidth=0)
        bottom = bottom + shares[:, k]
    ax.set_xlim(np.datetime64(int(edges[0] * 1e6), "us"),
                np.datetime64(int(edges[-1] * 1e6), "us"))
    ax.set(ylabel="share of requests served", xlabel="inference time (UTC)", ylim=(0, 1))
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator(maxticks=8)  # no "58:08.000000" ticks on a short span
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=8, loc="upper right")
    idle = int(nb - keep.sum())
    return FigureImage(
        "arm_shares",
        "Arm shares over time",
        f"Share of requests each arm served, in {nb} equal time bins"
        + (f"; {idle} bins without traffic are left empty." if idle else "."),
        _png(fig),
    )


__all__ = [
    "HTML_FILE",
    "JSON_FILE",
    "MARKDOWN_FILE",
    "REPORT_SCHEMA_VERSION",
    "Block",
    "FigureImage",
    "build_report",
    "headline",
    "make_figures",
    "markdown_to_blocks",
    "render_html",
    "render_markdown",
    "report_blocks",
    "write_report",
]
