"""The demo tells the truth every time (issue 13 item 8).

`make demo`'s pipeline — bundled Triton, the gateway as its own process, seeded traffic, labels,
the evaluator — runs three times, once while a busy-loop process keeps a core busy. Every run must
reach the same verdicts: fraud_v4 (better) PROMOTE, fraud_v5 (worse) KEEP, and one price verdict.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from understudy_demo.run import main, verdicts

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def _run(work: Path, hog: bool) -> dict[str, str]:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    try:
        assert main(["--work", str(work)]) == 0
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return verdicts(work / "reports")


@pytest.mark.timeout(1200)
def test_demo_verdicts_are_identical_over_three_runs_one_under_a_cpu_hog(
    tmp_path: Path,
) -> None:
    runs = [_run(tmp_path / f"run{i}", hog=(i == 2)) for i in range(3)]
    first = runs[0]
    assert first["fraud/fraud_v4"] == "PROMOTE", runs
    assert first["fraud/fraud_v5"] == "KEEP", runs
    assert "price/price_v2" in first, runs
    assert all(run == first for run in runs), runs
