"""`evaluator replay`: backtest a challenger on the route's logged traffic (evaluator/replay/).

Reads the route's logged rows in the window from the store, resends the ones not replayed yet to
the challenger on Triton through the replay lane (rate cap, own pool, shedding), logs the
outcomes as `mode: "replay"` records with the labels already known, then (unless --no-report)
ingests them and writes the route's report from the replayed rows, marked as replay.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from evaluator.cli.common import fmt_ts, load
from evaluator.config import EvaluatorConfig, format_duration, parse_duration
from evaluator.replay.logged import LoggedRow, read_rows, replayed_ids
from evaluator.replay.records import replay_dir, replay_route, written_ids
from evaluator.store import EmptyDatasetError, Store
from understudy.cli import ExitCode

if TYPE_CHECKING:
    from evaluator.replay.run import ReplayResult

DEFAULT_TRITON = "http://127.0.0.1:8000"


async def _run(rows: list[LoggedRow], args: argparse.Namespace, directory: Path | None,
               config: EvaluatorConfig, done: set[str], labelled: set[str],
               score_output: str) -> ReplayResult:
    """To files under `directory`, or (None) to the evaluator's Kafka source topics.

    Imported here: replay calls Triton through the gateway's keep-alive pool and writes segment
    files with its file sink, so it needs the gateway's packages too (`understudy[gateway]`);
    every other evaluator command runs without them."""
    from evaluator.replay.kafka import KafkaReplaySink
    from evaluator.replay.lane import ReplayLane
    from evaluator.replay.run import replay
    from gateway.backends.file_sink import FileSink

    sink: FileSink | KafkaReplaySink
    if directory is None:
        sink = KafkaReplaySink(config.source.kafka)
    else:
        sink = FileSink(directory, fsync="interval")
    lane = ReplayLane(args.triton, args.rate, args.concurrency, args.timeout_ms / 1000,
                      args.slow_factor)
    await sink.start()
    try:
        return await replay(rows, route=args.route, challenger=args.challenger, lane=lane,
                            sink=sink, done=done, labelled=labelled, score_output=score_output)
    finally:
        lane.close()
        await sink.close()


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay, then report; NOTHING when the window holds no logged rows, UNREACHABLE when
    Triton cannot be reached (what was replayed before stays logged)."""
    config = load(args)
    if args.nice:
        os.nice(args.nice)
    to_kafka = config.source.type == "kafka" and not args.log
    root = Path(args.log or config.source.path)
    window = parse_duration(args.since, "--since")
    store = Store.open(config.store, read_only=True)
    try:
        span = store.time_range(args.route)
        since = span[1] - window if span else None
        rows = read_rows(store, args.route, since)
        done, labelled = replayed_ids(store, replay_route(args.route))
    finally:
        store.close()
    if not rows:
        print(f"replay: route {args.route!r} has no logged rows since {fmt_ts(since)}",
              file=sys.stderr)
        return ExitCode.NOTHING
    directory = None if to_kafka else replay_dir(root, args.route, args.challenger)
    if directory is not None:
        in_files, labelled_files = written_ids(directory)
        done |= in_files
        labelled |= labelled_files
    where = (f"Kafka topic {config.source.kafka.inferences_topic}" if directory is None
             else str(directory))
    print(f"replay: {len(rows):,} logged rows of route {args.route!r} in the last "
          f"{format_duration(window)} -> {args.challenger} on {args.triton} at <= {args.rate:g}/s "
          f"({len(done):,} replayed before); records in {where}", flush=True)
    score_output = config.score_output(args.route) or "score"
    try:
        import httptools  # noqa: F401 - the gateway's pool parses Triton's answers with it
    except ImportError:
        print("replay: calling Triton needs the gateway's packages next to the evaluator's: "
              "pip install 'understudy[gateway,evaluator]'", file=sys.stderr)
        return ExitCode.USAGE
    result = asyncio.run(_run(rows, args, directory, config, done, labelled, score_output))
    print(f"replay: sent {result.sent:,} ({result.ok:,} ok, {result.failed:,} failed), skipped "
          f"{result.skipped:,} already replayed, {result.labels:,} labels copied, "
          f"{result.shed:,} turns shed, {result.seconds:.1f} s", flush=True)
    if result.unreachable:
        print(f"replay: Triton unreachable ({result.unreachable}); re-run to continue",
              file=sys.stderr)
        return ExitCode.UNREACHABLE
    if args.no_report:
        return ExitCode.OK
    return _report(config, args, None if to_kafka else root)


