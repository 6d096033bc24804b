"""The mypy ratchet: per-module error counts may go down, never up."""

from __future__ import annotations

import json
from pathlib import Path

from devtools import mypy_ratchet as R

OUTPUT = """\
evaluator/drift/windows.py:12: error: Missing type arguments  [type-arg]
evaluator/drift/windows.py:12: note: See https://mypy.readthedocs.io
evaluator/drift/readers.py:3:5: error: Returning Any  [no-any-return]
evaluator/cli.py:7: error: Call to untyped function  [no-untyped-call]
Found 3 errors in 3 files (checked 40 source files)
"""


def test_errors_are_counted_per_module_and_notes_are_not_errors() -> None:
    assert R.count_errors(OUTPUT) == {
        "evaluator/drift/windows": 1, "evaluator/drift/readers": 1, "evaluator/cli": 1}


def test_a_module_split_into_a_package_of_the_same_name_keeps_its_allowance() -> None:
    counts = R.by_key(R.count_errors(OUTPUT), ["evaluator/drift", "evaluator/cli"])
    assert counts == {"evaluator/drift": 2, "evaluator/cli": 1}
    assert R.compare({"evaluator/drift": 2, "evaluator/cli": 1}, counts).ok


def test_a_rise_or_errors_in_a_clean_module_fail_and_a_fall_is_reported() -> None:
    result = R.compare({"evaluator/drift": 3, "evaluator/cli": 1},
                       {"evaluator/drift": 2, "evaluator/cli": 2, "evaluator/store/core": 1})
    assert not result.ok
    assert result.worse == {"evaluator/cli": (1, 2), "evaluator/store/core": (0, 1)}
    assert result.better == {"evaluator/drift": (3, 2)}


def test_update_only_lowers_counts_and_drops_clean_modules() -> None:
    assert R.lowered({"a": 3, "b": 1, "c": 2}, {"a": 5, "c": 1}) == {"a": 3, "c": 1}


def test_the_command_runs_mypy_and_fails_when_a_count_goes_up(tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    # A fresh cache: mypy's shared one would replay an earlier run's errors (and paths) for a
    # module of the same name and content.
    monkeypatch.setenv("MYPY_CACHE_DIR", str(tmp_path / "mypy-cache"))
    module = tmp_path / "untyped.py"
    module.write_text("def f(x):\n    return x\n")  # strict: one no-untyped-def error
    key = str(module)[:-3]
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({key: 0}))
    assert R.main([str(module), "--baseline", str(baseline)]) == 1
    assert f"{key}: 1 mypy errors, 0 allowed" in capsys.readouterr().err
    baseline.write_text(json.dumps({key: 2}))
    assert R.main([str(module), "--baseline", str(baseline), "--update"]) == 0
    assert json.loads(baseline.read_text()) == {key: 1}
