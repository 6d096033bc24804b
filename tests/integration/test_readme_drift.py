"""The README's drift walkthrough works as written: on a fresh install the drift command says
what it lacks, and the documented sequence (the demo, then drift over the demo's store) runs.

The demo here sends less traffic than `make demo` (3,600 requests instead of 8,000; tens of
seconds on these machines), which the documented windows still fit: the live window is the last
few seconds before the newest inference, the reference everything before it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_deploy import ROOT

pytestmark = pytest.mark.triton

README = ROOT / "README.md"


def readme_drift_block() -> list[str]:
    """The commands of the README's fenced block that runs `make demo` and then drift."""
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        if "make demo" in block and "evaluator drift" in block:
            text = block.replace("\\\n", " ")
            return [ln.split("#", 1)[0].strip() for ln in text.splitlines()
                    if ln.split("#", 1)[0].strip()]
    raise AssertionError("README has no block running `make demo` and then `evaluator drift`")


def run_python(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_readme_drift_command_fails_clearly_on_a_fresh_install(tmp_path: Path) -> None:
    quoted = re.search(r"`(python -m evaluator drift [^`]*)`", README.read_text())
    assert quoted is not None
    proc = run_python(shlex.split(quoted.group(1))[1:], tmp_path)
    assert proc.returncode == 1
    assert "no evaluator store" in proc.stderr  # what the README says it prints


@pytest.mark.timeout(900)
def test_readme_drift_walkthrough_runs_on_the_demos_store(tmp_path: Path) -> None:
    make_demo, drift = readme_drift_block()
    assert make_demo == "make demo"
    work = tmp_path / "var" / "demo"
    demo = run_python(["-m", "understudy_demo.run", "--work", str(work), "--requests", "3000",
                       "--price-requests", "600"], ROOT)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    argv = shlex.split(drift)
    assert argv[:3] == ["python", "-m", "evaluator"]
    assert "var/demo/evaluator.db" in argv
    proc = run_python(argv[1:], tmp_path)  # var/demo/... resolves to the demo's work dir
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verdict STABLE" in proc.stdout
    assert (tmp_path / "var" / "drift" / "drift.json").is_file()
