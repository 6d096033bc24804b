"""The Python admin client against a real gateway and Triton: typed results and typed errors.

The client is blocking (urllib), so each call runs in a worker thread while the test's event
loop keeps serving the in-process gateway.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import GatewayFactory
from tests.integration.test_admin import FRAUD_V3_ONLY, infer
from understudy.client import AdminClient, Refused, Unreachable

pytestmark = pytest.mark.triton


async def test_client_drives_a_challenger_through_its_life(make_gateway: GatewayFactory,
                                                           tokens: dict[str, str]) -> None:
    gw = await make_gateway(FRAUD_V3_ONLY)
    client = AdminClient(gw.url, token=tokens["write"])

    route = await asyncio.to_thread(client.add_challenger, "fraud", "fraud_v4", sample_rate=1.0,
                                    timeout_ms=2000)
    assert route.name == "fraud" and str(route.champion) == "fraud_v3"
    added = route.challenger("fraud_v4")
    assert added is not None and added.mode == "shadow" and added.sample_rate == 1.0
    assert added.experiment is not None and added.experiment.id

    updated = await asyncio.to_thread(client.update_challenger, "fraud", "fraud_v4",
                                      mode="explore", expected_version=route.version)
    assert updated.version == route.version + 1
    changed = updated.challenger("fraud_v4")
    assert changed is not None and changed.mode == "explore"
    assert changed.experiment is not None and changed.experiment != added.experiment

    policy = await asyncio.to_thread(client.set_policy, "fraud", "epsilon_greedy", epsilon=0.5)
    assert policy.policy["type"] == "epsilon_greedy"
    served = {await infer(gw, f"c{i}") for i in range(40)}
    assert served == {"fraud_v3", "fraud_v4"}

    promoted = await asyncio.to_thread(client.promote, "fraud", "fraud_v4")
    assert str(promoted.champion) == "fraud_v4" and str(promoted.rollback_to) == "fraud_v3"
    back = await asyncio.to_thread(client.rollback, "fraud")
    assert str(back.champion) == "fraud_v3"

    audit = await asyncio.to_thread(client.audit, "fraud", 10)
    assert [e.action for e in audit][:2] == ["rollback", "promote"]
    assert all(e.route == "fraud" for e in audit)
    assert [r.name for r in await asyncio.to_thread(client.routes)] == ["fraud"]


async def test_client_errors_are_typed(make_gateway: GatewayFactory,
                                       tokens: dict[str, str]) -> None:
    gw = await make_gateway(FRAUD_V3_ONLY)
    client = AdminClient(gw.url, token=tokens["write"])
    route = await asyncio.to_thread(client.route, "fraud")

    with pytest.raises(Refused) as missing:
        await asyncio.to_thread(client.remove_challenger, "fraud", "nope")
    assert missing.value.status == 404 and "nope" in missing.value.message

    await asyncio.to_thread(client.add_challenger, "fraud", "fraud_v4")
    with pytest.raises(Refused) as stale:  # another change landed since `route` was read
        await asyncio.to_thread(client.rollback, "fraud", expected_version=route.version)
    assert stale.value.status == 409

    anonymous = AdminClient(gw.url)
    with pytest.raises(Refused) as unauthorised:
        await asyncio.to_thread(anonymous.promote, "fraud", "fraud_v4")
    assert unauthorised.value.status == 401 and "UNDERSTUDY_ADMIN_TOKEN" in str(unauthorised.value)

    with pytest.raises(Unreachable) as down:
        await asyncio.to_thread(AdminClient("http://127.0.0.1:1", timeout=2).routes)
    assert down.value.status is None
