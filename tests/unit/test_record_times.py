"""Record times outside the contract's range: a counted reject naming the field, never a
`date=NaT` (or five-digit-year, or negative-year) partition, in every reader (the lake's two
fast tiers and its per-record path, the store, the gateway's feedback, drift references).

Every record time (an inference's `ts`, a label's `received_ts` and `event_time`) is unix
seconds in MIN_TIME <= t < MAX_TIME (understudy/records.py), checked in one place
(understudy.labels.unix_seconds). Before that check the lake filed a record under whatever
day its float made (1e300: `date=NaT`; 1e12: `date=33658-09-27`, which retention's text
comparison took for an old date and deleted), and one such record moved the store's watermark
so far that every pending label expired.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluator import cli
from evaluator.drift import FeatureTypeError, load_reference
from evaluator.lake import layout
from evaluator.lake.columns import LakeBatch
from evaluator.lake.fastparse import FastParser
from evaluator.lake.reader import LakeReader
from evaluator.lake.storage import Lake, LakeError
from evaluator.store import Batch, Store
from tests.unit.test_eval_store import T0, LogDir, inference
from tests.unit.test_lake import _lake, assert_same, configs, ingest_both
from tests.unit.test_lake_fastparse import SRC, TODAY, fast, parser, per_record
from tests.unit.test_lake_fastparse import assert_same as assert_same_batches
from understudy.labels import LabelError, label_from_feedback
from understudy.reader import RecordError, read_record
from understudy.records import MAX_TIME, MIN_TIME

DAY = 86400.0
CLOCK = 1.75e9
# the boundaries, both sides, and the shapes absurd times take in practice
EDGES = [MIN_TIME, -0.0, 5e-324, -5e-324, -1.0, math.nextafter(MAX_TIME, 0.0), MAX_TIME,
         float(MAX_TIME), 1e12, 1.7e12, 1.7e15, 1e300, -1e300, math.inf, -math.inf, math.nan,
         2**63, 2**64 + 1, -(2**63) - 1, 10**400]
times = st.one_of(st.floats(), st.floats(MIN_TIME, MAX_TIME), st.sampled_from(EDGES),
                  st.integers(-(2**70), 2**70))


def in_range(t: Any) -> bool:
    return MIN_TIME <= t < MAX_TIME


def utc_day(t: float) -> str:
    return datetime.datetime.fromtimestamp(float(t), datetime.UTC).date().isoformat()


def raw(value: dict[str, Any]) -> bytes:
    """Python's json: NaN/Infinity literals and big integers survive, as from other producers."""
    return json.dumps(value).encode()


def records(t: Any) -> list[bytes]:
    """`t` in each time field of each record kind (the others plausible)."""
    base = {"schema_version": 1, "kind": "label", "request_id": "l", "label": 1}
    return [raw(inference("i", t)),
            raw({**base, "request_id": "rt", "received_ts": t, "event_time": T0}),
            raw({**base, "request_id": "et", "event_time": t}),  # dates the label too
            raw({**base, "request_id": "e2", "received_ts": T0, "event_time": t})]


def json_tier(raws: list[bytes | None]) -> LakeBatch:
    """The orjson tier alone (it hands what it does not take to the per-record path)."""
    batch = LakeBatch()
    FastParser(parser()).parse_json(batch, SRC, range(len(raws)), raws)
    return batch


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(times)
def test_any_time_lands_on_its_utc_date_or_is_a_counted_reject(t: Any) -> None:
    raws: list[bytes | None] = list(records(t))
    reference = per_record(raws, parser())
    # the three paths agree byte for byte: per record, typed tier first, orjson tier first
    assert_same_batches(reference, fast(raws, parser()))
    assert_same_batches(reference, json_tier(raws))
    rels = [rel for rel, _ in reference.tables(TODAY)]
    for rel in rels:  # never NaT, never a date a partition name cannot say
        assert layout.partition_date(rel.rsplit("/", 1)[1]) is not None, rel
    if in_range(t):
        day = utc_day(t)
        assert rels == list(dict.fromkeys([f"inferences/route=fraud/date={day}",
                                           f"labels/date={day}", f"labels/date={utc_day(T0)}"]))
        assert not reference.bad and reference.records == 1
        assert reference.ts == [float(t)]
        assert reference.l_received_ts == [float(t), float(t), T0]
        assert reference.l_event_time == [T0, float(t), float(t)]
        return
    assert rels == [f"rejects/date={TODAY}"]
    assert dict(reference.bad) == {"invalid_inference": 1, "invalid_label": 3}
    assert reference.r_reason == ["bad:invalid_inference"] + ["bad:invalid_label"] * 3
    assert reference.watermark == -math.inf  # nothing read moved it
    for line, field in zip(raws, ["ts", "received_ts", "event_time", "event_time"], strict=True):
        assert line is not None
        with pytest.raises(RecordError) as info:
            read_record(line, lambda: CLOCK)
        message = str(info.value)
        assert f"{field} must be unix seconds from 1970-01-01" in message
        # the value as read (orjson reads an integer past 64 bits as a float)
        assert f"got {repr(t)[:24]}" in message or f"got {float(t)!r}" in message, message


