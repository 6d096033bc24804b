"""The logged requests a replay resends, read back from the evaluator's store.

The store keeps every prediction row's input tensors (`inputs`: numeric elements as float64
little-endian blobs, BYTES as a JSON list, with the tensor's datatype and row width), the
champion's outcome (score, status, latency) and the label joined so far. That is everything a
replay needs, whatever the source (files or Kafka) and whatever the request's encoding (JSON or
binary tensors: the log holds them decoded). A prediction row is resent as a batch of one:
`[1, width]`, which is how the gateway's models see a row.

Precision: float64 holds every FP16/FP32/FP64, BF16 pattern and integer up to 2**53 exactly;
larger INT64/UINT64 values come back rounded (logged features that large are ids, not signals).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from evaluator.dataset import STATUS_CODES
from evaluator.store import ROLE_CODES, Store

STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}


@dataclass(frozen=True)
class LoggedInput:
    """One input tensor of one prediction row, as logged."""

    datatype: str
    values: list[Any]  # width elements: floats (numeric) or str (BYTES)


@dataclass
class LoggedRow:
    """One logged prediction row: what to resend and what to compare it with."""

    request_id: str  # the log's id; `#row` appended for rows past the first of a batch
    ts: float
    champion: str
    champion_version: str
    champion_status: str
    champion_score: float
    champion_latency_ms: float | None
    gateway_latency_ms: float
    http_status: int
    inputs: dict[str, LoggedInput] = field(default_factory=dict)
    label: float | None = None
    reward: float | None = None
    event_time: float | None = None
    received_ts: float | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None or self.reward is not None


def _opt(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return None if f != f else f


def _decode(datatype: str, width: int, num: Any, cat: Any) -> list[Any]:
    if datatype == "BYTES":
        return [str(x) for x in orjson.loads(cat)] if cat is not None else []
    if num is None:
        return []
    values: list[Any] = np.frombuffer(bytes(num), dtype="<f8")[:width].tolist()
    return values


def read_rows(store: Store, route: str, since: float | None = None,
              until: float | None = None, *,
              request_ids: Iterable[str] | None = None) -> list[LoggedRow]:
    """The route's prediction rows in [since, until) with their inputs, champion outcome and
    label, in time order; only `request_ids` (as `EvalDataset.request_ids` spells them) when
    given."""
    wanted = None if request_ids is None else set(request_ids)
    with store._lock:  # one consistent read, the way the store's own readers do it
        e = store._connect()
        where, params = store._window(route, since, until)
        rows = e.query(
            "SELECT i.id, i.request_id, i.row_ix, i.ts, i.gateway_latency_ms, i.status, o.model, "  # noqa: S608
            "o.version, o.status, o.score, o.latency_ms, l.label, l.reward, l.has_label, "
            "l.event_time, l.received_ts FROM inferences i "
            "JOIN outcomes o ON o.inf_id = i.id AND o.role = ? "
            f"LEFT JOIN labels l ON l.inf_id = i.id WHERE {where} ORDER BY i.ts, i.id",
            [ROLE_CODES["champion"], *params])
        names = store._name_lookup(e)
        out: dict[int, LoggedRow] = {}
        for (inf_id, rid, row_ix, ts, gw_lat, http, model, version, status, score, lat, label,
             reward, has_label, event_time, received_ts) in rows:
            request_id = str(rid) if not row_ix else f"{rid}#{int(row_ix)}"
            if wanted is not None and request_id not in wanted:
                continue
            out[int(inf_id)] = LoggedRow(
                request_id=request_id, ts=float(ts), champion=str(names[int(model)]),
                champion_version="" if version is None else str(names[int(version)]),
                champion_status=STATUS_NAMES.get(int(status), "error"),
                champion_score=float("nan") if score is None else float(score),
                champion_latency_ms=_opt(lat), gateway_latency_ms=float(gw_lat or 0.0),
                http_status=int(http or 200),
                label=_opt(label) if has_label else None, reward=_opt(reward),
                event_time=_opt(event_time), received_ts=_opt(received_ts))
        if out:
            ids = list(out)
            inputs = e.query("SELECT inf_id, name, datatype, width, num, cat FROM inputs "
                             "WHERE inf_id BETWEEN ? AND ?", [min(ids), max(ids)])
            for inf_id, name, datatype, width, num, cat in inputs:
                row = out.get(int(inf_id))
                if row is not None:
                    dt = str(names[int(datatype)])
                    row.inputs[str(names[int(name)])] = LoggedInput(
                        dt, _decode(dt, int(width), num, cat))
    return list(out.values())


def replayed_ids(store: Store, route: str) -> tuple[set[str], set[str]]:
    """(request ids, labelled request ids) the store already holds for a route: the replay
    records ingested so far, part of a replay's checkpoint."""
    with store._lock:
        e = store._connect()
        rows = e.query("SELECT i.request_id, l.has_label FROM inferences i LEFT JOIN labels l "
                       "ON l.inf_id = i.id WHERE i.route = ?", [route])
    return {str(r) for r, _ in rows}, {str(r) for r, has in rows if has}


def inputs_of(store: Store, route: str, request_ids: Iterable[str]
              ) -> dict[str, dict[str, list[Any]]]:
    """request id (`EvalDataset.request_ids` spelling) -> {tensor: logged values}, for a few
    rows (the report's disagreement explorer): one query by id, never a window scan."""
    keys: dict[tuple[str, int], str] = {}
    for rid in request_ids:
        base, sep, row = rid.rpartition("#")
        keys[(base, int(row)) if sep and row.isdigit() else (rid, 0)] = rid
    if not keys:
        return {}
    bases = sorted({b for b, _ in keys})
    marks = ", ".join("?" * len(bases))
    with store._lock:
        e = store._connect()
        rows = e.query(
            "SELECT i.request_id, i.row_ix, x.name, x.datatype, x.width, x.num, x.cat "  # noqa: S608
            f"FROM inferences i JOIN inputs x ON x.inf_id = i.id WHERE i.route = ? AND "
            f"i.request_id IN ({marks})", [route, *bases])
        names = store._name_lookup(e)
    out: dict[str, dict[str, list[Any]]] = {}
    for rid, row_ix, name, datatype, width, num, cat in rows:
        key = keys.get((str(rid), int(row_ix)))
        if key is not None:
            dt = str(names[int(datatype)])
            out.setdefault(key, {})[str(names[int(name)])] = _decode(dt, int(width), num, cat)
    return out
