"""One label validator (understudy/labels.py): the gateway's feedback path and the evaluator's
ingest accept exactly the same label values, and what the gateway logs is what the evaluator
joins. Property-based: hypothesis feeds both sides arbitrary JSON-ish values."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluator.ingest import RecordParser
from evaluator.store import Batch
from gateway.rest.feedback import FeedbackService, parse_item
from understudy.labels import LabelError, label_values

NOW = 1_700_000_000.0
ABSENT = object()

values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                         max_size=1),
)
indexes = st.one_of(st.just(ABSENT), st.integers(min_value=-3, max_value=2**40), st.booleans(),
                    st.none(), st.floats(), st.text(max_size=2))


def _item(label: Any, reward: Any, index: Any) -> dict[str, Any]:
    item = {"request_id": "req-1", "label": label, "reward": reward, "event_time": NOW - 60}
    if index is not ABSENT:
        item["index"] = index
    return item


def _ingest(record: dict[str, Any]) -> Batch:
    """The evaluator's ingest of one label record, as another producer might have written it
    (Python's json: NaN and huge integers survive the trip, as they would on the wire)."""
    batch = Batch()
    RecordParser(clock=lambda: NOW).parse(batch, json.dumps(record).encode())
    return batch


@settings(max_examples=300, deadline=None)
@given(label=values, reward=values, index=indexes)
def test_feedback_and_ingest_accept_the_same_labels(label: Any, reward: Any, index: Any) -> None:
    item = _item(label, reward, index)
    try:
        logged = parse_item(item, NOW)
    except LabelError:
        logged = None
    raw = {"schema_version": 1, "kind": "label", "received_ts": NOW, **item}
    batch = _ingest(raw)
    if logged is None:  # refused at the gateway: refused by the evaluator too
        assert dict(batch.bad) == {"invalid_label": 1}
        assert not batch.labels
        return
    assert not batch.bad
    # and the record the gateway logs is read to the same values
    from_log = Batch()
    RecordParser(clock=lambda: NOW).parse(from_log, orjson.dumps(logged))
    assert list(from_log.labels.items()) == list(batch.labels.items())
    (request_id, row), entry = next(iter(from_log.labels.items()))
    assert (request_id, row) == ("req-1", logged.get("index", 0))
    stored_label, stored_reward, has_label, event_time, received_ts, _ = entry
    assert has_label == (logged["label"] is not None)
    for stored, sent in ((stored_label, logged["label"]), (stored_reward, logged["reward"])):
        assert (math.isnan(stored) and sent is None) or stored == sent
    assert (event_time, received_ts) == (NOW - 60, NOW)


@pytest.mark.parametrize(("label", "reward", "index", "message"), [
    (None, None, 0, "give 'label' or 'reward'"),
    (float("nan"), None, 0, "'label' must be a finite number"),
    (2**1100, None, 0, "'label' must be a finite number"),  # no float holds it
    ("1", None, 0, "'label' must be a finite number"),
    (1, float("inf"), 0, "'reward' must be a finite number"),
    (1, None, -1, "'index' must be a non-negative integer"),
    (1, None, True, "'index' must be a non-negative integer"),
])
def test_label_values_name_the_problem(label: Any, reward: Any, index: Any,
                                       message: str) -> None:
    with pytest.raises(LabelError, match=message):
        label_values(label, reward, index)


def test_booleans_are_labels() -> None:
    assert label_values(True, None) == (1.0, None, 0)
    assert label_values(None, False, 3) == (None, 0.0, 3)


class _Sink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def emit(self, stream: str, key: str, value: bytes) -> None:
        self.lines.append(value)


async def test_feedback_service_logs_what_ingest_joins() -> None:
    sink = _Sink()
    service = FeedbackService(sink)  # type: ignore[arg-type]
    status, body = await service.accept(orjson.dumps([
        {"request_id": "a", "label": 1, "event_time": "2023-11-14T22:13:20Z"},
        {"request_id": "b", "reward": 0.25, "index": 2},
        {"request_id": "c", "label": "yes"},
    ]))
    assert status == 400 and body["accepted"] == 2
    assert "item 2: 'label' must be a finite number or boolean" in body["error"]
    batch = Batch()
    parser = RecordParser()
    for line in sink.lines:
        parser.parse(batch, line)
    assert not batch.bad
    assert batch.labels[("a", 0)][:4] == [1.0, pytest.approx(math.nan, nan_ok=True), True,
                                          NOW]
    assert batch.labels[("b", 2)][1] == 0.25
