"""Documented walkthroughs, run on a real demo's data (bundled Triton, the gateway, the evaluator):

- the README's drift walkthrough: on a fresh install the drift command says what it lacks, and
  the documented sequence (the demo, then drift over the demo's store) runs;
- the daily report job's push (deploy/k8s/config/push_report.py, run by the CronJob and by the
  Compose `report` service): what it sends is what the report alerts read.

The demo here sends `make demo`'s fraud traffic (the same seeded rows, so the same verdicts) but
less price traffic (4,600 requests instead of 8,000), which the documented windows still fit: the
live window is the last few seconds before the newest inference, the reference everything before.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from evaluator.cli import read_decision
from tests.conftest import PushCapture
from tests.integration.test_deploy import DEPLOY, ROOT

pytestmark = [pytest.mark.triton, pytest.mark.timeout(900)]

README = ROOT / "README.md"
PUSH_SCRIPT = DEPLOY / "k8s" / "config" / "push_report.py"


def run_python(argv: list[str], cwd: Path,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose var/demo holds a finished demo run (log, store, reports)."""
    root = tmp_path_factory.mktemp("demo")
    demo = run_python(["-m", "understudy_demo.run", "--work", str(root / "var" / "demo"),
                       "--requests", "8000", "--price-requests", "600"], ROOT)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    # The README's commands run in a checkout: its configs/ (feature names, routes) are there.
    (root / "configs").symlink_to(ROOT / "configs")
    return root


def readme_drift_block() -> list[str]:
    """The commands of the README's fenced block that runs `make demo` and then drift."""
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        if "make demo" in block and "evaluator drift" in block:
            text = block.replace("\\\n", " ")
            return [ln.split("#", 1)[0].strip() for ln in text.splitlines()
                    if ln.split("#", 1)[0].strip()]
    raise AssertionError("README has no block running `make demo` and then `evaluator drift`")


def test_readme_drift_command_fails_clearly_on_a_fresh_install(tmp_path: Path) -> None:
    quoted = re.search(r"`(python -m evaluator drift [^`]*)`", README.read_text())
    assert quoted is not None
    proc = run_python(shlex.split(quoted.group(1))[1:], tmp_path)
    assert proc.returncode == 1
    assert "no evaluator store" in proc.stderr  # what the README says it prints


def test_readme_drift_walkthrough_runs_on_the_demos_store(demo_root: Path) -> None:
    make_demo, drift = readme_drift_block()
    assert make_demo == "make demo"
    argv = shlex.split(drift)
    assert argv[:3] == ["python", "-m", "evaluator"]
    assert "var/demo/evaluator.db" in argv
    proc = run_python(argv[1:], demo_root)  # var/demo/... is the demo's work dir
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verdict STABLE" in proc.stdout
    assert (demo_root / "var" / "drift" / "drift.json").is_file()


async def test_report_job_pushes_what_the_report_alerts_read(
        demo_root: Path, pushgateway: PushCapture) -> None:
    """push_report.py after a real report: POSTed to the job/route group the alerts aggregate
    by, as Prometheus text with the exit code, the success time and each challenger's decision."""
    out = demo_root / "report-job" / "fraud"
    report = run_python(["-m", "evaluator", "report", "--store",
                         str(demo_root / "var" / "demo" / "evaluator.db"),
                         "--route", "fraud", "--out", str(out)], demo_root)
    assert report.returncode == 0, report.stderr[-3000:]
    # In a thread: the capturing server answers on this event loop meanwhile.
    proc = await asyncio.to_thread(
        run_python, [str(PUSH_SCRIPT), "fraud", str(report.returncode), str(out)],
        demo_root, {"PUSHGATEWAY_URL": pushgateway.url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ((method, path, body),) = pushgateway.pushes
    assert (method, path) == ("POST", "/metrics/job/understudy-report/route/fraud")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("understudy_report_last_exit_code", ())] == 0
    assert samples[("understudy_report_last_success_timestamp_seconds", ())] > 0
    # The route's decision as `read_decision` takes it from report.json, the one series the
    # alerts (UnderstudyChallengerPromotable / ...Blocked) fire on. Which verdict the demo earns
    # is not this test's business: on a busy machine a challenger's Triton stub can stall, and
    # its latency guardrail then says the clustered tail leaves too few effective latencies to
    # judge (INCONCLUSIVE), correctly from what it measured
    # (tests/integration/test_latency_stall.py).
    verdict, model, _ = read_decision(json.loads((out / "report.json").read_text()))
    assert verdict and model in {"fraud_v4", "fraud_v5"}, (verdict, model)
    pushed = {labels: value for (name, labels), value in samples.items()
              if name == "understudy_report_decision"}
    assert pushed == {(("model", model), ("verdict", verdict)): 1}, pushed
