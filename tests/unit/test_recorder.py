"""The recorder's scheduling: records wait for their copies, are built in time slices that yield
to the event loop, and nothing pending is lost at drain (cancelled copies included). And its
bytes: large binary inputs written as text from their bytes are the record of their lists."""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from gateway.config import parse_route
from gateway.dataplane.protocol import (
    DATATYPE_SIZES,
    LOG_TEXT_MIN_ELEMENTS,
    InferRequest,
    decode_inputs,
    log_inputs,
    parse_request,
)
from gateway.dataplane.recorder import Recorder, RequestContext, _ms
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


# -- records are the same bytes as before the lean path ---------------------------------------

# What the recorder wrote before the lean build (main at ce71a36) for tests/unit/
# test_contract_records.py's `_built()`: a served challenger, the champion scored as a copy,
# a micro-batched copy, experiments.
_GOLDEN = (
    b'{"schema_version":1,"kind":"inference","request_id":"req-1","ts":1700000000.0,'
    b'"route":"fraud","registry_version":7,"policy":{"type":"epsilon_greedy","epsilon":0.2},'
    b'"served":{"model":"explorer","version":"3"},"propensity":0.1,'
    b'"arms":{"champ":0.8,"explorer":0.2},"key":"user-9","inputs":{"features":'
    b'{"datatype":"FP32","shape":[2,3],"data":[0.1,0.2,0.3,0.4,0.5,0.6]},"country":'
    b'{"datatype":"BYTES","shape":[2,1],"data":["DE","FR"]}},"outputs":{"explorer":'
    b'{"role":"challenger","mode":"served","version":"3","status":"ok","latency_ms":4.0,'
    b'"outputs":{"score":{"datatype":"FP32","shape":[2,1],"data":[0.75,0.25]}},"error":null,'
    b'"experiment":"explorer:1700000001.0","sample_rate":1.0},"champ":{"role":"champion",'
    b'"mode":"shadow","version":"3","status":"ok","latency_ms":2.0,"outputs":{"score":'
    b'{"datatype":"FP32","shape":[2,1],"data":[0.25,0.75]}},"error":null},"shadowy":'
    b'{"role":"challenger","mode":"shadow","version":"2","status":"ok","latency_ms":9.0,'
    b'"outputs":{"score":{"datatype":"FP32","shape":[2,1],"data":[0.5,0.6]}},"error":null,'
    b'"batch_rows":8,"experiment":"shadowy:1700000000.0","sample_rate":0.5}},"status":200,'
    b'"gateway_latency_ms":6.1,"task":"classification","protocol":"grpc"}'
)


async def test_the_record_is_byte_for_byte_what_it_was() -> None:
    from tests.unit.test_contract_records import _built

    _, line = await _built()
    assert line == _GOLDEN


_MODELS = ("champ", "shadowy", "explorer")
_VERSIONS = {"champ": "4", "shadowy": "", "explorer": "2"}


@st.composite
def _result(draw: st.DrawFn) -> ShadowResult:
    """Any outcome a lane (or the served call) gives: an answer of its own, rows split from a
    batch, an undecodable answer, or a failure."""
    kind = draw(st.sampled_from(("own", "split", "garbled", "error", "timeout", "shed",
                                 "skipped")))
    latency = draw(st.none() | st.floats(0, 5, allow_nan=False))
    scores = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-5, 5),
                           max_size=3))
    tensor = {"datatype": "FP64", "shape": [len(scores)], "data": scores}
    if kind == "own":
        body = orjson.dumps({"model_name": "m", "model_version": draw(st.sampled_from(
            ("", "7"))), "outputs": [{"name": "y", **tensor}]})
        return ShadowResult("ok", latency, UpstreamResponse(200, body, "application/json",
                                                            None, latency or 0.0))
    if kind == "split":
        return ShadowResult("ok", latency, outputs={"y": tensor},
                            batch_rows=draw(st.none() | st.integers(1, 16)),
                            model_version=draw(st.none() | st.just("9")))
    if kind == "garbled":
        return ShadowResult("ok", latency, UpstreamResponse(200, b"{not json", "text/plain",
                                                            None, 0.0))
    return ShadowResult(kind, latency if kind != "skipped" else None,
                        error=None if kind == "skipped" else f"{kind} happened")


