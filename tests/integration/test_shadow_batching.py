"""Shadow micro-batching: combine/split without a server, the lane with a fake upstream, and the
whole path (gateway HTTP -> batched shadow copies -> real Triton -> records)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import uvloop
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evaluator.ingest import RecordParser
from evaluator.store import Batch
from gateway.config import parse_config, parse_route
from gateway.dataplane.protocol import InferRequest, decode_inputs, decode_response, parse_request
from gateway.dataplane.recorder import Recorder, RequestContext, _outcome
from gateway.dataplane.routes import RouteTable
from gateway.errors import ConfigError, UpstreamClientError
from gateway.explore.policies import Decision
from gateway.mirror.batching import IncompatibleBatch, batch_signature, combine, split_outputs
from gateway.mirror.shadow import (
    RESOLVE_SLICE,
    SLOW_LANE_ROWS,
    CallTime,
    ShadowCopy,
    ShadowLane,
    ShadowResult,
)
from gateway.rest.inference import ROUTES
from gateway.upstream.callback import TIMER_SLACK, Cancellable
from gateway.upstream.client import TritonUpstream, UpstreamResponse
from tests.conftest import GatewayFactory, fraud_body
from tests.unit.test_eval_store import CHAL, CHAMP, T0, inference

# -- helpers ------------------------------------------------------------------------------


def json_request(tensors: dict[str, tuple[str, np.ndarray]], nested: bool = False,
                 **extra: Any) -> InferRequest:
    """A parsed JSON request; `nested` sends data as nested lists (numpy's tolist)."""
    inputs = [{"name": name, "datatype": dt, "shape": list(x.shape),
               "data": x.tolist() if nested else x.ravel().tolist()}
              for name, (dt, x) in tensors.items()]
    return parse_request(orjson.dumps({"inputs": inputs, **extra}), None)


def _raw(dt: str, x: np.ndarray) -> bytes:
    if dt == "BYTES":
        return b"".join(len(s).to_bytes(4, "little") + s for s in (v.encode() for v in x.ravel()))
    return x.tobytes()


def binary_header(tensors: dict[str, tuple[str, np.ndarray]], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [
        {"name": name, "datatype": dt, "shape": list(x.shape),
         "parameters": {"binary_data_size": len(_raw(dt, x))}}
        for name, (dt, x) in tensors.items()], **extra})


def binary_request(tensors: dict[str, tuple[str, np.ndarray]], **extra: Any) -> InferRequest:
    header = binary_header(tensors, **extra)
    body = header + b"".join(_raw(dt, x) for dt, x in tensors.values())
    return parse_request(body, str(len(header)))


def decoded(combined_body: bytes, header_length: int | None) -> dict[str, Any]:
    request = parse_request(combined_body,
                            str(header_length) if header_length is not None else None)
    return decode_inputs(request)


def rows_of(rng: np.random.Generator, n: int) -> dict[str, tuple[str, np.ndarray]]:
    return {"x": ("FP32", rng.standard_normal((n, 3)).astype(np.float32)),
            "ids": ("INT64", rng.integers(-5, 5, (n, 2, 2)).astype(np.int64)),
            "tag": ("BYTES", np.array([f"t{i}-{n}" for i in range(n)], dtype=object))}


# -- batching.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "json-nested", "binary"])
def test_combine_then_split_round_trips_against_numpy(fmt: str) -> None:
    rng = np.random.default_rng(0)
    parts = [rows_of(rng, n) for n in (1, 3, 2)]
    if fmt == "binary":
        requests = [binary_request(p) for p in parts]
    else:
        requests = [json_request(p, nested=fmt == "json-nested") for p in parts]
    combined = combine(requests, max_rows=6)
    assert combined.rows == (1, 3, 2)
    assert (combined.header_length is not None) == (fmt == "binary")
    assert combined.content_type == ("application/octet-stream" if fmt == "binary"
                                     else "application/json")
    inputs = decoded(combined.body, combined.header_length)
    assert list(inputs) == ["x", "ids", "tag"]
    for name, (dt, _) in parts[0].items():
        expected = np.concatenate([p[name][1] for p in parts])
        assert inputs[name]["shape"] == list(expected.shape)
        assert inputs[name]["datatype"] == dt
        got = np.array(inputs[name]["data"], dtype=expected.dtype).reshape(expected.shape)
        np.testing.assert_array_equal(got, expected)
    # A model's answer for the 6 stacked rows, split back: each request gets its own rows.
    x = np.concatenate([p["x"][1] for p in parts])
    y = np.stack([x.sum(axis=1), x.max(axis=1)], axis=1)
    tags = np.concatenate([p["tag"][1] for p in parts])
    outputs = {"y": {"datatype": "FP32", "shape": [6, 2], "data": y.ravel().tolist()},
               "tag": {"datatype": "BYTES", "shape": [6], "data": tags.tolist()}}
    split = split_outputs(outputs, combined.rows)
    assert len(split) == 3
    for part, out in zip(parts, split, strict=True):
        n = part["x"][1].shape[0]
        own = part["x"][1]
        assert out["y"]["shape"] == [n, 2] and out["tag"]["shape"] == [n]
        np.testing.assert_array_equal(
            np.array(out["y"]["data"], np.float32).reshape(n, 2),
            np.stack([own.sum(axis=1), own.max(axis=1)], axis=1))
        assert out["tag"]["data"] == part["tag"][1].tolist()


