"""The inference connection pool (gateway/upstream/keepalive.py) against a scripted HTTP/1.1 server.

A real socket server whose behaviour each test controls: keep-alive reuse, an idle connection
the server dropped, `Connection: close`, chunked bodies, slow answers, malformed answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.errors import UpstreamBadGateway, UpstreamTimeout, UpstreamUnavailable
from gateway.rest.inference import UPSTREAM
from gateway.upstream.client import TritonUpstream
from gateway.upstream.keepalive import ConnectionClosed, KeepAlivePool, MalformedResponse
from tests.conftest import GatewayFactory, fraud_body
from tests.support.triton import DEMO_MODELS
from understudy_demo.traffic import FraudTraffic
from understudy_demo.triton import TritonServer

Answer = Callable[[bytes, int], Awaitable[bytes | None]]  # (request body, n) -> raw response


@dataclass
class ScriptedServer:
    answer: Answer
    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)
    in_flight: int = 0
    max_in_flight: int = 0
    close_after_answer: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    raw = await self.answer(body, len(self.requests))
                finally:
                    self.in_flight -= 1
                if raw is None:  # hang up without answering
                    return
                writer.write(raw)
                await writer.drain()
                if self.close_after_answer:
                    return
        finally:
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def echo(body: bytes, _: int) -> bytes:
    return ok(b'{"echo":' + body + b"}")


ServerFactory = Callable[[Answer], Awaitable[ScriptedServer]]


@pytest.fixture
async def server_factory() -> AsyncIterator[ServerFactory]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> ScriptedServer:
        scripted = ScriptedServer(answer)
        server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        scripted.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return scripted

    yield start
    for server in servers:
        server.close()


async def test_sequential_calls_reuse_one_connection(server_factory: ServerFactory) -> None:
    server = await server_factory(echo)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=4)
    for i in range(20):
        response = await pool.post("/v2/models/m/infer", b"%d" % i, "application/json")
        assert response.status == 200
        assert response.body == b'{"echo":%d}' % i
        assert response.headers[b"content-type"] == b"application/json"
    assert server.connections == 1
    head, _ = server.requests[0]
    assert head.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")
    assert b"Accept-Encoding" not in head  # never ask Triton to compress pass-through bodies
    pool.close()


async def test_concurrency_is_capped_by_the_limit(server_factory: ServerFactory) -> None:
    release, three_arrived = asyncio.Event(), asyncio.Event()

    async def slow(body: bytes, n: int) -> bytes:
        if n == 3:
            three_arrived.set()
        await release.wait()
        return ok(body)

    server = await server_factory(slow)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=3)
    calls = [asyncio.ensure_future(pool.post("/p", b"%d" % i, "application/json"))
             for i in range(10)]
    await three_arrived.wait()
    await asyncio.sleep(0.05)  # give a fourth call the chance to (wrongly) get through
    assert server.in_flight == 3
    release.set()
    bodies = sorted(int(r.body) for r in await asyncio.gather(*calls))
    assert bodies == list(range(10))
    assert server.max_in_flight == 3
    assert server.connections == 3
    pool.close()


async def test_idle_connection_dropped_by_the_server_is_retried(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(echo)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=2)
    assert (await pool.post("/p", b"1", "application/json")).status == 200
    for writer in server.writers:  # the server times the idle keep-alive connection out
        writer.close()
    await asyncio.sleep(0.05)
    response = await pool.post("/p", b"2", "application/json")
    assert response.body == b'{"echo":2}'
    assert server.connections == 2
    pool.close()


async def test_keep_alive_race_is_retried_once_on_a_fresh_connection(
    server_factory: ServerFactory,
) -> None:
    """The server closes a kept-alive connection just as a request arrives on it (before the
    client could notice): the request is sent again, once, on a new connection."""

    async def drop_second(body: bytes, n: int) -> bytes | None:
        return None if n == 2 else ok(body)

    server = await server_factory(drop_second)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    assert (await pool.post("/p", b"1", "application/json")).body == b"1"
    response = await pool.post("/p", b"2", "application/json")
    assert response.body == b"2"
    assert [body for _, body in server.requests] == [b"1", b"2", b"2"]
    assert server.connections == 2
    pool.close()


async def test_connection_close_and_chunked_answers(server_factory: ServerFactory) -> None:
    async def chunked(_: bytes, n: int) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Inference-Header-Content-Length: 3\r\nConnection: close\r\n\r\n"
                b"3\r\nabc\r\n4\r\n%04d\r\n0\r\n\r\n" % n)

    server = await server_factory(chunked)
    server.close_after_answer = True
    pool = KeepAlivePool("127.0.0.1", server.port, limit=2)
    first = await pool.post("/p", b"x", "application/octet-stream")
    second = await pool.post("/p", b"y", "application/octet-stream")
    assert (first.body, second.body) == (b"abc0001", b"abc0002")
    assert first.headers[b"inference-header-content-length"] == b"3"
    assert server.connections == 2  # Connection: close is honoured, never reused
    pool.close()


async def test_hang_up_mid_call_is_an_error_not_a_retry(server_factory: ServerFactory) -> None:
    async def hang_up(_: bytes, __: int) -> None:
        return None

    server = await server_factory(hang_up)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=2)
    with pytest.raises(ConnectionClosed):
        await pool.post("/p", b"x", "application/json")
    assert len(server.requests) == 1  # a fresh connection is not retried
    pool.close()


async def test_malformed_answer_is_a_bad_gateway(server_factory: ServerFactory) -> None:
    async def garbage(_: bytes, __: int) -> bytes:
        return b"NOT HTTP AT ALL\r\n\r\n"

    server = await server_factory(garbage)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    with pytest.raises(MalformedResponse, match="malformed"):
        await pool.post("/p", b"x", "application/json")
    pool.close()
    upstream = TritonUpstream(f"http://127.0.0.1:{server.port}", timeout_ms=1000,
                              max_connections=1)
    with pytest.raises(UpstreamBadGateway, match="malformed HTTP response"):  # 502, not 503
        await upstream.infer("m", "", b"{}", "application/json", None)
    await upstream.close()


async def test_body_delimited_by_connection_close_is_complete(
    server_factory: ServerFactory,
) -> None:
    async def until_eof(_: bytes, __: int) -> bytes:
        return b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"ok":1}'

    server = await server_factory(until_eof)
    server.close_after_answer = True
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    response = await pool.post("/p", b"x", "application/json")
    assert (response.status, response.body) == (200, b'{"ok":1}')
    pool.close()


async def test_interim_100_continue_is_not_the_answer(server_factory: ServerFactory) -> None:
    async def interim_first(body: bytes, _: int) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"answer-to-" + body)

    server = await server_factory(interim_first)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    for body in (b"1", b"2"):  # and the next call on the connection gets its own answer
        response = await pool.post("/p", body, "application/json")
        assert (response.status, response.body) == (200, b"answer-to-" + body)
    assert server.connections == 1
    pool.close()


async def test_an_answer_nobody_waits_for_retires_the_connection(
    server_factory: ServerFactory,
) -> None:
    """A late answer (its caller timed out) must never be read as the next call's answer."""
    server = await server_factory(echo)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    assert (await pool.post("/p", b"1", "application/json")).body == b'{"echo":1}'
    (conn,) = pool._idle
    conn.data_received(ok(b"unsolicited"))  # as if a stale answer arrived on the idle stream
    assert conn.closed
    assert (await pool.post("/p", b"2", "application/json")).body == b'{"echo":2}'
    assert server.connections == 2
    pool.close()


