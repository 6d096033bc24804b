"""KServe V2 / Triton HTTP wire format: parse and validate requests, decode responses.

The gateway forwards the client's body bytes to Triton unchanged (no re-encoding on the hot
path); it parses only what it needs to route and validate: the JSON header (all of a JSON
request, or the first `Inference-Header-Content-Length` bytes of a binary one). Turning tensors
into lists for the log happens later, off the client's critical path (`log_inputs`,
`decode_response`).

Validation is complete before any upstream call: whatever `parse_request` accepts, Triton can
refuse only for model-specific reasons (a 4xx it passes through), never with a 500 for a malformed
body, and the log can always record it as a well-typed record (understudy/record_schema.py). Every
client mistake is a `BadRequest` naming the field. What is checked, and why each rule exists
(what Triton 2.51 does without it), is in the comments below and tests/unit/test_protocol.py.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from gateway.errors import BadRequest, UpstreamBadGateway
from understudy.records import (
    DATATYPES,
    INT_RANGES,
    JSON_TYPE_NAMES,
    MAX_ID_LENGTH,
    Tensor,
    TensorText,
    request_id_problem,
    type_name,
)

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
assert frozenset([*DATATYPE_SIZES, "BYTES"]) == DATATYPES  # the record contract's datatypes


# JSON `data` element types per datatype. Triton answers a wrong element type with a 500 (it
# blames itself), so the gateway checks them first. FP16/BF16 have no JSON form in Triton.
_FLOAT_TYPES: frozenset[type] = frozenset([int, float])
_INT_TYPES: frozenset[type] = frozenset([int])
JSON_ELEMENT_TYPES: dict[str, frozenset[type]] = {
    **dict.fromkeys(("FP32", "FP64"), _FLOAT_TYPES),
    **dict.fromkeys(("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"),
                    _INT_TYPES),
    "BOOL": frozenset([bool]),
    "BYTES": frozenset([str]),
}

MAX_RANK = 32  # dimensions of one tensor (Triton's own limit is far above any real model)
MAX_DIM = 2**63 - 1  # Triton keeps dims and byte sizes in int64 (a larger dim aborts it)
_UINT64_MAX = 2**64 - 1

# Parameters Triton reads with a fixed type (a wrong one is a Triton 500). "uint": a
# non-negative integer; "uint|str": either. Other keys take any scalar.
_REQUEST_PARAMETERS = {"sequence_id": "uint|str", "sequence_start": "bool",
                       "sequence_end": "bool", "priority": "uint", "timeout": "uint",
                       "binary_data_output": "bool"}
_INPUT_PARAMETERS = {"binary_data_size": "uint", "shared_memory_region": "str",
                     "shared_memory_byte_size": "uint", "shared_memory_offset": "uint"}
_OUTPUT_PARAMETERS = {"binary_data": "bool", "classification": "uint",
                      "shared_memory_region": "str", "shared_memory_byte_size": "uint",
                      "shared_memory_offset": "uint"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input as Triton's metadata declares it; -1 is a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class InferRequest:
    """The parts of a client request the gateway needs, plus the untouched body to forward.

    `flat` holds each JSON input's data as the flat list validation produced, so the log does
    not walk nested data a second time.
    """

    body: bytes
    header: dict[str, Any]
    header_length: int | None  # None: a pure JSON request
    flat: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def id(self) -> str | None:
        value = self.header.get("id")
        return value if isinstance(value, str) and value else None

    @property
    def inputs(self) -> list[dict[str, Any]]:
        inputs: list[dict[str, Any]] = self.header["inputs"]
        return inputs

    @property
    def content_type(self) -> str:
        return "application/octet-stream" if self.header_length is not None else "application/json"


def check_key(value: str, what: str) -> str:
    """A sticky/sampling key header: it is hashed (as UTF-8) and logged, so it must encode.

    aiohttp hands over header bytes that are not UTF-8 as lone surrogates, which neither the
    hash nor the log's JSON encoder accept (a 500 and a lost record before this check).
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid UTF-8") from None
    if len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise BadRequest(f"{what} must be at most {MAX_ID_LENGTH} printable characters")
    return value