def test_combined_request_keeps_outputs_and_parameters_and_drops_the_id() -> None:
    rng = np.random.default_rng(1)
    extra = {"outputs": [{"name": "y", "parameters": {"binary_data": True}}],
             "parameters": {"binary_data_output": True}}
    requests = [binary_request(rows_of(rng, 2), id=f"r{i}", **extra) for i in range(2)]
    combined = combine(requests)
    header = orjson.loads(combined.body[: combined.header_length])
    assert header["outputs"] == extra["outputs"]
    assert header["parameters"] == extra["parameters"]
    assert "id" not in header
    assert [t["shape"][0] for t in header["inputs"]] == [4, 4, 4]


def _variant(kind: str) -> InferRequest:
    rng = np.random.default_rng(2)
    base = rows_of(rng, 2)
    if kind == "dims":
        base["x"] = ("FP32", rng.standard_normal((2, 4)).astype(np.float32))
    elif kind == "datatype":
        base["x"] = ("FP64", base["x"][1].astype(np.float64))
    elif kind == "order":
        base = {k: base[k] for k in ("ids", "x", "tag")}
    elif kind == "binary":
        return binary_request(base)
    elif kind == "outputs":
        return json_request(base, outputs=[{"name": "y"}])
    elif kind == "parameters":
        return json_request(base, parameters={"priority": 2})
    return json_request(base)


@pytest.mark.parametrize("kind", ["dims", "datatype", "order", "binary", "outputs", "parameters"])
def test_incompatible_requests_are_refused(kind: str) -> None:
    plain = _variant("plain")
    other = _variant(kind)
    first, second = batch_signature(plain), batch_signature(other)
    assert first is not None and second is not None
    assert first[0] != second[0]
    with pytest.raises(IncompatibleBatch, match="differ"):
        combine([plain, other])


def test_requests_that_must_travel_alone_have_no_signature() -> None:
    x = np.zeros((2, 3), np.float32)
    sequence = json_request({"x": ("FP32", x)}, parameters={"sequence_id": 7})
    scalar = parse_request(orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [], "data": [1.0]}]}), None)
    disagree = json_request({"x": ("FP32", x), "z": ("FP32", np.zeros((3, 3), np.float32))})
    shared_memory = parse_request(orjson.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0.0] * 6,
         "parameters": {"shared_memory_region": "r"}}]}), None)
    # A binary request may carry some inputs as JSON data: not stacked (either way is a guess).
    header = orjson.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
        {"name": "z", "datatype": "FP32", "shape": [2, 1], "data": [0.0, 1.0]}]})
    mixed = parse_request(header + x.tobytes(), str(len(header)))
    for request in (sequence, scalar, disagree, shared_memory, mixed):
        assert batch_signature(request) is None
        with pytest.raises(IncompatibleBatch):
            combine([request, request])
    assert batch_signature(json_request({"x": ("FP32", x)})) is not None


def test_rows_over_the_limit_are_refused() -> None:
    request = json_request({"x": ("FP32", np.zeros((3, 2), np.float32))})
    assert combine([request, request], max_rows=6).rows == (3, 3)
    with pytest.raises(IncompatibleBatch, match="7 rows exceed the limit of 6"):
        combine([request, request, json_request({"x": ("FP32", np.zeros((1, 2), np.float32))})],
                max_rows=6)
    with pytest.raises(IncompatibleBatch, match="nothing"):
        combine([])


def test_split_refuses_answers_that_do_not_match_the_rows() -> None:
    good = {"y": {"datatype": "FP32", "shape": [3, 2], "data": [0.0] * 6}}
    assert [p["y"]["shape"] for p in split_outputs(good, [1, 2])] == [[1, 2], [2, 2]]
    with pytest.raises(IncompatibleBatch, match="dim 0 = 4"):
        split_outputs(good, [2, 2])
    with pytest.raises(IncompatibleBatch, match="5 elements"):
        split_outputs({"y": {"datatype": "FP32", "shape": [3, 2], "data": [0.0] * 5}}, [1, 2])
    with pytest.raises(IncompatibleBatch):
        split_outputs({"y": {"datatype": "FP32", "shape": [], "data": [0.0]}}, [1])


def test_recorder_uses_pre_split_outputs() -> None:
    outputs = {"y": {"datatype": "FP32", "shape": [1, 1], "data": [0.5]}}
    outcome = _outcome(ShadowResult("ok", 0.002, outputs=outputs, batch_rows=4,
                                    model_version="3"),
                       role="challenger", mode="shadow", version="")
    assert outcome["outputs"] == outputs and outcome["version"] == "3"
    assert outcome["status"] == "ok" and outcome["latency_ms"] == 2.0
    assert outcome["batch_rows"] == 4  # shared its call: the evaluator must know
    alone = _outcome(ShadowResult("ok", 0.002, batch_rows=1), role="challenger", mode="shadow",
                     version="")
    assert "batch_rows" not in alone


def test_evaluator_leaves_batched_latency_out_of_latency_statistics() -> None:
    """A batched copy's latency is its whole batch's: not comparable with the champion's."""
    batched = inference("r0", T0)
    batched["outputs"][CHAL]["batch_rows"] = 16
    batch = Batch()
    parser = RecordParser()
    parser.parse(batch, orjson.dumps(batched))
    parser.parse(batch, orjson.dumps(inference("r1", T0)))
    latency = {(pos, model): lat for pos, model, lat in
               zip(batch.o_pos, batch.o_model, batch.o_latency, strict=True)}
    assert np.isnan(latency[0, CHAL]) and latency[1, CHAL] == 3.0
    assert latency[0, CHAMP] == 1.0  # the served model's latency is untouched
    assert batch.o_score[batch.o_model.index(CHAL)] == pytest.approx(0.3)  # scores are kept


