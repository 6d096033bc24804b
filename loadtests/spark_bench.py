"""Benchmark: the report's dataset load by Spark over the landing zone (docs/BENCHMARKS.md).

`python -m loadtests.spark_bench --sizes 1000000,3000000 [--master local[2]]
[--driver-memory 6g] [--duckdb] [--dir DIR]`

For each size N: a lake of N requests (loadtests/lake_bench.py's `write_synthetic_lake`:
champion + two shadow challengers, 1% re-delivered inferences, 2% duplicate labels received a
day later, one replayed file), then in a fresh process what `evaluator report --engine spark`
loads — `SparkLakeReader.load_experiments` after `time_range` / `experiment_span` — with:

- wall seconds: the SparkSession start (a JVM), the experiments, and the dataset load;
- CPU seconds of the Python driver and of the JVM (Spark's driver and, in local mode, its
  executors), since on a shared machine CPU is the steadier figure;
- peak RSS of each process;
- a digest of the dataset (every array, the join stats, the experiments).

`--duckdb` also loads the same lake with the DuckDB reader in another fresh process and
checks the digests are equal: the engines agree at scale, not only on the test's records.
Cost with rows: the report is a constant part (JVM start, job scheduling) plus a part linear in
the lake's rows (scan, two shuffles, the join, shipping the joined rows to the driver), so
running two sizes and fitting a line gives the time at a third (`--extrapolate 10000000`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evaluator.dataset import EvalDataset
from loadtests.bench_store import ROUTE
from loadtests.lake_bench import write_synthetic_lake

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def dataset_digest(ds: EvalDataset) -> str:
    """sha256 over every per-row array, the join stats and the experiments."""
    h = hashlib.sha256()

    def add(a: Any) -> None:
        if isinstance(a, np.ndarray):
            h.update(repr(a.dtype).encode())
            h.update(a.tobytes() if a.dtype != object else "\0".join(map(str, a)).encode())
        else:
            h.update(repr(a).encode())

    for a in (ds.route, ds.task, ds.champion, ds.request_ids, ds.ts, ds.labels, ds.rewards,
              ds.served, ds.propensity, ds.policy_types, ds.registry_version, ds.label_ts,
              asdict(ds.stats), sorted((k, asdict(v)) for k, v in ds.experiments.items())):
        add(a)
    for name, prob in sorted(ds.arm_probs.items()):
        add(name)
        add(prob)
    for name, col in ds.models.items():
        for a in (name, col.role, col.scores, col.status, col.latency_ms, col.modes,
                  col.experiment, col.sample_rate):
            add(a)
    return h.hexdigest()


class _JvmWatch:
    """The JVM's CPU and peak RSS (VmHWM), read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def _child(engine: str, root: str, master: str, driver_memory: str) -> None:
    """In a fresh process: what the report loads; prints one JSON line."""
    w0, c0 = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {"engine": engine}
    jvm: _JvmWatch | None = None
    if engine == "spark":
        from evaluator.lake.spark_engine import SparkLakeReader, spark_session

        session = spark_session(master, {"spark.driver.memory": driver_memory})
        jvm = _JvmWatch(session.sparkContext._gateway.proc.pid)  # type: ignore[attr-defined]
        reader: Any = SparkLakeReader(root, spark=session)
        jvm_c0 = jvm.cpu_s()
    else:
        from evaluator.lake.reader import LakeReader
        from evaluator.lake.storage import Lake

        reader = LakeReader(Lake(root))
    out["start_s"] = time.perf_counter() - w0
    w1 = time.perf_counter()
    span = reader.time_range(ROUTE)
    experiments, since = reader.experiment_span(ROUTE, 7 * 86400.0)
    out["experiments_s"] = time.perf_counter() - w1
    w2 = time.perf_counter()
    ds = reader.load_experiments(ROUTE, span=(experiments, since))
    out["load_s"] = time.perf_counter() - w2
    out["report_load_s"] = time.perf_counter() - w1  # what `report` waits for after start-up
    out["wall_s"] = time.perf_counter() - w0
    out["python_cpu_s"] = time.process_time() - c0
    out["python_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if jvm is not None:
        out["jvm_cpu_s"] = jvm.cpu_s() - jvm_c0
        out["jvm_peak_rss_mb"] = jvm.peak_rss_mb()
    out.update(rows=len(ds), span=span, stats=asdict(ds.stats), digest=dataset_digest(ds))
    print(json.dumps(out), flush=True)


def _run_child(engine: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.spark_bench", "--child", engine, str(root),
         "--master", args.master, "--driver-memory", args.driver_memory],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{engine} child failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.spark_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000", help="comma-separated lake sizes (requests)")
    ap.add_argument("--master", default="local[2]", help="spark.master")
    ap.add_argument("--driver-memory", default="6g", help="spark.driver.memory")
    ap.add_argument("--duckdb", action="store_true", help="also load with DuckDB; compare")
    ap.add_argument("--extrapolate", type=int, default=0,
                    help="fit wall/CPU to the sizes and print the estimate at this size")
    ap.add_argument("--dir", help="keep lakes here (reused when present) instead of a temp dir")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.master, args.driver_memory)
        return 0
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="understudy-spark-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    try:
        for n in [int(float(s)) for s in args.sizes.split(",") if s.strip()]:
            root = workdir / f"lake-{n}"
            if not (root / "_lake.json").exists():
                shutil.rmtree(root, ignore_errors=True)
                write_synthetic_lake(n, root)
            size_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e6
            load = _load_average()
            res = _run_child("spark", root, args)
            res.update(n=n, lake_mb=round(size_mb, 1), load_average_before=load)
            if args.duckdb:
                duck = _run_child("duckdb", root, args)
                res["duckdb"] = {k: duck[k] for k in ("wall_s", "report_load_s", "python_cpu_s",
                                                      "python_peak_rss_mb")}
                res["same_dataset_as_duckdb"] = duck["digest"] == res["digest"]
            print(json.dumps(res), flush=True)
            results.append(res)
            if not args.dir:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.extrapolate and len(results) >= 2:
        ns = np.array([r["n"] for r in results], dtype=float)
        for key in ("report_load_s", "jvm_cpu_s", "python_cpu_s", "jvm_peak_rss_mb"):
            ys = np.array([r[key] for r in results], dtype=float)
            slope, intercept = np.polyfit(ns, ys, 1)
            print(f"{key}: {intercept:.1f} + {slope * 1e6:.2f} per 1M rows -> "
                  f"{intercept + slope * args.extrapolate:.1f} at {args.extrapolate:,} "
                  "(linear fit, extrapolated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
