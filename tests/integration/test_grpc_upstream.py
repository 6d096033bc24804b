"""The gateway calling Triton over gRPC (`triton.protocol: grpc`, issue 16 item 3).

Through real Triton: a gateway whose upstream is Triton's gRPC port answers exactly what the
HTTP-upstream gateway answers, for JSON and binary-tensor requests, with a shadow copy on gRPC;
Triton's INVALID_ARGUMENT reaches the client as a 4xx; a dead gRPC upstream only fails the copies
of the model that lives there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from gateway.config import parse_config
from gateway.dataplane.protocol import HEADER_LENGTH, decode_response
from gateway.errors import ConfigError, NotFound
from gateway.rest.inference import UPSTREAM
from tests.conftest import GatewayFactory, GatewayHandle, fraud_body

pytestmark = pytest.mark.triton

ROUTES = {"fraud": {"champion": {"model": "fraud_v3"},
                    "challengers": [{"model": "fraud_v4", "mode": "shadow"}]}}


def _binary_body(rows: np.ndarray, rid: str) -> tuple[bytes, dict[str, str]]:
    raw = rows.astype("<f4").tobytes()
    head = orjson.dumps({
        "id": rid,
        "inputs": [{"name": "features", "datatype": "FP32", "shape": list(rows.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}}],
    })
    return head + raw, {"Content-Type": "application/octet-stream",
                        HEADER_LENGTH: str(len(head))}


async def _post(gw: GatewayHandle, route: str, body: bytes, headers: dict[str, str]
                ) -> tuple[int, bytes, dict[str, str]]:
    async with gw.session.post(f"{gw.url}/v2/models/{route}/infer", data=body,
                               headers=headers) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


def _outputs(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    decoded = decode_response(body, headers.get(HEADER_LENGTH))
    return {name: (out["datatype"], list(out["shape"]), np.asarray(out["data"]).tolist())
            for name, out in decoded["outputs"].items()}


async def test_grpc_upstream_answers_as_the_http_upstream(
    make_gateway: GatewayFactory, triton: Any,
) -> None:
    http_gw = await make_gateway(ROUTES)
    grpc_gw = await make_gateway(ROUTES, triton={"protocol": "grpc",
                                                 "grpc_url": triton.grpc_url})
    assert (await grpc_gw.app[UPSTREAM].metadata("fraud_v3"))["inputs"][0]["name"] == "features"
    assert (await grpc_gw.app[UPSTREAM].model_config("fraud_v4"))["max_batch_size"] > 0
    assert await grpc_gw.app[UPSTREAM].model_ready("fraud_v3")
    assert await grpc_gw.app[UPSTREAM].server_ready(["fraud_v3"])

    rng = np.random.default_rng(16)
    n = 12
    for i in range(n):
        rows = rng.standard_normal((1 + i % 3, 8)).astype(np.float32)
        if i % 2:
            body, headers = _binary_body(rows, f"r{i}")
        else:
            body = orjson.dumps(fraud_body(rows.tolist(), f"r{i}"))
            headers = {"Content-Type": "application/json"}
        via_http = await _post(http_gw, "fraud", body, headers)
        via_grpc = await _post(grpc_gw, "fraud", body, headers)
        assert via_http[0] == via_grpc[0] == 200, via_grpc[1][:300]
        assert (HEADER_LENGTH in via_grpc[2]) == bool(i % 2)  # binary asked -> binary back
        assert _outputs(via_grpc[1], via_grpc[2]) == _outputs(via_http[1], via_http[2])
        assert via_grpc[2]["Content-Type"] == via_http[2]["Content-Type"]

    # Typed JSON datatypes (BYTES, BOOL, ints) survive the protobuf round trip.
    echo = {"echo": {"champion": {"model": "typed_echo"}}}
    http_echo = await make_gateway(echo)
    grpc_echo = await make_gateway(echo, triton={"protocol": "grpc",
                                                 "grpc_url": triton.grpc_url})
    typed = orjson.dumps({"inputs": [
        {"name": "f32", "datatype": "FP32", "shape": [2], "data": [1.5, -2.0]},
        {"name": "f64", "datatype": "FP64", "shape": [1], "data": [0.1]},
        {"name": "i8", "datatype": "INT8", "shape": [2], "data": [-128, 127]},
        {"name": "u16", "datatype": "UINT16", "shape": [1], "data": [65535]},
        {"name": "i64", "datatype": "INT64", "shape": [1], "data": [-(2**62)]},
        {"name": "u64", "datatype": "UINT64", "shape": [1], "data": [2**63]},
        {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["héllo", ""]},
    ]})
    json_headers = {"Content-Type": "application/json"}
    a = await _post(http_echo, "echo", typed, json_headers)
    b = await _post(grpc_echo, "echo", typed, json_headers)
    assert a[0] == b[0] == 200, b[1][:300]
    assert _outputs(b[1], b[2]) == _outputs(a[1], a[2])

    await grpc_gw.stop()
    records = grpc_gw.records()
    assert len(records) == n
    for record in records:
        assert record["outputs"]["fraud_v3"]["status"] == "ok"
        copy = record["outputs"]["fraud_v4"]
        assert copy["status"] == "ok", copy  # the shadow went over gRPC too
        assert copy["latency_ms"] > 0


async def test_grpc_upstream_maps_triton_errors(make_gateway: GatewayFactory, triton: Any
                                                ) -> None:
    gw = await make_gateway({"fraud": {"champion": {"model": "fraud_v3"}}},
                            triton={"protocol": "grpc", "grpc_url": triton.grpc_url})
    # Valid for the gateway's checks, rejected by Triton: an output the model does not have.
    body = fraud_body([[0.0] * 8], "bad")
    body["outputs"] = [{"name": "no_such_output"}]
    status, answer, _ = await _post(gw, "fraud", orjson.dumps(body),
                                    {"Content-Type": "application/json"})
    assert 400 <= status < 500, answer
    assert b"no_such_output" in answer


async def test_a_dead_grpc_upstream_is_isolated(
    make_gateway: GatewayFactory, unused_tcp_port_factory: Any,
) -> None:
    dead_http, dead_grpc = unused_tcp_port_factory(), unused_tcp_port_factory()
    gw = await make_gateway(
        {"iso": {"champion": {"model": "fraud_v3"},
                 "challengers": [{"model": "fraud_v4", "timeout_ms": 60_000}]}},
        triton={"models": {"fraud_v4": {"url": f"http://127.0.0.1:{dead_http}",
                                        "protocol": "grpc",
                                        "grpc_url": f"127.0.0.1:{dead_grpc}"}}},
    )
    assert not await gw.app[UPSTREAM].model_ready("fraud_v4")
    n = 8
    for i in range(n):
        status, answer, _ = await _post(
            gw, "iso", orjson.dumps(fraud_body([[0.1] * 8], f"d{i}")),
            {"Content-Type": "application/json"})
        assert status == 200, answer
    async with gw.session.get(f"{gw.url}/v2/health/ready") as resp:
        assert resp.status == 200
    await gw.stop()
    records = gw.records()
    assert len(records) == n
    for record in records:
        assert record["outputs"]["fraud_v3"]["status"] == "ok"
        copy = record["outputs"]["fraud_v4"]
        assert copy["status"] == "error" and "unreachable" in copy["error"], copy


def test_upstream_protocol_is_validated() -> None:
    base = {"routes": {"r": {"champion": {"model": "m"}}}}
    assert parse_config(base, env={}).triton.protocol == "http"
    with pytest.raises(ConfigError, match=r"triton\.protocol"):
        parse_config({**base, "triton": {"protocol": "quic"}}, env={})
    with pytest.raises(ConfigError, match="grpc_url: required"):
        parse_config({**base, "triton": {"protocol": "grpc"}}, env={})
    with pytest.raises(ConfigError, match=r"triton.models.m.grpc_url"):
        parse_config({**base, "triton": {"models": {"m": {
            "url": "http://h:1", "protocol": "grpc", "grpc_url": "http://h:2"}}}}, env={})


async def test_grpc_upstream_timeouts_and_failures_map_as_over_http(
    make_gateway: GatewayFactory, triton: Any,
) -> None:
    routes = {"slow": {"champion": {"model": "fraud_sleepy"}},
              "faulty": {"champion": {"model": "fraud_faulty"}},
              "fraud": {"champion": {"model": "fraud_v3"}}}
    via = {
        "http": await make_gateway(routes, triton={"timeout_ms": 300}),
        "grpc": await make_gateway(routes, triton={"timeout_ms": 300, "protocol": "grpc",
                                                   "grpc_url": triton.grpc_url}),
    }
    body = orjson.dumps(fraud_body([[0.2] * 8]))
    json_headers = {"Content-Type": "application/json"}
    statuses = {}
    for protocol, gw in via.items():
        status, answer, _ = await _post(gw, "slow", body, json_headers)
        assert status == 504, answer  # Triton's DEADLINE_EXCEEDED -> 504, as a timed-out HTTP call
        # ... worded alike (gateway/errors.py): the client cannot tell which protocol timed out
        assert orjson.loads(answer)["error"] == \
            "model 'fraud_sleepy' did not answer within 300 ms", protocol
        statuses[protocol] = (await _post(gw, "faulty", body, json_headers))[0]
    assert statuses["grpc"] == statuses["http"] >= 500
    # Metadata and config through the same protocol answer exactly what the HTTP upstream does.
    answers = {}
    for protocol, gw in via.items():
        async with gw.session.get(f"{gw.url}/v2/models/fraud") as resp:
            assert resp.status == 200
            meta = await resp.json()
        async with gw.session.get(f"{gw.url}/v2/models/fraud/config") as resp:
            assert resp.status == 200
            config = await resp.json()
        answers[protocol] = (meta, config)  # config: every field, dims as numbers
        upstream = gw.app[UPSTREAM]
        for version, named in (("", "model 'fraud_v99'"), ("7", "model 'fraud_v3' version 7")):
            with pytest.raises(NotFound, match=f"^{named} is not known to Triton: "):
                await upstream.metadata(named.split("'")[1], version)
    assert answers["grpc"] == answers["http"]


async def test_grpc_upstream_fallback_serves_and_a_dead_server_is_503(
    make_gateway: GatewayFactory, triton: Any, unused_tcp_port: int,
) -> None:
    gw = await make_gateway(
        {"fraud": {"champion": {"model": "fraud_faulty"},
                   "challengers": [{"model": "fraud_v4"}], "fallback": "fraud_v4"},
         "nofb": {"champion": {"model": "fraud_faulty"}}},
        triton={"protocol": "grpc", "grpc_url": triton.grpc_url},
    )
    body = orjson.dumps(fraud_body([[0.0] * 8], "fb"))
    json_headers = {"Content-Type": "application/json"}
    status, answer, _ = await _post(gw, "nofb", body, json_headers)
    assert status == 502 and b"fraud_faulty" in answer
    status, answer, headers = await _post(gw, "fraud", body, json_headers)
    assert status == 200 and headers["X-Served-Model"] == "fraud_v4", answer

    dead = await make_gateway(ROUTES, triton={"protocol": "grpc", "timeout_ms": 500,
                                              "grpc_url": f"127.0.0.1:{unused_tcp_port}"})
    status, answer, _ = await _post(dead, "fraud", body, json_headers)
    assert status == 503, answer  # UNAVAILABLE (refused), not a timeout
    async with dead.session.get(f"{dead.url}/v2/health/ready") as resp:
        assert resp.status == 503