def test_batching_config_is_validated() -> None:
    def route(**challenger: Any) -> dict[str, Any]:
        return {"routes": {"r": {"champion": "a", "challengers": [{"model": "b", **challenger}]}}}

    ch = parse_config(route(), env={}).routes["r"].challengers[0]
    assert (ch.batch_max_rows, ch.batch_max_wait_ms) == (16, 10.0)
    ch = parse_config(route(batch_max_rows=1, batch_max_wait_ms="0.5"), env={})
    assert ch.routes["r"].challengers[0].batch_max_wait_ms == 0.5
    for bad, message in (({"batch_max_rows": 0}, "batch_max_rows: must be >= 1"),
                         ({"batch_max_wait_ms": -1}, "batch_max_wait_ms: must be >= 0"),
                         ({"batch_max_wait_ms": 5, "timeout_ms": 5}, "below timeout_ms (5)"),
                         ({"batch_max_rows": "many"}, "batch_max_rows: expected a number")):
        with pytest.raises(ConfigError, match=None) as info:
            parse_config(route(**bad), env={})
        assert message in str(info.value)


# -- ShadowLane with a fake upstream -------------------------------------------------------


class FakeUpstream(TritonUpstream):
    """Scores y = sum(x) per row; a row whose first value is -1 makes Triton answer 400.

    `gate`, when set, holds every call until it opens, ignoring the call's timeout (a hung
    server), so what the lane reports depends only on its own deadlines.
    """

    def __init__(self, max_batch_size: int = 64) -> None:
        super().__init__("http://127.0.0.1:9", timeout_ms=1000, max_connections=4)
        self.max_batch_size = max_batch_size
        self.calls: list[int] = []  # rows per call, in call order
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.latency_s = 0.001  # the service time each answer reports
        self._calls: set[asyncio.Task[UpstreamResponse]] = set()

    def pool(self, name: str, limit: int | None = None, *, model: str | None = None) -> Any:
        return None  # no sockets: infer is faked

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        return {"name": model, "max_batch_size": self.max_batch_size}

    async def infer(self, model: str, version: str, body: bytes, content_type: str,
                    header_length: int | None, *, pool: str | None = None,
                    timeout_s: float | None = None) -> UpstreamResponse:
        request = parse_request(body, None if header_length is None else str(header_length))
        tensor = decode_inputs(request)["x"]
        x = np.array(tensor["data"], np.float64).reshape(tensor["shape"])
        self.calls.append(x.shape[0])
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if (x[:, 0] == -1).any():
            raise UpstreamClientError("bad row", 400)
        answer = {"model_name": model, "model_version": "7", "outputs": [
            {"name": "y", "datatype": "FP64", "shape": [x.shape[0], 1],
             "data": x.sum(axis=1).tolist()}]}
        return UpstreamResponse(200, orjson.dumps(answer), "application/json", None,
                                self.latency_s)

    def infer_cb(self, model: str, version: str, body: bytes, content_type: str,
                 header_length: int | None,
                 on_done: Callable[[UpstreamResponse | Exception], None], *,
                 pool: str | None = None, timeout_s: float | None = None) -> Cancellable:
        """The callback form (batched copies use it), keeping the real contract: `on_done`
        gets the answer or the call's exception, once."""
        task = asyncio.get_running_loop().create_task(self.infer(
            model, version, body, content_type, header_length, pool=pool, timeout_s=timeout_s))
        self._calls.add(task)

        def done(finished: asyncio.Task[UpstreamResponse]) -> None:
            self._calls.discard(finished)
            if not finished.cancelled():
                exc = finished.exception()
                on_done(finished.result() if exc is None else exc)  # type: ignore[arg-type]

        task.add_done_callback(done)
        return task


def lane_for(upstream: FakeUpstream, route: str, **kwargs: Any) -> ShadowLane:
    options: dict[str, Any] = {"max_concurrency": 1, "max_queue": 16, "timeout_ms": 5000,
                               "batch_max_rows": 4, "batch_max_wait_ms": 0.0, **kwargs}
    return ShadowLane(upstream, route, "m", "", **options)


def row(*values: float) -> InferRequest:
    return json_request({"x": ("FP32", np.array([values], np.float32))})


def score(result: ShadowResult) -> list[float]:
    """The copy's own y values, whether split from a batch or decoded from its own answer."""
    if result.outputs is not None:
        return result.outputs["y"]["data"]
    assert result.response is not None
    return decode_response(result.response.body, result.response.header_length)[
        "outputs"]["y"]["data"]


def batch_rows_metric(route: str, stat: str = "sum") -> float:
    value = REGISTRY.get_sample_value(f"understudy_shadow_batch_rows_{stat}",
                                      {"route": route, "model": "m"})
    return value or 0.0


async def test_copies_queued_behind_a_busy_slot_coalesce() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-coalesce")
    assert await lane.load_batching_config() == 4
    upstream.gate = asyncio.Event()
    first = lane.submit(row(1, 1), "shadow")
    await upstream.started.wait()  # the first copy holds the only slot
    wide = json_request({"x": ("FP32", np.array([[5.0, 5.0, 5.0]], np.float32))})
    futures = [lane.submit(row(i, 0), "shadow") for i in range(3)]
    futures.insert(1, lane.submit(wide, "shadow"))  # incompatible: its own batch
    futures += [lane.submit(row(i, 1), "shadow") for i in range(3, 6)]
    assert lane.admitted == 8
    upstream.gate.set()
    results = await asyncio.gather(first, *futures)
    # The 1-row call in flight, then the first 4 compatible rows, then the wide row (older than
    # the rest), then the last 2.
    assert upstream.calls == [1, 4, 1, 2]
    assert [r.status for r in results] == ["ok"] * 8
    assert [score(r) for r in results] == [[2.0], [0.0], [15.0], [1.0], [2.0], [4.0], [5.0],
                                           [6.0]]
    assert [r.batch_rows for r in results] == [1, 4, 1, 4, 4, 4, 2, 2]
    assert results[2].outputs is None and results[2].response is not None  # sent alone
    assert results[1].model_version == "7" and results[1].response is None
    assert lane.admitted == 0
    assert batch_rows_metric("lane-coalesce") == 8
    assert batch_rows_metric("lane-coalesce", "count") == 4