def test_times_that_are_not_numbers_keep_their_old_verdicts() -> None:
    """Text, null, a boolean: an inference without a usable ts is bad; a label's time is
    unknown (its other time, or the clock, dates it)."""
    for ts in ("1.7e9", None, [1], True):
        with pytest.raises(RecordError, match=r"i: ts must be unix seconds, got "):
            read_record(raw(inference("i", ts)), lambda: CLOCK)  # type: ignore[arg-type]
    label = read_record(raw({"schema_version": 1, "kind": "label", "request_id": "a",
                             "label": 1, "received_ts": "soon", "event_time": True}),
                        lambda: CLOCK)
    assert label is not None and (label.received_ts, label.event_time) == (CLOCK, CLOCK)


def test_a_lake_and_a_store_fed_absurd_times_agree_and_lose_nothing(tmp_path: Path) -> None:
    """Segment files through the real members: the lake's partitions are real dates, every
    absurd record is a reject row, and the store (same files) counts the same; neither moves
    its watermark, so a pending label does not expire."""
    log = LogDir(tmp_path / "log")
    log.inferences(inference("a", T0), inference("ms", T0 * 1000), inference("nan", math.nan),
                   inference("neg", -T0), inference("b", T0 + 1))
    log.labels(
        {"schema_version": 1, "kind": "label", "request_id": "a", "label": 1,
         "event_time": T0, "received_ts": T0 + 5},
        {"schema_version": 1, "kind": "label", "request_id": "pending", "label": 1,
         "event_time": T0, "received_ts": T0 + 6},  # no inference yet: an orphan
        {"schema_version": 1, "kind": "label", "request_id": "b", "label": 0,
         "event_time": 1e300, "received_ts": T0 + 7})
    store_cfg, lake_cfg = ingest_both(tmp_path)
    assert_same(store_cfg, lake_cfg, routes=("fraud",))
    lake = Lake(lake_cfg.lake.path)
    for table in layout.TABLES:
        for part in lake.partitions(table):
            assert layout.partition_date(part.rsplit("/", 1)[1]) is not None, part
    with LakeReader.open(lake_cfg) as reader:
        assert reader.counters()["bad:invalid_inference"] == 3
        assert reader.counters()["bad:invalid_label"] == 1
        assert reader.watermark() == T0 + 6
        assert reader.join_stats("fraud").orphan_labels == 1
    with Store.open(store_cfg.store) as store:
        assert store.watermark() == T0 + 6
        assert store.expire_orphans() == 0  # "pending" waits for its inference
        assert store.join_stats("fraud").orphan_labels == 1


def test_store_ingest_refuses_an_absurd_time_in_a_batch() -> None:
    """The store's own batch (no lake): the record is counted, the watermark is not moved."""
    batch = Batch()
    parser().parse(batch, orjson.dumps(inference("a", T0)))
    parser().parse(batch, orjson.dumps(inference("b", 1e15)))
    assert dict(batch.bad) == {"invalid_inference": 1}
    assert batch.watermark == T0


# -- retention over partitions written before the check ---------------------------------------

ODD = ["labels/date=NaT", "inferences/route=fraud/date=NaT",
       "inferences/route=fraud/date=33658-09-27", "inferences/route=fraud/date=-29719-04-05",
       "labels/date=10209-01-27", "rejects/date=2026-13-45", "labels/date=",
       "inferences/route=fraud/when=2020-01-01"]


def _old_lake(tmp_path: Path) -> tuple[Lake, list[str]]:
    """A lake with real old and new partitions and the odd names an unchecked writer made."""
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure()
    table = pa.table({"reason": ["bad:x"], "src": ["file:s"], "pos": [0]},
                     schema=layout.REJECT_SCHEMA)
    for rel in ODD:
        lake.write(rel, table, "old")
    kept = ["labels/date=2026-12-01", "inferences/route=fraud/date=2026-12-02"]
    for rel in [*kept, "labels/date=2026-10-01", "inferences/route=fraud/date=1970-01-01",
                "rejects/date=2026-11-30"]:
        lake.write(rel, table, "m1")
    return lake, kept


