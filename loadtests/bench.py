"""The gateway benchmark: one run, one machine, real Triton, real load generators.

    python loadtests/bench.py [--duration 8] [--rate-duration 8] [--overload-seconds 120]
                              [--quick] [--no-kafka] [--no-profile] [--no-workers]
                              [--load-cpus 1] [--out var/bench] [--md docs/BENCHMARKS.md]

`make bench` runs it with the defaults (~22 minutes; 20 with `--overload-seconds 30`);
`--quick` takes ~4.

What it measures (JSON request of one fraud row, route "fraud", champion fraud_v3):

1. Capacity: `wrk -t1 -c16` (closed loop, keep-alive) for --duration s: throughput and
   p50/p99 at saturation. The first run, direct Triton, defines the capacity C.
2. Latency at fixed offered rates (Poisson arrivals, loadtests/post.lua with a RATE on wrk, 32
   connections, --rate-duration s each): "moderate" R = 30% of C (the spec's moderate load) and
   "light" = 10% of C (a rate a single Python worker sustains on this machine, so the added
   latency is the gateway's overhead rather than queueing): p50/p90/p99.
   All three for: direct Triton; nginx `mirror` in front of the same Triton (and nginx as a plain
   proxy); the gateway champion-only, + one shadow, + two shadows, + exploration
   (epsilon_greedy, epsilon 0.1, fraud_v4 as explore arm) with the file sink, and the same four
   with the Kafka sink when gateway/backends/kafka_sink.py and devtools/kafka_broker.py are present;
   champion-only and + one shadow with `--workers 2`; champion-only with binary tensors.
   Gateway rows also report the gateway's CPU time per request (from /proc, robust to other
   load on the machine) and check that every served request was logged.
3. Added latency side by side: each gateway (champion only, + 1 shadow) and direct Triton
   offered the light rate at the same time (one wrk each), added = gateway minus direct in the
   same window; --latency-rounds rounds of --latency-seconds s, and direct vs direct (A/A):
   medians and 95% intervals (the latency target's numbers, with their uncertainty).
4. CPU per request side by side: gateway + 1 shadow and the nginx mirror offered the same rate
   at the same time (--paired-rounds rounds at the moderate and light rates, capped at
   --paired-max-load of the gateway's + 1 shadow capacity, then lowered until the machine
   carries both in full with every shadow copy answered, so the two do the same work):
   per-round ratios, median and 95% interval (the CPU target's number, with its uncertainty).
5. Capacity in alternating rounds: the nginx mirror (as shipped and kept alive) and the
   gateway + 1 shadow (file log; Kafka log when a broker can run) take turns closed loop,
   --capacity-rounds rounds of --capacity-seconds s, order reversed every round: per-round
   capacity ratios, median and 95% interval (the capacity targets' numbers, with their
   uncertainty; the rows of 1. measure each setup once, minutes apart).
6. Slow challenger: does a shadow whose every batch sleeps 100x the champion's direct p50
   (`fraud_slow`) move the champion's p99? Two identical gateways take the light rate (--slow-at;
   capped at --slow-max-load of the gateway's champion-only capacity) at the same time, one
   carrying the shadow (admin API; the carrier alternates between rounds); the same for a
   normal-speed shadow and for no shadow at all (A/A: the noise floor). --slow-rounds rounds of
   --slow-duration s; medians of the per-round p99 ratios, and the gateways' CPU per request.
7. Memory under overload: the gateway with one normal and one slow shadow, offered 2x its
   capacity (512 connections) for --overload-seconds; RSS sampled every second.
8. A py-spy profile of the gateway (+ one shadow) at capacity (loadtests/profile_gateway.py).

Everything is printed and written to <out>/results.json and into docs/BENCHMARKS.md between
the `understudy-bench` markers (other sections of that file are left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common, cpu_split, profile_gateway
from loadtests.docblock import write_marked_block
from understudy.client import AdminClient
from understudy.settings import ADMIN_TOKEN_ENV

ROUTE = "fraud"
WARM_REQUESTS = 20
CHAMPION = "fraud_v3"
# Phase paired: a rate is carried when both proxies serve this share of it and the gateway
# leaves at most this share of its shadow copies unanswered.
PAIRED_MIN_SERVED = 0.97
PAIRED_MAX_LOST = 0.005
PAIRED_CALIBRATION_STEPS = 5
PHASES = ("nginx", "gateway", "kafka", "workers", "binary", "latency", "paired", "capacity",
          "slow", "overload", "profile")
# Phase latency: the gateways whose added latency is measured side by side with direct Triton.
LATENCY_SCENARIOS = ("champion", "shadow1")
# Phase capacity: each gateway compared with each nginx mirror, (label, gateway, nginx).
CAPACITY_PAIRS = (("file log / mirror kept alive", "gateway-file", "nginx-kept"),
                  ("file log / mirror as shipped", "gateway-file", "nginx-mirror"),
                  ("Kafka log / mirror kept alive", "gateway-kafka", "nginx-kept"),
                  ("Kafka log / mirror as shipped", "gateway-kafka", "nginx-mirror"))
BEGIN = "<!-- understudy-bench:begin (generated by loadtests/bench.py; edit outside) -->"
END = "<!-- understudy-bench:end -->"


# --- scenario definitions ------------------------------------------------------------------


def fraud_route(shadows: tuple[str, ...] = (), explore: str | None = None,
                epsilon: float = 0.1) -> dict[str, Any]:
    challengers: list[dict[str, Any]] = [
        {"model": m, "mode": "shadow", "sample_rate": 1.0} for m in shadows
    ]
    policy: dict[str, Any] = {"type": "champion"}
    if explore:
        challengers.append({"model": explore, "mode": "explore"})
        policy = {"type": "epsilon_greedy", "epsilon": epsilon}
    return {ROUTE: {"champion": {"model": CHAMPION}, "challengers": challengers,
                    "policy": policy, "task": "classification"}}


GATEWAY_SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "champion": ("gateway, champion only", fraud_route()),
    "shadow1": ("gateway + 1 shadow", fraud_route(("fraud_v4",))),
    "shadow2": ("gateway + 2 shadows", fraud_route(("fraud_v4", "fraud_v5"))),
    "explore": ("gateway + exploration (eps 0.1)", fraud_route(explore="fraud_v4")),
}


@dataclass
class Row:
    key: str
    label: str
    group: str
    capacity: common.LoadResult | None = None
    moderate: common.LoadResult | None = None
    light: common.LoadResult | None = None
    warmup: common.LoadResult | None = None
    cpu_ms_per_req: float | None = None
    # CPU ms/req during the fixed-rate runs: the issue-15 target is CPU at a moderate rate,
    # where fewer requests share each wake-up and write than at capacity
    moderate_cpu_ms: float | None = None
    light_cpu_ms: float | None = None
    busy_pct: float | None = None   # CPU time of the gateway (or nginx) / wall time, capacity run
    starved_pct: float | None = None  # its run-queue wait / wall time (CPU taken by others)
    triton_cpu_ms_per_req: float | None = None
    logged: int | None = None
    served: int | None = None
    shadow: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["capacity"] = self.capacity.as_dict() if self.capacity else None
        d["moderate"] = self.moderate.as_dict() if self.moderate else None
        d["light"] = self.light.as_dict() if self.light else None
        d["warmup"] = self.warmup.as_dict() if self.warmup else None
        return d


# --- the run -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out.resolve()
        self.work = self.out / "work"
        if self.work.exists():  # logs of an earlier run would be counted as this run's records
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.rows: list[Row] = []
        self.extra: dict[str, Any] = {}
        self.load_cpus: str | None = args.load_cpus or None
        self.rate = 0.0
        self.light_rate = 0.0
        self.triton: Any = None
        self.repo: Path | None = None
        self.kafka: common.KafkaBroker | None = None
        x, _ = common.fraud_rows(1)
        self.body = common.json_body(x[0])
        self.body_bin = common.binary_body(x[0])
        self.body_file = common.write_body(self.body, self.work / "body.json")
        self.body_bin_file = common.write_body(self.body_bin, self.work / "body.bin")
        self.started = time.monotonic()
        self.loadavg: list[tuple[str, str]] = []

    # -- helpers ---------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.0f}s] {msg}", flush=True)

    def failed(self, result: dict[str, Any], what: str, exc: Exception) -> dict[str, Any]:
        """A phase that could not finish: its error in its result (the report says so)."""
        result["error"] = f"{type(exc).__name__}: {exc}"
        self.log(f"{what} FAILED: {result['error']}")
        return result

    def note_load(self, when: str) -> None:
        with contextlib.suppress(OSError):
            self.loadavg.append((when, " ".join(Path("/proc/loadavg").read_text().split()[:3])))

    def measure(self, row: Row, url: str, *, body: common.Body | None = None,
                body_file: Path | None = None, cpu_pids: Callable[[], list[int]] | None = None,
                ) -> Row:
        """Warm up, then a capacity run and a fixed-rate run against `url`."""
        body = body or self.body
        body_file = body_file or self.body_file
        a = self.args
        row.warmup = common.wrk(url, body_file, body, duration=a.warmup, cpus=self.load_cpus)
        pids = cpu_pids() if cpu_pids else []
        triton_pids = common.process_tree(self.triton.pid)
        (cpu0, wait0), tcpu0 = common.schedstat(pids), common.schedstat(triton_pids)[0]
        row.capacity = common.wrk(url, body_file, body, duration=a.duration,
                                  connections=a.connections, cpus=self.load_cpus)
        (cpu1, wait1), tcpu1 = common.schedstat(pids), common.schedstat(triton_pids)[0]
        if row.capacity.requests:
            if pids:
                row.cpu_ms_per_req = 1000 * (cpu1 - cpu0) / row.capacity.requests
                row.busy_pct = 100 * (cpu1 - cpu0) / row.capacity.seconds
                row.starved_pct = 100 * (wait1 - wait0) / row.capacity.seconds
            row.triton_cpu_ms_per_req = 1000 * (tcpu1 - tcpu0) / row.capacity.requests
        self.fixed_rates(row, url, body, body_file, cpu_pids=pids)
        self.log(f"{row.label}: capacity {row.capacity.rps:,.0f} req/s "
                 f"(p50 {row.capacity.p50:.2f} ms, p99 {row.capacity.p99:.2f} ms)"
                 + "".join(f"; at {r.target_rps:,.0f} req/s p50 {r.p50:.2f} p99 {r.p99:.2f} ms"
                           for r in (row.moderate, row.light) if r is not None)
                 + (f"; CPU {row.cpu_ms_per_req:.3f} ms/req" if row.cpu_ms_per_req else ""))
        return row

    def fixed_rates(self, row: Row, url: str, body: common.Body, body_file: Path,
                    cpu_pids: list[int] | None = None) -> None:
        a = self.args
        for attr, rate in (("moderate", self.rate), ("light", self.light_rate)):
            if rate:
                time.sleep(1)
                cpu0 = common.schedstat(cpu_pids)[0] if cpu_pids else 0.0
                result = common.wrk_rate(url, body_file, body, rate=rate,
                                         duration=a.rate_duration,
                                         connections=a.rate_connections, cpus=self.load_cpus)
                setattr(row, attr, result)
                if cpu_pids and result.requests:
                    cpu_ms = 1000 * (common.schedstat(cpu_pids)[0] - cpu0) / result.requests
                    setattr(row, f"{attr}_cpu_ms", cpu_ms)

    def run_row(self, row: Row, fn: Callable[[Row], None]) -> Row:
        self.rows.append(row)
        try:
            fn(row)
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            self.log(f"{row.label}: FAILED {row.error}")
            traceback.print_exc()
        return row

    @contextlib.contextmanager
    def gateway(self, name: str, routes: Mapping[str, Any], *, sink: str = "file",
                workers: int = 1, root: Path | None = None,
                env: Mapping[str, str] | None = None) -> Iterator[common.Gateway]:
        bootstrap = self.kafka.bootstrap if (sink == "kafka" and self.kafka) else None
        config = common.gateway_config(self.triton.url, self.work, name, routes, sink=sink,
                                       kafka_bootstrap=bootstrap)
        gw = common.Gateway(config, workers=workers, log_file=self.work / f"gateway-{name}.log",
                            root=root or common.ROOT, env=env or {},
                            python=self.args.gateway_python)
        with gw:
            gw.warm(ROUTE, self.body, WARM_REQUESTS)
            yield gw

    def gateway_row(self, key: str, label: str, routes: Mapping[str, Any], *,
                    sink: str = "file", workers: int = 1, binary: bool = False,
                    group: str = "gateway", root: Path | None = None) -> Row:
        name = f"{key}-{sink}-w{workers}" + ("-bin" if binary else "") + (
            f"-{root.name}" if root else "")

        def run(row: Row) -> None:
            with self.gateway(name, routes, sink=sink, workers=workers, root=root) as gw:
                self.measure(row, gw.url + f"/v2/models/{ROUTE}/infer",
                             body=self.body_bin if binary else None,
                             body_file=self.body_bin_file if binary else None,
                             cpu_pids=lambda: gw.pids)
                row.shadow = common.shadow_counts(gw.url)
                row.served = WARM_REQUESTS + sum(
                    int(r.requests) for r in (row.warmup, row.capacity, row.moderate, row.light)
                    if r is not None)
                topic = f"understudy.bench.{name}.inferences"
            # stopped (SIGTERM): shadows drained, sink flushed
            if sink == "file":
                row.logged = common.count_records(self.work / f"log-{name}")
            elif self.kafka:
                row.logged = common.kafka_count(self.kafka.bootstrap, topic)

        return self.run_row(Row(name, label, group), run)

    # -- phases ----------------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        self.note_load("start")
        self.repo = common.prepare_model_repo(self.work)
        with common.triton_server(self.work, [self.repo]) as triton:
            self.triton = triton
            self.log(f"Triton {triton.url} ready in {triton.startup_seconds:.1f} s")
            champion_url = f"{triton.url}/v2/models/{CHAMPION}/infer"

            # 1. direct Triton: defines capacity C and the moderate rate
            direct = Row("direct", "direct Triton", "baseline")
            self.rows.append(direct)
            self.measure(direct, champion_url)
            assert direct.capacity is not None
            self.rate = round(a.rate_fraction * direct.capacity.rps, -1)
            self.light_rate = round(a.light_fraction * direct.capacity.rps, -1)
            self.log(f"fixed rates: moderate {a.rate_fraction:.0%} and light "
                     f"{a.light_fraction:.0%} of {direct.capacity.rps:,.0f} = {self.rate:,.0f} "
                     f"and {self.light_rate:,.0f} req/s")
            self.fixed_rates(direct, champion_url, self.body, self.body_file)
            calm = direct.light or direct.moderate
            assert calm is not None
            self.log("direct Triton: " + "; ".join(
                f"at {r.target_rps:,.0f} req/s p50 {r.p50:.2f} p99 {r.p99:.2f} ms"
                for r in (direct.moderate, direct.light) if r is not None))
            slow_delay = max(a.slow_factor * calm.p50 / 1000, 0.01)
            common.set_slow_delay(self.repo, slow_delay)
            self.extra["slow_delay_ms"] = slow_delay * 1000
            self.extra["champion_p50_ms"] = calm.p50

            for phase in PHASES:
                if phase in a.phases:
                    getattr(self, f"phase_{phase}")()
        self.note_load("end")

    def checkout(self, ref: str) -> Path:
        """The gateway as it was at git `ref`, exported into the work directory."""
        target = self.work / f"before-{ref}"
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(common.ROOT), "archive", ref],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        self.extra["baseline_ref"] = ref
        return target

    # -- phases (--phases picks a subset; direct Triton always runs: it sets the rates) ------

    def phase_nginx(self) -> None:
        """nginx with `mirror` (the peer) and as a plain proxy."""
        upstream = f"{common.HOST}:{self.triton.http_port}"
        with common.Nginx(self.work / "nginx", upstream, champion=CHAMPION,
                          shadow="fraud_v4", route=ROUTE) as nginx:
            self.extra["nginx_version"] = nginx.version()
            self.run_row(Row("nginx-mirror", "nginx mirror (1 mirror)", "baseline"),
                         lambda r: self.measure(r, nginx.url + f"/v2/models/{ROUTE}/infer",
                                                cpu_pids=lambda: nginx_pids(nginx)))
            # nginx's mirror subrequest is header-only: its proxy stops reading the mirror's
            # answer after the header, so that upstream connection closes (strace: ~1 connect
            # per request despite `keepalive`). proxy_store makes it read the whole answer, the
            # one stock way to keep the mirror's connection alive (at a file write per copy).
            self.run_row(Row("nginx-mirror-kept",
                             "nginx mirror, mirror kept alive (proxy_store)", "baseline"),
                         lambda r: self.measure(r, nginx.url + f"/v2/models/{ROUTE}-kept/infer",
                                                cpu_pids=lambda: nginx_pids(nginx)))
            self.run_row(Row("nginx-plain", "nginx proxy (no mirror)", "baseline"),
                         lambda r: self.measure(r, nginx.url + f"/v2/models/{ROUTE}-plain/infer",
                                                cpu_pids=lambda: nginx_pids(nginx)))

    def phase_gateway(self) -> None:
        """Every scenario with the file sink, then (--baseline-ref) the same gateway rows with
        an earlier version of the code: before/after ratios from one run."""
        for key, (label, routes) in GATEWAY_SCENARIOS.items():
            self.gateway_row(key, f"{label} [file log]", routes)
        ref = self.args.baseline_ref
        if ref:
            before = self.checkout(ref)
            for key in ("champion", "shadow1"):
                label, routes = GATEWAY_SCENARIOS[key]
                self.gateway_row(key, f"{label} [file log, before: {ref}]", routes, root=before,
                                 group="before")

    def phase_kafka(self) -> None:
        """Every scenario with the Kafka sink (a real broker on this machine)."""
        ok, why = self.kafka_usable()
        self.extra["kafka"] = "used" if ok else why
        if not ok:
            self.log(f"Kafka rows skipped: {why}")
            return
        try:
            self.kafka = common.KafkaBroker(self.work / "kafka").start()
            self.log(f"Kafka {self.kafka.version} broker on {self.kafka.bootstrap}")
            self.extra["kafka"] = (f"Apache Kafka {self.kafka.version} (KRaft, single node, "
                                   "devtools/kafka_broker.py) on the same machine; sink acks=all, "
                                   "idempotent")
            for key, (label, routes) in GATEWAY_SCENARIOS.items():
                self.gateway_row(key, f"{label} [Kafka log]", routes, sink="kafka",
                                 group="gateway-kafka")
        except Exception as exc:
            self.extra["kafka"] = f"failed: {exc}"
            self.log(f"Kafka rows failed: {exc}")
        finally:
            if self.kafka:
                self.kafka.stop()
                self.kafka = None

    def kafka_usable(self) -> tuple[bool, str]:
        """Can this run start a broker, and if not, why (as the report says it)."""
        if self.args.no_kafka:
            return False, "skipped (--no-kafka)"
        return common.kafka_available()

    def phase_workers(self) -> None:
        if self.args.no_workers:
            return
        for key in ("champion", "shadow1"):
            label, routes = GATEWAY_SCENARIOS[key]
            self.gateway_row(key, f"{label} [file log, --workers 2]", routes, workers=2,
                             group="workers")

    def phase_binary(self) -> None:
        if self.args.quick:
            return
        champion_url = f"{self.triton.url}/v2/models/{CHAMPION}/infer"
        direct_bin = Row("direct-bin", "direct Triton, binary tensors", "binary")
        self.run_row(direct_bin, lambda r: self.measure(
            r, champion_url, body=self.body_bin, body_file=self.body_bin_file))
        self.gateway_row("champion", "gateway, champion only, binary tensors",
                         GATEWAY_SCENARIOS["champion"][1], binary=True, group="binary")

    def phase_latency(self) -> None:
        self.extra["added_latency"] = self.added_latency()

    def added_latency(self) -> dict[str, Any]:
        """The latency target's number with its uncertainty. The rows above take direct Triton
        and each gateway one after the other, minutes apart, at the light rate: between such
        runs this VM's p99 moves by more than the +2 ms the target allows, so a run's verdict
        followed the machine's load. Here each gateway and direct Triton are offered the light
        rate at the same time (one wrk each, same window), and added = gateway minus direct
        in that window; --latency-rounds rounds, the gateways' order alternating, and direct
        vs direct the same way (A/A: the statistic's noise floor). Both share one Triton,
        which then takes twice the rate (plus the copies): what differs between the two sides
        is the gateway's hop, which is what the target is about."""
        a = self.args
        rate = self.light_rate or self.rate
        result: dict[str, Any] = {"rate": rate, "rounds": [], "seconds": a.latency_seconds}
        direct_url = f"{self.triton.url}/v2/models/{CHAMPION}/infer"
        try:
            with contextlib.ExitStack() as stack:
                urls = {}
                for key in LATENCY_SCENARIOS:
                    gw = stack.enter_context(self.gateway(f"latency-{key}",
                                                          GATEWAY_SCENARIOS[key][1]))
                    urls[key] = gw.url + f"/v2/models/{ROUTE}/infer"
                self.paired_rates([direct_url, *urls.values()], rate, max(a.warmup, 2))
                urls["AA"] = direct_url
                kinds = list(urls)
                for i in range(a.latency_rounds):
                    for kind in kinds if i % 2 == 0 else kinds[::-1]:
                        direct, other = self.paired_rates([direct_url, urls[kind]], rate,
                                                          a.latency_seconds)
                        run = {"round": i, "kind": kind, "direct": direct.as_dict(),
                               "other": other.as_dict(), "added_p50": other.p50 - direct.p50,
                               "added_p99": other.p99 - direct.p99}
                        result["rounds"].append(run)
                        self.log(f"  added latency round {i + 1}, {kind}: "
                                 f"{run['added_p50']:+.2f} / {run['added_p99']:+.2f} ms")
        except Exception as exc:
            return self.failed(result, "added latency", exc)
        result["by_kind"] = {}
        for kind in kinds:
            mine = [r for r in result["rounds"] if r["kind"] == kind]
            summary: dict[str, Any] = {"rounds": len(mine), "errors": sum(
                r["direct"]["errors"] + r["other"]["errors"] for r in mine)}
            for q in ("p50", "p99"):
                added = [r[f"added_{q}"] for r in mine]
                summary[q] = statistics.median(added)
                summary[f"{q}_ci"] = list(common.mean_interval(added))
                summary[f"{q}_rounds"] = added
            result["by_kind"][kind] = summary
            self.log(f"added latency, {kind}: p50 {summary['p50']:+.2f} ms "
                     f"({summary['p50_ci'][0]:+.2f}…{summary['p50_ci'][1]:+.2f}), p99 "
                     f"{summary['p99']:+.2f} ms ({summary['p99_ci'][0]:+.2f}…"
                     f"{summary['p99_ci'][1]:+.2f})")
        return result

    def phase_paired(self) -> None:
        self.extra["paired_cpu"] = self.paired_cpu()

    def paired_cpu(self) -> dict[str, Any]:
        """The CPU target's number with its uncertainty: gateway + 1 shadow (file log) and the
        nginx mirror offered the same rate at the same time (one wrk each), CPU per request of
        both over the same window, their ratio per round. Run one after the other (the rows
        above), each proxy's CPU per request moves 5-10% between windows on this VM; side by
        side, a machine-wide slowdown hits both. Each rate is capped at --paired-max-load of
        the gateway's + 1 shadow capacity: the machine carries both loads at once."""
        a = self.args
        shadow1 = _find(self, "shadow1-file-w1")
        cap = shadow1.capacity.rps if shadow1 and shadow1.capacity else None
        rates = {r for r in (self.rate, self.light_rate) if r}
        if cap:
            rates = {min(r, round(a.paired_max_load * cap, -1)) for r in rates}
        if a.paired_rates:
            rates, cap = {float(r) for r in a.paired_rates.split(",")}, None
        result: dict[str, Any] = {"rates": sorted(rates, reverse=True), "rounds": [],
                                  "cap_rps": cap}
        upstream = f"{common.HOST}:{self.triton.http_port}"
        try:
            with contextlib.ExitStack() as stack:
                nginx = stack.enter_context(common.Nginx(
                    self.work / "nginx-paired", upstream, champion=CHAMPION, shadow="fraud_v4",
                    route=ROUTE))
                gw = stack.enter_context(self.gateway("paired-shadow1",
                                                      GATEWAY_SCENARIOS["shadow1"][1]))
                proxies = [("nginx", nginx.url + f"/v2/models/{ROUTE}/infer", nginx_pids(nginx)),
                           ("gateway", gw.url + f"/v2/models/{ROUTE}/infer", gw.pids)]
                # warm both paths (pools, the lane's batching config) outside the rounds
                cpu_split.measure(proxies, self.body_file, self.body,
                                  max(result["rates"]), 1, self.load_cpus)
                carried = {rate: self.carried_rate(proxies, rate, gw.url)
                           for rate in result["rates"]}
                result["asked_rates"] = result["rates"]
                result["rates"] = sorted(set(carried.values()), reverse=True)
                for i in range(a.paired_rounds):
                    order = proxies if i % 2 == 0 else proxies[::-1]
                    for rate in result["rates"]:
                        measured = cpu_split.measure(order, self.body_file, self.body,
                                                     rate, a.paired_seconds, self.load_cpus,
                                                     {"gateway": gw.url})
                        by = {name: m for (name, _, _), m in zip(order, measured, strict=True)}
                        ratio_ = by["gateway"]["cpu_ms"] / by["nginx"]["cpu_ms"]
                        result["rounds"].append({"round": i, "rate": rate, "ratio": ratio_, **by})
                        self.log(f"  paired CPU round {i + 1} at {rate:,.0f} req/s: gateway "
                                 f"{by['gateway']['cpu_ms']:.3f} vs nginx "
                                 f"{by['nginx']['cpu_ms']:.3f} ms/req (x{ratio_:.2f})")
        except Exception as exc:
            return self.failed(result, "paired CPU", exc)
        result["by_rate"] = {}
        for rate in result["rates"]:
            mine = [r for r in result["rounds"] if r["rate"] == rate]
            for r in mine:
                r["same_work"] = same_work([r["gateway"], r["nginx"]], rate)
            # Rounds where one side did less work (copies shed, load not carried) measure
            # something else: left out of the summary, shown marked in the report.
            used = [r for r in mine if r["same_work"]] or mine
            ratios = [r["ratio"] for r in used]
            low, high = common.ratio_interval(ratios)
            result["by_rate"][str(rate)] = {
                "ratio": statistics.median(ratios), "ci": [low, high], "ratios": ratios,
                "rounds_used": sum(r["same_work"] for r in mine), "rounds": len(mine),
                "all_ratios": [(r["ratio"], r["same_work"]) for r in mine],
                **{f"{who}_{key}": statistics.median(r[who][key] for r in used)
                   for who in ("gateway", "nginx") for key in ("cpu_ms", "rps", "switches")},
                "copies_lost_max": max(r["gateway"].get("copies_lost", 0.0) for r in mine),
            }
            self.log(f"paired CPU at {rate:,.0f} req/s: gateway + 1 shadow x"
                     f"{statistics.median(ratios):.2f} the nginx mirror ({low:.2f}-{high:.2f}), "
                     f"{len(used)} of {len(mine)} rounds")
        return result

    def phase_capacity(self) -> None:
        self.extra["capacity_rounds"] = self.capacity_rounds()

    def capacity_rounds(self) -> dict[str, Any]:
        """The capacity targets' numbers with their uncertainty. The capacity rows measure each
        setup once, minutes apart, and on this shared VM they move ±20% between runs; here the
        nginx mirror (as shipped and kept alive) and the gateway + 1 shadow (file log, and
        Kafka log when a broker can run) take turns, closed loop, --capacity-rounds rounds of
        --capacity-seconds each, the order reversed every round; the gateway / nginx ratio per
        round, its median and 95% interval. Gateways also report the share of shadow copies
        they left unanswered (at capacity the lane sheds what Triton cannot take in time;
        nginx's mirror sends every copy)."""
        a = self.args
        result: dict[str, Any] = {"rounds": [], "seconds": a.capacity_seconds}
        upstream = f"{common.HOST}:{self.triton.http_port}"
        path = f"/v2/models/{ROUTE}/infer"
        try:
            with contextlib.ExitStack() as stack:
                nginx = stack.enter_context(common.Nginx(
                    self.work / "nginx-capacity", upstream, champion=CHAMPION,
                    shadow="fraud_v4", route=ROUTE))
                proxies = {"nginx-mirror": nginx.url + path,
                           "nginx-kept": nginx.url + f"/v2/models/{ROUTE}-kept/infer"}
                gateways: dict[str, str] = {}
                sinks = ["file"]
                kafka_ok, why = self.kafka_usable()
                if kafka_ok:
                    self.kafka = stack.enter_context(common.KafkaBroker(self.work / "kafka-cap"))
                    stack.callback(setattr, self, "kafka", None)
                    sinks.append("kafka")
                result["kafka"] = "used" if kafka_ok else why
                for sink in sinks:
                    gw = stack.enter_context(self.gateway(
                        f"capacity-shadow1-{sink}", GATEWAY_SCENARIOS["shadow1"][1], sink=sink))
                    proxies[f"gateway-{sink}"] = gw.url + path
                    gateways[f"gateway-{sink}"] = gw.url
                for url in proxies.values():  # pools, lanes and the broker warmed up
                    common.wrk(url, self.body_file, self.body, duration=max(a.warmup, 1),
                               connections=a.connections, cpus=self.load_cpus)
                names = list(proxies)
                for i in range(a.capacity_rounds):
                    measured: dict[str, dict[str, float]] = {}
                    for name in names if i % 2 == 0 else names[::-1]:
                        base = gateways.get(name)
                        before = cpu_split.shadow_totals(base) if base else {}
                        load = common.wrk(proxies[name], self.body_file, self.body,
                                          duration=a.capacity_seconds,
                                          connections=a.connections, cpus=self.load_cpus)
                        measured[name] = {"rps": load.rps, "errors": load.errors}
                        if base:
                            measured[name]["copies_lost"] = cpu_split.lost_share(
                                before, cpu_split.shadow_totals(base))
                    result["rounds"].append({"round": i, **measured})
                    self.log(f"  capacity round {i + 1}: " + ", ".join(
                        f"{name} {m['rps']:,.0f} req/s" for name, m in measured.items()))
        except Exception as exc:
            return self.failed(result, "capacity rounds", exc)
        result["by_pair"] = {}
        for label, gateway, peer in CAPACITY_PAIRS:
            if gateway not in proxies:
                continue
            ratios = [r[gateway]["rps"] / r[peer]["rps"] for r in result["rounds"]]
            low, high = common.ratio_interval(ratios)
            # The same ratio counting Triton calls done (a request and its copy; nginx makes
            # both for every request): a copy the gateway shed at capacity is work not done.
            work = [x * (2 - r[gateway]["copies_lost"]) / 2
                    for x, r in zip(ratios, result["rounds"], strict=True)]
            work_low, work_high = common.ratio_interval(work)
            result["by_pair"][label] = {
                "gateway": gateway, "nginx": peer, "ratio": statistics.median(ratios),
                "ci": [low, high], "ratios": ratios, "work_ratio": statistics.median(work),
                "work_ci": [work_low, work_high],
                "gateway_rps": statistics.median(r[gateway]["rps"] for r in result["rounds"]),
                "nginx_rps": statistics.median(r[peer]["rps"] for r in result["rounds"]),
                "copies_lost_max": max(r[gateway]["copies_lost"] for r in result["rounds"]),
            }
            self.log(f"capacity, gateway + 1 shadow, {label}: x{statistics.median(ratios):.2f} "
                     f"({low:.2f}-{high:.2f})")
        return result

    def carried_rate(self, proxies: list[tuple[str, str, list[int]]], rate: float,
                     gateway_url: str) -> float:
        """The highest rate from `rate` down (x0.7 per step, PAIRED_CALIBRATION_STEPS at most)
        that both proxies serve in full while the gateway answers every shadow copy, measured
        side by side like a round. Above it the comparison is not like for like: a gateway that
        sheds copies, or a proxy that cannot keep up, spends less CPU per request served."""
        for _ in range(PAIRED_CALIBRATION_STEPS):
            measured = cpu_split.measure(proxies, self.body_file, self.body, rate,
                                         self.args.paired_seconds, self.load_cpus,
                                         {"gateway": gateway_url})
            if same_work(measured, rate):
                return rate
            served, lost = shortfall(measured, rate)
            self.log(f"  paired CPU: at {rate:,.0f} req/s each the machine carried "
                     f"{served:.0%} of it and the gateway left {lost:.1%} of its shadow copies "
                     "unanswered; trying lower")
            rate = round(rate * 0.7, -1)
        return rate

    def phase_slow(self) -> None:
        self.extra["slow"] = self.slow_challenger()

    def phase_overload(self) -> None:
        if self.args.overload_seconds > 0:
            self.extra["overload"] = self.overload()

    def phase_profile(self) -> None:
        if not self.args.no_profile:
            self.extra["profile"] = self.profile()

    def slow_challenger(self) -> dict[str, Any]:
        """Does a 100x slower shadow move the champion's p99? Measured as a paired, concurrent
        comparison: two identical gateways P and Q take the same offered rate at the same time,
        and one of them carries the shadow under test (added and removed through the admin
        API), P on even rounds and Q on odd ones. The machine's stalls then hit both sides of a
        comparison alike; run one after the other, the same champion-only gateway's p99 moved
        0.5-2.3x between 8 s rounds on this VM, far more than the 5% the target asks about.

        Kinds, every round: B (the slow shadow `fraud_slow`) vs champion-only, C (a normal-speed
        shadow, fraud_v4: "any shadow costs loop time") vs champion-only, and A/A (both
        champion-only: the noise floor of the same statistic). Each kind's number is the median
        over rounds of p99(carrier) / p99(other). Triton is shared, so load a shadow puts on
        Triton reaches both gateways and cancels: this measures the gateway's isolation of a
        slow lane (its loop, its pools), which is what the lane design controls.
        """
        a = self.args
        kinds = {"B": "fraud_slow", "C": "fraud_v4", "AA": None}
        rate = self.light_rate if a.slow_at == "light" and self.light_rate else self.rate
        champion = _find(self, "champion-file-w1")
        if champion and champion.capacity:
            # keep both gateways well below saturation (they share the machine), or their p99
            # is queueing and says nothing about the shadow
            rate = max(10.0, min(rate, round(a.slow_max_load * champion.capacity.rps, -1)))
        rate = a.slow_rate or rate
        result: dict[str, Any] = {"rate": rate, "delay_ms": self.extra["slow_delay_ms"],
                                  "runs": []}
        self.log(f"slow challenger: fraud_slow sleeps {self.extra['slow_delay_ms']:.0f} ms per "
                 f"batch ({a.slow_factor:.0f}x the champion's direct p50); {rate:,.0f} req/s "
                 "offered to each of two gateways at once")
        token = os.urandom(16).hex()
        try:
            with contextlib.ExitStack() as stack:
                pair = [stack.enter_context(self.gateway(f"slow-{side}", fraud_route(),
                                                         env={ADMIN_TOKEN_ENV: token}))
                        for side in ("p", "q")]
                admins = [AdminClient(gw.url, token=token) for gw in pair]
                urls = [gw.url + f"/v2/models/{ROUTE}/infer" for gw in pair]
                self.paired_rates(urls, rate, max(a.warmup, 2))
                for i in range(a.slow_rounds):
                    carrier = i % 2  # P on even rounds, Q on odd ones
                    for kind in kinds if i % 2 == 0 else list(kinds)[::-1]:
                        model = kinds[kind]
                        if model:
                            admins[carrier].add_challenger(ROUTE, model, mode="shadow",
                                                           sample_rate=1.0)
                        cpu0 = [common.schedstat(gw.pids)[0] for gw in pair]
                        runs = self.paired_rates(urls, rate, a.slow_duration)
                        cpu = [1000 * (common.schedstat(gw.pids)[0] - c0) / max(r.requests, 1)
                               for gw, c0, r in zip(pair, cpu0, runs, strict=True)]
                        if model:
                            if kind == "B":
                                result["shadow"] = common.shadow_counts(pair[carrier].url)
                            admins[carrier].remove_challenger(ROUTE, model)
                        on, off = runs[carrier], runs[1 - carrier]
                        result["runs"].append({
                            "kind": kind, "round": i, "carrier": "PQ"[carrier],
                            "p99_ratio": on.p99 / off.p99, "p50_ratio": on.p50 / off.p50,
                            "carrier_run": {**on.as_dict(), "cpu_ms_per_req": cpu[carrier]},
                            "other_run": {**off.as_dict(), "cpu_ms_per_req": cpu[1 - carrier]},
                        })
                        self.log(f"  {kind} round {i + 1} (on {'PQ'[carrier]}): p99 "
                                 f"{on.p99:.2f} vs {off.p99:.2f} ms "
                                 f"({100 * (on.p99 / off.p99 - 1):+.1f}%), errors "
                                 f"{on.errors + off.errors}, CPU {cpu[carrier]:.3f} vs "
                                 f"{cpu[1 - carrier]:.3f} ms/req")
                        time.sleep(1)  # a removed lane's last copies end before the next run
        except Exception as exc:
            return self.failed(result, "slow challenger", exc)
        for kind in kinds:
            mine = [r for r in result["runs"] if r["kind"] == kind]
            p99 = [r["p99_ratio"] for r in mine]
            low, high = common.ratio_interval(p99)
            result[kind] = {
                "p99_change_pct": 100 * (statistics.median(p99) - 1),
                # geometric mean of the rounds' ratios with its 95% t-interval over rounds
                "p99_change_ci_pct": [100 * (low - 1), 100 * (high - 1)],
                "p99_change_range_pct": [100 * (min(p99) - 1), 100 * (max(p99) - 1)],
                "p50_change_pct": 100 * (statistics.median(r["p50_ratio"] for r in mine) - 1),
                "p99_carrier_ms": statistics.median(r["carrier_run"]["p99"] for r in mine),
                "p99_other_ms": statistics.median(r["other_run"]["p99"] for r in mine),
                "cpu_carrier": statistics.median(r["carrier_run"]["cpu_ms_per_req"]
                                                 for r in mine),
                "cpu_other": statistics.median(r["other_run"]["cpu_ms_per_req"] for r in mine),
                "p99_change_runs_pct": [100 * (x - 1) for x in p99],
            }
        b, c, aa = result["B"], result["C"], result["AA"]
        self.log(f"slow challenger: champion p99 {b['p99_change_pct']:+.1f}% with the slow "
                 f"shadow (rounds {b['p99_change_range_pct'][0]:+.1f}..."
                 f"{b['p99_change_range_pct'][1]:+.1f}%), {c['p99_change_pct']:+.1f}% with a "
                 f"normal-speed one, A/A {aa['p99_change_pct']:+.1f}% (rounds "
                 f"{aa['p99_change_range_pct'][0]:+.1f}...{aa['p99_change_range_pct'][1]:+.1f}%)")
        return result

    def paired_rates(self, urls: list[str], rate: float, duration: float
                     ) -> list[common.LoadResult]:
        """Offer `rate` to every url at the same time (one wrk each); their results in order."""
        with common.wrk_rates_at_once(urls, self.body_file, self.body, rate=rate,
                                      duration=duration, connections=self.args.rate_connections,
                                      cpus=self.load_cpus) as results:
            pass
        return results

    def overload(self) -> dict[str, Any]:
        a = self.args
        routes = fraud_route(("fraud_v4", "fraud_slow"))
        cap = next((r.capacity.rps for r in self.rows if r.key == "shadow1-file-w1"
                    and r.capacity), None)
        samples: list[tuple[float, int]] = []
        result: dict[str, Any] = {"seconds": a.overload_seconds}
        try:
            with self.gateway("overload", routes) as gw:
                url = gw.url + f"/v2/models/{ROUTE}/infer"
                if cap is None:
                    cap = common.wrk(url, self.body_file, self.body, duration=5,
                                     cpus=self.load_cpus).rps
                rate = 2 * cap
                result["offered_rps"] = rate
                result["connections"] = a.overload_connections
                time.sleep(1)
                pids = gw.pids
                result["rss_start_mb"] = common.rss_bytes(pids) / 2**20
                self.log(f"overload: offering {rate:,.0f} req/s (2x capacity {cap:,.0f}) over "
                         f"{a.overload_connections} connections for {a.overload_seconds:.0f} s; "
                         f"RSS at start {result['rss_start_mb']:.1f} MiB")
                stop = threading.Event()
                t0 = time.monotonic()

                def sample() -> None:
                    while not stop.is_set():
                        samples.append((time.monotonic() - t0, common.rss_bytes(gw.pids)))
                        stop.wait(1.0)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                load = common.wrk_rate(url, self.body_file, self.body, rate=rate,
                                       duration=a.overload_seconds,
                                       connections=a.overload_connections, cpus=self.load_cpus,
                                       timeout_s=10)
                rss_end = common.rss_bytes(gw.pids)
                time.sleep(5)
                stop.set()
                sampler.join()
                result["load"] = load.as_dict()
                result["rss_end_mb"] = rss_end / 2**20
                result["rss_after_5s_mb"] = common.rss_bytes(gw.pids) / 2**20
                result["rss_peak_mb"] = max(s[1] for s in samples) / 2**20
                under_load = [s for s in samples if s[0] <= a.overload_seconds]
                half = [s[1] for s in under_load[len(under_load) // 2:]]
                result["rss_second_half_range_mb"] = (
                    (max(half) - min(half)) / 2**20 if half else None
                )
                result["samples"] = [(round(t, 1), round(b / 2**20, 2)) for t, b in samples]
                result["shadow"] = common.shadow_counts(gw.url)
        except Exception as exc:
            return self.failed(result, "overload", exc)
        self.log(f"overload: served {result['load']['rps']:,.0f} req/s, errors "
                 f"{result['load']['errors']}; RSS start {result['rss_start_mb']:.1f} / peak "
                 f"{result['rss_peak_mb']:.1f} / end {result['rss_end_mb']:.1f} / after "
                 f"{result['rss_after_5s_mb']:.1f} MiB")
        return result

    def profile(self) -> dict[str, Any]:
        a = self.args
        if profile_gateway.py_spy() is None:
            return {"error": "py-spy not installed (pip install py-spy)"}
        try:
            with self.gateway("profile", fraud_route(("fraud_v4",))) as gw:
                url = gw.url + f"/v2/models/{ROUTE}/infer"
                common.wrk(url, self.body_file, self.body, duration=a.warmup,
                           cpus=self.load_cpus)
                summary, load = profile_gateway.profile_gateway(
                    gw, url, self.body_file, self.body, seconds=a.profile_seconds,
                    out=self.out / "profile", cpus=self.load_cpus)
        except Exception as exc:
            self.log(f"profile FAILED: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}
        self.log(f"profile written to {self.out / 'profile' / 'hotspots.txt'}")
        return {"summary": summary, "load": load.as_dict(),
                "path": str(self.out / "profile" / "hotspots.txt")}


# --- measurements of the gateway -----------------------------------------------------------


def nginx_pids(nginx: common.Nginx) -> list[int]:
    return common.process_tree(nginx.proc.pid) if nginx.proc else []


# --- report --------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def ms3(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else "-"


def shortfall(measured: list[dict[str, float]], rate: float) -> tuple[float, float]:
    """(the smallest share of `rate` a side served, the largest share of shadow copies a
    gateway left unanswered) of one paired measurement."""
    return (min(m["rps"] for m in measured) / rate,
            max(m.get("copies_lost", 0.0) for m in measured))


def same_work(measured: list[dict[str, float]], rate: float) -> bool:
    """Did both sides of a paired measurement do the same work: each served the offered rate
    (PAIRED_MIN_SERVED) and the gateway answered its shadow copies (PAIRED_MAX_LOST)?"""
    served, lost = shortfall(measured, rate)
    return served >= PAIRED_MIN_SERVED and lost <= PAIRED_MAX_LOST


def paired_section(paired: dict[str, Any], a: argparse.Namespace) -> list[str]:
    out = ["### CPU per request side by side: gateway + 1 shadow vs the nginx mirror", ""]
    if "error" in paired:
        return [*out, f"Failed: {paired['error']}", ""]
    cap = (f", each rate capped at {a.paired_max_load:.0%} of the gateway's + 1 shadow capacity "
           f"({paired['cap_rps']:,.0f} req/s)") if paired.get("cap_rps") else ""
    asked = paired["asked_rates"]
    if asked != paired["rates"]:
        cap += (" and lowered (x0.7 steps) from " + ", ".join(f"{r:,.0f}" for r in asked)
                + f" req/s until, side by side, both served ≥ {PAIRED_MIN_SERVED:.0%} of it and "
                f"the gateway answered ≥ {1 - PAIRED_MAX_LOST:.1%} of its shadow copies")
    out += [
        "Both offered the same rate **at the same time** (one wrk each, Poisson arrivals), CPU "
        f"time per request of each over the same {a.paired_seconds:g} s window, "
        f"{a.paired_rounds} rounds{cap}; ratio = gateway / nginx per round, median and 95% "
        "interval of the geometric mean (loadtests/cpu_split.py `--together` does the same "
        "for any trees):",
        "",
        "| offered req/s (each) | nginx mirror CPU ms/req | gateway + 1 shadow CPU ms/req "
        "| × nginx mirror (median) | 95% interval | per round (* = not the same work, left "
        "out) | switches/req nginx / gateway | shadow copies not answered (worst round) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in paired["rates"]:
        r = paired["by_rate"][str(rate)]
        ratio = f"**×{r['ratio']:.2f}**"
        if r["rounds_used"] == 0:
            ratio = f"×{r['ratio']:.2f} (no round did the same work: all rounds, for reference)"
        out.append(f"| {rate:,.0f} | {r['nginx_cpu_ms']:.3f} | {r['gateway_cpu_ms']:.3f} "
                   f"| {ratio} | {r['ci'][0]:.2f}–{r['ci'][1]:.2f} | "
                   + ", ".join(f"{x:.2f}" + ("" if same else "*")
                               for x, same in r["all_ratios"])
                   + f" | {r['nginx_switches']:.2f} / {r['gateway_switches']:.2f} "
                   f"| {r['copies_lost_max']:.1%} |")
    return [*out, "The ratio compares the same work only while both serve the offered rate "
                  f"(≥ {PAIRED_MIN_SERVED:.0%}) and the gateway answers its shadow copies (≥ "
                  f"{1 - PAIRED_MAX_LOST:.1%}; nginx's mirror sends every one): the median and "
                  "interval use those rounds only.", ""]


LATENCY_LABELS = {"champion": "gateway, champion only [file log]",
                  "shadow1": "gateway + 1 shadow [file log]",
                  "AA": "direct Triton (A/A: the noise floor)"}


def latency_section(added: dict[str, Any], a: argparse.Namespace) -> list[str]:
    out = ["### Added latency side by side: each gateway and direct Triton at once", ""]
    if "error" in added:
        return [*out, f"Failed: {added['error']}", ""]
    out += [
        f"Each gateway and direct Triton offered {added['rate']:,.0f} req/s **at the same "
        f"time** (one wrk each, Poisson arrivals, {added['seconds']:g} s); added = the "
        "gateway's percentile minus direct Triton's in the same window; "
        f"{a.latency_rounds} rounds, the order alternating; median and 95% t-interval of "
        "the mean over rounds. A/A: direct Triton against itself, the noise floor of the "
        "same statistic. (Triton takes both loads at once: twice the rate, plus the copies.)",
        "",
        "| setup | added p50 ms (median) | 95% interval | added p99 ms (median) "
        "| 95% interval | per round p50 / p99 | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, r in added["by_kind"].items():
        rounds = ", ".join(f"{p50:+.2f} / {p99:+.2f}"
                           for p50, p99 in zip(r["p50_rounds"], r["p99_rounds"], strict=True))
        out.append(f"| {LATENCY_LABELS[kind]} | **{r['p50']:+.2f}** | {r['p50_ci'][0]:+.2f} to "
                   f"{r['p50_ci'][1]:+.2f} | **{r['p99']:+.2f}** | {r['p99_ci'][0]:+.2f} to "
                   f"{r['p99_ci'][1]:+.2f} | {rounds} | {r['errors']} |")
    return [*out, ""]


def capacity_section(capacity: dict[str, Any], a: argparse.Namespace) -> list[str]:
    out = ["### Capacity in alternating rounds: gateway + 1 shadow vs the nginx mirror", ""]
    if "error" in capacity:
        return [*out, f"Failed: {capacity['error']}", ""]
    out += [
        "The nginx mirror (as shipped, and with its mirror connection kept alive) and the "
        "gateway + 1 shadow (file log" + (", Kafka log" if capacity["kafka"] == "used" else "")
        + ") take turns, closed loop (`wrk -c" + str(a.connections) + "`), "
        f"{capacity['seconds']:g} s each, {len(capacity['rounds'])} rounds, the order "
        "reversed every round; ratio = gateway / nginx capacity per round, median and 95% "
        "interval of the geometric mean (the capacity rows above measure each setup once, "
        "minutes apart)" + ("" if capacity["kafka"] == "used"
                            else f"; Kafka: {capacity['kafka']}") + ":",
        "",
        "| comparison | gateway req/s | nginx req/s | × nginx (median) | 95% interval "
        "| per round | shadow copies not answered (worst round) | × nginx in Triton calls "
        "made (copies shed not counted) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in capacity["by_pair"].items():
        out.append(f"| {label} | {r['gateway_rps']:,.0f} | {r['nginx_rps']:,.0f} "
                   f"| **×{r['ratio']:.2f}** | {r['ci'][0]:.2f}–{r['ci'][1]:.2f} | "
                   + ", ".join(f"{x:.2f}" for x in r["ratios"])
                   + f" | {r['copies_lost_max']:.1%} | ×{r['work_ratio']:.2f} "
                   f"({r['work_ci'][0]:.2f}–{r['work_ci'][1]:.2f}) |")
    return [*out, "At capacity the gateway's shadow lane sheds the copies Triton cannot take "
                  "in time (by design: the champion's answers come first); nginx's mirror "
                  "makes every copy. The last column counts each request and each copy made "
                  "as one Triton call: the like-for-like reading.", ""]


def slow_rate_source(a: argparse.Namespace) -> str:
    if a.slow_rate:
        return "--slow-rate"
    return (f"the {a.slow_at} rate, capped at {a.slow_max_load:.0%} of the gateway's "
            "champion-only capacity")


def _find(bench: Bench, key: str) -> Row | None:
    return next((r for r in bench.rows if r.key == key and not r.error), None)


def capacity_table(bench: Bench) -> str:
    direct, nginx = _find(bench, "direct"), _find(bench, "nginx-mirror")
    dcap = direct.capacity.rps if direct and direct.capacity else None
    ncap = nginx.capacity.rps if nginx and nginx.capacity else None
    lines = ["| setup | capacity req/s | × direct | × nginx mirror | p50 / p99 at capacity (ms) "
             "| CPU ms/req (gateway or nginx) | its CPU busy / starved % | Triton CPU ms/req "
             "| logged / served |",
             "|" + "---|" * 9]
    for r in bench.rows:
        if r.error or r.capacity is None:
            lines.append(f"| {r.label} | failed: {(r.error or '?')[:90]} |" + " |" * 7)
            continue
        cap = r.capacity
        logged = f"{r.logged:,} / {r.served:,}" if r.logged is not None and r.served else "-"
        lines.append(
            f"| {r.label} | {cap.rps:,.0f}" + (f" ({cap.errors} err)" if cap.errors else "")
            + f" | {ratio(cap.rps, dcap)} | {ratio(cap.rps, ncap)} | {cap.p50:.2f} / "
            f"{cap.p99:.2f} | {ms3(r.cpu_ms_per_req)} | "
            + (f"{r.busy_pct:.0f} / {r.starved_pct:.0f}" if r.busy_pct is not None else "-")
            + f" | {ms3(r.triton_cpu_ms_per_req)} | {logged} |"
        )
    return "\n".join(lines)


def latency_table(bench: Bench) -> str:
    direct, nginx = _find(bench, "direct"), _find(bench, "nginx-mirror")
    lines = [f"| setup | p50 / p90 / p99 at {bench.rate:,.0f} req/s (ms) | added p50 / p99 "
             "| p99 × nginx mirror | CPU ms/req (× nginx mirror) "
             f"| p50 / p90 / p99 at {bench.light_rate:,.0f} req/s (ms) "
             "| added p50 / p99 | p99 × nginx mirror | CPU ms/req (× nginx mirror) |",
             "|" + "---|" * 9]
    for r in bench.rows:
        if r.error:
            continue
        cells = [r.label]
        for attr in ("moderate", "light"):
            res: common.LoadResult | None = getattr(r, attr)
            base = getattr(direct, attr) if direct else None
            peer = getattr(nginx, attr) if nginx else None
            if res is None:
                cells += ["-", "-", "-", "-"]
                continue
            text = f"{res.p50:.2f} / {res.p90:.2f} / {res.p99:.2f}"
            if res.target_rps and res.rps < 0.95 * res.target_rps:
                text += f" (saturated: {res.rps:,.0f} req/s)"
            if res.errors:
                text += f", {res.errors} errors"
            added = "-" if base is None or r.key == "direct" else \
                f"{res.p50 - base.p50:+.2f} / {res.p99 - base.p99:+.2f}"
            cpu: float | None = getattr(r, f"{attr}_cpu_ms")
            peer_cpu: float | None = getattr(nginx, f"{attr}_cpu_ms") if nginx else None
            cpu_cell = "-" if cpu is None else f"{cpu:.3f}" + (
                f" (×{cpu / peer_cpu:.2f})" if peer_cpu else "")
            cells += [text, added, ratio(res.p99, peer.p99 if peer else None), cpu_cell]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(bench: Bench, argv: list[str], versions: dict[str, str]) -> str:
    a = bench.args
    info = common.machine_info()
    ver = dict(versions)
    ver["nginx"] = bench.extra.get("nginx_version", ver["nginx"])
    cmd = "python loadtests/bench.py " + " ".join(shlex.quote(x) for x in argv)
    out = [
        BEGIN,
        "## Gateway benchmark (loadtests/bench.py)",
        "",
        f"Run {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} with `make bench` → "
        f"`bash loadtests/bench.sh` → `{cmd}` ({time.monotonic() - bench.started:.0f} s).",
        "",
        f"- Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux "
        f"{info['kernel']}; everything on 127.0.0.1. Load average "
        + ", ".join(f"{w}: {v}" for w, v in bench.loadavg)
        + " (other jobs share this machine: compare rows of one run, not runs).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".",
        f"- Triton {CHAMPION} (Python backend, dynamic batching, 1 CPU instance); body: one "
        f"fraud row, JSON ({len(bench.body.data)} bytes) unless marked binary "
        f"({len(bench.body_bin.data)} bytes). Gateway: `python -m gateway serve` (uvloop), "
        "1 worker unless marked; 100% logging; file sink `fsync: interval`.",
        f"- Capacity: `wrk -t1 -c{a.connections} -d{a.duration:g}s -s loadtests/post.lua` "
        f"(after a {a.warmup:g} s warm-up). Fixed rates: moderate = {a.rate_fraction:.0%} of "
        f"direct capacity = **{bench.rate:,.0f} req/s** and light = {a.light_fraction:.0%} = "
        f"**{bench.light_rate:,.0f} req/s**, offered with Poisson arrivals "
        f"(`wrk -t1 -c{a.rate_connections} -s loadtests/post.lua URL -- ... RATE`, "
        f"{a.rate_duration:g} s each; "
        "`hey -q` is not used: its workers' tickers fire together, so it sends bursts of -c "
        "requests). Latency is measured from each request's write; \"saturated\" marks a "
        "setup that could not take the offered rate (its latency is then queueing). "
        + (f"wrk pinned with `taskset -c {bench.load_cpus}`." if bench.load_cpus else ""),
        "- CPU ms/req (gateway process tree, or nginx) and Triton CPU ms/req: CPU time "
        "(/proc/*/task/*/schedstat) during the capacity run divided by the requests served "
        "(much less sensitive to other load on the machine than latency is). busy / starved: "
        "that CPU time, and the time its threads waited runnable in the run queue, as % of the "
        "run's wall time: a single-worker gateway with busy + starved near 100% is CPU-bound, "
        "and `starved` is CPU other jobs on the machine took from it. logged / served: "
        "inference records in the sink after the gateway stopped (SIGTERM: drained, flushed) "
        "vs answers the load generator counted (capacity and fixed-rate runs; warm-up "
        "requests make `logged` larger).",
        f"- Kafka rows: {bench.extra.get('kafka', '-')}.",
        "",
        "Capacity (closed loop, 16 connections):",
        "",
        capacity_table(bench),
        "",
        "Latency at fixed offered rates (added = minus direct Triton at the same rate; CPU "
        "ms/req = the gateway's (or nginx's) CPU time during that fixed-rate run / its "
        "requests):",
        "",
        latency_table(bench),
        "",
    ]
    added = bench.extra.get("added_latency")
    if added:
        out += latency_section(added, a)
    paired = bench.extra.get("paired_cpu")
    if paired:
        out += paired_section(paired, a)
    capacity = bench.extra.get("capacity_rounds")
    if capacity:
        out += capacity_section(capacity, a)
    slow = bench.extra.get("slow")
    if slow:
        out += ["### A challenger 100× slower than the champion", ""]
        if "error" in slow:
            out.append(f"Failed: {slow['error']}")
        else:
            sh = slow.get("shadow", {}).get("fraud_slow", {})
            names = {"B": "slow shadow `fraud_slow` (B) vs champion-only",
                     "C": "normal-speed shadow `fraud_v4` (C) vs champion-only",
                     "AA": "champion-only vs champion-only (A/A: the noise floor)"}
            out += [
                f"Two identical gateways (P, Q) take {slow['rate']:,.0f} req/s each **at the "
                f"same time** ({slow_rate_source(a)}); in each comparison one of them carries a "
                "shadow, added and removed through the admin API (P in even rounds, Q in odd "
                f"ones). `fraud_slow` sleeps {slow['delay_ms']:.0f} ms per batch "
                f"({a.slow_factor:.0f}× the champion's direct p50 of "
                f"{bench.extra.get('champion_p50_ms', 0):.2f} ms). Change = p99 of the carrier "
                "over p99 of the other in the same run; median over "
                f"{a.slow_rounds} rounds of {a.slow_duration:g} s (Triton is shared, so load "
                "a shadow puts on Triton reaches both and cancels: this is the gateway's "
                "isolation of a slow lane):",
                "",
                "| comparison | champion p99 change (median) | 95% interval (geometric mean) "
                "| per round | p50 change | p99 carrier / other (ms) "
                "| CPU ms/req carrier / other |",
                "|---|---|---|---|---|---|---|",
            ]
            for kind, name in names.items():
                k = slow[kind]
                rounds = ", ".join(f"{v:+.1f}%" for v in k["p99_change_runs_pct"])
                low, high = k["p99_change_ci_pct"]
                out.append(f"| {name} | **{k['p99_change_pct']:+.1f}%** | {low:+.1f}% to "
                           f"{high:+.1f}% | {rounds} "
                           f"| {k['p50_change_pct']:+.1f}% | {k['p99_carrier_ms']:.2f} / "
                           f"{k['p99_other_ms']:.2f} | {k['cpu_carrier']:.3f} / "
                           f"{k['cpu_other']:.3f} |")
            out += ["", "Slow lane copies (last B run): "
                    + ", ".join(f"{k} {int(v):,}" for k, v in sorted(sh.items())) + ".", ""]
    over = bench.extra.get("overload")
    if over:
        out += ["### Memory under overload", ""]
        if "error" in over:
            out.append(f"Failed: {over['error']}")
        else:
            load = over["load"]
            out += [
                f"Gateway with shadows fraud_v4 and fraud_slow, offered {over['offered_rps']:,.0f}"
                f" req/s (2× its + 1 shadow capacity) over {over['connections']} connections "
                f"for {over['seconds']:g} s: served {load['rps']:,.0f} req/s, p50 "
                f"{load['p50']:.1f} ms, p99 {load['p99']:.1f} ms, {load['errors']} errors.",
                "",
                f"RSS (sampled every second): start {over['rss_start_mb']:.1f} MiB, peak "
                f"{over['rss_peak_mb']:.1f} MiB, end of load {over['rss_end_mb']:.1f} MiB, "
                f"5 s after {over['rss_after_5s_mb']:.1f} MiB; range over the second half of "
                f"the run {over['rss_second_half_range_mb']:.1f} MiB. Shadow copies: "
                + "; ".join(f"{m}: " + ", ".join(f"{k} {int(v):,}" for k, v in sorted(c.items()))
                            for m, c in sorted(over.get("shadow", {}).items())) + ".",
                "",
            ]
    prof = bench.extra.get("profile")
    if prof:
        out += ["### Profile (py-spy, gateway + 1 shadow at capacity)", ""]
        if "error" in prof:
            out.append(f"Failed: {prof['error']}")
        else:
            s = prof["summary"]
            out += [
                f"{s['total_samples']:,} samples of the gateway's CPU time "
                f"(`py-spy record --nonblocking --format raw`, loadtests/profile_gateway.py; "
                f"{prof['load']['rps']:,.0f} req/s during the profile). Self time (C calls are "
                "charged to the Python function that made them):",
                "",
                "| self % | function |",
                "|---|---|",
                *[f"| {pct:.1f} | `{name}` |" for name, _, pct in s["self"][:15]],
                "",
                "Gateway functions, inclusive:",
                "",
                "| incl. % | function |",
                "|---|---|",
                *[f"| {pct:.1f} | `{name}` |" for name, _, pct in s["gateway"][:15]
                  if not name.startswith(("gateway/cli.py", "gateway/__main__"))],
                "",
            ]
    out.append(END)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8, help="capacity run seconds")
    p.add_argument("--rate-duration", type=float, default=8, help="each fixed-rate run, s")
    p.add_argument("--warmup", type=float, default=1)
    p.add_argument("--connections", type=int, default=16, help="wrk connections (capacity)")
    p.add_argument("--rate-connections", type=int, default=32)
    p.add_argument("--rate-fraction", type=float, default=0.3,
                   help="moderate load as a fraction of direct-Triton capacity")
    p.add_argument("--light-fraction", type=float, default=0.1,
                   help="light load as a fraction of direct-Triton capacity (0 skips it)")
    p.add_argument("--latency-rounds", type=int, default=6,
                   help="rounds of the side-by-side added-latency comparison (phase latency)")
    p.add_argument("--latency-seconds", type=float, default=8,
                   help="each side-by-side added-latency run, s")
    p.add_argument("--paired-rounds", type=int, default=6,
                   help="rounds of the side-by-side CPU comparison (phase paired)")
    p.add_argument("--paired-seconds", type=float, default=5,
                   help="measured window of each paired round, s (wrk runs 4 s longer)")
    p.add_argument("--paired-rates", default="",
                   help="comma-separated rates for phase paired (default: the moderate and "
                        "light rates, capped as below)")
    p.add_argument("--paired-max-load", type=float, default=0.5,
                   help="cap each paired rate at this share of the gateway's + 1 shadow "
                        "capacity")
    p.add_argument("--capacity-rounds", type=int, default=6,
                   help="rounds of the alternating capacity comparison (phase capacity)")
    p.add_argument("--capacity-seconds", type=float, default=5,
                   help="closed-loop run of each proxy per capacity round, s")
    p.add_argument("--slow-at", choices=("light", "moderate"), default="light",
                   help="offered rate of the slow-challenger comparison")
    p.add_argument("--slow-factor", type=float, default=100)
    p.add_argument("--slow-rounds", type=int, default=6)
    p.add_argument("--slow-duration", type=float, default=10)
    p.add_argument("--slow-max-load", type=float, default=0.1,
                   help="cap the slow-challenger rate (offered to each of the two gateways at "
                        "once) at this share of the gateway's champion-only capacity")
    p.add_argument("--slow-rate", type=float, default=0,
                   help="the slow-challenger rate per gateway, req/s (0: from the above)")
    p.add_argument("--overload-seconds", type=float, default=120,
                   help="overload (RSS) run length; 0 skips it")
    p.add_argument("--overload-connections", type=int, default=512)
    p.add_argument("--profile-seconds", type=float, default=15)
    p.add_argument("--gateway-python", default=sys.executable,
                   help="the interpreter every gateway of the run runs on (its environment needs "
                        "the gateway's dependencies; this checkout comes first on PYTHONPATH): "
                        "bench.sh sets it from $GATEWAY_PYTHON")
    p.add_argument("--load-cpus", default="1", help="taskset CPU list for wrk ('' = no pinning)")
    p.add_argument("--quick", action="store_true",
                   help="short runs: 4 s capacity/rate, 2 slow, 2 latency and 3 paired rounds, "
                        "20 s overload")
    p.add_argument("--no-kafka", action="store_true")
    p.add_argument("--no-workers", action="store_true", help="skip the --workers 2 rows")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--baseline-ref", default="",
                   help="also run champion-only and +1 shadow (file log) with the gateway of "
                        "this git ref, for before/after ratios in the same run")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="comma-separated subset of " + ",".join(PHASES)
                        + " (direct Triton always runs)")
    p.add_argument("--out", type=Path, default=common.ROOT / "var" / "bench")
    p.add_argument("--md", type=Path, default=common.ROOT / "docs" / "BENCHMARKS.md")
    p.add_argument("--no-md", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if args.quick:
        args.duration = min(args.duration, 4)
        args.rate_duration = min(args.rate_duration, 4)
        args.slow_rounds, args.slow_duration = 2, min(args.slow_duration, 4)
        args.paired_rounds, args.paired_seconds = 3, min(args.paired_seconds, 2)
        args.latency_rounds, args.latency_seconds = 2, min(args.latency_seconds, 3)
        args.capacity_rounds, args.capacity_seconds = 2, min(args.capacity_seconds, 2)
        args.overload_seconds = min(args.overload_seconds, 20)
        args.profile_seconds = min(args.profile_seconds, 5)
        args.warmup = 1
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing: run loadtests/bench.sh (it installs wrk and nginx)",
                  file=sys.stderr)
            return 2
    bench = Bench(args)
    try:
        bench.run()
    finally:
        versions = common.versions(args.gateway_python)  # probes each tool and interpreter once
        results = {"argv": argv, "rate": bench.rate, "light_rate": bench.light_rate,
                   "rows": [r.as_dict() for r in bench.rows], "extra": bench.extra,
                   "machine": common.machine_info(),
                   "versions": versions,
                   "loadavg": bench.loadavg}
        (bench.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    section = render(bench, argv, versions)
    print("\n" + section.replace(BEGIN, "").replace(END, "").strip() + "\n")
    if not args.no_md:
        write_marked_block(args.md, section, BEGIN, END)
        print(f"written to {args.md} and {bench.out / 'results.json'}")
    failed = [r.label for r in bench.rows if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
