"""Property-based fuzzing of every JSON datatype family through the real gateway and Triton.

The fraud models take one FP32 input; `typed_echo` (tests/triton_models) takes FP32, FP64, INT8,
UINT16, INT64, UINT64, BOOL and BYTES inputs and echoes FP32 and BYTES back. Hypothesis sends
requests whose elements are in or out of each datatype's domain (right and wrong JSON types,
integers at and past the range limits, arbitrary Unicode strings), as JSON and as binary
tensors (whose floats may be NaN or infinite, and whose strings may be any bytes), with JSON or
binary outputs.

Properties: the gateway's verdict agrees with Triton's own rules: an in-domain request is a 200
(Triton accepts it), an out-of-domain one is the gateway's 400 (never Triton's 500 as a 502);
every record validates against schema v1 (non-finite floats logged as null, strings intact).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dataplane.protocol import INT_RANGES, LOG_TEXT_MIN_ELEMENTS
from tests.support.fuzz import (
    FUZZ,
    JSON_SCALARS,
    FuzzGateway,
    check_answer,
    five_xx_metrics,
    fuzz_gateway,
    written_records,
)

pytestmark = pytest.mark.triton

ROUTES = {"typed": {"champion": {"model": "typed_echo"}, "task": "regression"}}
INPUTS = {"f32": "FP32", "f64": "FP64", "i8": "INT8", "u16": "UINT16", "i64": "INT64",
          "u64": "UINT64", "b": "BOOL", "s": "BYTES"}
NUMPY = {"FP32": "<f4", "FP64": "<f8", "INT8": "<i1", "UINT16": "<u2", "INT64": "<i8",
         "UINT64": "<u8", "BOOL": "?"}


@pytest.fixture(scope="module")
def gateway(triton: Any, tmp_path_factory: pytest.TempPathFactory,
            pytestconfig: pytest.Config) -> Iterator[FuzzGateway]:
    with fuzz_gateway(triton.url, ROUTES, tmp_path_factory.mktemp("typed"), pytestconfig) as gw:
        yield gw


def in_domain(datatype: str) -> st.SearchStrategy[Any]:
    """JSON values Triton accepts for an element of `datatype`."""
    if datatype in INT_RANGES:
        low, high = INT_RANGES[datatype]
        return st.integers(low, high) | st.sampled_from([low, high])
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.text(max_size=8)
    return st.floats(allow_nan=False, allow_infinity=False, width=32 if datatype == "FP32"
                     else 64) | st.integers(-(2**53), 2**53)


def out_of_domain(datatype: str) -> st.SearchStrategy[Any]:
    """JSON values that are not an element of `datatype` (Triton: a 500, or a silent wrap)."""
    wrong_type = JSON_SCALARS.filter(lambda v: not _fits(v, datatype))
    if datatype not in INT_RANGES:
        return wrong_type
    low, high = INT_RANGES[datatype]
    outside = [st.sampled_from([v for v in (low - 1, high + 1) if -(2**63) <= v < 2**64])]
    if high < 2**64 - 1:
        outside.append(st.integers(high + 1, 2**64 - 1))
    if low > -(2**63):
        outside.append(st.integers(-(2**63), low - 1))
    return st.one_of(*outside, wrong_type)


def _fits(value: Any, datatype: str) -> bool:
    if datatype in INT_RANGES:
        low, high = INT_RANGES[datatype]
        return type(value) is int and low <= value <= high
    if datatype == "BOOL":
        return type(value) is bool
    if datatype == "BYTES":
        return type(value) is str
    return type(value) in (int, float)


@st.composite
def typed_json(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(body, in domain?): all inputs valid, then maybe one element replaced by a bad one."""
    n = draw(st.integers(1, 4))
    inputs = []
    for name, datatype in INPUTS.items():
        data = draw(st.lists(in_domain(datatype), min_size=n, max_size=n))
        inputs.append({"name": name, "datatype": datatype, "shape": [n], "data": data})
    valid = draw(st.booleans())
    if not valid:
        tensor = draw(st.sampled_from(inputs))
        tensor["data"][draw(st.integers(0, n - 1))] = draw(out_of_domain(tensor["datatype"]))
    return orjson.dumps({"inputs": inputs}), valid


@st.composite
def typed_binary(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A valid binary request: any bit patterns for numbers, any bytes for strings; small
    tensors, or ones the log writes as text straight from their bytes (`log_inputs`)."""
    n = draw(st.integers(1, 4) | st.integers(LOG_TEXT_MIN_ELEMENTS, LOG_TEXT_MIN_ELEMENTS + 4))
    inputs, chunks = [], []
    for name, datatype in INPUTS.items():
        if datatype == "BYTES":
            items = draw(st.lists(st.binary(max_size=8), min_size=n, max_size=n))
            chunk = b"".join(struct.pack("<I", len(x)) + x for x in items)
        elif datatype == "BOOL":
            chunk = draw(st.binary(min_size=n, max_size=n))  # any byte: nonzero is true
        else:
            size = np.dtype(NUMPY[datatype]).itemsize
            chunk = draw(st.binary(min_size=n * size, max_size=n * size))
        inputs.append({"name": name, "datatype": datatype, "shape": [n],
                       "parameters": {"binary_data_size": len(chunk)}})
        chunks.append(chunk)
    doc: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):  # binary outputs too (tritonclient's default), else JSON outputs
        doc["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(doc)
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


@FUZZ
@given(request=typed_json())
def test_fuzz_typed_json_agrees_with_triton(gateway: FuzzGateway,
                                            request: tuple[bytes, bool]) -> None:
    body, valid = request
    status, data, resp = gateway.send("typed-json", "POST", "/v2/models/typed/infer", body,
                                      {"Content-Type": "application/json"})
    check_answer(status, data, resp)
    assert status == (200 if valid else 400), (status, data[:300], body[:300])


@settings(FUZZ, max_examples=150)
@given(request=typed_binary())
def test_fuzz_typed_binary_is_accepted_and_logged(gateway: FuzzGateway,
                                                  request: tuple[bytes, dict[str, str]]) -> None:
    body, headers = request
    status, data, resp = gateway.send("typed-binary", "POST", "/v2/models/typed/infer", body,
                                      headers)
    assert status == 200, (status, data[:300])
    if resp.getheader("Inference-Header-Content-Length") is None:
        # Triton writes BYTES outputs into its JSON answer as raw bytes, UTF-8 or not (clients
        # that send arbitrary bytes ask for binary outputs); passed through unchanged.
        json.loads(data.decode("utf-8", "replace"))


def test_fuzz_typed_records_are_schema_v1(gateway: FuzzGateway) -> None:
    """Runs last: no 5xx, and every record (NaN floats, any strings) validates."""
    status, metrics_text, _ = gateway.send("final", "GET", "/metrics", b"")
    assert status == 200 and five_xx_metrics(metrics_text, ROUTES) == []
    inferences, _ = written_records(gateway)
    served = [r for r in inferences if r["status"] == 200]
    assert len(served) >= 100
    for record in served:
        outputs = record["outputs"]["typed_echo"]["outputs"]
        n = record["inputs"]["f32"]["shape"][0]
        assert outputs["n"]["data"] == [8 * n]
        assert outputs["s_out"]["data"] == record["inputs"]["s"]["data"]
        sent = record["inputs"]["f32"]["data"]
        echoed = outputs["f32_out"]["data"]
        assert [x is None or not math.isfinite(x) for x in sent] == [
            x is None or not math.isfinite(x) for x in echoed]