def check_request_id(value: Any, what: str) -> str:
    """`value` if it is a usable request id, else BadRequest naming `what`."""
    problem = request_id_problem(value)
    if problem is not None:
        raise BadRequest(f"{what} {problem}")
    checked: str = value
    return checked


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
    """Parse a JSON or binary-extension request and check everything Triton would choke on.

    After this passes, Triton can only refuse the request for model-specific reasons (a 4xx),
    and the log can always decode it. A binary request's tensor bytes are not read, except the
    length prefixes of BYTES tensors.
    """
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > 18:
            raise BadRequest(f"{HEADER_LENGTH} must be a decimal byte count, got "
                             f"{header_length[:40]!r}")
        length = int(header_length)
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
    _check_header(request.header)
    _check_inputs(request)
    return request


def _check_header(header: dict[str, Any]) -> None:
    """The top-level fields besides `inputs`: `id`, `parameters`, `outputs`."""
    if "id" in header and header["id"] != "":
        check_request_id(header["id"], "'id'")
    if "parameters" in header:
        _check_parameters(header["parameters"], "'parameters'", _REQUEST_PARAMETERS)
    if "outputs" in header:
        outputs = header["outputs"]
        if not isinstance(outputs, list):
            raise BadRequest(f"'outputs' must be a list of objects, got {type_name(outputs)}")
        for i, output in enumerate(outputs):
            _tensor_name(output, "outputs", i)
            if "parameters" in output and output["parameters"] is not None:
                _check_parameters(output["parameters"], f"outputs[{i}].parameters",
                                  _OUTPUT_PARAMETERS)


def _tensor_name(entry: Any, key: str, i: int) -> str:
    """The name of `key[i]` (an input or a requested output): an object with a non-empty
    string `name`, which is how errors, routing and the log refer to it."""
    if not isinstance(entry, dict):
        raise BadRequest(f"{key}[{i}] must be an object, got {type_name(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{key}[{i}].name must be a non-empty string")
    return name


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _UINT64_MAX


# What each parameter kind accepts, and how the error message names it.
_PARAMETER_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "uint": (_is_uint, "a non-negative integer"),
    "bool": (lambda v: type(v) is bool, "a boolean"),
    "str": (lambda v: type(v) is str, "a string"),
    "uint|str": (lambda v: type(v) is str or _is_uint(v), "a non-negative integer or a string"),
}


def _check_parameters(params: Any, what: str, typed: Mapping[str, str]) -> None:
    """A parameters object: scalar values, and the keys Triton reads with their types."""
    if not isinstance(params, dict):
        raise BadRequest(f"{what} must be an object, got {type_name(params)}")
    for key, value in params.items():
        kind = typed.get(key)
        if kind is None:
            if not isinstance(value, str | int | float):  # bool is an int
                raise BadRequest(f"{what}.{key} must be a string, number or boolean, "
                                 f"got {type_name(value)}")
            continue
        accepts, want = _PARAMETER_KINDS[kind]
        if not accepts(value):
            raise BadRequest(f"{what}.{key} must be {want}, got {value!r:.40}")


def _check_shape(shape: Any, name: str) -> int:
    """The element count of a valid shape (non-negative int64 dims, bounded rank)."""
    valid = isinstance(shape, list) and len(shape) <= MAX_RANK
    if valid:
        for d in shape:  # a loop, not all(<generator>): shapes are short, and this is per input
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                valid = False
                break
    if not valid:
        raise BadRequest(
            f"input '{name}': 'shape' must be a list of at most {MAX_RANK} integers in "
            f"[0, 2^63-1], got {shape!r:.80}"
        )
    count: int = math.prod(shape)
    if count > MAX_DIM:
        raise BadRequest(f"input '{name}': shape {shape} has more than 2^63-1 elements")
    return count


def _flat_data(data: Any, rank: int, name: str) -> list[Any]:
    """`data` (flat or nested row-major, never deeper than the shape) as one flat list.

    Iterative, one level at a time with C-speed chaining: a hostile nesting depth costs one
    step before it is refused, never a recursion.
    """
    if not isinstance(data, list):
        raise BadRequest(f"input '{name}': 'data' must be a list, got {type_name(data)}")
    flat = data
    depth = 1
    while flat and type(flat[0]) is list:
        if depth >= rank:
            raise BadRequest(f"input '{name}': 'data' is nested deeper than its "
                             f"{rank}-dimensional shape")
        if set(map(type, flat)) != {list}:
            raise BadRequest(f"input '{name}': 'data' mixes lists and values at one level")
        flat = list(itertools.chain.from_iterable(flat))
        depth += 1
    return flat


