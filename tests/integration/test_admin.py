"""The admin API through real HTTP against real Triton: register, promote, roll back, validate,
authenticate, audit; and the `python -m gateway` admin commands as a real subprocess."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayFactory, GatewayHandle, fraud_body
from understudy.cli import ExitCode

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[2]
FRAUD_V3_ONLY = {"fraud": {"champion": {"model": "fraud_v3"}}}
FRAUD_WITH_V4 = {"fraud": {"champion": {"model": "fraud_v3"},
                           "challengers": [{"model": "fraud_v4", "sample_rate": 1.0}]}}


async def call(
    gw: GatewayHandle, method: str, path: str, token: str | None, body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """One admin call: (status, decoded JSON body, response headers)."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data = orjson.dumps(body) if body is not None else None
    if data is not None:
        hdrs["Content-Type"] = "application/json"
    async with gw.session.request(method, gw.url + "/admin" + path, data=data,
                                  headers=hdrs) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None, resp.headers


async def infer(gw: GatewayHandle, request_id: str, route: str = "fraud") -> str:
    """One inference; returns the X-Served-Model header."""
    resp = await gw.post_json(f"/v2/models/{route}/infer", fraud_body([[0.1] * 8], request_id))
    assert resp.status == 200, await resp.read()
    return resp.headers["X-Served-Model"]


async def test_register_challenger_starts_mirroring(make_gateway: GatewayFactory,
                                                    tokens: dict[str, str]) -> None:
    gw = await make_gateway(FRAUD_V3_ONLY)
    await infer(gw, "before")
    status, route, headers = await call(gw, "POST", "/routes/fraud/challengers", tokens["write"],
                                        {"model": "fraud_v4", "mode": "shadow",
                                         "sample_rate": 1.0, "timeout_ms": 2000,
                                         "max_concurrency": 4, "max_queue": 8})
    assert status == 201, route
    assert [c["model"] for c in route["challengers"]] == ["fraud_v4"]
    assert route["challengers"][0]["max_concurrency"] == 4
    assert route["version"] == 2
    assert headers["ETag"] == '"2"'
    for i in range(5):
        assert await infer(gw, f"after-{i}") == "fraud_v3"
    await gw.stop()
    records = {r["request_id"]: r for r in gw.records()}
    assert "fraud_v4" not in records["before"]["outputs"]
    for i in range(5):
        outcome = records[f"after-{i}"]["outputs"]["fraud_v4"]
        assert outcome["status"] == "ok"
        assert outcome["mode"] == "shadow"
        assert 0.0 <= outcome["outputs"]["score"]["data"][0] <= 1.0


async def test_promote_then_rollback(make_gateway: GatewayFactory,
                                     tokens: dict[str, str]) -> None:
    gw = await make_gateway(FRAUD_WITH_V4)
    assert await infer(gw, "p0") == "fraud_v3"
    status, route, _ = await call(gw, "POST", "/routes/fraud/promote", tokens["write"],
                                  {"model": "fraud_v4"})
    assert status == 200, route
    assert route["champion"]["model"] == "fraud_v4"
    assert route["rollback_to"]["model"] == "fraud_v3"
    # The old champion stays on as a shadow challenger, so rollback is one call.
    assert [(c["model"], c["mode"]) for c in route["challengers"]] == [("fraud_v3", "shadow")]
    assert await infer(gw, "p1") == "fraud_v4"

    status, route, _ = await call(gw, "POST", "/routes/fraud/rollback", tokens["write"])
    assert status == 200, route
    assert route["champion"]["model"] == "fraud_v3"
    assert [c["model"] for c in route["challengers"]] == ["fraud_v4"]
    assert route["rollback_to"] is None
    assert await infer(gw, "p2") == "fraud_v3"

    status, body, _ = await call(gw, "POST", "/routes/fraud/rollback", tokens["write"])
    assert status == 409
    assert "no promotion to roll back" in body["error"]
    status, body, _ = await call(gw, "POST", "/routes/fraud/promote", tokens["write"],
                                 {"model": "fraud_v5"})
    assert status == 404
    assert "no challenger 'fraud_v5'" in body["error"]
    await gw.stop()
    records = {r["request_id"]: r for r in gw.records()}
    assert records["p1"]["served"]["model"] == "fraud_v4"
    assert records["p1"]["outputs"]["fraud_v3"]["status"] == "ok"  # mirrored after promotion


