"""Protobuf <-> KServe V2 HTTP wire format, so gRPC requests run through the same core as HTTP.

The core (gateway/dataplane/service.py) takes a KServe V2 HTTP body: a JSON header plus the binary
tensor
extension. A `ModelInferRequest` maps onto that exactly: each input becomes a header entry with
`binary_data_size`, its bytes (from `raw_input_contents`, or the typed `contents` packed
little-endian) follow the header. Every output is asked for in binary, so the answer's tensors map
back onto `raw_output_contents` without a decode. Validation stays in
gateway/dataplane/protocol.py; this
module checks only what the protobuf form adds (typed contents, their counts and ranges).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2, service_pb2

from gateway.dataplane.protocol import HEADER_LENGTH, NUMPY_DTYPES, check_datatype, flatten
from gateway.errors import BadRequest, UpstreamBadGateway
from understudy.records import INT_RANGES

# The typed `contents` field each datatype travels in (FP16/BF16 have none: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(param: service_pb2.InferParameter) -> bool | int | float | str:
    """The scalar an `InferParameter` holds (its oneof), as the JSON header would carry it."""
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise BadRequest("a parameter has no value set")
    value: bool | int | float | str = getattr(param, kind)
    return value


def _parameters(params: Mapping[str, service_pb2.InferParameter], what: str) -> dict[str, Any]:
    out = {}
    for key, param in params.items():
        try:
            out[key] = parameter_value(param)
        except BadRequest:
            raise BadRequest(f"{what}.{key} has no value set") from None
    return out


def pack_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary extension's form: each prefixed by its uint32 length."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def encode_tensor(datatype: str, values: Sequence[Any], name: str) -> bytes:
    """Flat `values` as the little-endian bytes the binary extension carries."""
    if datatype == "BYTES":
        return pack_bytes(v if isinstance(v, bytes) else str(v).encode() for v in values)
    bounds = INT_RANGES.get(datatype)
    if bounds is not None and values:
        low, high = min(values), max(values)
        if low < bounds[0] or high > bounds[1]:
            raise BadRequest(f"input '{name}': {datatype} contents must lie in "
                             f"[{bounds[0]}, {bounds[1]}], got "
                             f"{low if low < bounds[0] else high}")
    return np.asarray(values, dtype=NUMPY_DTYPES[datatype]).tobytes()


def _input_bytes(tensor: service_pb2.ModelInferRequest.InferInputTensor,
                 raw: bytes | None) -> bytes:
    """One input's tensor bytes, from raw_input_contents or its typed contents."""
    name, datatype = tensor.name, tensor.datatype
    if raw is not None:
        if tensor.HasField("contents"):
            raise BadRequest(f"input '{name}' has typed contents but the request also has "
                             "raw_input_contents; use one or the other")
        return raw
    check_datatype(name, datatype)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"input '{name}': {datatype} has no typed contents field; send it in "
                         "raw_input_contents")
    values = getattr(tensor.contents, field)
    if any(d < 0 for d in tensor.shape):
        raise BadRequest(f"input '{name}': 'shape' must hold non-negative dimensions, got "
                         f"{list(tensor.shape)}")
    count = math.prod(tensor.shape)
    if len(values) != count:
        raise BadRequest(f"input '{name}': shape {list(tensor.shape)} needs {count} elements, "
                         f"contents.{field} has {len(values)}")
    return encode_tensor(datatype, values, name)


