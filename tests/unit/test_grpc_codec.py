"""gateway/rpc/codec.py without a server: protobuf requests become KServe V2 bodies that the
HTTP parser accepts and the log decodes to the same values; protobuf-only mistakes are
BadRequests naming the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2

from gateway.dataplane.protocol import HEADER_LENGTH, decode_inputs, parse_request
from gateway.errors import BadRequest
from gateway.rpc.codec import infer_request_body, infer_response

TYPED: list[tuple[str, str, list[Any]]] = [
    ("FP32", "fp32_contents", [1.5, -2.25]),
    ("FP64", "fp64_contents", [1e300, -0.5]),
    ("INT8", "int_contents", [-128, 127]),
    ("INT16", "int_contents", [-32768, 7]),
    ("INT32", "int_contents", [-(2**31), 2**31 - 1]),
    ("INT64", "int64_contents", [-(2**63), 2**63 - 1]),
    ("UINT8", "uint_contents", [0, 255]),
    ("UINT16", "uint_contents", [0, 65535]),
    ("UINT32", "uint_contents", [0, 2**32 - 1]),
    ("UINT64", "uint64_contents", [0, 2**64 - 1]),
    ("BOOL", "bool_contents", [True, False]),
    ("BYTES", "bytes_contents", [b"a", b""]),
]


def _request(*tensors: tuple[str, str, str, list[Any]]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="r", id="c-1")
    for name, datatype, field, values in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize(("datatype", "field", "values"), TYPED)
def test_typed_contents_round_trip(datatype: str, field: str, values: list[Any]) -> None:
    body, length = infer_request_body(_request(("x", datatype, field, values)))
    parsed = parse_request(body, str(length))
    assert parsed.id == "c-1"
    assert parsed.header["parameters"]["binary_data_output"] is True
    decoded = decode_inputs(parsed)["x"]
    expected = [v.decode() for v in values] if datatype == "BYTES" else values
    assert decoded == {"datatype": datatype, "shape": [2], "data": expected}


def test_raw_contents_pass_through() -> None:
    request = service_pb2.ModelInferRequest(model_name="r")
    request.inputs.add(name="x", datatype="FP16", shape=[2])
    raw = np.array([1.0, 2.0], dtype="<f2").tobytes()
    request.raw_input_contents.append(raw)
    body, length = infer_request_body(request)
    assert body[length:] == raw
    parse_request(body, str(length))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
     "input 'x': shape [2] needs 2 elements, contents.fp32_contents has 3"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP16"),
     "input 'x': FP16 has no typed contents field"),
    (lambda r: setattr(r.inputs[0], "datatype", "FLOAT"), "input 'x': 'datatype' must be one of"),
    (lambda r: r.raw_input_contents.extend([b"", b""]),
     "raw_input_contents has 2 entries but the request has 1 inputs"),
    (lambda r: r.raw_input_contents.append(b"\0" * 8),
     "input 'x' has typed contents but the request also has raw_input_contents"),
    (lambda r: r.inputs[0].parameters["shared_memory_region"].CopyFrom(
        service_pb2.InferParameter(string_param="shm")), "shared memory inputs are not supported"),
    (lambda r: r.parameters["priority"].CopyFrom(service_pb2.InferParameter()),
     "parameters.priority has no value set"),
])
def test_protobuf_mistakes_name_the_field(mutate: Any, message: str) -> None:
    request = _request(("x", "FP32", "fp32_contents", [1.0, 2.0]))
    mutate(request)
    with pytest.raises(BadRequest, match=None) as info:
        infer_request_body(request)
    assert message in info.value.message


def test_out_of_range_typed_int() -> None:
    with pytest.raises(BadRequest, match=r"input 'x': INT8 contents must lie in \[-128, 127\]"):
        infer_request_body(_request(("x", "INT8", "int_contents", [1, 300])))


def test_response_binary_and_json_outputs() -> None:
    header = orjson.dumps({
        "model_name": "m", "model_version": "1", "parameters": {"sequence_id": 3},
        "outputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 2],
             "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "INT64", "shape": [2], "data": [5, -6]},
            {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hi"]},
        ]})
    a = np.array([[0.25, 0.5]], dtype="<f4").tobytes()
    response = infer_response(header + a, {HEADER_LENGTH: str(len(header))}, "gen-1")
    assert response.id == "gen-1" and response.model_name == "m"
    assert response.parameters["sequence_id"].int64_param == 3
    assert [list(o.shape) for o in response.outputs] == [[1, 2], [2], [1]]
    assert response.raw_output_contents[0] == a
    assert np.frombuffer(response.raw_output_contents[1], "<i8").tolist() == [5, -6]
    assert response.raw_output_contents[2] == b"\x02\x00\x00\x00hi"
