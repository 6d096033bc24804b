"""The per-request metric families (gateway/metrics.py BatchedCounter / BatchedHistogram)
read exactly like prometheus_client's own, whenever they are read."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import FLUSH_EVERY, LATENCY_BUCKETS, BatchedCounter, BatchedHistogram


def _samples(registry: CollectorRegistry) -> list[tuple[str, str, object]]:
    """Every sample but the creation times; sums to 9 places (summation order differs)."""
    return sorted((s.name, repr(sorted(s.labels.items())),
                   "nan" if math.isnan(s.value) else round(s.value, 9))
                  for m in registry.collect() for s in m.samples
                  if not s.name.endswith("_created"))


def test_batched_families_read_like_prometheus_client_ones() -> None:
    plain, batched = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat", "d", ["route"], buckets=LATENCY_BUCKETS, registry=plain)
    h2 = BatchedHistogram("lat", "d", ["route"], buckets=LATENCY_BUCKETS, registry=batched)
    c1 = Counter("req", "d", ["code"], registry=plain)
    c2 = BatchedCounter("req", "d", ["code"], registry=batched)
    rng = random.Random(5)
    values = [rng.expovariate(200) for _ in range(3 * FLUSH_EVERY + 7)]
    values += [0.0005, 0.001, 10.0, 99.0, math.nan]  # on the bounds, past the last, NaN
    for i, value in enumerate(values):
        route = "a" if i % 3 else "b"
        h1.labels(route).observe(value)
        h2.labels(route).observe(value)
        c1.labels(str(i % 2)).inc(i % 4)
        c2.labels(str(i % 2)).inc(i % 4)
        if i == 100:  # a read in the middle applies what is pending, and later ones add to it
            assert _samples(plain) == _samples(batched)
    assert _samples(plain) == _samples(batched)
    assert generate_latest(batched).count(b"lat_bucket") == 2 * (len(LATENCY_BUCKETS) + 1)
