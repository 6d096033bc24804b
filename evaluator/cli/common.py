"""What every evaluator command shares: the exit codes, loading the config, timestamps."""

from __future__ import annotations

import argparse
import enum
import time
from importlib import metadata
from pathlib import Path

from evaluator.config import DEFAULT_CONFIG_PATH, EvaluatorConfig, load_config, with_store_path


# TODO(lead): `understudy.cli.ExitCode` is not on main yet; this is the same IntEnum (values and
# names as in CONTRACT.md). Replace it with `from understudy.cli import ExitCode` once it lands.
class ExitCode(enum.IntEnum):
    """Exit status of every evaluator command, the same convention as the gateway's CLI."""

    OK = 0
    FAILED = 1  # an error: the store, a server error, anything unexpected
    USAGE = 2  # bad arguments or configuration
    NOTHING = 3  # nothing to do: no labelled data yet, or no decision to apply
    REFUSED = 4  # refused: the gateway said no (4xx), or the report is stale / does not match
    BLOCKED = 5  # a guardrail failed: the challenger is blocked
    UNREACHABLE = 6  # the gateway (or another service) could not be reached


EXIT_CODES_HELP = (
    "exit status: 0 ok, 1 failed, 2 usage or config error, 3 nothing to do, "
    "4 refused (the gateway said no, or the report is stale), 5 blocked by a guardrail, "
    "6 unreachable"
)
TOKEN_ENV = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret


def version() -> str:
    """The installed distribution's version (a checkout that was never installed says so)."""
    try:
        return metadata.version("understudy")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def load(args: argparse.Namespace) -> EvaluatorConfig:
    """The config of `--config` (else configs/evaluator.yaml when present), `--store` applied."""
    path = args.config
    if path is None and Path(DEFAULT_CONFIG_PATH).exists():
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    if getattr(args, "store", None):
        config = with_store_path(config, args.store)
    return config


def fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "…"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
