"""The client port's HTTP/1.1 server: the data plane on httptools, everything else on aiohttp.

Why: per request aiohttp's server layer builds a request object, multidict headers, a router
match, a StreamReader, a Response and its prepare/write (issue 15 measured +0.05–0.10 ms of CPU
per request, a quarter of the gateway's). Inference (`POST /v2/models/{route}[/versions/{v}]
/infer`) and the health probes (`GET /v2/health/live|ready`) are the only hot paths, so this
server answers them itself and hands every other request to aiohttp on the same connection:
users keep one port, and admin, metadata, feedback, /metrics and aiohttp's 404/405 answers
keep their exact behaviour because aiohttp still produces them.

One connection (`LeanProtocol`): httptools (llhttp, the parser aiohttp uses too) calls back per
request. At its headers each request takes a slot in the connection's answer queue; answers
are written in request order however they complete, so pipelined requests are served
concurrently and answered in order. An inference request runs without a Task: the data plane's
callback path (`InferenceService.start`) calls back with the answer, which fills its slot; only
a route whose champion signature is not cached yet takes a Task (`InferenceService.infer`).
A request for another path is re-framed (request line, the headers as received, the body as
it arrives) and fed to an aiohttp `RequestHandler` bound to a `_Bridge` transport; its answer
bytes fill that request's slot, and aiohttp's access-log hook (`AnswerDone`, called after each
answer is fully written) closes the slot.

Limits as aiohttp's: a request line or header field over 8190 bytes, or more than 128 header
fields, gets 431 (414 for the URL) and the connection closes; a body over
`listen.max_body_bytes` gets the same 413 as before, its bytes are read and dropped, and the
connection stays usable. A malformed request gets aiohttp's plain-text 400 and a close.
Shutdown (`LeanServer.drain`, called by `gateway.rest.serving.LeanSite.stop`, first in the
runner's cleanup on SIGTERM): stop accepting, close idle connections, let requests in flight
finish and their answers go out, then the runner drains shadows and flushes the log as before.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Iterator, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import SERVER_SOFTWARE

from gateway.dataplane.protocol import error_body
from gateway.dataplane.service import InferResult
from gateway.errors import GatewayError
from gateway.rest.inference import (
    CATALOG,
    MAX_BODY,
    SERVICE,
    TRITON_NOT_READY,
    body_too_large,
    error_reply,
)

log = logging.getLogger(__name__)

_INFER_PATH = re.compile(rb"/v2/models/([A-Za-z0-9_.\-]+)(?:/versions/[A-Za-z0-9_.\-]+)?/infer")
_LIVE, _READY = b"/v2/health/live", b"/v2/health/ready"
MAX_LINE = 8190  # aiohttp's max_line_size / max_field_size
MAX_HEADERS = 128  # aiohttp's max_headers
MAX_PIPELINE = 32  # answers queued on one connection before it stops reading
KEEPALIVE_TIMEOUT = 75.0  # idle keep-alive connections close after this (aiohttp's run_app)

# What a message is, decided at its headers.
_INFER, _LIVE_PROBE, _READY_PROBE, _FORWARD, _DISCARD = range(5)


class _Reject(Exception):
    """Raised from a parser callback: answer `status` with a JSON error and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Stop(Exception):
    """Raised from a parser callback: parse nothing further on this connection."""


class Headers(Mapping[str, str]):
    """Request headers by case-insensitive name (the first of repeated ones, as aiohttp's `get`).

    Why not a dict of decoded names and values: the data plane reads a handful of names, so
    decoding and lower-casing every header of every request was most of the header work. This
    keeps the raw values by lower-cased raw name (`raw`, which the server reads directly) and
    decodes a value only when it is asked for: UTF-8 with undecodable bytes as lone surrogates,
    as aiohttp does. Header names are ASCII tokens (llhttp refuses anything else).
    """

    __slots__ = ("raw",)

    def __init__(self, raw: dict[bytes, bytes]) -> None:
        self.raw = raw

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(_NAME_KEYS.get(key) or _name_key(key))
        return default if value is None else value.decode("utf-8", "surrogateescape")

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return str(value)

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self.raw)

    def __len__(self) -> int:
        return len(self.raw)


