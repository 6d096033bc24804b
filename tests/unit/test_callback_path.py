"""The data plane's two styles give the same answers and records (gateway/dataplane/service.py).

`InferenceService.start` (callbacks, the lean server's common path) and `InferenceService.infer`
(awaited: gRPC, aiohttp, a route whose champion signature is not cached yet) run the same steps;
this property test holds them to it for generated requests, valid and invalid, against a real
HTTP upstream on localhost scripted to answer, fail (4xx, 5xx with and without the route's
fallback), hang up, send garbage or time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import parse_route
from gateway.dataplane.protocol import TensorSpec
from gateway.dataplane.recorder import RequestContext
from gateway.dataplane.routes import RouteTable
from gateway.dataplane.service import InferenceService, InferResult
from gateway.errors import GatewayError
from gateway.upstream.client import TritonUpstream
from tests.integration.test_fuzz_dataplane import mutated_request, valid_request

T = TypeVar("T")
MODES = ("ok", "champion500", "both500", "client400", "hangup", "garbage", "slow")
# The client's per-call timeout, and how long a "slow" answer takes. The timeout is generous so
# that an "ok" answer on a busy machine never times out in one path and not the other.
TIMEOUT_MS = 500
SLOW_S = 1.5
ANSWER = b'{"model_name":"m","outputs":[{"name":"score","datatype":"FP32","shape":[1,1],' \
         b'"data":[0.5]}]}'


@dataclass
class Upstream:
    """A scripted Triton: `mode` decides every answer (both paths see the same script)."""

    mode: str = "ok"
    port: int = 0
    paths: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    await reader.readexactly(length)
                    path = head.split(b" ", 2)[1]
                    self.paths.append(path)
                    champion = path.startswith(b"/v2/models/m/")
                    mode = self.mode
                    if mode == "hangup":
                        break
                    if mode == "slow":  # well past the client's timeout, whatever the load
                        await asyncio.sleep(SLOW_S)
                    if mode == "garbage":
                        writer.write(b"NOT HTTP\r\n\r\n")
                    elif mode == "client400":
                        writer.write(_answer(400, b'{"error":"unexpected shape"}'))
                    elif mode == "both500" or (mode == "champion500" and champion):
                        writer.write(_answer(500, b'{"error":"model crashed"}'))
                    else:
                        writer.write(_answer(200, ANSWER))
                    await writer.drain()
        finally:
            writer.close()


def _answer(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, len(body)) + body)


@dataclass
class Capture:
    """Stands in for the Recorder: what each request would be logged as."""

    records: list[tuple[Any, ...]] = field(default_factory=list)

    def submit(self, ctx: RequestContext, copies: dict[str, Any]) -> None:
        served = ctx.served
        response = served.response
        self.records.append((
            ctx.request_id, ctx.key, ctx.request.body if ctx.request else None,
            ctx.decision, ctx.served_model, served.status, served.error,
            response.body if response is not None else None, ctx.status, ctx.error,
            ctx.fallback, ctx.protocol, sorted(copies),
        ))


class Harness:
    """The service on its own event loop thread (hypothesis drives plain functions)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream = Upstream()
        self.capture = Capture()
        self.run(self._setup())

    async def _setup(self) -> None:
        server = await asyncio.start_server(self.upstream.handle, "127.0.0.1", 0)
        self.upstream.port = server.sockets[0].getsockname()[1]
        self.server = server
        triton = TritonUpstream(f"http://127.0.0.1:{self.upstream.port}", timeout_ms=TIMEOUT_MS,
                                max_connections=4)
        routes = RouteTable(triton)
        runtime = routes.apply(parse_route("r", {
            "champion": "m", "fallback": "fb",
            "challengers": [{"model": "fb", "sample_rate": 0.0}]}))
        runtime.champion_inputs = (TensorSpec("features", "FP32", (-1, 8)),)
        self.service = InferenceService(routes, triton, self.capture)  # type: ignore[arg-type]
        self.service._new_id = lambda: "generated"  # type: ignore[method-assign]
        self.triton = triton

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        async def stop() -> None:
            await self.triton.close()
            self.server.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.server.wait_closed()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def _outcome(value: InferResult | BaseException) -> tuple[Any, ...]:
    if isinstance(value, InferResult):
        return ("result", value.status, value.body, value.headers)
    assert isinstance(value, GatewayError), repr(value)
    return ("error", type(value).__name__, value.status, value.message, value.request_id,
            value.served_model)


