"""Prometheus collectors for the gateway.

Collectors are module-level (the one kind of global the codebase allows): prometheus_client's
registry is process-wide anyway, and every replica exports the same families. Label values are
route and model names, never request ids. Every family is documented in docs/METRICS.md, and the
deploy tests check that alert rules and the dashboard only use families defined here.
"""

from __future__ import annotations

import functools
import math
import weakref
from bisect import bisect_right
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample

Family = TypeVar("Family", bound=MetricWrapperBase)

# Observations a per-request family keeps before applying them (see BatchedHistogram).
FLUSH_EVERY = 256


class BatchedCounter(Counter):
    """A Counter for the per-request paths: `inc` adds to a plain number, applied to the
    locked value whenever the registry is read (a scrape, a test) or FLUSH_EVERY calls pass.

    Why: prometheus_client takes a lock per increment and per histogram bucket; with a dozen
    updates per request that was a measurable share of the gateway's CPU. Readers see exact
    values (collect applies what is pending first). Event-loop thread only.
    """

    def _metric_init(self) -> None:
        super()._metric_init()
        self._pending = 0.0
        self._pending_calls = 0

    def inc(self, amount: float = 1, exemplar: Any = None) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._pending += amount
        self._pending_calls += 1
        if self._pending_calls >= FLUSH_EVERY:
            self._apply()

    def _apply(self) -> None:
        if self._pending_calls:
            self._value.inc(self._pending)
            self._pending = 0.0
            self._pending_calls = 0

    def _child_samples(self) -> Any:
        self._apply()
        return super()._child_samples()


