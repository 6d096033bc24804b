"""CPU per inference record: `Recorder.build` plus its one serialisation (what the recorder's
worker does for every request, off the client's path), without Triton or a sink.

    PYTHONPATH=<tree> python loadtests/bench_recorder.py [--loops 2000] [--repeat 7]

Three requests as the gateway sees them, each with its champion answer and one shadow copy's
(the profile's setup, loadtests/profile_gateway.py): a 1-row JSON request, a 64-row JSON request,
and a 64-row binary-tensor request answered with binary outputs; and the 1-row request whose copy
was micro-batched (its rows already split from the batch answer). Prints the best-of-`repeat`
process CPU time per record (µs) and the record's size, as the recorder builds it and, in
alternating runs, with the inputs decoded to Python lists first (how records were built before
large binary inputs were written as text, `log_inputs`); then the whole of `Recorder._record`
(build, prediction metrics, the rollout controller's observer, serialisation, a sink that drops
the line). To compare other changes, run it against two trees by PYTHONPATH (e.g. main and a
branch), alternating several times: on a shared machine the best of several runs is the number.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from gateway.config import parse_route
from gateway.control.rollout import RolloutController
from gateway.dataplane import recorder as recorder_module
from gateway.dataplane.protocol import decode_inputs, log_inputs, parse_request
from gateway.dataplane.recorder import Recorder, RequestContext
from gateway.dataplane.routes import RouteTable
from gateway.explore.policies import Decision
from gateway.mirror.shadow import ShadowResult
from gateway.upstream.client import TritonUpstream, UpstreamResponse

FEATURES = 8  # the demo fraud model's input width


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(7).random((n, FEATURES), dtype=np.float32)


def json_request(n: int) -> tuple[bytes, None]:
    body = {"inputs": [{"name": "features", "shape": [n, FEATURES], "datatype": "FP32",
                        "data": _rows(n).tolist()}]}
    return orjson.dumps(body), None


def binary_request(n: int) -> tuple[bytes, str]:
    """What tritonclient.http sends: the tensor's bytes after the JSON header, binary output."""
    rows = _rows(n)
    header = orjson.dumps({"inputs": [{"name": "features", "shape": [n, FEATURES],
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": rows.nbytes}}],
                           "outputs": [{"name": "score", "parameters": {"binary_data": True}}]})
    return header + rows.tobytes(), str(len(header))


def answer(n: int, binary: bool, seed: int) -> UpstreamResponse:
    """Triton's answer to an n-row request: JSON `data`, or binary output bytes."""
    scores = np.random.default_rng(seed).random((n, 1), dtype=np.float32)
    output: dict[str, Any] = {"name": "score", "datatype": "FP32", "shape": [n, 1]}
    if not binary:
        output["data"] = scores.ravel().tolist()
        body = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": [output]})
        return UpstreamResponse(200, body, "application/json", None, 0.0021)
    output["parameters"] = {"binary_data_size": scores.nbytes}
    header = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": [output]})
    return UpstreamResponse(200, header + scores.tobytes(), "application/octet-stream",
                            str(len(header)), 0.0021)


# name: (rows, binary, the copy micro-batched)
CASES: dict[str, tuple[int, bool, bool]] = {
    "json-1row": (1, False, False), "json-64rows": (64, False, False),
    "binary-64rows": (64, True, False), "json-1row-batched": (1, False, True)}


def case(runtime: Any, rows: int, binary: bool, batched: bool = False
         ) -> tuple[RequestContext, dict[str, ShadowResult]]:
    body, header_length = binary_request(rows) if binary else json_request(rows)
    request = parse_request(body, header_length)
    ctx = RequestContext(runtime, "0123456789abcdef0123456789abcdef", 1.7e9, None, request,
                         Decision("fraud_v3", 1.0, {"fraud_v3": 1.0}), "fraud_v3",
                         ShadowResult("ok", 0.00213, answer(rows, binary, 1)), 200, 0.00317)
    if batched:
        scores = np.random.default_rng(2).random(rows).tolist()
        return ctx, {"fraud_v4": ShadowResult(
            "ok", 0.00422, outputs={"score": {"datatype": "FP32", "shape": [rows, 1],
                                              "data": scores}},
            batch_rows=4, model_version="1")}
    return ctx, {"fraud_v4": ShadowResult("ok", 0.00422, answer(rows, binary, 2))}


class _Drop:
    """A sink that drops every line: the record side alone, not the file sink's writes."""

    def emit(self, stream: str, key: str, value: bytes) -> None:
        return None


def best_us(fn: Callable[[], object], loops: int, repeat: int) -> float:
    """Best of `repeat` runs of `loops` calls: CPU µs per call (this process only)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time_ns()
        for _ in range(loops):
            fn()
        best = min(best, (time.process_time_ns() - start) / loops / 1000)
    return best


async def run(loops: int, repeat: int) -> None:
    upstream = TritonUpstream("http://127.0.0.1:9", timeout_ms=1000, max_connections=4)
    try:
        route = parse_route("fraud", {"champion": {"model": "fraud_v3"},
                                      "challengers": [{"model": "fraud_v4", "mode": "shadow"}]})
        runtime = RouteTable(upstream).apply(route)
        recorder = Recorder(None)  # type: ignore[arg-type]  # build() never touches the sink
        whole = Recorder(_Drop())  # type: ignore[arg-type]
        controller = RolloutController(None, RouteTable(upstream))  # type: ignore[arg-type]
        whole.observers.append(controller.observe)
        loop = asyncio.get_running_loop()
        for name, (rows, binary, batched) in CASES.items():
            ctx, copies = case(runtime, rows, binary, batched)
            futures = {model: loop.create_future() for model in copies}
            for model, future in futures.items():
                future.set_result(copies[model])
            line = orjson.dumps(recorder.build(ctx, copies))
            us = {"as logged": float("inf"), "inputs as lists": float("inf")}
            for _ in range(repeat):  # alternating, so both see the same machine
                for variant, inputs in (("as logged", log_inputs),
                                        ("inputs as lists", decode_inputs)):
                    recorder_module.log_inputs = inputs
                    us[variant] = min(us[variant], best_us(
                        lambda ctx=ctx, copies=copies: orjson.dumps(recorder.build(ctx, copies)),
                        loops, 1))
                    recorder_module.log_inputs = log_inputs
            recorded = best_us(lambda ctx=ctx, futures=futures: whole._record(ctx, futures),
                               loops, repeat)
            print(f"{name:17s} {us['as logged']:8.2f} µs/record; with inputs decoded to lists "
                  f"(before orjson.Fragment) {us['inputs as lists']:8.2f}  ({len(line)} bytes); "
                  f"whole _record {recorded:8.2f} µs")
    finally:
        await upstream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    asyncio.run(run(args.loops, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