async def test_a_slow_lane_sends_few_rows_per_call_and_sheds_the_rest() -> None:
    """Calls 250x the batching window: the lane caps rows per call (SLOW_LANE_ROWS) and its
    admission shrinks to match, so a slow challenger gets fewer copies, never a big batch
    whose answer resolves a burst of records while champion requests wait."""
    upstream = FakeUpstream()
    upstream.latency_s = 0.5
    lane = lane_for(upstream, "lane-slow", batch_max_rows=16, batch_max_wait_ms=2.0,
                    max_queue=8)
    assert await lane.load_batching_config() == 16 and lane.capacity == 24
    upstream.gate = asyncio.Event()
    first = lane.submit(row(0, 0), "shadow")
    await upstream.started.wait()  # its call holds the only slot
    upstream.gate.set()
    assert (await first).status == "ok"
    assert lane.slow and lane.batch_limit == SLOW_LANE_ROWS
    assert lane.capacity == SLOW_LANE_ROWS + 8
    upstream.gate = asyncio.Event()
    upstream.started.clear()
    copies = [lane.submit(row(i, 1), "shadow") for i in range(20)]
    upstream.gate.set()
    results = await asyncio.gather(*copies)
    statuses = [r.status for r in results]
    assert statuses.count("ok") == SLOW_LANE_ROWS + 8 and statuses.count("shed") == 8
    assert upstream.calls[1:] == [SLOW_LANE_ROWS] * 3
    assert lane.admitted == 0
    # Fast again: back to full batches and admission.
    upstream.latency_s = 0.001
    for _ in range(20):
        await lane.submit(row(1, 1), "shadow")
    assert not lane.slow and lane.batch_limit == 16 and lane.capacity == 24
    # A machine so busy that the route's served calls take 100 ms too: 0.5 s calls are 5x
    # those, not a slow challenger; 20x (2.5 s) is.
    served = CallTime()
    served.note(0.1)
    busy = lane_for(upstream, "lane-busy", batch_max_rows=16, batch_max_wait_ms=2.0,
                    served=served)
    busy.calls.note(0.5)
    assert not busy.slow
    busy.calls.seconds = 2.5
    assert busy.slow
    # "Slow" is a call time (SLOW_CALL_S), not a number of batching windows: a lane with a long
    # window still counts 0.5 s calls as slow, and 30 ms ones (under 40 ms) as not.
    long_window = lane_for(upstream, "lane-long-window", batch_max_rows=16,
                           batch_max_wait_ms=100.0)
    long_window.calls.seconds = 0.5
    assert long_window.slow
    long_window.calls.seconds = 0.030
    assert not long_window.slow


async def test_a_batch_answer_resolves_its_copies_in_slices() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-slices", batch_max_rows=16, max_queue=32)
    assert await lane.load_batching_config() == 16
    upstream.gate = asyncio.Event()
    first = lane.submit(row(0, 0), "shadow")
    await upstream.started.wait()
    copies = [lane.submit(row(i, 1), "shadow") for i in range(12)]
    upstream.gate.set()
    await first
    seen = []
    while not all(c.done() for c in copies):
        seen.append(sum(c.done() for c in copies))
        await asyncio.sleep(0)
    assert upstream.calls == [1, 12]
    # Never more than RESOLVE_SLICE copies of the answer resolved in one loop iteration.
    steps = [b - a for a, b in itertools.pairwise([*seen, 12])]
    assert max(steps) <= RESOLVE_SLICE and len([s for s in steps if s]) >= 12 // RESOLVE_SLICE
    assert [score(await c) for c in copies] == [[float(i + 1)] for i in range(12)]


async def test_model_max_batch_size_caps_rows_and_zero_disables_batching() -> None:
    capped = FakeUpstream(max_batch_size=2)
    lane = lane_for(capped, "lane-capped", batch_max_rows=16)
    assert await lane.load_batching_config() == 2
    capped.gate = asyncio.Event()
    futures = [lane.submit(row(i), "shadow") for i in range(5)]
    big = lane.submit(json_request({"x": ("FP32", np.ones((3, 1), np.float32))}), "shadow")
    await capped.started.wait()
    capped.gate.set()
    results = await asyncio.gather(*futures, big)
    # Never more than the model's 2 rows per call; the 3-row copy goes alone (Triton judges it).
    assert sorted(capped.calls) == [1, 2, 2, 3]
    assert [score(r) for r in results] == [[0.0], [1.0], [2.0], [3.0], [4.0], [1.0] * 3]

    unbatched = FakeUpstream(max_batch_size=0)
    lane = lane_for(unbatched, "lane-unbatched", max_concurrency=4)
    assert await lane.load_batching_config() == 0
    results = await asyncio.gather(*(lane.submit(row(i), "shadow") for i in range(4)))
    assert unbatched.calls == [1, 1, 1, 1]
    assert all(r.status == "ok" and r.batch_rows is None for r in results)


# -- batches formed by callbacks: one lane timer per window, no Task --------------------------


