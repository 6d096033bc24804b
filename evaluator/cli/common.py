"""What every evaluator command shares: loading the config, printing timestamps.

The exit codes, `--version` and the closed-pipe handling are `understudy.cli`'s, shared with the
gateway's command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evaluator.config import DEFAULT_CONFIG_PATH, EvaluatorConfig, load_config, with_store_path

TOKEN_ENV = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret


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
