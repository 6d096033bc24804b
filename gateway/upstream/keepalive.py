"""A lean keep-alive HTTP/1.1 connection pool for the inference calls to Triton.

Why not aiohttp's client here: per call it builds a ClientRequest, header multidicts, cookie
and tracing hooks and a response object; on this project's benchmark machine that was 260–370 µs
of CPU per call, a third of the gateway's CPU per proxied request (docs/BENCHMARKS.md). This
pool writes one pre-rendered request head plus the body with a single `transport.write` and
parses the answer with `httptools` (llhttp, the parser uvicorn uses), so HTTP framing
(Content-Length, chunked, keep-alive) is handled by a maintained parser, not by hand. It is for
inference only; metadata and health stay on aiohttp.

Per pool: at most `limit` calls in flight (the per-model isolation the gateway relies on; a
counter and a FIFO queue of waiting calls), idle connections reused LIFO, one retry on a fresh
connection when a reused one turns out to be closed before any byte of the answer arrived (the
server dropped an idle keep-alive), and a connection whose call was cancelled or timed out is
aborted, never reused.

Calls are callback-driven (`post_cb`): no Task or Future per call on the common path (an idle
connection is free), and no timer per call either: calls whose deadlines come in order share
one `loop.call_at` timer per pool, set for the earliest (a timer made and cancelled per call
was ~2.5 µs, as much as the rest of the call's bookkeeping). The connection tells its pool of
the answer directly. Only opening a connection runs as a Task (`create_connection` is a
coroutine). `post` is the same call awaited (gateway/upstream/callback.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter

import httptools

from gateway.upstream.callback import DeadlineWatch, wait_for

log = logging.getLogger(__name__)


class ConnectionClosed(ConnectionError):
    """The server closed the connection before the answer was complete (or the pool closed)."""


class MalformedResponse(Exception):
    """The server's bytes are not a valid HTTP/1.1 response (a bad gateway, not an outage)."""


@dataclass(slots=True)
class RawResponse:
    status: int
    headers: dict[bytes, bytes]  # lower-cased names
    body: bytes
    # The call's service time: request written on the connection -> answer complete, read in the
    # protocol callback. Excludes the pool's slot wait, connecting, and the caller's own wake-up.
    latency_s: float = 0.0


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        # The call being answered on this connection: its pool hears the outcome directly
        # (`KeepAlivePool._answered`), no callback object per call.
        self._call: PoolCall | None = None
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self.received = False  # any byte of the current answer
        self._sent = 0.0  # perf_counter when the current request was written

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(MalformedResponse(f"malformed HTTP response from Triton: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is None and self._headers_done and self._call is not None and not (
            b"content-length" in self._headers or b"transfer-encoding" in self._headers
        ):
            # A body delimited by the end of the connection ends here. (`_headers_done` is
            # never left set by an interim 1xx answer: that one completes at once.)
            self.on_message_complete()
            return
        self._fail(ConnectionClosed(f"connection closed by Triton ({exc or 'EOF'})"))

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue): keep waiting
            self._headers, self._body, self._headers_done = {}, [], False
            return
        if not parser.should_keep_alive():
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        # One chunk (the usual answer) is joined without a copy.
        response = RawResponse(status, self._headers, b"".join(self._body),
                               perf_counter() - self._sent)
        self._headers, self._body, self._headers_done = {}, [], False
        call, self._call = self._call, None
        if call is None:
            # Nobody asked (or the asker gave up): this stream is out of step, never reuse it,
            # or the next call would read this answer as its own.
            self.abort()
            return
        call.pool._answered(call, response)

    # -- calls --
    def send(self, call: PoolCall) -> None:
        """Write `call`'s request; its pool hears the answer or the error that ended it."""
        assert self.transport is not None
        assert self._call is None
        self.received = False
        self._call = call
        self._sent = perf_counter()
        self.transport.write(call.message)

    def abandon(self) -> None:
        """The caller gave up mid-call (timeout, cancel): drop the stream, never reuse it."""
        self._call = None
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.pool._answered(call, exc)


