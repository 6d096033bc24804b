"""Replay with a Kafka source: the records go to the evaluator's own topics and come back through
its Kafka ingest into the replay report (real Kafka, real Triton)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from evaluator import cli
from understudy_demo.traffic import FraudTraffic

pytestmark = [pytest.mark.kafka, pytest.mark.triton]
N = 40


def _logged(log: Path) -> None:
    """N labelled fraud requests as the gateway logs them (champion fraud_v3)."""
    x, y = FraudTraffic(3).sample(N)
    (log / "inferences").mkdir(parents=True)
    (log / "labels").mkdir(parents=True)
    infs, labels = [], []
    for i in range(N):
        rid = f"k{i}"
        infs.append({
            "schema_version": 1, "kind": "inference", "request_id": rid, "ts": 1_767_000_000.0 + i,
            "route": "fraud", "policy": {"type": "champion"},
            "served": {"model": "fraud_v3", "version": "1"}, "propensity": 1.0,
            "arms": {"fraud_v3": 1.0}, "key": None,
            "inputs": {"features": {"datatype": "FP32", "shape": [1, 8],
                                    "data": x[i].tolist()}},
            "outputs": {"fraud_v3": {"role": "champion", "mode": "served", "version": "1",
                                     "status": "ok", "latency_ms": 1.0, "error": None,
                                     "outputs": {"score": {"datatype": "FP32", "shape": [1, 1],
                                                           "data": [0.5]}}}},
            "status": 200, "gateway_latency_ms": 2.0})
        labels.append({"schema_version": 1, "kind": "label", "request_id": rid,
                       "label": int(y[i]), "reward": None, "event_time": 1_767_000_100.0,
                       "received_ts": 1_767_000_100.0})
    for stream, records in (("inferences", infs), ("labels", labels)):
        (log / stream / f"{0:020d}.jsonl").write_bytes(
            b"".join(orjson.dumps(r) + b"\n" for r in records))


@pytest.mark.timeout(300)
def test_replay_through_kafka_topics(kafka: Any, triton: Any, tmp_path: Path,
                                     capsys: Any) -> None:
    from tests.support.kafka import unique_topic

    log = tmp_path / "log"
    _logged(log)
    store = {"path": str(tmp_path / "store.duckdb")}
    files = tmp_path / "files.yaml"
    files.write_text(yaml.safe_dump({"source": {"type": "file", "path": str(log)},
                                     "store": store}))
    assert cli.main(["run", "--config", str(files), "--once"]) == 0
    topics = {"bootstrap": kafka.bootstrap, "inferences_topic": unique_topic("replay-inf"),
              "labels_topic": unique_topic("replay-labels"),
              "group_id": unique_topic("replay-group")}
    config = tmp_path / "kafka.yaml"
    config.write_text(yaml.safe_dump({"source": {"type": "kafka", "kafka": topics,
                                                 "poll_interval_s": 0.2}, "store": store}))
    out = tmp_path / "report"
    args = ["replay", "--config", str(config), "--route", "fraud", "--challenger", "fraud_v4",
            "--rate", "500", "--triton", triton.url, "--out", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == N  # every replay record and its label came back through Kafka
    assert report["replay"] == ["fraud_v4"]
    assert not (log / "replay-fraud-fraud_v4").exists()  # nothing went to files
    capsys.readouterr()
    assert cli.main([*args, "--no-report"]) == 0  # the store is the checkpoint
    assert "sent 0 (" in capsys.readouterr().out