@pytest.mark.parametrize(("model", "status", "message"), [
    ("fraud_v99", 422, "challenger model 'fraud_v99' is not known to Triton"),
    ("fraud_wide", 422, "input 'features' shape [-1, 9] does not match champion "
                        "fraud_v3's [-1, 8]"),
])
async def test_bad_challenger_is_refused_and_route_unchanged(
    make_gateway: GatewayFactory, tokens: dict[str, str], model: str, status: int, message: str,
) -> None:
    gw = await make_gateway(FRAUD_WITH_V4)
    _, before, _ = await call(gw, "GET", "/routes/fraud", tokens["read"])
    got, body, _ = await call(gw, "POST", "/routes/fraud/challengers", tokens["write"],
                              {"model": model})
    assert got == status, body
    assert message in body["error"]
    _, after, _ = await call(gw, "GET", "/routes/fraud", tokens["read"])
    assert after == before
    await infer(gw, "still-fine")
    _, audit, _ = await call(gw, "GET", "/audit?route=fraud", tokens["read"])
    rejected = audit["entries"][0]
    assert rejected["outcome"] == "rejected"
    assert rejected["action"] == "add_challenger"
    assert message in rejected["error"]
    assert rejected["request"]["model"] == model
    await gw.stop()
    record = next(r for r in gw.records() if r["request_id"] == "still-fine")
    assert set(record["outputs"]) == {"fraud_v3", "fraud_v4"}


async def test_malformed_changes_get_clear_4xx(make_gateway: GatewayFactory,
                                               tokens: dict[str, str]) -> None:
    gw = await make_gateway(FRAUD_WITH_V4)
    write = tokens["write"]
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/routes/fraud/challengers", {"model": "fraud_v5", "sample_rate": 1.5}, 400,
         "sample_rate: must be in [0, 1]"),
        ("POST", "/routes/fraud/challengers", {"model": "fraud_v5", "mode": "mirror"}, 400,
         "mode: must be one of"),
        ("POST", "/routes/fraud/challengers", {"model": "fraud_v4"}, 409,
         "challenger 'fraud_v4' is already registered on route 'fraud'"),
        ("POST", "/routes/fraud/challengers", {"model": "fraud_v3"}, 409,
         "is the champion of route 'fraud'"),
        ("POST", "/routes/fraud/challengers", {"model": "fraud_v5", "colour": 1}, 400,
         "unknown key(s) colour"),
        ("POST", "/routes/nope/challengers", {"model": "fraud_v5"}, 404, "unknown route 'nope'"),
        ("DELETE", "/routes/fraud/challengers/fraud_v5", None, 404,
         "route 'fraud' has no challenger 'fraud_v5'"),
        ("PUT", "/routes/fraud/policy", {"type": "greedy"}, 400, "policy.type: must be one of"),
        ("PUT", "/routes/fraud/policy", {"type": "epsilon_greedy", "epsilon": 2}, 400,
         "epsilon: must be in [0, 1]"),
        ("POST", "/routes/fraud/promote", {}, 400, "name the challenger to promote"),
        ("POST", "/routes/fraud/promote", [1], 400, "must be a JSON object"),
        ("GET", "/routes/nope", None, 404, "unknown route 'nope'"),
    ]
    for method, path, body, status, message in cases:
        got, payload, _ = await call(gw, method, path, write, body)
        assert got == status, (method, path, payload)
        assert message in payload["error"], (message, payload)
    resp = await gw.session.post(gw.url + "/admin/routes/fraud/challengers", data=b"{oops",
                                 headers={"Authorization": f"Bearer {write}"})
    assert resp.status == 400
    assert "malformed JSON" in (await resp.json())["error"]
    _, route, _ = await call(gw, "GET", "/routes/fraud", write)
    assert route["version"] == 1  # nothing above changed anything


