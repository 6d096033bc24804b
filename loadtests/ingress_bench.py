"""Micro-benchmark: the gateway's own CPU per inference request on the ingress side.

    PYTHONPATH=. python loadtests/ingress_bench.py [--repeat 7] [--number 20000] [--binary]

Feeds wrk's request bytes (`POST /v2/models/fraud/infer`, one fraud row, JSON or binary) to a
`LeanProtocol` on a fake transport, through the real `InferenceService`, `RouteTable` and
metrics, to the written answer. Only the parts other benchmarks cover are stubbed: the
upstream call (answered at once, the way the event loop would call back), the recorder and
the shadow lanes (`loadtests/bench_recorder.py`, `loadtests/bench_lane.py`). Prints the
best-of-`repeat` process-CPU microseconds per request. Run it on two trees (PYTHONPATH=main
vs PYTHONPATH=branch), alternating, and compare the best of several runs.

On a busy machine the CPU time wanders by 10-30%; instructions do not. Without hardware
counters, count them with valgrind at two sizes and divide the difference (startup cancels):

    PYTHONHASHSEED=0 PYTHONPATH=TREE valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python loadtests/ingress_bench.py --repeat 1 --number N   # N=1000 and N=5000: "Collected"
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

from gateway.config import parse_route
from gateway.dataplane.protocol import TensorSpec
from gateway.dataplane.routes import RouteTable
from gateway.dataplane.service import InferenceService
from gateway.rest.inference import CATALOG, MAX_BODY, SERVICE
from gateway.rest.lean_server import LeanServer
from gateway.upstream.client import UpstreamResponse

ANSWER = (b'{"model_name":"fraud_v3","model_version":"1","outputs":[{"name":"score",'
          b'"datatype":"FP32","shape":[1,1],"data":[0.125]}]}')
ROW = [0.5, -1.25, 3.0, 0.0078125, 12.5, -0.5, 1.0, 2.0]


class _Upstream:
    """Answers every call with ANSWER when `drain` runs (as the loop would, after the read)."""

    timeout_s = 1.0

    def __init__(self) -> None:
        self.pending: list[Any] = []
        self.response = UpstreamResponse(200, ANSWER, "application/json", None, 0.0012)

    def infer_cb(self, model: str, version: str, body: bytes, content_type: str,
                 header_length: int | None, on_done: Any, **_: Any) -> Any:
        self.pending.append(on_done)
        return self

    def cancel(self) -> None:
        pass

    def pool(self, *args: Any, **kwargs: Any) -> None:
        pass  # the lanes built by the route table (replaced below) ask for theirs

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for on_done in pending:
            on_done(self.response)


class _Lane:
    """A shadow lane that admits every copy and never calls anything."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] = asyncio.get_event_loop_policy().new_event_loop(
        ).create_future()

    def submit(self, request: Any, mode: str) -> Any:
        return self.future

    def skipped(self) -> Any:
        return self.future


class _Recorder:
    def submit(self, ctx: Any, copies: Any) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += data.startswith(b"HTTP/1.1 200 OK\r\n")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def request_bytes(binary: bool) -> bytes:
    """A request as wrk sends it (loadtests/post.lua)."""
    inputs: dict[str, Any] = {"name": "features", "shape": [1, 8], "datatype": "FP32"}
    extra = b""
    if binary:
        import numpy as np

        tensor = np.asarray(ROW, dtype=np.float32).tobytes()
        inputs["parameters"] = {"binary_data_size": len(tensor)}
        header = orjson.dumps({"inputs": [inputs], "outputs": [
            {"name": "score", "parameters": {"binary_data": True}}]})
        body = header + tensor
        ctype = b"application/octet-stream"
        extra = b"Inference-Header-Content-Length: %d\r\n" % len(header)
    else:
        inputs["data"] = [ROW]
        body = orjson.dumps({"inputs": [inputs]})
        ctype = b"application/json"
    return (b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Content-Length: %d\r\nContent-Type: %s\r\n%s\r\n" % (len(body), ctype, extra)
            + body)


def build(binary: bool) -> tuple[Any, _Upstream, _Transport]:
    upstream = _Upstream()
    routes = RouteTable(upstream)  # type: ignore[arg-type]
    runtime = routes.apply(parse_route("fraud", {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v4", "mode": "shadow"}]}))
    runtime.champion_inputs = (TensorSpec("features", "FP32", (-1, 8)),)
    runtime.lanes = {model: _Lane() for model in runtime.lanes}  # type: ignore[misc]
    service = InferenceService(routes, upstream, _Recorder())  # type: ignore[arg-type]
    app = {SERVICE: service, CATALOG: None, MAX_BODY: 1 << 20}
    server = LeanServer(app, None)  # type: ignore[arg-type]
    proto = server()
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, upstream, transport


def run(number: int, binary: bool) -> float:
    """CPU seconds for `number` requests."""
    proto, upstream, transport = build(binary)
    data = request_bytes(binary)
    feed, drain = proto.data_received, upstream.drain
    start = time.process_time()
    for _ in range(number):
        feed(data)
        drain()
    elapsed = time.process_time() - start
    assert transport.written == number, "every request answered 200"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--binary", action="store_true")
    args = parser.parse_args()
    run(1000, args.binary)  # warm the metric children and caches
    best = min(run(args.number, args.binary) for _ in range(args.repeat))
    print(f"ingress {'binary' if args.binary else 'json'}: {best / args.number * 1e6:.2f} us "
          "CPU per request")


if __name__ == "__main__":
    main()
