"""Replay records: schema v1 inference records with the challenger's outcome in mode "replay",
their labels, and the ids that make a replay idempotent.

Where they go: `<log>/replay-<route>-<challenger>/{inferences,labels}`, the file sink's layout
under a directory of its own, which the evaluator's file source already reads
(`<root>/*/<stream>`). Their route is `<route>@replay` (`replay_route`): a replayed request is
not a second live request, so it never enters the live route's verdict; the replay's report loads
that route and is marked as replay.

Idempotent by construction: a replay record's id is derived from the logged id and the
challenger (`replay_id`), the records already written are the checkpoint (`written_ids` reads
them back), and the store drops a re-delivered id anyway. Labels: the label already joined to the
logged request is copied under the replay id, so the replay joins exactly the labels the live
run knew; a label that arrives after a replay is copied by the next run of the same replay.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import orjson

from evaluator.replay.logged import LoggedRow
from understudy.records import (
    INFERENCES,
    LABELS,
    MAX_ID_LENGTH,
    SCHEMA_VERSION,
    InferenceRecord,
    LabelRecord,
    ModelOutcome,
    Tensor,
)
from understudy.segments import segment_paths

REPLAY_SUFFIX = "@replay"
FLOATS = frozenset({"FP16", "FP32", "FP64"})
INTEGERS = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
                      "BF16"})


def replay_route(route: str) -> str:
    """The route replay records are logged under."""
    return route + REPLAY_SUFFIX


def replay_dir(log_root: Path, route: str, challenger: str) -> Path:
    return log_root / f"replay-{route}-{challenger}"


def replay_id(request_id: str, challenger: str) -> str:
    """Deterministic: the same logged request and challenger always give the same id."""
    rid = f"{request_id}~replay~{challenger}"
    if len(rid) <= MAX_ID_LENGTH:
        return rid
    return "replay-" + hashlib.sha256(rid.encode()).hexdigest()


def written_ids(directory: Path) -> tuple[set[str], set[str]]:
    """(inference ids, label ids) already in a replay directory: the replay's checkpoint."""
    found: dict[str, set[str]] = {INFERENCES: set(), LABELS: set()}
    for stream, ids in found.items():
        for segment in segment_paths(directory / stream):
            with segment.open("rb") as f:
                for line in f:
                    if line.endswith(b"\n"):  # a line without one is still being written
                        ids.add(str(orjson.loads(line)["request_id"]))
    return found[INFERENCES], found[LABELS]


def json_values(datatype: str, values: list[Any]) -> list[Any]:
    """Logged values (float64 from the store) as the record's JSON elements of `datatype`."""
    if datatype in FLOATS:
        return [v if isinstance(v, float) and math.isfinite(v) else None for v in values]
    if datatype in INTEGERS:
        return [int(v) for v in values]
    if datatype == "BOOL":
        return [bool(v) for v in values]
    return [str(v) for v in values]


def tensor(datatype: str, shape: list[int], data: list[Any]) -> Tensor:
    return {"datatype": datatype, "shape": shape, "data": json_values(datatype, data)}


def champion_outcome(row: LoggedRow, score_output: str) -> ModelOutcome:
    """The logged champion outcome as the store kept it: its score as a one-element tensor."""
    ok = row.champion_status == "ok"
    return {"role": "champion", "mode": "served", "version": row.champion_version,
            "status": row.champion_status,  # type: ignore[typeddict-item]
            "latency_ms": row.champion_latency_ms,
            "outputs": {score_output: tensor("FP64", [1], [row.champion_score])} if ok else None,
            "error": None if ok else f"logged champion outcome: {row.champion_status}"}


def inference_record(row: LoggedRow, route: str, challenger: ModelOutcome, name: str,
                     score_output: str) -> InferenceRecord:
    """The replay record of one logged row: the logged champion and the replayed challenger."""
    return {
        "schema_version": SCHEMA_VERSION, "kind": "inference",
        "request_id": replay_id(row.request_id, name), "ts": row.ts,
        "route": replay_route(route), "policy": {"type": "champion"},
        "served": {"model": row.champion, "version": row.champion_version},
        "propensity": 1.0, "arms": {row.champion: 1.0}, "key": None,
        "inputs": {k: tensor(v.datatype, [1, len(v.values)], v.values)
                   for k, v in row.inputs.items()},
        "outputs": {row.champion: champion_outcome(row, score_output), name: challenger},
        "status": row.http_status, "gateway_latency_ms": row.gateway_latency_ms,
        "protocol": "http",
    }


def label_record(row: LoggedRow, challenger: str) -> LabelRecord:
    """The logged request's label, under the replay id."""
    now = time.time()
    return {"schema_version": SCHEMA_VERSION, "kind": "label",
            "request_id": replay_id(row.request_id, challenger), "label": row.label,
            "reward": row.reward,
            "event_time": row.event_time if row.event_time is not None else row.ts,
            "received_ts": row.received_ts if row.received_ts is not None else now}