# The raw-header key of each name the data plane has looked up (a few constants and the routes'
# key headers), so a lookup costs one dict probe rather than lower() and encode().
_NAME_KEYS: dict[str, bytes] = {}


def _name_key(name: str) -> bytes:
    """`name` as a lower-cased raw header name. A character outside latin-1 cannot be in a
    header name, so it becomes "?", which matches nothing."""
    key = _NAME_KEYS[name] = name.lower().encode("latin-1", "replace")
    return key


class _Slot:
    """One request's place in its connection's answer queue."""

    __slots__ = ("chunks", "close", "done")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done = False
        self.close = False


class _InferSlot(_Slot):
    """An inference request's slot, with what its answer needs (set when its body is complete).
    It is also the completion callback `InferenceService.start` calls: only the first call
    counts (a bug raising after the answer must not answer twice)."""

    __slots__ = ("conn", "keep_alive", "url", "version")

    conn: LeanProtocol | None
    keep_alive: bool
    url: bytes
    version: str

    def __call__(self, outcome: InferResult | Exception) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        conn.server.pending -= 1
        conn.infer_answer(self, outcome)


_REASONS = {s.value: s.phrase for s in HTTPStatus}


class LeanServer:
    """Per listening site: the app's services, the live connections and requests in flight."""

    def __init__(self, app: web.Application, aio_server: web.Server, *,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.service = app[SERVICE]
        self.catalog = app[CATALOG]
        self.max_body = app[MAX_BODY]
        self.aio_server = aio_server
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[LeanProtocol] = set()
        self.inflight: set[asyncio.Task[None]] = set()
        self.pending = 0  # callback-driven requests in flight (no Task to wait for)
        self.draining = False
        self._date_at = 0
        self._date = b""
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> LeanProtocol:
        return LeanProtocol(self)

    def date(self) -> bytes:
        """The Date header line, formatted once per second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = b"Date: %s\r\n" % formatdate(now, usegmt=True).encode()
        return self._date

    def start_sweeping(self) -> None:
        """Close keep-alive connections idle for `keepalive_timeout` (one timer per server,
        not one per request)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for conn in list(self.connections):
            if not conn.slots and now - conn.last_active > self.keepalive_timeout:
                conn.close()
        self._sweeper = loop.call_later(min(5.0, self.keepalive_timeout), self.start_sweeping)

    async def drain(self, within_s: float) -> None:
        """Stop reading, let requests in flight finish and their answers go out; then close."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.finish()
        deadline = time.monotonic() + within_s
        while ((self.connections or self.inflight or self.pending)
               and time.monotonic() < deadline):
            if self.inflight:
                await asyncio.wait(list(self.inflight), timeout=deadline - time.monotonic())
            else:
                await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()


def render(version: str, status: int, headers: Mapping[str, str], body: bytes,
           keep_alive: bool, date: bytes) -> bytes:
    """One complete HTTP/1.x answer, with the headers aiohttp would add. (Appending to one
    string is what CPython does fastest here: it grows the string in place.)"""
    head = _STATUS_LINES.get((version, status)) or _status_line(version, status)
    for name, value in headers.items():
        head += f"{name}: {value}\r\n"
    head += f"Content-Length: {len(body)}\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    elif version == "1.0":
        head += "Connection: keep-alive\r\n"
    return b"".join((head.encode(), date, _SERVER, body))


def _status_line(version: str, status: int) -> str:
    return f"HTTP/{version} {status} {_REASONS.get(status, '')}\r\n"


_STATUS_LINES = {(version, status): _status_line(version, status)
                 for version in ("1.0", "1.1") for status in _REASONS}


_SERVER = b"Server: %s\r\n\r\n" % SERVER_SOFTWARE.encode()


class LeanProtocol(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: LeanServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.slots: deque[_Slot] = deque()
        self.last_active = time.monotonic()
        self._forwarding: deque[_Slot] = deque()  # slots aiohttp has yet to answer, in order
        self._bridge: _Bridge | None = None
        self._pauses: set[str] = set()
        self._closing = False  # no more requests: close once every answer is written
        # The message being parsed.
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False
        self._fields_fit = True  # no header field in the bytes being parsed can be too long
        self._kind = _INFER
        self._slot: _Slot | None = None
        self._route = ""
        self._headers = Headers({})
        self._body: list[bytes] = []
        self._body_size = 0
        self._chunked = False

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # one write per answer: never wait for the client's ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        if self.server.draining:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._closing = True
        self.server.connections.discard(self)
        if self._bridge is not None:
            self._bridge.close()

    def pause_writing(self) -> None:
        self._pause("write")

    def resume_writing(self) -> None:
        self._resume("write")

    def data_received(self, data: bytes) -> None:
        if self._closing and self._slot is None:
            return  # no request in progress, and no new one is read
        self.last_active = time.monotonic()
        # A header field finished while parsing `data` is made of this head's earlier bytes
        # (at most `_head_bytes`) and `data`: if they fit in MAX_LINE, so does every field, and
        # on_header need not measure each one.
        self._fields_fit = (self._head_bytes if self._in_head else 0) + len(data) <= MAX_LINE
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.finish()  # the request was answered as a plain one; nothing follows it here
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, error_body(cause.message), "application/json")
            elif not self._closing:
                log.error("lean server callback failed", exc_info=cause)
                self._reject(500, b"500 Internal Server Error\n\nServer got itself in trouble",
                             "text/plain; charset=utf-8")
        except httptools.HttpParserError as exc:
            if not self._closing:
                self._reject(400, str(exc).encode(), "text/plain; charset=utf-8")
        else:
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_LINE * (MAX_HEADERS + 1):
                    self._reject(431, error_body("request header fields are too large"),
                                 "application/json")

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        if self._closing:
            raise _Stop  # a request after the last one this connection serves
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._raw_headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            raise _Reject(414, f"request URL is longer than {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self._raw_headers
        if len(raw) >= MAX_HEADERS or not (self._fields_fit
                                            or len(name) + len(value) <= MAX_LINE):
            if len(name) + len(value) > MAX_LINE:  # this limit is named first, as aiohttp does
                raise _Reject(431, f"header field {name[:100].decode('latin-1')!r} is longer "
                                   f"than {MAX_LINE} bytes")
            raise _Reject(431, f"more than {MAX_HEADERS} header fields")
        raw.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        method = self.parser.get_method()
        path = self._url.split(b"?", 1)[0]
        # Lower-cased names; the first of repeated ones wins (the reversed walk writes it last).
        raw = {name.lower(): value for name, value in reversed(self._raw_headers)}
        self._headers = Headers(raw)
        encoding = raw.get(b"transfer-encoding")
        self._chunked = encoding is not None and "chunked" in encoding.decode(
            "utf-8", "surrogateescape").lower()
        plain = b"expect" not in raw and not self.parser.should_upgrade()
        match = _INFER_PATH.fullmatch(path) if method == b"POST" and plain else None
        slot = self._slot = _InferSlot() if match is not None else _Slot()
        self.slots.append(slot)
        if len(self.slots) >= MAX_PIPELINE:
            self._pause("pipeline")
        if match is not None:
            self._route = match[1].decode()
            self._body = []
            self._body_size = 0
            length = raw.get(b"content-length")  # digits: llhttp refuses anything else
            if length is not None and int(length) > self.server.max_body:
                self._too_large(slot)
            else:
                self._kind = _INFER
        elif method == b"GET" and plain and path in (_LIVE, _READY):
            self._kind = _LIVE_PROBE if path == _LIVE else _READY_PROBE
        else:
            self._kind = _FORWARD
            self._forward_head(method)

    def on_body(self, body: bytes) -> None:
        kind = self._kind
        if kind == _INFER:
            self._body_size += len(body)
            if self._body_size > self.server.max_body:
                assert self._slot is not None
                self._too_large(self._slot)
            else:
                self._body.append(body)
        elif kind == _FORWARD and self._bridge is not None:
            self._bridge.feed(b"%x\r\n%s\r\n" % (len(body), body) if self._chunked else body)

    def on_message_complete(self) -> None:
        slot = self._slot
        assert slot is not None
        self._slot = None
        keep_alive = self.parser.should_keep_alive() and not self._closing
        if not keep_alive:
            self.finish()
        kind = self._kind
        if kind == _FORWARD:
            if self._chunked and self._bridge is not None:
                self._bridge.feed(b"0\r\n\r\n")
            return  # aiohttp answers, and closes its side if the request asked for it
        version = self.parser.get_http_version()
        if kind == _INFER:
            assert isinstance(slot, _InferSlot)
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._body = []
            slot.conn = self
            slot.version = version
            slot.keep_alive = keep_alive
            slot.url = self._url
            self._start_infer(slot, self._route, body, self._headers)
        elif kind == _READY_PROBE:
            self._spawn(self._ready(slot, version, keep_alive))
        elif kind == _LIVE_PROBE:
            self._answer(slot, render(version, 200, {}, b"", keep_alive, self.server.date()),
                         not keep_alive)
        else:  # _DISCARD: the 413 is already in the slot
            slot.close = slot.close or not keep_alive
            self._flush()

    # -- answering --
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.server.inflight.add(task)
        task.add_done_callback(self.server.inflight.discard)

    def _start_infer(self, slot: _InferSlot, route: str, body: bytes, headers: Headers) -> None:
        """Serve an inference request by callbacks (`InferenceService.start`): no Task; the
        answer is written from the completion callback, the slot itself. A request `start`
        declines (the champion's signature not cached yet) runs `InferenceService.infer` in a
        Task."""
        server = self.server
        server.pending += 1
        try:
            started = server.service.start(route, body, headers, slot)
        except Exception as exc:  # an unknown route (404), or a bug (500)
            if slot.conn is None:  # answered already: a bug after the answer, logged only
                log.exception("Error after answering a request")
            slot(exc)
            return
        if not started:
            server.pending -= 1
            slot.conn = None  # the Task answers it (and the slot holds no cycle back to us)
            self._spawn(self._infer(slot, route, body, headers))

    async def _infer(self, slot: _InferSlot, route: str, body: bytes, headers: Headers) -> None:
        outcome: InferResult | Exception
        try:
            outcome = await self.server.service.infer(route, body, headers)
        except Exception as exc:
            outcome = exc
        self.infer_answer(slot, outcome)

    def infer_answer(self, slot: _InferSlot, outcome: InferResult | Exception) -> None:
        """Write an inference request's answer (either path): the result, its `GatewayError`
        mapped by `error_reply`, or a bug's 500 (logged) and a close."""
        date = self.server.date()
        version = slot.version
        keep_alive = slot.keep_alive
        if isinstance(outcome, InferResult):
            data = render(version, outcome.status, outcome.headers, outcome.body, keep_alive,
                          date)
        elif isinstance(outcome, GatewayError):
            body, extra = error_reply(outcome, "POST", slot.url.decode("latin-1"))
            data = render(version, outcome.status, {"Content-Type": "application/json", **extra},
                          body, keep_alive, date)
        else:
            log.error("Error handling request", exc_info=outcome)
            keep_alive = False
            data = render(version, 500, {"Content-Type": "text/plain; charset=utf-8"},
                          b"500 Internal Server Error\n\nServer got itself in trouble", False,
                          date)
        self._answer(slot, data, not keep_alive)

    async def _ready(self, slot: _Slot, version: str, keep_alive: bool) -> None:
        if await self.server.catalog.server_ready():
            data = render(version, 200, {}, b"", keep_alive, self.server.date())
        else:
            data = render(version, 503, {"Content-Type": "application/json"},
                          error_body(TRITON_NOT_READY), keep_alive, self.server.date())
        self._answer(slot, data, not keep_alive)

    def _too_large(self, slot: _Slot) -> None:
        """413 at once; the rest of the body is read and dropped, the connection stays up."""
        self._kind = _DISCARD
        self._body = []
        exc = body_too_large(self.server.max_body)
        slot.chunks.append(render(self.parser.get_http_version(), exc.status,
                                  {"Content-Type": "application/json"}, error_body(exc.message),
                                  True, self.server.date()))
        slot.done = True

    def _answer(self, slot: _Slot, data: bytes, close: bool) -> None:
        slot.chunks.append(data)
        slot.done = True
        slot.close = close
        if self.slots and self.slots[0] is slot:
            self._flush()

    def _flush(self) -> None:
        """Write every answer at the head of the queue that is ready, in request order."""
        slots = self.slots
        while slots:
            slot = slots[0]
            if slot.chunks:
                if self.transport is not None:
                    self.transport.write(b"".join(slot.chunks) if len(slot.chunks) > 1
                                         else slot.chunks[0])
                slot.chunks = []
            if not slot.done:
                return
            slots.popleft()
            if slot.close:
                self.finish()
                slots.clear()
        if "pipeline" in self._pauses:
            self._resume("pipeline")
        if self._closing:
            self.close()

    def _reject(self, status: int, body: bytes, content_type: str) -> None:
        """Answer a request that cannot be parsed or is over a limit, then close."""
        slot = self._slot if self._slot is not None and not self._slot.done else _Slot()
        if slot is not self._slot:
            self.slots.append(slot)
        self._slot = None
        if self._kind == _FORWARD and slot in self._forwarding:
            # aiohttp has the head already: whatever it wrote is all this request gets.
            self._forwarding.remove(slot)
            slot.done = True
        else:
            slot.chunks.append(render("1.1", status, {"Content-Type": content_type}, body,
                                      False, self.server.date()))
            slot.done = True
        slot.close = True
        self.finish()
        self._flush()

    # -- flow control and closing --
    def _pause(self, reason: str) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        self._pauses.discard(reason)
        if not self._pauses and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    def finish(self) -> None:
        """Read no further requests; close once the queued answers are written. A request
        whose body is still arriving is read to its end first (a drain must not cut it)."""
        self._closing = True
        if self._slot is None:
            self._pause("closing")
            if not self.slots:
                self.close()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- the aiohttp side --
    def _forward_head(self, method: bytes) -> None:
        assert self._slot is not None
        if self._bridge is None or self._bridge.closed:
            self._bridge = _Bridge(self, self.server.aio_server)
        self._forwarding.append(self._slot)
        version = self.parser.get_http_version().encode()
        head = [b"%s %s HTTP/%s\r\n" % (method, self._url, version)]
        head.extend(b"%s: %s\r\n" % pair for pair in self._raw_headers)
        head.append(b"\r\n")
        self._bridge.feed(b"".join(head))

    def bridge_write(self, data: bytes) -> None:
        if not self._forwarding:  # aiohttp answering nothing we sent (it never does)
            return
        slot = self._forwarding[0]
        if self.slots and self.slots[0] is slot and self.transport is not None:
            self.transport.write(data)  # at the head of the queue: straight through
        else:
            slot.chunks.append(data)

    def bridge_answered(self) -> None:
        if self._forwarding:
            self._forwarding.popleft().done = True
            self._flush()

    def bridge_closed(self, bridge: _Bridge) -> None:
        """aiohttp closed its side: after a `Connection: close` answer, an error or shutdown.
        The client connection closes after the answers queued so far."""
        if bridge is not self._bridge:
            return
        self._bridge = None
        while self._forwarding:
            slot = self._forwarding.popleft()
            slot.done = True
            slot.close = True
        if self.transport is not None:
            self.finish()
            self._flush()


class _Bridge(asyncio.Transport):
    """The transport an aiohttp `RequestHandler` sees for requests this server hands it."""

    def __init__(self, conn: LeanProtocol, aio_server: web.Server) -> None:
        super().__init__()
        self.conn = conn
        self.closed = False
        self.handler = aio_server()
        self.handler.connection_made(self)

    def feed(self, data: bytes) -> None:
        if not self.closed:
            self.handler.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.conn.bridge_write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.conn.bridge_closed(self)
        asyncio.get_running_loop().call_soon(self.handler.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.conn.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.conn._pause("aiohttp")

    def resume_reading(self) -> None:
        self.conn._resume("aiohttp")

    def is_reading(self) -> bool:
        return "aiohttp" not in self.conn._pauses

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


class AnswerDone(AbstractAccessLogger):
    """aiohttp calls its access logger once an answer is completely written: for a bridged
    request that is when its slot is complete."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        transport = request.transport
        if isinstance(transport, _Bridge) and not transport.closed:
            transport.conn.bridge_answered()

    @property
    def enabled(self) -> bool:
        return True