def _expected_outcome(result: ShadowResult, role: str, mode: str, version: str,
                      experiment: tuple[str, float] | None) -> dict[str, object]:
    """The contract's outcome (understudy/records.py, ModelOutcome), key by key."""
    status, error, outputs = result.status, result.error, None
    if result.outputs is not None:
        outputs, version = result.outputs, result.model_version or version
    elif result.response is not None:
        try:  # Triton's NaN/Infinity are not JSON: what orjson refuses, the stdlib reads
            answer = json.loads(result.response.body.decode("utf-8", "replace"))
        except ValueError as exc:
            status = "error"
            error = f"undecodable response: {exc!r}"
        else:
            outputs = {t["name"]: {k: t[k] for k in ("datatype", "shape", "data")}
                       for t in answer["outputs"]}
            version = str(answer.get("model_version") or version)
    latency = None if result.latency_s is None else round(result.latency_s * 1000, 3)
    expected: dict[str, object] = {"role": role, "mode": mode, "version": version,
                                   "status": status, "latency_ms": latency,
                                   "outputs": outputs, "error": error}
    if result.outputs is not None and result.batch_rows is not None:
        expected["batch_rows"] = result.batch_rows
    if experiment is not None:
        expected["experiment"], expected["sample_rate"] = experiment
    return expected


def _spec_runtime(upstream: TritonUpstream, route: str = "fraud") -> RouteRuntime:
    """The route of the spec tests: a champion, a shadow and an explore challenger."""
    runtime = RouteTable(upstream).apply(parse_route(route, {
        "champion": "champ",
        "challengers": [{"model": "shadowy"}, {"model": "explorer", "mode": "explore"}],
        "policy": {"type": "epsilon_greedy", "epsilon": 0.1}}))
    runtime.version_of = dict(_VERSIONS)
    return runtime


