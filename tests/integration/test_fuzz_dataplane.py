"""Property-based fuzzing of the data plane and feedback API against the real gateway and Triton.

Hypothesis generates random and adversarial JSON bodies (mutations of a valid request: every
field replaced by arbitrary JSON, hostile nesting, wrong element types, huge or control-char
ids), binary-extension bodies (wrong sizes, bad Inference-Header-Content-Length, random
payloads, BYTES tensors), X-Request-Id headers, and feedback bodies. Each is sent over a raw
HTTP/1.1 connection, so a dropped connection or an unparsable response fails the example.

Properties: no 5xx; every answer is a complete HTTP response; every error body is
`{"error": str}`; the gateway still serves afterwards; no request is re-sent to the fallback;
and every record it wrote (inferences and labels) validates against schema v1.

Harness (gateway thread, raw HTTP, counts printed to the terminal): tests/support/fuzz.py.
Examples are derandomized and there is no example database, so CI runs the same inputs for the
same code (hypothesis also mixes in literals from the loaded local modules, so the exact inputs
depend on which test modules ran alongside).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import (
    FUZZ,
    JSON_SCALARS,
    JSON_VALUES,
    FuzzGateway,
    check_answer,
    five_xx_metrics,
    fuzz_gateway,
    written_records,
)

pytestmark = pytest.mark.triton

ROUTES = {
    # Shadow copies and a fallback: a bad body must reach neither.
    "fuzz": {"champion": {"model": "fraud_v3"},
             "challengers": [{"model": "fraud_v4", "sample_rate": 1.0, "max_queue": 1000}],
             "fallback": "fraud_v4", "sample_key_header": "X-User-Id"},
    # Exploration with rewards from the feedback path, sticky by a key header.
    "fuzzbandit": {"champion": {"model": "fraud_v3"},
                   "challengers": [{"model": "fraud_v5", "mode": "explore", "max_queue": 1000}],
                   "policy": {"type": "thompson", "reward": "correct",
                              "sticky_header": "X-User-Id"}},
}


@pytest.fixture(scope="module")
def gateway(triton: Any, tmp_path_factory: pytest.TempPathFactory,
            pytestconfig: pytest.Config) -> Iterator[FuzzGateway]:
    with fuzz_gateway(triton.url, ROUTES, tmp_path_factory.mktemp("fuzz"), pytestconfig) as gw:
        yield gw


DATATYPES = st.sampled_from(["FP32", "FP64", "FP16", "BF16", "INT8", "INT32", "UINT64",
                             "BOOL", "BYTES", "fp32", "", "FLOAT"])
IDS = (st.text(max_size=40) | st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=4)
       | st.integers(0, 400).map(lambda n: "x" * n) | st.just("x" * 100_000) | JSON_VALUES)


def valid_request(rows: int = 1) -> dict[str, Any]:
    return {"id": "fz", "inputs": [{"name": "features", "datatype": "FP32", "shape": [rows, 8],
                                    "data": [0.125 * i for i in range(rows * 8)]}]}


NEST = "<nested data>"  # placeholder replaced in the bytes: orjson refuses deep nesting


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A valid request with one or more fields made adversarial, serialized."""
    body = valid_request(draw(st.integers(1, 3)))
    tensor = body["inputs"][0]
    nested = b""
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from([
            "id", "parameters", "outputs", "outputs_items", "name", "datatype", "shape", "data",
            "data_element", "nesting", "tensor_parameters", "extra_input", "inputs", "drop",
        ]))
        if target == "id":
            body["id"] = draw(IDS)
        elif target == "parameters":
            body["parameters"] = draw(JSON_VALUES | st.dictionaries(
                st.sampled_from(["priority", "timeout", "sequence_id", "sequence_start",
                                 "binary_data_output", "other"]), JSON_SCALARS, max_size=3))
        elif target == "outputs":
            body["outputs"] = draw(JSON_VALUES)
        elif target == "outputs_items":
            body["outputs"] = draw(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["score", "nope", ""]) | JSON_SCALARS},
                optional={"parameters": JSON_VALUES | st.dictionaries(
                    st.sampled_from(["binary_data", "classification", "other"]), JSON_SCALARS,
                    max_size=2)}), max_size=3))
        elif target == "name":
            tensor["name"] = draw(JSON_VALUES)
        elif target == "datatype":
            tensor["datatype"] = draw(DATATYPES | JSON_VALUES)
        elif target == "shape":
            tensor["shape"] = draw(st.lists(st.integers(-2, 2**64 - 1) | JSON_SCALARS,
                                            max_size=4) | JSON_VALUES)
        elif target == "data":
            tensor["data"] = draw(JSON_VALUES)
        elif target == "data_element" and isinstance(tensor.get("data"), list) and tensor["data"]:
            i = draw(st.integers(0, len(tensor["data"]) - 1))
            tensor["data"][i] = draw(JSON_VALUES)
        elif target == "nesting" and isinstance(tensor.get("data"), list):
            depth = draw(st.integers(1, 1200))
            nested = b"[" * depth + orjson.dumps(tensor["data"]) + b"]" * depth
            tensor["data"] = NEST
        elif target == "tensor_parameters":
            tensor["parameters"] = draw(JSON_VALUES | st.dictionaries(
                st.sampled_from(["binary_data_size", "shared_memory_region", "other"]),
                JSON_SCALARS, max_size=2))
        elif target == "extra_input" and isinstance(body.get("inputs"), list):
            body["inputs"].append(draw(JSON_VALUES))
        elif target == "inputs":
            body["inputs"] = draw(JSON_VALUES)
        elif target == "drop":
            body.pop(draw(st.sampled_from(["id", "inputs"])), None)
    return orjson.dumps(body).replace(orjson.dumps(NEST), nested or orjson.dumps(NEST), 1)


