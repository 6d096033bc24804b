"""Calling Triton over gRPC: KServe V2 HTTP bodies <-> `ModelInferRequest`/`ModelInferResponse`.

The core (gateway/dataplane/service.py, gateway/mirror/shadow.py, gateway/mirror/batching.py) works
on KServe V2 HTTP
bodies whatever the upstream protocol. For a Triton configured with `protocol: grpc` the body is
converted here to a `ModelInferRequest` (every input travels in `raw_input_contents`), sent on
one `grpc.aio` channel per server, and the answer converted back to exactly the HTTP form the
client asked for: JSON `data` or binary outputs per `binary_data` / `binary_data_output`. So
micro-batched shadow copies work unchanged over gRPC (the combined body is converted like any
other). Errors map as Triton's own HTTP front end maps them (gateway/errors.py types).
"""

from __future__ import annotations

import struct
import time
from typing import Any, cast

import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.dataplane.protocol import NUMPY_DTYPES, flatten
from gateway.errors import (
    BadRequest,
    GatewayError,
    UpstreamBadGateway,
    UpstreamClientError,
    unknown_model,
    upstream_timeout,
    upstream_unreachable,
)
from gateway.rpc.codec import encode_tensor, parameter_value, set_parameter

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# gRPC status -> the HTTP status Triton's HTTP front end answers for the same error.
_CLIENT_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNIMPLEMENTED: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
}


def to_infer_request(model: str, version: str, body: bytes, header_length: int | None
                     ) -> tuple[service_pb2.ModelInferRequest, dict[str, bool], bool]:
    """`body` (JSON or binary-extension V2) as a `ModelInferRequest`, plus which outputs the
    client wants in binary (by name) and the default for the others."""
    length = len(body) if header_length is None else header_length
    try:
        header = orjson.loads(body[:length])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    if header.get("id") not in (None, ""):
        request.id = str(header["id"])
    params = dict(header.get("parameters") or {})
    binary_default = bool(params.pop("binary_data_output", False))
    for key, value in params.items():
        set_parameter(request.parameters[key], value)
    offset = length
    for tensor in header.get("inputs") or []:
        name, datatype = str(tensor["name"]), str(tensor["datatype"])
        tparams = dict(tensor.get("parameters") or {})
        size = tparams.pop("binary_data_size", None)
        if size is not None:
            chunk = body[offset : offset + size]
            offset += size
        else:
            chunk = encode_tensor(datatype, flatten(tensor.get("data", [])), name)
        entry = request.inputs.add(name=name, datatype=datatype,
                                   shape=[int(d) for d in tensor["shape"]])
        for key, value in tparams.items():
            set_parameter(entry.parameters[key], value)
        request.raw_input_contents.append(chunk)
    binary: dict[str, bool] = {}
    for out in header.get("outputs") or []:
        oparams = dict(out.get("parameters") or {})
        binary[str(out["name"])] = bool(oparams.pop("binary_data", binary_default))
        entry = request.outputs.add(name=str(out["name"]))
        for key, value in oparams.items():
            set_parameter(entry.parameters[key], value)
    return request, binary, binary_default


def _json_data(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            (n,) = struct.unpack_from("<I", raw, pos)
            items.append(raw[pos + 4 : pos + 4 + n].decode("utf-8", "replace"))
            pos += 4 + n
        return items
    values: list[Any] = np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]).tolist()
    return values


def from_infer_response(response: service_pb2.ModelInferResponse, binary: dict[str, bool],
                        binary_default: bool) -> tuple[bytes, str, str | None]:
    """The HTTP answer Triton would have given: body, content type, header length (binary)."""
    header: dict[str, Any] = {"model_name": response.model_name,
                              "model_version": response.model_version}
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = {k: parameter_value(v) for k, v in response.parameters.items()}
    outputs, chunks = [], []
    raws = response.raw_output_contents
    for i, out in enumerate(response.outputs):
        raw = raws[i] if i < len(raws) else b""
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": list(out.shape)}
        params = {k: parameter_value(v) for k, v in out.parameters.items()}
        if binary.get(out.name, binary_default):
            params["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            try:
                entry["data"] = _json_data(out.datatype, raw)
            except (KeyError, ValueError, struct.error) as exc:
                raise UpstreamBadGateway(f"output '{out.name}' is malformed: {exc}") from None
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    header["outputs"] = outputs
    head = orjson.dumps(header)
    if not chunks:
        return head, "application/json", None
    return head + b"".join(chunks), "application/octet-stream", str(len(head))


_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                          FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                          FieldDescriptor.TYPE_SFIXED64})


