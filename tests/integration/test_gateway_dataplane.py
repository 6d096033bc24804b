"""The data plane through real HTTP and real Triton: transparency, isolation, errors, logging."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http

from gateway.rest.inference import SERVICE
from tests.conftest import GatewayFactory, fraud_body
from understudy.record_schema import record_problems
from understudy_demo.traffic import FraudTraffic

pytestmark = pytest.mark.triton

FRAUD = {"champion": {"model": "fraud_v3"},
         "challengers": [{"model": "fraud_v4", "sample_rate": 1.0}]}


def _client_infer(url: str, model: str, x: np.ndarray, binary: bool) -> np.ndarray:
    client = triton_http.InferenceServerClient(url.removeprefix("http://"))
    try:
        inp = triton_http.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton_http.InferRequestedOutput("score", binary_data=binary)
        result = client.infer(model, [inp], outputs=[out])
        return result.as_numpy("score")
    finally:
        client.close()


async def test_tritonclient_binary_and_json_match_direct_triton(make_gateway: GatewayFactory,
                                                                triton) -> None:
    gw = await make_gateway({"fraud": FRAUD})
    x, _ = FraudTraffic(seed=1).sample(16)
    direct = await asyncio.to_thread(_client_infer, triton.url, "fraud_v3", x, True)
    for binary in (True, False):
        via_gateway = await asyncio.to_thread(_client_infer, gw.url, "fraud", x, binary)
        np.testing.assert_array_equal(via_gateway, direct)
    # The route's metadata looks like a Triton model's, under the route name.
    meta, model_ready, server_ready = await asyncio.to_thread(_client_metadata, gw.url, "fraud")
    assert meta["name"] == "fraud"
    assert meta["inputs"][0]["name"] == "features"
    assert model_ready and server_ready


def _client_metadata(url: str, model: str) -> tuple[dict, bool, bool]:
    """tritonclient.http is gevent-based: create, use and close it on one thread."""
    client = triton_http.InferenceServerClient(url.removeprefix("http://"))
    try:
        return (client.get_model_metadata(model), client.is_model_ready(model),
                client.is_server_ready())
    finally:
        client.close()


async def test_response_headers_and_request_id(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway({"fraud": FRAUD})
    x, _ = FraudTraffic(seed=2).sample(1)
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body(x.tolist(), "abc-1"))
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == "abc-1"
    assert resp.headers["X-Served-Model"] == "fraud_v3"
    assert resp.headers["X-Route-Policy"] == "champion"
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body(x.tolist()),
                              headers={"X-Request-Id": "hdr-7"})
    assert resp.headers["X-Request-Id"] == "hdr-7"
    generated = []
    for _ in range(2):
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body(x.tolist()))
        generated.append(resp.headers["X-Request-Id"])
    assert all(len(g) == 32 and int(g, 16) >= 0 for g in generated)
    assert generated[0] != generated[1]


@pytest.mark.parametrize("challenger", ["fraud_sleepy", "fraud_faulty"])
async def test_slow_or_failing_challenger_never_touches_the_champion(
    make_gateway: GatewayFactory, triton, challenger: str
) -> None:
    gw = await make_gateway({"fraud": {
        "champion": {"model": "fraud_v3"},
        # One copy per call (batching off), so the lane admits exactly 2 + 2 copies; batched
        # capacity is tested in test_shadow_batching.py.
        # The copies' timeout is well under fraud_sleepy's 2 s sleep (they must time out) and
        # long enough that no admitted copy ends while the 8 requests are still being sent,
        # however busy the machine (a freed slot would admit a 5th copy: shed would not be 4).
        "challengers": [{"model": challenger, "timeout_ms": 1500, "max_concurrency": 2,
                         "max_queue": 2 if challenger == "fraud_sleepy" else 8,
                         "batch_max_rows": 1}],
    }})
    x, _ = FraudTraffic(seed=3).sample(8)
    expected = await asyncio.to_thread(_client_infer, triton.url, "fraud_v3", x, False)
    recorder = gw.app[SERVICE].recorder
    bodies = []
    for i in range(8):
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([x[i].tolist()], f"r{i}"))
        assert resp.status == 200
        bodies.append(orjson.loads(await resp.read()))
        if i == 0 and challenger == "fraud_sleepy":
            # Causal, not a stopwatch: the client holds its answer while the record still
            # waits for the copy (fraud_sleepy sleeps 2 s; the copy times out after 1.5 s).
            assert recorder.pending == 1
    got = np.array([b["outputs"][0]["data"][0] for b in bodies], dtype=np.float32)
    np.testing.assert_allclose(got, expected.ravel(), rtol=1e-6)
    await gw.stop()
    records = {r["request_id"]: r for r in gw.records()}
    assert set(records) == {f"r{i}" for i in range(8)}
    statuses = [r["outputs"][challenger]["status"] for r in records.values()]
    if challenger == "fraud_sleepy":
        # Two in flight + two queued: the rest are shed at once, the admitted ones time out.
        assert set(statuses) <= {"timeout", "shed"} and "timeout" in statuses
        assert statuses.count("shed") == 4
    else:
        assert set(statuses) == {"error"}
        assert all(r["outputs"][challenger]["error"] for r in records.values())
    assert all(r["outputs"]["fraud_v3"]["status"] == "ok" for r in records.values())


async def test_every_served_request_has_exactly_one_record(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway({"fraud": {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v4", "max_queue": 300, "timeout_ms": 10_000}],
    }})
    x, _ = FraudTraffic(seed=4).sample(300)

    async def one(i: int) -> int:
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([x[i].tolist()], f"q{i}"))
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(300)))
    assert statuses == [200] * 300
    await gw.stop()
    records = gw.records()
    ids = [r["request_id"] for r in records]
    assert len(ids) == 300 and set(ids) == {f"q{i}" for i in range(300)}
    for r in records:
        assert record_problems(r) == []
        assert r["schema_version"] == 1 and r["route"] == "fraud"
        assert r["served"]["model"] == "fraud_v3" and r["propensity"] == 1.0
        assert r["outputs"]["fraud_v4"]["status"] == "ok"
        assert len(r["inputs"]["features"]["data"]) == 8
        champion_score = r["outputs"]["fraud_v3"]["outputs"]["score"]["data"][0]
        assert 0.0 <= champion_score <= 1.0


BAD_INPUTS = [
    (b"{not json", "malformed JSON"),
    (b"[1,2]", "must be a JSON object"),
    (orjson.dumps({"inputs": []}), "non-empty list"),
    (orjson.dumps({"inputs": [{"name": "feat", "datatype": "FP32", "shape": [1, 8],
                               "data": [0.0] * 8}]}), "unexpected input(s) 'feat'"),
    (orjson.dumps({"inputs": [{"name": "features", "datatype": "INT32", "shape": [1, 8],
                               "data": [0] * 8}]}), "datatype INT32 does not match"),
    (orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 7],
                               "data": [0.0] * 7}]}), "shape [1, 7] does not match"),
    (orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8],
                               "data": [0.0] * 5}]}), "needs 8 elements, 'data' has 5"),
]


async def test_bad_input_gets_a_clear_4xx_and_the_gateway_keeps_serving(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway({"fraud": FRAUD}, listen={"max_body_bytes": 4096})
    for body, message in BAD_INPUTS:
        resp = await gw.session.post(gw.url + "/v2/models/fraud/infer", data=body)
        payload = orjson.loads(await resp.read())
        assert resp.status == 400, (body, payload)
        assert message in payload["error"], (message, payload)
    resp = await gw.post_json("/v2/models/nope/infer", fraud_body([[0.0] * 8]))
    assert resp.status == 404
    assert "unknown route 'nope'" in orjson.loads(await resp.read())["error"]
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.0] * 8] * 200))
    assert resp.status == 413
    assert "4096" in orjson.loads(await resp.read())["error"]
    # Binary extension: header declares 32 bytes of tensor data, only 12 arrive.
    header = orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8],
                                       "parameters": {"binary_data_size": 32}}]})
    resp = await gw.session.post(
        gw.url + "/v2/models/fraud/infer", data=header + b"\0" * 12,
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )
    payload = orjson.loads(await resp.read())
    assert resp.status == 400 and "truncated" in payload["error"]
    resp = await gw.session.post(
        gw.url + "/v2/models/fraud/infer", data=header,
        headers={"Inference-Header-Content-Length": "9999"},
    )
    assert resp.status == 400
    assert "Inference-Header-Content-Length" in orjson.loads(await resp.read())["error"]
    # Still serving, and the rejected requests were never mirrored to the challenger.
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.1] * 8], "ok-after"))
    assert resp.status == 200
    await gw.stop()
    records = gw.records()
    ok = [r for r in records if r["request_id"] == "ok-after"]
    assert len(ok) == 1 and ok[0]["outputs"]["fraud_v4"]["status"] == "ok"
    assert all(record_problems(r) == [] for r in records)
    rejected = [r for r in records if r["status"] == 400]
    assert len(rejected) == len(BAD_INPUTS) + 2
    assert all(r["outputs"]["fraud_v4"]["status"] == "skipped" for r in rejected)


async def test_champion_down_is_a_fast_5xx_and_fallback_serves(make_gateway: GatewayFactory,
                                                               triton) -> None:
    gw = await make_gateway(
        {"fraud": {"champion": {"model": "fraud_faulty"},
                   "challengers": [{"model": "fraud_v4"}], "fallback": "fraud_v4"},
         "nofb": {"champion": {"model": "fraud_faulty"}}},
    )
    resp = await gw.post_json("/v2/models/nofb/infer", fraud_body([[0.0] * 8]))
    assert resp.status == 502
    assert "fraud_faulty" in orjson.loads(await resp.read())["error"]
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.0] * 8], "fb"))
    assert resp.status == 200 and resp.headers["X-Served-Model"] == "fraud_v4"
    dead = await make_gateway({"fraud": FRAUD}, triton={"url": "http://127.0.0.1:1",
                                                         "timeout_ms": 500})
    resp = await dead.post_json("/v2/models/fraud/infer", fraud_body([[0.0] * 8]))
    assert resp.status == 503
    resp = await dead.session.get(dead.url + "/v2/health/ready")
    assert resp.status == 503
    resp = await dead.session.get(dead.url + "/v2/health/live")
    assert resp.status == 200


async def test_metrics_label_shadow_traffic(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway({"fraud": FRAUD})
    x, _ = FraudTraffic(seed=5).sample(20)
    for row in x:
        await gw.post_json("/v2/models/fraud/infer", fraud_body([row.tolist()]))
    for _ in range(50):  # shadow copies complete in the background
        text = await (await gw.session.get(gw.url + "/metrics")).text()
        if "understudy_agreement_total" in text:
            break
        await asyncio.sleep(0.1)
    assert 'understudy_shadow_copies_total{model="fraud_v4",outcome="sent",route="fraud"}' in text
    assert ('understudy_requests_total{code="200",model="fraud_v3",protocol="http",'
            'route="fraud"}') in text
    assert "understudy_agreement_total" in text
    assert 'understudy_prediction_score_bucket{le="0.5",model="fraud_v4",route="fraud"}' in text


async def test_log_sampling_is_stable_per_key(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway({"fraud": {"champion": {"model": "fraud_v3"}, "log_sample_rate": 0.5,
                                       "sample_key_header": "X-User-Id"}})
    for i in range(120):
        resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.0] * 8], f"s{i}"),
                                  headers={"X-User-Id": f"user-{i % 40}"})
        assert resp.status == 200
    await gw.stop()
    logged_users = [r["key"] for r in gw.records()]
    counts = {u: logged_users.count(u) for u in set(logged_users)}
    assert set(counts.values()) == {3}  # each user: all three of its requests, or none
    assert 8 <= len(counts) <= 32  # Binomial(40, 0.5), > 3 standard deviations of margin


def _fraud_with(**over: object) -> bytes:
    body = fraud_body([[0.25] * 8], "d1")
    tensor = body["inputs"][0]
    for key, value in over.items():
        if key in ("datatype", "data"):
            tensor[key] = value
        else:
            body[key] = value
    return orjson.dumps(body)


_DEEP = b'{"id":"d1","inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":' + (
    b"[" * 1000 + b"0.5" + b"]" * 1000 + b"}]}")

# Issue 14, item 2: each body got a 500 or 502 (or a dropped connection) before; now a 400
# whose message names the field.
CLIENT_MISTAKES = {
    "data-nested-1000-deep": (_DEEP, "'data' is nested deeper"),
    "parameters-string": (_fraud_with(parameters="x"), "'parameters' must be an object"),
    "parameters-list": (_fraud_with(parameters=[1]), "'parameters' must be an object"),
    "datatype-list": (_fraud_with(datatype=["FP32"]), "'datatype' must be one of"),
    "datatype-object": (_fraud_with(datatype={"t": "FP32"}), "'datatype' must be one of"),
    "fp32-strings": (_fraud_with(data=["0.5"] * 8), "FP32 data must hold"),
    "fp32-null": (_fraud_with(data=[0.5] * 7 + [None]), "got null"),
    "fp32-bools": (_fraud_with(data=[True] * 8), "got boolean"),
    "id-object": (_fraud_with(id={"a": 1}), "'id' must be a string"),
    "outputs-string": (_fraud_with(outputs="score"), "'outputs' must be a list"),
    "outputs-empty-object": (_fraud_with(outputs=[{}]), "outputs[0].name"),
    "id-control-character": (_fraud_with(id="ab\x01cd"), "'id' must be printable ASCII"),
    "id-100000-characters": (_fraud_with(id="x" * 100_000), "'id' is 100000 characters long"),
}


@pytest.mark.parametrize("case", list(CLIENT_MISTAKES))
async def test_client_mistake_is_a_400_naming_the_field(make_gateway: GatewayFactory,
                                                       case: str) -> None:
    gw = await make_gateway({"fraud": FRAUD}, listen={"max_body_bytes": 1 << 20})
    body, message = CLIENT_MISTAKES[case]
    resp = await gw.session.post(gw.url + "/v2/models/fraud/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    payload = orjson.loads(await resp.read())
    assert resp.status == 400, payload
    assert message in payload["error"], payload
    request_id = resp.headers["X-Request-Id"]  # a generated one when the body's id is bad
    assert len(request_id) <= 256 and request_id.isascii() and request_id.isprintable()
    # Still serving on the same connection pool.
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.1] * 8], "after"))
    assert resp.status == 200
    await gw.stop()
    records = {r["request_id"]: r for r in gw.records()}
    assert records[request_id]["status"] == 400  # logged as what the client got, not a 200
    assert records[request_id]["outputs"]["fraud_v3"]["status"] == "skipped"
    assert records[request_id]["inputs"] == {}  # never a corrupt tensor in the log


async def _inference_count(triton, model: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(
        f"{triton.url}/v2/models/{model}/stats"
    ) as resp:
        stats = await resp.json()
    return int(stats["model_stats"][0]["inference_count"])


async def test_bad_body_reaches_neither_fallback_nor_failure_metrics(
    make_gateway: GatewayFactory, triton
) -> None:
    """Before: Triton's 500 for FP32 strings became a 502, counted as a champion failure, and
    the same body was re-sent to the fallback; the record held FP32 data with strings."""
    gw = await make_gateway({"fb": {"champion": {"model": "fraud_v3"},
                                    "challengers": [{"model": "fraud_v5", "sample_rate": 0.0}],
                                    "fallback": "fraud_v5"}})
    before = await _inference_count(triton, "fraud_v5")
    for body in (_fraud_with(data=["x"] * 8), _fraud_with(outputs=[{}]),
                 _fraud_with(parameters="p"), _fraud_with(id=5)):
        resp = await gw.session.post(gw.url + "/v2/models/fb/infer", data=body)
        assert resp.status == 400, await resp.text()
        assert resp.headers["X-Served-Model"] == "fraud_v3"
    # Triton's own 4xx (a model-specific refusal) stays a 4xx, and is not a fallback case.
    resp = await gw.post_json("/v2/models/fb/infer",
                              {**fraud_body([[0.1] * 8]), "outputs": [{"name": "nope"}]})
    assert resp.status == 400 and "nope" in orjson.loads(await resp.read())["error"]
    assert await _inference_count(triton, "fraud_v5") == before
    text = await (await gw.session.get(gw.url + "/metrics")).text()
    assert ('understudy_requests_total{code="400",model="fraud_v3",protocol="http",'
            'route="fb"} 5.0') in text
    assert not [line for line in text.splitlines() if line.startswith(
        "understudy_requests_total") and 'code="5' in line and 'route="fb"' in line]
    await gw.stop()
    for record in gw.records():
        assert record_problems(record) == [], record
        assert not record.get("fallback")


async def test_request_id_header_is_validated_like_the_body_id(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway({"fraud": FRAUD})
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.1] * 8]),
                              headers={"X-Request-Id": "h" * 5000})
    payload = orjson.loads(await resp.read())
    assert resp.status == 400 and "X-Request-Id header is 5000 characters" in payload["error"]
    assert len(resp.headers["X-Request-Id"]) == 32  # not echoed: a generated id instead
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([[0.1] * 8]),
                              headers={"X-Request-Id": "ok-header-id"})
    assert resp.status == 200 and resp.headers["X-Request-Id"] == "ok-header-id"
    await gw.stop()
    assert all(record_problems(r) == [] for r in gw.records())


async def test_triton_never_sees_a_shape_that_aborts_it(make_gateway: GatewayFactory,
                                                        triton) -> None:
    """Triton 2.51 aborts (SIGABRT, std::length_error) on a JSON input of shape
    [2^64-1, 8]: the gateway must refuse such shapes itself (a guard: the element-count check
    already caught this one before; the shape rule now names it)."""
    gw = await make_gateway({"any": {"champion": {"model": "fraud_v3"}}})
    body = fraud_body([[0.1] * 8])
    body["inputs"][0]["shape"] = [2**64 - 1, 8]
    resp = await gw.post_json("/v2/models/any/infer", body)
    assert resp.status == 400 and "'shape'" in orjson.loads(await resp.read())["error"]
    resp = await gw.post_json("/v2/models/any/infer", fraud_body([[0.1] * 8]))
    assert resp.status == 200


async def _raw_post(url: str, path: str, body: bytes, extra_headers: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request with header bytes exactly as given (clients refuse non-ASCII)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n%s\r\n%s"
                 % (path.encode(), len(body), extra_headers, body))
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


async def test_key_header_that_is_not_utf8_is_a_400_and_still_logged(
    make_gateway: GatewayFactory,
) -> None:
    """Before: aiohttp passes non-UTF-8 header bytes on as lone surrogates; hashing the sticky
    key raised (a 500) and the record could not be serialised (dropped)."""
    gw = await make_gateway({"sticky": {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v4", "mode": "explore"}],
        "policy": {"type": "epsilon_greedy", "epsilon": 0.5, "sticky_header": "X-User-Id"}}})
    body = orjson.dumps(fraud_body([[0.1] * 8], "k1"))
    status, payload = await _raw_post(gw.url, "/v2/models/sticky/infer", body,
                                      b"X-User-Id: user-\xff\xfe\r\n")
    assert status == 400, payload
    assert "X-User-Id header is not valid UTF-8" in orjson.loads(payload)["error"]
    status, payload = await _raw_post(gw.url, "/v2/models/sticky/infer", body,
                                      "X-User-Id: usér-1\r\n".encode())
    assert status == 200, payload  # UTF-8 proper is fine
    await gw.stop()
    records = gw.records()
    assert [r["status"] for r in records] == [400, 200]
    assert records[1]["key"] == "usér-1"
    assert all(record_problems(r) == [] for r in records)
