"""Spark over the landing zone gives the DuckDB reader's dataset, and so the same report.

Real Spark (pyspark in local mode on the machine's Java), one SparkSession for the whole run.
The same Parquet files — written by the real ingest member from segment files with
re-delivered inference records, labels before and long after their inference, duplicate and
corrected labels, reward-only feedback, a batched request, two routes, two experiments, and
whole files replayed by a member that lost its offsets — are read by both engines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evaluator import cli
from evaluator.cli.report import open_reader
from evaluator.config import ConfigError, parse_config
from evaluator.lake.members import FileMember
from evaluator.lake.reader import LakeReader
from evaluator.lake.spark_engine import SparkLakeReader, _result_size_conf, spark_session
from evaluator.store import EmptyDatasetError, Store
from tests.support.lake import dataset_differences, experiment_log
from tests.unit.test_eval_store import T0, LogDir, inference, label
from tests.unit.test_lake import _lake, ingest_both, mixed_log

pytestmark = pytest.mark.spark


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """The run's one local SparkSession (a JVM start costs seconds; readers reuse it)."""
    session = spark_session("local[2]", {"spark.sql.shuffle.partitions": "2",
                                         "spark.driver.memory": "1g"})
    yield session
    session.stop()


def test_collected_results_are_capped_by_the_driver_heap(spark: Any) -> None:
    """The report collects its joined rows by design: Spark's 1g default cap failed a
    10M-request report (1.6 GB of rows); the cap follows spark.driver.memory instead."""
    assert spark.sparkContext.getConf().get("spark.driver.maxResultSize") == "1g"
    assert _result_size_conf({"spark.driver.memory": "6g"}) == {
        "spark.driver.maxResultSize": "6g"}
    assert _result_size_conf({}) == {}


def test_spark_reads_the_lake_as_duckdb_and_the_store_do(tmp_path: Path, spark: Any) -> None:
    mixed_log(LogDir(tmp_path / "log"))
    store_cfg, lake_cfg = ingest_both(tmp_path)
    # A member that died after its files were durable but before its positions: its successor
    # writes the same records again, with the same source positions (read rule 1).
    (Path(lake_cfg.lake.path) / "_offsets" / "m1.json").unlink()
    before = len(list(Path(lake_cfg.lake.path).rglob("*.parquet")))
    FileMember(lake_cfg, _lake(lake_cfg)).run(once=True)
    assert len(list(Path(lake_cfg.lake.path).rglob("*.parquet"))) > before
    with Store.open(store_cfg.store, read_only=True) as store, \
            LakeReader.open(lake_cfg) as duck, \
            SparkLakeReader(lake_cfg.lake.path, spark=spark) as sparky:
        for route, require_label in (("fraud", True), ("fraud", False), ("price", True)):
            assert sparky.time_range(route) == duck.time_range(route) == store.time_range(route)
            assert sparky.current_experiments(route) == duck.current_experiments(route) == \
                store.current_experiments(route)
            got = sparky.load_dataset(route, require_label=require_label)  # False: rewards too
            for want in (duck.load_dataset(route, require_label=require_label),
                         store.load_dataset(route, require_label=require_label)):
                assert dataset_differences(want, got) == []
        assert dataset_differences(duck.load_experiments("fraud"),
                                   sparky.load_experiments("fraud")) == []
        ds = sparky.load_dataset("fraud")
        assert ds.stats.duplicate_inferences == 1  # the gateway's re-delivery, not the replay
        assert ds.stats.duplicate_labels == 2  # r4: three labels, the correction won
        assert ds.labels[list(ds.request_ids).index("r4")] == 0.0
        assert ds.stats.orphan_labels == 1  # ghost
        assert "b0#1" in set(ds.request_ids)
        with pytest.raises(EmptyDatasetError, match="no inferences"):
            sparky.load_dataset("fraud", since=T0 + 10_000)
    # the rows Spark handed over through the lake's staging directory are gone once read
    staged = Path(lake_cfg.lake.path) / "_spark"
    assert staged.is_dir() and list(staged.iterdir()) == []