@st.composite
def binary_request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request with sizes, header length and payload possibly wrong."""
    rows = draw(st.integers(0, 3))
    datatype = draw(st.sampled_from(["FP32", "FP32", "BYTES", "INT8", "FP16", "BOOL"]))
    declared = draw(st.sampled_from(["exact", "random"]))
    exact = {"FP32": 32, "INT8": 8, "FP16": 16, "BOOL": 8}.get(datatype, 0) * rows
    tensor: dict[str, Any] = {"name": "features", "datatype": datatype, "shape": [rows, 8]}
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=6), min_size=rows * 8, max_size=rows * 8))
        payload = b"".join(len(x).to_bytes(4, "little") + x for x in items)
        payload = draw(st.sampled_from([payload, payload[:-1], payload + b"\0", b"\xff" * 8]))
    else:
        payload = draw(st.binary(min_size=exact, max_size=exact)) if rows else b""
    size = len(payload) if declared == "exact" else draw(
        st.integers(-1, 200) | JSON_SCALARS)
    tensor["parameters"] = {"binary_data_size": size}
    header_doc: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        header_doc["outputs"] = [{"name": "score",
                                  "parameters": {"binary_data": draw(JSON_SCALARS)}}]
    if draw(st.booleans()):
        header_doc["id"] = draw(IDS)
    header = orjson.dumps(header_doc)
    tail = draw(st.sampled_from([b""] * 6 + [b"\0" * 4, b"junk"]))
    length = draw(st.sampled_from([str(len(header))] * 8 + [
        str(len(header) + 1), str(len(header) - 1), "0", "-5", "1_0", " 7", "abc",
        "9" * 30, str(len(header) + len(payload) + 10)]))
    return header + payload + tail, {"Inference-Header-Content-Length": length,
                                     "Content-Type": "application/octet-stream"}


REQUEST_ID_HEADERS = (st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0xFF,
                                                     exclude_characters="\r\n"), max_size=300)
                      | st.integers(250, 5000).map(lambda n: "h" * n))


@st.composite
def feedback_body(draw: st.DrawFn) -> bytes:
    def item() -> st.SearchStrategy[Any]:
        numbers = st.sampled_from([0, 1, True, False, 0.5, -3]) | JSON_SCALARS
        return st.fixed_dictionaries(
            {"request_id": st.sampled_from(["fz", "known", "known"]) | IDS},
            optional={"label": numbers, "reward": numbers,
                      "event_time": JSON_SCALARS | st.sampled_from(
                          ["2026-11-20T10:00:00Z", "2026-11-20T10:00:00", "0001-01-01T00:00:00Z",
                           "9999-12-31T23:59:59-14:00"]),
                      "index": JSON_SCALARS, "other": JSON_SCALARS})
    valid = st.fixed_dictionaries({"request_id": st.sampled_from(["fz", "known"]),
                                   "label": st.sampled_from([0, 1])})
    payload = draw(valid | item() | st.lists(valid | item() | JSON_VALUES, max_size=5)
                   | JSON_VALUES)
    raw = orjson.dumps(payload)
    return draw(st.sampled_from([raw, raw, raw[: len(raw) // 2], b"", b"\xff\xfe", b"[" * 5000]))


# ---- checks ---------------------------------------------------------------------------------

# ---- properties -----------------------------------------------------------------------------

@FUZZ
@given(body=mutated_request(), route=st.sampled_from(["fuzz", "fuzz", "fuzzbandit", "nope"]))
def test_fuzz_json_requests(gateway: FuzzGateway, body: bytes, route: str) -> None:
    raw = body
    status, data, resp = gateway.send("json", "POST", f"/v2/models/{route}/infer", raw,
                                           {"Content-Type": "application/json"})
    check_answer(status, data, resp)
    if status == 200:
        rid = resp.getheader("X-Request-Id")
        assert rid and len(rid) <= 256 and rid.isprintable()
        gateway.ok_ids.append(rid)


@settings(FUZZ, max_examples=200)
@given(request=binary_request())
def test_fuzz_binary_requests(gateway: FuzzGateway,
                              request: tuple[bytes, dict[str, str]]) -> None:
    body, headers = request
    status, data, resp = gateway.send("binary", "POST", "/v2/models/fuzz/infer", body,
                                           headers)
    check_answer(status, data, resp)


@settings(FUZZ, max_examples=100)
@given(value=REQUEST_ID_HEADERS, body_id=st.none() | IDS, key=st.none() | REQUEST_ID_HEADERS,
       route=st.sampled_from(["fuzz", "fuzzbandit"]))
def test_fuzz_request_id_and_key_headers(gateway: FuzzGateway, value: str, body_id: Any,
                                         key: str | None, route: str) -> None:
    body = valid_request()
    if body_id is None:
        body.pop("id")
    else:
        body["id"] = body_id
    headers = {"Content-Type": "application/json", "X-Request-Id": value}
    if key is not None:
        headers["X-User-Id"] = key  # the sticky / log-sampling key: hashed and logged
    status, data, resp = gateway.send(
        "header", "POST", f"/v2/models/{route}/infer", orjson.dumps(body), headers)
    if status == 400 and resp.getheader("Content-Type", "").startswith("text/plain"):
        # A control character in a header is malformed HTTP: aiohttp's parser answers it (a
        # plain-text 400, connection closed) before any handler runs. Counted apart.
        assert b"Invalid header value char" in data and resp.will_close, data[:200]
        gateway.counts[("header", 400)] -= 1
        gateway.counts[("header-malformed-http", 400)] += 1
        return
    check_answer(status, data, resp)
    echoed = resp.getheader("X-Request-Id")
    if echoed is not None:
        assert len(echoed) <= 256 and echoed.isprintable() and echoed.isascii()


@settings(FUZZ, max_examples=200)
@given(body=feedback_body())
def test_fuzz_feedback(gateway: FuzzGateway, body: bytes) -> None:
    if gateway.ok_ids:  # labels for served requests too, so rewards reach the bandit
        body = body.replace(b'"known"', orjson.dumps(gateway.ok_ids[len(body) % len(
            gateway.ok_ids)]))
    status, data, resp = gateway.send("feedback", "POST", "/v2/feedback", body,
                                           {"Content-Type": "application/json"})
    check_answer(status, data, resp)


@settings(FUZZ, max_examples=40)
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "POST"]),
       path=st.sampled_from(["/v2/models/fuzz", "/v2/models/fuzz/ready", "/v2/models/%00/infer",
                             "/v2/models/fuzz/versions/x/infer", "/v2/feedback", "/v2",
                             "/v2/models/" + "a" * 300 + "/infer", "/v2/repository/index",
                             "/v2/models/%ff/infer", "/v2/models/%C3%A9/infer",
                             "/v2/models/fuzz%00/ready", "/v2/models/%ff"]),
       body=st.binary(max_size=64))
def test_fuzz_paths_and_methods(gateway: FuzzGateway, method: str, path: str,
                                body: bytes) -> None:
    status, data, resp = gateway.send("path", method, path, body)
    check_answer(status, data, resp)


def test_fuzz_leaves_a_serving_gateway_and_valid_records(gateway: FuzzGateway) -> None:
    """Runs last in this module: still serving, no 5xx metric, every record schema v1."""
    status, data, _ = gateway.send("final", "POST", "/v2/models/fuzz/infer",
                                   orjson.dumps(valid_request(2)),
                                   {"Content-Type": "application/json"})
    assert status == 200, data[:300]
    assert len(orjson.loads(data)["outputs"][0]["data"]) == 2
    status, metrics_text, _ = gateway.send("final", "GET", "/metrics", b"")
    assert status == 200
    assert five_xx_metrics(metrics_text, ROUTES) == []
    assert sum(gateway.counts.values()) >= 400
    assert all(status < 500 for (_, status) in gateway.counts)
    inferences, labels = written_records(gateway)  # stops the gateway; checks schema v1
    assert inferences and labels
    assert not any(r.get("fallback") for r in inferences)  # no bad body re-sent to the fallback
    served = [r for r in inferences if r["status"] == 200]
    assert served and all(r["outputs"]["fraud_v3"]["status"] == "ok" for r in served
                          if r["served"]["model"] == "fraud_v3")
    assert all(math.isfinite(r["gateway_latency_ms"]) for r in inferences)
