"""Helpers for landing-zone tests: datasets compared field by field, NaN-aware."""

from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np

from evaluator.dataset import EvalDataset


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        if a.dtype.kind == "f" and b.dtype.kind == "f":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool((a == b).all()) if a.size else True
    return a == b


def dataset_differences(a: EvalDataset, b: EvalDataset) -> list[str]:
    """Names of the fields (and model columns) where two datasets differ; empty when equal."""
    out: list[str] = []
    for f in fields(EvalDataset):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "models":
            if list(x) != list(y):
                out.append(f"models order {list(x)} != {list(y)}")
                continue
            for name in x:
                for g in fields(x[name]):
                    if not _same(getattr(x[name], g.name), getattr(y[name], g.name)):
                        out.append(f"models[{name}].{g.name}")
        elif f.name == "arm_probs":
            if sorted(x) != sorted(y) or not all(_same(x[k], y[k]) for k in x):
                out.append("arm_probs")
        elif f.name == "stats":
            if asdict(x) != asdict(y):
                out.append(f"stats {asdict(x)} != {asdict(y)}")
        elif not _same(x, y):
            out.append(f.name)
    return out


def _exact(value: object) -> bytes:
    """orjson's bytes keep their (several KB) output buffer; a million of them would not fit."""
    import orjson

    return memoryview(orjson.dumps(value)).tobytes()


def experiment_log(n: int, *, seed: int = 0, t0: float = 1.7e9) -> list[tuple[str, bytes, bytes]]:
    """(stream, key, value) records in production order for `n` requests over two routes:
    1% inference re-deliveries, labels for ~90% of requests (some before their inference,
    most after it, 3% duplicated, some corrected much later), a few bad records."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, bytes, bytes]] = []
    late: list[tuple[str, bytes, bytes]] = []
    for i in range(n):
        route = "fraud" if i % 3 else "price"
        rid = f"{route[0]}-{i:08d}"
        ts = t0 + i * 0.05
        champ, chal = f"{route}_v1", f"{route}_v2"
        score = float(rng.random())
        outputs = {
            champ: {"role": "champion", "mode": "served", "version": "1", "status": "ok",
                    "latency_ms": float(rng.gamma(2, 2)), "error": None,
                    "outputs": {"score": {"datatype": "FP32", "shape": [1, 1], "data": [score]}}},
            chal: {"role": "challenger", "mode": "shadow", "version": "2",
                   "status": "ok" if rng.random() > 0.02 else "error",
                   "latency_ms": float(rng.gamma(2, 3)), "error": None,
                   "experiment": f"{chal}:e1" if i < n // 2 else f"{chal}:e2",
                   "sample_rate": 1.0,
                   "outputs": {"score": {"datatype": "FP32", "shape": [1, 1],
                                         "data": [float(np.clip(score + rng.normal(0, .2),
                                                                0, 1))]}}},
        }
        rec = _exact({
            "schema_version": 1, "kind": "inference", "request_id": rid, "ts": ts,
            "route": route, "registry_version": 1 + (i >= n // 2), "policy": {"type": "champion"},
            "served": {"model": champ, "version": "1"}, "propensity": 1.0,
            "arms": {champ: 1.0}, "key": None,
            "inputs": {"x": {"datatype": "FP32", "shape": [1, 2],
                             "data": [float(rng.normal()), float(rng.normal())]}},
            "outputs": outputs, "status": 200, "gateway_latency_ms": 2.5})
        key = rid.encode()
        y = int(rng.random() < score)
        lab = _exact({"schema_version": 1, "kind": "label", "request_id": rid,
                            "label": y, "reward": None, "event_time": ts + 30,
                            "received_ts": ts + 60})
        u = rng.random()
        if u < 0.05:
            out.append(("labels", key, lab))  # the label before its inference
        out.append(("inferences", key, rec))
        if rng.random() < 0.01:
            out.append(("inferences", key, rec))  # at-least-once re-delivery
        if 0.05 <= u < 0.9:
            (late if u > 0.8 else out).append(("labels", key, lab))
        if rng.random() < 0.03:
            fixed = _exact({"schema_version": 1, "kind": "label", "request_id": rid,
                                  "label": 1 - y, "reward": None, "event_time": ts + 30,
                                  "received_ts": ts + 3600})
            late.append(("labels", key, fixed))  # a correction, much later
        if i % 5000 == 17:
            out.append(("inferences", key, b"{broken"))
    return out + late