async def test_a_batch_waits_for_its_window_then_goes_as_one_call() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-window", max_concurrency=4, batch_max_rows=8,
                    batch_max_wait_ms=200.0, latency_probe_every=0)
    assert await lane.load_batching_config() == 8
    loop = asyncio.get_running_loop()
    first = lane.submit(row(1), "shadow")
    assert isinstance(first, ShadowCopy)
    due = first.enqueued + lane.batch_wait_s
    copies = [first]
    for value in (2, 3):
        await asyncio.sleep(0)  # later loop iterations, still within the window
        copies.append(lane.submit(row(value), "shadow"))
        assert lane._window is not None
    for _ in range(3):
        await asyncio.sleep(0)
    if loop.time() < due:  # (a machine stalled past the window would have sent it by now)
        assert upstream.calls == [] and len(lane._queue) == 3
    await upstream.started.wait()
    assert loop.time() >= due - TIMER_SLACK  # not before the window's end
    results = await asyncio.gather(*copies)
    assert upstream.calls == [3]
    assert [(r.status, r.batch_rows, score(r)) for r in results] == [
        ("ok", 3, [1.0]), ("ok", 3, [2.0]), ("ok", 3, [3.0])]
    assert lane._window is None and not lane._awaiting_slot  # an idle lane holds no timer


async def test_a_full_batch_goes_at_once_with_the_older_copies_before_it() -> None:
    """The copy that fills a batch sends it in `submit` (the window, a minute here, is not
    waited for); the older copy of another key, queued ahead of it, goes first, alone."""
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-full", max_concurrency=4, batch_max_wait_ms=60_000.0,
                    timeout_ms=120_000, latency_probe_every=0)
    assert await lane.load_batching_config() == 4
    wide = lane.submit(json_request({"x": ("FP32", np.array([[5.0, 5.0, 5.0]], np.float32))}),
                       "shadow")
    copies = [lane.submit(row(i), "shadow") for i in range(4)]
    assert not lane._queue and lane._window is None  # both batches left in the 4th submit
    results = await asyncio.gather(wide, *copies)
    assert upstream.calls == [1, 4]
    assert [score(r) for r in results] == [[15.0], [0.0], [1.0], [2.0], [3.0]]
    assert lane.admitted == 0 and not lane._slots.locked()


async def test_queued_copies_take_their_turn_among_tasks_waiting_for_a_slot() -> None:
    """With the only slot busy, the queued copies wait as one of the slot's waiters, in order
    with a probe's Task waiting for it too: a slot freed by a batch call's end or by that
    Task's exit goes to the next in line, and copies queued meanwhile join the batch."""
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-turns", latency_probe_every=2)
    assert await lane.load_batching_config() == 4
    upstream.gate = asyncio.Event()
    queued = [lane.submit(row(1), "shadow")]  # batched: waits for its window (this iteration)
    probe = lane.submit(row(10), "shadow")  # alone, the slot is free: called at once
    queued.append(lane.submit(row(2), "shadow"))
    waiting_probe = lane.submit(row(20), "shadow")  # alone, the slot is busy: a Task waits
    assert len(lane._calls) == 1
    await upstream.started.wait()
    await asyncio.sleep(0)
    assert lane._awaiting_slot and lane._window is None  # the window ended: waits for a slot
    queued.append(lane.submit(row(3), "shadow"))  # joins the waiting batch
    assert lane._window is None
    upstream.gate.set()
    results = await asyncio.gather(probe, waiting_probe, *queued)
    # The probe's call ends: the waiting probe's Task (first in line) goes, and when it exits
    # the batch goes with every copy queued meanwhile.
    assert upstream.calls == [1, 1, 3]
    assert [(r.status, r.batch_rows, score(r)) for r in results] == [
        ("ok", None, [10.0]), ("ok", None, [20.0]), ("ok", 3, [1.0]), ("ok", 3, [2.0]),
        ("ok", 3, [3.0])]
    assert lane.admitted == 0 and not lane._slots.locked() and not lane._awaiting_slot


async def test_a_copy_cancelled_while_queued_is_shed_and_not_sent() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-cancel", latency_probe_every=0)
    assert await lane.load_batching_config() == 4
    statuses: list[str] = []
    kept, cancelled = lane.submit(row(1), "shadow"), lane.submit(row(2), "shadow")
    assert isinstance(cancelled, ShadowCopy)
    cancelled.listener = lambda: statuses.append("resolved")
    cancelled.cancel()
    assert score(await kept) == [1.0] and kept.result().batch_rows == 1
    assert upstream.calls == [1] and statuses == ["resolved"]
    assert lane.admitted == 0 and lane._window is None
    assert REGISTRY.get_sample_value("understudy_shadow_copies_total", {
        "route": "lane-cancel", "model": "m", "outcome": "shed"}) == 1


