"""Benchmark: the Parquet landing zone (`python -m loadtests.lake_bench`), docs/BENCHMARKS.md.

Two parts, both reporting CPU seconds (robust on a busy shared machine) next to wall time:

- `--ingest N [--paths per-record,json,fast,store]`: N synthetic requests
  (loadtests/bench_store.py's generator: champion + two shadow challengers, 8 features, 1%
  re-delivered inferences, labels two chunks late with 2% duplicates), 20k-record polls,
  through each path: `per-record` (`RecordParser.parse` per record -> LakeBatch -> Arrow ->
  Parquet, the lake's path before the fast path), `json` (`FastParser.parse_json`, orjson:
  the fast path before its typed tier), `fast` (`FastParser.parse_many`, msgspec's typed
  decode first -> the same LakeBatch, what a member runs now) and `store` (RecordParser ->
  Batch -> DuckDB `Store.ingest`), as records/s per core
  (records = inference + label lines, over this process's CPU seconds). Run one path per
  process to compare them (no shared heap, so no shared garbage collection). `--parsers`
  adds the parse alone with orjson and with pyarrow's JSON reader (raw Arrow, no layout).
- `--report 1000000,10000000`: a lake of N requests written directly as Arrow (same shape,
  1% duplicate inferences, 2% duplicate labels, one replayed file), then in a fresh process per
  N: `LakeReader.load_experiments` (what `evaluator report` loads) — wall, CPU, peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from evaluator.ingest import RecordParser
from evaluator.lake import layout
from evaluator.lake.columns import LakeBatch
from evaluator.lake.storage import Lake
from evaluator.store import Batch, Store
from loadtests.bench_store import CHALLENGERS, CHAMPION, N_FEATURES, ROUTE, synthetic_chunks

CHUNK = 500_000


def _cpu() -> float:
    return time.process_time()


PATHS = ("store", "per-record", "json", "fast")


def bench_ingest(n: int, workdir: Path, paths: tuple[str, ...] = ("per-record", "fast"),
                 batch_records: int = 20_000, file_records: int = 200_000,
                 parsers: bool = False) -> dict[str, float]:
    """CPU and wall seconds of each ingest path over the same records (see the docstring)."""
    parser = RecordParser()
    out: dict[str, float] = {"records": 0.0, "inference_lines": 0.0}
    for path in paths:
        out[f"{path}_cpu"] = out[f"{path}_wall"] = 0.0
    store = Store(workdir / "store.duckdb") if "store" in paths else None
    lakes = {path: _LakeRun(workdir / f"lake-{path}", parser, path, file_records)
             for path in paths if path != "store"}
    for inf_lines, label_lines in synthetic_chunks(n):
        lines = inf_lines + label_lines
        out["records"] += len(lines)
        out["inference_lines"] += len(inf_lines)
        for path in paths:
            c0, w0 = _cpu(), time.perf_counter()
            if store is not None and path == "store":  # parse + store, 20k records a batch
                for start in range(0, len(lines), batch_records):
                    batch = Batch()
                    for line in lines[start:start + batch_records]:
                        parser.parse(batch, line)
                    store.ingest(batch)
            else:  # parse + Arrow + Parquet, `file_records` a flush
                for start in range(0, len(lines), batch_records):
                    lakes[path].add(lines[start:start + batch_records])
            out[f"{path}_cpu"] += _cpu() - c0
            out[f"{path}_wall"] += time.perf_counter() - w0
        if parsers and inf_lines:
            out["orjson_parse_cpu"] = out.get("orjson_parse_cpu", 0.0) + _parse_orjson(inf_lines)
            out["pyarrow_json_cpu"] = out.get("pyarrow_json_cpu", 0.0) + \
                _parse_pyarrow(inf_lines)
        print(f"  {out['records']:,.0f} records; " + ", ".join(
            f"{path} {out[f'{path}_cpu']:.1f}s cpu" for path in paths),
            file=sys.stderr, flush=True)
    for path, run in lakes.items():
        c0, w0 = _cpu(), time.perf_counter()
        run.flush()
        out[f"{path}_cpu"] += _cpu() - c0
        out[f"{path}_wall"] += time.perf_counter() - w0
    if store is not None:
        c0, w0 = _cpu(), time.perf_counter()
        store.close()  # the checkpoint is part of the store's ingest cost
        out["store_cpu"] += _cpu() - c0
        out["store_wall"] += time.perf_counter() - w0
    return out


class _LakeRun:
    """One lake ingest path as a member runs it: poll-sized batches in, a flush every
    `file_records` records (Arrow tables, Parquet files written durably)."""

    def __init__(self, root: Path, parser: RecordParser, path: str, file_records: int) -> None:
        self.lake = Lake(str(root))
        self.lake.ensure()
        self.parser = parser
        self.fast: Callable[[LakeBatch, str, Sequence[int], Sequence[bytes | None]], None] | None
        self.fast = None
        if path != "per-record":  # imported here: `per-record` also runs on a checkout without it
            from evaluator.lake.fastparse import FastParser

            fast = FastParser(parser)
            self.fast = fast.parse_json if path == "json" else fast.parse_many
        self.file_records = file_records
        self.batch = LakeBatch()
        self.pos = 0

    def add(self, lines: list[bytes]) -> None:
        first, self.pos = self.pos, self.pos + len(lines)
        if self.fast is not None:
            self.fast(self.batch, "kafka:bench:0", range(first, self.pos), lines)
        else:  # the per-record path (what every record took before the fast path)
            for pos, line in enumerate(lines, first):
                self.batch.at("kafka:bench:0", pos)
                self.parser.parse(self.batch, line)
        if len(self.batch) >= self.file_records:
            self.flush()

    def flush(self) -> None:
        for rel, table in self.batch.tables(layout.utc_date(time.time())):
            self.lake.write(rel, table, "bench")
        self.batch = LakeBatch()


def _parse_orjson(lines: list[bytes]) -> float:
    import orjson

    c0 = _cpu()
    for line in lines:
        orjson.loads(line)
    return _cpu() - c0


def _parse_pyarrow(lines: list[bytes]) -> float:
    import pyarrow.json as pj

    data = b"\n".join(lines) + b"\n"
    c0 = _cpu()
    pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(use_threads=False,
                                                                block_size=64 << 20))
    return _cpu() - c0


# --------------------------------------------------------------------------------------------
# A large lake, written directly
# --------------------------------------------------------------------------------------------


def _strings(values: list[str | None], index: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(index))


def _lists(n: int, per_row: int, struct: pa.StructType, children: list[pa.Array]) -> pa.Array:
    offsets = pa.array(np.arange(0, n * per_row + 1, per_row, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(children,
                                                                        fields=list(struct)))


def write_synthetic_lake(n: int, root: Path, seed: int = 0) -> dict[str, int]:
    """N requests in the layout, chunk by chunk; returns row counts."""
    rng = np.random.default_rng(seed)
    lake = Lake(str(root))
    lake.ensure()
    models = [CHAMPION, *CHALLENGERS]
    m = len(models)
    counts = {"inference_rows": 0, "label_rows": 0}
    pos = 0
    for first in range(0, n, CHUNK):
        k = min(CHUNK, n - first)
        idx = first + np.arange(k)
        dup = rng.random(k) < 0.01
        rows = np.concatenate([idx, idx[dup]])  # re-deliveries get their own offsets
        r = rows.size
        ts = 1.7e9 + rows * 0.01
        rids = pa.array([f"req-{i:09d}" for i in rows], pa.string())
        x = rng.normal(size=(r, N_FEATURES))
        score = 1 / (1 + np.exp(-(x[:, 0] + rng.normal(size=(m, r)))))
        outcomes = _lists(r, m, layout.OUTCOME, [
            _strings(models, np.tile(np.arange(m), r)),
            pa.array(np.tile(np.minimum(np.arange(m), 1), r).astype(np.int8)),
            pa.array(np.tile(np.minimum(np.arange(m), 1), r).astype(np.int8)),
            _strings(["1"], np.zeros(r * m, dtype=np.int64)),
            pa.array(np.zeros(r * m, dtype=np.int8)),
            pa.array(score.T.reshape(-1)),
            pa.array(rng.gamma(2.0, 2.0, size=r * m)),
            _strings([None, *(f"{c}:1700000000" for c in CHALLENGERS)],
                     np.tile(np.arange(m), r)),
            pa.array(np.where(np.tile(np.arange(m), r) > 0, 1.0, np.nan)),
        ])
        arms = _lists(r, 1, layout.ARM, [_strings([CHAMPION], np.zeros(r, dtype=np.int64)),
                                        pa.array(np.ones(r))])
        num = pa.Array.from_buffers(pa.binary(), r, [
            None, pa.py_buffer(np.arange(0, r * N_FEATURES * 8 + 1, N_FEATURES * 8,
                                         dtype=np.int32)),
            pa.py_buffer(x.astype("<f8").tobytes())])
        inputs = _lists(r, 1, layout.INPUT, [
            _strings(["features"], np.zeros(r, dtype=np.int64)),
            _strings(["FP32"], np.zeros(r, dtype=np.int64)),
            pa.array(np.full(r, N_FEATURES, dtype=np.int32)), num,
            pa.nulls(r, pa.string())])
        table = pa.table({
            "request_id": rids, "row_ix": pa.array(np.zeros(r, dtype=np.int32)),
            "ts": pa.array(ts), "policy": _strings(["champion"], np.zeros(r, dtype=np.int64)),
            "served": _strings([CHAMPION], np.zeros(r, dtype=np.int64)),
            "propensity": pa.array(np.ones(r)), "sticky_key": pa.nulls(r, pa.string()),
            "status": pa.array(np.full(r, 200, dtype=np.int32)),
            "gateway_latency_ms": pa.array(rng.gamma(2.0, 2.0, size=r)),
            "registry_version": pa.array(np.ones(r, dtype=np.int64)),
            "outcomes": outcomes, "arms": arms, "inputs": inputs,
            "src": _strings(["kafka:inferences:0"], np.zeros(r, dtype=np.int64)),
            "pos": pa.array(pos + np.arange(r, dtype=np.int64)),
        }, schema=layout.INFERENCE_SCHEMA)
        pos += r
        lake.write(layout.partition_dir(layout.INFERENCES, layout.utc_date(ts[0]), ROUTE),
                   table, "bench")
        if first == 0:  # one replayed file: a member died before its commit
            lake.write(layout.partition_dir(layout.INFERENCES, layout.utc_date(ts[0]), ROUTE),
                       table.slice(0, 10_000), "bench2")
        ldup = rng.random(k) < 0.02
        lrows = np.concatenate([idx, idx[ldup]])
        lr = lrows.size
        received = 1.7e9 + lrows * 0.01 + 86400 + np.concatenate([np.zeros(k), np.ones(
            int(ldup.sum()))])
        labels = pa.table({
            "request_id": pa.array([f"req-{i:09d}" for i in lrows], pa.string()),
            "row_ix": pa.array(np.zeros(lr, dtype=np.int32)),
            "label": pa.array((rng.random(lr) < 0.3).astype(np.float64)),
            "reward": pa.array(np.full(lr, np.nan)),
            "has_label": pa.array(np.ones(lr, dtype=bool)),
            "event_time": pa.array(received - 3600), "received_ts": pa.array(received),
            "src": _strings(["kafka:labels:0"], np.zeros(lr, dtype=np.int64)),
            "pos": pa.array(pos + np.arange(lr, dtype=np.int64)),
        }, schema=layout.LABEL_SCHEMA)
        pos += lr
        lake.write(layout.partition_dir(layout.LABELS, layout.utc_date(received[0])), labels,
                   "bench")
        counts["inference_rows"] += r
        counts["label_rows"] += lr
        print(f"  wrote {first + k:,} requests", file=sys.stderr, flush=True)
    return counts


def _report_child(root: str, memory_limit: str, threads: int) -> None:
    """In a fresh process: the report's dataset load; prints JSON (time, CPU, peak RSS)."""
    from evaluator.lake.reader import LakeReader

    reader = LakeReader(Lake(root), memory_limit=memory_limit, threads=threads)
    c0, w0 = _cpu(), time.perf_counter()
    ds = reader.load_experiments(ROUTE)
    out = {"rows": len(ds), "wall_s": time.perf_counter() - w0, "cpu_s": _cpu() - c0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "stats": ds.stats.__dict__}
    print(json.dumps(out))


