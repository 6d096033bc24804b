"""What both command lines share: `--version`, one exit-code table, a quiet closed pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from understudy.cli import ExitCode

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("program", ["gateway", "evaluator"])
def test_version_flag(program: str) -> None:
    out = subprocess.run([sys.executable, "-m", program, "--version"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"python -m {program} ")


def test_unreachable_gateway_exits_with_the_shared_code() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "challengers", "list",
                          "--gateway", "http://127.0.0.1:1", "--timeout", "2"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode == ExitCode.UNREACHABLE
    assert "cannot reach the gateway" in out.stderr


def test_usage_errors_name_the_argument_not_an_internal_dest() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "challengers"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode == ExitCode.USAGE
    assert "COMMAND" in out.stderr and "challengers_command" not in out.stderr


def test_every_argument_has_help() -> None:
    """`--help` is the reference: an argument without help text is undocumented."""
    import argparse

    from gateway.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif action.help is None and action.dest != "help":
                missing.append(f"{path} {action.option_strings or action.dest}")

    walk(build_parser(), "gateway")
    assert missing == []


def test_closed_stdout_is_not_a_traceback(tmp_path: Path) -> None:
    """`... | head -1` closes the pipe early: the command must end without a traceback."""
    script = ("import sys\nfrom understudy.cli import run\n"
              "def main():\n    for i in range(200000):\n        print('line', i)\n    return 0\n"
              "sys.exit(run(main))\n")
    with (tmp_path / "stderr").open("wb") as stderr, subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=stderr) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.stdout.close()
        proc.wait(timeout=60)
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert proc.returncode == ExitCode.FAILED
