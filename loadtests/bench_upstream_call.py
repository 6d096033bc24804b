"""Micro-benchmark: the gateway's own CPU per upstream inference call, no sockets.

    PYTHONPATH=. python loadtests/bench_upstream_call.py [--calls 50000] [--repeat 5]
                                                         [--concurrency 8] [--binary]

Runs `TritonUpstream.infer_cb` end to end (the path every served request and every shadow
batch takes: request head, the pool's slot and idle connection, the per-call timer, the
`httptools` parse of the answer, mapping it to an `UpstreamResponse`) with `--concurrency`
calls in flight, each completion starting the next call. The connection's transport is faked
in-process: `write` hands a canned Triton answer (the headers real Triton sends) back to the
connection on the next loop turn, so what is timed is the gateway's Python work, not the
kernel's. Prints the best-of-`--repeat` process CPU µs per call. Run it with PYTHONPATH set to
two trees to compare them (alternate, best of several runs).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import uvloop

from gateway.upstream.client import TritonUpstream, UpstreamResponse
from gateway.upstream.keepalive import _Connection

BODY = b'{"model_name":"m","model_version":"1","outputs":[{"name":"score","datatype":"FP32",' \
       b'"shape":[1,1],"data":[0.5]}]}'
JSON_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)
BINARY_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                 % (len(BODY), len(BODY)) + BODY)
REQUEST = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],' \
          b'"data":[0.1,-0.2,0.3,0.4,-0.5,0.6,0.7,-0.8]}]}'


class FakeTransport(asyncio.Transport):
    """Answers each request written with the canned answer, on the next loop turn."""

    def __init__(self, conn: _Connection, answer: bytes) -> None:
        super().__init__()
        self._conn = conn
        self._answer = answer
        self._loop = asyncio.get_running_loop()
        self._closing = False

    def write(self, data: Any) -> None:
        self._loop.call_soon(self._conn.data_received, self._answer)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True


async def run(calls: int, concurrency: int, binary: bool) -> float:
    """CPU seconds per call for one pass."""
    upstream = TritonUpstream("http://127.0.0.1:9", timeout_ms=5000,
                              max_connections=concurrency)
    answer = BINARY_ANSWER if binary else JSON_ANSWER

    async def connect() -> _Connection:
        conn = _Connection()
        conn.connection_made(FakeTransport(conn, answer))
        return conn

    upstream.pool("m")._connect = connect  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    content_type = "application/octet-stream" if binary else "application/json"
    header_length = len(REQUEST) if binary else None
    left = calls
    done = 0

    def start() -> None:
        nonlocal left
        left -= 1
        upstream.infer_cb("m", "", REQUEST, content_type, header_length, on_done)

    def on_done(outcome: UpstreamResponse | Exception) -> None:
        nonlocal done
        if not isinstance(outcome, UpstreamResponse):
            finished.set_exception(RuntimeError(f"call failed: {outcome!r}"))
            return
        done += 1
        if left:
            start()
        elif done == calls:
            finished.set_result(None)

    for _ in range(concurrency):  # warm: open the connections, render the heads
        start()
    started = time.process_time()
    await finished
    cpu = time.process_time() - started
    await upstream.close()
    return cpu / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--binary", action="store_true", help="binary tensor answers")
    args = parser.parse_args(argv)
    # uvloop: the gateway's loop, whose timers and handles are part of what a call costs.
    best = min(uvloop.run(run(args.calls, args.concurrency, args.binary))
               for _ in range(args.repeat))
    kind = "binary" if args.binary else "JSON"
    print(f"upstream call: {best * 1e6:.2f} us CPU per call (best of {args.repeat}, "
          f"{args.calls} {kind} calls, {args.concurrency} in flight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
