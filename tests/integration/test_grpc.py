"""The gRPC service through the real path: tritonclient.grpc (sync and aio), unchanged, against
the gateway in front of a real Triton, compared with the same client talking to Triton directly.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.rpc.server import READY_SERVICE
from tests.conftest import GatewayFactory, GatewayHandle
from understudy_demo.traffic import FraudTraffic

pytestmark = pytest.mark.triton

FRAUD = {"fraud": {"champion": {"model": "fraud_v3"}, "challengers": [
    {"model": "fraud_v4", "sample_rate": 1.0, "timeout_ms": 30_000}]}}
TYPED = {"typed": {"champion": {"model": "typed_echo"}}}


def _rows(n: int, seed: int = 3) -> np.ndarray:
    x, _ = FraudTraffic(seed=seed).sample(n)
    return np.asarray(x, dtype=np.float32)


def _infer(target: str, model: str, x: np.ndarray, request_id: str = "") -> np.ndarray:
    """tritonclient.grpc's sync client, as a user calls it (raw_input_contents)."""
    client = grpcclient.InferenceServerClient(target)
    try:
        features = grpcclient.InferInput("features", list(x.shape), "FP32")
        features.set_data_from_numpy(x)
        result = client.infer(model, [features], request_id=request_id)
        return result.as_numpy("score")
    finally:
        client.close()


async def _gateway(make_gateway: GatewayFactory, routes: dict[str, Any]) -> GatewayHandle:
    gw = await make_gateway(routes, grpc=True)
    assert gw.grpc_target is not None
    return gw


async def test_infer_raw_matches_direct_triton(triton: Any, make_gateway: GatewayFactory
                                               ) -> None:
    gw = await _gateway(make_gateway, FRAUD)
    x = _rows(4)
    through = await asyncio.to_thread(_infer, gw.grpc_target, "fraud", x)
    direct = await asyncio.to_thread(_infer, triton.grpc_url, "fraud_v3", x)
    assert through.shape == (4, 1)
    np.testing.assert_array_equal(through, direct)


