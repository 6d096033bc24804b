"""Coalesce shadow copies into one Triton request, and split the answer back (pure, no I/O).

Why: Triton's CPU cost per row falls ~5-8x between 1-row and 8-16-row requests, and every
upstream call costs the gateway's single event loop a fixed slice. A shadow lane therefore sends
several compatible copies as one request (rows concatenated along dim 0) and hands each copy its
own rows of the answer.

Only requests that provably mean the same thing when stacked are combined: same format (all
JSON or all binary), same inputs in the same order with the same datatypes and the same dims
after dim 0, the same requested outputs and the same request parameters, and nothing stateful
(sequence ids) or out of band (shared memory). Anything else gets `None` from
`batch_signature`, or `IncompatibleBatch` from `combine` / `split_outputs`: never a guess.
Valid only for models whose Triton config has `max_batch_size > 0` (dim 0 is the batch dim);
the caller checks that.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.dataplane.protocol import InferRequest, flatten
from understudy.records import Tensor

# Request parameters that tie a request to server-side state: stacking them would be wrong.
_STATEFUL_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end"})
_JSON = "application/json"
_BINARY = "application/octet-stream"


class IncompatibleBatch(ValueError):
    """The requests (or a response) cannot be combined (or split) without changing meaning."""


@dataclass(frozen=True, slots=True)
class CombinedRequest:
    """One Triton request body carrying several requests' rows, in order."""

    body: bytes
    content_type: str
    header_length: int | None  # None: JSON body
    rows: tuple[int, ...]  # rows contributed by each original request, in order


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def batch_signature(request: InferRequest) -> tuple[Hashable, int] | None:
    """(compatibility key, rows) of a request, or None when it must travel alone.

    Two requests may share a batch exactly when their keys are equal; rows is dim 0.
    """
    # Every shadow copy is looked at here: the common request (no parameters, JSON or binary
    # inputs) takes the fewest steps.
    header = request.header
    binary = request.header_length is not None
    parameters = header.get("parameters")
    if parameters and (not isinstance(parameters, dict)
                       or not _STATEFUL_PARAMETERS.isdisjoint(parameters)):
        return None
    rows: int | None = None
    inputs: list[tuple[str, str, tuple[int, ...]]] = []
    for tensor in request.inputs:
        shape = tensor["shape"]
        if not shape or shape[0] < 1 or (rows is not None and shape[0] != rows):
            return None  # no batch dim, or inputs that disagree on it
        rows = shape[0]
        extra = tensor.get("parameters")
        if extra:  # binary_data_size is the one per-tensor parameter that stacks
            if len(extra) > 1 or "binary_data_size" not in extra:
                return None  # shared memory or other per-tensor options
            has_binary = extra["binary_data_size"] is not None
        else:
            has_binary = False
        if has_binary != binary or (not binary and "data" not in tensor):
            return None  # mixed JSON/binary inputs
        inputs.append((tensor["name"], tensor["datatype"], tuple(shape[1:])))
    if rows is None:
        return None
    outputs = header.get("outputs")
    key = (binary, tuple(inputs), _canonical(outputs) if outputs is not None else b"",
           _canonical(parameters) if parameters else b"")
    return key, rows


def _binary_chunks(request: InferRequest) -> list[bytes]:
    """Each input's raw tensor bytes, in input order."""
    if request.header_length is None:
        raise IncompatibleBatch("not a binary request")
    offset = request.header_length
    chunks: list[bytes] = []
    for tensor in request.inputs:
        size = tensor["parameters"]["binary_data_size"]
        chunks.append(request.body[offset : offset + size])
        offset += size
    if offset != len(request.body):
        raise IncompatibleBatch(f"binary payload is {len(request.body) - request.header_length} "
                                f"bytes, inputs declare {offset - request.header_length}")
    return chunks


def combine(
    requests: Sequence[InferRequest],
    max_rows: int | None = None,
    signatures: Sequence[tuple[Hashable, int] | None] | None = None,
) -> CombinedRequest:
    """One request whose inputs are the given requests' inputs stacked along dim 0, in order.

    `signatures`: the requests' `batch_signature`s when the caller already has them.
    """
    if not requests:
        raise IncompatibleBatch("nothing to combine")
    if signatures is None:
        signatures = [batch_signature(r) for r in requests]
    key = signatures[0][0] if signatures[0] is not None else None
    rows_of: list[int] = []
    for signature in signatures:
        if signature is None or signature[0] != key:
            raise IncompatibleBatch("requests differ in format, inputs, outputs or parameters")
        rows_of.append(signature[1])
    rows = tuple(rows_of)
    total = sum(rows)
    if max_rows is not None and total > max_rows:
        raise IncompatibleBatch(f"{total} rows exceed the limit of {max_rows}")
    template = requests[0].header
    binary = requests[0].header_length is not None
    chunks = [_binary_chunks(r) for r in requests] if binary else []
    inputs: list[dict[str, Any]] = []
    for i, tensor in enumerate(requests[0].inputs):
        combined: dict[str, Any] = {"name": tensor["name"], "datatype": tensor["datatype"],
                                    "shape": [total, *tensor["shape"][1:]]}
        if binary:
            combined["parameters"] = {
                "binary_data_size": sum(len(parts[i]) for parts in chunks)
            }
        else:
            name = tensor["name"]  # validation already flattened each copy's data
            combined["data"] = [x for r in requests
                                for x in r.flat.get(name) or flatten(r.inputs[i]["data"])]
        inputs.append(combined)
    header: dict[str, Any] = {"inputs": inputs}
    for key in ("outputs", "parameters"):
        if template.get(key) is not None:
            header[key] = template[key]
    raw = orjson.dumps(header)
    if not binary:
        return CombinedRequest(raw, _JSON, None, rows)
    # Binary data follows the header input by input: all of input 0's rows, then input 1's...
    payload = b"".join(parts[i] for i in range(len(inputs)) for parts in chunks)
    return CombinedRequest(raw + payload, _BINARY, len(raw), rows)


def split_outputs(
    outputs: Mapping[str, Tensor], rows: Sequence[int]
) -> list[dict[str, Tensor]]:
    """Cut a combined answer (decoded, flat data) into each request's outputs, in order.

    Each output must have dim 0 equal to the total rows; a request gets its own rows with
    shape[0] set to its row count.
    """
    total = sum(rows)
    parts: list[dict[str, Tensor]] = [{} for _ in rows]
    for name, tensor in outputs.items():
        shape = list(tensor["shape"])
        if not shape or shape[0] != total:
            raise IncompatibleBatch(f"output '{name}' has shape {shape}, expected dim 0 = {total}")
        row_size = math.prod(shape[1:])
        data = tensor["data"]
        if len(data) != total * row_size:
            raise IncompatibleBatch(
                f"output '{name}' has {len(data)} elements, shape {shape} needs {total * row_size}"
            )
        offset = 0
        for part, n in zip(parts, rows, strict=True):
            part[name] = {"datatype": tensor["datatype"], "shape": [n, *shape[1:]],
                          "data": data[offset * row_size : (offset + n) * row_size]}
            offset += n
    return parts
