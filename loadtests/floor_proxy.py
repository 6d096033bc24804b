"""The floor: the least Python that does the gateway's core work, to measure the gateway against.

    python loadtests/floor_proxy.py --port P --upstream HOST:PORT --champion fraud_v3
                                    --shadow fraud_v4 --log FILE

Not the product. Issue 15's design question is how close a Python data plane can come to
nginx's mirror; this answers the "how close could it come" half in the same run as the
gateway, so the gap splits into what the design costs and what the gateway's features cost.

Same work as the nginx mirror in `make bench`: `POST /v2/models/<any>/infer` is forwarded to
the champion on a pre-opened keep-alive connection; a copy goes to the shadow on its own
connections, fire and forget, bounded (`--shadow-slots` in flight, the rest are dropped and
counted); one orjson record per request (request id, time, champion latency, its answer as
an `orjson.Fragment`) appended to a buffer that a timer writes to `--log` every 20 ms.
Callbacks throughout (httptools parsers on uvloop, no Task or Future per request or call).
Left out on purpose: validation, metrics, routing, the registry, timeouts, errors beyond a
502, request limits.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httptools
import orjson
import uvloop

Answer = Callable[[bytes | None], None]  # the upstream's body, or None if the call failed
FLUSH_S = 0.02


class Upstream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to Triton; one call at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.pool.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        answer, self.answer = self.answer, None
        if answer is not None:
            answer(None)

    def call(self, body: bytes, answer: Answer) -> None:
        assert self.transport is not None
        self.answer = answer
        self.transport.write(self.pool.head + b"%d\r\n\r\n" % len(body) + body)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.body = []
        answer, self.answer = self.answer, None
        self.pool.release(self)
        if answer is not None:
            answer(body)


class Pool:
    """Connections to one model; calls wait in a FIFO when every connection is busy, or are
    dropped past `limit` waiting (the shadow's bound)."""

    def __init__(self, model: str, size: int, limit: int | None = None) -> None:
        self.head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: triton\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.size = size
        self.limit = limit
        self.idle: list[Upstream] = []
        self.waiting: deque[tuple[bytes, Answer]] = deque()
        self.dropped = 0

    async def open(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            await loop.create_connection(lambda: Upstream(self), host, port)

    def call(self, body: bytes, answer: Answer) -> None:
        if self.idle:
            self.idle.pop().call(body, answer)
        elif self.limit is not None and len(self.waiting) >= self.limit:
            self.dropped += 1
        else:
            self.waiting.append((body, answer))

    def release(self, conn: Upstream) -> None:
        if self.waiting:
            body, answer = self.waiting.popleft()
            conn.call(body, answer)
        else:
            self.idle.append(conn)


class Log:
    """Records buffered in memory, written by one timer every FLUSH_S."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("ab", buffering=1 << 20)
        self.lines: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None

    def add(self, line: bytes) -> None:
        self.lines.append(line)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        self.timer = None
        lines, self.lines = self.lines, []
        self.file.write(b"".join(lines))
        self.file.flush()


class Client(asyncio.Protocol):
    """One client connection: parse, forward, copy, answer, record."""

    ids = itertools.count()

    def __init__(self, champion: Pool, shadow: Pool, log: Log) -> None:
        self.champion, self.shadow, self.log = champion, shadow, log
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.body = []
        started = time.perf_counter()
        request_id = f"{os.getpid()}-{next(self.ids)}"

        def answered(answer: bytes | None) -> None:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if answer is None:
                transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"x-request-id: %s\r\nContent-Length: %d\r\n\r\n"
                            % (request_id.encode(), len(answer)) + answer)
            self.log.add(orjson.dumps({
                "request_id": request_id, "ts": time.time(),
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                "champion": orjson.Fragment(answer),
            }, option=orjson.OPT_APPEND_NEWLINE))

        self.champion.call(body, answered)
        self.shadow.call(body, _ignore)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _ignore(_: bytes | None) -> None:
    """The shadow's answer: fire and forget."""


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    champion = Pool(args.champion, args.connections)
    shadow = Pool(args.shadow, args.shadow_slots, limit=args.shadow_queue)
    await champion.open(host, int(port))
    await shadow.open(host, int(port))
    log = Log(Path(args.log))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(champion, shadow, log),
                                      args.host, args.port, backlog=1024)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop
    server.close()
    log.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port of Triton's HTTP")
    parser.add_argument("--champion", default="fraud_v3")
    parser.add_argument("--shadow", default="fraud_v4")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--shadow-slots", type=int, default=8)
    parser.add_argument("--shadow-queue", type=int, default=256)
    parser.add_argument("--log", required=True)
    uvloop.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