def _check_elements(flat: list[Any], datatype: str, name: str) -> None:
    """Every element has the JSON type the datatype needs, integers within its range."""
    allowed = JSON_ELEMENT_TYPES.get(datatype)
    if allowed is None:
        raise BadRequest(f"input '{name}': {datatype} data cannot be sent as JSON; use the "
                         f"binary tensor extension ({HEADER_LENGTH})")
    types = frozenset(map(type, flat))
    if not types <= allowed:
        bad = next(x for x in flat if type(x) not in allowed)
        if isinstance(bad, list):
            raise BadRequest(f"input '{name}': 'data' mixes lists and values at one level")
        want = " or ".join(sorted(JSON_TYPE_NAMES[t] for t in allowed))
        raise BadRequest(f"input '{name}': {datatype} data must hold {want} elements, got "
                         f"{type_name(bad)} {bad!r:.40}")
    bounds = INT_RANGES.get(datatype)
    if bounds is not None and flat:
        low, high = min(flat), max(flat)
        if low < bounds[0] or high > bounds[1]:
            raise BadRequest(f"input '{name}': {datatype} data must lie in "
                             f"[{bounds[0]}, {bounds[1]}], got {low if low < bounds[0] else high}")


def _check_bytes_payload(chunk: memoryview, count: int, name: str) -> None:
    """A binary BYTES tensor: `count` length-prefixed elements filling the chunk exactly."""
    size = len(chunk)
    if count * 4 > size:
        raise BadRequest(f"input '{name}': {count} BYTES elements need at least {count * 4} "
                         f"bytes of length prefixes, binary_data_size is {size}")
    offset = 0
    for _ in range(count):
        if offset + 4 > size:
            break
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4 + length
    if offset != size:
        raise BadRequest(f"input '{name}': binary BYTES data does not hold exactly {count} "
                         f"length-prefixed elements in {size} bytes")


