"""POST /v2/feedback: validation item by item, good items kept, labels land in the log."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import GatewayFactory

pytestmark = pytest.mark.triton


async def test_feedback_keeps_good_items_and_names_bad_ones(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway({"fraud": {"champion": {"model": "fraud_v3"}}})
    resp = await gw.post_json("/v2/feedback", {"request_id": "a", "label": 1})
    assert resp.status == 200 and orjson.loads(await resp.read()) == {"accepted": 1, "orphans": 1}
    batch = [
        {"request_id": "b", "label": 0, "event_time": "2026-11-20T10:00:00Z"},
        {"request_id": "c", "reward": 0.5, "event_time": 1764000000},
        {"label": 1},
        {"request_id": "d"},
        {"request_id": "e", "label": "yes"},
        {"request_id": "f", "label": 1, "event_time": "last tuesday"},
        {"request_id": "g", "label": 1, "colour": "red"},
        "not an object",
    ]
    resp = await gw.post_json("/v2/feedback", batch)
    payload = orjson.loads(await resp.read())
    assert resp.status == 400
    assert payload["accepted"] == 2
    reasons = {r["index"]: r["error"] for r in payload["rejected"]}
    assert set(reasons) == {2, 3, 4, 5, 6, 7}
    assert "request_id" in reasons[2]
    assert "give 'label' or 'reward'" in reasons[3]
    assert "'label' must be" in reasons[4]
    assert "event_time" in reasons[5]
    assert "colour" in reasons[6]
    assert "expected an object" in reasons[7]
    resp = await gw.session.post(gw.url + "/v2/feedback", data=b"{oops")
    assert resp.status == 400 and "malformed JSON" in orjson.loads(await resp.read())["error"]
    await gw.stop()
    labels = {r["request_id"]: r for r in gw.records("labels")}
    assert set(labels) == {"a", "b", "c"}
    assert labels["b"]["label"] == 0.0 and labels["b"]["event_time"] == 1795168800.0
    assert labels["c"]["reward"] == 0.5 and labels["c"]["label"] is None