def _expected_record(ctx: RequestContext, copies: dict[str, ShadowResult]) -> dict[str, object]:
    """The contract's record (understudy/records.py) for `ctx` on `_spec_runtime`, key by key."""
    runtime = ctx.runtime
    results = {ctx.served_model: ctx.served, **copies}
    outputs = {
        model: _expected_outcome(
            result, "champion" if model == "champ" else "challenger",
            "served" if model == ctx.served_model else (
                "explore" if model == "explorer" else "shadow"),
            runtime.version_of.get(model, ""), runtime.experiments.get(model))
        for model, result in results.items()}
    expected: dict[str, object] = {
        "schema_version": 1, "kind": "inference", "request_id": ctx.request_id, "ts": ctx.ts,
        "route": runtime.config.name, "registry_version": runtime.registry_version,
        "policy": {"type": "epsilon_greedy", "epsilon": 0.1},
        "served": {"model": ctx.served_model,
                   "version": outputs[ctx.served_model]["version"]},
        "propensity": ctx.decision.propensity, "arms": dict(ctx.decision.probabilities),
        "key": ctx.key,
        "inputs": {"x": {"datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.5]}},
        "outputs": outputs, "status": ctx.status,
        "gateway_latency_ms": round(ctx.gateway_latency_s * 1000, 3),
        "task": "classification"}
    if ctx.error is not None:
        expected["error"] = ctx.error
    if ctx.fallback:
        expected["fallback"] = True
    expected["protocol"] = ctx.protocol
    return expected


_SPEC_REQUEST = orjson.dumps({"inputs": [
    {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.5]}]})


def _spec_ctx(runtime: RouteRuntime, request_id: str, served_model: str, served: ShadowResult,
              error: str | None = None, fallback: bool = False) -> RequestContext:
    decision = Decision(served_model, 0.5, {"champ": 0.5, "explorer": 0.5})
    return RequestContext(runtime, request_id, 1.7e9, "k", parse_request(_SPEC_REQUEST, None),
                          decision, served_model, served, 200 if error is None else 502,
                          0.0123, error=error, fallback=fallback)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(served_model=st.sampled_from(_MODELS), served=_result(),
       copies=st.dictionaries(st.sampled_from(_MODELS), _result(), max_size=3),
       error=st.none() | st.just("bad"), fallback=st.booleans(),
       experiments=st.dictionaries(st.sampled_from(_MODELS[1:]),
                                   st.tuples(st.text(max_size=4), st.floats(0, 1)), max_size=2))
def test_records_follow_the_contract_for_any_outcomes(
        served_model: str, served: ShadowResult, copies: dict[str, ShadowResult],
        error: str | None, fallback: bool, experiments: dict[str, tuple[str, float]]) -> None:
    """The lean `build` against the contract spelled out field by field (what the recorder
    wrote before it): the served model first, then each copy in order; its role, mode,
    version, status, outputs, batch rows and experiment; the same bytes."""
    upstream = TritonUpstream("http://127.0.0.1:9", timeout_ms=1000, max_connections=4)
    runtime = _spec_runtime(upstream)
    runtime.experiments = experiments
    ctx = _spec_ctx(runtime, "rid", served_model, served, error, fallback)
    line = orjson.dumps(Recorder(ListSink()).build(ctx, copies))
    assert line == orjson.dumps(_expected_record(ctx, copies))


# -- whole records through the worker: bytes, prediction metrics, observers, exploration -------

def _reference_score(outputs: dict[str, dict[str, object]] | None) -> float | None:
    """The score the prediction metrics take, as the recorder read it before the lean path."""
    if not outputs:
        return None
    data = next(iter(outputs.values()))["data"]
    if not data:
        return None
    value = data[0]  # type: ignore[index]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


_METRICS_ROUTE = "recorded"


_METRIC_KEYS = {"understudy_prediction_score_count": "count", "understudy_prediction_score_sum":
                "sum", "understudy_predicted_class_total": "class",
                "understudy_agreement_total": "agreement"}


def _metric_values() -> dict[tuple[str, ...], float]:
    """This module's route's prediction metric samples, by (what, model)."""
    values: dict[tuple[str, ...], float] = {}
    for family in REGISTRY.collect():  # one pass: get_sample_value collects everything per call
        for sample in family.samples:
            what = _METRIC_KEYS.get(sample.name)
            if what is not None and sample.labels.get("route") == _METRICS_ROUTE:
                detail = sample.labels.get("predicted_class") or sample.labels.get("result")
                values[(what, detail or "", sample.labels["model"])] = sample.value
    return values


_REQUESTS = st.lists(st.tuples(
    st.sampled_from(_MODELS), _result(),
    st.dictionaries(st.sampled_from(_MODELS), _result(), max_size=3),
    st.none() | st.just("bad"), st.booleans(), st.booleans()), min_size=1, max_size=4)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(requests=_REQUESTS,
       experiments=st.dictionaries(st.sampled_from(_MODELS[1:]),
                                   st.tuples(st.text(max_size=4), st.floats(0, 1)), max_size=2))
def test_records_through_the_worker_log_and_count_what_the_contract_says(
        requests: list[tuple[str, ShadowResult, dict[str, ShadowResult], str | None, bool, bool]],
        experiments: dict[str, tuple[str, float]]) -> None:
    """A run of requests on one recorder and route (copies answered before or after the request
    is submitted): every logged line is the contract's record, byte for byte; observers get
    that very record; exploration hears each answered request's served score; the prediction
    metrics move by each record's scores, classes and agreements."""

    async def run() -> None:
        upstream = TritonUpstream("http://127.0.0.1:9", timeout_ms=1000, max_connections=4)
        runtime = _spec_runtime(upstream, _METRICS_ROUTE)
        runtime.experiments = experiments
        lines: list[bytes] = []
        observed: list[bytes] = []
        explored: list[tuple[str, str, str, float | None]] = []

        class Sink(ListSink):
            def emit(self, stream: str, key: str, value: bytes) -> None:
                lines.append(value)

        recorder = Recorder(Sink(), lambda *args: explored.append(args))
        recorder.observers.append(lambda record: observed.append(orjson.dumps(record)))
        before = _metric_values()
        expected_lines, expected_explored = [], []
        expected_metrics = dict(before)
        loop = asyncio.get_running_loop()
        late: list[tuple[asyncio.Future[ShadowResult], ShadowResult]] = []
        for i, (served_model, served, copies, error, fallback, answered) in enumerate(requests):
            ctx = _spec_ctx(runtime, f"r{i}", served_model, served, error, fallback)
            futures = {}
            for model, result in copies.items():
                futures[model] = future = loop.create_future()
                if answered:
                    future.set_result(result)
                else:
                    late.append((future, result))
            recorder.submit(ctx, futures)
            record = _expected_record(ctx, copies)
            expected_lines.append(orjson.dumps(record))
            outputs = record["outputs"]
            assert isinstance(outputs, dict)
            served_score = _reference_score(outputs[served_model]["outputs"])
            if ctx.status == 200:
                expected_explored.append((_METRICS_ROUTE, f"r{i}", served_model, served_score))
            for model, outcome in outputs.items():
                score = _reference_score(outcome["outputs"])
                if score is None:
                    continue
                for key, amount in (
                        (("count", "", model), 1.0), (("sum", "", model), score),
                        (("class", str(int(score >= 0.5)), model), 1.0)):
                    expected_metrics[key] = expected_metrics.get(key, 0.0) + amount
                if model != served_model and served_score is not None:
                    agree = (score >= 0.5) == (served_score >= 0.5)
                    key = ("agreement", "agree" if agree else "disagree", model)
                    expected_metrics[key] = expected_metrics.get(key, 0.0) + 1
        for future, result in late:
            future.set_result(result)
        await recorder.drain()
        await upstream.close()
        # in the order their copies answered: the answered requests' first
        assert sorted(lines) == sorted(expected_lines)
        assert observed == lines
        assert sorted(explored, key=str) == sorted(expected_explored, key=str)
        after = _metric_values()
        assert after.keys() == expected_metrics.keys()  # no child made before it has a value
        for key, value in expected_metrics.items():
            if key[0] == "sum":
                assert after[key] == pytest.approx(value, rel=1e-9, abs=1e-6), key
            else:
                assert after[key] == value, key

    asyncio.run(run())


async def test_the_next_record_has_the_registrys_new_version_experiments_and_policy() -> None:
    """The recorder keeps what a route runtime fixes in its records between records; the
    registry's changes (set on the runtime in place, or a new runtime) reach the next one,
    and records of an old runtime still in flight keep the old runtime's values."""
    upstream = TritonUpstream("http://127.0.0.1:9", timeout_ms=1000, max_connections=4)
    table = RouteTable(upstream)
    route = {"champion": "a", "challengers": [{"model": "b"}]}
    old = table.apply(parse_route("fraud", route))
    recorder = Recorder(ListSink())
    copies = {"b": ShadowResult("ok", 0.002)}

    def record(runtime: RouteRuntime) -> dict[str, object]:
        return orjson.loads(orjson.dumps(recorder.build(_ctx(runtime, "r"), copies)))

    first = record(old)
    assert first["registry_version"] == 0 and "experiment" not in first["outputs"]["b"]
    old.registry_version = 3
    old.experiments = {"b": ("b:1", 0.25)}
    old.version_of = {"a": "1", "b": "2"}
    changed = record(old)
    assert changed["registry_version"] == 3
    assert changed["outputs"]["b"]["experiment"] == "b:1"
    assert changed["outputs"]["b"]["sample_rate"] == 0.25
    assert changed["served"] == {"model": "a", "version": "1"}
    assert changed["outputs"]["b"]["version"] == "2"
    new = table.apply(parse_route("fraud", {**route, "policy": {
        "type": "epsilon_greedy", "epsilon": 0.3}, "challengers": [
        {"model": "b", "mode": "explore"}]}))
    assert record(new)["policy"] == {"type": "epsilon_greedy", "epsilon": 0.3}
    assert record(new)["outputs"]["b"]["mode"] == "explore"
    in_flight = record(old)  # a request that started before the change
    assert in_flight["policy"] == {"type": "champion"}
    assert in_flight["outputs"]["b"]["mode"] == "shadow"
    assert in_flight["registry_version"] == 3
    await upstream.close()


async def test_a_record_waits_for_all_of_its_running_copies() -> None:
    runtime, upstream = _runtime()
    sink = ListSink()
    recorder = Recorder(sink)
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    recorder.submit(_ctx(runtime, "r0"), {"b": first, "c": second})
    first.set_result(ShadowResult("ok", 0.001))
    await asyncio.sleep(0)
    assert sink.records == [] and recorder.pending == 1
    second.set_result(ShadowResult("ok", 0.003))
    await recorder.drain()
    (record,) = sink.records
    assert list(record["outputs"]) == ["a", "b", "c"]
    assert record["outputs"]["c"]["latency_ms"] == 3.0
    await upstream.close()


_NEAR_TIES = st.integers(0, 2**30).flatmap(lambda k: st.sampled_from([
    (k + 0.5) / 1e6, math.nextafter((k + 0.5) / 1e6, 0), math.nextafter((k + 0.5) / 1e6, 1),
    k / 1e6, math.nextafter(k / 1e6, 0), math.nextafter(k / 1e6, 1)]))


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(seconds=st.floats(allow_nan=True, allow_infinity=True) | st.floats(-1, 3600) | _NEAR_TIES
       | st.floats(0, 0.1) | st.sampled_from([0.0, -0.0, 2**30 / 1e6, 1e-9, 5e-10, 4.9995e-4]))
def test_milliseconds_are_rounded_as_round_does(seconds: float) -> None:
    """The records' latencies: `_ms` is `round(seconds * 1000, 3)` to the bit, so the JSON
    text is the same."""
    assert orjson.dumps(_ms(seconds)) == orjson.dumps(round(seconds * 1000, 3))


def test_milliseconds_are_rounded_as_round_does_on_a_dense_sweep() -> None:
    """Every 7th microsecond up to 2 s (where latencies live), the half-way points after them
    and their neighbours, and random values across the fast path's whole range."""
    rng = np.random.default_rng(5)
    ticks = np.arange(0, 2_000_000, 7) / 1e6
    for values in (ticks, ticks + 5e-7, np.nextafter(ticks + 5e-7, 0), rng.random(200_000),
                   rng.random(200_000) * 1073.741824):
        for seconds in values.tolist():
            assert _ms(seconds) == round(seconds * 1000, 3), seconds
