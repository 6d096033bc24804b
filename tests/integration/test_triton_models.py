"""The demo and test models on a real Triton: they answer, and their quality is what we claim."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from sklearn.metrics import roc_auc_score
from tritonclient.utils import InferenceServerException

from tests.support.triton import DEMO_MODELS, TEST_MODELS
from understudy_demo import FraudTraffic, PriceTraffic, v2_infer_body
from understudy_demo.triton import TritonServer, _http_status, process_group_members

pytestmark = pytest.mark.triton

MAX_BATCH = 64
FRAUD_MODELS = ("fraud_v3", "fraud_v4", "fraud_v5")
PRICE_MODELS = ("price_v1", "price_v2")


@pytest.fixture
def client(triton):
    c = httpclient.InferenceServerClient(triton.url.removeprefix("http://"), concurrency=16)
    yield c
    c.close()


def infer(client, model: str, x: np.ndarray, output: str) -> np.ndarray:
    """Score x in batches of at most max_batch_size rows, all in flight at once."""
    pending = []
    for start in range(0, x.shape[0], MAX_BATCH):
        chunk = np.ascontiguousarray(x[start : start + MAX_BATCH])
        inp = httpclient.InferInput("features", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        pending.append(client.async_infer(model, [inp]))
    return np.concatenate([p.get_result().as_numpy(output) for p in pending])[:, 0]


def post_json(url: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    """POST a JSON body with the standard library (independent of the client under test)."""
    req = urllib.request.Request(  # noqa: S310 - http:// URL of our own server
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        return resp.status, json.loads(resp.read())


def test_every_model_is_ready(triton):
    index = {m["name"]: m["state"] for m in triton.models()}
    for name in (*FRAUD_MODELS, *PRICE_MODELS, "fraud_sleepy", "fraud_faulty", "fraud_wide"):
        assert index.get(name) == "READY", name


def test_every_demo_model_answers(client):
    x, _ = FraudTraffic(seed=1).sample(5)
    for model in FRAUD_MODELS:
        score = infer(client, model, x, "score")
        assert score.shape == (5,)
        assert score.dtype == np.float32
        assert np.all((score > 0) & (score < 1))
    xp, _ = PriceTraffic(seed=1).sample(5)
    for model in PRICE_MODELS:
        pred = infer(client, model, xp, "prediction")
        assert pred.shape == (5,)
        assert np.all(np.isfinite(pred))


def test_v2_json_body_helper_round_trips(triton):
    x, _ = FraudTraffic(seed=2).sample(3)
    status, answer = post_json(
        f"{triton.url}/v2/models/fraud_v3/infer", v2_infer_body(x, request_id="r-1")
    )
    assert status == 200
    assert answer["id"] == "r-1"
    (out,) = answer["outputs"]
    assert out["name"] == "score"
    assert out["shape"] == [3, 1]


def test_dynamic_batch_is_split_back_per_request(client):
    """Concurrent single-row requests (batched together by Triton) get their own row's score."""
    x, _ = FraudTraffic(seed=3).sample(48)
    batched = infer(client, "fraud_v4", x, "score")
    pending = []
    for row in x:
        inp = httpclient.InferInput("features", [1, 8], "FP32")
        inp.set_data_from_numpy(row[np.newaxis, :])
        pending.append(client.async_infer("fraud_v4", [inp]))
    single = np.array([p.get_result().as_numpy("score")[0, 0] for p in pending])
    np.testing.assert_allclose(single, batched, rtol=1e-6)


def test_fraud_challengers_are_ranked_by_auroc(client):
    x, y = FraudTraffic(seed=7).sample(4000)
    auroc = {m: roc_auc_score(y, infer(client, m, x, "score")) for m in FRAUD_MODELS}
    print("AUROC", {m: round(v, 4) for m, v in auroc.items()})
    assert auroc["fraud_v4"] > auroc["fraud_v3"] + 0.02
    assert auroc["fraud_v3"] > auroc["fraud_v5"] + 0.02
    assert 0.75 < auroc["fraud_v3"] < 0.85


def test_fraud_calibration(client):
    """v4 is calibrated in the large; v5 over-predicts fraud."""
    x, y = FraudTraffic(seed=8).sample(4000)
    v4 = infer(client, "fraud_v4", x, "score")
    v5 = infer(client, "fraud_v5", x, "score")
    assert abs(v4.mean() - y.mean()) < 0.02
    assert v5.mean() > y.mean() + 0.03


