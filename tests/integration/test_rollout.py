"""Guarded progressive rollouts through the real gateway and real Triton.

A rollout to fraud_flaky (fails 30% of requests, deterministic by input) rolls back on its own;
a rollout to fraud_v4 walks its steps and promotes; a rollout survives a gateway restart; the
CLI (through understudy/client.py) shows and aborts one. Steps use small minimums so each test
runs in seconds; the measured rollback speed is printed (docs/ADMIN.md quotes it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, GatewayHandle, fraud_body
from tests.integration.test_admin import call, cli
from tests.integration.test_registry import _kafka_sections
from tests.support.kafka import unique_topic
from understudy.cli import ExitCode

pytestmark = pytest.mark.triton

V3_V4 = {"fraud": {"champion": {"model": "fraud_v3"},
                   "challengers": [{"model": "fraud_v4", "sample_rate": 0.5}]}}
V3_FLAKY = {"fraud": {"champion": {"model": "fraud_v3"},
                      "challengers": [{"model": "fraud_flaky", "sample_rate": 1.0}]}}


async def send(gw: GatewayHandle, rng: np.random.Generator, request_id: str) -> tuple[int, str]:
    """One inference with random features: (status, served model)."""
    rows = rng.random((1, 8)).astype(np.float32).tolist()
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body(rows, request_id))
    return resp.status, resp.headers.get("X-Served-Model", "")


async def drive(gw: GatewayHandle, token: str, until: Callable[[dict[str, Any]], bool], *,
                limit: int, seed: int = 1, prefix: str = "r"
                ) -> tuple[dict[str, Any], int, dict[str, int]]:
    """Send requests until `until(rollout status view)`; returns (that view, requests sent,
    served counts)."""
    rng = np.random.default_rng(seed)
    served: dict[str, int] = {}
    for i in range(limit):
        _, model = await send(gw, rng, f"{prefix}-{i}")
        served[model] = served.get(model, 0) + 1
        if i % 10 == 9:
            await asyncio.sleep(0.02)  # let the recorder and the controller's tick run
            status, view, _ = await call(gw, "GET", "/routes/fraud/rollout", token)
            assert status == 200, view
            if until(view):
                return view, i + 1, served
    raise AssertionError(f"rollout still {view['status']} after {limit} requests: {view}")


@pytest.fixture
async def webhook() -> Any:
    """A local HTTP endpoint collecting the rollout webhook's POSTs."""
    events: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        events.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/hook", events
    await runner.cleanup()


async def test_a_rollout_to_a_faulty_model_rolls_back_by_itself(
        make_gateway: GatewayFactory, tokens: dict[str, str], webhook: Any) -> None:
    url, events = webhook
    gw = await make_gateway(V3_FLAKY, admin={"rollout_webhook_url": url})
    write = tokens["write"]
    status, view, _ = await call(gw, "POST", "/routes/fraud/rollout", write,
                                 {"model": "fraud_flaky", "steps": [10, 50, 100],
                                  "min_requests": 10_000, "min_seconds": 0})
    assert status == 201, view
    assert (view["status"], view["percent"]) == ("running", 10.0)
    started = time.monotonic()
    view, sent, _ = await drive(gw, tokens["read"], lambda v: v["status"] == "rolled_back",
                                     limit=3000)
    seconds = time.monotonic() - started
    assert view["reason"].startswith("errors guard breached at 10%"), view["reason"]
    errors, step = view["evidence"]["errors"], view["evidence"]["served"]
    print(f"\nrolled back after {step['challenger'] + step['champion']} requests of the step "
          f"({step['challenger']} served by fraud_flaky, {errors['challenger']} of them errors), "
          f"{view['ended_at'] - view['started_at']:.2f} s after the start (client saw it after "
          f"{sent} requests, {seconds:.2f} s)")
    assert errors["challenger"] >= 3 and errors["champion"] == 0
    # the route is back to what it was: the champion serves everything
    route = (await call(gw, "GET", "/routes/fraud", write))[1]
    assert route["policy"]["type"] == "champion"
    assert route["challengers"][0]["mode"] == "shadow"
    assert route["last_action"] == "rollout_rollback"
    assert route["updated_by"] == {"scope": "rollout", "fingerprint": None}
    rng = np.random.default_rng(99)
    assert {(await send(gw, rng, f"after-{i}"))[1] for i in range(20)} == {"fraud_v3"}
    # the alert's metric and the webhook
    async with gw.session.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    assert 'understudy_rollout_transitions_total{event="rolled_back",route="fraud"} 1.0' in text
    for _ in range(50):
        if events:
            break
        await asyncio.sleep(0.05)
    assert [e["event"] for e in events] == ["rollout.rolled_back"]
    assert events[0]["model"] == "fraud_flaky" and events[0]["route"] == "fraud"
    await gw.stop()
    # every request of the step was logged with the rollout policy and its propensity
    records = [r for r in gw.records() if r["policy"]["type"] == "rollout"]
    assert records
    for r in records:
        assert r["arms"] == {"fraud_v3": 0.9, "fraud_flaky": 0.1}
        assert r["propensity"] == r["arms"][r["served"]["model"]]
    audit = [json.dumps(e) for e in gw.records("audit")]
    assert any('"action": "rollout_rollback"' in e and '"outcome": "applied"' in e
               for e in audit) or any('"rollout_rollback"' in e for e in audit)


