"""The evaluator's command line: help for every argument, `--version`, the exit-code convention."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from evaluator import cli
from evaluator.cli import ExitCode, build_parser


def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _parsers(sub)
    return out


def test_every_argument_and_positional_has_help() -> None:
    missing = [f"{prog}: {'/'.join(a.option_strings) or a.dest}"
               for prog, p in _parsers(build_parser()) for a in p._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []
    commands = {name for name, _ in _parsers(build_parser())}
    assert {f"python -m evaluator {c}" for c in ("run", "report", "promote", "drift")} <= commands


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.split()
    assert out[:3] == ["python", "-m", "evaluator"] and len(out) == 4


def test_exit_codes_follow_the_convention() -> None:
    assert [(c.name, int(c)) for c in ExitCode] == [
        ("OK", 0), ("FAILED", 1), ("USAGE", 2), ("NOTHING", 3), ("REFUSED", 4), ("BLOCKED", 5),
        ("UNREACHABLE", 6)]
    assert "6 unreachable" in build_parser().format_help()


def test_a_config_error_is_a_usage_error(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "evaluator.yaml"
    bad.write_text("decision: {alpha: 2}\n")
    assert cli.main(["report", "--config", str(bad), "--route", "fraud"]) == ExitCode.USAGE
    assert "config error" in capsys.readouterr().err
