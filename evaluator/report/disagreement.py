"""The disagreement explorer: where champion and challenger disagree most, and how often.

Per challenger, on the rows both models answered (status ok, finite scores):

- `top`: the `top_n` rows with the largest |challenger - champion| score, each with its request
  id (look it up in the log), both scores, the label and, when the caller can fetch them, the
  row's logged inputs. Ties go to the smaller request id, so the list is deterministic.
- `bands`: agreement by the champion's score band. Classification: five equal bands of [0, 1],
  agreement = both on the same side of the decision threshold. Regression: the champion's
  prediction quintiles, agreement = |difference| <= 5% of |champion prediction|.
- `residuals` (regression): the `top_n` rows whose absolute residual changed most,
  |challenger - label| - |champion - label|, negative = the challenger is closer.

Computed from the dataset alone into report.json; `attach_inputs` adds the inputs of the few
listed rows afterwards (one store read of `top_n` rows, never the whole window).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from evaluator.dataset import Array, EvalDataset
from evaluator.report.document import Block, _h, _table

TOP_N = 10
BANDS = 5
REGRESSION_TOLERANCE = 0.05  # relative to |champion prediction|

InputsFor = Callable[[list[str]], Mapping[str, Mapping[str, list[Any]]]]


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def rank(diff: Array, request_ids: Array, top_n: int) -> list[int]:
    """Row indices by |diff| descending, ties by request id; NaN never ranked."""
    rows = np.flatnonzero(np.isfinite(diff))
    if top_n <= 0 or not rows.size:
        return []
    size = np.abs(diff[rows])
    if rows.size > top_n:  # only rows at least as far apart as the top_n-th (ties kept): O(n)
        kth = np.partition(size, rows.size - top_n)[rows.size - top_n]
        rows = rows[size >= kth]
    return sorted(rows.tolist(), key=lambda i: (-abs(float(diff[i])), str(request_ids[i])))[:top_n]


def _bands(dataset: EvalDataset, champ: Array, agree: Array,
           absdiff: Array) -> list[dict[str, Any]]:
    if dataset.task == "classification":
        edges = np.arange(BANDS + 1) / BANDS  # exact edges: 3 / 5 == 0.6
    else:
        edges = np.unique(np.quantile(champ, np.linspace(0, 1, BANDS + 1))) if champ.size \
            else np.array([])
    out = []
    for k in range(len(edges) - 1):
        lo, hi = edges[k], edges[k + 1]
        last = k == len(edges) - 2
        mask = (champ >= lo) & ((champ <= hi) if last else (champ < hi))
        n = int(mask.sum())
        out.append({"low": float(lo), "high": float(hi), "n": n,
                    "agreement": float(agree[mask].mean()) if n else None,
                    "mean_abs_diff": float(absdiff[mask].mean()) if n else None})
    return out


def _challenger(dataset: EvalDataset, name: str, top_n: int) -> dict[str, Any]:
    champ_col, ch_col = dataset.models[dataset.champion], dataset.models[name]
    both = champ_col.ok & ch_col.ok & np.isfinite(champ_col.scores) & np.isfinite(ch_col.scores)
    champ, ch = champ_col.scores[both], ch_col.scores[both]
    ids, labels = dataset.request_ids[both], dataset.labels[both]
    diff = ch - champ
    absdiff = np.abs(diff)
    if dataset.task == "classification":
        t = dataset.threshold
        agree = (champ >= t) == (ch >= t)
    else:
        agree = absdiff <= REGRESSION_TOLERANCE * np.abs(champ)

    def row(i: int) -> dict[str, Any]:
        return {"request_id": str(ids[i]), "champion": float(champ[i]),
                "challenger": float(ch[i]), "diff": float(diff[i]), "label": _f(labels[i]),
                "agree": bool(agree[i])}

    out: dict[str, Any] = {
        "n": int(both.sum()),
        "agreement": float(agree.mean()) if agree.size else None,
        "top": [row(i) for i in rank(diff, ids, top_n)],
        "bands": _bands(dataset, champ, agree, absdiff),
    }
    if dataset.task == "regression":
        change = np.abs(ch - labels) - np.abs(champ - labels)
        out["residuals"] = [{**row(i), "champion_residual": float(champ[i] - labels[i]),
                             "challenger_residual": float(ch[i] - labels[i]),
                             "change": float(change[i])} for i in rank(change, ids, top_n)]
    return out


def disagreement(dataset: EvalDataset, top_n: int = TOP_N) -> dict[str, Any] | None:
    """report.json's `disagreement` section (None without a champion and a challenger)."""
    if dataset.champion not in dataset.models or not dataset.challengers or not len(dataset):
        return None
    return {"top_n": top_n, "task": dataset.task, "threshold": dataset.threshold,
            "challengers": {c: _challenger(dataset, c, top_n) for c in dataset.challengers}}


