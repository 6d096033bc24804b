"""The rollout controller's transitions against a real registry and state file, with Triton faked.

What matters here is what a reader of the registry can see: every state the store ever holds is
recorded, and none may say `completed` while the old champion still serves. Also the failure
paths of the completing change (refused on its merits, Triton unreachable, another replica
first) and a shutdown during a transition. The same through real HTTP, Triton and replicas:
tests/integration/test_rollout.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.file_store import FileStore, read_states
from gateway.config import parse_route
from gateway.control.audit import Actor, AuditLog
from gateway.control.registry import Registry
from gateway.control.rollout import RolloutController
from gateway.control.state import RouteState
from gateway.dataplane.routes import RouteTable
from gateway.errors import UpstreamUnavailable
from gateway.upstream.client import TritonUpstream

ROUTE = "fraud"
WRITER = Actor("write", "f00")
INPUTS = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]}


class FakeTriton(TritonUpstream):
    """Answers the registry's change checks (metadata, readiness) itself; nothing here sends
    inferences, so its address is never called."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", timeout_ms=1000, max_connections=1)
        self.not_ready: set[str] = set()
        self.unreachable = False

    async def metadata(self, model: str, version: str = "") -> dict[str, Any]:
        if self.unreachable:
            raise UpstreamUnavailable("triton unreachable")
        return INPUTS

    async def model_ready(self, model: str, version: str = "") -> bool:
        return model not in self.not_ready


class MemorySink:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def emit(self, stream: str, key: str, value: bytes) -> None:
        self.records.append(value)


class WatchedStore(FileStore):
    """The state file, keeping every state committed through it (what any reader could see),
    optionally holding a commit until released."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, poll_interval_s=3600.0)  # replicas converge only by commits here
        self.committed: list[RouteState] = []
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def commit(self, state: RouteState, expected_version: int) -> RouteState:
        result = await super().commit(state, expected_version)
        self.committed.append(state)
        if self.hold is not None:
            self.entered.set()
            await self.hold.wait()
        return result


class Replica:
    def __init__(self, path: Path, triton: FakeTriton) -> None:
        self.store = WatchedStore(path)
        self.sink = MemorySink()
        self.audit = AuditLog(self.sink)  # type: ignore[arg-type]
        routes = RouteTable(triton)
        seed = {ROUTE: parse_route(ROUTE, {
            "champion": {"model": "fraud_v3"},
            "challengers": [{"model": "fraud_v4", "sample_rate": 0.5}]})}
        self.registry = Registry(routes, self.store, self.audit, seed)
        self.controller = RolloutController(self.registry, routes, tick_s=0.01)

    def entries(self, action: str | None = None) -> list[dict[str, Any]]:
        """This replica's audit entries, oldest first."""
        entries = list(reversed(self.audit.recent(1000, ROUTE)))
        return [e for e in entries if action is None or e["action"] == action]

    def plan(self) -> Mapping[str, Any]:
        return self.controller.status(ROUTE)

    def feed(self, champion: int = 100, challenger: int = 5) -> None:
        """Records of the current step: enough for the latency threshold and `min_requests`."""
        plan = self.registry.state(ROUTE).config.rollout  # type: ignore[union-attr]
        assert plan is not None
        policy = {"type": "rollout", "target": plan.target, "fraction": plan.fraction}
        for model, n in (("fraud_v3", champion), ("fraud_v4", challenger)):
            for _ in range(n):
                self.controller.observe({
                    "route": ROUTE, "policy": policy, "status": 200,
                    "served": {"model": model}, "outputs": {model: {"latency_ms": 2.0}}})


@pytest.fixture
async def replica(tmp_path: Path) -> Any:
    one = Replica(tmp_path / "registry.json", FakeTriton())
    await one.registry.start()
    yield one
    await one.registry.close()


async def start_rollout(replica: Replica, steps: list[float]) -> None:
    await replica.controller.begin(WRITER, ROUTE, {
        "model": "fraud_v4", "steps": steps, "min_requests": 5, "min_seconds": 0})


def assert_no_completed_state_with_the_old_champion(states: list[RouteState]) -> None:
    for state in states:
        assert state.config is not None
        plan = state.config.rollout
        if plan is not None and plan.status == "completed":
            assert state.config.champion.model == plan.target, state.change["action"]


