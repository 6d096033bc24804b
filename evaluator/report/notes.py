"""The report's prose: one headline per challenger, and what the numbers do not say on their own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evaluator.decision import METRICS
from evaluator.report.format import CORRECTION_LABELS, _diff, _finite, _improvement, _int, _num, _p


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


def _exclusions(excluded: Mapping[str, Any] | None) -> str:
    """The non-zero exclusion counts as "reason count, ..." ("" when there are none)."""
    return ", ".join(
        f"{k.replace('_', ' ')} {_int(v)}" for k, v in (excluded or {}).items() if v
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
        excl = _exclusions(mm.get("excluded"))
        if excl:
            notes.append(f"{model}: excluded from its metrics: {excl}.")
    for d in payload["decisions"]:
        excl = _exclusions(d.get("excluded"))
        if excl:
            notes.append(f"{d['challenger']}: excluded from the paired comparison: {excl}.")
    off = payload.get("offpolicy")
    if off:
        excl = _exclusions(off.get("excluded"))
        if excl:
            notes.append(f"Off-policy estimates exclude {excl} requests.")
        notes.extend(f"Off-policy: {x}" for x in off.get("notes") or [])
    return notes
