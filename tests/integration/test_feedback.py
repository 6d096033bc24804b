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


async def test_feedback_refuses_times_the_evaluator_cannot_date(
        make_gateway: GatewayFactory) -> None:
    """An event time in milliseconds (a common client slip), before 1970 or past 9999: a 400
    naming the field and the value, never a logged label the evaluator would have to reject."""
    gw = await make_gateway({"fraud": {"champion": {"model": "fraud_v3"}}})
    batch = [
        {"request_id": "ms", "label": 1, "event_time": 1764000000000},
        {"request_id": "old", "label": 1, "event_time": "1969-07-20T20:17:40Z"},
        {"request_id": "leap", "label": 1, "event_time": "9999-12-31T23:59:60Z"},
        {"request_id": "ok", "label": 1, "event_time": 1764000000},
    ]
    resp = await gw.post_json("/v2/feedback", batch)
    payload = orjson.loads(await resp.read())
    assert resp.status == 400 and payload["accepted"] == 1
    reasons = {r["index"]: r["error"] for r in payload["rejected"]}
    assert set(reasons) == {0, 1, 2}
    for index, shown in ((0, "got 1764000000000"), (1, "1969-07-20T20:17:40Z"),
                         (2, "9999-12-31T23:59:60Z")):
        assert "event_time must be unix seconds from 1970-01-01" in reasons[index]
        assert shown in reasons[index]
    await gw.stop()
    assert [r["request_id"] for r in gw.records("labels")] == ["ok"]
