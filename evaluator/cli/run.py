"""`evaluator run`: the ingest loop."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

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
    print(f"evaluator: ingesting from {where} into {config.store.path} ({config.store.engine}); "
          f"join window {format_duration(config.store.join_window)}"
          f"{'; draining once' if args.once else ''}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        progress = ingest.run(config, once=args.once, stop=stop)
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