async def test_create_replace_delete_route_and_compare_and_set(
    make_gateway: GatewayFactory, tokens: dict[str, str],
) -> None:
    gw = await make_gateway(FRAUD_V3_ONLY)
    write = tokens["write"]
    status, body, _ = await call(gw, "PUT", "/routes/fraud2", write,
                                 {"champion": {"model": "fraud_nope"}})
    assert status == 422
    assert "champion model 'fraud_nope' is not known" in body["error"]
    status, route, _ = await call(gw, "PUT", "/routes/fraud2", write, {
        "champion": {"model": "fraud_v5"},
        "challengers": [{"model": "fraud_wide"}],
    })
    assert status == 422
    assert "does not match champion fraud_v5's [-1, 8]" in route["error"]
    status, route, _ = await call(gw, "PUT", "/routes/fraud2", write, {
        "champion": {"model": "fraud_v5"}, "challengers": [{"model": "fraud_v3"}],
    })
    assert status == 201, route
    assert await infer(gw, "r2", route="fraud2") == "fraud_v5"
    # GET -> edit -> PUT works (read-only fields are ignored), and replaces the route.
    route["challengers"] = []
    status, route, _ = await call(gw, "PUT", "/routes/fraud2", write, route)
    assert status == 200
    assert route["challengers"] == []
    assert route["version"] == 2
    # Compare-and-set: a change based on a stale version is refused with 409.
    status, body, _ = await call(gw, "PUT", "/routes/fraud2/policy", write, {"type": "champion"},
                                 headers={"If-Match": '"1"'})
    assert status == 409
    assert "is at version 2, not 1" in body["error"]
    status, route, _ = await call(gw, "PUT", "/routes/fraud2/policy", write,
                                  {"type": "champion", "expected_version": 2})
    assert status == 200
    assert route["version"] == 3
    status, body, _ = await call(gw, "DELETE", "/routes/fraud2", write)
    assert status == 200
    assert body == {"deleted": "fraud2"}
    resp = await gw.post_json("/v2/models/fraud2/infer", fraud_body([[0.1] * 8]))
    assert resp.status == 404
    status, body, _ = await call(gw, "GET", "/routes", write)
    assert [r["name"] for r in body["routes"]] == ["fraud"]
    status, body, _ = await call(gw, "PUT", "/routes/bad name", write,
                                 {"champion": {"model": "fraud_v5"}})
    assert status == 400
    assert "route name" in body["error"]


