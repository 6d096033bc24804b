"""Raw log lines -> rows of a store `Batch`: the contract's reader, then the evaluator's columns.

Records are read with understudy/reader.py (the same types and vocabulary the gateway writes
with); this module turns one `Inference` into one row per prediction (a batched request has
several), with each model's score, its stored codes and the request's input features, and one
`Label` into a label row. Bad records are counted in the batch under their reason (committed
with it, so a replay never counts one twice) and logged, rate-limited; they never raise.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from evaluator.config import EvaluatorConfig
from evaluator.store import Batch
from understudy.labels import finite_number
from understudy.reader import Inference, Label, RecordError, read_record
from understudy.vocabulary import MODE_CODES, ROLE_CODES, STATUS_CODES, UNKNOWN_MODE

log = logging.getLogger(__name__)

OK = STATUS_CODES["ok"]
NAN = math.nan
# The integer columns' ranges (evaluator/lake/layout.py): a value past them is unknown, or
# (a label's row) a bad record, never a batch that cannot be written.
INT32 = range(-(2**31), 2**31)
INT64 = range(-(2**63), 2**63)


def score_of(value: Any) -> float:
    """A model output element as a score; NaN/inf/non-numbers become NaN (never an error)."""
    if type(value) is float:  # the common case first: x - x is 0.0 unless x is NaN or inf
        return value if value - value == 0.0 else NAN
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return NAN
    f = finite_number(value)
    return NAN if f is None else f


def pack_floats(values: list[Any]) -> bytes:
    """A numeric tensor row as float64 little-endian bytes; unusable elements become NaN."""
    try:
        pack = _PACKERS[len(values)]
    except KeyError:  # one per row width (at most max_feature_elements of them)
        pack = _PACKERS[len(values)] = struct.Struct(f"<{len(values)}d").pack
    try:
        return pack(*values)
    except (struct.error, TypeError, OverflowError):
        return pack(*(score_of(v) for v in values))


_PACKERS: dict[int, Callable[..., bytes]] = {}


def _batch_rows(inputs: Mapping[str, Any]) -> int:
    """Rows of a (possibly batched) request: the first input's leading dim when it has >= 2."""
    for tensor in inputs.values():
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[0], int):
            return max(1, shape[0])
        return 1
    return 1


def _row_slices(tensor: Any, rows: int) -> tuple[list[list[Any]], int] | None:
    """The tensor's data per prediction row, and the row width; None when unusable."""
    if not isinstance(tensor, dict):
        return None
    data = tensor.get("data")
    if not isinstance(data, list) or not data:
        return None
    shape = tensor.get("shape")
    if rows > 1 and isinstance(shape, list) and len(shape) >= 2 and shape[0] == rows \
            and len(data) % rows == 0:
        w = len(data) // rows
        return [data[i * w:(i + 1) * w] for i in range(rows)], w
    # Not batched along the rows: a request-level tensor every row shares.
    return [data] * rows, len(data)


def _scores(outputs: Mapping[str, Any] | None, name: str | None, rows: int) -> list[float]:
    """Score per row: the row's first element of the chosen output tensor (NaN if absent)."""
    if not outputs:
        return [NAN] * rows
    tensor = outputs.get(name) if name else next(iter(outputs.values()))
    if rows == 1:  # what _row_slices gives one row, without building the slices
        data = tensor.get("data") if isinstance(tensor, dict) else None
        return [score_of(data[0])] if isinstance(data, list) and data else [NAN]
    sliced = _row_slices(tensor, rows)
    if sliced is None:
        return [NAN] * rows
    per_row, _ = sliced
    return [score_of(r[0]) if r else NAN for r in per_row]


