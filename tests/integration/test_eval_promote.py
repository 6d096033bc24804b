"""`python -m evaluator promote` against a real gateway (real HTTP, real Triton): a report is
applied only while the live route is the state it decided on; a stale one is refused."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluator import cli
from tests.conftest import GatewayFactory, GatewayHandle, fraud_body
from tests.integration.test_admin import call

pytestmark = pytest.mark.triton

ROUTES = {"fraud": {"champion": {"model": "fraud_v3"},
                    "challengers": [{"model": "fraud_v4", "mode": "shadow", "sample_rate": 1.0},
                                    {"model": "fraud_v5", "mode": "shadow",
                                     "sample_rate": 1.0}]}}


async def admin(gw: GatewayHandle, method: str, path: str, token: str,
                body: Any = None) -> tuple[int, Any]:
    status, payload, _ = await call(gw, method, path, token, body)
    return status, payload


def bound_report(path: Path, live: dict[str, Any], challenger: str) -> Path:
    """A PROMOTE report for `challenger` bound to `live` the way evaluator.report binds it
    (decisions[i].experiment: id, route, champion, challenger, data end, registry version)."""
    entry = next(c for c in live["challengers"] if c["model"] == challenger)
    experiment = entry.get("experiment") or {}
    now = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "report_schema_version": 1, "route": "fraud", "generated_at": now,
        "champion": live["champion"]["model"],
        "decisions": [{
            "route": "fraud", "champion": live["champion"]["model"], "challenger": challenger,
            "decision": "PROMOTE", "reasons": ["PROMOTE: better"],
            "experiment": {"id": experiment.get("id"), "started": experiment.get("started"),
                           "route": "fraud", "champion": live["champion"]["model"],
                           "challenger": challenger, "data_end": now - 60,
                           "registry_version": live["version"]},
        }],
    }))
    return path


def config_file(tmp_path: Path, gw: GatewayHandle) -> Path:
    path = tmp_path / "evaluator.yaml"
    path.write_text(json.dumps({"store": {"path": str(tmp_path / "store.duckdb")},
                                "report": {"out": str(tmp_path / "reports")},
                                "gateway": {"url": gw.url}}))
    return path


async def promote(config: Path, report: Path, *extra: str) -> int:
    return await asyncio.to_thread(cli.main, ["promote", "--config", str(config), "--route",
                                              "fraud", "--report", str(report), *extra])


async def test_a_stale_report_is_refused_by_a_real_gateway(
        make_gateway: GatewayFactory, tokens: dict[str, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await make_gateway(ROUTES)
    for i in range(3):
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.1] * 8], f"r{i}"))
        assert resp.status == 200
    config = config_file(tmp_path, gw)
    status, live = await admin(gw, "GET", "/routes/fraud", tokens["read"])
    assert status == 200
    report_v4 = bound_report(tmp_path / "v4" / "report.json", live, "fraud_v4")

    # Bound to the live state: every check passes; dry run prints the versioned request.
    assert await promote(config, report_v4, "--dry-run") == cli.ExitCode.OK
    out = capsys.readouterr().out
    assert f'"model": "fraud_v4", "expected_version": {live["version"]}' in out

    # Someone promotes fraud_v5 meanwhile: the v4 report (v4 vs v3) is stale.
    status, after = await admin(gw, "POST", "/routes/fraud/promote", tokens["write"],
                                {"model": "fraud_v5"})
    assert status == 200 and after["champion"]["model"] == "fraud_v5"
    for extra in (("--dry-run",), ()):
        assert await promote(config, report_v4, *extra) == cli.ExitCode.REFUSED
        err = capsys.readouterr().err
        assert "live champion of 'fraud' is 'fraud_v5'" in err, err
    status, now = await admin(gw, "GET", "/routes/fraud", tokens["read"])
    assert now["champion"]["model"] == "fraud_v5" and now["version"] == after["version"]

    # --route must match the report's route.
    assert await asyncio.to_thread(cli.main, [
        "promote", "--config", str(config), "--route", "price", "--report", str(report_v4),
        "--dry-run"]) == cli.ExitCode.REFUSED
    assert "for route 'fraud', not 'price'" in capsys.readouterr().err

    # A change between the checks and the POST: the gateway's expected_version says 409.
    report_now = bound_report(tmp_path / "now" / "report.json", now, "fraud_v4")
    status, _ = await admin(gw, "DELETE", "/routes/fraud/challengers/fraud_v3",
                            tokens["write"])
    assert status == 200
    with monkeypatch.context() as m:
        m.setattr(cli.promote, "check_live", lambda binding, live: None)  # saw the old state
        assert await promote(config, report_now) == cli.ExitCode.REFUSED
    assert "the gateway refused (409)" in capsys.readouterr().err

    # A report of the current state is applied, with the version precondition.
    status, current = await admin(gw, "GET", "/routes/fraud", tokens["read"])
    report_ok = bound_report(tmp_path / "ok" / "report.json", current, "fraud_v4")
    assert await promote(config, report_ok) == cli.ExitCode.OK
    assert "promoted fraud_v4" in capsys.readouterr().out
    status, final = await admin(gw, "GET", "/routes/fraud", tokens["read"])
    assert final["champion"]["model"] == "fraud_v4"
    assert final["version"] == current["version"] + 1


async def test_a_report_from_real_records_is_bound_to_the_live_route(
        make_gateway: GatewayFactory, tokens: dict[str, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Gateway records -> `evaluator run` -> `evaluator report`: the report carries the
    experiment id and registry version the gateway logged, and `promote` checks them live.
    (The verdict is set to PROMOTE by hand: a real one needs thousands of labels, which
    tests/integration/test_end_to_end.py spends; the binding here is the pipeline's own.)"""
    gw = await make_gateway(ROUTES)
    rng = np.random.default_rng(3)
    n = 40
    for i in range(n):
        resp = await gw.post_json("/v2/models/fraud/infer",
                                  fraud_body([rng.random(8).tolist()], f"q{i}"))
        assert resp.status == 200
    resp = await gw.post_json("/v2/feedback", [{"request_id": f"q{i}", "label": i % 2}
                                               for i in range(n)])
    assert resp.status == 200
    for _ in range(600):  # the file sink writes every 20 ms
        if len(gw.records()) >= n and len(gw.records("labels")) >= n:
            break
        await asyncio.sleep(0.05)
    records = gw.records()
    if "registry_version" not in records[0]:
        pytest.skip("this gateway does not log registry_version / experiment ids yet")
    config = tmp_path / "evaluator.yaml"
    config.write_text(json.dumps({"source": {"path": str(gw.log_dir)},
                                  "store": {"path": str(tmp_path / "store.duckdb")},
                                  "report": {"out": str(tmp_path / "reports")},
                                  "gateway": {"url": gw.url}}))
    for args in (["run", "--once"], ["report", "--route", "fraud"]):  # main thread: signals
        assert cli.main([*args, "--config", str(config)]) == 0
    path = tmp_path / "reports" / "report.json"
    report = json.loads(path.read_text())
    status, live = await admin(gw, "GET", "/routes/fraud", tokens["read"])
    v4 = next(d for d in report["decisions"] if d["challenger"] == "fraud_v4")
    live_v4 = next(c for c in live["challengers"] if c["model"] == "fraud_v4")
    assert v4["experiment"]["id"] == live_v4["experiment"]["id"]
    assert v4["experiment"]["registry_version"] == live["version"]
    assert report["n"] == n
    v4["decision"] = "PROMOTE"
    path.write_text(json.dumps(report))

    assert await promote(config, path, "--dry-run") == cli.ExitCode.OK
    assert (f'"expected_version": {live["version"]}, "experiment": '
            f'"{live_v4["experiment"]["id"]}"') in capsys.readouterr().out
    status, _ = await admin(gw, "POST", "/routes/fraud/promote", tokens["write"],
                            {"model": "fraud_v5"})
    assert status == 200
    assert await promote(config, path) == cli.ExitCode.REFUSED
    assert "live champion of 'fraud' is 'fraud_v5'" in capsys.readouterr().err