async def test_retry_opens_a_fresh_connection_even_with_more_idle_ones(
    server_factory: ServerFactory,
) -> None:
    """Two kept-alive connections dropped together: the retry must not take the other one."""
    release = asyncio.Event()

    async def drop_later_calls(body: bytes, n: int) -> bytes | None:
        if n <= 2:
            await release.wait()  # two calls in flight at once: two connections
            return ok(body)
        return None if n == 3 else ok(body)

    server = await server_factory(drop_later_calls)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=2)
    calls = [asyncio.ensure_future(pool.post("/p", b, "application/json")) for b in (b"a", b"b")]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(*calls)
    assert pool.idle == 2
    assert (await pool.post("/p", b"c", "application/json")).body == b"c"
    assert server.connections == 3  # the retry went to a new connection
    pool.close()


async def test_close_fails_calls_in_flight_and_keeps_no_connection(
    server_factory: ServerFactory,
) -> None:
    async def slow(body: bytes, _: int) -> bytes:
        await asyncio.sleep(0.1)
        return ok(body)

    server = await server_factory(slow)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=2)
    await pool.post("/p", b"a", "application/json")  # one idle kept-alive connection
    call = asyncio.ensure_future(pool.post("/p", b"b", "application/json"))
    await asyncio.sleep(0.02)
    pool.close()
    with pytest.raises(ConnectionClosed):
        await call  # not silently retried on a new connection
    assert pool.idle == 0
    assert server.connections == 1


