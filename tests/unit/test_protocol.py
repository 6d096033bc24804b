"""Wire-format parsing without a server: JSON and binary requests, decoding for the log."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from gateway.dataplane.protocol import (
    TensorSpec,
    decode_inputs,
    decode_response,
    parse_request,
    request_id_problem,
    validate_against,
)
from gateway.errors import BadRequest
from gateway.rest.feedback import parse_item

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


def fraud(**over: object) -> dict:
    tensor = {"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}
    body: dict = {"inputs": [tensor]}
    for key, value in over.items():
        if key in ("name", "datatype", "shape", "data", "parameters_in"):
            tensor[key.removesuffix("_in")] = value
        else:
            body[key] = value
    return body


def nested(depth: int) -> list:
    data: list = [0.5] * 8
    for _ in range(depth):
        data = [data]
    return data


# (body, expected words in the 400's message): each is a client mistake that Triton answers with
# a 500 (or that crashed the gateway) unless the gateway refuses it first.
BAD_BODIES = [
    (fraud(data=["1"] * 8), "FP32 data must hold integer or number elements, got string"),
    (fraud(data=[None] * 8), "got null"),
    (fraud(data=[True] * 8), "got boolean"),
    (fraud(data=[0.5] * 7 + [[0.5]]), "mixes lists and values"),
    (fraud(data=[[0.5] * 8, 0.5]), "mixes lists and values"),
    (fraud(data=0.5, shape=[1]), "'data' must be a list"),
    (fraud(data=[[[0.5] * 8]]), "nested deeper than its 2-dimensional shape"),
    (fraud(datatype=["FP32"]), "'datatype' must be one of"),
    (fraud(datatype={"a": 1}), "'datatype' must be one of"),
    (fraud(datatype="FP16", data=[0.5] * 8), "FP16 data cannot be sent as JSON"),
    (fraud(datatype="INT8", data=[300] * 8), "INT8 data must lie in [-128, 127], got 300"),
    (fraud(datatype="UINT64", data=[-1] * 8), "got -1"),
    (fraud(datatype="INT32", data=[1.0] * 8), "INT32 data must hold integer elements"),
    (fraud(datatype="BOOL", data=[1] * 8), "BOOL data must hold boolean elements"),
    (fraud(datatype="BYTES", data=[1] * 8), "BYTES data must hold string elements"),
    (fraud(shape=[2**64 - 1, 8]), "'shape' must be a list of at most 32 integers"),
    (fraud(shape=[2**62, 2**62]), "more than 2^63-1 elements"),
    (fraud(shape=[1.0, 8]), "'shape'"),
    (fraud(shape=[1] * 33), "'shape'"),
    (fraud(name=7), "inputs[0].name must be a non-empty string"),
    (fraud(parameters="x"), "'parameters' must be an object, got string"),
    (fraud(parameters=[]), "'parameters' must be an object, got list"),
    (fraud(parameters=None), "'parameters' must be an object, got null"),
    (fraud(parameters={"priority": -1}), "'parameters'.priority must be a non-negative integer"),
    (fraud(parameters={"binary_data_output": 1}), "binary_data_output must be a boolean"),
    (fraud(parameters={"sequence_id": -1}), "sequence_id must be a non-negative integer or"),
    (fraud(parameters={"x": {}}), "'parameters'.x must be a string, number or boolean"),
    (fraud(parameters_in="x"), "input 'features': parameters must be an object"),
    (fraud(outputs="score"), "'outputs' must be a list of objects, got string"),
    (fraud(outputs=None), "'outputs' must be a list"),
    (fraud(outputs=[{}]), "outputs[0].name must be a non-empty string"),
    (fraud(outputs=["score"]), "outputs[0] must be an object"),
    (fraud(outputs=[{"name": "score", "parameters": {"binary_data": "yes"}}]),
     "outputs[0].parameters.binary_data must be a boolean"),
    (fraud(outputs=[{"name": "score", "parameters": {"classification": -1}}]),
     "classification must be a non-negative integer"),
    (fraud(id={"a": 1}), "'id' must be a string, got object"),
    (fraud(id=5), "'id' must be a string, got integer"),
    (fraud(id=None), "'id' must be a string, got null"),
    (fraud(id="a\x01b"), "'id' must be printable ASCII"),
    (fraud(id="a\nb"), "'id' must be printable ASCII"),
    (fraud(id=" padded "), "'id' must be printable ASCII"),
    (fraud(id="x" * 257), "'id' is 257 characters long; the limit is 256"),
    (fraud(id="x" * 100_000), "'id' is 100000 characters long"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES,
                         ids=[f"bad{i}" for i in range(len(BAD_BODIES))])
def test_client_mistakes_are_bad_requests_naming_the_field(body: dict, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(orjson.dumps(body), None)
    assert message in info.value.message


def test_hostile_nesting_is_refused_without_recursion() -> None:
    depth = 100_000  # far past the interpreter's recursion limit
    raw = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":' + (
        b"[" * depth + b"0.5" + b"]" * depth + b"}]}")
    with pytest.raises(BadRequest):  # orjson refuses > 1024 levels; the gateway far fewer
        parse_request(raw, None)
    with pytest.raises(BadRequest, match="nested deeper than its 2-dimensional shape"):
        parse_request(orjson.dumps(fraud(data=nested(200))), None)


GOOD_BODIES = [
    fraud(data=[0, 1, 2, 3, 4, 5, 6, 7]),  # JSON integers are fine FP32 values (Triton agrees)
    fraud(data=[[0.5] * 8]),
    fraud(data=[[[0.5] * 4, [0.5] * 4]], shape=[1, 2, 4]),
    fraud(id=""),  # empty: as if absent (a generated id is used)
    fraud(id="order-17:a/b c", parameters={"priority": 1, "sequence_id": "s", "x": 1.5}),
    fraud(outputs=[{"name": "score", "parameters": {"binary_data": True}}]),
    fraud(outputs=[{"name": "score", "parameters": None}]),
    fraud(datatype="UINT64", data=[2**64 - 1] * 8),
    fraud(datatype="INT8", data=[-128, 127, 0, 0, 0, 0, 0, 0]),
    fraud(datatype="BOOL", data=[True, False] * 4),
    fraud(datatype="BYTES", data=["a", "", "ß"] + ["x"] * 5),
    fraud(shape=[0, 8], data=[]),
    fraud(shape=[0, 8], data=[[]]),
]


@pytest.mark.parametrize("body", GOOD_BODIES, ids=[f"good{i}" for i in range(len(GOOD_BODIES))])
def test_valid_requests_pass_and_log_flat_well_typed_data(body: dict) -> None:
    request = parse_request(orjson.dumps(body), None)
    tensor = decode_inputs(request)["features"]
    assert tensor["data"] == list(np.asarray(body["inputs"][0]["data"], dtype=object).ravel()) \
        or tensor["data"] == []
    assert len(tensor["data"]) == int(np.prod(tensor["shape"]))


def bytes_payload(items: list[bytes]) -> bytes:
    return b"".join(len(x).to_bytes(4, "little") + x for x in items)


def binary_body(tensor: dict, payload: bytes, **extra: object) -> tuple[bytes, str]:
    header = orjson.dumps({"inputs": [tensor], **extra})
    return header + payload, str(len(header))


def test_binary_sizes_are_checked_against_shape_and_header() -> None:
    ok = bytes_payload([b"ab", b"", b"xyz"])
    tensor = {"name": "s", "datatype": "BYTES", "shape": [3],
              "parameters": {"binary_data_size": len(ok)}}
    request = parse_request(*binary_body(tensor, ok))
    assert decode_inputs(request)["s"]["data"] == ["ab", "", "xyz"]
    cases = [
        ({**tensor, "shape": [10**12]}, ok, "need at least 4000000000000 bytes"),
        ({**tensor, "shape": [2]}, ok, "does not hold exactly 2 length-prefixed elements"),
        ({**tensor, "shape": [3]}, ok[:-1] + b"", "binary payload is"),
        ({**tensor, "shape": [3], "parameters": {"binary_data_size": 16}},
         bytes_payload([b"a", b"b"]) + (100).to_bytes(4, "little") + b"xx",
         "does not hold exactly 3"),  # the last length prefix points past the payload
        ({**tensor, "data": ["a"]}, ok, "both 'data' and binary_data_size"),
        ({**tensor, "parameters": {"binary_data_size": -1}}, ok,
         "binary_data_size must be a non-negative integer"),
        ({**tensor, "parameters": {"binary_data_size": True}}, ok, "binary_data_size must be"),
        ({"name": "f", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}},
         b"\0" * 4, "needs 8"),
    ]
    for bad_tensor, payload, message in cases:
        with pytest.raises(BadRequest) as info:
            parse_request(*binary_body(bad_tensor, payload))
        assert message in info.value.message, (bad_tensor, info.value.message)
    body, _ = binary_body(tensor, ok)
    for header_length in ("1_0", " 12", "+12", "١٢", "9" * 40, "-3", "0"):
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
            parse_request(body, header_length)


def test_binary_non_finite_floats_are_logged_as_null_and_valid() -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 1.5, 0, 0, 0, 0]], dtype=np.float32)
    body, length = binary_request(x)
    tensor = decode_inputs(parse_request(body, length))["features"]
    assert orjson.loads(orjson.dumps(tensor))["data"][:4] == [None, None, None, 1.5]
    # Triton writes a NaN score as NaN (not JSON); the log still decodes it.
    decoded = decode_response(b'{"model_name":"m","outputs":[{"name":"score","datatype":"FP32",'
                              b'"shape":[1,1],"data":[NaN]}]}', None)
    assert orjson.dumps(decoded["outputs"]["score"]["data"]) == b"[null]"


def test_feedback_request_ids_follow_the_inference_id_rule() -> None:
    assert parse_item({"request_id": "order-17", "label": 1}, 0.0)["request_id"] == "order-17"
    for bad, message in [("a\x01b", "printable ASCII"), ("x" * 300, "300 characters"),
                         (7, "must be a string, got integer"), ("", "non-empty string")]:
        with pytest.raises(ValueError, match=message):
            parse_item({"request_id": bad, "label": 1}, 0.0)
    assert request_id_problem("r" * 256) is None and request_id_problem("r" * 257)