class RecordParser:
    """Raw record bytes -> rows of a `Batch`; bad records are counted and logged, never raised.

    `score_output(route)` names the output tensor that holds the score (None: the first one).
    """

    def __init__(self, score_output: Callable[[str], str | None] | None = None, *,
                 max_feature_elements: int = 1024, clock: Callable[[], float] = time.time,
                 log_every_s: float = 60.0) -> None:
        self.score_output = score_output or (lambda route: None)
        self.max_feature_elements = max_feature_elements
        self.clock = clock
        self.log_every_s = log_every_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    @classmethod
    def from_config(cls, config: EvaluatorConfig) -> RecordParser:
        return cls(config.score_output)

    def parse(self, batch: Batch, raw: bytes, where: str = "?") -> None:
        try:
            record = read_record(raw, self.clock)
            if record is None:  # an audit entry: shares the log, not evaluated
                batch.ignore()
            elif isinstance(record, Inference):
                self._inference(batch, record)
            else:
                self._label(batch, record)
        except RecordError as bad:
            self.count_bad(batch, bad.reason, f"{bad}", where)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            self.count_bad(batch, "invalid_record", f"{type(exc).__name__}: {exc}", where)

    def count_bad(self, batch: Batch, reason: str, detail: str, where: str) -> None:
        """Count a bad record in the batch (committed with it) and log it, rate-limited."""
        batch.reject(reason)
        now = time.monotonic()
        last = self._last_logged.get(reason)
        if last is not None and now - last < self.log_every_s:
            self._suppressed[reason] += 1
            return
        more = self._suppressed.pop(reason, 0)
        self._last_logged[reason] = now
        log.warning("skipping bad record (%s) at %s: %s%s", reason, where, detail[:300],
                    f" [+{more} more of this kind since the last message]" if more else "")

    def _inference(self, b: Batch, rec: Inference) -> None:
        rid = rec.request_id
        if b.seen(rid):
            return
        rows = _batch_rows(rec.inputs)
        score_name = self.score_output(rec.route)

        # Columns for every row first, so a failure below adds nothing to the batch.
        outcomes = []
        for model, oc in rec.outcomes.items():
            code = STATUS_CODES[oc.status]
            # A copy that shared a micro-batched call has that call's latency, not comparable
            # with a single request's: left out of latency statistics (understudy/records.py).
            lat = oc.single_call_latency_ms
            outcomes.append((
                model, ROLE_CODES[oc.role],
                UNKNOWN_MODE if oc.mode is None else MODE_CODES[oc.mode], oc.version, code,
                _scores(oc.outputs, score_name, rows) if code == OK else [NAN] * rows,
                NAN if lat is None else lat, oc.experiment,
                NAN if oc.sample_rate is None else oc.sample_rate,
            ))
        features: list[tuple[str, str, int, list[tuple[bytes | None, str | None]]]] = []
        for name, tensor in rec.inputs.items():
            sliced = _row_slices(tensor, rows)
            if sliced is None or sliced[1] > self.max_feature_elements:
                continue
            per_row, width = sliced
            datatype = str(tensor.get("datatype") or "")
            if datatype == "BYTES":
                features.append((str(name), datatype, width,
                                 [(None, orjson.dumps(r).decode()) for r in per_row]))
            else:
                features.append((str(name), datatype, width,
                                 [(pack_floats(r), None) for r in per_row]))

        b.start_record(rid)
        propensity = NAN if rec.propensity is None else rec.propensity
        latency = NAN if rec.gateway_latency_ms is None else rec.gateway_latency_ms
        known = rec.registry_version
        registry_version = known if known is not None and known in INT64 else -1
        status = rec.status if rec.status in INT32 else 0  # past int32: no HTTP status
        for r in range(rows):
            pos = b.add_row(rid, r, rec.route, rec.ts, rec.policy_type, rec.served_model,
                            propensity, rec.key, status, latency, registry_version)
            for model, role, mode, version, code, scores, lat, exp, rate in outcomes:
                b.add_outcome(pos, model, role, mode, version, code, scores[r], lat, exp, rate)
            for model, prob in rec.arms.items():
                b.add_arm(pos, model, NAN if prob is None else prob)
            for name, datatype, width, values in features:
                num, cat = values[r]
                b.add_input(pos, name, datatype, width, num, cat)

    def _label(self, b: Batch, rec: Label) -> None:
        b.add_label(rec.request_id, rec.index, rec.label, rec.reward, rec.event_time,
                    rec.received_ts)