def _report(config: EvaluatorConfig, args: argparse.Namespace, root: Path | None) -> int:
    """Ingest the replay records, then the route's report from its replayed rows."""
    from evaluator import ingest
    from evaluator.cli.report import compute_decisions, logged_inputs
    from evaluator.report import write_report

    if root is None or (config.source.type == "file" and Path(config.source.path) == root):
        ingest.run(config, once=True)  # the configured source: files or Kafka
    else:
        source = dataclasses.replace(config.source, type="file", path=str(root))
        ingest.run(dataclasses.replace(config, source=source), once=True)
    route_cfg = config.route(args.route)
    out_dir = Path(args.out or Path(config.report.out) / "replay" / args.route)
    store = Store.open(config.store, read_only=True)
    try:
        dataset = store.load_dataset(replay_route(args.route), task=route_cfg.task,
                                     threshold=route_cfg.threshold)
    except EmptyDatasetError as exc:
        print(f"replay: no labelled replayed rows yet: {exc}", file=sys.stderr)
        return ExitCode.NOTHING
    finally:
        store.close()
    dataset.route = args.route  # the route's own decision policy judges the replay
    decisions = compute_decisions(dataset, config)
    for d in decisions:
        print(f"replay: {d.challenger}: {d.decision} (replay) — "
              f"{d.reasons[0] if d.reasons else ''}")
    paths = write_report(dataset, decisions, out_dir,
                         inputs_for=logged_inputs(config, replay_route(args.route)))
    print(f"replay: wrote {', '.join(str(p) for p in paths.values())}")
    return ExitCode.OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("replay", parents=[common],
                       help="backtest a challenger on the route's logged traffic",
                       description="Resend the route's logged inputs to a challenger on Triton "
                                   "at a capped rate, log the outcomes as mode 'replay' with the "
                                   "labels already known, and write the report marked as replay. "
                                   "Resumable: a replayed request is never sent twice.")
    p.add_argument("--route", required=True, help="the route whose logged requests to replay")
    p.add_argument("--challenger", required=True, help="the Triton model to replay them against")
    p.add_argument("--since", default="14d",
                   help="window ending at the route's newest inference, e.g. 14d (default 14d)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="at most this many calls per second (default 200)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="replay calls in flight at most; a due call is shed when all are busy "
                        "(default 4)")
    p.add_argument("--slow-factor", type=float, default=3.0,
                   help="shed while the replay's recent call latency exceeds this many times "
                        "the fastest seen (Triton is loaded); default 3")
    p.add_argument("--nice", type=int, default=10,
                   help="lower this process's CPU priority by N (default 10): on shared cores "
                        "the gateway and the champion come first")
    p.add_argument("--timeout-ms", type=float, default=5000.0,
                   help="per-call timeout; a timed-out call is logged as status timeout")
    p.add_argument("--triton", default=os.environ.get("UNDERSTUDY_TRITON_URL", DEFAULT_TRITON),
                   help=f"Triton HTTP URL (default $UNDERSTUDY_TRITON_URL or {DEFAULT_TRITON})")
    p.add_argument("--log", help="log root the replay records go under (default: source.path; "
                                 "with a Kafka source, its topics)")
    p.add_argument("--out", help="report directory (default: <report.out>/replay/<route>)")
    p.add_argument("--no-report", action="store_true",
                   help="only replay and log; the ingest loop and `report` pick it up later")
    p.set_defaults(func=cmd_replay)