def check_datatype(name: str, datatype: object) -> str:
    """An input's KServe V2 datatype, or the 400 naming the input and the accepted ones (the
    HTTP and gRPC front ends refuse alike)."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"input '{name}': 'datatype' must be one of "
                         f"{', '.join(sorted(DATATYPES))}, got {datatype!r:.40}")
    return datatype


def _check_inputs(request: InferRequest) -> None:
    inputs = request.header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    binary = request.header_length is not None
    binary_total = 0
    byte_tensors: list[tuple[str, int, int, int]] = []  # name, offset, size, count
    seen: set[str] = set()
    for i, tensor in enumerate(inputs):
        name = _tensor_name(tensor, "inputs", i)
        if name in seen:
            raise BadRequest(f"input '{name}' is given twice")
        seen.add(name)
        datatype = check_datatype(name, tensor.get("datatype"))
        shape: Any = tensor.get("shape")
        count = _check_shape(shape, name)
        params = tensor.get("parameters")
        if params is not None:
            _check_parameters(params, f"input '{name}': parameters", _INPUT_PARAMETERS)
        binary_size = params.get("binary_data_size") if params else None
        if binary_size is not None:
            if not binary:
                raise BadRequest(
                    f"input '{name}' has binary_data_size but the request has no "
                    f"{HEADER_LENGTH} header"
                )
            if "data" in tensor:
                raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
            size = DATATYPE_SIZES.get(datatype)
            if size is not None and binary_size != count * size:
                raise BadRequest(
                    f"input '{name}': binary_data_size is {binary_size} bytes but shape "
                    f"{shape} of {datatype} needs {count * size}"
                )
            if size is None:
                byte_tensors.append((name, binary_total, binary_size, count))
            binary_total += binary_size
        elif "data" in tensor:
            flat = _flat_data(tensor["data"], len(shape), name)
            if len(flat) != count:
                raise BadRequest(
                    f"input '{name}': shape {shape} needs {count} elements, 'data' has "
                    f"{len(flat)}"
                )
            _check_elements(flat, datatype, name)
            request.flat[name] = flat
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
    if binary:
        available = len(request.body) - request.header_length  # type: ignore[operator]
        if available != binary_total:
            raise BadRequest(
                f"binary payload is {available} bytes but the inputs declare {binary_total}"
                + (" (truncated body?)" if available < binary_total else "")
            )
        if byte_tensors:
            payload = memoryview(request.body)[request.header_length :]
            for name, offset, size, count in byte_tensors:
                _check_bytes_payload(payload[offset : offset + size], count, name)


def validate_against(request: InferRequest, model: str, specs: Sequence[TensorSpec]) -> None:
    """Check input names, datatypes and shapes against the model's metadata, naming the problem.

    Done in the gateway (not left to Triton) so that a bad request is never mirrored to the
    challengers and the client gets one clear message.
    """
    inputs = request.inputs
    # The common case, checked without building sets: the request names the model's inputs in
    # the model's order (names are unique, `_check_inputs` saw to it), so none is unknown or
    # missing and each tensor's spec is the one beside it.
    in_order = len(inputs) == len(specs)
    if in_order:
        for tensor, spec in zip(inputs, specs, strict=True):
            if tensor["name"] != spec.name:
                in_order = False
                break
    pairs: Iterable[tuple[dict[str, Any], TensorSpec]]
    if in_order:
        pairs = zip(inputs, specs, strict=True)
    else:
        by_name = {s.name: s for s in specs}
        given = {t["name"] for t in inputs}
        unknown = sorted(given - by_name.keys())
        if unknown:
            raise BadRequest(
                f"unexpected input(s) {', '.join(map(repr, unknown))} for model '{model}'; "
                f"expected {', '.join(map(repr, by_name))}"
            )
        missing = sorted(by_name.keys() - given)
        if missing:
            raise BadRequest(
                f"missing input(s) {', '.join(map(repr, missing))} for model '{model}'")
        pairs = [(tensor, by_name[tensor["name"]]) for tensor in inputs]
    for tensor, spec in pairs:
        if tensor["datatype"] != spec.datatype:
            raise BadRequest(
                f"input '{spec.name}': datatype {tensor['datatype']} does not match "
                f"model '{model}' which expects {spec.datatype}"
            )
        shape = tensor["shape"]
        want = spec.shape
        fits = len(shape) == len(want)
        if fits:
            for got, dim in zip(shape, want, strict=True):
                if dim != -1 and got != dim:
                    fits = False
                    break
        if not fits:
            raise BadRequest(
                f"input '{spec.name}': shape {list(shape)} does not match model '{model}' "
                f"which expects {list(want)} (-1 = any)"
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


def _binary_list(chunk: bytes, datatype: str, count: int) -> list[Any]:
    """A binary tensor's elements as Python values (BF16: its raw 16-bit patterns, as numpy
    has no bfloat16)."""
    if datatype == "BYTES":
        return _decode_bytes(chunk, count)
    values: list[Any] = np.frombuffer(chunk, dtype=NUMPY_DTYPES.get(datatype, "<u2")).tolist()
    return values


# A binary input of at least this many elements is logged as the JSON text of its elements
# written straight from its bytes (`orjson.Fragment`), never as Python objects: the very text
# `_binary_list` + orjson would give, for about half the CPU at 512 FP32 elements and a third at
# 512 integers; below ~64 elements the list is cheaper (loadtests/bench_recorder.py).
LOG_TEXT_MIN_ELEMENTS = 64
_FP32_EXPONENT = np.uint32(0x7F800000)


def _binary_log_data(chunk: bytes, datatype: str, count: int) -> list[Any] | orjson.Fragment:
    """A binary tensor's elements as the log writes them: the list, or its JSON text."""
    if datatype == "BYTES" or count < LOG_TEXT_MIN_ELEMENTS:
        return _binary_list(chunk, datatype, count)
    array = np.frombuffer(chunk, dtype=NUMPY_DTYPES.get(datatype, "<u2"))
    if datatype == "FP32":
        # A signalling NaN would make the cast below warn (FE_INVALID); NaN and infinities are
        # null in the log either way, so every value whose exponent is all ones becomes NaN.
        bits = np.frombuffer(chunk, dtype="<u4")
        special = (bits & _FP32_EXPONENT) == _FP32_EXPONENT
        if special.any():
            array = np.where(special, np.float32("nan"), array)
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
        # orjson writes a float32's shortest text, not its double's (what the list holds)
        array = array.astype("<f8")
    # NaN and infinities become null, as they do from the list
    return orjson.Fragment(orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY))


