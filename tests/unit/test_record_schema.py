"""Record schema v1 (understudy/record_schema.py): what it accepts, what it flags, and the
published copy in docs/ staying identical to the code."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from understudy.record_schema import SCHEMAS, record_problems

ROOT = Path(__file__).resolve().parents[2]


def inference() -> dict[str, Any]:
    tensor = {"datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}
    score = {"datatype": "FP32", "shape": [1, 1], "data": [0.25]}
    return {
        "schema_version": 1, "kind": "inference", "request_id": "r-1", "ts": 1.0e9,
        "route": "fraud", "policy": {"type": "champion"},
        "served": {"model": "fraud_v3", "version": "1"}, "propensity": 1.0,
        "arms": {"fraud_v3": 1.0}, "key": None, "inputs": {"features": tensor},
        "outputs": {
            "fraud_v3": {"role": "champion", "mode": "served", "version": "1", "status": "ok",
                         "latency_ms": 1.5, "outputs": {"score": score}, "error": None},
            "fraud_v4": {"role": "challenger", "mode": "shadow", "version": "1",
                         "status": "ok", "latency_ms": 2.0, "outputs": {"score": score},
                         "error": None, "batch_rows": 4, "experiment": "e1",
                         "sample_rate": 0.5},
        },
        "status": 200, "gateway_latency_ms": 2.5, "task": "classification",
        "registry_version": 3,
    }


def label() -> dict[str, Any]:
    return {"schema_version": 1, "kind": "label", "request_id": "r-1", "label": 1.0,
            "reward": None, "event_time": 1.0e9, "received_ts": 1.0e9}


def test_valid_records_pass_including_the_optional_v1_additions() -> None:
    assert record_problems(inference()) == []
    assert record_problems(label()) == []
    record = inference()
    record["inputs"]["features"]["data"][0] = None  # a NaN from a binary tensor
    record["inputs"]["ids"] = {"datatype": "BYTES", "shape": [2], "data": ["a", ""]}
    record["inputs"]["flags"] = {"datatype": "BOOL", "shape": [1], "data": [True]}
    record["inputs"]["n"] = {"datatype": "UINT64", "shape": [1], "data": [2**64 - 1]}
    record["outputs"]["fraud_v4"].update(status="shed", outputs=None, latency_ms=None,
                                         error="queue full")
    assert record_problems(record) == []


def _set(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    record = copy.deepcopy(record)
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return record


CORRUPT = [
    ("inputs.features.data.0", "0.5", "FP32 data holding a string"),
    ("inputs.features.data.1", True, "FP32 data holding a boolean"),
    ("inputs.features.data.2", [0.5], "nested data in the log"),
    ("inputs.features.shape", [2, 8], "shape/data mismatch"),
    ("inputs.features.datatype", "FLOAT", "unknown datatype"),
    ("request_id", "a\x01b", "control character in the id"),
    ("request_id", "x" * 257, "over-long id"),
    ("outputs.fraud_v3.experiment", "e1", "champion carrying an experiment"),
    ("outputs.fraud_v3.status", "broken", "unknown outcome status"),
    ("propensity", 0.0, "zero propensity"),
    ("surprise", 1, "unknown top-level field"),
    ("schema_version", 2, "another schema version"),
]


@pytest.mark.parametrize(("path", "value", "what"), CORRUPT, ids=[c[2] for c in CORRUPT])
def test_corrupt_inference_records_are_flagged(path: str, value: Any, what: str) -> None:
    assert record_problems(_set(inference(), path, value)), what


def test_corrupt_label_records_are_flagged() -> None:
    assert record_problems({**label(), "label": None})  # neither label nor reward
    assert record_problems({**label(), "label": "yes"})
    assert record_problems({**label(), "index": 0})
    assert record_problems({"kind": "audit"}) == ["unknown record kind 'audit'"]


def test_published_schema_matches_the_code() -> None:
    out = subprocess.run([sys.executable, "-m", "understudy.record_schema"], check=True,
                         capture_output=True, cwd=ROOT).stdout
    assert orjson.loads(out) == SCHEMAS
    assert orjson.loads((ROOT / "docs" / "record-schema-v1.json").read_bytes()) == SCHEMAS