async def test_a_lane_rebuilt_with_more_concurrency_gets_more_connections(
    server_factory: ServerFactory,
) -> None:
    release, six_arrived = asyncio.Event(), asyncio.Event()

    async def slow(body: bytes, n: int) -> bytes:
        if n == 6:
            six_arrived.set()
        await release.wait()
        return ok(body)

    server = await server_factory(slow)
    upstream = TritonUpstream(f"http://127.0.0.1:{server.port}", timeout_ms=5000,
                              max_connections=4)
    assert upstream.pool("shadow:r:b", limit=2).limit == 2
    pool = upstream.pool("shadow:r:b", limit=6)  # the same lane name, reconfigured
    assert pool.limit == 6
    calls = [asyncio.ensure_future(pool.post("/p", b"%d" % i, "application/json"))
             for i in range(6)]
    await six_arrived.wait()
    release.set()
    await asyncio.gather(*calls)
    assert server.max_in_flight == 6
    await upstream.close()


async def test_timed_out_call_aborts_its_connection(server_factory: ServerFactory) -> None:
    async def first_slow(body: bytes, n: int) -> bytes:
        if n == 1:
            await asyncio.sleep(0.5)
        return ok(body)

    server = await server_factory(first_slow)
    upstream = TritonUpstream(f"http://127.0.0.1:{server.port}", timeout_ms=50,
                              max_connections=4)
    with pytest.raises(UpstreamTimeout, match="did not answer within 50 ms"):
        await upstream.infer("m", "", b"1", "application/json", None)
    # The late answer to the first call must never be read as the second call's answer.
    response = await upstream.infer("m", "", b"2", "application/json", None, timeout_s=2)
    assert response.body == b"2"
    assert server.connections == 2
    await upstream.close()


async def test_refused_connection_maps_to_unavailable(unused_tcp_port: int) -> None:
    upstream = TritonUpstream(f"http://127.0.0.1:{unused_tcp_port}", timeout_ms=1000,
                              max_connections=4)
    with pytest.raises(UpstreamUnavailable, match="Triton unreachable for model 'm'"):
        await upstream.infer("m", "", b"{}", "application/json", None)
    await upstream.close()


async def test_binary_header_length_is_forwarded(server_factory: ServerFactory) -> None:
    async def with_length(body: bytes, _: int) -> bytes:
        return ok(body, b"Inference-Header-Content-Length: 2\r\n")

    server = await server_factory(with_length)
    upstream = TritonUpstream(f"http://127.0.0.1:{server.port}", timeout_ms=1000,
                              max_connections=4)
    response = await upstream.infer("m", "2", b"{}\x00\x01", "application/octet-stream", 2)
    head, body = server.requests[0]
    assert head.startswith(b"POST /v2/models/m/versions/2/infer HTTP/1.1")
    assert b"Inference-Header-Content-Length: 2\r\n" in head
    assert b"Content-Type: application/octet-stream\r\n" in head
    assert body == b"{}\x00\x01"
    assert (response.body, response.header_length) == (b"{}\x00\x01", "2")
    await upstream.close()