def protobuf_json(message: Message) -> dict[str, Any]:
    """`message` in the JSON form Triton's HTTP API gives it: every field printed, 64-bit
    integers as numbers (protobuf's JSON mapping would quote them, e.g. `dims: ["8"]`)."""
    raw = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    # The C (upb) implementation's descriptor has the same interface as the Python one.
    return _int64_as_numbers(cast(Descriptor, message.DESCRIPTOR), raw)


def _int64_as_numbers(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            continue
        if field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                inner = sub.fields_by_name["value"]
                for key, item in value.items():
                    if inner.type in _INT64_TYPES:
                        value[key] = int(item)
                    elif inner.message_type is not None:
                        _int64_as_numbers(inner.message_type, item)
            elif isinstance(value, list):
                for item in value:
                    _int64_as_numbers(sub, item)
            elif isinstance(value, dict):
                _int64_as_numbers(sub, value)
    return data


class GrpcServer:
    """One Triton's gRPC endpoint: a lazily opened `grpc.aio` channel (HTTP/2 multiplexes every
    call on it, so it is the pool) and the stub."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None

    @property
    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ])
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def _error(self, exc: grpc.aio.AioRpcError, what: str, timeout_s: float) -> GatewayError:
        code, detail = exc.code(), exc.details() or str(exc.code())
        if code in _CLIENT_STATUS:
            return UpstreamClientError(detail, _CLIENT_STATUS[code])
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return upstream_timeout(what, timeout_s)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.CANCELLED):
            return upstream_unreachable(what, self.target, detail)
        return UpstreamBadGateway(f"{what} failed: {detail}")

    async def infer(self, model: str, version: str, body: bytes, header_length: int | None,
                    timeout_s: float) -> tuple[bytes, str, str | None, float]:
        """The call's HTTP-form answer and its own time (request sent -> answer received)."""
        request, binary, binary_default = to_infer_request(model, version, body, header_length)
        stub = self.stub
        started = time.perf_counter()
        try:
            response = await stub.ModelInfer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, f"model '{model}'", timeout_s) from None
        latency = time.perf_counter() - started
        body_out, content_type, length = from_infer_response(response, binary, binary_default)
        return body_out, content_type, length, latency

    async def _unary(self, method: str, request: Any, what: str, timeout_s: float) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, what, timeout_s) from None

    async def model_json(self, kind: str, model: str, version: str, timeout_s: float
                         ) -> dict[str, Any]:
        """Metadata, config or statistics in the JSON shape Triton's HTTP API answers."""
        try:
            if kind == "metadata":
                meta = await self._unary("ModelMetadata", service_pb2.ModelMetadataRequest(
                    name=model, version=version), f"model '{model}'", timeout_s)
                return {
                    "name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                    "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                               for t in meta.inputs],
                    "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                                for t in meta.outputs],
                }
            if kind == "config":
                answer = await self._unary("ModelConfig", service_pb2.ModelConfigRequest(
                    name=model, version=version), f"model '{model}'", timeout_s)
                message = answer.config
            else:
                message = await self._unary("ModelStatistics", service_pb2.ModelStatisticsRequest(
                    name=model, version=version), f"model '{model}'", timeout_s)
        except UpstreamClientError as exc:
            raise unknown_model(model, version, exc.message) from None
        return protobuf_json(message)

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        try:
            answer = await self._unary("ModelReady", service_pb2.ModelReadyRequest(
                name=model, version=version), f"model '{model}'", timeout_s)
        except GatewayError:
            return False
        return bool(answer.ready)

    async def server_ready(self, timeout_s: float) -> bool:
        try:
            answer = await self._unary("ServerReady", service_pb2.ServerReadyRequest(),
                                       "server readiness", timeout_s)
        except GatewayError:
            return False
        return bool(answer.ready)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None
