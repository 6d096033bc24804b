"""Wire-format parsing without a server: JSON and binary requests, decoding for the log."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from gateway.errors import BadRequest
from gateway.protocol import (
    TensorSpec,
    decode_inputs,
    decode_response,
    parse_request,
    validate_against,
)

SPECS = (TensorSpec("features", "FP32", (-1, 8)),)


def binary_request(x: np.ndarray, extra: bytes = b"") -> tuple[bytes, str]:
    header = orjson.dumps({"id": "b1", "inputs": [{
        "name": "features", "datatype": "FP32", "shape": list(x.shape),
        "parameters": {"binary_data_size": x.nbytes}}]})
    return header + x.astype("<f4").tobytes() + extra, str(len(header))


def test_binary_request_round_trips_to_the_log() -> None:
    x = np.arange(16, dtype=np.float32).reshape(2, 8) / 7
    body, length = binary_request(x)
    request = parse_request(body, length)
    validate_against(request, "m", SPECS)
    assert request.id == "b1" and request.header_length == int(length)
    tensor = decode_inputs(request)["features"]
    assert tensor["shape"] == [2, 8]
    np.testing.assert_array_equal(np.array(tensor["data"], dtype=np.float32), x.ravel())


def test_binary_request_with_extra_bytes_is_refused() -> None:
    body, length = binary_request(np.zeros((1, 8), np.float32), extra=b"\0\0\0\0")
    with pytest.raises(BadRequest, match="binary payload is 36 bytes but the inputs declare 32"):
        parse_request(body, length)


def test_nested_json_data_counts_elements() -> None:
    body = orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 8],
                                     "data": [[0.0] * 8, [1.0] * 8]}]})
    request = parse_request(body, None)
    assert decode_inputs(request)["features"]["data"] == [0.0] * 8 + [1.0] * 8


def test_decode_binary_response_and_bytes_outputs() -> None:
    scores = np.array([0.25, 0.75], dtype=np.float32)
    strings = b"".join(len(s).to_bytes(4, "little") + s for s in (b"ab", b"xyz"))
    header = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [2, 1],
         "parameters": {"binary_data_size": 8}},
        {"name": "label", "datatype": "BYTES", "shape": [2],
         "parameters": {"binary_data_size": len(strings)}},
    ]})
    decoded = decode_response(header + scores.tobytes() + strings, str(len(header)))
    assert decoded["outputs"]["score"]["data"] == [0.25, 0.75]
    assert decoded["outputs"]["label"]["data"] == ["ab", "xyz"]


def test_duplicate_and_missing_inputs() -> None:
    t = {"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [0.0] * 8}
    with pytest.raises(BadRequest, match="given twice"):
        parse_request(orjson.dumps({"inputs": [t, t]}), None)
    other = {"name": "other", "datatype": "FP32", "shape": [1], "data": [0.0]}
    request = parse_request(orjson.dumps({"inputs": [other]}), None)
    with pytest.raises(BadRequest, match="unexpected input"):
        validate_against(request, "m", SPECS)
    specs = (*SPECS, TensorSpec("other", "FP32", (-1,)))
    request = parse_request(orjson.dumps({"inputs": [t]}), None)
    with pytest.raises(BadRequest, match="missing input"):
        validate_against(request, "m", specs)
