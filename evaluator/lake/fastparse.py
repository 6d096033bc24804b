"""The ingest fast path: raw records straight into a `LakeBatch`'s columns, many at a time.

`RecordParser.parse` (evaluator/ingest/parse.py) reads one record through the contract's typed
reader (understudy/reader.py: a dataclass per record and per outcome) and then adds its rows
through the batch's methods — about 12 µs an inference record, most of it building objects the
lake throws away. `FastParser.parse_many` has three tiers, each handing what it cannot prove
it reads as the reader does to the next, record by record and in its place:

1. typed (`parse_many`): msgspec decodes the line into the structs below (`TypedInference`,
   `TypedLabel`: one C step that decodes and checks the types) and the fields are appended to
   the columns — the shapes the gateway writes: an unbatched request, known words, finite
   numbers, integers within their columns, no BYTES inputs; a label with a value and a time;
2. JSON (`parse_json`, the fast path before the typed tier): orjson's objects, type checks in
   Python, the same appends; it also takes unknown words, booleans and numbers in text that
   the reader reads as numbers, and labels that `label_values` accepts and that carry a time;
3. per record (`parse_one`, `RecordParser.parse`): everything else — malformed JSON, a bad or
   unusual record, a batched request, a label without times — rejected with the same reason
   and log line as before, or read the same way.

The columns, and so the Parquet files, are the per-record path's (tests/unit/
test_lake_fastparse.py checks them array for array on generated records, the typed tier on
its own too). Other decoders were measured (docs/LAKE.md, "Ingest speed"): pyarrow's JSON
reader is slower on these dynamically keyed records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec
import orjson
from msgspec import Meta, Struct

from evaluator.ingest.parse import INT32, INT64, RecordParser, pack_floats, score_of
from evaluator.lake.columns import LakeBatch
from understudy.labels import (
    MAX_ROW_INDEX,
    LabelError,
    TimeRangeError,
    finite_number,
    label_values,
    unix_seconds,
)
from understudy.records import MAX_TIME, MIN_TIME, SCHEMA_VERSION
from understudy.vocabulary import (
    MODE_CODES,
    ROLE_CODES,
    STATUS_CODES,
    UNKNOWN_MODE,
    Mode,
    OutcomeStatus,
    Role,
)

NAN = math.nan
OK = STATUS_CODES["ok"]
ERROR = STATUS_CODES["error"]  # what the reader makes of a status it does not know
CHALLENGER = ROLE_CODES["challenger"]  # ... and of a role


# -- the typed tier: the shapes a record has when the gateway wrote it ---------------------------
# msgspec decodes a line straight into these (C, no dict per object); a line that does not fit
# them exactly raises, and goes to the orjson tier below, which reads it as before. So a field
# is typed as narrowly as the tiers' equality can be proven: finite floats (msgspec refuses
# 1e999 and NaN literals; an integer is read as float(int), as `finite_number` does), integers
# within the column's range (orjson reads a larger one as a float), no booleans where the
# reader would count one as a number, strings as strings, times within the contract's range
# (`unix_seconds`: one outside is a bad record). Unknown fields are skipped, as the
# reader skips them; a duplicated key keeps its last value in both decoders.

NonEmpty = Annotated[str, Meta(min_length=1)]
Int32 = Annotated[int, Meta(ge=INT32.start, le=INT32.stop - 1)]
Int64 = Annotated[int, Meta(ge=INT64.start, le=INT64.stop - 1)]
RowIndex = Annotated[int, Meta(ge=0, le=MAX_ROW_INDEX)]
Time = Annotated[float, Meta(ge=MIN_TIME, lt=MAX_TIME)]  # understudy.labels.unix_seconds
# understudy.records.DATATYPES but BYTES, whose data the lake keeps as its JSON text (tested)
NumericType = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                      "INT64", "FP16", "BF16", "FP32", "FP64"]


class TypedTensor(Struct, gc=False):
    """An input tensor with numbers only (a BYTES one goes to the tier below)."""

    datatype: NumericType | None = None
    shape: list[int] | None = None
    data: list[float] | None = None


class TypedOutput(Struct, gc=False):
    """An output tensor: only its data is read (the score is its first element)."""

    data: list[float] | None = None


class TypedOutcome(Struct, gc=False):
    """One entry of `outputs` (understudy.reader.read_outcome's fields the lake keeps)."""

    role: Role | None = None  # an unknown word: the tier below (which reads it as its code)
    mode: Mode | None = None
    version: str | None = None
    status: OutcomeStatus | None = None
    latency_ms: float | None = None
    outputs: dict[str, TypedOutput] | None = None
    batch_rows: Any = None  # set (any value): a shared call, latency not comparable
    experiment: str | None = None
    sample_rate: float | None = None


class TypedPolicy(Struct, gc=False):
    type: str | None = None


class TypedServed(Struct, gc=False):
    model: str | None = None


class TypedInference(Struct, gc=False, tag_field="kind", tag="inference"):
    """An inference record (understudy.reader.read_inference's fields the lake keeps)."""

    schema_version: Literal[1]
    request_id: NonEmpty
    ts: Time
    route: NonEmpty
    outputs: dict[str, TypedOutcome]
    inputs: dict[str, TypedTensor] | None = None
    policy: TypedPolicy | None = None
    served: TypedServed | None = None
    propensity: float | None = None
    arms: dict[str, float | None] | None = None
    key: str | None = None
    status: Int32 | None = None
    gateway_latency_ms: float | None = None
    registry_version: Int64 | None = None


class TypedLabel(Struct, gc=False, tag_field="kind", tag="label"):
    """A label record; one without a value or without a time goes to the tier below."""

    schema_version: Literal[1]
    request_id: NonEmpty
    label: float | None = None
    reward: float | None = None
    index: RowIndex = 0
    event_time: Time | None = None
    received_ts: Time | None = None


_decode_typed = msgspec.json.Decoder(TypedInference | TypedLabel).decode
# The codes of the words the structs admit, and of a missing word (as the reader codes it).


def _codes(words: Mapping[str, int], missing: int) -> dict[str | None, int]:
    codes: dict[str | None, int] = {None: missing}
    codes.update(words)
    return codes


_ROLE_CODES = _codes(ROLE_CODES, CHALLENGER)
_MODE_CODES = _codes(MODE_CODES, UNKNOWN_MODE)
_STATUS_CODES = _codes(STATUS_CODES, ERROR)


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

    def parse_many(self, b: LakeBatch, src: str, positions: Sequence[int],
                   raws: Sequence[bytes | None]) -> None:
        """Parse `raws` read at `src` (record i at `positions[i]`) into `b`, in order.

        Each line is decoded into the typed structs and its values appended to the columns
        at once (the record is still in the cache; holding a poll's records to add them
        column by column measured slower). A line that does not fit them — or a batched
        request, a label without a value or without a time — goes, in its place, to
        `parse_json`, and from there, if need be, to the per-record path. The values are
        `parse_json`'s for the same record: unknown words as its codes, missing values as NaN,
        -1, 0, "" or None as it reads them. Nothing can fail once a record's appends begin: its
        values have the structs' types, so no half-added record needs undoing here.
        """
        decode, typed_errors = _decode_typed, (msgspec.DecodeError, RecursionError)
        score_names, limit = self._score_names, self.parser.max_feature_elements
        (request_id, row_ix, route_, ts_, policy_, served_, propensity_, sticky_, status_,
         latency_, version_, src_, pos_, o_pos, o_model, o_role, o_mode, o_version, o_status,
         o_score, o_latency, o_experiment, o_rate, a_pos, a_model, a_prob, x_pos, x_name,
         x_dtype, x_width, x_num, x_cat) = _row_appends(b)
        l_rid, l_row, l_label, l_reward, l_has, l_event, l_received, l_src, l_pos = (
            b.l_request_id.append, b.l_row_ix.append, b.l_label.append, b.l_reward.append,
            b.l_has_label.append, b.l_event_time.append, b.l_received_ts.append,
            b.l_src.append, b.l_pos.append)
        role_codes, mode_codes, status_codes = _ROLE_CODES, _MODE_CODES, _STATUS_CODES
        records, watermark = 0, -math.inf
        try:
            for pos, raw in zip(positions, raws, strict=True):
                rec: TypedInference | TypedLabel | None = None
                # msgspec skips an unknown field without checking its UTF-8, which the
                # reader refuses: only valid UTF-8 is decoded here (ASCII, the usual, is).
                if raw is not None and (raw.isascii() or _utf8(raw)):
                    try:
                        rec = decode(raw)
                    except typed_errors:
                        rec = None
                if type(rec) is TypedLabel:
                    label, reward = rec.label, rec.reward
                    event, received = rec.event_time, rec.received_ts
                    if received is None:
                        received = event
                    if (label is not None or reward is not None) and received is not None:
                        l_rid(rec.request_id)
                        l_row(rec.index)
                        l_label(NAN if label is None else label)
                        l_reward(NAN if reward is None else reward)
                        l_has(label is not None)
                        l_event(received if event is None else event)
                        l_received(received)
                        l_src(src)
                        l_pos(pos)
                        if received > watermark:
                            watermark = received
                        continue
                elif type(rec) is TypedInference:
                    inputs = rec.inputs
                    batched = False
                    if inputs:
                        for tensor in inputs.values():
                            shape = tensor.shape
                            batched = shape is not None and len(shape) >= 2 and shape[0] > 1
                            break
                    if not batched:
                        route = rec.route
                        try:
                            score_name = score_names[route]
                        except KeyError:
                            score_name = score_names[route] = self.parser.score_output(route)
                        row = len(b.request_id)
                        for model, oc in rec.outputs.items():
                            code = status_codes[oc.status]
                            score = NAN
                            if code == OK:
                                tensors = oc.outputs
                                if tensors:
                                    out = tensors.get(score_name) if score_name \
                                        else next(iter(tensors.values()))
                                    if out is not None:
                                        data = out.data
                                        if data:
                                            score = data[0]
                            lat, rate, experiment = oc.latency_ms, oc.sample_rate, oc.experiment
                            o_pos(row)
                            o_model(model)
                            o_role(role_codes[oc.role])
                            o_mode(mode_codes[oc.mode])
                            o_version(oc.version or "")
                            o_status(code)
                            o_score(score)
                            o_latency(NAN if lat is None or oc.batch_rows is not None else lat)
                            o_experiment(experiment or None)
                            o_rate(NAN if rate is None else rate)
                        arms = rec.arms
                        if arms:
                            for model, prob in arms.items():
                                a_pos(row)
                                a_model(model)
                                a_prob(NAN if prob is None else prob)
                        if inputs:
                            for name, tensor in inputs.items():
                                data = tensor.data
                                if not data or len(data) > limit:
                                    continue
                                x_pos(row)
                                x_name(name)
                                x_dtype(tensor.datatype or "")
                                x_width(len(data))
                                x_num(pack_floats(data))
                                x_cat(None)
                        policy, served = rec.policy, rec.served
                        prop, lat, status, version = (rec.propensity, rec.gateway_latency_ms,
                                                      rec.status, rec.registry_version)
                        ts = rec.ts
                        records += 1
                        request_id(rec.request_id)
                        row_ix(0)
                        route_(route)
                        ts_(ts)
                        policy_("" if policy is None else policy.type or "")
                        served_("" if served is None else served.model or "")
                        propensity_(NAN if prop is None else prop)
                        sticky_(rec.key)
                        status_(0 if status is None else status)
                        latency_(NAN if lat is None else lat)
                        version_(-1 if version is None else version)
                        src_(src)
                        pos_(pos)
                        if ts > watermark:
                            watermark = ts
                        continue
                self.parse_json(b, src, (pos,), (raw,))
        finally:
            b.records += records
            if watermark > b.watermark:
                b.watermark = watermark

    def parse_json(self, b: LakeBatch, src: str, positions: Sequence[int],
                   raws: Sequence[bytes | None]) -> None:
        """Parse `raws` read at `src` (record i at `positions[i]`) into `b`, in order, from
        orjson's objects: the tier below the typed one (`parse_many`).

        One loop with the columns' `append`s looked up once: this runs for every record, and
        attribute look-ups were a third of the time (read_inference + RecordParser._inference
        for an unbatched request, fused; labels in `_label`).
        """
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        score_names, label, limit = self._score_names, self._label, self.parser.max_feature_elements
        (request_id, row_ix, route_, ts_, policy_, served_, propensity_, sticky_, status_,
         latency_, version_, src_, pos_, o_pos, o_model, o_role, o_mode, o_version, o_status,
         o_score, o_latency, o_experiment, o_rate, a_pos, a_model, a_prob, x_pos, x_name,
         x_dtype, x_width, x_num, x_cat) = _row_appends(b)
        records, watermark = 0, -math.inf
        try:
            for pos, raw in zip(positions, raws, strict=True):
                try:
                    if raw is None:
                        raise _Slow
                    obj = loads(raw)
                    if type(obj) is not dict or obj.get("schema_version") != SCHEMA_VERSION:
                        raise _Slow
                    get = obj.get
                    kind = get("kind")
                    if kind == "label":
                        label(b, obj, src, pos)
                        continue
                    if kind != "inference":
                        raise _Slow
                    rid, ts, route = get("request_id"), get("ts"), get("route")
                    # a time outside the contract's range (or NaN): the reader's bad record
                    if (type(rid) is not str or not rid or type(ts) is not float
                            or not MIN_TIME <= ts < MAX_TIME or type(route) is not str
                            or not route):
                        raise _Slow
                    outputs = get("outputs")
                    inputs = get("inputs") or {}
                    if type(outputs) is not dict or type(inputs) is not dict:
                        raise _Slow
                    for tensor in inputs.values():  # rows: the first input's leading dim
                        if type(tensor) is dict:
                            shape = tensor.get("shape")
                            if (type(shape) is list and len(shape) >= 2
                                    and isinstance(shape[0], int) and shape[0] > 1):
                                raise _Slow  # a batched request: the per-record path
                        break
                    try:
                        score_name = score_names[route]
                    except KeyError:
                        score_name = score_names[route] = self.parser.score_output(route)

                    row = len(b.request_id)
                    starts = len(b.o_pos), len(b.a_pos), len(b.x_pos)
                    try:  # children first: a failure here undoes them, nothing else is added
                        for model, oc in outputs.items():
                            if type(oc) is not dict:
                                raise _Slow  # the reader's invalid_inference
                            oget = oc.get
                            status = oget("status")
                            code = STATUS_CODES.get(status, ERROR) if type(status) is str \
                                else ERROR
                            score = NAN
                            if code == OK:
                                tensors = oget("outputs")
                                if type(tensors) is dict and tensors:
                                    tensor = tensors.get(score_name) if score_name \
                                        else next(iter(tensors.values()))
                                    data = tensor.get("data") if isinstance(tensor, dict) \
                                        else None
                                    if isinstance(data, list) and data:
                                        score = data[0]
                                        if type(score) is not float or score - score != 0.0:
                                            score = score_of(score)
                            role, mode, version = oget("role"), oget("mode"), oget("version")
                            experiment = oget("experiment")
                            # a shared (micro-batched) call's latency is not one request's
                            lat = oget("latency_ms") if oget("batch_rows") is None else NAN
                            if type(lat) is not float or lat - lat != 0.0:
                                lat = _number(lat)
                            rate = oget("sample_rate")  # None on the champion's outcome
                            if rate is None:
                                rate = NAN
                            elif type(rate) is not float or rate - rate != 0.0:
                                rate = _number(rate)
                            o_pos(row)
                            o_model(model)
                            o_role(ROLE_CODES.get(role, CHALLENGER) if type(role) is str
                                   else CHALLENGER)
                            o_mode(MODE_CODES.get(mode, UNKNOWN_MODE) if type(mode) is str
                                   else UNKNOWN_MODE)
                            o_version(version if type(version) is str
                                      else str(version or ""))
                            o_status(code)
                            o_score(score)
                            o_latency(lat)
                            o_experiment(experiment if type(experiment) is str and experiment
                                         else None)
                            o_rate(rate)
                        arms = get("arms")
                        if type(arms) is dict:
                            for model, prob in arms.items():
                                a_pos(row)
                                a_model(model)
                                a_prob(prob if type(prob) is float and prob - prob == 0.0
                                       else _number(prob))
                        for name, tensor in inputs.items():
                            data = tensor.get("data") if type(tensor) is dict else None
                            if type(data) is not list or not data or len(data) > limit:
                                continue
                            datatype = str(tensor.get("datatype") or "")
                            x_pos(row)
                            x_name(name)
                            x_dtype(datatype)
                            x_width(len(data))
                            if datatype == "BYTES":
                                x_num(None)
                                x_cat(orjson.dumps(data).decode())
                            else:
                                x_num(pack_floats(data))
                                x_cat(None)
                    except Exception:  # a bad outcome, or a value the reader would refuse
                        _truncate(b, *starts)
                        raise _Slow from None

                    policy, served = get("policy"), get("served")
                    propensity, latency = get("propensity"), get("gateway_latency_ms")
                    key, status, version = get("key"), get("status"), get("registry_version")
                    records += 1
                    request_id(rid)
                    row_ix(0)
                    route_(route)
                    ts_(ts)
                    policy_(str(policy.get("type") or "") if type(policy) is dict else "")
                    served_(str(served.get("model") or "") if type(served) is dict else "")
                    propensity_(propensity if type(propensity) is float
                                and propensity - propensity == 0.0 else _number(propensity))
                    sticky_(key if type(key) is str else None)
                    status_(int(status) if isinstance(status, int) and status in INT32 else 0)
                    latency_(latency if type(latency) is float and latency - latency == 0.0
                             else _number(latency))
                    version_(version if type(version) is int and version in INT64 else -1)
                    src_(src)
                    pos_(pos)
                    if ts > watermark:
                        watermark = ts
                except (_Slow, decode_error):
                    self.parse_one(b, src, pos, raw)
        finally:
            b.records += records
            if watermark > b.watermark:
                b.watermark = watermark

    def parse_one(self, batch: LakeBatch, src: str, pos: int, raw: bytes | None) -> None:
        """The per-record path (the reference): rejects with the reader's reason and log line."""
        batch.at(src, pos)
        if raw is None:
            self.parser.count_bad(batch, "empty_message", f"offset {pos}", src)
        else:
            self.parser.parse(batch, raw, f"{src}@{pos}")

    def _label(self, b: LakeBatch, obj: dict[str, object], src: str, pos: int) -> None:
        """`read_label` + `LakeBatch.add_label` for a valid label that carries a time."""
        get = obj.get
        rid, label = get("request_id"), get("label")
        if type(rid) is not str or not rid:
            raise _Slow
        try:  # the contract's one label validator, as the reader calls it
            value, reward, index = label_values(label, get("reward"), get("index", 0))
        except LabelError:
            raise _Slow from None
        try:  # and its one time check
            received = unix_seconds("received_ts", get("received_ts"))
            event = unix_seconds("event_time", get("event_time"))
        except TimeRangeError:
            raise _Slow from None  # a bad record: the reader's reason and log line
        if received is None:
            if event is None:
                raise _Slow  # dated by the parser's clock
            received = event
        b.l_request_id.append(rid)
        b.l_row_ix.append(index)
        b.l_label.append(NAN if value is None else value)
        b.l_reward.append(NAN if reward is None else reward)
        b.l_has_label.append(value is not None)
        b.l_event_time.append(received if event is None else event)
        b.l_received_ts.append(received)
        b.l_src.append(src)
        b.l_pos.append(pos)
        if received > b.watermark:
            b.watermark = received


def _row_appends(b: LakeBatch) -> tuple[Callable[[Any], None], ...]:
    """The `append`s of `b`'s row, outcome, arm and input columns, in the order the two
    tiers unpack them: looked up once a poll (per record, look-ups were a third of the time)."""
    return (b.request_id.append, b.row_ix.append, b.route.append, b.ts.append,
            b.policy.append, b.served.append, b.propensity.append, b.sticky_key.append,
            b.status.append, b.gateway_latency_ms.append, b.registry_version.append,
            b.src.append, b.pos.append, b.o_pos.append, b.o_model.append, b.o_role.append,
            b.o_mode.append, b.o_version.append, b.o_status.append, b.o_score.append,
            b.o_latency.append, b.o_experiment.append, b.o_sample_rate.append, b.a_pos.append,
            b.a_model.append, b.a_prob.append, b.x_pos.append, b.x_name.append,
            b.x_dtype.append, b.x_width.append, b.x_num.append, b.x_cat.append)


def _utf8(raw: bytes) -> bool:
    """Whether `raw` is valid UTF-8 (what orjson and the reader require of a line)."""
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


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
