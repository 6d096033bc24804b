"""Resend logged rows to a challenger on Triton through the replay lane and log the outcomes.

One dispatcher paces the calls (`ReplayLane.turn`: the token bucket, then shed when busy) and
starts each call as a task; each finished call emits its record (and its label) to the sink at
once, so a replay stopped at any point has logged exactly the rows it finished and a re-run
skips them (`records.written_ids`).

Requests: numeric tensors go as Triton binary tensors (little-endian, the datatype's own width:
no float formatting, and BF16 patterns sent as they were logged), BYTES tensors as JSON data in
the same request; the answer is asked for as JSON.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from evaluator.replay.lane import ReplayLane
from evaluator.replay.logged import LoggedInput, LoggedRow
from evaluator.replay.records import (
    FLOATS,
    inference_record,
    label_record,
    replay_id,
)
from understudy.records import INFERENCES, LABELS, ModelOutcome, Tensor

log = logging.getLogger(__name__)

NUMPY_TYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BF16": "<u2", "BOOL": "?",
               "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "u1",
               "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}


class Sink(Protocol):
    def emit(self, stream: str, key: str, value: bytes) -> None: ...


@dataclass
class ReplayResult:
    """What one replay run did (printed by the CLI, asserted by tests)."""

    rows: int = 0  # logged rows in the window
    skipped: int = 0  # already replayed by an earlier run
    sent: int = 0  # calls made in this run
    ok: int = 0
    failed: int = 0  # error or timeout outcomes (logged as such)
    labels: int = 0  # label records written in this run
    shed: int = 0  # paced turns dropped because every slot was busy
    unreachable: str | None = None  # Triton could not be reached: the run stopped, unlogged
    seconds: float = 0.0


def infer_body(inputs: dict[str, LoggedInput]) -> tuple[bytes, bytes]:
    """(body, extra headers) of a Triton request for one row: binary numeric tensors."""
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, t in inputs.items():
        spec: dict[str, Any] = {"name": name, "datatype": t.datatype,
                                "shape": [1, len(t.values)]}
        if t.datatype == "BYTES":
            spec["data"] = [str(v) for v in t.values]
        else:
            blob = np.asarray(t.values, dtype=np.float64).astype(NUMPY_TYPES[t.datatype]).tobytes()
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        specs.append(spec)
    header = orjson.dumps({"inputs": specs})
    return header + b"".join(blobs), b"Inference-Header-Content-Length: %d\r\n" % len(header)


def _output_tensor(out: dict[str, Any]) -> Tensor:
    datatype = str(out.get("datatype", ""))
    data = list(out.get("data") or [])
    if datatype in FLOATS:
        data = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in data]
    return {"datatype": datatype, "shape": [int(d) for d in out.get("shape", [])], "data": data}


def outcome(status: int, body: bytes, latency_s: float, fallback_version: str = ""
            ) -> ModelOutcome:
    """A Triton answer as the challenger's replay outcome."""
    latency_ms = round(latency_s * 1000, 3)
    if status != 200:
        text = body[:200].decode(errors="replace")
        return _failed("error", latency_ms, f"triton {status}: {text}")
    try:
        answer = orjson.loads(body)
        outputs = {str(o["name"]): _output_tensor(o) for o in answer["outputs"]}
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        return _failed("error", latency_ms, f"unreadable Triton answer: {exc}")
    return {"role": "challenger", "mode": "replay",
            "version": str(answer.get("model_version") or fallback_version), "status": "ok",
            "latency_ms": latency_ms, "outputs": outputs, "error": None}


def _failed(status: str, latency_ms: float | None, error: str) -> ModelOutcome:
    return {"role": "challenger", "mode": "replay", "version": "",
            "status": status,  # type: ignore[typeddict-item]
            "latency_ms": latency_ms, "outputs": None, "error": error}


async def replay(rows: Sequence[LoggedRow], *, route: str, challenger: str, lane: ReplayLane,
                 sink: Sink, done: set[str], labelled: set[str],
                 score_output: str = "score") -> ReplayResult:
    """Replay every row not in `done` (replay ids already logged) and copy every known label
    not in `labelled`; emits to `sink` as calls finish."""
    result = ReplayResult(rows=len(rows))
    started = time.perf_counter()
    path = f"/v2/models/{challenger}/infer"

    def emit_label(row: LoggedRow) -> None:
        rid = replay_id(row.request_id, challenger)
        if row.labelled and rid not in labelled:
            sink.emit(LABELS, rid, orjson.dumps(label_record(row, challenger)))
            labelled.add(rid)
            result.labels += 1

    async def call(row: LoggedRow) -> None:
        body, headers = infer_body(row.inputs)
        try:
            resp = await lane.post(path, body, "application/octet-stream", headers)
            oc = outcome(resp.status, resp.body, resp.latency_s)
        except TimeoutError:
            oc = _failed("timeout", None, f"no answer within {lane.timeout_s:g} s")
        except (OSError, ConnectionError) as exc:
            # Not the challenger's failure: nothing is logged, the row stays to replay later.
            result.unreachable = f"{lane.url}: {exc}"
            return
        if oc["status"] == "ok":
            result.ok += 1
        else:
            result.failed += 1
        record = inference_record(row, route, oc, challenger, score_output)
        sink.emit(INFERENCES, record["request_id"], orjson.dumps(record))
        done.add(record["request_id"])
        emit_label(row)

    queue: deque[LoggedRow] = deque()
    for row in rows:
        if replay_id(row.request_id, challenger) in done:
            result.skipped += 1
            emit_label(row)  # a label that arrived after the earlier run
        else:
            queue.append(row)
    tasks: set[asyncio.Task[None]] = set()
    while queue and result.unreachable is None:
        if not await lane.turn():
            continue  # shed: every slot busy; the row waits for the next token
        task = asyncio.create_task(call(queue.popleft()))
        result.sent += 1
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    result.shed = lane.shed
    result.seconds = round(time.perf_counter() - started, 3)
    return result
