"""Upstream protocol benchmark: the gateway calling Triton over HTTP vs over gRPC.

    python loadtests/upstream_protocol_bench.py [--duration 8] [--concurrency 16] [--rate 100]
                                                [--out var/bench-upstream]

One real Triton (the demo models) and, per case, one `python -m gateway serve` with
`triton.protocol: http` and one with `triton.protocol: grpc` (everything else equal), started
one after the other in the same run. Clients call the gateway over HTTP (one fraud row, binary
tensor extension), so only the gateway -> Triton leg differs. Cases: the champion alone, and the
champion plus one shadow challenger (every request copied, micro-batched where the model
batches). Capacity, latency and CPU per request as in loadtests/grpc_bench.py; the ratio row
compares gRPC with HTTP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from loadtests.common import (
    Gateway,
    binary_body,
    fraud_rows,
    gateway_config,
    process_tree,
    triton_server,
)
from loadtests.grpc_bench import bench_main, measure

CASES: dict[str, dict[str, Any]] = {
    "champion only": {"fraud": {"champion": "fraud_v3"}},
    "champion + 1 shadow": {"fraud": {"champion": "fraud_v3",
                                      "challengers": [{"model": "fraud_v4", "mode": "shadow"}]}},
}


async def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    x, _ = fraud_rows(1)
    body = binary_body(x[0])
    rows: list[dict[str, Any]] = []
    with triton_server(work) as triton:
        triton_pids = process_tree(triton.pid)
        for case, routes in CASES.items():
            for protocol in ("http", "grpc"):
                extra = {"protocol": protocol}
                if protocol == "grpc":
                    extra["grpc_url"] = triton.grpc_url
                name = f"{case.replace(' ', '')}-{protocol}".replace("+", "_")
                config = gateway_config(triton.url, work, name, routes, extra_triton=extra)
                with Gateway(config) as gateway:
                    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
                    async with aiohttp.ClientSession(connector=connector) as session:
                        url = f"{gateway.url}/v2/models/fraud/infer"

                        async def call(session: Any = session, url: str = url) -> None:
                            async with session.post(url, data=body.data,
                                                    headers=body.headers) as resp:
                                await resp.read()
                                assert resp.status == 200, resp.status

                        row = await measure(f"{case}, upstream {protocol}", call, args,
                                            gateway.pids, triton_pids)
                        row.update(case=case, protocol=protocol)
                        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"| case | upstream | capacity (req/s, {args.concurrency} callers) "
        f"| p50 / p99 at capacity (ms) | p50 / p99 at {args.rate:g}/s (ms) "
        "| gateway CPU / req (µs) | Triton CPU / req (µs) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["case"], r["protocol"]): r for r in rows}
    for case in CASES:
        for protocol in ("http", "grpc"):
            r = by[case, protocol]
            lines.append(
                f"| {case} | {protocol} | {r['capacity_rps']:.0f} | {r['cap_p50_ms']:.2f} / "
                f"{r['cap_p99_ms']:.2f} | {r['light_p50_ms']:.2f} / {r['light_p99_ms']:.2f} | "
                f"{r['gateway_cpu_us_per_req']:.0f} | {r['triton_cpu_us_per_req']:.0f} |"
            )
        h, g = by[case, "http"], by[case, "grpc"]
        lines.append(
            f"| {case} | **grpc / http** | {g['capacity_rps'] / h['capacity_rps']:.2f}× | "
            f"{g['cap_p50_ms'] / h['cap_p50_ms']:.2f}× | "
            f"{g['light_p50_ms'] / h['light_p50_ms']:.2f}× | "
            f"{g['gateway_cpu_us_per_req'] / h['gateway_cpu_us_per_req']:.2f}× | "
            f"{g['triton_cpu_us_per_req'] / h['triton_cpu_us_per_req']:.2f}× |"
        )
    return "\n".join(lines)


def main() -> int:
    return bench_main(__doc__, run, table, "var/bench-upstream")


if __name__ == "__main__":
    raise SystemExit(main())
