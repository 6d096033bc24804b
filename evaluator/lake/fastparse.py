"""The ingest fast path: raw records straight into a `LakeBatch`'s columns, many at a time.

`RecordParser.parse` (evaluator/ingest/parse.py) reads one record through the contract's typed
reader (understudy/reader.py: a dataclass per record and per outcome) and then adds its rows
through the batch's methods — about 12 µs an inference record, most of it building objects the
lake throws away. `FastParser.parse_many` reads the decoded JSON object once, appends to the
column lists directly, and handles only the shapes it can prove give the reader's values: an
unbatched request with float `ts`, outcomes that are objects, a label whose values are the
plain kinds. Anything else — malformed JSON, a bad or unusual record, a batched request, a
label without times — goes to `RecordParser.parse`, which rejects it with the same reason and
log line as before or reads it the same way. The columns, and so the Parquet files, are the
same as the per-record path's (tests/unit/test_lake_fastparse.py checks them array for array
on generated records). pyarrow's JSON reader and msgspec were measured against this and lost
on these dynamically keyed records (docs/LAKE.md, "Ingest speed").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import orjson

from evaluator.ingest.parse import RecordParser, pack_floats, score_of
from evaluator.lake.columns import LakeBatch
from understudy.labels import finite_number
from understudy.records import SCHEMA_VERSION
from understudy.vocabulary import MODE_CODES, ROLE_CODES, STATUS_CODES, UNKNOWN_MODE

NAN = math.nan
OK = STATUS_CODES["ok"]
ERROR = STATUS_CODES["error"]  # what the reader makes of a status it does not know
CHALLENGER = ROLE_CODES["challenger"]  # ... and of a role


class _Slow(Exception):
    """This record is not one the fast path handles: the per-record path reads it."""


def _number(value: object) -> float:
    """`finite_number` with NaN for unknown, plain finite floats first (most values are)."""
    if type(value) is float and value - value == 0.0:
        return value
    f = finite_number(value)
    return NAN if f is None else f


class FastParser:
    """Raw records -> rows of a `LakeBatch`, falling back to `parser` record by record."""

    def __init__(self, parser: RecordParser) -> None:
        self.parser = parser
        self._score_names: dict[str, str | None] = {}

    def parse_many(self, batch: LakeBatch, src: str, positions: Sequence[int],
                   raws: Sequence[bytes | None]) -> None:
        """Parse `raws` read at `src` (record i at `positions[i]`) into `batch`, in order."""
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        inference, label = self._inference, self._label
        for pos, raw in zip(positions, raws, strict=True):
            try:
                if raw is None:
                    raise _Slow
                obj = loads(raw)
                if type(obj) is not dict or obj.get("schema_version") != SCHEMA_VERSION:
                    raise _Slow
                kind = obj.get("kind")
                if kind == "inference":
                    inference(batch, obj, src, pos)
                elif kind == "label":
                    label(batch, obj, src, pos)
                else:
                    raise _Slow
            except (_Slow, decode_error):
                self.parse_one(batch, src, pos, raw)

    def parse_one(self, batch: LakeBatch, src: str, pos: int, raw: bytes | None) -> None:
        """The per-record path (the reference): rejects with the reader's reason and log line."""
        batch.at(src, pos)
        if raw is None:
            self.parser.count_bad(batch, "empty_message", f"offset {pos}", src)
        else:
            self.parser.parse(batch, raw, f"{src}@{pos}")

    def _score_name(self, route: str) -> str | None:
        try:
            return self._score_names[route]
        except KeyError:
            name = self._score_names[route] = self.parser.score_output(route)
            return name

    def _inference(self, b: LakeBatch, obj: dict[str, object], src: str, pos: int) -> None:
        """`read_inference` + `RecordParser._inference` for an unbatched request, fused."""
        get = obj.get
        rid, ts, route = get("request_id"), get("ts"), get("route")
        if (type(rid) is not str or not rid or type(ts) is not float or ts - ts != 0.0
                or type(route) is not str or not route):
            raise _Slow
        outputs = get("outputs")
        inputs = get("inputs") or {}
        if type(outputs) is not dict or type(inputs) is not dict:
            raise _Slow
        for tensor in inputs.values():  # the request's rows: the first input's leading dim
            if type(tensor) is dict:
                shape = tensor.get("shape")
                if type(shape) is list and len(shape) >= 2 and isinstance(shape[0], int) \
                        and shape[0] > 1:
                    raise _Slow  # a batched request: rows 0..n-1, the per-record path
            break

        row = len(b.request_id)
        starts = len(b.o_pos), len(b.a_pos), len(b.x_pos)
        try:
            self._children(b, row, outputs, get("arms"), inputs, self._score_name(route))
        except Exception:  # a bad outcome, or a value the reader would refuse
            _truncate(b, *starts)
            raise _Slow from None

        b.records += 1
        b.request_id.append(rid)
        b.row_ix.append(0)
        b.route.append(route)
        b.ts.append(ts)
        policy, served = get("policy"), get("served")
        b.policy.append(str(policy.get("type") or "") if type(policy) is dict else "")
        b.served.append(str(served.get("model") or "") if type(served) is dict else "")
        b.propensity.append(_number(get("propensity")))
        key, status, version = get("key"), get("status"), get("registry_version")
        b.sticky_key.append(key if type(key) is str else None)
        b.status.append(int(status) if isinstance(status, int) else 0)
        b.gateway_latency_ms.append(_number(get("gateway_latency_ms")))
        b.registry_version.append(version if type(version) is int else -1)
        b.src.append(src)
        b.pos.append(pos)
        if ts > b.watermark:
            b.watermark = ts

    def _children(self, b: LakeBatch, row: int, outputs: dict[str, object], arms: object,
                  inputs: dict[str, object], score_name: str | None) -> None:
        """Row `row`'s outcomes, arms and inputs; raises on what the reader would refuse."""
        for model, oc in outputs.items():
            if type(oc) is not dict:
                raise _Slow  # the reader's invalid_inference
            oget = oc.get
            role, mode, status = oget("role"), oget("mode"), oget("status")
            version, experiment = oget("version"), oget("experiment")
            code = STATUS_CODES.get(status, ERROR) if type(status) is str else ERROR
            score = NAN
            if code == OK:
                tensors = oget("outputs")
                if type(tensors) is dict and tensors:
                    tensor = tensors.get(score_name) if score_name \
                        else next(iter(tensors.values()))
                    data = tensor.get("data") if isinstance(tensor, dict) else None
                    if isinstance(data, list) and data:
                        score = score_of(data[0])
            b.o_pos.append(row)
            b.o_model.append(model)
            b.o_role.append(ROLE_CODES.get(role, CHALLENGER) if type(role) is str
                            else CHALLENGER)
            b.o_mode.append(MODE_CODES.get(mode, UNKNOWN_MODE) if type(mode) is str
                            else UNKNOWN_MODE)
            b.o_version.append(version if type(version) is str else str(version or ""))
            b.o_status.append(code)
            b.o_score.append(score)
            # a shared (micro-batched) call's latency is not a single request's: unknown
            b.o_latency.append(_number(oget("latency_ms")) if oget("batch_rows") is None
                               else NAN)
            b.o_experiment.append(experiment if type(experiment) is str and experiment
                                  else None)
            b.o_sample_rate.append(_number(oget("sample_rate")))
        if type(arms) is dict:
            for model, prob in arms.items():
                b.a_pos.append(row)
                b.a_model.append(model)
                b.a_prob.append(_number(prob))
        limit = self.parser.max_feature_elements
        for name, tensor in inputs.items():
            data = tensor.get("data") if type(tensor) is dict else None
            if type(data) is not list or not data or len(data) > limit:
                continue
            datatype = str(tensor.get("datatype") or "")
            b.x_pos.append(row)
            b.x_name.append(name)
            b.x_dtype.append(datatype)
            b.x_width.append(len(data))
            if datatype == "BYTES":
                b.x_num.append(None)
                b.x_cat.append(orjson.dumps(data).decode())
            else:
                b.x_num.append(pack_floats(data))
                b.x_cat.append(None)

    def _label(self, b: LakeBatch, obj: dict[str, object], src: str, pos: int) -> None:
        """`read_label` + `LakeBatch.add_label` for a label with plain values and a time."""
        get = obj.get
        rid, label, reward, index = get("request_id"), get("label"), get("reward"), \
            get("index", 0)
        if type(rid) is not str or not rid or type(index) is not int or index < 0:
            raise _Slow
        value = NAN if label is None else _number(label)
        gain = NAN if reward is None else _number(reward)
        if (value != value and label is not None) or (gain != gain and reward is not None):
            raise _Slow  # the reader's invalid_label
        received = finite_number(get("received_ts"))
        event = finite_number(get("event_time"))
        if received is None:
            if event is None:
                raise _Slow  # dated by the parser's clock
            received = event
        b.l_request_id.append(rid)
        b.l_row_ix.append(index)
        b.l_label.append(value)
        b.l_reward.append(gain)
        b.l_has_label.append(label is not None)
        b.l_event_time.append(received if event is None else event)
        b.l_received_ts.append(received)
        b.l_src.append(src)
        b.l_pos.append(pos)
        if received > b.watermark:
            b.watermark = received


def _truncate(b: LakeBatch, outcomes: int, arms: int, inputs: int) -> None:
    """Drop the child rows added after these lengths (a record the fast path gave up on)."""
    for column, start in ((b.o_pos, outcomes), (b.o_model, outcomes), (b.o_role, outcomes),
                          (b.o_mode, outcomes), (b.o_version, outcomes),
                          (b.o_status, outcomes), (b.o_score, outcomes),
                          (b.o_latency, outcomes), (b.o_experiment, outcomes),
                          (b.o_sample_rate, outcomes), (b.a_pos, arms), (b.a_model, arms),
                          (b.a_prob, arms), (b.x_pos, inputs), (b.x_name, inputs),
                          (b.x_dtype, inputs), (b.x_width, inputs), (b.x_num, inputs),
                          (b.x_cat, inputs)):
        del column[start:]