def test_price_v2_has_lower_rmse(client):
    x, y = PriceTraffic(seed=7).sample(3000)
    rmse = {
        m: float(np.sqrt(np.mean((infer(client, m, x, "prediction") - y) ** 2)))
        for m in PRICE_MODELS
    }
    print("RMSE", {m: round(v, 3) for m, v in rmse.items()})
    assert rmse["price_v2"] < rmse["price_v1"] - 2.0


def test_fraud_faulty_always_errors(client):
    x, _ = FraudTraffic(seed=4).sample(2)
    with pytest.raises(InferenceServerException, match="injected failure"):
        infer(client, "fraud_faulty", x, "score")


def test_fraud_sleepy_takes_its_delay_then_answers_like_v3(client):
    x, _ = FraudTraffic(seed=5).sample(4)
    began = time.monotonic()
    sleepy = infer(client, "fraud_sleepy", x, "score")
    assert time.monotonic() - began >= 2.0
    np.testing.assert_allclose(sleepy, infer(client, "fraud_v3", x, "score"), rtol=1e-6)


def test_fraud_wide_has_a_different_input_signature(client):
    meta = client.get_model_metadata("fraud_wide")
    assert meta["inputs"][0]["shape"] == [-1, 9]
    assert client.get_model_metadata("fraud_v3")["inputs"][0]["shape"] == [-1, 8]


def _alive(pids: list[int]) -> list[int]:
    """pids that still exist and are not zombies."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] != "Z":
            alive.append(pid)
    return alive


def test_demo_models_are_warmed_up_before_triton_reports_them_ready(tmp_path):
    """`model_warmup` in the demo configs: on a fresh Triton, before any request, each demo
    model has already executed a batch of 1 and one of 64 (the Python backend's cold first
    execute, ~35-75 ms, is paid there, not by the first requests after ready)."""
    with TritonServer([DEMO_MODELS], log_file=tmp_path / "triton.log", exit_timeout=2) as server:
        for model in (*FRAUD_MODELS, *PRICE_MODELS):
            base = f"{server.url}/v2/models/{model}"
            with urllib.request.urlopen(f"{base}/config", timeout=10) as resp:  # noqa: S310
                warmup = json.loads(resp.read())["model_warmup"]
            assert [w["batch_size"] for w in warmup] == [1, MAX_BATCH], model
            with urllib.request.urlopen(f"{base}/stats", timeout=10) as resp:  # noqa: S310
                stats = json.loads(resp.read())["model_stats"][0]
            executed = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
            assert executed == {1: 1, MAX_BATCH: 1}, (model, stats)


@pytest.mark.parametrize("grace", [None, 0.5], ids=["graceful", "forced"])
def test_stop_leaves_no_processes_behind(tmp_path, grace):
    """Stopping (even mid-request, with an open keep-alive connection) reaps server and stubs."""
    server = TritonServer([TEST_MODELS], log_file=tmp_path / "triton.log", exit_timeout=2)
    server.start()
    pids = server.process_ids()
    assert server.pid in pids
    assert len(pids) >= 4, "tritonserver plus one stub per model instance"
    x, _ = FraudTraffic(seed=6).sample(1)
    outcome: list[object] = []

    def call_sleepy() -> None:
        try:
            outcome.append(
                post_json(f"{server.url}/v2/models/fraud_sleepy/infer", v2_infer_body(x))
            )
        except OSError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call_sleepy)
    caller.start()
    time.sleep(0.5)  # the request is now inside fraud_sleepy's execute()
    server.stop(grace=grace)
    assert not server.running
    assert process_group_members(pids[0]) == []
    assert _alive(pids) == []
    caller.join(timeout=30)
    assert outcome, "the in-flight request must be answered or failed, not left hanging"


async def test_a_grpc_listener_on_the_port_reads_as_not_ready() -> None:
    """Sessions share the machine: a free port picked for Triton's HTTP endpoint can be taken by
    another gRPC server first. Its HTTP/2 answer is "not Triton yet" (then the bind failure
    re-picks the port), never a BadStatusLine that aborts the session's fixture."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        status = await asyncio.to_thread(_http_status, f"http://127.0.0.1:{port}/v2/health/ready")
    finally:
        await server.stop(None)
    assert status is None
