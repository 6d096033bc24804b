"""Where a proxy's CPU per request goes, user vs kernel, at fixed offered rates: gateway vs nginx.

    python loadtests/cpu_split.py [--rates 250,1000,2000] [--shadows 1] [--rounds 2]
                                  [--tree NAME=PATH] ... [--python NAME=EXE] ... [--seconds 5]
                                  [--together] [--no-nginx] [--floor]

Starts Triton once, nginx with `mirror` (the peer of docs/BENCHMARKS.md) and one gateway per
`--tree` (default: this checkout) with champion fraud_v3, N shadows and the file log. For each
round, for each rate, for each proxy in turn (alternating order between rounds), it offers that
rate (wrk, Poisson arrivals) and reads, over the middle `--seconds` of the run, from /proc of
every thread of the proxy's processes:

- CPU ms per request (schedstat, exact), split into user and kernel (utime/stime: tick-sampled,
  so read the split as shares, not to the microsecond);
- context switches per request (voluntary + involuntary: each voluntary one is a sleep in
  epoll or a lock, i.e. one wake-up);
- the same for the processes' main threads alone (a gateway's event loop; the rest is its
  helper threads, e.g. the file sink's writer);
- for each gateway, the share of its shadow copies not answered over the same window (shed,
  timed out, failed; from its /metrics): CPU per request compares like with like only while
  that is ~0, since nginx's mirror sends every copy and a gateway that sheds does less work.

Why: bench.py reports the gateway's CPU per request against nginx's. This says which side of
the system-call boundary the difference is on, and how both move with the rate (fewer requests
per wake-up at a low rate make every request dearer for both). Medians over the rounds, and
each proxy's ratio to the first one (nginx, or with --no-nginx the first tree) round by round.

`--together` offers the rate to every proxy at once (one wrk each) so that all of them are
measured over the same window: on a shared VM, CPU per request of one proxy moves 5-10% between
adjacent windows, which hides a change of that size; measured together, what slows the machine
slows all of them alike. Use it to A/B two trees (`--no-nginx --tree a=... --tree b=...`); the
machine then carries every proxy's load at once, so keep rate x proxies well below capacity.
`--python` runs a tree's gateway on another interpreter (its environment needs the gateway's
dependencies), e.g. one tree twice: `--tree venv=. --tree opt=. --python opt=<other python>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common

TICK_MS = 1000 / 100  # utime/stime are in clock ticks (USER_HZ, 100 on Linux)


@dataclass
class Counters:
    """Cumulative counters of every thread of some processes."""

    cpu_ms: float = 0.0
    user_ms: float = 0.0
    sys_ms: float = 0.0
    switches: int = 0
    # the processes' main threads only: a single-worker gateway's event loop (with --workers N
    # also the idle parent's), every nginx process
    main_ms: float = 0.0
    main_switches: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.cpu_ms - other.cpu_ms, self.user_ms - other.user_ms,
                        self.sys_ms - other.sys_ms, self.switches - other.switches,
                        self.main_ms - other.main_ms, self.main_switches - other.main_switches)


def read_counters(pids: Sequence[int]) -> Counters:
    total = Counters()
    for task in common.threads(pids):
        try:
            run = int((task / "schedstat").read_text().split()[0])
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if "ctxt_switches:" in line)  # voluntary_ and nonvoluntary_
        total.cpu_ms += run / 1e6
        total.user_ms += int(fields[11]) * TICK_MS
        total.sys_ms += int(fields[12]) * TICK_MS
        total.switches += switches
        if task.name == task.parent.parent.name:  # /proc/PID/task/PID: the main thread
            total.main_ms += run / 1e6
            total.main_switches += switches
    return total


def measure(proxies: Sequence[tuple[str, str, Sequence[int]]], body_file: Path,
            body: common.Body, rate: float, seconds: float, load_cpus: str | None,
            gateways: Mapping[str, str] | None = None) -> list[dict[str, float]]:
    """Offer `rate` to every proxy (name, url, pids) at once, one wrk each, for seconds + 4 s;
    count the middle `seconds` (wrk's ramp-up and tail out), the same window for all of them:
    what slows the machine down then slows them alike.

    `gateways` (proxy name -> the gateway's base url): those proxies' rows also get
    `copies_lost`, the share of shadow copies decided on in the window that were not answered
    (shed, timed out, failed). CPU per request compares like with like only while it is ~0: a
    gateway that sheds copies does less work per request."""
    urls = [url for _, url, _ in proxies]
    names = {name for name, _, _ in proxies}
    gateways = {name: url for name, url in (gateways or {}).items() if name in names}
    with common.wrk_rates_at_once(urls, body_file, body, rate=rate, duration=seconds + 4,
                                  cpus=load_cpus) as loads:
        time.sleep(2)
        copies = {name: shadow_totals(url) for name, url in gateways.items()}
        before = [read_counters(pids) for _, _, pids in proxies]
        started = time.monotonic()
        time.sleep(seconds)
        deltas = [read_counters(pids) - b
                  for (_, _, pids), b in zip(proxies, before, strict=True)]
        elapsed = time.monotonic() - started
        lost = {name: lost_share(copies[name], shadow_totals(url))
                for name, url in gateways.items()}
    rows = [_per_request(rate, load, delta, elapsed)
            for load, delta in zip(loads, deltas, strict=True)]
    for (name, _, _), row in zip(proxies, rows, strict=True):
        if name in lost:
            row["copies_lost"] = lost[name]
    return rows


def _per_request(rate: float, load: common.LoadResult, delta: Counters, elapsed: float
                 ) -> dict[str, float]:
    served = load.rps * elapsed
    return {
        "rate": rate,
        "rps": load.rps,
        "cpu_ms": delta.cpu_ms / served,
        "user_ms": delta.user_ms / served,
        "sys_ms": delta.sys_ms / served,
        "switches": delta.switches / served,
        "main_ms": delta.main_ms / served,
        "other_ms": (delta.cpu_ms - delta.main_ms) / served,
        "main_switches": delta.main_switches / served,
        "errors": load.errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="250,1000,2000")
    parser.add_argument("--shadows", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--tree", action="append", default=[],
                        help="NAME=PATH: a gateway checkout to measure (repeatable)")
    parser.add_argument("--python", action="append", default=[],
                        help="NAME=EXE: the interpreter running tree NAME's gateway (default: "
                             "this one); e.g. the same tree on two builds of Python")
    parser.add_argument("--load-cpus", default="1", help="taskset CPUs for wrk ('' = no pin)")
    parser.add_argument("--together", action="store_true",
                        help="offer the rate to every proxy at the same time (one wrk each) and "
                             "compare them per round: ratios to the first proxy, with their "
                             "spread; mind that the machine carries all of them at once")
    parser.add_argument("--no-nginx", action="store_true", help="gateways only")
    parser.add_argument("--floor", action="store_true",
                        help="also measure loadtests/floor_proxy.py (the least Python doing the "
                             "same core work) as proxy 'floor'")
    parser.add_argument("--out", type=Path, default=common.ROOT / "var" / "bench" / "cpu_split")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    trees = [(n, Path(p).resolve()) for n, _, p in (t.partition("=") for t in args.tree)] or [
        ("gateway", common.ROOT)]
    pythons = dict(p.partition("=")[::2] for p in args.python)
    out: Path = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    x, _ = common.fraud_rows(1)
    body = common.json_body(x[0])
    body_file = common.write_body(body, work / "body.json")
    routes = common.fraud_route(args.shadows)
    load_cpus = args.load_cpus or None
    rows: list[dict[str, Any]] = []
    with common.triton_server(work) as triton:
        upstream = triton.url.split("//", 1)[1]
        proxies: list[tuple[str, str, list[int]]] = []
        with common.Nginx(work / "nginx", upstream) as nginx, contextlib.ExitStack() as stack:
            gateways = []
            bases: dict[str, str] = {}  # gateway name -> its base url, for its shadow counts
            try:
                for name, tree in trees:
                    config = common.gateway_config(triton.url, work, name, routes)
                    gw = common.Gateway(config, log_file=work / f"{name}.log", root=tree,
                                        python=pythons.get(name, sys.executable)).start()
                    gateways.append(gw)
                    gw.warm("fraud", body, 50)
                    proxies.append((name, gw.url + "/v2/models/fraud/infer", gw.pids))
                    bases[name] = gw.url
                if args.floor:
                    floor = start_floor(work, upstream)
                    stack.callback(common.stop_process, floor.proc)
                    proxies.append(("floor", floor.url, common.process_tree(floor.proc.pid)))
                if not args.no_nginx:
                    proxies.insert(0, ("nginx mirror", nginx.url + "/v2/models/fraud/infer",
                                       common.process_tree(nginx.proc.pid) if nginx.proc
                                       else []))
                for _name, url, _ in proxies:  # warm every path before measuring
                    common.wrk(url, body_file, body, duration=2, cpus=load_cpus)
                for rnd in range(args.rounds):
                    order = proxies if rnd % 2 == 0 else proxies[::-1]
                    for rate in rates:
                        if args.together:
                            measured = measure(order, body_file, body, rate, args.seconds,
                                               load_cpus, bases)
                        else:
                            measured = [measure([proxy], body_file, body, rate, args.seconds,
                                                load_cpus, bases)[0] for proxy in order]
                        for (name, _, _), values in zip(order, measured, strict=True):
                            row = {"round": rnd, "proxy": name, **values}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
            finally:
                for gw in gateways:
                    gw.stop()
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\nmedians over rounds (ms of CPU per request served; switches per request):")
    print("| proxy | offered req/s | served req/s | CPU ms/req | user | kernel | switches/req "
          "| main thread ms/req (switches) | other threads ms/req | copies not answered |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        for name, _, _ in proxies:
            mine = [r for r in rows if r["proxy"] == name and r["rate"] == rate]

            def med(key: str, mine: list[dict[str, Any]] = mine) -> float:
                return statistics.median(r[key] for r in mine)

            print(f"| {name} | {rate:,.0f} | {med('rps'):,.0f} | {med('cpu_ms'):.3f} | "
                  f"{med('user_ms'):.3f} | {med('sys_ms'):.3f} | {med('switches'):.2f} | "
                  f"{med('main_ms'):.3f} ({med('main_switches'):.2f}) | "
                  f"{med('other_ms'):.3f} | {worst_lost(mine)} |")
    print_ratios(rows, rates, [name for name, _, _ in proxies])
    return 0


@dataclass
class Floor:
    proc: subprocess.Popen[bytes]
    url: str


def start_floor(work: Path, upstream: str) -> Floor:
    """loadtests/floor_proxy.py in front of Triton (`upstream`: host:port), logging under
    `work`; its inference url once it answers."""
    port = common.free_port()
    log = work / "floor-log.jsonl"
    log.unlink(missing_ok=True)
    with (work / "floor.err").open("wb") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("floor_proxy.py")), "--port",
             str(port), "--upstream", upstream, "--log", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://{common.HOST}:{port}/v2/models/fraud/infer"
    x, _ = common.fraud_rows(1)
    try:
        common.wait_http(url, 30, proc=proc, body=common.json_body(x[0]))
    except BaseException:
        common.stop_process(proc)
        raise
    return Floor(proc, url)


def shadow_totals(url: str) -> dict[str, float]:
    """The gateway's shadow copies by outcome, summed over its challengers."""
    totals: dict[str, float] = {}
    for outcomes in common.shadow_counts(url).values():
        for outcome, n in outcomes.items():
            totals[outcome] = totals.get(outcome, 0.0) + n
    return totals


def lost_share(before: dict[str, float], after: dict[str, float]) -> float:
    """Of the copies decided on between two readings, the share not answered (shed, timed
    out, failed)."""
    def delta(outcome: str) -> float:
        return after.get(outcome, 0.0) - before.get(outcome, 0.0)

    decided = sum(delta(o) for o in ("ok", "shed", "timeout", "error"))
    return (decided - delta("ok")) / decided if decided else 0.0


def worst_lost(rows: list[dict[str, Any]]) -> str:
    shares = [r["copies_lost"] for r in rows if "copies_lost" in r]
    return f"{max(shares):.1%} (worst round)" if shares else "-"


def print_ratios(rows: list[dict[str, Any]], rates: list[float], names: list[str]) -> None:
    """Each proxy's CPU ms/req over the first proxy's, per round (the two measured in the same
    round: in adjacent windows, or at once with --together), with a 95% interval."""
    base = names[0]
    print(f"\nCPU ms/req ratio to {base}, per round (median; 95% interval of the geometric mean):")
    for rate in rates:
        for name in names[1:]:
            ratios = []
            for rnd in sorted({r["round"] for r in rows}):
                mine = {r["proxy"]: r["cpu_ms"] for r in rows
                        if r["round"] == rnd and r["rate"] == rate}
                if name in mine and mine.get(base):
                    ratios.append(mine[name] / mine[base])
            if not ratios:
                continue
            low, high = common.ratio_interval(ratios)
            print(f"  {name} at {rate:,.0f} req/s: x{statistics.median(ratios):.3f} "
                  f"({low:.3f}-{high:.3f}); rounds "
                  + ", ".join(f"{r:.3f}" for r in ratios))


if __name__ == "__main__":
    sys.exit(main())