async def test_auth_scopes_and_no_token_leaks(
    make_gateway: GatewayFactory, tokens: dict[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(FRAUD_WITH_V4)
    write, read = tokens["write"], tokens["read"]
    add = {"model": "fraud_v5"}
    # No token: 401 with a bearer challenge.
    status, body, headers = await call(gw, "POST", "/routes/fraud/challengers", None, add)
    assert status == 401
    assert "missing bearer token" in body["error"]
    assert headers["WWW-Authenticate"].startswith('Bearer realm="understudy-admin"')
    status, _, headers = await call(gw, "GET", "/routes", None)
    assert status == 401
    assert "WWW-Authenticate" in headers
    # Wrong token, and a token of the right length but the wrong content: 401.
    same_length = ("x" if write[0] != "x" else "y") + write[1:]
    for bad in ("nope", same_length, write + "x", f"{write} "[:-2]):
        status, body, headers = await call(gw, "POST", "/routes/fraud/challengers", bad, add)
        assert status == 401, bad
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    status, body, _ = await call(gw, "GET", "/routes", None, headers={"Authorization": write})
    assert status == 401
    assert "Bearer <token>" in body["error"]
    # Read token: reads yes, writes 403.
    status, _, _ = await call(gw, "GET", "/routes", read)
    assert status == 200
    status, body, headers = await call(gw, "POST", "/routes/fraud/challengers", read, add)
    assert status == 403
    assert "read-only scope" in body["error"]
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    status, body, _ = await call(gw, "POST", "/routes/fraud/promote", read, {"model": "fraud_v4"})
    assert status == 403
    # Write token: both.
    status, who, _ = await call(gw, "GET", "/whoami", write)
    assert status == 200
    assert who["scope"] == "write"
    assert len(who["fingerprint"]) == 12
    status, _, _ = await call(gw, "POST", "/routes/fraud/challengers", write, add)
    assert status == 201
    # The data plane needs no token.
    assert await infer(gw, "open") == "fraud_v3"
    _, audit, _ = await call(gw, "GET", "/audit", read)
    applied = [e for e in audit["entries"] if e["outcome"] == "applied"]
    assert applied[0]["actor"] == who
    await gw.stop()
    # No token, nor any piece of one, in logs, audit entries or log records.
    audit_files = orjson.dumps(gw.records("audit")).decode()
    everything = caplog.text + orjson.dumps(audit).decode() + audit_files
    for token in (write, read):
        assert token not in everything
        assert token[:12] not in everything
    assert "Bearer" not in caplog.text


async def test_writes_refused_without_a_write_token(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = secrets.token_urlsafe(32)
    monkeypatch.delenv("UNDERSTUDY_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("UNDERSTUDY_ADMIN_READ_TOKEN", read)
    gw = await make_gateway(FRAUD_V3_ONLY)
    for token in (None, read, "anything"):
        status, body, _ = await call(gw, "POST", "/routes/fraud/challengers", token,
                                     {"model": "fraud_v4"})
        assert status == 403
        assert "no write token is configured" in body["error"]
        assert "UNDERSTUDY_ADMIN_TOKEN" in body["error"]
    status, _, _ = await call(gw, "GET", "/routes/fraud", read)
    assert status == 200
    monkeypatch.delenv("UNDERSTUDY_ADMIN_READ_TOKEN")
    closed = await make_gateway(FRAUD_V3_ONLY)
    status, body, _ = await call(closed, "GET", "/routes", None)
    assert status == 403
    assert "the admin API is disabled" in body["error"]


async def test_policy_change_is_live_and_audited(make_gateway: GatewayFactory,
                                                 tokens: dict[str, str]) -> None:
    gw = await make_gateway({"fraud": {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v4", "mode": "explore"}],
    }})
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.1] * 8]))
    assert resp.headers["X-Route-Policy"] == "champion"
    status, route, _ = await call(gw, "PUT", "/routes/fraud/policy", tokens["write"],
                                  {"type": "epsilon_greedy", "epsilon": 1.0})
    assert status == 200, route
    assert route["policy"]["type"] == "epsilon_greedy"
    assert route["policy"]["epsilon"] == 1.0
    served = set()
    for i in range(40):
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.1] * 8], f"e{i}"))
        assert resp.status == 200
        assert resp.headers["X-Route-Policy"] == "epsilon_greedy"
        served.add(resp.headers["X-Served-Model"])
    assert served == {"fraud_v3", "fraud_v4"}  # explores without a restart
    _, audit, _ = await call(gw, "GET", "/audit", tokens["read"])
    entry = audit["entries"][0]
    assert entry["action"] == "set_policy"
    assert entry["outcome"] == "applied"
    assert entry["route"] == "fraud"
    assert entry["version"] == 2
    assert entry["before"]["policy"]["type"] == "champion"
    assert entry["after"]["policy"]["type"] == "epsilon_greedy"
    assert entry["actor"]["scope"] == "write"
    assert entry["actor"]["fingerprint"]
    assert entry["ts"] > 0
    await gw.stop()
    stream = [e for e in gw.records("audit") if e["action"] == "set_policy"]
    assert len(stream) == 1
    assert stream[0]["id"] == entry["id"]
    assert stream[0]["kind"] == "audit"
    assert stream[0]["schema_version"] == 1


# -- CLI ----------------------------------------------------------------------------------


