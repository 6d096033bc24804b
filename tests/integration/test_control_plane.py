"""Control-plane integrity (issues 13 and 14) through real gateways on real sockets, against
real Triton: experiments, PATCH of a challenger, promotion bound to an experiment, exploring
policies that cannot explore, model-name validation, the feedback scope and orphans, the audit
history across restarts, and the declared config vs the live registry."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import parse_config
from gateway.dataplane.recorder import first_score
from gateway.errors import ConfigError
from gateway.rest.inference import SERVICE
from tests.conftest import GatewayFactory, GatewayHandle, fraud_body
from tests.integration.test_admin import call, infer

pytestmark = pytest.mark.triton

SHADOW_ONLY = {"fraud": {"champion": {"model": "fraud_v3"},
                         "challengers": [{"model": "fraud_v4", "sample_rate": 1.0}]}}
BAD_NAMES = ["fraud_v4?x=1", "fraud_v4#x", "fraud_v4/versions/1", "fraud_v4/../fraud_v4",
             "fraud v4", "..", "x" * 200]


async def settle(gw: GatewayHandle) -> None:
    """Wait until every pending record (and so the reward tracker entry) is built."""
    recorder = gw.app[SERVICE].recorder
    for _ in range(200):
        if recorder.pending == 0:
            return
        await asyncio.sleep(0.02)
    pytest.fail("records still pending")


# -- experiments ---------------------------------------------------------------------------


async def test_experiments_start_on_changes_and_reach_records_and_audit(
    make_gateway: GatewayFactory, tokens: dict[str, str],
) -> None:
    gw = await make_gateway(SHADOW_ONLY)
    write = tokens["write"]
    _, view, _ = await call(gw, "GET", "/routes/fraud", tokens["read"])
    seeded = view["challengers"][0]["experiment"]
    assert seeded["id"].startswith("v1-") and seeded["started"] > 0  # started at seeding
    await infer(gw, "r-seed")

    # A limit that does not change the experiment keeps it.
    status, view, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                                 {"timeout_ms": 3000})
    assert status == 200, view
    assert view["version"] == 2 and view["challengers"][0]["timeout_ms"] == 3000
    assert view["challengers"][0]["experiment"] == seeded

    # A new sample rate starts a new experiment, in the registry, the audit and the records.
    status, view, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                                 {"sample_rate": 0.999})
    assert status == 200, view
    second = view["challengers"][0]["experiment"]
    assert second["id"] != seeded["id"] and second["started"] >= seeded["started"]
    await infer(gw, "r-second")
    _, audit, _ = await call(gw, "GET", "/audit?route=fraud", tokens["read"])
    latest = audit["entries"][0]
    assert latest["action"] == "update_challenger" and latest["outcome"] == "applied"
    assert latest["experiments"] == {"fraud_v4": second}
    assert latest["request"] == {"model": "fraud_v4", "sample_rate": 0.999}
    assert "experiments" not in audit["entries"][1]  # the timeout change started none

    # Validated like an add: a bad rate is a 400 naming the field, and nothing changes.
    status, body, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                                 {"sample_rate": 2})
    assert status == 400 and "challenger.sample_rate" in body["error"]
    status, body, _ = await call(gw, "PATCH", "/routes/fraud/challengers/nope", write,
                                 {"mode": "explore"})
    assert status == 404

    # A policy change starts new experiments for every challenger.
    status, view, _ = await call(gw, "PUT", "/routes/fraud/policy", write,
                                 {"type": "champion", "sticky_header": "x-user"})
    assert status == 200, view
    third = view["challengers"][0]["experiment"]
    assert third["id"] not in (seeded["id"], second["id"])

    # Promotion bound to the experiment: stale evidence is refused with 409.
    status, body, _ = await call(gw, "POST", "/routes/fraud/promote", write,
                                 {"model": "fraud_v4", "experiment": second["id"]})
    assert status == 409
    assert f"'{third['id']}', not '{second['id']}'" in body["error"]
    status, view, _ = await call(gw, "POST", "/routes/fraud/promote", write,
                                 {"model": "fraud_v4", "experiment": third["id"],
                                  "expected_version": view["version"]})
    assert status == 200, view
    assert view["champion"]["model"] == "fraud_v4"
    demoted = view["challengers"][0]
    assert demoted["model"] == "fraud_v3" and demoted["experiment"]["id"] != third["id"]
    await infer(gw, "r-promoted")

    await gw.stop()
    records = {r["request_id"]: r for r in gw.records()}
    first_rec, second_rec = records["r-seed"], records["r-second"]
    assert first_rec["registry_version"] == 1
    assert first_rec["outputs"]["fraud_v4"]["experiment"] == seeded["id"]
    assert first_rec["outputs"]["fraud_v4"]["sample_rate"] == 1.0
    assert "experiment" not in first_rec["outputs"]["fraud_v3"]  # the champion has none
    assert "sample_rate" not in first_rec["outputs"]["fraud_v3"]
    assert second_rec["registry_version"] == 3
    assert second_rec["outputs"]["fraud_v4"]["experiment"] == second["id"]
    assert second_rec["outputs"]["fraud_v4"]["sample_rate"] == 0.999
    promoted = records["r-promoted"]
    assert promoted["outputs"]["fraud_v3"]["experiment"] == demoted["experiment"]["id"]
    assert "experiment" not in promoted["outputs"]["fraud_v4"]
    stream = [e for e in gw.records("audit") if e["outcome"] == "applied"]
    assert stream[0]["action"] == "seed" and stream[0]["experiments"] == {"fraud_v4": seeded}


async def test_cli_updates_a_challenger(make_gateway: GatewayFactory,
                                        tokens: dict[str, str]) -> None:
    from tests.integration.test_admin import cli

    gw = await make_gateway(SHADOW_ONLY)
    code, out, err = await cli(gw, "challengers", "update", "fraud", "fraud_v4", "--mode",
                               "explore", "--sample-rate", "0.5", "--json", token=tokens["write"])
    assert code == 0, err
    challenger = orjson.loads(out)["challengers"][0]
    assert (challenger["mode"], challenger["sample_rate"]) == ("explore", 0.5)
    code, _, err = await cli(gw, "challengers", "update", "fraud", "fraud_v4",
                             token=tokens["write"])
    assert code == 2 and "nothing to change" in err


# -- exploring policies need something to explore -------------------------------------------


async def test_an_exploring_policy_without_explore_challengers_is_refused(
    make_gateway: GatewayFactory, tokens: dict[str, str],
) -> None:
    gw = await make_gateway(SHADOW_ONLY)
    write = tokens["write"]
    status, body, _ = await call(gw, "PUT", "/routes/fraud/policy", write,
                                 {"type": "thompson", "reward": "correct"})
    assert status == 422
    assert "policy thompson" in body["error"] and "mode 'explore'" in body["error"]
    _, view, _ = await call(gw, "GET", "/routes/fraud", write)
    assert view["policy"]["type"] == "champion" and view["version"] == 1
    # With an explore arm it is accepted; then the last explore arm cannot go or turn shadow.
    status, _, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                              {"mode": "explore"})
    assert status == 200
    status, _, _ = await call(gw, "PUT", "/routes/fraud/policy", write, {"type": "thompson"})
    assert status == 200
    status, body, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                                 {"mode": "shadow"})
    assert status == 422 and "has none" in body["error"]
    status, body, _ = await call(gw, "DELETE", "/routes/fraud/challengers/fraud_v4", write)
    assert status == 422
    # A promotion keeps the route explorable: the old champion takes the explore arm's place.
    status, view, _ = await call(gw, "POST", "/routes/fraud/promote", write,
                                 {"model": "fraud_v4"})
    assert status == 200, view
    assert view["challengers"][0]["model"] == "fraud_v3"
    assert view["challengers"][0]["mode"] == "explore"
    served = {await infer(gw, f"x{i}") for i in range(30)}
    assert served == {"fraud_v3", "fraud_v4"}


def test_the_yaml_refuses_an_exploring_policy_without_explore_challengers() -> None:
    routes = {"fraud": {"champion": "fraud_v3", "policy": {"type": "epsilon_greedy"},
                        "challengers": [{"model": "fraud_v4", "mode": "shadow"}]}}
    with pytest.raises(ConfigError, match=r"routes\.fraud\.policy: .*mode 'explore'"):
        parse_config({"routes": routes}, env={})
    routes["fraud"]["challengers"][0]["mode"] = "explore"
    assert parse_config({"routes": routes}, env={}).routes["fraud"].explore_arms == (
        "fraud_v3", "fraud_v4")


# -- model names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_yaml_refuses_bad_model_names(name: str) -> None:
    with pytest.raises(ConfigError, match=r"routes\.fraud\.challengers\[0\]\.model: .*Triton"):
        parse_config({"routes": {"fraud": {"champion": "fraud_v3",
                                           "challengers": [{"model": name}]}}}, env={})
    with pytest.raises(ConfigError, match=r"routes\.fraud\.champion\.model"):
        parse_config({"routes": {"fraud": {"champion": {"model": name}}}}, env={})


def test_the_yaml_refuses_bad_versions() -> None:
    for version in ("1a", "-1", "1/../2", "1 "):
        with pytest.raises(ConfigError, match=r"champion\.version: .*not a valid model version"):
            parse_config({"routes": {"fraud": {"champion": {"model": "fraud_v3",
                                                            "version": version}}}}, env={})
    config = parse_config({"routes": {"fraud": {"champion": {"model": "fraud_v3.b-1_x",
                                                             "version": 1}}}}, env={})
    assert config.routes["fraud"].champion.version == "1"


async def test_admin_refuses_bad_model_names(make_gateway: GatewayFactory,
                                             tokens: dict[str, str]) -> None:
    gw = await make_gateway(SHADOW_ONLY)
    write = tokens["write"]
    for name in BAD_NAMES:
        status, body, _ = await call(gw, "POST", "/routes/fraud/challengers", write,
                                     {"model": name, "sample_rate": 1.0})
        assert status == 400, (name, body)
        assert "challenger.model" in body["error"] and "Triton model name" in body["error"]
        status, body, _ = await call(gw, "POST", "/routes/fraud/promote", write, {"model": name})
        assert status == 400 and "model:" in body["error"], (name, body)
    status, body, _ = await call(gw, "POST", "/routes/fraud/challengers", write,
                                 {"model": "fraud_v5", "version": "1?x"})
    assert status == 400 and "challenger.version" in body["error"]
    status, body, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4%3Fx=1",
                                 write, {"mode": "explore"})
    assert status == 400 and "model:" in body["error"]
    status, body, _ = await call(gw, "PUT", "/routes/other", write,
                                 {"champion": {"model": "fraud_v3/versions/1"}})
    assert status == 400 and "routes.other.champion.model" in body["error"]
    _, view, _ = await call(gw, "GET", "/routes/fraud", write)
    assert [c["model"] for c in view["challengers"]] == ["fraud_v4"] and view["version"] == 1
    assert await infer(gw, "still-serves") == "fraud_v3"


# -- feedback: scope, orphans, the policy's reward in the label record -----------------------


async def test_feedback_needs_its_token_when_one_is_configured(
    make_gateway: GatewayFactory, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    feedback = secrets.token_urlsafe(32)
    monkeypatch.setenv("UNDERSTUDY_FEEDBACK_TOKEN", feedback)
    gw = await make_gateway(SHADOW_ONLY)
    label = {"request_id": "a", "label": 1}

    async def post(token: str | None) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        resp = await gw.post_json("/v2/feedback", label, headers)
        return resp.status, orjson.loads(await resp.read()), resp.headers

    status, body, headers = await post(None)
    assert status == 401 and "missing bearer token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await post("not-the-token"))[0] == 401
    status, body, _ = await post(tokens["read"])
    assert status == 403 and "feedback token" in body["error"]
    assert (await post(feedback))[0] == 200
    assert (await post(tokens["write"]))[0] == 200  # the admin write token may post too
    # The feedback token grants nothing on /admin.
    status, body, _ = await call(gw, "GET", "/routes", feedback)
    assert status == 403 and "/v2/feedback" in body["error"]
    await gw.stop()
    assert len(gw.records("labels")) == 2


async def test_feedback_counts_orphans_and_logs_the_policys_reward(
    make_gateway: GatewayFactory, tokens: dict[str, str], tmp_path: Path,
) -> None:
    """The README's exploration flow: an explore challenger, `policy --type thompson --reward
    correct`, labels posted: every label record carries the finite reward the policy got."""
    gw = await make_gateway(SHADOW_ONLY)
    write = tokens["write"]
    status, _, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                              {"mode": "explore"})
    assert status == 200
    status, view, _ = await call(gw, "PUT", "/routes/fraud/policy", write,
                                 {"type": "thompson", "reward": "correct"})
    assert status == 200, view
    rows = [[0.05 * i, 0.5, -0.2, 1.0, 0.0, 0.3, 1.0, 0.0] for i in range(40)]
    for i, row in enumerate(rows):
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([row], f"tx-{i}"))
        assert resp.status == 200
    await settle(gw)
    labels = [{"request_id": f"tx-{i}", "label": i % 2} for i in range(40)]
    labels.append({"request_id": "never-served", "label": 1})
    resp = await gw.post_json("/v2/feedback", labels)
    assert resp.status == 200
    assert orjson.loads(await resp.read()) == {"accepted": 41, "orphans": 1}
    await asyncio.sleep(0.5)  # the reward bus applies the events
    await gw.stop()
    records = {r["request_id"]: r for r in gw.records()}
    logged = {r["request_id"]: r for r in gw.records("labels")}
    arms = set()
    for i in range(40):
        record = records[f"tx-{i}"]
        served = record["served"]["model"]
        arms.add(served)
        score = first_score(record["outputs"][served]["outputs"])
        assert score is not None
        reward = logged[f"tx-{i}"]["reward"]
        assert reward is not None and math.isfinite(reward)
        assert reward == float(int(score >= 0.5) == i % 2)  # `correct` at threshold 0.5
    assert logged["never-served"]["reward"] is None
    assert arms <= {"fraud_v3", "fraud_v4"}

    # The evaluator's off-policy table now has rewarded requests and finite values per arm.
    from evaluator.config import parse_config as evaluator_config
    from evaluator.ingest import FileIngestor
    from evaluator.stats.offpolicy import estimate_policy_values
    from evaluator.store import Store

    config = evaluator_config({
        "source": {"path": str(gw.log_dir)},
        "store": {"path": str(tmp_path / "store.duckdb"), "join_window": "14d"},
    }, env={})
    with Store.open(config.store) as store:
        FileIngestor(config, store).drain()
        report = estimate_policy_values(store.load_dataset("fraud"))
    assert report.logging_value.n == 40
    assert set(report.arms) == {"fraud_v3", "fraud_v4"}
    for arm in report.arms.values():
        assert arm.n == 40
        for name in ("ips", "snips", "dr"):
            value = arm.estimates[name].value
            assert value is not None and math.isfinite(value), (arm.arm, name)


# -- audit history and declared config across restarts --------------------------------------


async def test_audit_history_survives_a_restart(make_gateway: GatewayFactory,
                                                tokens: dict[str, str], tmp_path: Path) -> None:
    sections: dict[str, Any] = {
        "admin": {"state_path": str(tmp_path / "keep" / "registry.json"),
                  "rewards_path": str(tmp_path / "keep" / "rewards.jsonl")},
        "log": {"path": str(tmp_path / "keep" / "log")},
    }
    gw = await make_gateway(SHADOW_ONLY, **sections)
    write = tokens["write"]
    for rate in (0.5, 0.6, 0.7):
        status, _, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                                  {"sample_rate": rate})
        assert status == 200
    status, _, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                              {"sample_rate": 5})
    assert status == 400  # refused changes are history too
    _, before, _ = await call(gw, "GET", "/audit", write)
    assert len(before["entries"]) == 5
    await gw.stop()
    again = await make_gateway(SHADOW_ONLY, **sections)
    _, after, _ = await call(again, "GET", "/audit", write)
    assert [e["id"] for e in after["entries"]] == [e["id"] for e in before["entries"]]


async def test_declared_config_vs_registry(make_gateway: GatewayFactory,
                                           tokens: dict[str, str], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    shared = {"state_path": str(tmp_path / "shared" / "registry.json"),
              "rewards_path": str(tmp_path / "shared" / "rewards.jsonl")}
    gw = await make_gateway(SHADOW_ONLY, admin=shared)
    status, _, _ = await call(gw, "POST", "/routes/fraud/promote", tokens["write"],
                              {"model": "fraud_v4"})
    assert status == 200
    await gw.stop()

    # Default: the registry wins, and a WARNING says the YAML differs.
    caplog.set_level(logging.INFO, logger="gateway.control.registry")
    registry_wins = await make_gateway(SHADOW_ONLY, admin=shared)
    assert await infer(registry_wins, "r1") == "fraud_v4"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "differ from the live registry" in r.getMessage()]
    assert warnings and "fraud" in warnings[0].getMessage()
    await registry_wins.stop()

    # source_of_truth: config: the YAML wins, as an audited change by actor "config".
    config_wins = await make_gateway(SHADOW_ONLY, admin={**shared, "source_of_truth": "config"})
    assert await infer(config_wins, "r2") == "fraud_v3"
    _, view, _ = await call(config_wins, "GET", "/routes/fraud", tokens["read"])
    assert view["version"] == 3 and view["last_action"] == "config_sync"
    assert view["updated_by"] == {"scope": "config", "fingerprint": None}
    _, audit, _ = await call(config_wins, "GET", "/audit", tokens["read"])
    assert audit["entries"][0]["action"] == "config_sync"
    assert audit["entries"][0]["before"]["champion"]["model"] == "fraud_v4"
    await config_wins.stop()
    # A second start with the same YAML changes nothing more.
    settled = await make_gateway(SHADOW_ONLY, admin={**shared, "source_of_truth": "config"})
    _, view, _ = await call(settled, "GET", "/routes/fraud", tokens["read"])
    assert view["version"] == 3
    with pytest.raises(ConfigError, match=r"admin\.source_of_truth"):
        parse_config({"admin": {"source_of_truth": "yaml"}}, env={})


@pytest.mark.kafka
async def test_audit_history_is_rebuilt_from_the_kafka_topic(
    make_gateway: GatewayFactory, kafka: Any, tokens: dict[str, str],
) -> None:
    from tests.integration.test_registry import _kafka_sections
    from tests.support.kafka import unique_topic

    sections = _kafka_sections(kafka, unique_topic("registry"))
    gw = await make_gateway(SHADOW_ONLY, **sections)
    write = tokens["write"]
    for rate in (0.5, 0.6, 0.7):
        status, _, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                                  {"sample_rate": rate})
        assert status == 200
    status, _, _ = await call(gw, "PATCH", "/routes/fraud/challengers/fraud_v4", write,
                              {"mode": "sideways"})
    assert status == 400
    _, before, _ = await call(gw, "GET", "/audit", write)
    assert len(before["entries"]) == 5
    await gw.stop()
    again = await make_gateway(SHADOW_ONLY, **sections)  # a new replica, same topics
    _, after, _ = await call(again, "GET", "/audit", write)
    assert [e["id"] for e in after["entries"]] == [e["id"] for e in before["entries"]]
    _, view, _ = await call(again, "GET", "/routes/fraud", write)
    assert view["challengers"][0]["experiment"] == after["entries"][1]["experiments"]["fraud_v4"]


def test_file_audit_history_reads_every_workers_segments(tmp_path: Path) -> None:
    """`serve --workers N` writes one segment directory per worker; any worker's restart must
    see every worker's changes (the history is the newest `capacity` entries, in file order)."""
    from gateway.backends.file_sink import read_stream
    from gateway.control.audit import history_entries

    def _file_history(root: Path, capacity: int) -> list[dict[str, Any]]:
        return history_entries(read_stream(root, "audit"), capacity)

    for worker, ids in (("worker-0", ["a", "b"]), ("worker-1", ["c"])):
        directory = tmp_path / worker / "audit"
        directory.mkdir(parents=True)
        lines = [orjson.dumps({"kind": "audit", "id": i, "ts": 1.0}) for i in ids]
        (directory / f"{0:020d}.jsonl").write_bytes(b"\n".join(lines) + b"\n{\"partial")
    assert [e["id"] for e in _file_history(tmp_path / "worker-1", 1000)] == ["a", "b", "c"]
    assert [e["id"] for e in _file_history(tmp_path / "worker-1", 2)] == ["b", "c"]
    assert _file_history(tmp_path / "nowhere", 10) == []


def test_audit_load_keeps_the_newest_entries_by_time() -> None:
    """History read after the registry already remembered its start-up entries must not evict
    those (they are the newest), and duplicates (a state's own change) count once."""
    from gateway.control.audit import AuditLog

    log_ = AuditLog(sink=None, capacity=3)  # type: ignore[arg-type]  # never emits here
    log_.remember({"id": "now", "ts": 100.0, "route": "r"})
    added = log_.load([{"id": f"old{i}", "ts": float(i), "route": "r"} for i in range(5)]
                      + [{"id": "now", "ts": 100.0, "route": "r"}])
    assert [e["id"] for e in log_.recent()] == ["now", "old4", "old3"]
    assert added == 2


def test_feedback_stays_closed_when_its_token_is_an_admin_token() -> None:
    from gateway.errors import Forbidden, Unauthorized
    from gateway.rest.admin import AdminAuth

    write, read = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    auth = AdminAuth(write, read, feedback_token=write)
    with pytest.raises(Unauthorized):
        auth.authorize_feedback(None)
    with pytest.raises(Forbidden):
        auth.authorize_feedback(f"Bearer {read}")
    auth.authorize_feedback(f"Bearer {write}")
    same = AdminAuth(write, write, feedback_token=secrets.token_urlsafe(32))
    with pytest.raises(Unauthorized):
        same.authorize_feedback(None)
    assert AdminAuth(write, None).feedback_required is False


def test_a_stored_state_with_an_unservable_challenger_still_loads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Older gateways accepted `fraud_v4?x=1`: such a state loads without that challenger (an
    ERROR names it) instead of stopping the gateway; a bad champion is still refused."""
    from gateway.control.state import RouteState

    raw = {"route": "fraud", "version": 4, "change": {"ts": 1.0}, "config": {
        "champion": {"model": "fraud_v3"}, "fallback": "fraud_v4?x=1",
        "challengers": [{"model": "fraud_v4?x=1"}, {"model": "fraud_v5"},
                        {"model": "fraud_v4", "version": "1/../2"}]}}
    state = RouteState.from_json(raw)
    assert state.config is not None
    assert [c.model for c in state.config.challengers] == ["fraud_v5"]
    assert state.config.fallback is None and set(state.experiments) == {"fraud_v5"}
    assert "dropping challenger 'fraud_v4?x=1'" in caplog.text
    raw["config"]["champion"] = {"model": "a/../b"}
    with pytest.raises(ConfigError, match=r"champion\.model"):
        RouteState.from_json(raw)
