"""The recorder's scheduling: records wait for their copies, are built in time slices that yield
to the event loop, and nothing pending is lost at drain (cancelled copies included). And its
bytes: large binary inputs written as text from their bytes are the record of their lists."""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import parse_route
from gateway.dataplane.protocol import (
    DATATYPE_SIZES,
    LOG_TEXT_MIN_ELEMENTS,
    InferRequest,
    decode_inputs,
    log_inputs,
    parse_request,
)
from gateway.dataplane.recorder import Recorder, RequestContext
from gateway.dataplane.routes import RouteRuntime, RouteTable
from gateway.explore.policies import Decision
from gateway.mirror.shadow import ShadowResult
from gateway.upstream.client import TritonUpstream, UpstreamResponse
from understudy.reader import Inference, read_record
from understudy.record_schema import record_problems


class ListSink:
    def __init__(self, events: list[str] | None = None) -> None:
        self.records: list[dict] = []
        self.events = events if events is not None else []

    async def start(self) -> None:
        return None

    def emit(self, stream: str, key: str, value: bytes) -> None:
        self.records.append(orjson.loads(value))
        self.events.append(f"record {key}")

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _runtime() -> tuple[RouteRuntime, TritonUpstream]:
    upstream = TritonUpstream("http://127.0.0.1:9", timeout_ms=1000, max_connections=4)
    route = parse_route("fraud", {"champion": "a", "challengers": [{"model": "b"}]})
    return RouteTable(upstream).apply(route), upstream


def _ctx(runtime: RouteRuntime, request_id: str) -> RequestContext:
    return RequestContext(runtime, request_id, 0.0, None, None, Decision("a", 1.0, {"a": 1.0}),
                          "a", ShadowResult("ok", 0.001), 200, 0.002)


async def test_records_wait_for_copies_then_yield_between_slices() -> None:
    runtime, upstream = _runtime()
    events: list[str] = []
    sink = ListSink(events)
    recorder = Recorder(sink, slice_s=0.0)  # a zero slice: one record, then yield
    loop = asyncio.get_running_loop()
    copies = [loop.create_future() for _ in range(5)]
    for i, copy in enumerate(copies):
        recorder.submit(_ctx(runtime, f"r{i}"), {"b": copy})
    assert recorder.pending == 5
    await asyncio.sleep(0)
    assert sink.records == []  # nothing is recorded before its copy answered

    async def probe() -> None:
        for _ in range(5):
            events.append("loop")
            await asyncio.sleep(0)

    for copy in copies:  # a challenger's batch: every copy answers at once
        copy.set_result(ShadowResult("ok", 0.004))
    await asyncio.gather(probe(), recorder.drain())
    assert [r["request_id"] for r in sink.records] == [f"r{i}" for i in range(5)]
    assert recorder.pending == 0
    # other work ran between the records instead of waiting for all five
    first, last = events.index("record r0"), events.index("record r4")
    assert "loop" in events[first:last]
    assert sink.records[0]["outputs"]["b"]["latency_ms"] == 4.0
    await upstream.close()


async def test_a_long_slice_records_a_burst_back_to_back() -> None:
    runtime, upstream = _runtime()
    events: list[str] = []
    recorder = Recorder(ListSink(events), slice_s=60.0)
    for i in range(5):
        recorder.submit(_ctx(runtime, f"r{i}"), {})  # no copies: ready at once

    async def probe() -> None:
        events.append("loop")

    await asyncio.gather(probe(), recorder.drain())
    records = [e for e in events if e.startswith("record")]
    assert len(records) == 5
    start = events.index("record r0")
    assert events[start:start + 5] == records  # contiguous: the slice was never cut
    await upstream.close()


async def test_drain_records_cancelled_copies_as_errors() -> None:
    runtime, upstream = _runtime()
    sink = ListSink()
    recorder = Recorder(sink)
    copy = asyncio.get_running_loop().create_future()
    recorder.submit(_ctx(runtime, "r0"), {"b": copy})
    drained = asyncio.ensure_future(recorder.drain())
    await asyncio.sleep(0)
    assert not drained.done()  # drain waits for the copy
    copy.cancel()
    await drained
    (record,) = sink.records
    assert record["outputs"]["b"]["status"] == "error"
    assert "cancelled" in record["outputs"]["b"]["error"]
    assert record["outputs"]["a"]["status"] == "ok"
    await upstream.close()


async def test_a_backlog_is_recorded_without_yielding_until_under_the_limit() -> None:
    """Overload: more records ready than slices can build must not pile up in memory."""
    runtime, upstream = _runtime()
    events: list[str] = []
    recorder = Recorder(ListSink(events), slice_s=0.0, backlog=3)
    for i in range(8):
        recorder.submit(_ctx(runtime, f"r{i}"), {})

    async def probe() -> None:
        for _ in range(8):
            events.append("loop")
            await asyncio.sleep(0)

    await asyncio.gather(probe(), recorder.drain())
    start = events.index("record r0")
    # r0..r4 back to back (8, 7, 6, 5, 4 ready: over the backlog of 3), then one per slice
    assert events[start:start + 5] == [f"record r{i}" for i in range(5)]
    later = events[start + 5:]
    assert later.index("record r5") < later.index("record r6") < later.index("record r7")
    assert "loop" in later[later.index("record r5"):later.index("record r7")]
    await upstream.close()


# -- the record's bytes: large binary inputs written as text straight from their bytes ---------

_FIXED = sorted(DATATYPE_SIZES)


