"""A/B the gateway's HTTP servers (and any gateway trees) in one run, alternating rounds.

    python loadtests/server_ab.py [--rounds 4] [--duration 6] [--rate 800] [--shadows 1]
                                  [--variant NAME=server[@TREE]] ... [--sink kafka]

Starts Triton once and one gateway per variant (default `aiohttp=aiohttp` and `lean=lean`,
both from this tree; `@TREE` runs another checkout, e.g. `before=@../main`, where an empty
server name sets no `listen.server`). Each has champion fraud_v3, N shadows and the file sink
(or, with `--sink kafka`, the Kafka sink on a throwaway local broker) at 100% logging. Then,
for --rounds rounds in ABBA order: a closed-loop capacity run (wrk -c16) and a fixed-rate run
(--rate req/s, Poisson) per variant, recording throughput, p50/p99 and the gateway's CPU ms per
request (schedstat of its process tree). Prints per-variant medians and the ratios to the first
variant (docs/BENCHMARKS.md, "Lean data plane").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common

ROUTE = "fraud"


def _variants(specs: list[str]) -> list[tuple[str, str, Path]]:
    out = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        server, _, tree = rest.partition("@")
        out.append((name, server, Path(tree) if tree else common.ROOT))
    return out


def _measure(gw: common.Gateway, url: str, body_file: Path, body: common.Body,
             kind: str, args: argparse.Namespace) -> dict[str, float]:
    pids = gw.pids
    cpu0 = common.schedstat(pids)[0]
    if kind == "capacity":
        r = common.wrk(url, body_file, body, duration=args.duration, cpus=args.load_cpus)
    else:
        r = common.wrk_rate(url, body_file, body, rate=args.rate, duration=args.duration,
                            cpus=args.load_cpus)
    cpu_ms = 1000 * (common.schedstat(pids)[0] - cpu0) / max(r.requests, 1)
    return {"rps": r.rps, "p50_ms": r.p50, "p99_ms": r.p99, "cpu_ms": cpu_ms,
            "errors": r.errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--rate", type=float, default=800)
    parser.add_argument("--shadows", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--sink", choices=("file", "kafka"), default="file")
    parser.add_argument("--out", type=Path, default=common.ROOT / "var" / "bench" / "server_ab")
    args = parser.parse_args(argv)
    variants = _variants(args.variant or ["aiohttp=aiohttp", "lean=lean"])
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    shadows = ["fraud_v4", "fraud_v5"][: args.shadows]
    routes = {ROUTE: {"champion": {"model": "fraud_v3"}, "task": "classification",
                      "challengers": [{"model": m, "sample_rate": 1.0} for m in shadows]}}
    x, _ = common.fraud_rows(1)
    body = common.json_body(x[0])
    body_file = common.write_body(body, work / "body.json")
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {"capacity": [], "rate": []} for name, _, _ in variants}
    with contextlib.ExitStack() as stack:
        triton = stack.enter_context(common.triton_server(work))
        kafka = (stack.enter_context(common.KafkaBroker(work / "kafka"))
                 if args.sink == "kafka" else None)
        gateways = []
        try:
            for name, server, tree in variants:
                config = common.gateway_config(
                    triton.url, work, name, routes, sink=args.sink,
                    kafka_bootstrap=kafka.bootstrap if kafka else None)
                if server:  # none: a tree from before `listen.server` existed
                    text = config.read_text().replace("listen:\n",
                                                      f"listen:\n  server: {server}\n")
                    config.write_text(text)
                gw = common.Gateway(config, root=tree, log_file=work / f"{name}.log").start()
                gw.warm(ROUTE, body, 200)
                gateways.append((name, gw))
            for round_no in range(args.rounds):
                order = gateways if round_no % 2 == 0 else gateways[::-1]
                for kind in ("capacity", "rate"):
                    for name, gw in order:
                        m = _measure(gw, f"{gw.url}/v2/models/{ROUTE}/infer", body_file, body,
                                     kind, args)
                        results[name][kind].append(m)
                        print(f"round {round_no} {kind:8} {name:10} {json.dumps(m)}",
                              flush=True)
        finally:
            for _, gw in gateways:
                gw.stop()
    summary: dict[str, Any] = {}
    base = variants[0][0]
    for name, kinds in results.items():
        summary[name] = {kind: {key: statistics.median(m[key] for m in runs)
                                for key in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
                         for kind, runs in kinds.items()}
    print(f"\nmedians over {args.rounds} rounds (ratios vs {base}):")
    for name, kinds in summary.items():
        cap, rate = kinds["capacity"], kinds["rate"]
        b_cap, b_rate = summary[base]["capacity"], summary[base]["rate"]
        print(f"  {name:10} capacity {cap['rps']:7.0f} req/s (x{cap['rps'] / b_cap['rps']:.2f}) "
              f"cpu {cap['cpu_ms']:.3f} ms/req (x{cap['cpu_ms'] / b_cap['cpu_ms']:.2f}) | "
              f"@{args.rate:g}/s cpu {rate['cpu_ms']:.3f} ms/req "
              f"(x{rate['cpu_ms'] / b_rate['cpu_ms']:.2f}) p50 {rate['p50_ms']:.2f} "
              f"p99 {rate['p99_ms']:.2f} ms")
    (args.out / "results.json").write_text(json.dumps({"runs": results, "summary": summary},
                                                      indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
