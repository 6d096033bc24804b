"""`evaluator drift`: the command's arguments (the run itself is `evaluator.drift.command`)."""

from __future__ import annotations

import argparse

from evaluator.cli.common import load


def cmd_drift(args: argparse.Namespace) -> int:
    """Compare the live window with its reference; see `evaluator.drift.command`."""
    from evaluator.drift.command import run_command  # scipy: imported only when drift runs

    return run_command(args, load(args))


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("drift", parents=[common], help="data and prediction drift of a route",
                       description="Compare the route's live window with a reference (a "
                                   "training snapshot file or a past window of the log): PSI, "
                                   "KS, Wasserstein, chi-squared, Jensen-Shannon, unseen "
                                   "categories, score drift per model. See docs/DRIFT.md.")
    p.add_argument("--route", required=True, help="the route whose inputs and scores to compare")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference", help="training snapshot: .csv, .jsonl or .parquet "
                                         "(default: drift.reference)")
    ref.add_argument("--reference-window",
                     help="past log window before the live one, e.g. 7d (default: "
                          "drift.reference_window)")
    p.add_argument("--window", help="live window ending at the newest inference, e.g. 1d")
    p.add_argument("--out", help="directory for drift.json / drift.md (default: drift.out)")
    p.add_argument("--push", help="Pushgateway URL (default: drift.pushgateway)")
    p.add_argument("--seasonality", choices=["none", "hour_of_day", "day_of_week",
                                             "day_of_week_hour", "weekday_weekend"],
                   help="reference segments (default: drift.seasonality)")
    p.add_argument("--fixed-thresholds", action="store_true",
                   help="use the fixed PSI/JS conventions, not adaptive thresholds")
    p.add_argument("--no-webhook", action="store_true", help="do not notify the webhook")
    p.add_argument("--serve", type=int, metavar="PORT",
                   help="keep running: recompute every --every and serve /metrics on PORT")
    p.add_argument("--every", help="recompute interval with --serve (default 1h)")
    p.set_defaults(func=cmd_drift)
