"""Registry persistence and replica convergence: the state file (embedded default) and the
compacted Kafka topic, through real gateways on real sockets against real Triton and Kafka."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.backends.file_store import FileStore
from gateway.backends.kafka_store import KafkaStore
from gateway.backends.registry_store import StaleWrite
from gateway.config import ChallengerConfig, ModelRef, RouteConfig
from gateway.control.audit import CONFIG_ACTOR, new_entry
from gateway.control.state import Experiment, Promotion, RouteState, route_to_raw
from gateway.rest.admin import REGISTRY
from tests.conftest import GatewayFactory, GatewayHandle, fraud_body
from tests.support.kafka import unique_topic

FRAUD = {"fraud": {"champion": {"model": "fraud_v3"},
                   "challengers": [{"model": "fraud_v4", "sample_rate": 1.0}]}}


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll `check` until it is true; fail after a bounded wait."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.1)


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    value = secrets.token_urlsafe(32)
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", value)
    return value


async def admin(gw: GatewayHandle, method: str, path: str, token: str,
                body: Any = None) -> tuple[int, Any]:
    async with gw.session.request(
        method, gw.url + "/admin" + path, headers={"Authorization": f"Bearer {token}"},
        data=orjson.dumps(body) if body is not None else None,
    ) as resp:
        return resp.status, await resp.json()


async def served_by(gw: GatewayHandle, route: str = "fraud") -> str:
    resp = await gw.post_json(f"/v2/models/{route}/infer", fraud_body([[0.2] * 8]))
    assert resp.status == 200
    return resp.headers["X-Served-Model"]


def _state(name: str, version: int, champion: str, challengers: tuple[str, ...] = ()) -> RouteState:
    config = RouteConfig(name, ModelRef(champion),
                         tuple(ChallengerConfig(model=m) for m in challengers))
    entry = new_entry(CONFIG_ACTOR, "test", name, replica="t", version=version,
                      after=route_to_raw(config))
    experiments = {m: Experiment.new(version) for m in challengers}
    return RouteState(name, version, config, (), entry, experiments)


# -- the state file -----------------------------------------------------------------------


async def test_file_store_compare_and_set_and_polling(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.json"
    seen_a: list[RouteState] = []
    seen_b: list[RouteState] = []
    a, b = FileStore(path, poll_interval_s=0.05), FileStore(path, poll_interval_s=0.05)
    await a.start(seen_a.append)
    await b.start(seen_b.append)
    try:
        await a.commit(_state("r", 1, "fraud_v3"), 0)
        assert [s.version for s in seen_a] == [1]  # delivered before commit returns
        with pytest.raises(StaleWrite):
            await b.commit(_state("r", 1, "fraud_v4"), 0)  # based on a stale version
        await b.commit(_state("r", 2, "fraud_v4", ("fraud_v3",)), 1)

        async def a_caught_up() -> bool:
            return bool(seen_a) and seen_a[-1].version == 2

        await eventually(a_caught_up)
        assert seen_a[-1].config is not None
        assert seen_a[-1].config.champion.model == "fraud_v4"
        latest = await a.latest("r")
        assert latest is not None
        assert latest.version == 2
        assert latest == next(s for s in reversed(seen_a) if s.name == "r")
        # A corrupt file (a bad manual edit) is reported, and the last good state is kept.
        path.write_text("{not json")
        await asyncio.sleep(0.2)
        assert seen_a[-1].version == 2
        assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temp files
    finally:
        await a.close()
        await b.close()


def test_route_state_round_trips() -> None:
    state = _state("r", 3, "fraud_v4", ("fraud_v3", "fraud_v5"))
    promoted = ChallengerConfig(model="fraud_v4", sample_rate=0.5)
    state = RouteState(state.name, 3, state.config, (Promotion(ModelRef("fraud_v3"), promoted),),
                       state.change, state.experiments)
    assert RouteState.from_json(orjson.loads(orjson.dumps(state.to_json()))) == state
    # A state stored before experiments existed gets a deterministic one per challenger, so
    # every replica reading it agrees.
    legacy = state.to_json()
    del legacy["experiments"]
    one, two = RouteState.from_json(legacy), RouteState.from_json(legacy)
    assert one.experiments == two.experiments
    assert set(one.experiments) == {"fraud_v3", "fraud_v5"}
    tomb = RouteState("r", 4, None, (), {"id": "x"})
    assert RouteState.from_json(tomb.to_json()) == tomb


@pytest.mark.triton
async def test_two_gateways_share_a_state_file_and_survive_restart(
    make_gateway: GatewayFactory, tmp_path: Path, token: str,
) -> None:
    shared = {"state_path": str(tmp_path / "shared" / "registry.json")}
    a = await make_gateway(FRAUD, admin=shared)
    b = await make_gateway(FRAUD, admin=shared)
    assert await served_by(a) == await served_by(b) == "fraud_v3"

    status, route = await admin(a, "POST", "/routes/fraud/promote", token, {"model": "fraud_v4"})
    assert status == 200, route
    assert await served_by(a) == "fraud_v4"  # the writer serves it at once

    async def b_serves_v4() -> bool:
        return await served_by(b) == "fraud_v4"

    await eventually(b_serves_v4, timeout_s=30)  # liveness bound on a loaded machine
    status, route_b = await admin(b, "GET", "/routes/fraud", token)
    assert route_b["version"] == route["version"] == 2
    # A change made on B is seen by A, and B's audit shows A's change too.
    status, _ = await admin(b, "PUT", "/routes/fraud/policy", token,
                            {"type": "champion", "sticky_header": "x-user"})
    assert status == 200

    async def a_has_policy() -> bool:
        _, view = await admin(a, "GET", "/routes/fraud", token)
        return bool(view["policy"]["sticky_header"] == "x-user")

    await eventually(a_has_policy, timeout_s=30)  # liveness bound on a loaded machine
    _, audit = await admin(b, "GET", "/audit?route=fraud", token)
    actions = [e["action"] for e in audit["entries"]]
    assert actions[:2] == ["set_policy", "promote"]

    # Both restart (same YAML, which still says fraud_v3): the stored state wins.
    await a.stop()
    await b.stop()
    a2 = await make_gateway(FRAUD, admin=shared)
    b2 = await make_gateway(FRAUD, admin=shared)
    experiments = []
    for gw in (a2, b2):
        assert await served_by(gw) == "fraud_v4"
        _, view = await admin(gw, "GET", "/routes/fraud", token)
        assert view["version"] == 3
        assert view["policy"]["sticky_header"] == "x-user"
        assert view["rollback_to"]["model"] == "fraud_v3"
        experiments.append(view["challengers"][0]["experiment"])
    # The experiment the policy change started survives the restart, the same on both.
    assert experiments[0] == experiments[1]
    assert experiments[0]["id"].startswith("v3-")
    # Rollback still works after the restart, from either replica.
    status, _ = await admin(b2, "POST", "/routes/fraud/rollback", token)
    assert status == 200

    async def a2_back_on_v3() -> bool:
        return await served_by(a2) == "fraud_v3"

    await eventually(a2_back_on_v3, timeout_s=30)  # liveness bound on a loaded machine


@pytest.mark.triton
async def test_yaml_seeds_only_routes_the_store_never_saw(
    make_gateway: GatewayFactory, tmp_path: Path, token: str,
) -> None:
    shared = {"state_path": str(tmp_path / "s" / "registry.json")}
    gw = await make_gateway(FRAUD, admin=shared)
    status, _ = await admin(gw, "DELETE", "/routes/fraud", token)
    assert status == 200
    await gw.stop()
    price = {"price": {"champion": {"model": "price_v1"}}}
    gw2 = await make_gateway({**FRAUD, **price}, admin=shared)
    _, routes = await admin(gw2, "GET", "/routes", token)
    # fraud was deleted (tombstone): not resurrected by the YAML; price is new: seeded.
    assert [r["name"] for r in routes["routes"]] == ["price"]
    resp = await gw2.post_json("/v2/models/fraud/infer", fraud_body([[0.2] * 8]))
    assert resp.status == 404


@pytest.mark.triton
async def test_concurrent_writers_lose_no_update(
    make_gateway: GatewayFactory, tmp_path: Path, token: str,
) -> None:
    shared = {"state_path": str(tmp_path / "c" / "registry.json")}
    a = await make_gateway({"fraud": {"champion": {"model": "fraud_v3"}}}, admin=shared)
    b = await make_gateway({"fraud": {"champion": {"model": "fraud_v3"}}}, admin=shared)
    results = await asyncio.gather(
        admin(a, "POST", "/routes/fraud/challengers", token, {"model": "fraud_v4"}),
        admin(b, "POST", "/routes/fraud/challengers", token, {"model": "fraud_v5"}),
    )
    assert [s for s, _ in results] == [201, 201], results
    # One of them was computed on the other's result (retried after a stale write): the final
    # state has both, and every replica converges on it.
    assert sorted(view["version"] for _, view in results) == [2, 3]
    for gw in (a, b):

        async def has_both(gw: GatewayHandle = gw) -> bool:
            _, view = await admin(gw, "GET", "/routes/fraud", token)
            models = sorted(c["model"] for c in view["challengers"])
            return bool(models == ["fraud_v4", "fraud_v5"] and view["version"] == 3)

        await eventually(has_both, timeout_s=30)  # liveness bound, not a speed target


async def _changes_back_to_back(writer: GatewayHandle, token: str) -> list[int]:
    """Four changes on `writer`, each sent as soon as the previous one answered; their
    versions."""
    versions = []
    for body in ({"sample_rate": 0.5}, {"sample_rate": 0.6}, {"sample_rate": 0.7}):
        status, view = await admin(writer, "PATCH", "/routes/fraud/challengers/fraud_v4", token,
                                   body)
        assert status == 200, view
        versions.append(view["version"])
    status, view = await admin(writer, "PUT", "/routes/fraud/policy", token,
                               {"type": "champion", "sticky_header": "x-user"})
    assert status == 200, view
    return [*versions, view["version"]]


async def _assert_lists_every_change(reader: GatewayHandle, writer: GatewayHandle, token: str,
                                     made: list[int]) -> None:
    """`reader`'s audit lists each of `writer`'s changes once, in version order, and at once
    (it catches up with the store before answering: no waiting); `limit` still applies."""
    writer_id = writer.app[REGISTRY].replica
    status, audit = await admin(reader, "GET", "/audit?route=fraud", token)
    assert status == 200, audit
    entries = audit["entries"]
    assert len({e["id"] for e in entries}) == len(entries)  # each once
    applied = [(e["version"], e["action"], e["replica"]) for e in entries
               if e["outcome"] == "applied"]
    assert applied == [(v, a, writer_id) for v, a in zip(
        made[::-1], ["set_policy", "update_challenger", "update_challenger",
                     "update_challenger"], strict=True)] + [(1, "seed", applied[-1][2])]
    assert made == list(range(2, 6))
    _, newest = await admin(reader, "GET", "/audit?route=fraud&limit=2", token)
    assert [e["version"] for e in newest["entries"]] == [5, 4]


@pytest.mark.triton
async def test_a_replica_lists_every_change_another_made_between_two_of_its_polls(
    make_gateway: GatewayFactory, tmp_path: Path, token: str,
) -> None:
    """The state file holds only each route's latest state and A polls it every 0.5 s, so B's
    changes made back to back are superseded before A's poll can see them. A's audit lists
    every one all the same: each commit is in the journal next to the state file."""
    shared = {"state_path": str(tmp_path / "shared" / "registry.json")}
    a = await make_gateway(FRAUD, admin=shared)
    b = await make_gateway(FRAUD, admin=shared)
    made = await _changes_back_to_back(b, token)
    await _assert_lists_every_change(a, b, token, made)
    # And after a restart, from the journal (A's own audit stream never had B's changes).
    await a.stop()
    a2 = await make_gateway(FRAUD, admin=shared)
    await _assert_lists_every_change(a2, b, token, made)


# -- the compacted Kafka topic ------------------------------------------------------------


def _kafka_sections(kafka: Any, registry_topic: str) -> dict[str, Any]:
    return {"log": {"sink": "kafka", "kafka": {
        "bootstrap": kafka.bootstrap, "registry_topic": registry_topic,
        "topic": unique_topic("inferences"), "labels_topic": unique_topic("labels"),
        "audit_topic": unique_topic("audit"),
    }}}


@pytest.mark.kafka
async def test_kafka_store_compare_and_set_and_following(kafka: Any, tmp_path: Path) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from gateway.config import KafkaConfig

    config = KafkaConfig(bootstrap=kafka.bootstrap, registry_topic=unique_topic("registry"))
    seen_a: list[RouteState] = []
    seen_b: list[RouteState] = []
    a = KafkaStore(config, tmp_path / "a.json")
    b = KafkaStore(config, tmp_path / "b.json")
    await a.start(seen_a.append)
    await b.start(seen_b.append)
    try:
        await a.commit(_state("r", 1, "fraud_v3"), 0)
        assert [s.version for s in seen_a] == [1]
        with pytest.raises(StaleWrite):
            await b.commit(_state("r", 1, "fraud_v5"), 0)  # b catches up first: stale
        await b.commit(_state("r", 2, "fraud_v4"), 1)

        async def a_follows() -> bool:
            return bool(seen_a) and seen_a[-1].version == 2

        await eventually(a_follows)
        await b.commit(RouteState("gone", 1, None, (), {"id": "t"}), 0)
        # A replica starting later reads everything from the beginning.
        seen_c: list[RouteState] = []
        c = KafkaStore(config, tmp_path / "c.json")
        await c.start(seen_c.append)
        await c.close()
        assert {s.name: s.version for s in seen_c} == {"r": 2, "gone": 1}
        latest = await a.latest("r")
        assert latest is not None
        assert latest.version == 2
        assert latest == next(s for s in reversed(seen_a) if s.name == "r")
    finally:
        await a.close()
        await b.close()
    # The topic is compacted (key = route), and the local cache holds the last state.
    client = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await client.start()
    try:
        described = await client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, config.registry_topic)]
        )
        entries = {e[0]: e[1] for e in described[0].resources[0][4]}
        assert entries["cleanup.policy"] == "compact"
    finally:
        await client.close()
    cached = orjson.loads((tmp_path / "a.json").read_bytes())
    assert cached["routes"]["r"]["version"] == 2


@pytest.mark.kafka
@pytest.mark.triton
async def test_kafka_replicas_converge_and_restart(
    make_gateway: GatewayFactory, kafka: Any, token: str,
) -> None:
    sections = _kafka_sections(kafka, unique_topic("registry"))
    a = await make_gateway(FRAUD, **sections)
    b = await make_gateway(FRAUD, **sections)
    status, route = await admin(a, "POST", "/routes/fraud/challengers", token,
                                {"model": "fraud_v5", "sample_rate": 0.5})
    assert status == 201, route

    async def b_has_v5() -> bool:
        _, view = await admin(b, "GET", "/routes/fraud", token)
        return [c["model"] for c in view["challengers"]] == ["fraud_v4", "fraud_v5"]

    await eventually(b_has_v5)
    status, route = await admin(b, "POST", "/routes/fraud/promote", token, {"model": "fraud_v5"})
    assert status == 200, route

    async def a_serves_v5() -> bool:
        return await served_by(a) == "fraud_v5"

    await eventually(a_serves_v5)
    # Refused changes are refused everywhere: the topic is untouched.
    status, body = await admin(a, "POST", "/routes/fraud/challengers", token,
                               {"model": "fraud_wide"})
    assert status == 422
    assert "[-1, 9] does not match champion fraud_v5's [-1, 8]" in body["error"]
    await a.stop()
    await b.stop()
    c = await make_gateway(FRAUD, **sections)  # a new replica, same YAML: the topic wins
    assert await served_by(c) == "fraud_v5"
    _, view = await admin(c, "GET", "/routes/fraud", token)
    assert view["version"] == 3
    assert view["rollback_to"]["model"] == "fraud_v3"
    _, audit = await admin(c, "GET", "/audit?route=fraud", token)
    # The whole history, refusals included, is read back from the audit topic.
    assert [(e["action"], e["outcome"]) for e in audit["entries"]] == [
        ("add_challenger", "rejected"), ("promote", "applied"), ("add_challenger", "applied"),
        ("seed", "applied")]


@pytest.mark.kafka
async def test_kafka_store_serves_its_cache_while_the_broker_is_down(
    kafka: Any, tmp_path: Path,
) -> None:
    from gateway.config import KafkaConfig
    from gateway.errors import UpstreamUnavailable

    config = KafkaConfig(bootstrap=kafka.bootstrap, registry_topic=unique_topic("registry"))
    cache = tmp_path / "cache.json"
    first = KafkaStore(config, cache)
    await first.start(lambda _: None)
    await first.commit(_state("r", 1, "fraud_v3"), 0)
    await first.close()  # leaves its last snapshot in the cache file
    await asyncio.to_thread(kafka.stop)
    seen: list[RouteState] = []
    store = KafkaStore(config, cache, connect_timeout_s=3, retry_interval_s=0.5)
    try:
        await store.start(seen.append)
        assert [(s.name, s.version) for s in seen] == [("r", 1)]  # the gateway can serve
        assert not store.connected
        with pytest.raises(UpstreamUnavailable, match="unreachable"):
            await store.commit(_state("r", 2, "fraud_v4"), 1)
    finally:
        await asyncio.to_thread(kafka.start)

    async def reconnected() -> bool:
        return store.connected

    try:
        await eventually(reconnected, timeout_s=60)
        await store.commit(_state("r", 2, "fraud_v4"), 1)
        assert seen[-1].version == 2
    finally:
        await store.close()


def test_signature_mismatches_name_every_difference() -> None:
    from gateway.control.checks import signature_mismatches
    from gateway.dataplane.protocol import TensorSpec

    champion = (TensorSpec("features", "FP32", (-1, 8)), TensorSpec("mask", "BOOL", (-1, 8)))
    assert signature_mismatches(champion, champion, ModelRef("fraud_v3")) == []
    other = (TensorSpec("features", "FP64", (-1, 9)), TensorSpec("extra", "INT32", (-1,)))
    assert signature_mismatches(other, champion, ModelRef("fraud_v3")) == [
        "input 'mask' of champion fraud_v3 is missing",
        "input 'extra' is not an input of champion fraud_v3",
        "input 'features' datatype FP64 does not match champion fraud_v3's FP32",
        "input 'features' shape [-1, 9] does not match champion fraud_v3's [-1, 8]",
    ]


@pytest.mark.kafka
@pytest.mark.triton
async def test_kafka_replica_lists_every_change_another_made_back_to_back(
    make_gateway: GatewayFactory, kafka: Any, token: str,
) -> None:
    """The Kafka store applies every record of the registry topic (none is skipped), and the
    audit catches up with the topic's end before answering: A lists each of B's changes."""
    sections = _kafka_sections(kafka, unique_topic("registry"))
    a = await make_gateway(FRAUD, **sections)
    b = await make_gateway(FRAUD, **sections)
    made = await _changes_back_to_back(b, token)
    await _assert_lists_every_change(a, b, token, made)