def listed_ids(section: Mapping[str, Any]) -> list[str]:
    """Every request id the section lists (for fetching their inputs)."""
    ids: dict[str, None] = {}
    for part in section["challengers"].values():
        for r in (*part["top"], *part.get("residuals", ())):
            ids[r["request_id"]] = None
    return list(ids)


def attach_inputs(section: dict[str, Any] | None, inputs_for: InputsFor | None) -> None:
    """Add each listed row's logged inputs ({tensor: values}) in place."""
    if not section or inputs_for is None:
        return
    found = inputs_for(listed_ids(section))
    for part in section["challengers"].values():
        for r in (*part["top"], *part.get("residuals", ())):
            r["inputs"] = found.get(r["request_id"])


def _num(x: Any) -> str:
    return "–" if x is None else f"{x:.4g}"


def _inputs_text(inputs: Mapping[str, Iterable[Any]] | None, limit: int = 8) -> str:
    if not inputs:
        return "–"
    parts = []
    for name, values in inputs.items():
        vals = list(values)
        shown = ", ".join(_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                          else str(v) for v in vals[:limit])
        parts.append(f"{name}=[{shown}{', …' if len(vals) > limit else ''}]")
    return "; ".join(parts)


def disagreement_blocks(payload: Mapping[str, Any]) -> list[Block]:
    """The report's disagreement section (the same blocks in report.md and report.html)."""
    section = payload.get("disagreement")
    if not section:
        return []
    classification = section["task"] == "classification"
    rule = (f"agree = both on the same side of the threshold {section['threshold']:g}"
            if classification else
            f"agree = |difference| <= {REGRESSION_TOLERANCE:.0%} of |champion prediction|")
    blocks = [_h(2, "Disagreement: champion vs challenger"),
              Block("p", f"Rows both models answered; {rule}. Request ids are the log's "
                         "(`request_id`; `#k` is row k of a batched request).")]
    for name, part in section["challengers"].items():
        share = part["agreement"]
        blocks.append(_h(3, f"{payload['champion']} vs {name}: "
                            f"{'–' if share is None else f'{share:.1%}'} agreement on "
                            f"{part['n']:,} rows"))
        blocks.append(_table(
            ["champion score band", "rows", "agreement", "mean |difference|"],
            [[f"[{b['low']:.4g}, {b['high']:.4g}{']' if i == len(part['bands']) - 1 else ')'}",
              f"{b['n']:,}", "–" if b["agreement"] is None else f"{b['agreement']:.1%}",
              _num(b["mean_abs_diff"])] for i, b in enumerate(part["bands"])]))
        blocks.append(Block("p", f"Top {len(part['top'])} disagreements (largest |challenger − "
                                 "champion|):"))
        blocks.append(_table(
            ["request id", payload["champion"], name, "difference", "label", "inputs"],
            [[f"`{r['request_id']}`", _num(r["champion"]), _num(r["challenger"]),
              f"{r['diff']:+.4g}", _num(r["label"]), _inputs_text(r.get("inputs"))]
             for r in part["top"]]))
        if part.get("residuals"):
            blocks.append(Block("p", "Largest residual changes (|challenger − label| − "
                                     "|champion − label|; negative: the challenger is closer):"))
            blocks.append(_table(
                ["request id", "label", payload["champion"], name, "residual change", "inputs"],
                [[f"`{r['request_id']}`", _num(r["label"]), _num(r["champion"]),
                  _num(r["challenger"]), f"{r['change']:+.4g}", _inputs_text(r.get("inputs"))]
                 for r in part["residuals"]]))
    return blocks
