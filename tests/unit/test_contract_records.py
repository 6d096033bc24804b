"""The record contract end to end: the gateway's recorder builds a typed record, it is serialised
once, and the evaluator reads it back with the same types (understudy/reader.py) to the very
record that was written; the evaluator's store then holds what the record says.

Also: the contract package imports neither program, and its vocabulary and codes agree with
every place that speaks them.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from evaluator.config import KafkaSourceConfig, parse_config
from evaluator.ingest import FileIngestor, RecordParser
from evaluator.store import Batch, Store
from gateway.config import KafkaConfig, parse_route
from gateway.dataplane.protocol import DATATYPE_SIZES, parse_request
from gateway.dataplane.recorder import Recorder, RequestContext
from gateway.dataplane.routes import RouteRuntime, RouteTable
from gateway.explore.policies import Decision
from gateway.mirror.shadow import ShadowResult
from gateway.upstream.client import TritonUpstream, UpstreamResponse
from understudy.reader import Inference, Label, RecordError, read_record
from understudy.record_schema import record_problems
from understudy.records import DATATYPES, INFERENCES, LABELS
from understudy.segments import segment_name
from understudy.vocabulary import (
    MODE_CODES,
    MODES,
    OUTCOME_STATUSES,
    ROLE_CODES,
    ROLES,
    STATUS_CODES,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


class ListSink:
    def __init__(self) -> None:
        self.lines: list[tuple[str, bytes]] = []

    def emit(self, stream: str, key: str, value: bytes) -> None:
        self.lines.append((stream, value))


def test_the_contract_imports_neither_program() -> None:
    code = ("import sys, understudy.records, understudy.record_schema, understudy.reader, "
            "understudy.labels, understudy.settings, understudy.segments, understudy.vocabulary\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gateway', 'evaluator'))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_vocabulary_and_codes_agree() -> None:
    assert tuple(STATUS_CODES) == OUTCOME_STATUSES
    assert tuple(ROLE_CODES) == ROLES
    assert tuple(MODE_CODES) == MODES
    assert len(set(STATUS_CODES.values())) == len(STATUS_CODES)
    assert {*DATATYPE_SIZES, "BYTES"} == DATATYPES  # the gateway's wire types are the contract's
    # the evaluator consumes the topics the gateway produces to, unless configured otherwise
    gateway_kafka, evaluator_kafka = KafkaConfig(), KafkaSourceConfig()
    assert (gateway_kafka.topic, gateway_kafka.labels_topic) == \
        (evaluator_kafka.inferences_topic, evaluator_kafka.labels_topic)


def _runtime(upstream: TritonUpstream) -> RouteRuntime:
    route = parse_route("fraud", {
        "champion": "champ:1",
        "challengers": [{"model": "shadowy"}, {"model": "explorer", "mode": "explore"}],
        "policy": {"type": "epsilon_greedy", "epsilon": 0.2},
    })
    runtime = RouteTable(upstream).apply(route)
    runtime.registry_version = 7
    runtime.experiments = {"shadowy": ("shadowy:1700000000.0", 0.5),
                           "explorer": ("explorer:1700000001.0", 1.0)}
    return runtime


def _answer(score: float) -> UpstreamResponse:
    body = orjson.dumps({"model_name": "m", "model_version": "3", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [2, 1], "data": [score, 1 - score]}]})
    return UpstreamResponse(200, body, "application/json", None, 0.0021)


async def _built() -> tuple[dict[str, Any], bytes]:
    upstream = TritonUpstream("http://127.0.0.1:9", timeout_ms=1000, max_connections=4)
    try:
        runtime = _runtime(upstream)
        request = parse_request(orjson.dumps({"id": "req-1", "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [2, 3],
             "data": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]},
            {"name": "country", "datatype": "BYTES", "shape": [2, 1], "data": ["DE", "FR"]}]}),
            None)
        ctx = RequestContext(
            runtime, "req-1", T0, "user-9", request,
            Decision("explorer", 0.1, {"champ": 0.8, "explorer": 0.2}), "explorer",
            ShadowResult("ok", 0.004, _answer(0.75)), 200, 0.0061, fallback=False,
            protocol="grpc")
        sink = ListSink()
        recorder = Recorder(sink)  # type: ignore[arg-type]
        copies = {
            "champ": ShadowResult("ok", 0.002, _answer(0.25)),
            "shadowy": ShadowResult(  # a micro-batched copy: its rows split from a batch
                "ok", 0.009, outputs={"score": {"datatype": "FP32", "shape": [2, 1],
                                                "data": [0.5, 0.6]}},
                batch_rows=8, model_version="2"),
        }
        record = recorder.build(ctx, copies)
        return dict(record), orjson.dumps(record)
    finally:
        await upstream.close()


async def test_gateway_record_reads_back_as_written() -> None:
    built, line = await _built()
    assert record_problems(orjson.loads(line)) == []  # the written form is schema v1
    read = read_record(line, time.time)
    assert isinstance(read, Inference)
    # reading loses nothing: the evaluator's typed view gives back the very record
    assert read.to_record() == orjson.loads(line)
    assert built["outputs"]["shadowy"]["batch_rows"] == 8  # the builder's typed dict, as sent
    assert read.outcomes["shadowy"].single_call_latency_ms is None
    assert read.outcomes["explorer"].mode == "served" and read.served_model == "explorer"
    assert read.outcomes["champ"].experiment is None  # the champion has none
    assert read.outcomes["shadowy"].experiment == "shadowy:1700000000.0"
    assert read.policy_type == "epsilon_greedy" and read.protocol == "grpc"
    assert read.registry_version == 7 and read.arms == {"champ": 0.8, "explorer": 0.2}
    assert read.inputs["country"]["data"] == ["DE", "FR"]


async def test_gateway_record_lands_in_the_store_as_written(tmp_path: Path) -> None:
    _, line = await _built()
    label = orjson.dumps({"schema_version": 1, "kind": "label", "request_id": "req-1",
                          "label": 1, "reward": None, "event_time": T0 + 5,
                          "received_ts": T0 + 6, "index": 1})
    for stream, payload in ((INFERENCES, line), (LABELS, label)):
        (tmp_path / "log" / stream).mkdir(parents=True)
        (tmp_path / "log" / stream / segment_name(0)).write_bytes(payload + b"\n")
    config = parse_config({"source": {"path": str(tmp_path / "log")},
                           "store": {"path": str(tmp_path / "store.duckdb")}}, env={})
    with Store.open(config.store) as store:
        FileIngestor(config, store).drain()
        ds = store.load_dataset("fraud")
    assert store.counters().get("bad_records", 0) == 0
    assert ds.request_ids.tolist() == ["req-1#1"] and ds.labels.tolist() == [1.0]  # row 1
    assert ds.models["explorer"].scores.tolist() == [0.25]  # row 1 of the served answer
    assert ds.models["shadowy"].scores.tolist() == [0.6]
    assert math.isnan(ds.models["shadowy"].latency_ms[0])  # a shared call: not comparable
    assert ds.models["champ"].latency_ms.tolist() == [2.0]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", "malformed_json"),
    # deeper than orjson's limit and Python's stack: the stdlib fallback must not crash ingest
    (b'{"schema_version": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed_json"),
    (b"[1]", "not_an_object"),
    (b'{"schema_version": 2, "kind": "inference"}', "unsupported_schema_version"),
    (b'{"schema_version": 1, "kind": "mystery"}', "unknown_kind"),
    (b'{"schema_version": 1, "kind": "inference", "request_id": "a", "ts": 1, "route": "r",'
     b' "outputs": {"m": 3}}', "invalid_inference"),
    (b'{"schema_version": 1, "kind": "label", "request_id": "a", "label": "yes"}',
     "invalid_label"),
])
def test_unusable_records_name_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        read_record(raw, time.time)
    assert info.value.reason == reason
    batch = Batch()
    RecordParser().parse(batch, raw)
    assert dict(batch.bad) == {reason: 1}


def test_labels_read_with_the_times_they_carry_or_the_clock() -> None:
    line = orjson.dumps({"schema_version": 1, "kind": "label", "request_id": "a",
                         "label": True, "reward": None})
    read = read_record(line, lambda: 42.0)
    assert read == Label("a", 1.0, None, 42.0, 42.0, 0)
    line = orjson.dumps({"schema_version": 1, "kind": "label", "request_id": "a",
                         "label": None, "reward": 0.5, "event_time": 10.0, "index": 2})
    read = read_record(line, lambda: 42.0)
    assert read == Label("a", None, 0.5, 10.0, 10.0, 2)
    assert read.to_record()["index"] == 2