async def test_batches_are_formed_without_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows that end on time, full batches and waits for a busy slot: the lane starts no
    Task for any of them (the fake upstream's calls are its own Tasks)."""
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-no-task", batch_max_wait_ms=1.0, latency_probe_every=0)
    assert await lane.load_batching_config() == 4
    loop = asyncio.get_running_loop()
    started: list[str] = []
    create_task = loop.create_task

    def recording(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(coro.__qualname__)
        return create_task(coro, **kwargs)

    monkeypatch.setattr(loop, "create_task", recording)
    for _ in range(3):  # windows that end unfilled
        assert score(await lane.submit(row(1), "shadow")) == [1.0]
    assert score((await asyncio.gather(*(lane.submit(row(i), "shadow")
                                         for i in range(4))))[3]) == [3.0]  # a full batch
    upstream.gate = asyncio.Event()
    copies = [lane.submit(row(i), "shadow") for i in range(6)]  # a full batch, then a wait
    upstream.gate.set()
    assert [score(r) for r in await asyncio.gather(*copies)] == [[float(i)] for i in range(6)]
    assert upstream.calls == [1, 1, 1, 4, 4, 2]
    assert started and set(started) == {"FakeUpstream.infer"}
    assert lane._window is None and not lane._awaiting_slot and not lane._calls


def test_a_window_ends_on_its_first_timer_on_uvloops_millisecond_clock() -> None:
    """uvloop's clock counts whole milliseconds: the window's end must not be judged still to
    come by a float rounding error when its timer fires (the timer would be set again and again
    until the next millisecond: a busy loop)."""
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-uvloop", batch_max_wait_ms=2.0, latency_probe_every=0)
    ends = 0
    window_end = lane._window_end

    def counted() -> None:
        nonlocal ends
        ends += 1
        window_end()

    lane._window_end = counted  # type: ignore[method-assign]

    async def windows() -> list[ShadowResult]:
        assert await lane.load_batching_config() == 4
        results = []
        for i in range(20):
            results.append(await lane.submit(row(i), "shadow"))
            await asyncio.sleep(0.0003 * (i % 4))  # windows opening at any point of a ms
        return results

    loop = uvloop.new_event_loop()
    try:
        results = loop.run_until_complete(windows())
    finally:
        loop.close()
    assert [score(r) for r in results] == [[float(i)] for i in range(20)]
    assert upstream.calls == [1] * 20
    assert ends == 20


async def test_a_copy_alone_with_a_free_slot_is_called_at_once_on_the_lane_deadline() -> None:
    """A copy that goes alone takes a free slot in `submit` (no Task of the lane's); one that
    finds the slot busy waits as a Task. Both resolve at their deadline even though the server
    hangs past the call's timeout: the first timed out in its call, the second shed."""
    upstream = FakeUpstream(max_batch_size=0)
    lane = lane_for(upstream, "lane-alone", timeout_ms=50)
    assert await lane.load_batching_config() == 0
    upstream.gate = asyncio.Event()  # a hung server that ignores the call's timeout
    first = lane.submit(row(1), "shadow")
    assert not lane._calls  # called at once: no Task
    second = lane.submit(row(2), "shadow")
    assert len(lane._calls) == 1  # the only slot is busy: it waits as a Task
    timed_out, shed = await first, await second
    assert (timed_out.status, shed.status) == ("timeout", "shed")
    assert timed_out.latency_s is not None and timed_out.latency_s >= 0.04
    assert upstream.calls == [1]  # the waiting copy was never sent
    upstream.gate.set()
    await asyncio.sleep(0.01)  # the hung call ends: its copy is already resolved, once
    assert lane.admitted == 0 and not lane._deadlines.items and not lane._slots.locked()
    results = await asyncio.gather(*(lane.submit(row(i), "shadow") for i in range(3)))
    assert [(r.status, r.batch_rows, score(r)) for r in results] == [
        ("ok", None, [0.0]), ("ok", None, [1.0]), ("ok", None, [2.0])]


async def test_copies_go_singly_until_the_model_config_is_known() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-cold", max_concurrency=4)
    results = await asyncio.gather(*(lane.submit(row(i), "shadow") for i in range(3)))
    assert upstream.calls == [1, 1, 1]
    assert [score(r) for r in results] == [[0.0], [1.0], [2.0]]
    assert lane.batch_limit == 4  # fetched in the background by the first copy


async def test_a_failed_batch_is_resent_copy_by_copy() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-fallback")
    assert await lane.load_batching_config() == 4
    upstream.gate = asyncio.Event()
    first = lane.submit(row(9), "shadow")
    await upstream.started.wait()
    futures = [lane.submit(row(v), "shadow") for v in (1, -1, 3)]
    upstream.gate.set()
    results = await asyncio.gather(first, *futures)
    assert upstream.calls == [1, 3, 1, 1, 1]  # the batch failed: one call per copy
    assert [r.status for r in results] == ["ok", "ok", "error", "ok"]
    assert results[2].error == "bad row"
    assert [score(results[i]) for i in (1, 3)] == [[1.0], [3.0]]
    assert lane.admitted == 0


async def test_deadlines_queued_copy_shed_and_called_copy_timeout() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-deadline", timeout_ms=50, max_queue=1)
    assert await lane.load_batching_config() == 4
    upstream.gate = asyncio.Event()  # never opens before the deadlines: a hung challenger
    # admitted at once: 1 call in flight x 4 rows per call + max_queue 1
    assert lane.capacity == 5
    called = lane.submit(row(1), "shadow")
    await upstream.started.wait()
    queued = [lane.submit(row(2), "shadow") for _ in range(4)]
    full = lane.submit(row(3), "shadow")  # the sixth copy: shed at once
    assert full.done() and full.result().status == "shed"
    assert [(await q).status for q in queued] == ["shed"] * 4
    result = await called
    assert result.status == "timeout" and result.latency_s is not None
    assert "50 ms" in (result.error or "")
    assert lane.admitted == 0
    upstream.gate.set()  # the hung call ends; nothing is resolved twice
    await asyncio.sleep(0.01)
    assert upstream.calls == [1]
    value = REGISTRY.get_sample_value("understudy_shadow_copies_total",
                                      {"route": "lane-deadline", "model": "m", "outcome": "shed"})
    assert value == 5


# -- the real path: gateway HTTP, real Triton ----------------------------------------------


async def _direct(session: aiohttp.ClientSession, url: str, body: bytes,
                  header_length: int | None) -> dict[str, Any]:
    """What Triton answers fraud_v4 for this request alone."""
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(header_length)}
    async with session.post(f"{url}/v2/models/fraud_v4/infer", data=body,
                            headers=headers) as resp:
        assert resp.status == 200
        return decode_response(await resp.read(), resp.headers.get(
            "Inference-Header-Content-Length"))["outputs"]


@pytest.mark.triton
async def test_gateway_batches_shadow_copies_and_logs_each_rows_own_answer(
    make_gateway: GatewayFactory, triton: Any,
) -> None:
    route = "fraud_batched"
    gw = await make_gateway({route: {
        "champion": {"model": "fraud_v3"},
        # A long wait so that batches close on rows, not on time: 4-row batches whatever the
        # machine's speed.
        "challengers": [{"model": "fraud_v4", "batch_max_rows": 4, "batch_max_wait_ms": 4000,
                         "timeout_ms": 20_000, "max_queue": 100, "latency_probe_every": 0}],
    }})
    lane = gw.app[ROUTES].get(route).lanes["fraud_v4"]
    assert await lane.load_batching_config() == 4
    rng = np.random.default_rng(7)
    sent: dict[str, tuple[bytes, int | None]] = {}

    async def post(request_id: str, rows: int, binary: bool) -> None:
        x = rng.standard_normal((rows, 8)).astype(np.float32)
        if binary:
            header = binary_header({"features": ("FP32", x)}, id=request_id)
            body, length = header + x.tobytes(), len(header)
        else:
            body, length = orjson.dumps(fraud_body(x.tolist(), request_id)), None
        sent[request_id] = (body, length)
        headers = {"Content-Type": "application/json"} if length is None else {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(length)}
        async with gw.session.post(f"{gw.url}/v2/models/{route}/infer", data=body,
                                   headers=headers) as resp:
            assert resp.status == 200, await resp.text()

    # 24 concurrent 1-row requests: every batch closes at 4 rows.
    await asyncio.gather(*(post(f"c{i}", 1, binary=False) for i in range(24)))
    # Sequential mixed row counts, JSON and binary (never stacked together): [1,3], [2,2], [3,1].
    for i, (rows, binary) in enumerate([(1, False), (3, False), (2, False), (2, False),
                                        (3, True), (1, True)]):
        await post(f"s{i}", rows, binary)
    await gw.stop()

    records = {r["request_id"]: r for r in gw.records()}
    assert set(records) == set(sent)
    async with aiohttp.ClientSession() as session:
        for request_id, (body, length) in sent.items():
            shadow = records[request_id]["outputs"]["fraud_v4"]
            assert shadow["status"] == "ok", shadow
            assert shadow["version"] == "1"
            alone = await _direct(session, triton.url, body, length)
            got = shadow["outputs"]["score"]
            assert got["shape"] == alone["score"]["shape"], request_id
            assert got["data"] == alone["score"]["data"], request_id

    # The gateway runs in this process: read its histogram from the registry /metrics serves.
    families = {f.name: f for f in text_string_to_metric_families(generate_latest().decode())}
    samples = {(s.name, s.labels.get("le")): s.value
               for s in families["understudy_shadow_batch_rows"].samples
               if s.labels.get("route") == route and s.labels.get("model") == "fraud_v4"}
    rows_total = 24 + 1 + 3 + 2 + 2 + 3 + 1
    assert samples[("understudy_shadow_batch_rows_sum", None)] == rows_total
    batches = samples[("understudy_shadow_batch_rows_count", None)]
    single_row_batches = samples[("understudy_shadow_batch_rows_bucket", "1.0")]
    assert single_row_batches < batches  # some calls carried more than one row
    assert batches < rows_total


async def test_every_nth_copy_goes_alone_as_a_latency_probe() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-probe", max_concurrency=4, latency_probe_every=3)
    assert await lane.load_batching_config() == 4
    results = await asyncio.gather(*(lane.submit(row(i), "shadow") for i in range(6)))
    assert [score(r) for r in results] == [[float(i)] for i in range(6)]
    # copies 3 and 6 were sent alone (their own answer, no shared call); the rest as one batch
    assert [r.outputs is None for r in results] == [False, False, True, False, False, True]
    assert sorted(upstream.calls) == [1, 1, 4]
    assert [_outcome(r, role="challenger", mode="shadow", version="").get("batch_rows")
            for r in results] == [4, 4, None, 4, 4, None]


# -- the lean per-copy path: one object per copy, the recorder told directly, one timer per lane


class _Records:
    """A sink keeping the records it is given."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def start(self) -> None:
        return None

    def emit(self, stream: str, key: str, value: bytes) -> None:
        self.records.append(orjson.loads(value))

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _recorded_route(upstream: FakeUpstream, route: str, **challenger: Any) -> Any:
    table = RouteTable(upstream)
    return table.apply(parse_route(route, {
        "champion": "a", "challengers": [{"model": "m", "max_concurrency": 1, **challenger}]}))


def _ctx(runtime: Any, request_id: str, request: InferRequest | None) -> RequestContext:
    return RequestContext(runtime, request_id, 0.0, None, request, Decision("a", 1.0, {"a": 1.0}),
                          "a", ShadowResult("ok", 0.001), 200, 0.002)


async def test_a_batch_answer_reaches_each_record_with_its_own_row_in_one_pass() -> None:
    """Every copy of a batch is a ShadowCopy the recorder listens to directly (no done-callback
    per copy): each record gets its own row of the batch answer and the batch's size."""
    upstream = FakeUpstream()
    runtime = _recorded_route(upstream, "lane-listen", batch_max_rows=8, batch_max_wait_ms=0.0,
                              latency_probe_every=0)
    lane = runtime.lanes["m"]
    assert await lane.load_batching_config() == 8
    sink = _Records()
    recorder = Recorder(sink)
    upstream.gate = asyncio.Event()
    first = lane.submit(row(100, 0), "shadow")  # holds the only slot: the rest queue up
    recorder.submit(_ctx(runtime, "first", None), {"m": first})
    await upstream.started.wait()
    copies = [lane.submit(row(i, 10), "shadow") for i in range(6)]
    for i, copy in enumerate(copies):
        recorder.submit(_ctx(runtime, f"r{i}", None), {"m": copy})
    assert all(isinstance(c, ShadowCopy) and c.listener is not None for c in copies)
    assert all(not c._callbacks for c in copies)  # type: ignore[attr-defined]
    assert recorder.pending == 7
    upstream.gate.set()
    await recorder.drain()
    assert upstream.calls == [1, 6]
    by_id = {r["request_id"]: r["outputs"]["m"] for r in sink.records}
    assert by_id["first"]["outputs"]["y"]["data"] == [100.0]
    for i in range(6):
        shadow = by_id[f"r{i}"]
        assert shadow["status"] == "ok" and shadow["batch_rows"] == 6
        assert shadow["outputs"]["y"] == {"datatype": "FP64", "shape": [1, 1],
                                          "data": [float(i + 10)]}
        assert shadow["version"] == "7"
    assert lane.admitted == 0 and recorder.pending == 0
    assert not lane._deadlines.items  # resolved copies are not held for the deadline timer
    assert REGISTRY.get_sample_value("understudy_shadow_copies_total", {
        "route": "lane-listen", "model": "m", "outcome": "ok"}) == 7


async def test_skipped_and_shed_copies_share_one_resolved_future_and_are_logged() -> None:
    upstream = FakeUpstream()
    runtime = _recorded_route(upstream, "lane-skip", max_queue=0, batch_max_rows=1)
    lane = runtime.lanes["m"]
    sink = _Records()
    recorder = Recorder(sink)
    skipped = [lane.skipped() for _ in range(3)]
    assert skipped[0] is skipped[1] is skipped[2] and skipped[0].done()
    upstream.gate = asyncio.Event()
    running = lane.submit(row(1), "shadow")  # the lane's one slot, no queue: the next is shed
    shed = [lane.submit(row(2), "shadow") for _ in range(2)]
    assert shed[0] is shed[1] and shed[0].result().status == "shed"
    assert "lane full" in (shed[0].result().error or "")
    for i, copy in enumerate([*skipped, *shed, running]):
        recorder.submit(_ctx(runtime, f"r{i}", row(1)), {"m": copy})
    upstream.gate.set()
    await recorder.drain()
    statuses = {r["request_id"]: r["outputs"]["m"]["status"] for r in sink.records}
    assert statuses == {"r0": "skipped", "r1": "skipped", "r2": "skipped", "r3": "shed",
                        "r4": "shed", "r5": "ok"}
    assert all(r["outputs"]["m"]["error"] is None for r in sink.records[:3])

    def count(outcome: str) -> float | None:
        return REGISTRY.get_sample_value("understudy_shadow_copies_total", {
            "route": "lane-skip", "model": "m", "outcome": outcome})

    assert (count("skipped"), count("shed"), count("sent"), count("ok")) == (3, 2, 1, 1)


async def test_one_lane_timer_times_out_each_copy_at_its_own_deadline() -> None:
    """Copies admitted at different times into a hung lane: the lane's single deadline timer
    resolves each at its own deadline, not all at the first one; the lane then serves copies
    admitted later as usual."""
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-timer", timeout_ms=150, max_concurrency=2,
                    batch_max_rows=2, latency_probe_every=0)
    assert await lane.load_batching_config() == 2
    loop = asyncio.get_running_loop()
    resolved: dict[str, float] = {}

    def watch(name: str, copy: asyncio.Future[ShadowResult]) -> asyncio.Future[ShadowResult]:
        copy.add_done_callback(lambda _: resolved.setdefault(name, loop.time()))
        return copy

    upstream.gate = asyncio.Event()
    hung = watch("hung", lane.submit(row(1), "shadow"))  # its call does not answer in time
    await upstream.started.wait()
    await asyncio.sleep(0.05)
    upstream.started.clear()
    later = watch("later", lane.submit(row(2), "shadow"))  # the second slot, 50 ms later
    await upstream.started.wait()
    assert isinstance(hung, ShadowCopy) and isinstance(later, ShadowCopy)
    assert (await hung).status == "timeout"
    assert "later" not in resolved  # its own deadline has not come yet
    assert (await later).status == "timeout"
    assert resolved["hung"] >= hung.deadline - 0.002
    assert resolved["later"] >= later.deadline - 0.002
    # Copies admitted after those deadlines wait behind the two hung calls, then are answered.
    fresh = [watch(f"fresh{i}", lane.submit(row(3), "shadow")) for i in range(2)]
    upstream.gate.set()
    assert [r.status for r in await asyncio.gather(*fresh)] == ["ok", "ok"]
    assert lane.admitted == 0 and not lane._deadlines.items


async def test_inflight_gauge_reads_the_lanes_admitted_copies() -> None:
    upstream = FakeUpstream()
    lane = lane_for(upstream, "lane-gauge", latency_probe_every=0)
    assert await lane.load_batching_config() == 4
    upstream.gate = asyncio.Event()
    copies = [lane.submit(row(i), "shadow") for i in range(3)]
    await upstream.started.wait()

    def inflight() -> float | None:
        return REGISTRY.get_sample_value("understudy_shadow_inflight",
                                         {"route": "lane-gauge", "model": "m"})

    assert inflight() == lane.admitted == 3
    upstream.gate.set()
    await asyncio.gather(*copies)
    assert inflight() == 0
