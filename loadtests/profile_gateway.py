"""Profile the gateway under load with py-spy and list its hot spots.

    python loadtests/profile_gateway.py [--seconds 20] [--shadows 1] [--sink file]
                                        [--binary] [--rows 1] [--rate R] [--connections N]
                                        [--gateway-python EXE] [--out var/bench/profile]

Starts Triton and one gateway worker (champion fraud_v3 + N shadows, 100% logging), drives it
with wrk at capacity (16 connections, JSON body), or with `--rate R` at R requests/s (Poisson
arrivals, as bench.py's fixed rates: where fewer requests share a wake-up, and where the CPU
target is defined), and samples the gateway with
`py-spy record --nonblocking --format raw` (collapsed stacks; idle time excluded, so the shares
are shares of the gateway's CPU time). Writes the raw stacks, a speedscope-free text report
(`hotspots.txt`: top functions by self time and by inclusive time, and the gateway's own
functions), and prints it. `summarize()` is reused by loadtests/bench.py.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy") or (
        str(Path(sys.executable).with_name("py-spy"))
        if Path(sys.executable).with_name("py-spy").exists() else None
    )


def short_file(path: str) -> str:
    """Site-packages and repo paths shortened to package-relative ones."""
    for marker in ("site-packages/", "/lib/python3.11/", str(common.ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse_frame(frame: str) -> tuple[str, str, str]:
    m = FRAME.match(frame.strip())
    if not m:
        return frame, "", ""
    return m["func"], short_file(m["file"]), m["line"] or ""


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample counts per function (file:function) from py-spy raw output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    line_self: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [parse_frame(f) for f in stack.split(";") if f]
        # thread names come first in raw output when present ("thread (0x...)"): skip them
        frames = [f for f in frames if f[1]]
        if not frames:
            continue
        func, file, lineno = frames[-1]
        self_counts[f"{file}:{func}"] += count
        line_self[f"{file}:{lineno} {func}"] += count
        for key in {f"{f[1]}:{f[0]}" for f in frames}:
            incl_counts[key] += count
    gateway_incl = collections.Counter(
        {k: v for k, v in incl_counts.items() if k.startswith("gateway/")}
    )

    def rows(counter: collections.Counter[str]) -> list[tuple[str, int, float]]:
        return [(k, v, 100.0 * v / total if total else 0.0) for k, v in counter.most_common(top)]

    return {
        "total_samples": total,
        "self": rows(self_counts),
        "inclusive": rows(incl_counts),
        "gateway": rows(gateway_incl),
        "lines": rows(line_self),
    }


def report_text(summary: dict[str, Any]) -> str:
    out = [f"samples: {summary['total_samples']} (CPU samples of the gateway process)"]
    for title, key in (("top self time (where the CPU is)", "self"),
                       ("top inclusive time", "inclusive"),
                       ("gateway functions, inclusive", "gateway"),
                       ("top self time by line", "lines")):
        out.append(f"\n## {title}")
        out.extend(f"{pct:6.1f}%  {n:7d}  {name}" for name, n, pct in summary[key])
    return "\n".join(out)


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> Path:
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw = out / "pyspy.raw.txt"
    subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(round(seconds)),
                    "--rate", str(rate), "--format", "raw", "--nonblocking",
                    "--output", str(raw)], check=True, capture_output=True,
                   timeout=seconds + 60)
    return raw


def profile_gateway(gateway: common.Gateway, url: str, body_file: Path, body: common.Body, *,
                    seconds: float, out: Path, connections: int = 16,
                    cpus: str | None = None, rate: float = 0.0,
                    ) -> tuple[dict[str, Any], common.LoadResult]:
    """Drive `url` with wrk (closed loop, or `rate` req/s when set) while py-spy samples the
    gateway's (single) process."""
    out.mkdir(parents=True, exist_ok=True)
    assert gateway.proc is not None
    result: dict[str, common.LoadResult] = {}

    def load() -> None:
        if rate:
            result["wrk"] = common.wrk_rate(url, body_file, body, rate=rate,
                                            duration=seconds + 2, connections=connections,
                                            cpus=cpus)
        else:
            result["wrk"] = common.wrk(url, body_file, body, duration=seconds + 2,
                                       connections=connections, cpus=cpus)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        raw = record(gateway.proc.pid, seconds, out)
    finally:
        thread.join()
    summary = summarize(raw)
    (out / "hotspots.txt").write_text(report_text(summary) + "\n")
    return summary, result["wrk"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--shadows", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--sink", choices=("file", "kafka"), default="file")
    parser.add_argument("--binary", action="store_true", help="binary tensors instead of JSON")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (batch size)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPUs for wrk ('' = no pin)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offered req/s (Poisson); default: capacity (closed loop)")
    parser.add_argument("--connections", type=int, default=None,
                        help="wrk connections (default: 16 at capacity, 32 with --rate)")
    parser.add_argument("--out", type=Path, default=common.ROOT / "var" / "bench" / "profile")
    parser.add_argument("--root", type=Path, default=common.ROOT,
                        help="run the gateway of a copy of the tree (to profile a prototype)")
    parser.add_argument("--gateway-python", default=sys.executable,
                        help="the interpreter that runs the gateway (as bench.py's option)")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    x, _ = common.fraud_rows(args.rows)
    rows = x[0] if args.rows == 1 else x
    body = common.binary_body(rows) if args.binary else common.json_body(rows)
    body_file = common.write_body(body, work / ("body.bin" if args.binary else "body.json"))
    routes = common.fraud_route(args.shadows)
    broker = None
    try:
        bootstrap = None
        if args.sink == "kafka":
            broker = common.KafkaBroker(work / "kafka").start()
            bootstrap = broker.bootstrap
        with common.triton_server(work) as triton:
            config = common.gateway_config(triton.url, work, "profile", routes, sink=args.sink,
                                           kafka_bootstrap=bootstrap)
            with common.Gateway(config, log_file=work / "gateway.log",
                                root=args.root.resolve(),
                                python=args.gateway_python) as gateway:
                gateway.warm("fraud", body, 50)
                url = gateway.url + "/v2/models/fraud/infer"
                common.wrk(url, body_file, body, duration=3, cpus=args.load_cpus or None)
                connections = args.connections or (32 if args.rate else 16)
                summary, load = profile_gateway(gateway, url, body_file, body,
                                                seconds=args.seconds, out=out,
                                                connections=connections,
                                                cpus=args.load_cpus or None, rate=args.rate)
    finally:
        if broker is not None:
            broker.stop()
    print(f"load during profile: {load.rps:.0f} req/s, p50 {load.p50:.2f} ms, "
          f"p99 {load.p99:.2f} ms, errors {load.errors}")
    print(report_text(summary))
    print(f"\nraw stacks: {out / 'pyspy.raw.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