async def test_completion_and_promotion_are_one_change(replica: Replica) -> None:
    await start_rollout(replica, [20, 50, 100])
    replica.feed()
    await replica.controller.tick()
    assert (replica.plan()["status"], replica.plan()["step"]) == ("running", 1)
    replica.feed()
    await replica.controller.tick()

    view = replica.plan()
    assert view["status"] == "completed" and view["champion"]["model"] == "fraud_v4"
    state = replica.registry.state(ROUTE)
    assert state is not None and state.config is not None
    assert state.config.policy.type == "champion"
    assert [(c.model, c.mode) for c in state.config.challengers] == [("fraud_v3", "shadow")]
    assert [p.previous.model for p in state.history] == ["fraud_v3"]  # one `rollback` undoes it
    stored = read_states(replica.store.path)[ROUTE]  # the file says the same
    assert (stored.version, stored.config) == (state.version, state.config)
    assert [s.change["action"] for s in replica.store.committed] == [
        "seed", "rollout_start", "rollout_step", "rollout_complete"]
    assert_no_completed_state_with_the_old_champion(replica.store.committed)
    complete = replica.entries("rollout_complete")
    assert [e["outcome"] for e in complete] == ["applied"]
    assert complete[0]["before"]["champion"]["model"] == "fraud_v3"
    assert complete[0]["after"]["champion"]["model"] == "fraud_v4"
    assert replica.entries("promote") == []
    # the next ticks find nothing running: no second promotion
    await replica.controller.tick()
    assert len(replica.store.committed) == 4


async def test_a_promotion_refused_on_its_merits_rolls_the_route_back(
        replica: Replica) -> None:
    await start_rollout(replica, [50, 100])
    replica.feed()
    triton: FakeTriton = replica.registry.routes.upstream  # type: ignore[assignment]
    triton.not_ready.add("fraud_v4")  # Triton unloaded it: it cannot become champion
    await replica.controller.tick()

    view = replica.plan()
    assert view["status"] == "rolled_back", view
    assert view["reason"].startswith("passed every step, but promoting fraud_v4 was refused: "
                                     "champion model 'fraud_v4'"), view["reason"]
    assert view["champion"]["model"] == "fraud_v3"
    state = replica.registry.state(ROUTE)
    assert state is not None and state.config is not None
    assert state.config.policy.type == "champion"
    assert [(c.model, c.mode, c.sample_rate) for c in state.config.challengers] == [
        ("fraud_v4", "shadow", 0.5)]
    assert [(e["action"], e["outcome"]) for e in replica.entries()][-2:] == [
        ("rollout_complete", "rejected"), ("rollout_rollback", "applied")]
    assert_no_completed_state_with_the_old_champion(replica.store.committed)


async def test_triton_unreachable_at_completion_keeps_the_last_step_until_it_is_back(
        replica: Replica) -> None:
    await start_rollout(replica, [50, 100])
    replica.feed()
    triton: FakeTriton = replica.registry.routes.upstream  # type: ignore[assignment]
    triton.unreachable = True
    await replica.controller.tick()
    view = replica.plan()
    assert (view["status"], view["percent"], view["champion"]["model"]) == (
        "running", 50.0, "fraud_v3")
    triton.unreachable = False
    await replica.controller.tick()
    assert (replica.plan()["status"], replica.plan()["champion"]["model"]) == (
        "completed", "fraud_v4")
    assert [e["outcome"] for e in replica.entries("rollout_complete")] == ["rejected", "applied"]


async def test_replicas_completing_together_promote_once(tmp_path: Path) -> None:
    """Both replicas judged the last step passed on the same state; the file's compare-and-set
    lets one completion through and refuses the other (a 409: nothing is rolled back)."""
    triton = FakeTriton()
    a, b = Replica(tmp_path / "r.json", triton), Replica(tmp_path / "r.json", triton)
    await a.registry.start()
    await start_rollout(a, [50, 100])
    await b.registry.start()  # reads the running rollout from the file
    try:
        a.feed()
        b.feed()
        await b.controller.tick()
        await a.controller.tick()  # its state is still the running one: refused, nothing else
        assert [e["outcome"] for e in a.entries("rollout_complete")] == ["rejected"]
        assert a.entries("rollout_rollback") == []
        assert [e["outcome"] for e in b.entries("rollout_complete")] == ["applied"]
        stored = read_states(tmp_path / "r.json")[ROUTE]
        assert stored.config is not None and stored.config.rollout is not None
        assert stored.config.rollout.status == "completed"
        assert [p.previous.model for p in stored.history] == ["fraud_v3"]
    finally:
        await a.registry.close()
        await b.registry.close()


async def test_close_lets_a_transition_in_flight_reach_the_audit(replica: Replica) -> None:
    await start_rollout(replica, [50, 100])
    replica.feed()
    replica.store.hold = asyncio.Event()
    await replica.controller.start()
    await replica.store.entered.wait()  # the completion is in the file, its audit entry not yet
    closing = asyncio.create_task(replica.controller.close())
    await asyncio.sleep(0)
    assert not closing.done()
    replica.store.hold.set()
    await closing
    assert [e["outcome"] for e in replica.entries("rollout_complete")] == ["applied"]
    assert any(b'"rollout_complete"' in r for r in replica.sink.records)