@st.composite
def _binary_request(draw: st.DrawFn) -> InferRequest:
    """A valid binary request: tensors of any fixed-size datatype (any bit patterns: NaN,
    infinities, -0.0, subnormals, any nonzero BOOL byte) below and above the size the log
    writes as text, a BYTES tensor, and a JSON `data` tensor beside them."""
    inputs: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for i in range(draw(st.integers(1, 3))):
        datatype = draw(st.sampled_from(_FIXED))
        count = draw(st.integers(0, 8) | st.integers(LOG_TEXT_MIN_ELEMENTS - 2,
                                                     LOG_TEXT_MIN_ELEMENTS + 70))
        chunk = draw(st.binary(min_size=count * DATATYPE_SIZES[datatype],
                               max_size=count * DATATYPE_SIZES[datatype]))
        inputs.append({"name": f"t{i}", "datatype": datatype, "shape": [count],
                       "parameters": {"binary_data_size": len(chunk)}})
        chunks.append(chunk)
    words = draw(st.lists(st.binary(max_size=6), max_size=4))
    chunks.append(b"".join(struct.pack("<I", len(w)) + w for w in words))
    inputs.append({"name": "s", "datatype": "BYTES", "shape": [len(words)],
                   "parameters": {"binary_data_size": len(chunks[-1])}})
    inputs.append({"name": "j", "datatype": "FP64", "shape": [2],
                   "data": draw(st.lists(st.floats(allow_nan=False, allow_infinity=False),
                                         min_size=2, max_size=2))})
    header = orjson.dumps({"inputs": inputs})
    return parse_request(header + b"".join(chunks), str(len(header)))


@st.composite
def _answer(draw: st.DrawFn) -> UpstreamResponse:
    """Triton's answer: FP32 scores as JSON `data` or as binary output bytes."""
    count = draw(st.integers(1, 80))
    scores = draw(st.binary(min_size=4 * count, max_size=4 * count))
    output: dict[str, object] = {"name": "score", "datatype": "FP32", "shape": [count]}
    if draw(st.booleans()):
        output["parameters"] = {"binary_data_size": len(scores)}
        header = orjson.dumps({"model_name": "a", "model_version": "1", "outputs": [output]})
        return UpstreamResponse(200, header + scores, "application/octet-stream",
                                str(len(header)), 0.001)
    output["data"] = np.frombuffer(scores, "<f4").tolist()
    body = orjson.dumps({"model_name": "a", "model_version": "1", "outputs": [output]})
    return UpstreamResponse(200, body, "application/json", None, 0.001)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(request=_binary_request(), served=_answer(), copy=_answer())
def test_a_record_with_inputs_as_text_is_the_record_of_their_lists(
        request: InferRequest, served: UpstreamResponse, copy: UpstreamResponse) -> None:
    """`log_inputs` writes exactly what the inputs decoded to Python values would: the same
    bytes, so the same record for the evaluator, NaN and infinities as null included."""
    runtime = RouteTable(TritonUpstream("http://127.0.0.1:9", timeout_ms=1000,
                                        max_connections=4)).apply(
        parse_route("fraud", {"champion": "a", "challengers": [{"model": "b"}]}))
    ctx = RequestContext(runtime, "r0", 1.7e9, None, request, Decision("a", 1.0, {"a": 1.0}),
                         "a", ShadowResult("ok", 0.001, served), 200, 0.002)
    record = Recorder(ListSink()).build(ctx, {"b": ShadowResult("ok", 0.002, copy)})
    line = orjson.dumps(record)
    as_lists = orjson.dumps({**record, "inputs": decode_inputs(request)})
    assert line == as_lists
    assert orjson.loads(line) == orjson.loads(as_lists)
    read = read_record(line, time.time)  # the evaluator's reader takes it as written
    assert isinstance(read, Inference) and read.to_record() == orjson.loads(line)
    assert record_problems(orjson.loads(line)) == []


def test_non_finite_binary_floats_are_logged_as_null_without_a_warning() -> None:
    """Signalling and quiet NaNs, infinities, -0.0 and subnormals in a tensor the log writes as
    text: null where JSON has no number, the rest as the list gives them (a warning here would
    fail the suite: filterwarnings = error)."""
    specials = np.array([0x7F800001, 0x7FC00000, 0xFF800001, 0x7F800000, 0xFF800000,
                         0x80000000, 0x00000001, 0x3DCCCCCD], dtype="<u4")
    for datatype, values in (("FP32", specials.view("<f4")),
                             ("FP16", (specials >> 16).astype("<u2").view("<f2")),
                             ("FP64", np.array([0x7FF0000000000001, 0x7FF8000000000000,
                                                0xFFF0000000000001, 0x7FF0000000000000,
                                                0xFFF0000000000000, 0x8000000000000000, 1,
                                                0x3FB999999999999A], dtype="<u8").view("<f8"))):
        data = np.resize(values, LOG_TEXT_MIN_ELEMENTS).tobytes()
        header = orjson.dumps({"inputs": [{"name": "x", "datatype": datatype,
                                           "shape": [LOG_TEXT_MIN_ELEMENTS],
                                           "parameters": {"binary_data_size": len(data)}}]})
        request = parse_request(header + data, str(len(header)))
        logged = orjson.loads(orjson.dumps(log_inputs(request)))
        assert logged == orjson.loads(orjson.dumps(decode_inputs(request))), datatype
        assert logged["x"]["data"][:5] == [None] * 5, datatype
