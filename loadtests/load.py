"""Scenario load test: real Triton + the gateway (subprocess) + locust headless, bounded in time.

    python loadtests/load.py [--duration 60] [--users 20] [--spawn-rate 10] [--workers 1]
                             [--sink file|kafka] [--out var/load]

Starts Triton with the demo models on free ports, writes a gateway config (fraud: champion
fraud_v3, fraud_v4 as explore challenger, fraud_v5 as shadow; price: price_v1 with price_v2 as
shadow), starts `python -m gateway serve`, runs loadtests/locustfile.py headless, saves locust's
CSV and HTML under --out, prints the summary and the number of inference/label records the
gateway logged, and stops everything it started. With --sink kafka a broker is started with
devtools/kafka_broker.py (when gateway/backends/kafka_sink.py exists). Exit status 1 if any request
failed.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common

LOCUSTFILE = common.LOADTESTS / "locustfile.py"


def load_routes(explore: bool = True) -> dict[str, Any]:
    return {
        "fraud": {
            "champion": {"model": "fraud_v3"},
            "challengers": [
                {"model": "fraud_v4", "mode": "explore" if explore else "shadow",
                 "sample_rate": 1.0},
                {"model": "fraud_v5", "mode": "shadow", "sample_rate": 1.0},
            ],
            "policy": {"type": "champion"},
            "task": "classification",
        },
        "price": {
            "champion": {"model": "price_v1"},
            "challengers": [{"model": "price_v2", "mode": "shadow", "sample_rate": 1.0}],
            "task": "regression",
        },
    }


def run_locust(url: str, out: Path, *, duration: float, users: int, spawn_rate: float,
               env: dict[str, str] | None = None, html: bool = True,
               cpus: str | None = None) -> dict[str, Any]:
    """Run the locustfile headless against `url`; return the 'Aggregated' row and per-name rows."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    cmd = [*common.pin(cpus), sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
           "--headless", "-H", url, "-u", str(users), "-r", str(spawn_rate),
           "-t", f"{max(1, round(duration))}s", "--stop-timeout", "10", "--csv", str(prefix),
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    if html:
        cmd += ["--html", str(out / "locust.html")]
    run_env = {**os.environ, **(env or {})}
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT),
                                                          run_env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=common.ROOT, env=run_env, capture_output=True, text=True,
                          timeout=duration + 120, check=False)
    (out / "locust.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"locust exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return read_stats(prefix.with_name(prefix.name + "_stats.csv"))


def read_stats(path: Path) -> dict[str, Any]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_name = {f"{r['Type']} {r['Name']}".strip(): r for r in rows}
    aggregated = next(r for r in rows if r["Name"] == "Aggregated")
    return {"aggregated": aggregated, "rows": by_name, "path": str(path)}


def summary_table(stats: dict[str, Any]) -> str:
    cols = ("Request Count", "Failure Count", "Requests/s", "50%", "90%", "99%",
            "Max Response Time")
    lines = [f"{'name':<34}" + "".join(f"{c[:12]:>13}" for c in cols)]
    for name, row in stats["rows"].items():
        lines.append(f"{name[:34]:<34}" + "".join(f"{_fmt(row.get(c)):>13}" for c in cols))
    return "\n".join(lines)


def _fmt(value: str | None) -> str:
    if value in (None, "", "N/A"):
        return "-"
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.1f}" if not number.is_integer() else str(int(number))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float,
                        default=float(os.environ.get("LOAD_DURATION", "60")))
    parser.add_argument("--users", type=int, default=int(os.environ.get("LOAD_USERS", "20")))
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--sink", choices=("file", "kafka"), default="file")
    parser.add_argument("--out", type=Path, default=common.ROOT / "var" / "load")
    args = parser.parse_args(argv)

    out: Path = args.out.resolve()
    work = out / "work"
    if work.exists():  # a previous run's logs would be counted as this run's records
        shutil.rmtree(work)
    work.mkdir(parents=True)
    broker = None
    bootstrap = None
    try:
        if args.sink == "kafka":
            ok, why = common.kafka_available()
            if not ok:
                print(f"--sink kafka unavailable: {why}", file=sys.stderr)
                return 2
            broker = common.KafkaBroker(work / "kafka").start()
            bootstrap = broker.bootstrap
        with common.triton_server(work) as triton:
            print(f"Triton {triton.url} ready in {triton.startup_seconds:.1f} s", flush=True)
            config = common.gateway_config(triton.url, work, "load", load_routes(),
                                           sink=args.sink, kafka_bootstrap=bootstrap)
            gateway = common.Gateway(config, workers=args.workers, log_file=out / "gateway.log")
            with gateway:
                print(f"gateway {gateway.url} ({args.workers} worker(s), {args.sink} sink); "
                      f"locust {args.users} users for {args.duration:.0f} s", flush=True)
                started = time.monotonic()
                stats = run_locust(gateway.url, out, duration=args.duration, users=args.users,
                                   spawn_rate=args.spawn_rate)
                elapsed = time.monotonic() - started
            # the gateway has drained and flushed on SIGTERM: count what it logged
            if bootstrap:
                records = {s: common.kafka_count(bootstrap, f"understudy.bench.load.{s}")
                           for s in ("inferences", "labels")}
                where = f"Kafka topics understudy.bench.load.* on {bootstrap}"
            else:
                records = {s: common.count_records(work / "log-load", s)
                           for s in ("inferences", "labels")}
                where = str(work / "log-load")
    finally:
        if broker is not None:
            broker.stop()
    agg = stats["aggregated"]
    print(f"\nlocust summary ({elapsed:.0f} s, stats: {stats['path']}, "
          f"report: {out / 'locust.html'})")
    print(summary_table(stats))
    print(f"\ngateway logged {records['inferences']} inference and {records['labels']} "
          f"label records ({where})")
    failures = int(agg["Failure Count"])
    print(f"\n{agg['Request Count']} requests, {failures} failures, "
          f"{float(agg['Requests/s']):.0f} req/s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