def _typed_request(model: str, request_id: str) -> service_pb2.ModelInferRequest:
    """Every datatype family of typed_echo in the typed `contents` fields, none raw."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensors: list[tuple[str, str, str, list[Any]]] = [
        ("f32", "FP32", "fp32_contents", [1.5, -2.25, 3.0]),
        ("f64", "FP64", "fp64_contents", [0.1, 1e300]),
        ("i8", "INT8", "int_contents", [-128, 127]),
        ("u16", "UINT16", "uint_contents", [0, 65535]),
        ("i64", "INT64", "int64_contents", [-(2**63), 2**63 - 1]),
        ("u64", "UINT64", "uint64_contents", [2**64 - 1]),
        ("b", "BOOL", "bool_contents", [True, False, True]),
        ("s", "BYTES", "bytes_contents", [b"hello", "h\u00e9".encode(), b""]),
    ]
    for name, datatype, field, values in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        getattr(tensor.contents, field).extend(values)
    return request


async def test_typed_contents_match_direct_triton(triton: Any, make_gateway: GatewayFactory
                                                  ) -> None:
    gw = await _gateway(make_gateway, TYPED)

    async def call(target: str, model: str) -> service_pb2.ModelInferResponse:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return await stub.ModelInfer(_typed_request(model, "typed-1"))

    through = await call(gw.grpc_target, "typed")
    direct = await call(triton.grpc_url, "typed_echo")
    assert [o.name for o in through.outputs] == [o.name for o in direct.outputs]
    assert [list(o.shape) for o in through.outputs] == [list(o.shape) for o in direct.outputs]
    assert list(through.raw_output_contents) == list(direct.raw_output_contents)
    assert through.id == "typed-1"
    n = np.frombuffer(through.raw_output_contents[2], dtype="<i8")
    assert n.tolist() == [3 + 2 + 2 + 2 + 2 + 1 + 3 + 3]
    await gw.stop()  # the record is written after the answer: drain the recorder first
    record = next(r for r in gw.records() if r["request_id"] == "typed-1")
    assert record["protocol"] == "grpc"
    assert record["inputs"]["i64"]["data"] == [-(2**63), 2**63 - 1]
    assert record["inputs"]["s"]["data"] == ["hello", "h\u00e9", ""]


async def test_metadata_config_stats_live_ready(make_gateway: GatewayFactory) -> None:
    gw = await _gateway(make_gateway, FRAUD)

    def calls() -> dict[str, Any]:
        client = grpcclient.InferenceServerClient(gw.grpc_target)
        try:
            return {
                "live": client.is_server_live(), "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready("fraud"),
                "server": client.get_server_metadata(as_json=True),
                "metadata": client.get_model_metadata("fraud", as_json=True),
                "config": client.get_model_config("fraud", as_json=True),
                "stats": client.get_inference_statistics("fraud", as_json=True),
                "index": client.get_model_repository_index(as_json=True),
            }
        finally:
            client.close()

    answers = await asyncio.to_thread(calls)
    assert answers["live"] and answers["ready"] and answers["model_ready"]
    assert answers["server"]["name"] == "understudy"
    assert answers["metadata"]["name"] == "fraud"
    assert answers["metadata"]["inputs"][0]["name"] == "features"
    assert answers["metadata"]["inputs"][0]["shape"] == ["-1", "8"]
    config = answers["config"]["config"]
    assert config["name"] == "fraud"
    assert config["max_batch_size"] == 64
    assert config["input"][0]["name"] == "features"
    assert [s["name"] for s in answers["stats"]["model_stats"]] == ["fraud"]
    assert answers["index"]["models"] == [{"name": "fraud", "state": "READY"}]

    # The same answers over HTTP (the routes tritonclient.http's helpers call).
    async with gw.session.get(f"{gw.url}/v2/models/fraud/config") as resp:
        assert resp.status == 200
        http_config = await resp.json()
    assert http_config["name"] == "fraud"
    assert http_config["max_batch_size"] == 64
    async with gw.session.get(f"{gw.url}/v2/models/fraud/stats") as resp:
        assert resp.status == 200
        assert [s["name"] for s in (await resp.json())["model_stats"]] == ["fraud"]
    async with gw.session.get(f"{gw.url}/v2/models/nope/config") as resp:
        assert resp.status == 404


async def test_aio_client_shadow_logged_under_request_id(triton: Any,
                                                         make_gateway: GatewayFactory) -> None:
    gw = await _gateway(make_gateway, FRAUD)
    x = _rows(2, seed=5)
    client = aiogrpcclient.InferenceServerClient(gw.grpc_target)
    try:
        features = aiogrpcclient.InferInput("features", [2, 8], "FP32")
        features.set_data_from_numpy(x)
        result = await client.infer("fraud", [features], request_id="grpc-shadow-1")
        assert await client.is_model_ready("fraud")
    finally:
        await client.close()
    direct = await asyncio.to_thread(_infer, triton.grpc_url, "fraud_v3", x)
    np.testing.assert_array_equal(result.as_numpy("score"), direct)
    assert result.get_response().id == "grpc-shadow-1"

    # The request id, served model and policy come back in the trailing metadata; an id from
    # the `x-request-id` metadata is used when the message has none.
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="fraud")
        request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
        request.raw_input_contents.append(x[:1].tobytes())
        call = stub.ModelInfer(request, metadata=(("x-request-id", "grpc-md-1"),))
        response = await call
        metadata = dict(await call.trailing_metadata())
    assert metadata["x-request-id"] == "grpc-md-1"
    assert metadata["x-served-model"] == "fraud_v3"
    assert metadata["x-route-policy"] == "champion"
    assert response.id == "grpc-md-1"
    async with gw.session.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    # (the registry is process-wide: other tests' requests count too, so no exact value)
    assert ('understudy_requests_total{code="200",model="fraud_v3",protocol="grpc",'
            'route="fraud"}') in text

    await gw.stop()  # drains the shadow copies and flushes the log
    records = {r["request_id"]: r for r in gw.records()}
    record = records["grpc-shadow-1"]
    assert record["protocol"] == "grpc"
    assert record["served"]["model"] == "fraud_v3"
    assert record["outputs"]["fraud_v4"]["status"] == "ok"
    assert record["outputs"]["fraud_v4"]["mode"] == "shadow"
    assert record["inputs"]["features"]["shape"] == [2, 8]
    assert records["grpc-md-1"]["protocol"] == "grpc"


def _status_of(target: str, model: str, tensor: grpcclient.InferInput) -> InferenceServerException:
    client = grpcclient.InferenceServerClient(target)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, [tensor])
        return info.value
    finally:
        client.close()


async def test_errors_map_to_status_codes(make_gateway: GatewayFactory) -> None:
    gw = await _gateway(make_gateway, FRAUD)
    wrong_name = grpcclient.InferInput("feature", [1, 8], "FP32")
    wrong_name.set_data_from_numpy(_rows(1))
    error = await asyncio.to_thread(_status_of, gw.grpc_target, "fraud", wrong_name)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'feature'" in error.message()

    wrong_shape = grpcclient.InferInput("features", [1, 7], "FP32")
    wrong_shape.set_data_from_numpy(_rows(1)[:, :7])
    error = await asyncio.to_thread(_status_of, gw.grpc_target, "fraud", wrong_shape)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'features'" in error.message() and "shape" in error.message()

    ok = grpcclient.InferInput("features", [1, 8], "FP32")
    ok.set_data_from_numpy(_rows(1))
    error = await asyncio.to_thread(_status_of, gw.grpc_target, "nope", ok)
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "unknown route 'nope'" in error.message()

    # Typed contents whose count does not fit the shape name the contents field.
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="fraud")
        tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
        tensor.contents.fp32_contents.extend([0.5] * 7)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request, metadata=(("x-request-id", "bad-typed-1"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents.fp32_contents has 7" in (info.value.details() or "")
    assert dict(info.value.trailing_metadata() or ())["x-request-id"] == "bad-typed-1"
    await gw.stop()
    record = next(r for r in gw.records() if r["request_id"] == "bad-typed-1")
    assert record["status"] == 400 and record["protocol"] == "grpc"


async def test_message_size_limit(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(FRAUD, grpc=True, listen={"max_body_bytes": 4096})
    big = np.zeros((200, 8), dtype=np.float32)  # 6400 bytes of tensor data
    tensor = grpcclient.InferInput("features", [200, 8], "FP32")
    tensor.set_data_from_numpy(big)
    error = await asyncio.to_thread(_status_of, gw.grpc_target, "fraud", tensor)
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"


async def test_stream_infer(triton: Any, make_gateway: GatewayFactory) -> None:
    gw = await _gateway(make_gateway, FRAUD)
    x = _rows(5, seed=9)

    def stream() -> list[tuple[Any, Any]]:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(gw.grpc_target)
        try:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for i in range(5):
                features = grpcclient.InferInput("features", [1, 8], "FP32")
                features.set_data_from_numpy(x[i : i + 1])
                client.async_stream_infer("fraud", [features], request_id=f"s{i}")
            bad = grpcclient.InferInput("features", [1, 7], "FP32")
            bad.set_data_from_numpy(x[:1, :7])
            client.async_stream_infer("fraud", [bad], request_id="s-bad")
            out = [answers.get(timeout=30) for _ in range(6)]
            client.stop_stream()
            return out
        finally:
            client.close()

    answers = await asyncio.to_thread(stream)
    direct = await asyncio.to_thread(_infer, triton.grpc_url, "fraud_v3", x)
    for i, (result, error) in enumerate(answers[:5]):
        assert error is None
        assert result.get_response().id == f"s{i}"
        np.testing.assert_array_equal(result.as_numpy("score"), direct[i : i + 1])
    result, error = answers[5]
    assert result is None and "input 'features'" in error.message()
    await gw.stop()
    logged = {r["request_id"]: r for r in gw.records()}
    assert {f"s{i}" for i in range(5)} <= logged.keys()
    assert logged["s0"]["protocol"] == "grpc"


async def test_health_service_for_probes(make_gateway: GatewayFactory) -> None:
    gw = await _gateway(make_gateway, FRAUD)
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        live = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        ready = await stub.Check(health_pb2.HealthCheckRequest(service=READY_SERVICE))
    assert live.status == health_pb2.HealthCheckResponse.SERVING
    assert ready.status == health_pb2.HealthCheckResponse.SERVING


async def test_client_deadline_still_logs_the_request(make_gateway: GatewayFactory) -> None:
    """A client that gives up (gRPC deadline) gets DEADLINE_EXCEEDED; the gateway still serves
    the request to the end and logs it, as it does for an HTTP client that hangs up."""
    gw = await make_gateway({"slow": {"champion": {"model": "fraud_sleepy"}}}, grpc=True,
                            triton={"timeout_ms": 10_000})
    x = _rows(1)
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="slow", id="late-1")
        request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
        request.raw_input_contents.append(x.tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request, timeout=0.3)  # fraud_sleepy takes 2 s
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await gw.stop()  # waits for the shielded call like any in-flight work
    record = next(r for r in gw.records() if r["request_id"] == "late-1")
    assert record["status"] == 200 and record["protocol"] == "grpc"


def _fraud_request(route: str, x: np.ndarray, request_id: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=route, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


async def test_exploration_sticky_key_from_metadata(make_gateway: GatewayFactory) -> None:
    """The same policy as over HTTP: propensities logged, every arm scored, and the sticky key
    read from gRPC metadata (the header name, lower-cased) pins a user to one arm."""
    gw = await make_gateway({"fraud": {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v5", "mode": "explore", "max_queue": 500}],
        "policy": {"type": "epsilon_greedy", "epsilon": 0.5, "sticky_header": "X-User"},
    }}, grpc=True)
    x = _rows(40, seed=13)
    served: dict[str, set[str]] = {}
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for i in range(40):
            user = f"user-{i % 8}"
            call = stub.ModelInfer(_fraud_request("fraud", x[i : i + 1], f"e{i}"),
                                   metadata=(("x-user", user),))
            await call
            served.setdefault(user, set()).add(dict(await call.trailing_metadata())[
                "x-served-model"])
    assert all(len(arms) == 1 for arms in served.values())  # sticky per user
    await gw.stop()
    records = [r for r in gw.records() if r["request_id"].startswith("e")]
    assert len(records) == 40
    for record in records:
        assert record["protocol"] == "grpc"
        assert record["key"] in served
        assert record["served"]["model"] in served[record["key"]]
        expected = 0.75 if record["served"]["model"] == "fraud_v3" else 0.25
        assert record["propensity"] == pytest.approx(expected)
        assert {m for m, o in record["outputs"].items() if o["status"] == "ok"} == {
            "fraud_v3", "fraud_v5"}


async def test_fallback_and_unavailable(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        {"fraud": {"champion": {"model": "fraud_faulty"},
                   "challengers": [{"model": "fraud_v4"}], "fallback": "fraud_v4"},
         "nofb": {"champion": {"model": "fraud_faulty"}}}, grpc=True)
    x = _rows(1)
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer(_fraud_request("fraud", x, "fb-1"))
        response = await call
        assert dict(await call.trailing_metadata())["x-served-model"] == "fraud_v4"
        assert response.raw_output_contents
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(_fraud_request("nofb", x, "nofb-1"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # Triton's 5xx: a 502
    assert "fraud_faulty" in (info.value.details() or "")

    dead = await make_gateway({"fraud": {"champion": {"model": "fraud_v3"}}}, grpc=True,
                              triton={"url": "http://127.0.0.1:1", "timeout_ms": 500})

    def ask_dead() -> tuple[bool, bool, InferenceServerException]:
        client = grpcclient.InferenceServerClient(dead.grpc_target)
        try:
            live, ready = client.is_server_live(), client.is_server_ready()
        finally:
            client.close()
        tensor = grpcclient.InferInput("features", [1, 8], "FP32")
        tensor.set_data_from_numpy(x)
        return live, ready, _status_of(dead.grpc_target, "fraud", tensor)

    live, ready, error = await asyncio.to_thread(ask_dead)
    assert live and not ready
    assert error.status() == "StatusCode.UNAVAILABLE"
    await gw.stop()
    record = next(r for r in gw.records() if r["request_id"] == "fb-1")
    assert record["fallback"] is True and record["protocol"] == "grpc"


async def test_shutdown_drains_rpcs_in_flight(make_gateway: GatewayFactory) -> None:
    """SIGTERM's path (the app's cleanup): an RPC already running finishes with its answer and
    its record is flushed; the gRPC server stops before the recorder drains."""
    gw = await make_gateway({"slow": {"champion": {"model": "fraud_sleepy"}}}, grpc=True,
                            triton={"timeout_ms": 10_000})
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = asyncio.ensure_future(stub.ModelInfer(_fraud_request("slow", _rows(1), "d-1")))
        await asyncio.sleep(0.5)  # in flight: fraud_sleepy takes 2 s
        await gw.stop()
        response = await call
    assert response.id == "d-1" and response.raw_output_contents
    assert [r["status"] for r in gw.records() if r["request_id"] == "d-1"] == [200]
