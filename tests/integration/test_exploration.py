"""Exploration through real Triton and the feedback endpoint: propensities, counterfactuals,
rewards moving traffic to the better model, state surviving a restart."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.conftest import GatewayFactory, fraud_body
from understudy_demo.traffic import FraudTraffic

pytestmark = pytest.mark.triton


def explore_route(policy: dict) -> dict:
    return {"fraud": {
        "champion": {"model": "fraud_v3"},
        "challengers": [{"model": "fraud_v5", "mode": "explore", "max_queue": 500},
                        {"model": "fraud_v4", "mode": "shadow", "max_queue": 500}],
        "policy": policy,
    }}


async def serve(gw, x: np.ndarray, prefix: str, headers: dict | None = None) -> list[str]:
    async def one(i: int) -> str:
        resp = await gw.post_json("/v2/models/fraud/infer",
                                  fraud_body([x[i].tolist()], f"{prefix}{i}"), headers)
        assert resp.status == 200
        return resp.headers["X-Served-Model"]

    served: list[str] = []
    for start in range(0, len(x), 50):
        served += await asyncio.gather(*(one(i) for i in range(start, min(start + 50, len(x)))))
    return served


async def test_epsilon_greedy_logs_propensity_and_every_arms_score(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(explore_route({"type": "epsilon_greedy", "epsilon": 0.5}))
    x, _ = FraudTraffic(seed=11).sample(200)
    served = await serve(gw, x, "e")
    await gw.stop()
    records = gw.records()
    assert len(records) == 200
    for r, arm in zip(sorted(records, key=lambda r: int(r["request_id"][1:])), served,
                      strict=True):
        assert r["served"]["model"] == arm
        assert r["policy"]["type"] == "epsilon_greedy"
        # No rewards yet: the champion is greedy, 1 - eps + eps/K; the other arm eps/K.
        expected = 0.75 if arm == "fraud_v3" else 0.25
        assert r["propensity"] == pytest.approx(expected)
        assert r["arms"] == pytest.approx({"fraud_v3": 0.75, "fraud_v5": 0.25})
        # Every arm scored every request: the unserved arm ran as a counterfactual copy.
        assert {m for m, o in r["outputs"].items() if o["status"] == "ok"} == {
            "fraud_v3", "fraud_v4", "fraud_v5"}
    share = served.count("fraud_v5") / len(served)
    assert 0.15 < share < 0.35  # Binomial(200, 0.25): > 4 standard deviations of margin


async def test_thompson_moves_traffic_to_the_better_model_and_survives_restart(
    make_gateway: GatewayFactory, tmp_path,
) -> None:
    # Reward = the served prediction was right. fraud_v5 is miscalibrated (over-predicts fraud)
    # so at threshold 0.5 it is right less often than fraud_v3.
    route = explore_route({"type": "thompson", "reward": "correct"})
    route["fraud"]["challengers"] = [{"model": "fraud_v5", "mode": "explore", "max_queue": 500}]
    route["fraud"]["threshold"] = 0.2
    state = {"state_path": str(tmp_path / "shared" / "registry.json"),
             "rewards_path": str(tmp_path / "shared" / "rewards.jsonl")}
    gw = await make_gateway(route, admin=state)
    traffic = FraudTraffic(seed=12)
    for round_ in range(6):
        x, y = traffic.sample(150)
        await serve(gw, x, f"t{round_}-")
        await asyncio.sleep(0.3)  # records (and the served scores) complete in the background
        labels = [{"request_id": f"t{round_}-{i}", "label": int(y[i])} for i in range(150)]
        resp = await gw.post_json("/v2/feedback", labels)
        assert resp.status == 200
        await asyncio.sleep(0.5)  # the reward bus applies events as it reads them back
    x, _ = traffic.sample(300)
    served = await serve(gw, x, "final-")
    assert served.count("fraud_v3") / len(served) > 0.6
    text = await (await gw.session.get(gw.url + "/metrics")).text()
    assert 'understudy_rewards_total{outcome="matched",route="fraud"}' in text
    assert 'understudy_posterior_mean{model="fraud_v3",route="fraud"}' in text
    await gw.stop()
    probabilities = gw.records()[-1]["arms"]
    # A new gateway on the same state rebuilds the same posterior from the reward log.
    again = await make_gateway(route, admin=state)
    x, _ = traffic.sample(1)
    await serve(again, x, "after-restart-")
    await again.stop()
    assert again.records()[-1]["arms"] == pytest.approx(probabilities, abs=0.02)
