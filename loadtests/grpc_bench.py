"""gRPC benchmark: direct Triton gRPC vs the gateway over gRPC vs the gateway over HTTP.

    python loadtests/grpc_bench.py [--duration 8] [--concurrency 16] [--rate 100]
                                   [--out var/bench-grpc]

One real Triton (the demo models), one `python -m gateway serve` (route "fraud", champion
fraud_v3 only, file sink) listening on HTTP and gRPC. Every target gets the same request: one
fraud row (1x8 FP32) as tritonclient sends it (gRPC: `raw_input_contents`; HTTP: the binary
tensor extension). The load client is this process (asyncio + uvloop; grpc.aio with a prebuilt
message, aiohttp with a prebuilt body): perf_analyzer is not shipped by any installed package.

1. Capacity: `--concurrency` closed-loop callers for `--duration` s: throughput, p50/p99.
2. Latency at a light fixed rate (`--rate`/s, Poisson arrivals, open loop): p50/p90/p99; the
   added latency is the gateway's p50 minus direct Triton's.
3. CPU per request: the gateway's (and Triton's) CPU seconds during the capacity run, from
   /proc schedstat, divided by the requests served; the client's own CPU is shown too (it
   shares the machine).
Results are printed as a Markdown table and written to <out>/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loadtests.common import (
    Gateway,
    binary_body,
    fraud_rows,
    free_port,
    gateway_config,
    process_tree,
    schedstat,
    triton_server,
)

Call = Callable[[], Awaitable[None]]


def grpc_request(model: str, row: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.outputs.add(name="score")
    request.raw_input_contents.append(np.asarray(row, dtype=np.float32).reshape(1, 8).tobytes())
    return request


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def closed_loop(call: Call, concurrency: int, duration: float) -> tuple[int, list[float]]:
    """`concurrency` callers back to back for `duration` s: (requests, latencies in s)."""
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    async def caller() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), latencies


async def open_loop(call: Call, rate: float, duration: float, seed: int = 1) -> list[float]:
    """Poisson arrivals at `rate`/s for `duration` s, each request timed on its own."""
    rng = random.Random(seed)
    latencies: list[float] = []
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)

    start = time.perf_counter()
    at = start
    while at - start < duration:
        at += rng.expovariate(rate)
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return latencies


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, call: Call, args: argparse.Namespace, gateway_pids: list[int],
                  triton_pids: list[int]) -> dict[str, Any]:
    for _ in range(50):  # warm: connections, the champion's metadata
        await call()
    gw0, tr0, cl0 = schedstat(gateway_pids)[0], schedstat(triton_pids)[0], client_cpu()
    started = time.perf_counter()
    count, lat = await closed_loop(call, args.concurrency, args.duration)
    wall = time.perf_counter() - started
    gw1, tr1, cl1 = schedstat(gateway_pids)[0], schedstat(triton_pids)[0], client_cpu()
    light = await open_loop(call, args.rate, args.duration)
    row = {
        "target": name, "requests": count, "capacity_rps": count / wall,
        "cap_p50_ms": percentile(lat, 0.5) * 1e3, "cap_p99_ms": percentile(lat, 0.99) * 1e3,
        "light_p50_ms": percentile(light, 0.5) * 1e3,
        "light_p90_ms": percentile(light, 0.9) * 1e3,
        "light_p99_ms": percentile(light, 0.99) * 1e3,
        "gateway_cpu_us_per_req": (gw1 - gw0) / count * 1e6 if gateway_pids else None,
        "triton_cpu_us_per_req": (tr1 - tr0) / count * 1e6,
        "client_cpu_us_per_req": (cl1 - cl0) / count * 1e6,
    }
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    direct = rows[0]["light_p50_ms"]
    lines = [
        f"| target | capacity (req/s, {args.concurrency} callers) | p50 / p99 at capacity (ms) "
        f"| p50 / p90 / p99 at {args.rate:g}/s (ms) | added p50 at {args.rate:g}/s (ms) "
        "| gateway CPU / req (µs) | Triton CPU / req (µs) | client CPU / req (µs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gw = r["gateway_cpu_us_per_req"]
        lines.append(
            f"| {r['target']} | {r['capacity_rps']:.0f} | {r['cap_p50_ms']:.2f} / "
            f"{r['cap_p99_ms']:.2f} | {r['light_p50_ms']:.2f} / {r['light_p90_ms']:.2f} / "
            f"{r['light_p99_ms']:.2f} | {r['light_p50_ms'] - direct:+.2f} | "
            f"{'—' if gw is None else f'{gw:.0f}'} | {r['triton_cpu_us_per_req']:.0f} | "
            f"{r['client_cpu_us_per_req']:.0f} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    x, _ = fraud_rows(1)
    row = x[0]
    rows: list[dict[str, Any]] = []
    with triton_server(work) as triton:
        triton_pids = process_tree(triton.pid)  # tritonserver and its Python-backend stubs
        config = gateway_config(triton.url, work, "grpc", {"fraud": {"champion": "fraud_v3"}})
        with Gateway(config, grpc_port=free_port()) as gateway:
            http_body = binary_body(row)
            targets: list[tuple[str, str, Any]] = [
                ("Triton gRPC (direct)", triton.grpc_url, grpc_request("fraud_v3", row)),
                ("gateway gRPC", f"127.0.0.1:{gateway.grpc_port}", grpc_request("fraud", row)),
            ]
            for name, target, request in targets:
                async with grpc.aio.insecure_channel(target) as channel:
                    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

                    async def call(stub: Any = stub, request: Any = request) -> None:
                        await stub.ModelInfer(request)

                    pids = gateway.pids if target != triton.grpc_url else []
                    rows.append(await measure(name, call, args, pids, triton_pids))
            connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
            async with aiohttp.ClientSession(connector=connector) as session:
                url = f"{gateway.url}/v2/models/fraud/infer"

                async def http_call() -> None:
                    async with session.post(url, data=http_body.data,
                                            headers=http_body.headers) as resp:
                        await resp.read()
                        assert resp.status == 200, resp.status

                rows.append(await measure("gateway HTTP (binary)", http_call, args,
                                          gateway.pids, triton_pids))
    return rows


Run = Callable[[argparse.Namespace, Path], Awaitable[list[dict[str, Any]]]]
Table = Callable[[list[dict[str, Any]], argparse.Namespace], str]


def bench_main(doc: str | None, run_rows: Run, render: Table, default_out: str) -> int:
    """The command line both gRPC benchmarks share: parse, run on uvloop, print the table and
    the machine's load, keep results.json."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = asyncio.run(run_rows(args, work))
    md = render(rows, args)
    print(md)
    print(f"load average {os.getloadavg()[0]:.2f}; median capacity "
          f"{statistics.median(r['capacity_rps'] for r in rows):.0f} req/s")
    (work / "results.json").write_text(json.dumps({"rows": rows, "markdown": md}, indent=1))
    return 0


def main() -> int:
    return bench_main(__doc__, run, table, "var/bench-grpc")


if __name__ == "__main__":
    raise SystemExit(main())
