"""A lean keep-alive HTTP/1.1 connection pool for the inference calls to Triton.

Why not aiohttp's client here: per call it builds a ClientRequest, header multidicts, cookie
and tracing hooks and a response object; on this project's benchmark machine that was 260–370 µs
of CPU per call, a third of the gateway's CPU per proxied request (docs/BENCHMARKS.md). This
pool writes one pre-rendered request head plus the body with a single `transport.write` and
parses the answer with `httptools` (llhttp, the parser uvicorn uses), so HTTP framing
(Content-Length, chunked, keep-alive) is handled by a maintained parser, not by hand. It is for
inference only; metadata and health stay on aiohttp.

Per pool: at most `limit` calls in flight (the per-model isolation the gateway relies on), idle
connections reused LIFO, one retry on a fresh connection when a reused one turns out to be
closed before any byte of the answer arrived (the server dropped an idle keep-alive), and a
connection whose call was cancelled or timed out is aborted, never reused.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from time import perf_counter

import httptools


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
        self._waiter: asyncio.Future[RawResponse] | None = None
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
        if exc is None and self._headers_done and self._waiter is not None and not (
            b"content-length" in self._headers or b"transfer-encoding" in self._headers
        ):
            self._complete()  # a body delimited by the end of the connection ends here
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
        if 100 <= self._parser.get_status_code() < 200:  # interim (100 Continue): keep waiting
            self._headers, self._body, self._headers_done = {}, [], False
            return
        if not self._parser.should_keep_alive():
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._complete()

    def _complete(self) -> None:
        response = RawResponse(
            self._parser.get_status_code(),
            self._headers,
            self._body[0] if len(self._body) == 1 else b"".join(self._body),
            perf_counter() - self._sent,
        )
        self._headers, self._body, self._headers_done = {}, [], False
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            # Nobody asked (or the asker gave up): this stream is out of step, never reuse it,
            # or the next call would read this answer as its own.
            self.abort()
            return
        waiter.set_result(response)

    # -- calls --
    def send(self, message: bytes) -> asyncio.Future[RawResponse]:
        assert self.transport is not None
        assert self._waiter is None
        self.received = False
        self._waiter = asyncio.get_running_loop().create_future()
        self._sent = perf_counter()
        self.transport.write(message)
        return self._waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class KeepAlivePool:
    """Keep-alive connections to one host, at most `limit` calls in flight at once."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._heads: dict[tuple[str, str], bytes] = {}
        self._host_header = f"{host}:{port}"
        self._closed = False

    def raise_limit(self, limit: int) -> None:
        """Allow more calls in flight (a reconfigured lane); a lower limit is the caller's own
        semaphore's job, so the pool never shrinks under calls in flight."""
        for _ in range(limit - self.limit):
            self._slots.release()
        self.limit = max(self.limit, limit)

    def _head(self, path: str, content_type: str) -> bytes:
        """The fixed part of a request head, rendered once per (path, content type)."""
        key = (path, content_type)
        head = self._heads.get(key)
        if head is None:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                f"Content-Type: {content_type}\r\n"
            ).encode("latin-1")
            self._heads[key] = head
        return head

    async def post(
        self, path: str, body: bytes, content_type: str, extra_headers: bytes = b""
    ) -> RawResponse:
        """POST and read the whole answer (`extra_headers`: whole `Name: value\\r\\n` lines)."""
        message = b"".join((
            self._head(path, content_type), extra_headers,
            b"Content-Length: %d\r\n\r\n" % len(body), body,
        ))
        async with self._slots:
            for attempt in range(2):
                # The retry always opens a fresh connection: other idle ones may be stale too.
                conn = self._take_idle() if attempt == 0 else None
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                if self._closed:
                    conn.abort()
                    raise ConnectionClosed("connection pool closed")
                self._busy.add(conn)
                try:
                    response = await conn.send(message)
                except ConnectionClosed:
                    conn.abort()
                    if reused and not conn.received and attempt == 0 and not self._closed:
                        continue  # an idle connection the server had dropped: once, fresh
                    raise
                except BaseException:
                    conn.abort()  # cancelled or timed out mid-call: the stream is unusable
                    raise
                finally:
                    self._busy.discard(conn)
                if not conn.closed and not self._closed:
                    self._idle.append(conn)
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    @property
    def idle(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    def close(self) -> None:
        """Close idle connections and abort calls in flight (their callers get an error)."""
        self._closed = True
        for conn in [*self._idle, *self._busy]:
            conn.abort()
        self._idle.clear()