def infer_request_body(request: service_pb2.ModelInferRequest) -> tuple[bytes, int]:
    """The KServe V2 binary-extension body for `request`, and its JSON header's length."""
    raw_inputs = request.raw_input_contents
    if raw_inputs and len(raw_inputs) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw_inputs)} entries but the request has "
                         f"{len(request.inputs)} inputs; give one per input, in order")
    inputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for i, tensor in enumerate(request.inputs):
        params = _parameters(tensor.parameters, f"inputs[{i}].parameters")
        if any(key.startswith("shared_memory") for key in params):
            raise BadRequest(f"input '{tensor.name}': shared memory inputs are not supported "
                             "through the gateway; send the tensor in the request")
        chunk = _input_bytes(tensor, raw_inputs[i] if raw_inputs else None)
        params["binary_data_size"] = len(chunk)
        inputs.append({"name": tensor.name, "datatype": tensor.datatype,
                       "shape": list(tensor.shape), "parameters": params})
        chunks.append(chunk)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    params = _parameters(request.parameters, "parameters")
    params["binary_data_output"] = True
    header["parameters"] = params
    if request.outputs:
        header["outputs"] = [
            {"name": out.name,
             "parameters": {**_parameters(out.parameters, f"outputs[{i}].parameters"),
                            "binary_data": True}}
            for i, out in enumerate(request.outputs)
        ]
    head = orjson.dumps(header)
    return head + b"".join(chunks), len(head)


def infer_response(body: bytes, headers: Mapping[str, str], request_id: str
                   ) -> service_pb2.ModelInferResponse:
    """Triton's HTTP answer (as the core returns it) as a `ModelInferResponse`."""
    length_text = headers.get(HEADER_LENGTH)
    length = int(length_text) if length_text is not None else len(body)
    try:
        header = orjson.loads(body[:length])
    except orjson.JSONDecodeError as exc:
        raise UpstreamBadGateway(f"inference response header is not JSON: {exc}") from None
    response = service_pb2.ModelInferResponse(
        model_name=str(header.get("model_name", "")),
        model_version=str(header.get("model_version", "")),
        id=str(header.get("id") or request_id),
    )
    for key, value in (header.get("parameters") or {}).items():
        set_parameter(response.parameters[key], value)
    offset = length
    for out in header.get("outputs") or []:
        datatype = str(out.get("datatype"))
        tensor = response.outputs.add(name=str(out.get("name")), datatype=datatype,
                                      shape=[int(d) for d in out.get("shape", [])])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = body[offset : offset + size]
            if len(chunk) != size:
                raise UpstreamBadGateway(f"binary data for output '{tensor.name}' truncated")
            offset += size
        else:  # a JSON output (Triton ignored binary_data): pack it as raw bytes too
            chunk = encode_tensor(datatype, flatten(out.get("data", [])), tensor.name)
        response.raw_output_contents.append(chunk)
    return response


def set_parameter(param: service_pb2.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def model_metadata(metadata: Mapping[str, Any]) -> service_pb2.ModelMetadataResponse:
    """Triton's JSON model metadata as the protobuf answer (the caller set the route's name)."""
    def tensors(key: str) -> list[service_pb2.ModelMetadataResponse.TensorMetadata]:
        return [service_pb2.ModelMetadataResponse.TensorMetadata(
            name=str(t["name"]), datatype=str(t["datatype"]), shape=[int(d) for d in t["shape"]]
        ) for t in metadata.get(key) or []]

    try:
        return service_pb2.ModelMetadataResponse(
            name=str(metadata["name"]), versions=[str(v) for v in metadata.get("versions", [])],
            platform=str(metadata.get("platform", "")), inputs=tensors("inputs"),
            outputs=tensors("outputs"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamBadGateway(f"model metadata is malformed: {exc}") from None


def _from_json(data: Mapping[str, Any], message: Message, what: str) -> None:
    """Fill `message` from Triton's JSON answer (protobuf's JSON mapping); a shape protobuf
    cannot read is the upstream's fault."""
    try:
        json_format.ParseDict(dict(data), message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise UpstreamBadGateway(f"{what} malformed: {exc}") from None


def model_config(config: Mapping[str, Any]) -> service_pb2.ModelConfigResponse:
    """Triton's JSON model config back into `ModelConfig`."""
    message = model_config_pb2.ModelConfig()
    _from_json(config, message, "model config is")
    return service_pb2.ModelConfigResponse(config=message)


def model_statistics(stats: Mapping[str, Any]) -> service_pb2.ModelStatisticsResponse:
    """Triton's JSON model statistics back into the protobuf."""
    message = service_pb2.ModelStatisticsResponse()
    _from_json(stats, message, "model statistics are")
    return message
