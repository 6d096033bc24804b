"""`evaluator lake compact|expire`: maintain the Parquet landing zone (docs/LAKE.md)."""

from __future__ import annotations

import argparse
import time

from evaluator.cli.common import load
from evaluator.config import ConfigError, parse_duration
from evaluator.store import StoreError
from understudy.cli import ExitCode


def cmd_lake(args: argparse.Namespace) -> int:
    """compact: merge small files (and drop replayed rows); expire: delete old partitions."""
    from evaluator.lake.storage import Lake

    config = load(args)
    if not config.lake.path:
        raise ConfigError("lake.path: not set (the landing zone to maintain)")
    lake = Lake(config.lake.path)
    if not lake.exists():
        raise StoreError(f"no landing zone at {config.lake.path}")
    lake.ensure()
    if args.action == "compact":
        done = lake.compact(min_files=config.lake.compact_min_files,
                            small_bytes=int(config.lake.compact_small_mb * 1e6))
        print(f"lake: compacted {done.files_in} file(s) in {done.partitions} partition(s) into "
              f"{done.files_out}; {done.rows_dropped} replayed row(s) dropped; "
              f"{done.tmp_removed} stale temporary file(s) removed")
        return ExitCode.OK
    keep = parse_duration(args.older_than, "--older-than") if args.older_than else \
        config.lake.retention
    if keep is None:
        raise ConfigError("lake.retention: not set (or pass --older-than 90d)")
    cutoff = time.strftime("%Y-%m-%d", time.gmtime(time.time() - keep))
    done = lake.expire(cutoff)
    print(f"lake: deleted {done.partitions} partition(s) ({done.files_in} file(s)) dated "
          f"before {cutoff}")
    if done.skipped:
        print(f"lake: kept {len(done.skipped)} partition(s) whose name is not a date: "
              f"{', '.join(done.skipped)}")
    return ExitCode.OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("lake", parents=[common], help="maintain the Parquet landing zone",
                       description="compact: merge each partition's small files (and drop "
                                   "replayed rows). expire: delete date partitions older than "
                                   "lake.retention (or --older-than), in every table.")
    p.add_argument("action", choices=("compact", "expire"),
                   help="compact small files, or expire old date partitions")
    p.add_argument("--older-than", help="expire: e.g. 90d (default: lake.retention)")
    p.set_defaults(func=cmd_lake)
