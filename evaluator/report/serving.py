"""Content blocks on how the arms served: guardrails, latency and outcomes per model, arm shares
and off-policy values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evaluator.report.document import Block, _h, _table
from evaluator.report.format import _ci, _diff, _finite, _int, _num, _pct


def _guardrail_blocks(payload: Mapping[str, Any]) -> list[Block]:
    blocks = [_h(2, "Guardrails")]
    rows = []
    for d in payload["decisions"]:
        g = d.get("guardrails") or {}
        for c in g.get("checks") or []:
            passed = c.get("passed")
            result = ("insufficient data" if passed is None else
                      {True: "pass", False: "**FAIL**"}[passed] if isinstance(passed, bool)
                      else str(passed))
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
                vifs = (c.get("vif"), c.get("vif_champion"))
                if any(_finite(v) and v > 1 for v in vifs):  # why the bounds are wide
                    margin += (f"; slow calls clustered in time: effective n "
                               f"{_int(c.get('n_effective'))} challenger, "
                               f"{_int(c.get('n_effective_champion'))} champion")
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