def test_retention_keeps_and_reports_partitions_it_cannot_date(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lake, kept = _old_lake(tmp_path)
    with caplog.at_level(logging.WARNING, logger="evaluator.lake.storage"):
        done = lake.expire("2026-12-01")
    assert done.partitions == 3 and done.files_in == 3  # the three dated before the cutoff
    assert sorted(done.skipped) == sorted(ODD)
    left = sorted(str(Path(p).relative_to(tmp_path / "lake"))
                  for t in layout.TABLES for p in lake.partitions(t))
    assert left == sorted([*ODD, *kept])
    for rel in ODD:  # untouched, data and all
        (file,) = (tmp_path / "lake" / rel).glob("*.parquet")
        assert pq.read_table(file).num_rows == 1
    assert "kept 8 partition(s) whose name is not a date" in caplog.text
    assert lake.expire("2026-12-01").partitions == 0  # and again: nothing else goes
    with pytest.raises(LakeError, match="not a date"):
        lake.expire("NaT")


def test_lake_expire_command_names_the_partitions_it_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake, _ = _old_lake(tmp_path)
    cfg = tmp_path / "evaluator.yaml"
    cfg.write_text(json.dumps({"source": {"path": str(tmp_path / "log")},
                               "lake": {"path": str(tmp_path / "lake")}}))
    assert cli.main(["lake", "expire", "--config", str(cfg), "--older-than", "1d"]) == \
        cli.ExitCode.OK
    out = capsys.readouterr().out
    assert "kept 8 partition(s) whose name is not a date" in out
    assert "labels/date=NaT" in out and "inferences/route=fraud/date=33658-09-27" in out
    left = {str(Path(p).relative_to(tmp_path / "lake"))
            for t in layout.TABLES for p in lake.partitions(t)}
    assert set(ODD) <= left  # nothing odd went; the old dated ones did
    assert not left & {"labels/date=2026-10-01", "inferences/route=fraud/date=1970-01-01"}


def test_compaction_leaves_an_odd_partition_readable(tmp_path: Path) -> None:
    """A `date=NaT` partition is still data (its rows were durable): compaction merges it in
    place like any other and the reader counts its rows."""
    _, lake_cfg = configs(tmp_path)
    lake = _lake(lake_cfg)
    table = pa.table({"reason": ["bad:x"], "src": ["file:s"], "pos": [0]},
                     schema=layout.REJECT_SCHEMA)
    for pos in range(2):
        lake.write("rejects/date=NaT", table.set_column(2, "pos", pa.array([pos])), "old")
    assert lake.compact().files_in == 2
    with LakeReader.open(lake_cfg) as reader:
        assert reader.counters()["bad:x"] == 2


# -- the gateway's feedback: what it logs, the evaluator reads -----------------------------------


@settings(max_examples=300, deadline=None)
@given(times)
def test_feedback_and_ingest_agree_on_event_times(t: Any) -> None:
    item = {"request_id": "r-1", "label": 1, "event_time": t}
    batch = Batch()
    parser().parse(batch, raw({"schema_version": 1, "kind": "label", "received_ts": CLOCK,
                               **item}))
    if not in_range(t):  # refused by the gateway: a bad record to the evaluator too
        with pytest.raises(LabelError, match=r"^event_time must be unix seconds from 1970"):
            label_from_feedback(item, CLOCK)
        assert dict(batch.bad) == {"invalid_label": 1}
        return
    assert label_from_feedback(item, CLOCK)["event_time"] == float(t)
    assert not batch.bad and next(iter(batch.labels.values()))[3] == float(t)


@pytest.mark.parametrize("text", ["1969-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00",
                                  "9999-12-31T23:59:59-01:00", "9999-12-31T23:59:60Z"])
def test_feedback_refuses_date_times_outside_the_range(text: str) -> None:
    """Including a leap second at the end of 9999, which overflowed Python's datetime."""
    with pytest.raises(LabelError, match=r"event_time must be unix seconds from 1970-01-01 .*"
                                         r"\(from '"):
        label_from_feedback({"request_id": "r", "label": 1, "event_time": text}, CLOCK)
    edge = label_from_feedback({"request_id": "r", "label": 1,
                                "event_time": "9999-12-31T23:59:59Z"}, CLOCK)
    assert edge["event_time"] == MAX_TIME - 1
    assert time.gmtime(edge["event_time"]).tm_year == 9999


# -- drift references: the same range, a clear error instead of OverflowError -------------------


@pytest.mark.parametrize(("cell", "shown"), [
    ("1e300", "got 1e+300"), ("1.7e15", "got 1700000000000000.0"), ("-5", "got -5.0"),
    ("10000-01-01", "not a timestamp"), ("9" * 400, "got inf")])
def test_drift_reference_times_outside_the_range_are_refused(tmp_path: Path, cell: str,
                                                             shown: str) -> None:
    """1e300 made `describe()` raise OverflowError; 1.7e15 named year 53871874."""
    path = tmp_path / "ref.csv"
    path.write_text(f"ts,amount\n1700000000,1.0\n{cell},2.0\n")
    with pytest.raises(FeatureTypeError, match=r"column 'ts' row 2: .*" + shown.replace(
            "+", r"\+").replace(".", r"\.")):
        load_reference(path)
    path.write_text("ts,amount\n1700000000,1.0\n1700000060,2.0\n")
    assert load_reference(path).describe()["until_iso"] == "2023-11-14T22:14:20Z"
