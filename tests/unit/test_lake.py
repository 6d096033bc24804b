"""The Parquet landing zone: writer, reader, replays, compaction, retention, CLI (no Kafka).

The oracle is the embedded store: the same records ingested both ways must give the same
`EvalDataset` (every array), join stats, experiments and bad-record counters.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from evaluator import cli
from evaluator.config import EvaluatorConfig, parse_config
from evaluator.ingest import FileIngestor
from evaluator.lake import layout
from evaluator.lake.columns import LakeBatch
from evaluator.lake.members import FileMember
from evaluator.lake.reader import LakeReader
from evaluator.lake.storage import Lake, LakeError
from evaluator.store import EmptyDatasetError, Store
from tests.support.lake import dataset_differences
from tests.unit.test_eval_store import CHAL, CHAMP, T0, LogDir, inference, label, tensor

DAY = 86400.0


def configs(tmp_path: Path, **lake: Any) -> tuple[EvaluatorConfig, EvaluatorConfig]:
    """(store config, lake config) over the same segment files."""
    base = {"source": {"path": str(tmp_path / "log"), "batch_records": 5},
            "store": {"path": str(tmp_path / "store.duckdb")},
            "report": {"out": str(tmp_path / "reports")}}
    lake_cfg = {**base, "lake": {"path": str(tmp_path / "lake"), "member": "m1",
                                 "file_records": 7, **lake}}
    return parse_config(base, env={}), parse_config(lake_cfg, env={})


def mixed_log(log: LogDir) -> None:
    """Two routes, experiments, a batched request, duplicates, early/late/duplicate labels,
    reward-only feedback, bad records, an audit entry."""
    log.labels(label("r0", 1, T0 - 5))  # before its inference: an orphan until it arrives
    log.inferences(*(inference(f"r{i}", T0 + i, champ=0.1 * (i % 9), chal=0.05 * (i % 17))
                     for i in range(30)))
    log.inferences(inference("r3", T0 + 3))  # at-least-once re-delivery
    log.inferences(*(inference(f"p{i}", T0 + i, route="price", challenger=i % 2 == 0)
                     for i in range(12)))
    batched = inference("b0", T0 + 40, features=[1.0, 2.0, 3.0, 4.0])
    batched["inputs"]["features"] = tensor([1.0, 2.0, 3.0, 4.0], [2, 2])
    for oc in batched["outputs"].values():
        oc["outputs"]["score"] = tensor([0.7, 0.2], [2, 1])
    for oc in batched["outputs"].values():
        if oc["role"] == "challenger":
            oc.update(experiment="x1", sample_rate=0.5)
    log.inferences(batched, b"{not json", {"schema_version": 1, "kind": "audit", "x": 1})
    log.labels(*(label(f"r{i}", i % 2, T0 + 100 + i) for i in range(1, 25)),
               label("r4", 0, T0 + 300),  # a correction: last wins
               label("r4", 1, T0 + 200),  # older than the correction: counted, not used
               label("b0", 1, T0 + 90), label("b0", 0, T0 + 90, index=1),
               *(label(f"p{i}", float(i), T0 + 50) for i in range(10)),
               label("ghost", 1, T0 + 80),  # never gets an inference
               {"schema_version": 1, "kind": "label", "request_id": "r29", "label": None,
                "reward": 0.5, "event_time": T0 + 70, "received_ts": T0 + 70},
               b'{"schema_version": 1, "kind": "label"}')


def ingest_both(tmp_path: Path, **lake: Any) -> tuple[EvaluatorConfig, EvaluatorConfig]:
    store_cfg, lake_cfg = configs(tmp_path, **lake)
    with Store.open(store_cfg.store) as store:
        FileIngestor(store_cfg, store).drain()
        store.expire_orphans()
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)
    return store_cfg, lake_cfg


def _lake(config: EvaluatorConfig) -> Lake:
    lake = Lake(config.lake.path)
    lake.ensure()
    return lake


def assert_same(store_cfg: EvaluatorConfig, lake_cfg: EvaluatorConfig,
                routes: tuple[str, ...] = ("fraud", "price")) -> None:
    with Store.open(store_cfg.store, read_only=True) as store, \
            LakeReader.open(lake_cfg) as reader:
        for route in routes:
            for require_label in (True, False):
                a = store.load_dataset(route, require_label=require_label)
                b = reader.load_dataset(route, require_label=require_label)
                assert dataset_differences(a, b) == []
            assert reader.current_experiments(route) == store.current_experiments(route)
            assert dataset_differences(store.load_experiments(route),
                                       reader.load_experiments(route)) == []
            assert reader.time_range(route) == store.time_range(route)
        assert reader.routes() == store.routes()
        assert reader.watermark() == store.watermark()
        assert reader.counters() == store.counters()


def test_lake_dataset_equals_the_store(tmp_path: Path) -> None:
    mixed_log(LogDir(tmp_path / "log"))
    store_cfg, lake_cfg = ingest_both(tmp_path)
    assert_same(store_cfg, lake_cfg)
    with LakeReader.open(lake_cfg) as reader:
        ds = reader.load_dataset("fraud")
        assert reader.counters()["bad:malformed_json"] == 1
        assert reader.counters()["ignored_records"] == 1
    assert ds.stats.duplicate_inferences == 1
    assert ds.stats.duplicate_labels == 2  # r4: three labels
    assert ds.stats.orphan_labels == 1  # ghost
    assert "b0#1" in set(ds.request_ids)
    assert ds.labels[list(ds.request_ids).index("r4")] == 0.0  # the correction won
    assert set(ds.models) == {CHAMP, CHAL}


def test_layout_on_disk(tmp_path: Path) -> None:
    mixed_log(LogDir(tmp_path / "log"))
    _, lake_cfg = ingest_both(tmp_path)
    root = Path(lake_cfg.lake.path)
    assert json.loads((root / layout.MARKER).read_text()) == {"format": layout.LAKE_FORMAT}
    day = layout.utc_date(T0)
    fraud = sorted((root / "inferences" / "route=fraud" / f"date={day}").glob("*.parquet"))
    assert fraud
    assert all(f.name.split("-")[1] == "m1" for f in fraud)
    assert pq.read_schema(fraud[0]).equals(layout.INFERENCE_SCHEMA)
    assert sorted(p.name for p in (root / "labels").iterdir()) == \
        sorted({f"date={layout.utc_date(t)}" for t in (T0 - 5, T0 + 300)})
    assert (root / "rejects").is_dir()
    assert not list(root.rglob("*.tmp"))
    assert layout.encode_route("a/b c") == "a%2Fb%20c"
    assert layout.decode_route(layout.encode_route("a/b c")) == "a/b c"


def test_replayed_files_count_once(tmp_path: Path) -> None:
    """A member that died after writing but before committing: its successor writes the same
    records again (same source positions); nothing is doubled."""
    mixed_log(LogDir(tmp_path / "log"))
    store_cfg, lake_cfg = ingest_both(tmp_path)
    offsets = Path(lake_cfg.lake.path) / "_offsets" / "m1.json"
    offsets.unlink()  # as if the positions never made it after the data files
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)
    assert len(list(Path(lake_cfg.lake.path).rglob("*.parquet"))) > 10
    assert_same(store_cfg, lake_cfg)


def test_member_resumes_where_it_left_off(tmp_path: Path) -> None:
    log = LogDir(tmp_path / "log")
    store_cfg, lake_cfg = configs(tmp_path)
    log.inferences(*(inference(f"r{i}", T0 + i) for i in range(10)))
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)
    files = set(Path(lake_cfg.lake.path).rglob("*.parquet"))
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)  # nothing new: no new files
    assert set(Path(lake_cfg.lake.path).rglob("*.parquet")) == files
    log.inferences(inference("r10", T0 + 10), inference("r2", T0 + 2))
    log.labels(*(label(f"r{i}", 1, T0 + 50) for i in range(11)))
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)
    with Store.open(store_cfg.store) as store:
        FileIngestor(store_cfg, store).drain()
    assert_same(store_cfg, lake_cfg, routes=("fraud",))


def test_unfinished_files_are_invisible_then_swept(tmp_path: Path) -> None:
    mixed_log(LogDir(tmp_path / "log"))
    store_cfg, lake_cfg = ingest_both(tmp_path)
    part = next((Path(lake_cfg.lake.path) / "inferences" / "route=fraud").iterdir())
    good = next(part.glob("*.parquet"))
    tmp = part / f".{layout.file_name('dead')}.tmp"
    tmp.write_bytes(good.read_bytes()[:100])  # a writer killed mid-file
    assert_same(store_cfg, lake_cfg)
    lake = Lake(lake_cfg.lake.path)
    assert lake.compact(min_files=1000).tmp_removed == 0  # young: maybe still being written
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    assert lake.compact(min_files=1000).tmp_removed == 1
    assert not tmp.exists()


def test_compaction_merges_and_keeps_the_dataset(tmp_path: Path) -> None:
    mixed_log(LogDir(tmp_path / "log"))
    store_cfg, lake_cfg = ingest_both(tmp_path)
    (Path(lake_cfg.lake.path) / "_offsets" / "m1.json").unlink()
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)  # every row now twice (a replay)
    lake = Lake(lake_cfg.lake.path)
    before = len(lake.files("inferences"))
    done = lake.compact(min_files=2)
    assert done.files_in >= before
    assert done.rows_dropped > 0
    for part in lake.partitions("inferences"):
        assert len([p for p in lake.fs.ls(part) if p.endswith(".parquet")]) == 1
    assert_same(store_cfg, lake_cfg)


def test_retention_drops_old_partitions(tmp_path: Path) -> None:
    log = LogDir(tmp_path / "log")
    log.inferences(inference("old", T0 - 40 * DAY), inference("new", T0))
    log.labels(label("old", 1, T0 - 39 * DAY), label("new", 1, T0 + 10))
    _, lake_cfg = configs(tmp_path)
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)
    lake = Lake(lake_cfg.lake.path)
    done = lake.expire(layout.utc_date(T0 - 30 * DAY))
    assert done.partitions == 2  # the old inference partition and the old label partition
    with LakeReader.open(lake_cfg) as reader:
        assert list(reader.load_dataset("fraud").request_ids) == ["new"]


def test_empty_lake_and_format_check(tmp_path: Path) -> None:
    _, lake_cfg = configs(tmp_path)
    _lake(lake_cfg)
    with LakeReader.open(lake_cfg) as reader:
        assert reader.routes() == []
        with pytest.raises(EmptyDatasetError, match="no inferences"):
            reader.load_dataset("fraud")
    (Path(lake_cfg.lake.path) / layout.MARKER).write_text('{"format": 99}')
    with pytest.raises(LakeError, match="format 99"):
        _lake(lake_cfg)


def test_members_starting_together_all_open_an_empty_lake(tmp_path: Path) -> None:
    """Every member creates the format marker on an empty lake; with one shared temporary
    name a member's rename took the file from under another's (FileNotFoundError at start)."""
    import threading

    for attempt in range(30):
        root = tmp_path / f"lake{attempt}"
        start = threading.Barrier(6)
        errors: list[BaseException] = []

        def member(root: Path = root, start: threading.Barrier = start,
                   errors: list[BaseException] = errors) -> None:
            start.wait()
            try:
                Lake(str(root)).ensure()
            except BaseException as exc:  # what the member would have died of
                errors.append(exc)

        threads = [threading.Thread(target=member) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert Lake(str(root)).exists()
        assert [p.name for p in root.iterdir()] == [layout.MARKER]  # no temporary left over


def test_lake_batch_keeps_every_copy_with_its_position() -> None:
    from evaluator.ingest import RecordParser

    parser, batch = RecordParser(), LakeBatch()
    rec = orjson.dumps(inference("r1", T0))
    for pos, raw in enumerate([rec, rec, orjson.dumps(label("r1", 1, T0 + 9)), b"[]"]):
        batch.at("kafka:t:0", pos)
        parser.parse(batch, raw)
    tables = dict(batch.tables("2026-01-01"))
    inf = tables[layout.partition_dir("inferences", layout.utc_date(T0), "fraud")]
    assert inf.column("pos").to_pylist() == [0, 1]
    assert [len(x) for x in inf.column("outcomes").to_pylist()] == [2, 2]
    assert tables["labels/date=" + layout.utc_date(T0 + 9)].column("pos").to_pylist() == [2]
    assert tables["rejects/date=2026-01-01"].to_pylist() == [
        {"reason": "bad:not_an_object", "src": "kafka:t:0", "pos": 3}]


def test_cli_run_and_report_through_the_lake(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    mixed_log(LogDir(tmp_path / "log"))
    cfg_path = tmp_path / "evaluator.yaml"
    cfg_path.write_text(json.dumps({
        "source": {"path": str(tmp_path / "log")},
        "lake": {"path": str(tmp_path / "lake")},
        "report": {"out": str(tmp_path / "reports-lake")},
        "decision": {"min_samples": 5}}))
    store_path = tmp_path / "store.yaml"
    store_path.write_text(json.dumps({
        "source": {"path": str(tmp_path / "log")}, "store": {"path": str(tmp_path / "s.db")},
        "report": {"out": str(tmp_path / "reports-store")}, "decision": {"min_samples": 5}}))
    for path in (cfg_path, store_path):
        assert cli.main(["run", "--config", str(path), "--once"]) == cli.ExitCode.OK
        assert cli.main(["report", "--config", str(path), "--route", "fraud"]) == cli.ExitCode.OK
    assert "landing zone" in capsys.readouterr().out
    lake_report = json.loads((tmp_path / "reports-lake" / "report.json").read_text())
    store_report = json.loads((tmp_path / "reports-store" / "report.json").read_text())
    for key in ("decisions", "join_stats", "n", "champion"):
        strip = (lambda d: {k: v for k, v in d.items() if k != "generated_at"}) \
            if key == "decisions" else (lambda d: d)
        got = [strip(d) for d in lake_report[key]] if key == "decisions" else lake_report[key]
        want = [strip(d) for d in store_report[key]] if key == "decisions" else store_report[key]
        assert got == want, key
    assert cli.main(["lake", "compact", "--config", str(cfg_path)]) == cli.ExitCode.OK
    assert cli.main(["lake", "expire", "--config", str(cfg_path), "--older-than", "1d"]) == \
        cli.ExitCode.OK
    assert "deleted" in capsys.readouterr().out


def test_drift_inputs_equal_the_store(tmp_path: Path) -> None:
    mixed_log(LogDir(tmp_path / "log"))
    store_cfg, lake_cfg = ingest_both(tmp_path)
    with Store.open(store_cfg.store, read_only=True) as store, \
            LakeReader.open(lake_cfg) as reader:
        for route, window in (("fraud", (None, None)), ("fraud", (T0 + 5, T0 + 20)),
                              ("price", (None, None)), ("nope", (None, None))):
            want = store.feature_columns(route, *window, names={"features": ["a", "b", "c"]})
            got = reader.feature_columns(route, *window, names={"features": ["a", "b", "c"]})
            assert list(got.request_ids) == list(want.request_ids)
            assert np.array_equal(got.ts, want.ts)
            assert sorted(got.columns) == sorted(want.columns)
            for name, col in want.columns.items():
                assert np.array_equal(got.columns[name], col, equal_nan=col.dtype.kind == "f")
            a, b = store.score_series(route, *window), reader.score_series(route, *window)
            assert sorted(a) == sorted(b)
            for model, series in a.items():
                assert b[model].role == series.role
                assert np.array_equal(b[model].scores, series.scores, equal_nan=True)
                assert np.array_equal(b[model].ts, series.ts)


def test_drift_command_through_the_lake(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluator drift` with lake.path set reads the landing zone: the same drift.json as
    over the store."""
    import yaml

    from tests.unit.test_drift import _write_log

    _write_log(tmp_path / "log", np.random.default_rng(9))
    results = {}
    for kind in ("store", "lake"):
        config_path = tmp_path / f"{kind}.yaml"
        config_path.write_text(yaml.safe_dump({
            "source": {"path": str(tmp_path / "log")},
            "store": {"path": str(tmp_path / "store.duckdb")},
            **({"lake": {"path": str(tmp_path / "lake")}} if kind == "lake" else {}),
            "features": {"names": {"x": ["a", "b", "c"]}},
            "drift": {"state_path": str(tmp_path / f"state-{kind}.json"),
                      "out": str(tmp_path / kind)},
        }))
        assert cli.main(["run", "--config", str(config_path), "--once"]) == cli.ExitCode.OK
        assert cli.main(["drift", "--config", str(config_path), "--route", "fraud",
                         "--reference-window", "1d", "--window", "1d", "--no-webhook"]) == 0
        data = json.loads((tmp_path / kind / "drift.json").read_text())
        results[kind] = {k: v for k, v in data.items()
                         if k not in ("generated_at", "generated_at_iso", "source")}
    capsys.readouterr()
    assert results["lake"]["drifted_features"] == ["b"]
    assert results["lake"] == results["store"]


def test_lake_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """loadtests/lake_bench.py end to end at a tiny size: both parts run and agree on counts."""
    from loadtests import lake_bench

    assert lake_bench.main(["--ingest", "2000", "--report", "20000"]) == 0
    out = capsys.readouterr().out
    assert "records/s per core" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["rows"] == 20_000
    assert report["stats"]["joined"] == 20_000
    assert report["stats"]["duplicate_inferences"] > 0