async def cli(gw: GatewayHandle, *args: str, token: str | None) -> tuple[int, str, str]:
    """`python -m gateway ARGS --gateway URL` as a real subprocess (the loop keeps serving)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNDERSTUDY_")}
    if token is not None:
        env["UNDERSTUDY_ADMIN_TOKEN"] = token
    env["UNDERSTUDY_GATEWAY"] = gw.url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_drives_the_admin_api(make_gateway: GatewayFactory,
                                        tokens: dict[str, str]) -> None:
    gw = await make_gateway(FRAUD_V3_ONLY)
    write = tokens["write"]
    code, out, err = await cli(gw, "challengers", "list", "--json", token=tokens["read"])
    assert code == 0, err
    assert [r["name"] for r in orjson.loads(out)["routes"]] == ["fraud"]

    code, out, err = await cli(gw, "challengers", "add", "fraud", "fraud_v4",
                               "--sample-rate", "0.5", "--max-concurrency", "4", token=write)
    assert code == 0, err
    assert "added challenger fraud_v4" in out
    assert "sample_rate=0.5" in out

    code, out, err = await cli(gw, "challengers", "add", "fraud", "fraud_wide", token=write)
    assert code == ExitCode.REFUSED
    assert "input 'features' shape [-1, 9] does not match champion fraud_v3's [-1, 8]" in err

    code, out, err = await cli(gw, "promote", "fraud", "fraud_v4", "--json", token=write)
    assert code == 0, err
    assert orjson.loads(out)["champion"]["model"] == "fraud_v4"
    assert await infer(gw, "cli-1") == "fraud_v4"

    code, out, err = await cli(gw, "rollback", "fraud", token=write)
    assert code == 0, err
    assert "fraud_v3 is champion again" in out
    assert await infer(gw, "cli-2") == "fraud_v3"

    code, out, err = await cli(gw, "policy", "fraud", "--type", "epsilon_greedy",
                               "--epsilon", "0.2", "--json", token=write)
    assert code == ExitCode.REFUSED  # nothing to explore: fraud_v4 is a shadow
    assert "has none" in err and "mode 'explore'" in err

    code, out, err = await cli(gw, "challengers", "update", "fraud", "fraud_v4", "--mode",
                               "explore", "--sample-rate", "0.25", token=write)
    assert code == 0, err
    assert "explore" in out and "sample_rate=0.25" in out and "experiment=v" in out

    code, out, err = await cli(gw, "policy", "fraud", "--type", "epsilon_greedy",
                               "--epsilon", "0.2", "--json", token=write)
    assert code == 0, err
    assert orjson.loads(out)["policy"] == {**orjson.loads(out)["policy"],
                                           "type": "epsilon_greedy", "epsilon": 0.2}

    # The last explore arm of an exploring route cannot go: 422, and nothing changes.
    code, out, err = await cli(gw, "challengers", "remove", "fraud", "fraud_v4", "--json",
                               token=write)
    assert code == ExitCode.REFUSED and orjson.loads(out)["status"] == 422, err
    code, out, err = await cli(gw, "policy", "fraud", "--type", "champion", token=write)
    assert code == 0, err

    code, out, err = await cli(gw, "challengers", "remove", "fraud", "fraud_v4", token=write)
    assert code == 0, err
    assert "(no challengers)" in out

    code, out, err = await cli(gw, "audit", "--route", "fraud", token=write)
    assert code == 0, err
    assert "remove_challenger" in out.splitlines()[0]
    assert "rejected" in out

    code, out, err = await cli(gw, "promote", "fraud", "fraud_v4", token=None)
    assert code == ExitCode.REFUSED
    assert "missing bearer token" in err
    assert "UNDERSTUDY_ADMIN_TOKEN" in err
    code, out, err = await cli(gw, "challengers", "remove", "fraud", "nope", "--json",
                               token=write)
    assert code == ExitCode.REFUSED
    assert orjson.loads(out)["status"] == 404
    assert "no challenger 'nope'" in err
    code, out, err = await cli(gw, "challengers", "list", "--gateway", "http://127.0.0.1:1",
                               token=write)
    assert code == ExitCode.UNREACHABLE
    assert "cannot reach the gateway" in err
    assert write not in out + err