def _decode_tensors(
    tensors: Sequence[Mapping[str, Any]], binary: bytes, what: str,
    flat: Mapping[str, list[Any]] | None = None,
    binary_data: Callable[[bytes, str, int], list[Any] | orjson.Fragment] = _binary_list,
) -> dict[str, Any]:
    """Named flat tensors (`binary_data` turns binary chunks into their data). Binary floats
    that are NaN or infinite become null in the JSON log (JSON has no such numbers); `flat`:
    JSON data already flattened by validation.

    Runs for every record (its inputs and each answer it decodes), so the common cases cost no
    calls beyond the lookups: `map` rather than a comprehension (a function call in Python
    3.11), and JSON data that is already flat (what Triton writes) is taken as it is."""
    out: dict[str, Any] = {}
    offset = 0
    for t in tensors:
        name: Any = t.get("name")
        shape = list(map(int, t.get("shape", [])))
        datatype = str(t.get("datatype"))
        params = t.get("parameters")
        size = params.get("binary_data_size") if params else None
        if size is not None:
            chunk = binary[offset : offset + size]
            offset += size
            if len(chunk) != size:
                raise UpstreamBadGateway(f"{what}: binary data for '{name}' truncated")
            data: list[Any] | orjson.Fragment = binary_data(chunk, datatype, math.prod(shape))
        elif flat is not None and name in flat:
            data = flat[name]
        else:
            data = t.get("data", [])
            # JSON parsers give exact lists: only nested (or scalar) data needs `flatten`
            if type(data) is not list or (data and type(data[0]) is list):
                data = flatten(data)
        out[str(name)] = {"datatype": datatype, "shape": shape, "data": data}
    return out


def _request_binary(request: InferRequest) -> bytes:
    return request.body[request.header_length :] if request.header_length is not None else b""


def decode_inputs(request: InferRequest) -> dict[str, Tensor]:
    """Inputs as named flat tensors of Python values."""
    return _decode_tensors(request.inputs, _request_binary(request), "request", request.flat)


def log_inputs(request: InferRequest) -> dict[str, Tensor | TensorText]:
    """Inputs as the log record holds them (runs in the background record task): large binary
    tensors as their elements' JSON text, never decoded to Python objects (nothing in the
    gateway reads a logged input), the others as `decode_inputs` gives them."""
    return _decode_tensors(request.header["inputs"], _request_binary(request), "request",
                           request.flat, _binary_log_data)


def decode_response(body: bytes, header_length: str | None) -> dict[str, Any]:
    """Split a Triton response into its JSON header and decoded outputs.

    Triton writes non-finite floats as NaN/Infinity (not JSON, but what tritonclient's
    rapidjson accepts) and BYTES outputs as raw bytes (not always UTF-8); orjson refuses both,
    so the header falls back to the stdlib parser on the text with undecodable bytes replaced
    (as binary BYTES tensors are), and float('nan') becomes null in the log."""
    length = None if header_length is None else int(header_length)
    raw = body if length is None else body[:length]
    try:
        header: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError:
        header = json.loads(raw.decode("utf-8", "replace"))
    header["outputs"] = _decode_tensors(header.get("outputs") or [],
                                        b"" if length is None else body[length:], "response")
    return header


def error_body(message: str) -> bytes:
    """`{"error": message}`. A message quoting a client's undecodable bytes (a URL path or
    header with invalid UTF-8 arrives as lone surrogates) is escaped rather than failing."""
    try:
        return orjson.dumps({"error": message})
    except orjson.JSONEncodeError:
        return orjson.dumps({"error": message.encode("utf-8", "backslashreplace").decode()})