async def test_a_rollout_to_fraud_v4_walks_its_steps_and_promotes(
        make_gateway: GatewayFactory, tokens: dict[str, str]) -> None:
    gw = await make_gateway(V3_V4)
    write = tokens["write"]
    status, view, _ = await call(gw, "POST", "/routes/fraud/rollout", write,
                                 {"model": "fraud_v4", "steps": [20, 50, 100],
                                  "min_requests": 30, "min_seconds": 0})
    assert status == 201, view
    view, sent, served = await drive(gw, tokens["read"], lambda v: v["status"] != "running",
                                     limit=4000)
    assert view["status"] == "completed", view
    print(f"\ncompleted after {sent} requests: served {served}")
    # Completion and promotion are one change: the view that says "completed" already has the
    # new champion, and so has the very next read of the route.
    assert view["champion"]["model"] == "fraud_v4", view
    route = (await call(gw, "GET", "/routes/fraud", write))[1]
    assert route["champion"]["model"] == "fraud_v4"
    assert route["policy"]["type"] == "champion"
    assert [c["model"] for c in route["challengers"]] == ["fraud_v3"]
    assert route["rollback_to"]["model"] == "fraud_v3"  # one rollback undoes it
    assert route["last_action"] == "rollout_complete"
    assert route["version"] == view["version"]
    audit = (await call(gw, "GET", "/audit?route=fraud", write))[1]["entries"]
    applied = [e for e in audit if e["outcome"] == "applied"]
    assert [(e["action"], e["actor"]["scope"]) for e in applied[:3]] == [
        ("rollout_complete", "rollout"), ("rollout_step", "rollout"), ("rollout_start", "write")]
    assert applied[0]["before"]["champion"]["model"] == "fraud_v3"
    assert applied[0]["after"]["champion"]["model"] == "fraud_v4"
    await gw.stop()
    fractions = {r["policy"].get("fraction") for r in gw.records()
                 if r["policy"]["type"] == "rollout"}
    assert fractions == {0.2, 0.5}


async def test_a_rollout_survives_a_restart_and_the_cli_shows_and_aborts_it(
        make_gateway: GatewayFactory, tokens: dict[str, str], tmp_path: Path) -> None:
    shared = {"state_path": str(tmp_path / "keep" / "registry.json"),
              "rewards_path": str(tmp_path / "keep" / "rewards.jsonl")}
    first = await make_gateway(V3_V4, admin=shared)
    code, out, err = await cli(first, "rollout", "fraud", "fraud_v4", "--steps", "10,30,100",
                               "--min-requests", "20", "--min-seconds", "0",
                               token=tokens["write"])
    assert code == ExitCode.OK, err
    assert "running at 10%" in out
    await drive(first, tokens["read"], lambda v: v["live"]["served"]["champion"] >= 40,
                limit=50)
    await first.stop()

    second = await make_gateway(V3_V4, admin=shared)
    code, out, err = await cli(second, "rollout", "status", "fraud", "--json",
                               token=tokens["write"])
    assert code == ExitCode.OK, err
    view = json.loads(out)
    assert (view["status"], view["target"]) == ("running", "fraud_v4")
    assert view["live"]["served"] == {"challenger": 0, "champion": 0}  # evidence starts again
    route = (await call(second, "GET", "/routes/fraud", tokens["write"]))[1]
    assert route["policy"]["type"] == "rollout"
    # the restarted gateway carries on: it advances the step the first one started
    view, _, _ = await drive(second, tokens["read"], lambda v: v["step"] == 1, limit=2000,
                             seed=3)
    assert (view["status"], view["percent"]) == ("running", 30.0), view
    code, out, err = await cli(second, "rollout", "abort", "fraud", token=tokens["write"])
    assert code == ExitCode.OK, err
    assert "aborted" in out
    route = (await call(second, "GET", "/routes/fraud", tokens["write"]))[1]
    assert route["policy"]["type"] == "champion"
    assert route["challengers"][0] | {"experiment": None} == route["challengers"][0] | {
        "experiment": None, "mode": "shadow", "sample_rate": 0.5}
    # nothing left to abort: the CLI says the gateway refused
    code, _, err = await cli(second, "rollout", "abort", "fraud", token=tokens["write"])
    assert code == ExitCode.REFUSED and "no running rollout" in err