def bench_report(sizes: list[int], workdir: Path, memory_limit: str,
                 threads: int) -> list[dict[str, object]]:
    results = []
    for n in sizes:
        root = workdir / f"lake-{n}"
        t0 = time.perf_counter()
        counts = write_synthetic_lake(n, root)
        write_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e6
        proc = subprocess.run(
            [sys.executable, "-m", "loadtests.lake_bench", "--child", str(root),
             "--memory-limit", memory_limit, "--threads", str(threads)],
            capture_output=True, text=True, check=True, env={**os.environ})
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(n=n, size_mb=round(size_mb, 1), write_s=round(write_s, 1), **counts)
        print(json.dumps(res), file=sys.stderr, flush=True)
        results.append(res)
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.lake_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ingest", type=int, default=0, help="requests for the ingest comparison")
    ap.add_argument("--paths", default="per-record,json,fast",
                    help=f"ingest paths to measure, comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--parsers", action="store_true",
                    help="also time the JSON parse alone (orjson, pyarrow's JSON reader)")
    ap.add_argument("--report", default="", help="comma-separated lake sizes (requests)")
    ap.add_argument("--memory-limit", default="", help="DuckDB memory_limit for the report")
    ap.add_argument("--threads", type=int, default=0, help="DuckDB threads (0: all cores)")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _report_child(args.child, args.memory_limit, args.threads)
        return 0
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="understudy-lake-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.ingest:
            paths = tuple(p for p in args.paths.split(",") if p)
            unknown = set(paths) - set(PATHS)
            if unknown:
                ap.error(f"--paths: unknown {sorted(unknown)} (known: {', '.join(PATHS)})")
            r = bench_ingest(args.ingest, workdir, paths, parsers=args.parsers)
            n = r["records"]
            print(json.dumps(r))
            print(f"ingest, {n:,.0f} records ({args.ingest:,} requests), records/s per core "
                  "(CPU): " + "; ".join(
                      f"{path} {n / r[f'{path}_cpu']:,.0f} ({r[f'{path}_cpu']:.1f}s cpu, "
                      f"{r[f'{path}_wall']:.1f}s wall)" for path in paths))
            if args.parsers:
                lines = r["inference_lines"]
                print(f"inference lines parsed only: orjson "
                      f"{lines / r['orjson_parse_cpu']:,.0f}/s, pyarrow.json "
                      f"{lines / r['pyarrow_json_cpu']:,.0f}/s")
        if args.report:
            sizes = [int(float(s)) for s in args.report.split(",") if s.strip()]
            for res in bench_report(sizes, workdir, args.memory_limit, args.threads):
                print(json.dumps(res))
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
