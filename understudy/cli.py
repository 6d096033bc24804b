"""What both command lines share: one exit-code convention, `--version`, and a quiet closed pipe.

Scripts and CronJobs branch on exit codes, so the gateway's and the evaluator's commands must mean
the same thing by the same number.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
from collections.abc import Callable
from importlib import metadata


class ExitCode(enum.IntEnum):
    """Exit status of every `understudy-gateway` / `understudy-evaluator` command."""

    OK = 0
    FAILED = 1  # an error: the store, a server error, anything unexpected
    USAGE = 2  # bad arguments or configuration (argparse's own code)
    NOTHING = 3  # nothing to do: no labelled data yet, or no decision to apply
    REFUSED = 4  # refused: the gateway said no (4xx), or the report is stale / does not match
    BLOCKED = 5  # a guardrail failed: the challenger is blocked
    UNREACHABLE = 6  # the gateway (or another service) could not be reached


EXIT_CODES_HELP = (
    "exit status: 0 ok, 1 failed, 2 usage or config error, 3 nothing to do, "
    "4 refused (the gateway said no, or the report is stale), 5 blocked by a guardrail, "
    "6 unreachable"
)


def version() -> str:
    """The installed distribution's version (a source checkout that was never installed says so)."""
    try:
        return metadata.version("understudy")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")


def run(main: Callable[[], int]) -> int:
    """Run a CLI's main so that `... --json | head` ends quietly instead of with a traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away: point stdout at /dev/null so the interpreter's final flush
        # does not raise again, and exit like other Unix tools killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.FAILED
    return int(code)