async def _coroutine_path(service: InferenceService, body: bytes, headers: dict[str, str]
                          ) -> tuple[Any, ...]:
    try:
        return _outcome(await service.infer("r", body, headers))
    except GatewayError as exc:
        return _outcome(exc)


async def _callback_path(service: InferenceService, body: bytes, headers: dict[str, str]
                         ) -> tuple[Any, ...]:
    done: asyncio.Future[InferResult | Exception] = asyncio.get_running_loop().create_future()
    assert service.start("r", body, headers, done.set_result)  # the signature is cached
    return _outcome(await done)


BODIES = st.one_of(
    st.integers(1, 3).map(lambda rows: orjson.dumps(valid_request(rows))),
    st.integers(1, 2).map(lambda rows: orjson.dumps({**valid_request(rows), "id": ""})),
    mutated_request(),
)
HEADERS = st.fixed_dictionaries({}, optional={
    "X-Request-Id": st.sampled_from(["hdr-1", "", "bad id\x01", "x" * 300]),
    "Inference-Header-Content-Length": st.sampled_from(["10", "-1", "abc"]),
})


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=BODIES, headers=HEADERS, mode=st.sampled_from(MODES))
def test_callback_and_coroutine_paths_answer_and_record_alike(
    harness: Harness, body: bytes, headers: dict[str, str], mode: str,
) -> None:
    harness.upstream.mode = mode
    runs: list[tuple[tuple[Any, ...], list[tuple[Any, ...]], list[bytes]]] = []
    for path in (_coroutine_path, _callback_path):
        harness.capture.records.clear()
        harness.upstream.paths.clear()
        answer = harness.run(path(harness.service, body, headers))
        runs.append((answer, list(harness.capture.records), list(harness.upstream.paths)))
    (coro_answer, coro_records, coro_calls), (cb_answer, cb_records, cb_calls) = runs
    assert cb_answer == coro_answer
    assert cb_records == coro_records
    assert len(cb_records) == 1  # every request is logged, failures too
    # The same models called (the fallback included), in order; a retry on a fresh connection
    # (a stale kept-alive one) depends on the pool's state, not on the path.
    assert list(dict.fromkeys(cb_calls)) == list(dict.fromkeys(coro_calls))


def test_script_covers_every_outcome(harness: Harness) -> None:
    """The property above is not vacuous: the script yields answers, fallbacks and each
    upstream failure status."""
    seen: dict[str, tuple[Any, ...]] = {}
    for mode in MODES:
        harness.upstream.mode = mode
        seen[mode] = harness.run(_callback_path(harness.service, orjson.dumps(valid_request()),
                                                {}))
    assert seen["ok"][:2] == ("result", 200)
    assert seen["champion500"][3]["X-Served-Model"] == "fb"  # served by the fallback
    assert [seen[m][2] for m in ("both500", "client400", "hangup", "garbage", "slow")] == [
        502, 400, 503, 502, 504]



def test_a_served_answer_goes_out_before_its_copies_and_record(harness: Harness) -> None:
    """The client's answer is handed over first; the record (and the copies with it) follow
    in the same callback, so the answer never waits for the gateway's bookkeeping."""
    harness.upstream.mode = "ok"
    harness.capture.records.clear()
    recorded_at_answer: list[int] = []

    async def serve() -> tuple[Any, ...]:
        done: asyncio.Future[InferResult | Exception] = (
            asyncio.get_running_loop().create_future())

        def answered(result: InferResult | Exception) -> None:
            recorded_at_answer.append(len(harness.capture.records))
            done.set_result(result)

        assert harness.service.start("r", orjson.dumps(valid_request()), {}, answered)
        return _outcome(await done)

    assert harness.run(serve())[:2] == ("result", 200)
    assert recorded_at_answer == [0]  # nothing recorded yet when the answer was handed over
    assert len(harness.capture.records) == 1  # and recorded right after it


def test_a_bug_recording_a_served_request_is_logged_and_the_answer_stands(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness.upstream.mode = "ok"

    def broken(ctx: RequestContext, copies: dict[str, Any]) -> None:
        raise RuntimeError("recorder bug")

    monkeypatch.setattr(harness.capture, "submit", broken)
    with caplog.at_level("ERROR", logger="gateway.dataplane.service"):
        answer = harness.run(_callback_path(harness.service, orjson.dumps(valid_request()), {}))
    assert answer[:2] == ("result", 200)
    assert any("recording a served request failed" in r.getMessage()
               and r.exc_info and "recorder bug" in str(r.exc_info[1]) for r in caplog.records)
