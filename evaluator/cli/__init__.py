"""`python -m evaluator run|report|promote|drift` (or `understudy-evaluator`): the command line.

- `run --config C [--once]`: the ingest loop (files or Kafka, per `source.type`); `--once`
  drains what is there and exits. SIGTERM/Ctrl-C finish the current batch and stop.
- `report --route R [--window 7d] [--out DIR] [--fail-on-blocked]`: loads every labelled row
  of each challenger's current experiment (`Store.load_experiments`: since the earliest current
  experiment started, whatever the window says), decides each challenger
  (`evaluator.decision.decide` under the route's decision policy) and hands both to
  `evaluator.report.write_report(dataset, decisions, out_dir)`. The window never changes the
  verdict's data; it only selects rows for records without experiment ids (written by gateways
  before experiments existed: one implicit experiment, windowed as it always was).
- `promote --route R [--out DIR | --report PATH] [--dry-run]`: reads the newest `report.json`
  for the route and, only when its decision is PROMOTE and the report is bound to the live
  state, calls `POST {gateway}/admin/routes/{route}/promote` with `{"model", "expected_version",
  "experiment"}` (the gateway answers 409 when either moved meanwhile). Bound means: the
  report's route is --route, it is younger than `decision.max_report_age`, and
  `GET /admin/routes/{route}` shows the report's champion, the challenger with the report's
  experiment id, and the report's registry version. Bearer token from `gateway.token_env`
  (`gateway.read_token_env` is enough for `--dry-run`, which runs every check and prints the
  request).

- `drift --route R [--reference FILE | --reference-window 7d] [--window 1d] [--out DIR]
  [--push URL]`: data and prediction drift of the live window against a training snapshot or a
  past window of the log (evaluator/drift/); prints a per-feature table, writes drift.json and
  drift.md, pushes gauges to a Pushgateway and fires the drift webhook once per episode.
  `--serve PORT --every 1h` keeps running and serves /metrics instead of exiting.

Exit status (`ExitCode`, the same convention as the gateway's CLI): 0 done (`report`: the report
was written, whatever the verdicts); 1 failed (the store, a gateway error, a bad drift reference);
2 usage or config error; 3 nothing to do (no labelled data; `promote` on a decision that is not
PROMOTE); 4 refused: the gateway answered 4xx, or the report is stale or does not match the live
route (`promote`); 5 BLOCKED: a guardrail failed (`promote` on a BLOCKED decision, and `report
--fail-on-blocked` when any challenger is BLOCKED, after writing the report); 6 unreachable: the
gateway (`promote`) or the Pushgateway (`drift --push`) could not be reached.

Modules: `common` (the config, timestamps; the exit codes are `understudy.cli.ExitCode`), one
module per command (`run`, `report`, `promote`, `drift`), each with `add_parser(sub, common)`
registering its parser and `func`; a new command is listed in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from evaluator.cli import drift, promote, report, run
from evaluator.cli.promote import check_live, check_report, read_decision, report_binding
from evaluator.cli.report import compute_decisions, policy_mapping
from evaluator.config import DEFAULT_CONFIG_PATH, ConfigError
from evaluator.store import StoreError
from understudy.cli import EXIT_CODES_HELP, ExitCode, add_version
from understudy.cli import run as run_quietly

COMMANDS: tuple[Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None], ...] = (
    run.add_parser, report.add_parser, promote.add_parser, drift.add_parser,
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG_PATH} when "
                                         "present, else built-in defaults)")
    common.add_argument("--store", help="store path (overrides store.path)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(
        prog="python -m evaluator",
        description="Understudy evaluator: join deferred labels to the inference log, test "
                    "challengers against the champion, and promote only on evidence.",
        epilog=EXIT_CODES_HELP)
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return run_quietly(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    """The command's own exit status; a config error is a usage error, a store error a
    failure, each told in one line rather than a traceback."""
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except StoreError as exc:
        print(f"store error: {exc}", file=sys.stderr)
        return ExitCode.FAILED


__all__ = [
    "COMMANDS",
    "ExitCode",
    "build_parser",
    "check_live",
    "check_report",
    "compute_decisions",
    "main",
    "policy_mapping",
    "read_decision",
    "report_binding",
]