OnDone = Callable[[RawResponse | Exception], None]


def _ended(_: RawResponse | Exception) -> None:
    """The callback of a call that has ended: nothing to tell anyone."""


class PoolCall:
    """One call through a pool: queued for a slot, connecting, or on a connection. It ends
    exactly once: answered, failed, timed out (`TimeoutError`) or cancelled (no callback)."""

    __slots__ = ("attempt", "conn", "deadline", "ended", "holding", "message", "on_done", "pool",
                 "reused", "timer")

    def __init__(self, pool: KeepAlivePool, message: bytes, on_done: OnDone) -> None:
        self.pool = pool
        self.message = message
        self.on_done = on_done
        self.deadline = 0.0  # loop time; only read for a call with a timeout
        self.timer: asyncio.TimerHandle | None = None  # its own timer, if not the pool's
        self.conn: _Connection | None = None
        self.attempt = 0
        self.reused = False
        self.holding = False  # holds one of the pool's `limit` slots
        self.ended = False

    def cancel(self) -> None:
        """Abandon the call: its connection (if any) is aborted, `on_done` is never called."""
        self.pool._end(self, None)

    def expire(self) -> None:
        self.pool._end(self, TimeoutError())


class KeepAlivePool:
    """Keep-alive connections to one host, at most `limit` calls in flight at once."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self._active = 0  # calls holding a slot
        self._waiting: deque[PoolCall] = deque()  # calls waiting for a slot, in arrival order
        self._idle: list[_Connection] = []
        # Every connection the pool holds (idle or in a call), for `close`. Kept up to date
        # where a connection is dropped (rare), so a call adds and removes nothing.
        self._conns: set[_Connection] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._heads: dict[tuple[str, str], bytes] = {}
        self._host_header = f"{host}:{port}"
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of its connections
        # Calls with a timeout: those whose deadlines come in order share one timer.
        self._deadlines: DeadlineWatch[PoolCall] = DeadlineWatch(PoolCall.expire)

    def raise_limit(self, limit: int) -> None:
        """Allow more calls in flight (a reconfigured lane); a lower limit is the caller's own
        semaphore's job, so the pool never shrinks under calls in flight."""
        self.limit = max(self.limit, limit)
        self._start_waiting()

    def _head(self, path: str, content_type: str) -> bytes:
        """The fixed part of a request head, rendered once per (path, content type)."""
        head = self._heads[(path, content_type)] = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Content-Type: {content_type}\r\n"
        ).encode("latin-1")
        return head

    async def post(
        self, path: str, body: bytes, content_type: str, extra_headers: bytes = b"",
        timeout_s: float | None = None,
    ) -> RawResponse:
        """POST and read the whole answer: `post_cb`, awaited."""
        return await wait_for(lambda on_done: self.post_cb(
            path, body, content_type, extra_headers, on_done, timeout_s))

    def post_cb(
        self, path: str, body: bytes, content_type: str, extra_headers: bytes, on_done: OnDone,
        timeout_s: float | None = None,
    ) -> PoolCall:
        """Start a POST; `on_done` gets the answer or the exception that ended the call
        (`TimeoutError` after `timeout_s`, counted from now: slot wait and connecting
        included). `extra_headers`: whole `Name: value\\r\\n` lines."""
        head = self._heads.get((path, content_type)) or self._head(path, content_type)
        message = b"".join((head, extra_headers, b"Content-Length: %d\r\n\r\n" % len(body), body))
        call = PoolCall(self, message, on_done)
        if timeout_s is not None:
            # The loop is looked up once: `get_running_loop` costs a getpid syscall per call.
            loop = self._loop or self._bind_loop()
            call.deadline = loop.time() + timeout_s
            # A pool's calls mostly share one timeout, so their deadlines come in order and
            # one timer serves them; a call due before those watched gets its own.
            if not self._deadlines.watch(loop, call):
                call.timer = loop.call_at(call.deadline, call.expire)
        if self._active < self.limit:
            self._active += 1
            call.holding = True
            self._start(call)
        else:
            self._waiting.append(call)
        return call

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _start(self, call: PoolCall) -> None:
        if self._closed:
            self._end(call, ConnectionClosed("connection pool closed"))
            return
        if call.attempt == 0:  # a retry always opens a fresh connection: idle ones may be stale
            idle = self._idle
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to be dropped
                if conn.closed:
                    self._conns.discard(conn)
                    continue
                call.reused = True
                call.conn = conn
                conn.send(call)
                return
        task = asyncio.get_running_loop().create_task(self._connect_for(call))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect_for(self, call: PoolCall) -> None:
        try:
            conn = await self._connect()
        except Exception as exc:  # refused, unresolvable, ...: the call's error
            self._end(call, exc)
            return
        if self._closed:
            conn.abort()
            self._conns.discard(conn)
            self._end(call, ConnectionClosed("connection pool closed"))
        elif call.ended:  # timed out or cancelled while connecting: a fresh connection, kept
            self._idle.append(conn)
        else:
            call.conn = conn
            if conn.closed:  # lost between connecting and this call (its loss had nobody to tell)
                self._answered(call, ConnectionClosed("connection closed by Triton (EOF)"))
            else:
                conn.send(call)

    def _answered(self, call: PoolCall, outcome: RawResponse | Exception) -> None:
        """The outcome of `call` on its connection (told by the connection)."""
        conn = call.conn
        assert conn is not None
        call.conn = None
        if isinstance(outcome, RawResponse):
            if not conn.closed and not self._closed:
                self._idle.append(conn)
            else:
                self._conns.discard(conn)
        else:
            conn.abort()
            self._conns.discard(conn)
            if (isinstance(outcome, ConnectionClosed) and call.reused and not conn.received
                    and call.attempt == 0 and not self._closed):
                call.attempt, call.reused = 1, False  # an idle connection the server dropped
                self._start(call)
                return
        self._end(call, outcome)

    def _end(self, call: PoolCall, outcome: RawResponse | Exception | None) -> None:
        """Finish `call` once: stop its timer, free its slot for the next waiting call, and
        report `outcome` (None: cancelled, nobody to tell)."""
        if call.ended:
            return
        call.ended = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        # Calls end about in deadline order: drop ended ones from the front now, so they (and
        # their messages) are freed by refcount, not held until the shared timer passes.
        watched = self._deadlines.items
        while watched and watched[0].ended:
            watched.popleft()
        conn = call.conn
        if conn is not None:  # abandoned mid-call: the stream is unusable
            call.conn = None
            self._conns.discard(conn)
            conn.abandon()
        if call.holding:
            call.holding = False
            self._active -= 1
            if self._waiting:
                self._start_waiting()
        # Dropping the callback breaks the call <-> caller cycle (a caller keeps its call to
        # cancel it): freed by reference counting, not left for the garbage collector. The
        # request is dropped too: an ended call may wait in the deadline watch for the calls
        # before it (see `DeadlineWatch`), and must not hold its body meanwhile.
        on_done, call.on_done = call.on_done, _ended
        call.message = b""
        if outcome is not None:
            try:
                on_done(outcome)
            except Exception:  # the caller's bug must not be read as a broken connection
                log.exception("pool call callback failed")

    def _start_waiting(self) -> None:
        waiting = self._waiting
        while waiting and self._active < self.limit:
            call = waiting.popleft()
            if call.ended:
                continue  # timed out or cancelled while waiting
            self._active += 1
            call.holding = True
            self._start(call)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self._conns.add(conn)
        return conn

    @property
    def idle(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    @property
    def in_flight(self) -> int:
        """Calls holding a slot (on a connection or connecting)."""
        return self._active

    @property
    def queued(self) -> int:
        return sum(1 for c in self._waiting if not c.ended)

    def close(self) -> None:
        """Close idle connections, abort calls in flight and fail waiting ones (their callers
        get `ConnectionClosed`)."""
        self._closed = True
        for conn in [*self._conns]:
            conn.abort()
        self._conns.clear()
        self._idle.clear()
        while self._waiting:
            call = self._waiting.popleft()
            self._end(call, ConnectionClosed("connection pool closed"))