async def test_changes_that_would_break_a_running_rollout_are_refused(
        make_gateway: GatewayFactory, tokens: dict[str, str]) -> None:
    gw = await make_gateway(V3_V4)
    write = tokens["write"]
    status, _, _ = await call(gw, "POST", "/routes/fraud/rollout", write,
                              {"model": "fraud_v4", "min_requests": 1000})
    assert status == 201
    status, body, _ = await call(gw, "POST", "/routes/fraud/rollout", write, {"model": "fraud_v4"})
    assert status == 409 and "already running" in body["error"]
    status, body, _ = await call(gw, "PUT", "/routes/fraud/policy", write, {"type": "champion"})
    assert status == 422 and "abort it first" in body["error"]
    status, body, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                                 {"mode": "shadow"})
    assert status in (400, 422) and "abort the rollout first" in body["error"]
    status, body, _ = await call(gw, "DELETE", "/routes/fraud/challengers/fraud_v4", write)
    assert status == 422 and "abort the rollout first" in body["error"]
    status, body, _ = await call(gw, "POST", "/routes/fraud/rollout", tokens["read"],
                                 {"model": "fraud_v4"})
    assert status == 403
    status, body, _ = await call(gw, "POST", "/routes/fraud/rollout", write,
                                 {"model": "fraud_v4", "steps": [50, 20]})
    assert status == 400


async def drive_pair(first: GatewayHandle, second: GatewayHandle, token: str,
                     limit: int = 4000) -> dict[str, Any]:
    """Alternate requests between two replicas until the rollout ends; its final view."""
    rng = np.random.default_rng(5)
    for i in range(limit):
        await send((first, second)[i % 2], rng, f"k-{i}")
        if i % 20 == 19:
            await asyncio.sleep(0.02)
            view = (await call(first, "GET", "/routes/fraud/rollout", token))[1]
            if view["status"] != "running":
                return dict(view)
    raise AssertionError(f"rollout still running after {limit} requests")


async def test_replicas_sharing_a_state_file_apply_each_step_once(
        make_gateway: GatewayFactory, tokens: dict[str, str], tmp_path: Path) -> None:
    """Both replicas' controllers judge and act; the file store's compare-and-set on the route
    version lets exactly one transition through per step (the other is refused and audited).

    Counted on the replicas' durable audit streams together: one replica's `GET /admin/audit`
    lists another's changes only as far as it saw the states they produced, and a replica
    following the state file can skip an intermediate state (two changes between its polls)."""
    shared = {"state_path": str(tmp_path / "shared" / "registry.json"),
              "rewards_path": str(tmp_path / "shared" / "rewards.jsonl")}
    a, b = await make_gateway(V3_V4, admin=shared), await make_gateway(V3_V4, admin=shared)
    status, view, _ = await call(a, "POST", "/routes/fraud/rollout", tokens["write"],
                                 {"model": "fraud_v4", "steps": [20, 50, 100],
                                  "min_requests": 20, "min_seconds": 0})
    assert status == 201, view
    view = await drive_pair(a, b, tokens["read"])
    assert (view["status"], view["champion"]["model"]) == ("completed", "fraud_v4"), view
    await a.stop()  # a controller's transition in flight finishes, with its audit entry
    await b.stop()
    entries = {e["id"]: e for gw in (a, b) for e in gw.records("audit")}.values()
    applied = sorted((e["version"], e["action"]) for e in entries
                     if e["route"] == "fraud" and e["outcome"] == "applied")
    assert [x for x in applied if x[1] != "seed"] == [
        (2, "rollout_start"), (3, "rollout_step"), (4, "rollout_complete")], applied


