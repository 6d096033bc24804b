"""Replay's pieces without Triton: the rate cap, shedding, resumable/idempotent logging, the
records it writes, and the disagreement explorer's ranking."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from evaluator.dataset import STATUS_CODES, EvalDataset, ModelColumn
from evaluator.ingest import RecordParser
from evaluator.replay.lane import ReplayLane, TokenBucket
from evaluator.replay.logged import LoggedInput, LoggedRow
from evaluator.replay.records import replay_dir, replay_id, replay_route, written_ids
from evaluator.replay.run import infer_body, replay
from evaluator.report.disagreement import disagreement, disagreement_blocks, rank
from evaluator.store import MODE_CODES, Batch
from gateway.backends.file_sink import FileSink
from gateway.upstream.keepalive import RawResponse
from understudy.record_schema import record_problems


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_never_exceeds_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(100.0, burst=5, clock=clock)
    due = []
    for _ in range(1000):  # a caller that never waits: every reservation books the next slot
        due.append(clock.now + bucket.reserve())
    # the first `burst` go at once, then exactly one per 1/rate
    assert due[:5] == [0.0] * 5
    assert np.diff(due[5:]) == pytest.approx(np.full(994, 0.01))
    assert due[-1] == pytest.approx((1000 - 5) / 100)


def test_token_bucket_banks_at_most_burst_while_idle() -> None:
    clock = Clock()
    bucket = TokenBucket(10.0, burst=3, clock=clock)
    clock.now = 3600.0  # an hour idle
    waits = [bucket.reserve() for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == pytest.approx([0.1, 0.2])


def test_the_lane_sheds_a_turn_when_every_slot_is_busy() -> None:
    lane = ReplayLane("http://127.0.0.1:9", rate=1e6, concurrency=2)
    try:
        assert asyncio.run(lane.turn()) is True
        lane.in_flight = 2
        assert asyncio.run(lane.turn()) is False
        assert lane.shed == 1
        lane.in_flight = 0
        for latency in (0.002, 0.002, 0.05, 0.05, 0.05):  # Triton got 25x slower: loaded
            lane.observe(latency)
        assert lane.busy
        turns = [asyncio.run(lane.turn()) for _ in range(40)]
        assert turns[0] is False  # shed while slow ...
        assert turns[-1] is True  # ... and probing again once the estimate decayed
    finally:
        lane.close()


class FakeLane:
    """Triton stand-in: answers score = first feature, or refuses after `fail_after` calls."""

    url = "http://fake"
    timeout_s = 1.0
    shed = 0

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    async def turn(self) -> bool:
        return True

    async def post(self, path: str, body: bytes, content_type: str,
                   extra_headers: bytes = b"") -> RawResponse:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise ConnectionRefusedError("refused")
        self.calls += 1
        size = int(extra_headers.split(b":")[1])
        header = orjson.loads(body[:size])
        first = float(np.frombuffer(body[size:size + 4], dtype="<f4")[0])
        assert header["inputs"][0]["shape"] == [1, 3]
        answer = {"model_name": "m", "model_version": "2",
                  "outputs": [{"name": "score", "datatype": "FP32", "shape": [1, 1],
                               "data": [first]}]}
        return RawResponse(200, {}, orjson.dumps(answer), 0.001)


def rows(n: int) -> list[LoggedRow]:
    return [LoggedRow(request_id=f"r{i}", ts=1000.0 + i, champion="champ", champion_version="1",
                      champion_status="ok", champion_score=0.5, champion_latency_ms=1.0,
                      gateway_latency_ms=2.0, http_status=200,
                      inputs={"features": LoggedInput("FP32", [i / 10, 1.0, 2.0])},
                      label=float(i % 2) if i % 3 else None, event_time=1000.0 + i,
                      received_ts=2000.0 + i) for i in range(n)]


async def _replay_into(directory: Path, logged: list[LoggedRow], lane: FakeLane) -> Any:
    done, labelled = written_ids(directory)
    sink = FileSink(directory)
    await sink.start()
    try:
        return await replay(logged, route="fraud", challenger="ch", lane=lane,  # type: ignore[arg-type]
                            sink=sink, done=done, labelled=labelled)
    finally:
        await sink.close()


def test_replay_resumes_where_it_stopped_and_never_replays_twice(tmp_path: Path) -> None:
    directory = replay_dir(tmp_path, "fraud", "ch")
    logged = rows(30)
    first = asyncio.run(_replay_into(directory, logged, FakeLane(fail_after=12)))
    assert first.unreachable and first.ok == 12
    done, _ = written_ids(directory)
    assert len(done) == 12
    second = asyncio.run(_replay_into(directory, logged, FakeLane()))
    assert (second.skipped, second.sent, second.unreachable) == (12, 18, None)
    third = asyncio.run(_replay_into(directory, logged, FakeLane()))
    assert (third.skipped, third.sent, third.labels) == (30, 0, 0)
    lines = [orjson.loads(x) for p in sorted((directory / "inferences").glob("*.jsonl"))
             for x in p.read_bytes().splitlines()]
    ids = [r["request_id"] for r in lines]
    assert len(ids) == len(set(ids)) == 30
    assert set(ids) == {replay_id(f"r{i}", "ch") for i in range(30)}
    labels = [orjson.loads(x) for p in sorted((directory / "labels").glob("*.jsonl"))
              for x in p.read_bytes().splitlines()]
    assert len(labels) == sum(1 for r in logged if r.labelled) == len(written_ids(directory)[1])
    # a label known only later is copied by the next run, once
    logged[0].label = 1.0
    fourth = asyncio.run(_replay_into(directory, logged, FakeLane()))
    assert (fourth.sent, fourth.labels) == (0, 1)


def test_replay_records_are_schema_v1_and_ingest_as_mode_replay(tmp_path: Path) -> None:
    directory = replay_dir(tmp_path, "fraud", "ch")
    asyncio.run(_replay_into(directory, rows(4), FakeLane()))
    raw = [x for p in sorted((directory / "inferences").glob("*.jsonl"))
           for x in p.read_bytes().splitlines()]
    for line in raw:
        record = orjson.loads(line)
        assert record_problems(record) == []
        assert record["route"] == replay_route("fraud")
        assert record["outputs"]["ch"]["mode"] == "replay"
        assert record["outputs"]["ch"]["outputs"]["score"]["data"][0] == pytest.approx(
            record["inputs"]["features"]["data"][0], rel=1e-6)
    batch = Batch()
    parser = RecordParser()
    for line in raw:
        parser.parse(batch, line)
    assert batch.bad == {}
    assert MODE_CODES["replay"] in batch.o_mode


def test_infer_body_sends_numeric_tensors_binary_in_their_own_width() -> None:
    body, headers = infer_body({"x": LoggedInput("INT64", [1.0, 2.0 ** 40]),
                                "h": LoggedInput("FP16", [0.5]),
                                "s": LoggedInput("BYTES", ["a", "b"])})
    size = int(headers.split(b":")[1])
    header = orjson.loads(body[:size])
    assert [i["datatype"] for i in header["inputs"]] == ["INT64", "FP16", "BYTES"]
    assert header["inputs"][2]["data"] == ["a", "b"]
    blob = body[size:]
    assert np.frombuffer(blob[:16], dtype="<i8").tolist() == [1, 2 ** 40]
    assert np.frombuffer(blob[16:], dtype="<f2").tolist() == [0.5]


# -- the disagreement explorer ----------------------------------------------------------------


def dataset(champ: list[float], ch: list[float], labels: list[float],
            task: str = "classification") -> EvalDataset:
    n = len(champ)
    ok = np.zeros(n, dtype=np.int8)
    status = np.where(np.isnan(ch), STATUS_CODES["error"], 0).astype(np.int8)
    return EvalDataset(
        route="r", task=task, champion="a", request_ids=np.array([f"q{i}" for i in range(n)],
                                                                dtype=object),
        ts=np.arange(n, dtype=float), labels=np.array(labels, dtype=float),
        rewards=np.full(n, np.nan), served=np.full(n, "a", dtype=object),
        propensity=np.ones(n), arm_probs={}, policy_types=np.full(n, "champion", dtype=object),
        models={"a": ModelColumn("a", "champion", np.array(champ), ok, np.ones(n)),
                "b": ModelColumn("b", "challenger", np.array(ch), status, np.ones(n))})


def test_rank_orders_by_absolute_difference_ties_by_request_id_and_skips_nan() -> None:
    diff = np.array([0.1, -0.5, np.nan, 0.5, 0.2])
    ids = np.array(["e", "d", "c", "b", "a"], dtype=object)
    assert rank(diff, ids, 10) == [3, 1, 4, 0]
    assert rank(diff, ids, 2) == [3, 1]


def test_disagreement_section_classification() -> None:
    ds = dataset([0.1, 0.2, 0.9, 0.6, 0.4], [0.15, 0.8, 0.85, 0.3, math.nan], [0, 1, 1, 0, 1])
    part = disagreement(ds, top_n=2)["challengers"]["b"]  # type: ignore[index]
    assert part["n"] == 4  # q4: the challenger failed
    assert [r["request_id"] for r in part["top"]] == ["q1", "q3"]
    assert part["top"][0] == {"request_id": "q1", "champion": 0.2, "challenger": 0.8,
                              "diff": pytest.approx(0.6), "label": 1.0, "agree": False}
    assert part["agreement"] == 0.5
    assert sum(b["n"] for b in part["bands"]) == 4
    assert [b["n"] for b in part["bands"]] == [1, 1, 0, 1, 1]
    assert "residuals" not in part


def test_disagreement_section_regression_residuals_and_blocks() -> None:
    ds = dataset([10.0, 20.0, 30.0, 40.0], [10.2, 25.0, 29.0, 30.0], [10.0, 24.0, 35.0, 41.0],
                 task="regression")
    section = disagreement(ds, top_n=3)
    part = section["challengers"]["b"]  # type: ignore[index]
    # |res| change: q0 +0.2, q1 -3, q2 +1, q3 +10
    assert [(r["request_id"], r["change"]) for r in part["residuals"]] == [
        ("q3", pytest.approx(10.0)), ("q1", pytest.approx(-3.0)), ("q2", pytest.approx(1.0))]
    assert part["agreement"] == 0.5  # q0 and q2 within 5% of the champion
    blocks = disagreement_blocks({"disagreement": section, "champion": "a"})
    assert [b.kind for b in blocks].count("table") == 3
    assert "`q3`" in blocks[-1].rows[0][0]


def test_promote_refuses_a_replay_verdict() -> None:
    from evaluator.cli.promote import PromoteRefused, check_report

    report = {"route": "fraud", "generated_at": 1000.0, "replay": ["fraud_v4"],
              "decisions": [{"challenger": "fraud_v4", "decision": "PROMOTE"}]}
    with pytest.raises(PromoteRefused, match="replay"):
        check_report(report, "fraud", "fraud_v4", max_age=3600.0, now=1001.0)
