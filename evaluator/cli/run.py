"""`evaluator run`: the ingest loop."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from evaluator.cli.common import load
from evaluator.config import (
    format_duration,
)
from understudy.cli import ExitCode

log = logging.getLogger("evaluator")


def cmd_run(args: argparse.Namespace) -> int:
    """Ingest until SIGTERM/Ctrl-C (or, with --once, until the source is drained)."""
    from evaluator import ingest

    config = load(args)
    src = config.source
    where = (f"Kafka {src.kafka.bootstrap} topics {src.kafka.inferences_topic}, "
             f"{src.kafka.labels_topic} (group {src.kafka.group_id})"
             if src.type == "kafka" else f"segment files under {src.path}")
    into = (f"the landing zone {config.lake.path} (Parquet)" if config.lake.path else
            f"{config.store.path} ({config.store.engine}); join window "
            f"{format_duration(config.store.join_window)}")
    print(f"evaluator: ingesting from {where} into {into}"
          f"{'; draining once' if args.once else ''}", flush=True)
    if config.lake.path:  # members of one consumer group writing Parquet (docs/LAKE.md)
        from evaluator.lake import members

        run: Callable[..., Any] = members.run
    else:
        run = ingest.run
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        progress = run(config, once=args.once, stop=stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"evaluator: {progress.line()}", flush=True)
    return ExitCode.OK


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="ingest inferences and labels into the store",
                       description="Consume the gateway's inference log and labels (segment "
                                   "files or Kafka) and join them in the evaluator's store.")
    p.add_argument("--once", action="store_true", help="drain what is there now, then exit")
    p.set_defaults(func=cmd_run)