def test_spark_orphans_expire_by_the_lake_watermark(tmp_path: Path, spark: Any) -> None:
    """Rule 4: an orphan older than the join window before the newest record is expired, a
    younger one waits; the DuckDB reader splits them the same way."""
    log = LogDir(tmp_path / "log")
    log.inferences(*(inference(f"r{i}", T0 + i) for i in range(3)))
    log.labels(label("r1", 1, T0 + 5), label("old", 1, T0 - 20 * 86400),
               label("young", 1, T0 - 86400), label("young", 0, T0 - 3600))
    _, lake_cfg = ingest_both(tmp_path)
    with LakeReader.open(lake_cfg) as duck, \
            SparkLakeReader(lake_cfg.lake.path, spark=spark) as sparky:
        got = sparky.join_stats("fraud")
        assert got == duck.join_stats("fraud")
        assert (got.orphan_labels, got.expired_orphans, got.joined) == (2, 1, 1)


def _report(path: Path) -> dict[str, Any]:
    """report.json without what differs between any two runs (its time, its timings)."""
    report = json.loads(path.read_text())
    report.pop("generated_at", None)
    report.pop("generated_at_iso", None)
    report.pop("timings_s", None)
    for d in report.get("decisions", []):
        d.pop("generated_at", None)
    return report


def test_cli_report_verdicts_and_statistics_are_the_engines_same(
        tmp_path: Path, spark: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`report --engine spark` and `--engine duckdb` on one lake write the same report.json:
    verdicts, every statistic, the join and the experiments they are bound to."""
    log = LogDir(tmp_path / "log")
    for stream, _, value in experiment_log(3000, seed=7):
        log.write(stream, value)
    config = {"source": {"path": str(tmp_path / "log")},
              "lake": {"path": str(tmp_path / "lake"), "member": "m1", "file_records": 900},
              "spark": {"master": "local[2]"},
              "decision": {"min_samples": 200}}
    cfg_path = tmp_path / "evaluator.yaml"
    cfg_path.write_text(json.dumps(config))
    assert cli.main(["run", "--config", str(cfg_path), "--once"]) == cli.ExitCode.OK
    reports = {}
    for engine in ("duckdb", "spark"):
        out = tmp_path / f"reports-{engine}"
        assert cli.main(["report", "--config", str(cfg_path), "--route", "fraud",
                         "--engine", engine, "--out", str(out)]) == cli.ExitCode.OK
        reports[engine] = _report(out / "report.json")
    assert reports["spark"] == reports["duckdb"]
    decisions = reports["spark"]["decisions"]
    assert [d["challenger"] for d in decisions] == ["fraud_v2"]
    assert decisions[0]["experiment"]["id"] == "fraud_v2:e2"  # the current experiment only
    assert reports["spark"]["join_stats"]["duplicate_inferences"] > 0
    assert reports["spark"]["join_stats"]["duplicate_labels"] > 0
    capsys.readouterr()


def test_engine_choice_needs_a_lake_and_parses(tmp_path: Path) -> None:
    cfg = parse_config({"lake": {"path": str(tmp_path / "lake"), "engine": "spark"},
                        "spark": {"master": "local[1]", "conf": {"spark.sql.ansi.enabled": True}}},
                       env={"UNDERSTUDY_SPARK_MASTER": "spark://head:7077"})
    assert (cfg.lake.engine, cfg.spark.master) == ("spark", "spark://head:7077")
    assert cfg.spark.conf == {"spark.sql.ansi.enabled": True}
    with pytest.raises(ConfigError, match=r"lake\.engine"):
        parse_config({"lake": {"engine": "presto"}}, env={})
    with pytest.raises(ConfigError, match=r"spark\.conf"):
        parse_config({"spark": {"conf": {"spark.x": [1]}}}, env={})
    with pytest.raises(ConfigError, match=r"lake\.path is not set"):
        open_reader(parse_config({}, env={}), "spark")