@pytest.mark.kafka
async def test_kafka_replicas_survive_a_restart_and_agree_on_each_step(
        make_gateway: GatewayFactory, tokens: dict[str, str], kafka: Any) -> None:
    """State on the compacted Kafka topic: a rollout started before both replicas restart
    carries on, traffic through both moves it, and the challenger is promoted exactly once."""
    sections = _kafka_sections(kafka, unique_topic("registry"))
    a, b = await make_gateway(V3_V4, **sections), await make_gateway(V3_V4, **sections)
    status, view, _ = await call(a, "POST", "/routes/fraud/rollout", tokens["write"],
                                 {"model": "fraud_v4", "steps": [20, 50, 100],
                                  "min_requests": 20, "min_seconds": 0})
    assert status == 201, view
    await a.stop()
    await b.stop()
    c, d = await make_gateway(V3_V4, **sections), await make_gateway(V3_V4, **sections)
    for gw in (c, d):
        status, view, _ = await call(gw, "GET", "/routes/fraud/rollout", tokens["read"])
        assert (status, view["status"], view["step"]) == (200, "running", 0), view
    assert (await drive_pair(c, d, tokens["read"]))["status"] == "completed"
    for _ in range(100):  # d follows the topic
        route = (await call(d, "GET", "/routes/fraud", tokens["read"]))[1]
        if route["champion"]["model"] == "fraud_v4":
            break
        await asyncio.sleep(0.05)
    assert route["champion"]["model"] == "fraud_v4"
    # Promoted once: the old champion is the one challenger, and what one rollback restores.
    assert [ch["model"] for ch in route["challengers"]] == ["fraud_v3"]
    assert route["rollback_to"]["model"] == "fraud_v3"
    audit = (await call(c, "GET", "/audit?route=fraud", tokens["read"]))[1]["entries"]
    applied = [e["action"] for e in audit if e["outcome"] == "applied"]
    # The Kafka store is last-writer-wins within a write's window
    # (gateway/backends/kafka_store.py): a transition may land twice, identically; each copy
    # of the completion promotes from the same pre-completion state, so the route is promoted
    # once all the same.
    assert "promote" not in applied, applied
    assert applied.count("rollout_step") >= 1 and applied.count("rollout_complete") >= 1


async def test_labels_that_say_the_challenger_is_wrong_roll_it_back(
        make_gateway: GatewayFactory, tokens: dict[str, str]) -> None:
    """The reward guard, through /v2/feedback: labels agree with the champion's predictions and
    contradict every one of the challenger's ("correct" rewards), so its loss rate is 1 against
    the champion's 0."""
    gw = await make_gateway(V3_V4)
    status, view, _ = await call(gw, "POST", "/routes/fraud/rollout", tokens["write"],
                                 {"model": "fraud_v4", "steps": [25, 100],
                                  "min_requests": 100_000, "min_seconds": 0})
    assert status == 201, view
    rng = np.random.default_rng(8)
    for round_ in range(20):
        labels = []
        for i in range(20):
            request_id = f"l{round_}-{i}"
            rows = rng.random((1, 8)).astype(np.float32).tolist()
            resp = await gw.post_json("/v2/models/fraud/infer", fraud_body(rows, request_id))
            score = json.loads(await resp.read())["outputs"][0]["data"][0]
            predicted = int(score >= 0.5)
            wrong = resp.headers["X-Served-Model"] == "fraud_v4"
            labels.append({"request_id": request_id, "label": 1 - predicted if wrong
                           else predicted})
        await asyncio.sleep(0.2)  # the records (served scores) complete in the background
        assert (await gw.post_json("/v2/feedback", labels)).status == 200
        await asyncio.sleep(0.5)  # the reward bus applies events as it reads them back
        view = (await call(gw, "GET", "/routes/fraud/rollout", tokens["read"]))[1]
        if view["status"] != "running":
            break
    assert view["status"] == "rolled_back", view
    assert view["reason"].startswith("reward guard breached at 25%"), view["reason"]