async def test_gateway_survives_a_triton_restart_on_its_kept_alive_connections(
    make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    """Real Triton: the pool's idle connections die with the server; after the restart the
    first request is served (stale connection retried on a fresh one), none is lost."""
    demo = DEMO_MODELS
    server = TritonServer([demo], log_file=tmp_path / "triton.log", exit_timeout=2)
    await asyncio.to_thread(server.start)
    try:
        gw = await make_gateway({"fraud": {"champion": "fraud_v3"}},
                                triton={"url": server.url})
        x, _ = FraudTraffic(seed=11).sample(6)

        async def infer(i: int) -> int:
            resp = await gw.post_json("/v2/models/fraud/infer",
                                      fraud_body([x[i].tolist()], f"k{i}"))
            await resp.read()
            return resp.status

        assert [await infer(i) for i in range(2)] == [200, 200]
        assert gw.app[UPSTREAM].pool("fraud_v3").idle >= 1  # kept alive
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        await asyncio.to_thread(server.stop)
        assert await infer(2) == 503  # Triton down: a fast, clear error
        server = TritonServer([demo], log_file=tmp_path / "triton2.log", exit_timeout=2,
                              http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
        await asyncio.to_thread(server.start)
        assert [await infer(i) for i in range(3, 6)] == [200, 200, 200]
        await gw.stop()
        statuses = {r["request_id"]: r["status"] for r in gw.records()}
        assert statuses == {"k0": 200, "k1": 200, "k2": 503, "k3": 200, "k4": 200, "k5": 200}
    finally:
        await asyncio.to_thread(server.stop)


async def test_latency_is_the_calls_own_service_time_not_its_wait_for_a_slot(
    server_factory: ServerFactory,
) -> None:
    """RawResponse.latency_s runs from the request written to the answer read: a call that
    waited for the pool's only slot does not carry the wait (docs/METRICS.md, "Latency")."""
    hold = 1.0
    first_arrived = asyncio.Event()

    async def first_slow(body: bytes, n: int) -> bytes:
        if n == 1:
            first_arrived.set()
            await asyncio.sleep(hold)
        return ok(body)

    server = await server_factory(first_slow)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    first = asyncio.ensure_future(pool.post("/p", b"1", "application/json"))
    await first_arrived.wait()
    started = asyncio.get_running_loop().time()
    second = await pool.post("/p", b"2", "application/json")  # waits for the first's slot
    waited = asyncio.get_running_loop().time() - started
    slow = await first
    assert slow.latency_s >= hold * 0.95  # the server's own time is in it
    assert waited >= hold * 0.5  # the second call did wait for the slot...
    assert second.latency_s < waited - hold * 0.4  # ...and that wait is not in its latency
    pool.close()


async def test_callback_timeout_aborts_the_connection_never_reused(
    server_factory: ServerFactory,
) -> None:
    """`post_cb`'s timer (no Task, no Future): the caller gets TimeoutError at its deadline,
    the connection it was on is aborted (the server sees it close), and the next call opens a
    new one, so the late answer is never read as the next call's."""
    release = asyncio.Event()

    async def first_slow(body: bytes, n: int) -> bytes:
        if n == 1:
            await release.wait()
        return ok(body)

    server = await server_factory(first_slow)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=2)
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[object] = loop.create_future()
    call = pool.post_cb("/p", b"1", "application/json", b"", outcome.set_result, 0.05)
    assert isinstance(await outcome, TimeoutError)
    assert call.ended and pool.in_flight == 0 and pool.idle == 0
    reader_side = server.writers[0]
    release.set()
    await asyncio.sleep(0.05)
    assert reader_side.is_closing()  # the server saw the abort
    response = await pool.post("/p", b"2", "application/json")
    assert response.body == b"2"
    assert server.connections == 2
    pool.close()


async def test_queued_calls_start_in_order_as_slots_free(server_factory: ServerFactory) -> None:
    """The slot limit is a counter and a FIFO queue: with one slot, calls reach the server in
    the order they were made, each as the previous one completes; a queued call that times out
    is never sent and does not hold up the ones behind it."""
    gates: dict[bytes, asyncio.Event] = {}
    arrived: dict[bytes, asyncio.Event] = {}
    all_done = asyncio.Event()

    def event(events: dict[bytes, asyncio.Event], name: bytes) -> asyncio.Event:
        return events.setdefault(name, asyncio.Event())

    async def gated(body: bytes, _: int) -> bytes:
        event(arrived, body).set()
        await event(gates, body).wait()
        return ok(body)

    server = await server_factory(gated)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    results: list[tuple[bytes, object]] = []

    def collect(name: bytes) -> Callable[[object], None]:
        def done(outcome: object) -> None:
            results.append((name, outcome))
            if len(results) == 4:
                all_done.set()
        return done

    names = [b"a", b"b", b"c", b"d"]
    for name in names:
        timeout = 0.05 if name == b"c" else None  # c times out while waiting for the slot
        pool.post_cb("/p", name, "application/json", b"", collect(name), timeout)
    assert pool.in_flight == 1 and pool.queued == 3
    await asyncio.sleep(0.1)
    assert [n for n, _ in results] == [b"c"] and isinstance(results[0][1], TimeoutError)
    for name in (b"a", b"b", b"d"):
        await event(arrived, name).wait()
        assert [body for _, body in server.requests][-1] == name
        event(gates, name).set()
    await all_done.wait()
    assert [body for _, body in server.requests] == [b"a", b"b", b"d"]  # c never sent
    assert [n for n, _ in results] == [b"c", b"a", b"b", b"d"]
    assert server.max_in_flight == 1 and server.connections == 1
    pool.close()


async def test_close_fails_queued_callback_calls(server_factory: ServerFactory) -> None:
    hold = asyncio.Event()

    async def held(_: bytes, __: int) -> None:
        await hold.wait()  # until the end of the test, then hang up

    server = await server_factory(held)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=1)
    loop = asyncio.get_running_loop()
    outcomes: list[asyncio.Future[object]] = [loop.create_future() for _ in range(2)]
    for body, outcome in zip((b"1", b"2"), outcomes, strict=True):
        pool.post_cb("/p", body, "application/json", b"", outcome.set_result)
    await asyncio.sleep(0.05)
    assert (pool.in_flight, pool.queued) == (1, 1)
    pool.close()
    for outcome in outcomes:  # the call in flight and the queued one alike
        assert isinstance(await outcome, ConnectionClosed)
    hold.set()
    await asyncio.sleep(0.02)


