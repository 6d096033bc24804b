"""The report's content blocks, in reading order, from the payload alone: decisions, experiments,
join, metrics and tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evaluator.report.document import Block, _h, _table
from evaluator.report.format import (
    LOSS_TESTS,
    METRIC_LABELS,
    VERDICTS,
    _ci,
    _diff,
    _finite,
    _improvement,
    _int,
    _num,
    _p,
    _pct,
)
from evaluator.report.payload import _verdict_counts
from evaluator.report.serving import _exploration_blocks, _guardrail_blocks


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
        from evaluator.report.drift import drift_blocks  # drift's modules only when shown

        blocks += drift_blocks(payload["drift"])
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
