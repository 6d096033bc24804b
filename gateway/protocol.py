"""KServe V2 / Triton HTTP wire format: parse and validate requests, decode responses.

The gateway forwards the client's body bytes to Triton unchanged (no re-encoding on the hot
path); it parses only what it needs to route and validate: the JSON header (all of a JSON
request, or the first `Inference-Header-Content-Length` bytes of a binary one). Turning tensors
into lists for the log happens later, off the client's critical path (`decode_inputs`,
`decode_outputs`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from gateway.errors import BadRequest, UpstreamBadGateway
from gateway.records import Tensor

HEADER_LENGTH = "Inference-Header-Content-Length"

# Bytes per element for fixed-size datatypes; BYTES is variable (4-byte length prefix each).
DATATYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
    "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8,
}
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
DATATYPES = frozenset([*DATATYPE_SIZES, "BYTES"])


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input as Triton's metadata declares it; -1 is a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class InferRequest:
    """The parts of a client request the gateway needs, plus the untouched body to forward."""

    body: bytes
    header: dict[str, Any]
    header_length: int | None  # None: a pure JSON request

    @property
    def id(self) -> str | None:
        value = self.header.get("id")
        return str(value) if value not in (None, "") else None

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.header["inputs"]

    @property
    def content_type(self) -> str:
        return "application/octet-stream" if self.header_length is not None else "application/json"


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    """`raw` parsed as a JSON object, or BadRequest naming `what` and the problem."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in {what}: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse a JSON or binary-extension request and check its own consistency."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < length <= len(body):
            raise BadRequest(
                f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes"
            )
        header = json_object(body[:length], "inference request header")
        request = InferRequest(body, header, length)
    else:
        if not body:
            raise BadRequest("empty request body: expected a KServe V2 inference request")
        request = InferRequest(body, json_object(body, "inference request"), None)
    _check_inputs(request)
    return request


def _element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _flat_length(data: Any) -> int:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return sum(_flat_length(item) for item in data)
    return len(data) if isinstance(data, list) else 1


def _check_inputs(request: InferRequest) -> None:
    inputs = request.header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    binary_total = 0
    seen: set[str] = set()
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(f"inputs[{i}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"inputs[{i}] has no 'name'")
        if name in seen:
            raise BadRequest(f"input '{name}' is given twice")
        seen.add(name)
        datatype = tensor.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequest(f"input '{name}': unknown datatype {datatype!r}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise BadRequest(f"input '{name}': 'shape' must be a list of non-negative integers")
        count = _element_count(shape)
        binary_size = (tensor.get("parameters") or {}).get("binary_data_size")
        if binary_size is not None:
            if request.header_length is None:
                raise BadRequest(
                    f"input '{name}' has binary_data_size but the request has no "
                    f"{HEADER_LENGTH} header"
                )
            if not isinstance(binary_size, int) or binary_size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a non-negative int")
            size = DATATYPE_SIZES.get(datatype)
            if size is not None and binary_size != count * size:
                raise BadRequest(
                    f"input '{name}': binary_data_size is {binary_size} bytes but shape "
                    f"{shape} of {datatype} needs {count * size}"
                )
            binary_total += binary_size
        elif "data" in tensor:
            got = _flat_length(tensor["data"])
            if got != count:
                raise BadRequest(
                    f"input '{name}': shape {shape} needs {count} elements, 'data' has {got}"
                )
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
    if request.header_length is not None:
        available = len(request.body) - request.header_length
        if available != binary_total:
            raise BadRequest(
                f"binary payload is {available} bytes but the inputs declare {binary_total}"
                + (" (truncated body?)" if available < binary_total else "")
            )


def validate_against(request: InferRequest, model: str, specs: Sequence[TensorSpec]) -> None:
    """Check input names, datatypes and shapes against the model's metadata, naming the problem.

    Done in the gateway (not left to Triton) so that a bad request is never mirrored to the
    challengers and the client gets one clear message.
    """
    by_name = {s.name: s for s in specs}
    given = {t["name"] for t in request.inputs}
    unknown = sorted(given - by_name.keys())
    if unknown:
        raise BadRequest(
            f"unexpected input(s) {', '.join(map(repr, unknown))} for model '{model}'; "
            f"expected {', '.join(map(repr, by_name))}"
        )
    missing = sorted(by_name.keys() - given)
    if missing:
        raise BadRequest(f"missing input(s) {', '.join(map(repr, missing))} for model '{model}'")
    for tensor in request.inputs:
        spec = by_name[tensor["name"]]
        if tensor["datatype"] != spec.datatype:
            raise BadRequest(
                f"input '{spec.name}': datatype {tensor['datatype']} does not match "
                f"model '{model}' which expects {spec.datatype}"
            )
        shape = tensor["shape"]
        if len(shape) != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise BadRequest(
                f"input '{spec.name}': shape {list(shape)} does not match model '{model}' "
                f"which expects {list(spec.shape)} (-1 = any)"
            )


def parse_metadata_inputs(metadata: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    try:
        return tuple(
            TensorSpec(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
            for t in metadata["inputs"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamBadGateway(f"model metadata has no usable 'inputs': {exc}") from None


def _decode_bytes(raw: bytes, count: int) -> list[str]:
    items: list[str] = []
    offset = 0
    for _ in range(count):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        items.append(raw[offset : offset + length].decode("utf-8", "replace"))
        offset += length
    return items


def flatten(data: Any) -> list[Any]:
    """A tensor's JSON `data` (flat, nested row-major, or a scalar) as one flat list."""
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for item in data for x in flatten(item)]
    return data if isinstance(data, list) else [data]


def _decode_tensors(
    tensors: Sequence[Mapping[str, Any]], binary: bytes, what: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    offset = 0
    for t in tensors:
        shape = [int(d) for d in t.get("shape", [])]
        datatype = str(t.get("datatype"))
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = binary[offset : offset + size]
            offset += size
            if len(chunk) != size:
                raise UpstreamBadGateway(f"{what}: binary data for '{t.get('name')}' truncated")
            if datatype == "BYTES":
                data: list[Any] = _decode_bytes(chunk, _element_count(shape))
            elif datatype in NUMPY_DTYPES:
                data = np.frombuffer(chunk, dtype=NUMPY_DTYPES[datatype]).tolist()
            else:  # BF16 has no numpy dtype: keep the raw 16-bit patterns
                data = np.frombuffer(chunk, dtype="<u2").tolist()
        else:
            data = flatten(t.get("data", []))
        out[str(t.get("name"))] = {"datatype": datatype, "shape": shape, "data": data}
    return out


def decode_inputs(request: InferRequest) -> dict[str, Tensor]:
    """Inputs as named flat tensors, for the log (runs in the background record task)."""
    binary = request.body[request.header_length :] if request.header_length is not None else b""
    return _decode_tensors(request.inputs, binary, "request")


def decode_response(body: bytes, header_length: str | None) -> dict[str, Any]:
    """Split a Triton response into its JSON header and decoded outputs."""
    if header_length is not None:
        length = int(header_length)
        header = orjson.loads(body[:length])
        binary = body[length:]
    else:
        header = orjson.loads(body)
        binary = b""
    header["outputs"] = _decode_tensors(header.get("outputs") or [], binary, "response")
    return header


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