async def test_upstream_callback_timeout_is_a_504(server_factory: ServerFactory) -> None:
    hold = asyncio.Event()

    async def slow(_: bytes, __: int) -> None:
        await hold.wait()  # past the deadline, then hang up

    server = await server_factory(slow)
    upstream = TritonUpstream(f"http://127.0.0.1:{server.port}", timeout_ms=50,
                              max_connections=4)
    outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    upstream.infer_cb("m", "", b"{}", "application/json", None, outcome.set_result)
    error = await outcome
    assert isinstance(error, UpstreamTimeout) and error.status == 504
    assert "did not answer within 50 ms" in error.message
    assert upstream.pool("m").idle == 0  # aborted, not kept
    await upstream.close()
    hold.set()
    await asyncio.sleep(0.02)


async def test_calls_sharing_the_deadline_timer_each_time_out_at_their_own_deadline(
    server_factory: ServerFactory,
) -> None:
    """Calls whose deadlines come in order share the pool's one timer; a call with a shorter
    timeout than those already watched (or than the timer still set for an answered call) is
    not held to their deadline."""
    hold = asyncio.Event()

    async def hang_unless_quick(body: bytes, _: int) -> bytes:
        if body != b"quick":
            await hold.wait()
        return ok(body)

    server = await server_factory(hang_unless_quick)
    pool = KeepAlivePool("127.0.0.1", server.port, limit=8)
    loop = asyncio.get_running_loop()
    # Answered at once: the shared timer stays set for its 30 s deadline.
    assert (await pool.post("/p", b"quick", "application/json", timeout_s=30)).status == 200
    ended: dict[bytes, float] = {}
    all_ended = asyncio.Event()

    def collect(name: bytes) -> Callable[[object], None]:
        def done(outcome: object) -> None:
            assert isinstance(outcome, TimeoutError), outcome
            ended[name] = loop.time()
            if len(ended) == 4:
                all_ended.set()
        return done

    started = loop.time()
    calls = [
        pool.post_cb("/p", b"a", "application/json", b"", collect(b"a"), 0.1),  # before the 30 s
        pool.post_cb("/p", b"b", "application/json", b"", collect(b"b"), 0.3),  # in order: shared
        pool.post_cb("/p", b"c", "application/json", b"", collect(b"c"), 0.3),
        pool.post_cb("/p", b"d", "application/json", b"", collect(b"d"), 0.05),  # shorter: own
    ]
    await asyncio.wait_for(all_ended.wait(), 10)  # not at the answered call's 30 s deadline
    assert list(ended) == [b"d", b"a", b"b", b"c"]  # each at its own deadline, in that order
    assert all(call.ended and not call.message for call in calls)  # no request body kept
    assert ended[b"a"] - started >= 0.1 - 0.002  # not early (timers round to ~1 ms)
    assert pool.in_flight == 0 and pool.idle == 0  # the timed-out calls' connections aborted
    pool.close()
    hold.set()
    await asyncio.sleep(0.02)
