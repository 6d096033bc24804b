"""Join semantics of the evaluator store, fed through segment files like the gateway writes them.

Every test runs on both engines: the store's SQL must mean the same thing on DuckDB (default)
and SQLite (selectable), or the benchmark that chose between them compared different programs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from evaluator.config import EvaluatorConfig, parse_config
from evaluator.dataset import STATUS_CODES
from evaluator.ingest import FileIngestor
from evaluator.store import DAY, EmptyDatasetError, Store

T0 = 1_700_000_000.0
CHAMP, CHAL = "fraud_v3", "fraud_v4"


def tensor(values: list[Any], shape: list[int] | None = None, datatype: str = "FP32") -> dict:
    return {"datatype": datatype, "shape": shape or [1, len(values)], "data": values}


def outcome(score: Any, *, role: str = "challenger", mode: str = "shadow", status: str = "ok",
            latency: float | None = 2.0, name: str = "score") -> dict[str, Any]:
    return {"role": role, "mode": mode, "version": "1", "status": status, "latency_ms": latency,
            "outputs": None if status != "ok" else {name: tensor([score], [1, 1])},
            "error": None if status == "ok" else "boom"}


def inference(rid: str, ts: float, *, route: str = "fraud", champ: Any = 0.2,
              chal: Any = 0.3, chal_status: str = "ok", challenger: bool = True,
              features: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    outputs = {CHAMP: outcome(champ, role="champion", mode="served", latency=1.0)}
    if challenger:
        outputs[CHAL] = outcome(chal, status=chal_status, latency=3.0)
    record = {
        "schema_version": 1, "kind": "inference", "request_id": rid, "ts": ts, "route": route,
        "policy": {"type": "champion"}, "served": {"model": CHAMP, "version": "1"},
        "propensity": 1.0, "arms": {CHAMP: 1.0}, "key": None,
        "inputs": {"features": tensor(features or [0.1, 0.2, 0.3])},
        "outputs": outputs, "status": 200, "gateway_latency_ms": 1.5,
    }
    record.update(extra)
    return record


def label(rid: str, value: float | None, received: float, **extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "kind": "label", "request_id": rid, "label": value,
            "reward": None, "event_time": received - 60, "received_ts": received, **extra}


class LogDir:
    """Appends records to `<root>/<stream>/00000000000000000000.jsonl` like the file sink."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, stream: str, *records: dict[str, Any] | bytes) -> None:
        directory = self.root / stream
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"{0:020d}.jsonl", "ab") as fh:
            for r in records:
                fh.write((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n")

    def inferences(self, *records: dict[str, Any] | bytes) -> None:
        self.write("inferences", *records)

    def labels(self, *records: dict[str, Any] | bytes) -> None:
        self.write("labels", *records)


@pytest.fixture(params=["duckdb", "sqlite"])
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def env(tmp_path: Path, engine: str) -> tuple[LogDir, EvaluatorConfig]:
    config = parse_config({
        "source": {"path": str(tmp_path / "log"), "batch_records": 3},  # many small batches
        "store": {"path": str(tmp_path / f"store.{engine}"), "engine": engine,
                  "join_window": "14d"},
    }, env={})
    return LogDir(tmp_path / "log"), config


@pytest.fixture
def store(env: tuple[LogDir, EvaluatorConfig]) -> Store:
    with Store.open(env[1].store) as s:
        yield s


def drain(env: tuple[LogDir, EvaluatorConfig], store: Store) -> int:
    return FileIngestor(env[1], store).drain()


def test_late_label_joins_however_late(env, store) -> None:
    log, _ = env
    log.inferences(inference("a", T0), inference("b", T0 + 1))
    drain(env, store)
    log.labels(label("a", 1, T0 + 30 * DAY))  # a month late, longer than the join window
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert list(ds.request_ids) == ["a"]
    assert ds.labels.tolist() == [1.0]
    assert ds.stats.joined == 1
    assert ds.stats.inferences == 2


def test_duplicate_labels_last_received_wins_and_are_counted(env, store) -> None:
    log, _ = env
    log.inferences(inference("a", T0), inference("b", T0 + 1))
    log.labels(label("a", 1, T0 + 10), label("a", 0, T0 + 20))  # same batch: later wins
    drain(env, store)
    log.labels(label("b", 0, T0 + 30))
    log.labels(label("b", 1, T0 + 40))  # a correction, read in a later batch
    log.labels(label("b", 0, T0 + 35))  # arrives last but was received earlier: loses
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert dict(zip(ds.request_ids, ds.labels, strict=True)) == {"a": 0.0, "b": 1.0}
    assert ds.stats.labels == 5
    assert ds.stats.duplicate_labels == 3


def test_duplicate_inference_records_are_dropped_and_counted(env, store) -> None:
    log, _ = env
    first = inference("a", T0, champ=0.25)
    log.inferences(first, first, inference("b", T0 + 1))  # re-delivery within one batch
    drain(env, store)
    log.inferences(inference("a", T0, champ=0.99))  # and again later (first copy wins)
    log.labels(label("a", 1, T0 + 5), label("b", 0, T0 + 5))
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert len(ds) == 2
    assert ds.stats.inferences == 2
    assert ds.stats.duplicate_inferences == 2
    assert ds.models[CHAMP].scores[list(ds.request_ids).index("a")] == pytest.approx(0.25)


def test_orphan_labels_wait_for_the_window_then_expire(env, store) -> None:
    log, _ = env
    log.labels(label("ghost", 1, T0), label("early", 1, T0))
    log.inferences(inference("x", T0 + DAY))
    drain(env, store)
    assert store.expire_orphans() == 0  # watermark T0+1d: both still inside 14d
    assert store.join_stats("fraud").orphan_labels == 2

    log.inferences(inference("early", T0 + 2 * DAY))  # the label was there first: joins now
    log.inferences(inference("late", T0 + 15 * DAY))  # moves the watermark past the window
    drain(env, store)
    assert store.expire_orphans() == 1  # "ghost"; "early" is joined, not an orphan
    stats = store.join_stats("fraud")
    assert (stats.orphan_labels, stats.expired_orphans, stats.joined) == (0, 1, 1)

    log.inferences(inference("ghost", T0 + 16 * DAY))  # too late: its label is gone
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert list(ds.request_ids) == ["early"]
    assert ds.stats.expired_orphans == 1


def test_labels_before_their_inference_join_on_arrival(env, store) -> None:
    log, _ = env
    log.labels(label("a", 1, T0), label("b", 0, T0))
    drain(env, store)
    with pytest.raises(EmptyDatasetError):
        store.load_dataset("fraud")
    log.inferences(inference("a", T0 + 3), inference("b", T0 + 4), inference("c", T0 + 5))
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert list(ds.request_ids) == ["a", "b"]
    assert ds.labels.tolist() == [1.0, 0.0]
    assert ds.stats.orphan_labels == 0


def test_inference_and_its_labels_in_one_batch(store) -> None:
    # Kafka batches mix both topics: a label can meet its inference (and a pending orphan
    # label for it) inside one transaction.
    from evaluator.ingest import RecordParser
    from evaluator.store import Batch

    parser = RecordParser()
    batch = Batch()
    parser.parse(batch, orjson.dumps(label("x", 1, T0)))
    store.ingest(batch)
    batch = Batch()
    for record in (inference("x", T0 + 1), label("x", 0, T0 + 2), label("y", 1, T0 + 2),
                   inference("y", T0 + 1)):
        parser.parse(batch, orjson.dumps(record))
    store.ingest(batch)
    ds = store.load_dataset("fraud")
    assert dict(zip(ds.request_ids, ds.labels, strict=True)) == {"x": 0.0, "y": 1.0}
    assert (ds.stats.labels, ds.stats.duplicate_labels, ds.stats.orphan_labels) == (3, 1, 0)


def test_nan_and_inf_scores_are_stored_as_nan(env, store) -> None:
    log, _ = env
    # orjson writes NaN/inf as null; Python's json writes NaN/Infinity literals: read both.
    log.inferences(
        inference("null", T0, champ=None),
        json.dumps(inference("nan", T0 + 1, champ=math.nan)).encode(),
        json.dumps(inference("inf", T0 + 2, champ=math.inf, chal=-math.inf)).encode(),
        inference("str", T0 + 3, champ="oops"),
        inference("err", T0 + 4, chal_status="timeout"),
        inference("fine", T0 + 5, champ=0.5),
    )
    log.labels(*(label(r, 1, T0 + 10) for r in ("null", "nan", "inf", "str", "err", "fine")))
    drain(env, store)
    ds = store.load_dataset("fraud")
    champ, chal = ds.models[CHAMP], ds.models[CHAL]
    assert np.isnan(champ.scores[:4]).all()
    assert champ.scores[5] == 0.5
    assert (champ.status == STATUS_CODES["ok"]).all()  # the call worked; the number did not
    assert np.isnan(chal.scores[2])
    assert chal.status[4] == STATUS_CODES["timeout"]
    assert np.isnan(chal.scores[4])
    assert chal.latency_ms[4] == 3.0


def test_empty_windows_say_why(env, store) -> None:
    log, _ = env
    with pytest.raises(EmptyDatasetError, match="nothing ingested yet"):
        store.load_dataset("fraud")
    log.inferences(inference("a", T0))
    drain(env, store)
    with pytest.raises(EmptyDatasetError, match="Routes in the store: fraud"):
        store.load_dataset("frued")
    with pytest.raises(EmptyDatasetError, match="none has a label yet") as info:
        store.load_dataset("fraud")
    assert info.value.stats.inferences == 1
    log.labels(label("a", 1, T0 + 1))
    drain(env, store)
    with pytest.raises(EmptyDatasetError, match="no inferences in"):
        store.load_dataset("fraud", since=T0 + 10)
    assert len(store.load_dataset("fraud", since=T0, until=T0 + 1)) == 1


def test_dataset_columns_align_per_model(env, store) -> None:
    log, _ = env
    log.inferences(
        inference("a", T0 + 2, champ=0.1, chal=0.7),
        inference("b", T0 + 1, champ=0.4, challenger=False),  # not mirrored: skipped
        inference("c", T0 + 3, chal_status="error"),
        inference("d", T0 + 4, route="price"),
    )
    log.labels(label("a", 1, T0 + 9, reward=1.0), label("b", 0, T0 + 9), label("c", 1, T0 + 9),
               label("d", 3.5, T0 + 9))
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert list(ds.request_ids) == ["b", "a", "c"]  # ordered by ts
    assert ds.task == "classification"
    assert ds.champion == CHAMP
    assert ds.challengers == [CHAL]
    assert ds.models[CHAMP].role == "champion"
    assert ds.models[CHAMP].modes == ("served",)
    assert ds.models[CHAL].modes == ("shadow",)
    np.testing.assert_allclose(ds.models[CHAMP].scores, [0.4, 0.1, 0.2])
    assert ds.models[CHAL].status.tolist() == [STATUS_CODES["skipped"], 0, STATUS_CODES["error"]]
    assert np.isnan(ds.models[CHAL].scores[[0, 2]]).all()
    assert ds.models[CHAL].scores[1] == pytest.approx(0.7)
    assert ds.rewards[1] == 1.0
    assert np.isnan(ds.rewards[0])
    assert ds.served.tolist() == [CHAMP] * 3
    assert ds.policy_types.tolist() == ["champion"] * 3
    assert ds.propensity.tolist() == [1.0] * 3
    assert ds.arm_probs[CHAMP].tolist() == [1.0] * 3
    assert ds.ts.tolist() == [T0 + 1, T0 + 2, T0 + 3]
    price = store.load_dataset("price")
    assert price.task == "regression"
    assert price.labels.tolist() == [3.5]
    assert store.routes() == ["fraud", "price"]


def test_exploration_arms_and_propensities(env, store) -> None:
    log, _ = env
    policy = {"type": "epsilon_greedy", "epsilon": 0.2}
    log.inferences(
        inference("a", T0, policy=policy, arms={CHAMP: 0.9, CHAL: 0.1}, propensity=0.9),
        inference("b", T0 + 1, policy=policy, arms={CHAMP: 0.9, CHAL: 0.1}, propensity=0.1,
                  served={"model": CHAL, "version": "1"}),
    )
    log.labels(label("a", 1, T0 + 5, reward=1.0), label("b", 0, T0 + 5, reward=0.0))
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert ds.served.tolist() == [CHAMP, CHAL]
    assert ds.propensity.tolist() == [0.9, 0.1]
    assert ds.arm_probs[CHAL].tolist() == [0.1, 0.1]
    assert ds.policy_types.tolist() == ["epsilon_greedy"] * 2


def test_batched_requests_give_one_row_per_prediction(env, store) -> None:
    log, _ = env
    record = inference("batch", T0)
    record["inputs"] = {"features": tensor([1, 2, 3, 4, 5, 6], [3, 2])}
    record["outputs"][CHAMP]["outputs"] = {"score": tensor([0.1, 0.2, 0.3], [3, 1])}
    log.inferences(record)
    log.labels(label("batch", 1, T0 + 1), label("batch", 0, T0 + 1, index=2),
               label("batch", 1, T0 + 1, index=7))  # no such row: an orphan
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert list(ds.request_ids) == ["batch", "batch#2"]
    np.testing.assert_allclose(ds.models[CHAMP].scores, [0.1, 0.3])
    assert ds.labels.tolist() == [1.0, 0.0]
    assert ds.stats.orphan_labels == 1
    frame = store.feature_columns("fraud")
    np.testing.assert_allclose(frame.columns["features[0]"], [1, 3, 5])
    np.testing.assert_allclose(frame.columns["features[1]"], [2, 4, 6])


def test_feature_columns_for_drift(env, store) -> None:
    log, _ = env
    for i in range(5):
        record = inference(f"r{i}", T0 + i, features=[float(i), 10.0 + i])
        record["inputs"]["country"] = tensor([["NL", "DE", "FR", "NL", "US"][i]], [1, 1], "BYTES")
        log.inferences(record)
    drain(env, store)
    frame = store.feature_columns("fraud", since=T0 + 1, until=T0 + 4,
                                  names={"features": ["amount", "velocity"]})
    assert len(frame) == 3
    assert frame.columns["amount"].tolist() == [1.0, 2.0, 3.0]
    assert frame.columns["velocity"].tolist() == [11.0, 12.0, 13.0]
    assert frame.columns["country"].tolist() == ["DE", "FR", "NL"]
    assert frame.request_ids.tolist() == ["r1", "r2", "r3"]
    scores = store.prediction_scores("fraud")  # all predictions, labelled or not
    assert scores[CHAMP].shape == (5,)
    series = store.score_series("fraud", since=T0 + 3)
    assert series[CHAL].role == "challenger"
    assert series[CHAMP].role == "champion"
    assert series[CHAMP].ts.tolist() == [T0 + 3, T0 + 4]


def test_bad_records_are_counted_never_fatal(env, store) -> None:
    log, _ = env
    log.inferences(
        b"{not json",
        b"[1, 2]",
        orjson.dumps({**inference("v2", T0), "schema_version": 2}),
        orjson.dumps({"schema_version": 1, "kind": "mystery"}),
        orjson.dumps({**inference("x", T0), "request_id": ""}),
        orjson.dumps({**inference("y", T0), "ts": "yesterday"}),
        orjson.dumps({"schema_version": 1, "kind": "audit", "what": "promote"}),
        inference("good", T0),
    )
    log.labels(orjson.dumps(label("good", "yes", T0)), label("good", None, T0),
               label("good", 1, T0))
    drain(env, store)
    counters = store.counters()
    assert counters["bad_records"] == 8
    assert counters["bad:malformed_json"] == 1
    assert counters["bad:not_an_object"] == 1
    assert counters["bad:unsupported_schema_version"] == 1
    assert counters["bad:unknown_kind"] == 1
    assert counters["bad:invalid_inference"] == 2
    assert counters["bad:invalid_label"] == 2
    assert counters["ignored_records"] == 1
    assert len(store.load_dataset("fraud")) == 1


def test_configured_score_output(tmp_path: Path, engine: str) -> None:
    config = parse_config({
        "source": {"path": str(tmp_path / "log")},
        "store": {"path": str(tmp_path / "s"), "engine": engine},
        "routes": {"fraud": {"score_output": "probability"}},
    }, env={})
    record = inference("a", T0)
    record["outputs"][CHAMP]["outputs"] = {"label": tensor([1], [1, 1], "INT64"),
                                           "probability": tensor([0.8], [1, 1])}
    LogDir(tmp_path / "log").inferences(record)
    LogDir(tmp_path / "log").labels(label("a", 1, T0))
    with Store.open(config.store) as store:
        FileIngestor(config, store).drain()
        ds = store.load_dataset("fraud")
    assert ds.models[CHAMP].scores.tolist() == [0.8]
    assert np.isnan(ds.models[CHAL].scores[0])  # has no "probability" output


def test_reader_sees_committed_data_after_writer_releases(env, store, engine) -> None:
    log, config = env
    log.inferences(inference("a", T0))
    log.labels(label("a", 1, T0))
    drain(env, store)
    store.release()
    with Store.open(config.store, read_only=True) as reader:
        assert len(reader.load_dataset("fraud")) == 1
    assert store.routes() == ["fraud"]  # the writer reopens on next use


# -- record schema v1 additions: experiments, registry version, computed reward ---------------


def experiment_inference(rid: str, ts: float, experiment: str | None, *, version: int = 3,
                         champion: str = CHAMP, challenger: str = CHAL,
                         sample_rate: float = 0.5) -> dict[str, Any]:
    """An inference with the v1 additions: registry_version on the record, experiment and
    sample_rate on the challenger's outcome (neither on the champion's)."""
    outputs = {champion: outcome(0.2, role="champion", mode="served", latency=1.0),
               challenger: {**outcome(0.3, latency=3.0), "experiment": experiment,
                            "sample_rate": sample_rate}}
    return inference(rid, ts, outputs=outputs, registry_version=version,
                     served={"model": champion, "version": "1"})


def test_experiment_fields_reward_and_label_time_are_stored(env, store) -> None:
    log, _ = env
    log.inferences(experiment_inference("a", T0, "fraud_v4:1700000000.0", version=4),
                   inference("old", T0 + 1))  # a record written before the additions
    log.labels({**label("a", 1, T0 + 500), "reward": 1.0}, label("old", 0, T0 + 600))
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert list(ds.request_ids) == ["a", "old"]
    chal = ds.models[CHAL]
    assert chal.experiment is not None and chal.sample_rate is not None
    assert chal.experiment.tolist() == ["fraud_v4:1700000000.0", None]
    assert chal.sample_rate[0] == 0.5 and math.isnan(chal.sample_rate[1])
    assert ds.models[CHAMP].experiment is None  # the champion has none
    assert ds.registry_version is not None and ds.registry_version.tolist() == [4, -1]
    assert ds.label_ts is not None and ds.label_ts.tolist() == [T0 + 500, T0 + 600]
    assert ds.rewards[0] == 1.0 and math.isnan(ds.rewards[1])  # the gateway's computed reward


def test_malformed_experiment_fields_read_as_unknown(env, store) -> None:
    log, _ = env
    rec = experiment_inference("a", T0, "x")
    rec["registry_version"] = True  # not an integer
    rec["outputs"][CHAL].update(experiment=7, sample_rate="half")
    log.inferences(rec)
    log.labels(label("a", 1, T0 + 5))
    drain(env, store)
    ds = store.load_dataset("fraud")
    assert store.counters().get("bad_records", 0) == 0
    assert ds.models[CHAL].experiment.tolist() == [None]
    assert math.isnan(ds.models[CHAL].sample_rate[0])
    assert ds.registry_version.tolist() == [-1]


def test_current_experiment_is_the_latest_with_the_current_champion(env, store) -> None:
    log, _ = env
    recs = [experiment_inference(f"a{i}", T0 + i, "e1", version=2) for i in range(5)]
    recs += [experiment_inference(f"b{i}", T0 + 100 + i, "e2", version=3) for i in range(5)]
    # fraud_v5 ran with the old champion first, then with fraud_v4 as champion
    recs += [experiment_inference(f"c{i}", T0 + 200 + i, "e3", version=5, challenger="fraud_v5")
             for i in range(3)]
    recs += [experiment_inference(f"d{i}", T0 + 300 + i, "e4", version=7, champion=CHAL,
                                  challenger="fraud_v5") for i in range(4)]
    log.inferences(*recs)
    log.labels(*(label(r["request_id"], i % 2, T0 + 1000) for i, r in enumerate(recs)))
    drain(env, store)
    current = store.current_experiments("fraud")
    # fraud_v4 is champion now: only fraud_v5's experiment with it counts
    assert list(current) == ["fraud_v5"]
    x = current["fraud_v5"]
    assert (x.id, x.started, x.data_end, x.champion, x.registry_version) == \
        ("e4", T0 + 300, T0 + 303, CHAL, 7)
    ds = store.load_experiments("fraud", window=1.0)  # a window never cuts an experiment
    assert ds.experiments == current
    assert len(ds) == 4 and ds.ts.min() == T0 + 300


def test_experiments_with_one_champion_and_window_fallback(env, store) -> None:
    log, _ = env
    recs = [experiment_inference(f"a{i}", T0 + i * 3600, "e1", version=2) for i in range(10)]
    recs += [experiment_inference(f"b{i}", T0 + 36000 + i, "e2", version=3) for i in range(5)]
    log.inferences(*recs, *(inference(f"o{i}", T0 - DAY + i) for i in range(3)))
    log.labels(*(label(r["request_id"], 1, T0 + DAY) for r in recs),
               *(label(f"o{i}", 0, T0 + DAY) for i in range(3)))
    drain(env, store)
    ds = store.load_experiments("fraud", window=60.0)
    assert ds.experiments[CHAL].id == "e2"  # the latest started
    assert ds.experiments[CHAL].started == T0 + 36000
    assert len(ds) == 5  # every row of the current experiment, none before it
    assert ds.models[CHAL].experiment.tolist() == ["e2"] * 5


def test_without_experiment_ids_the_window_selects_as_before(env, store) -> None:
    log, _ = env
    log.inferences(*(inference(f"r{i}", T0 + i * 3600) for i in range(48)))
    log.labels(*(label(f"r{i}", i % 2, T0 + 3 * DAY) for i in range(48)))
    drain(env, store)
    assert store.current_experiments("fraud") == {}
    ds = store.load_experiments("fraud", window=DAY)
    assert ds.experiments == {}
    assert len(ds) == 25  # rows in [newest - 1d, newest]
    assert len(store.load_experiments("fraud", window=None)) == 48


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path, engine: str) -> None:
    path = tmp_path / f"v1.{engine}"
    with Store(path, engine=engine) as s:  # turn a fresh store back into a version-1 one
        e = s._connect()
        e.execute("DROP TABLE inferences")
        e.execute("DROP TABLE outcomes")
        from evaluator.store import schema as st

        v1 = st.SCHEMA.replace(", registry_version BIGINT", "").replace(
            ",\n    experiment INTEGER, sample_rate DOUBLE", "")
        assert v1 != st.SCHEMA
        for stmt in v1.format(ID=e.id_type).split(";"):
            if stmt.strip():
                e.execute(stmt)
        e.execute("UPDATE meta SET val = '1' WHERE key = 'schema_version'")
        e.execute("INSERT INTO inferences VALUES (1, 'x', 0, 'fraud', ?, 0, 0, 1.0, NULL, 200, "
                  "1.0, 0)", [T0])
    from evaluator.store import StoreError

    with pytest.raises(StoreError, match="evaluator run --once"):
        Store(path, engine=engine, read_only=True)
    with Store(path, engine=engine) as s:  # writable: migrates
        rows = s._connect().query("SELECT registry_version FROM inferences")
        assert rows == [(None,)]
        assert s._connect().query("SELECT val FROM meta WHERE key = 'schema_version'") == \
            [("2",)]
    log = LogDir(tmp_path / "log")
    log.inferences(experiment_inference("a", T0 + 1, "e9"))
    log.labels(label("a", 1, T0 + 9), label("x", 0, T0 + 9))
    config = parse_config({"source": {"path": str(tmp_path / "log")},
                           "store": {"path": str(path), "engine": engine}}, env={})
    with Store.open(config.store) as s:
        FileIngestor(config, s).drain()
    with Store(path, engine=engine, read_only=True) as s:
        assert s.current_experiments("fraud")[CHAL].id == "e9"
        ds = s.load_dataset("fraud")
        assert ds.registry_version.tolist() == [-1, 3]  # the old row reads as unknown
