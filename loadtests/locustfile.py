"""locust scenarios for the Understudy gateway (headless: see loadtests/load.sh).

    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8080 -u 20 -r 10 -t 60s

Users:
- `InferenceUser` (FastHttpUser): a mix of KServe V2 calls the way real clients make them:
  fraud scoring with JSON tensors and with tritonclient's binary tensor extension
  (`Inference-Header-Content-Length`, built by tritonclient.http itself), price regression on a
  second route, and delayed ground truth: each user remembers the ids it was served and, once
  `LOADTEST_LABEL_DELAY_S` has passed, posts their labels to `POST /v2/feedback` in batches
  (`[{"request_id", "label"}]`), like a label pipeline that lags the traffic.
- `AdminUser` (only when `UNDERSTUDY_ADMIN_TOKEN` is set): one user that flips the fraud route's
  policy between `champion` and `epsilon_greedy` every few seconds through the admin API while
  inference runs, to show that live config changes do not fail in-flight traffic. The method and
  path are `LOADTEST_ADMIN_POLICY_METHOD` (PUT, falls back to POST on 405) on
  `/admin/routes/{route}/policy`.

Environment knobs: LOADTEST_SEED (traffic seed, default 11), LOADTEST_LABEL_DELAY_S (2),
LOADTEST_FRAUD_ROUTE ("fraud"), LOADTEST_PRICE_ROUTE ("price"; empty disables price calls),
LOADTEST_ADMIN_PERIOD_S (5), LOADTEST_SERVED_IDS_FILE (when set, the ids of every inference
answered with 200 are written there at exit, one a line: tests check each one was logged).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, between, constant, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `understudy_demo` without install

from understudy_demo.traffic import FraudTraffic, PriceTraffic

SEED = int(os.environ.get("LOADTEST_SEED", "11"))
LABEL_DELAY_S = float(os.environ.get("LOADTEST_LABEL_DELAY_S", "2"))
FRAUD_ROUTE = os.environ.get("LOADTEST_FRAUD_ROUTE", "fraud")
PRICE_ROUTE = os.environ.get("LOADTEST_PRICE_ROUTE", "price")
ADMIN_TOKEN = os.environ.get("UNDERSTUDY_ADMIN_TOKEN", "")
ADMIN_PERIOD_S = float(os.environ.get("LOADTEST_ADMIN_PERIOD_S", "5"))
ADMIN_METHOD = os.environ.get("LOADTEST_ADMIN_POLICY_METHOD", "PUT").upper()
SERVED_IDS_FILE = os.environ.get("LOADTEST_SERVED_IDS_FILE", "")
POOL = 4096  # rows sampled up front, so users spend no CPU on simulation during the run

_fraud_x, _fraud_y = FraudTraffic(SEED).sample(POOL)
_price_x, _price_y = PriceTraffic(SEED).sample(POOL)


def _inputs_json(row: np.ndarray) -> str:
    return json.dumps([{"name": "features", "shape": [1, int(row.shape[0])], "datatype": "FP32",
                        "data": [float(v) for v in row]}])


# Pre-serialised input tensors; a request only adds its id.
_FRAUD_JSON = [_inputs_json(r) for r in _fraud_x]
_PRICE_JSON = [_inputs_json(r) for r in _price_x]


_served_ids: list[str] = []


@events.quitting.add_listener
def _write_served_ids(**_: Any) -> None:
    if SERVED_IDS_FILE:
        Path(SERVED_IDS_FILE).write_text("".join(f"{rid}\n" for rid in _served_ids))


def json_request(inputs_json: str, request_id: str) -> bytes:
    return f'{{"id":"{request_id}","inputs":{inputs_json}}}'.encode()


def binary_request(row: np.ndarray, request_id: str) -> tuple[bytes, int]:
    """Exactly what tritonclient.http sends: JSON header + raw FP32 bytes, binary output asked."""
    import tritonclient.http as httpclient

    x = np.asarray(row, dtype=np.float32).reshape(1, -1)
    tensor = httpclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("score", binary_data=True)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [tensor], [out], request_id=request_id
    )
    return bytes(body), int(header_length)


def decode_binary_score(body: bytes, header_length: int) -> float:
    header = json.loads(body[:header_length])
    out = header["outputs"][0]
    if "data" in out:
        return float(out["data"][0])
    return float(np.frombuffer(body[header_length:header_length + 4], dtype="<f4")[0])


class InferenceUser(FastHttpUser):
    """A client application: scores requests and, later, reports what actually happened."""

    wait_time = between(0.005, 0.02)
    weight = 20

    def on_start(self) -> None:
        self.rng = random.Random(SEED ^ id(self))
        self.prefix = uuid.uuid4().hex[:8]
        self.counter = itertools.count()
        # (due time, request id, label) of served requests whose label is not yet posted
        self.pending: collections.deque[tuple[float, str, float]] = collections.deque()

    def _rid(self) -> str:
        return f"lt-{self.prefix}-{next(self.counter)}"

    def _served(self, request_id: str, label: float) -> None:
        if SERVED_IDS_FILE:
            _served_ids.append(request_id)
        if len(self.pending) < 10_000:
            self.pending.append((time.monotonic() + LABEL_DELAY_S, request_id, label))

    @task(6)
    def fraud_json(self) -> None:
        i = self.rng.randrange(POOL)
        rid = self._rid()
        with self.client.post(
            f"/v2/models/{FRAUD_ROUTE}/infer", data=json_request(_FRAUD_JSON[i], rid),
            headers={"Content-Type": "application/json"}, name="infer fraud (json)",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            payload = resp.json()
            score = payload["outputs"][0]["data"][0]
            if not 0.0 <= score <= 1.0 or payload.get("id", rid) != rid:
                resp.failure(f"bad answer {payload!r:.200}")
                return
            self._served(rid, float(_fraud_y[i]))

    @task(3)
    def fraud_binary(self) -> None:
        i = self.rng.randrange(POOL)
        rid = self._rid()
        body, header_length = binary_request(_fraud_x[i], rid)
        with self.client.post(
            f"/v2/models/{FRAUD_ROUTE}/infer", data=body,
            headers={"Content-Type": "application/octet-stream",
                     "Inference-Header-Content-Length": str(header_length)},
            name="infer fraud (binary)", catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            length = resp.headers.get("Inference-Header-Content-Length")
            try:
                score = decode_binary_score(resp.content or b"", int(length or 0)) if length \
                    else float(resp.json()["outputs"][0]["data"][0])
            except (ValueError, KeyError, IndexError) as exc:
                resp.failure(f"undecodable binary answer: {exc!r}")
                return
            if not 0.0 <= score <= 1.0:
                resp.failure(f"score out of range: {score}")
                return
            self._served(rid, float(_fraud_y[i]))

    @task(2)
    def price_json(self) -> None:
        if not PRICE_ROUTE:
            return
        i = self.rng.randrange(POOL)
        rid = self._rid()
        with self.client.post(
            f"/v2/models/{PRICE_ROUTE}/infer", data=json_request(_PRICE_JSON[i], rid),
            headers={"Content-Type": "application/json"}, name="infer price (json)",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            outputs = resp.json().get("outputs") or []
            if not outputs:
                resp.failure("no outputs")
                return
            self._served(rid, float(_price_y[i]))

    @task(1)
    def feedback(self) -> None:
        """Post the labels that have 'arrived' (older than the label delay), up to 200 at once."""
        now = time.monotonic()
        batch: list[dict[str, Any]] = []
        while self.pending and self.pending[0][0] <= now and len(batch) < 200:
            _, rid, label = self.pending.popleft()
            batch.append({"request_id": rid, "label": label})
        if not batch:
            return
        with self.client.post(
            "/v2/feedback", data=json.dumps(batch).encode(),
            headers={"Content-Type": "application/json"}, name="feedback (batch)",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
            elif resp.json().get("accepted") != len(batch):
                resp.failure(f"accepted {resp.json().get('accepted')} of {len(batch)}")


class AdminUser(FastHttpUser):
    """Flips the fraud route's policy during the run (only with UNDERSTUDY_ADMIN_TOKEN)."""

    wait_time = constant(ADMIN_PERIOD_S)
    weight = 1
    fixed_count = 1 if ADMIN_TOKEN else 0
    abstract = not ADMIN_TOKEN  # locust skips abstract users: no token, no admin traffic

    policies = ({"type": "epsilon_greedy", "epsilon": 0.1}, {"type": "champion"})

    def on_start(self) -> None:
        self.flip = itertools.cycle(self.policies)
        self.method = ADMIN_METHOD

    @task
    def change_policy(self) -> None:
        policy = next(self.flip)
        path = f"/admin/routes/{FRAUD_ROUTE}/policy"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        with self.client.request(self.method, path, data=json.dumps(policy).encode(),
                                 headers=headers, name=f"admin policy ({policy['type']})",
                                 catch_response=True) as resp:
            if resp.status_code == 405 and self.method == "PUT":
                self.method = "POST"  # the admin API's verb for this endpoint
                resp.success()
            elif resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