class BatchedHistogram(Histogram):
    """A Histogram for the per-request paths: `observe` appends to a list; bucket counts and
    the sum are applied in bulk (one locked update per bucket touched) when the registry is
    read or FLUSH_EVERY observations are pending. Same values as `Histogram`; loop thread only.
    """

    def _metric_init(self) -> None:
        super()._metric_init()
        self._pending: list[float] = []

    def observe(self, amount: float, exemplar: Any = None) -> None:
        pending = self._pending
        pending.append(amount)
        if len(pending) >= FLUSH_EVERY:
            self._apply()

    def _apply(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        # Sorted once, each bucket's count is a difference of two bisections (a value goes to
        # the first bound >= it): ~4x less CPU than a bisection per value. NaN lands in no
        # bucket, as Histogram.observe does (and would break the sort).
        values = [value for value in pending if value == value]
        values.sort()
        below = 0
        for bound, bucket in zip(self._upper_bounds, self._buckets, strict=True):
            upto = bisect_right(values, bound)
            if upto > below:
                bucket.inc(upto - below)
                below = upto
        self._sum.inc(math.fsum(pending))

    def _child_samples(self) -> Any:
        self._apply()
        return super()._child_samples()


class GaugeSource(Protocol):
    """An object whose current contribution to a LiveGauge is `gauge_value()`."""

    def gauge_value(self) -> float: ...


class LiveGauge(Gauge):
    """A Gauge whose value is the sum of its tracked sources' `gauge_value()`, read when the
    registry is read.

    Why: a gauge counted up and down per shadow copy takes prometheus_client's lock twice per
    copy; the lanes already hold the number. Sources are held weakly, so a lane replaced by a
    route change still counts while its copies finish and drops out once it is gone. `inc` /
    `dec` / `set` still add to the sum.
    """

    def _metric_init(self) -> None:
        super()._metric_init()
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def track(self, source: GaugeSource) -> None:
        self._sources.add(source)

    def _child_samples(self) -> Any:
        live = sum(s.gauge_value() for s in list(self._sources))
        return (Sample("", {}, self._value.get() + live, None, None),)


# Latency buckets in seconds: dense below 10 ms where the gateway's overhead lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))

REQUESTS = BatchedCounter(
    "understudy_requests",
    "Inference requests answered, by route, served model, HTTP status code and transport.",
    ["route", "model", "code", "protocol"],
)
REQUEST_ERRORS = Counter(
    "understudy_request_errors",
    "Inference requests answered with an error, by route and error kind.",
    ["route", "kind"],
)
REQUEST_LATENCY = BatchedHistogram(
    "understudy_request_latency_seconds",
    "End-to-end gateway latency as the client sees it.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
MODEL_LATENCY = BatchedHistogram(
    "understudy_model_latency_seconds",
    "Upstream (Triton) latency per model; role is champion|challenger, mode served|shadow|explore.",
    ["route", "model", "role", "mode"],
    buckets=LATENCY_BUCKETS,
)
OVERHEAD = BatchedHistogram(
    "understudy_gateway_overhead_seconds",
    "Gateway latency minus the served model's upstream latency.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
SHADOW_COPIES = BatchedCounter(
    "understudy_shadow_copies",
    "Copies of requests for challengers by outcome: sent, ok, error, timeout, shed, skipped.",
    ["route", "model", "outcome"],
)
SHADOW_INFLIGHT = LiveGauge(
    "understudy_shadow_inflight",
    "Shadow copies in flight or queued per challenger (bounded by its limits).",
    ["route", "model"],
)
SHADOW_BATCH_ROWS = BatchedHistogram(
    "understudy_shadow_batch_rows",
    "Rows per upstream call of a batching shadow lane (copies coalesced into one Triton request).",
    ["route", "model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
AGREEMENT = BatchedCounter(
    "understudy_agreement",
    "Champion–challenger comparisons on the same request: agree / disagree on the predicted class.",
    ["route", "model", "result"],
)
SCORE = BatchedHistogram(
    "understudy_prediction_score",
    "Prediction scores (first element of the first output) per model, for prediction drift.",
    ["route", "model"],
    buckets=SCORE_BUCKETS,
)
PREDICTED_CLASS = BatchedCounter(
    "understudy_predicted_class",
    "Predicted class counts per model (score >= threshold), for class-share drift.",
    ["route", "model", "predicted_class"],
)
ARM_SELECTIONS = Counter(
    "understudy_arm_selections",
    "Exploration decisions: which arm served the request.",
    ["route", "model", "policy"],
)
PROPENSITY = Histogram(
    "understudy_propensity",
    "Propensity of the served arm at decision time.",
    ["route", "policy"],
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0),
)
POSTERIOR_MEAN = Gauge(
    "understudy_posterior_mean",
    "Thompson sampling: current Beta posterior mean reward per arm.",
    ["route", "model"],
)
REWARDS = Counter(
    "understudy_rewards",
    "Rewards received through the feedback path: matched, unknown (id not remembered), late.",
    ["route", "outcome"],
)
LOG_RECORDS = Counter(
    "understudy_log_records",
    "Log records by stream and outcome: accepted (handed to the sink), produced (acked by "
    "Kafka), written (file sink), spilled, replayed, dropped, oversized.",
    ["stream", "outcome"],
)
LOG_BUFFERED = LiveGauge(
    "understudy_log_buffered_records",
    "Records accepted by the log sink but not yet durable.",
    ["sink"],
)
LOG_SPILL_BYTES = Gauge(
    "understudy_log_spill_bytes",
    "Bytes held in the local spill buffer waiting for Kafka.",
)
LOG_SPILL_FULL = Gauge(
    "understudy_log_spill_full",
    "1 while the spill buffer is at its disk budget.",
)
KAFKA_PRODUCER_ERRORS = Counter(
    "understudy_kafka_producer_errors",
    "Kafka produce failures by error type.",
    ["error"],
)
KAFKA_UP = Gauge(
    "understudy_kafka_connected",
    "1 when the Kafka producer is connected and delivering, else 0.",
)
FEEDBACK_ITEMS = Counter(
    "understudy_feedback_items",
    "Feedback items received: accepted or rejected.",
    ["outcome"],
)
REGISTRY_CHANGES = Counter(
    "understudy_registry_changes",
    "Control-plane changes applied, by route and action.",
    ["route", "action"],
)

ROLLOUT_FRACTION = Gauge(
    "understudy_rollout_fraction",
    "Share of a route's requests served by the challenger of its running guarded rollout "
    "(0 when none runs).",
    ["route"],
)
ROLLOUT_TRANSITIONS = Counter(
    "understudy_rollout_transitions",
    "Guarded-rollout transitions made by this replica: started, advanced, completed, "
    "rolled_back, aborted.",
    ["route", "event"],
)
ROLLOUT_EVALUE = Gauge(
    "understudy_rollout_evalue",
    "E-value of harm per guard (errors, latency, reward) in the current rollout step; the step "
    "rolls back when it reaches 1/alpha.",
    ["route", "guard"],
)


@functools.cache
def child(family: Family, *labels: str) -> Family:
    """`family.labels(*labels)`, memoised for the per-request paths.

    prometheus_client validates and locks on every `labels()` call; with 8–12 lookups per
    request that was ~4% of the gateway's CPU. Label values are route, model and outcome names,
    a small bounded set, so the cache stays small.
    """
    return family.labels(*labels)
