"""KafkaSink against the real broker: delivery, broker restarts, spill replay, limits.

Timeouts are short (request/delivery timeouts 2 s) so a silent broker is given up on in ~2 s;
a refusing one is detected by the sink's guard within `max_unspilled_ms`. A broker restart
itself takes ~5 s on these machines.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY

from gateway.backends.factory import build_sink
from gateway.backends.kafka_sink import KafkaSink
from gateway.backends.sink import LogSink
from gateway.backends.spill import SEGMENT_SUFFIX
from gateway.config import KafkaConfig, parse_config
from gateway.errors import ConfigError
from tests.support.kafka import KafkaBroker, consume_all, load_broker_module

pytestmark = pytest.mark.kafka

FAST: dict[str, Any] = {
    "request_timeout_ms": 2000,
    "delivery_timeout_ms": 2000,
    "retry_backoff_ms": 100,
    "reconnect_backoff_max_ms": 500,
    "metadata_max_age_ms": 2000,
    "close_timeout_ms": 5000,
}


def config(bootstrap: str, topic: str, **overrides: Any) -> KafkaConfig:
    return KafkaConfig(bootstrap=bootstrap, topic=topic, labels_topic=f"{topic}.labels",
                       audit_topic=f"{topic}.audit", linger_ms=5, compression="gzip",
                       **{**FAST, **overrides})


def dead_bootstrap() -> str:
    """An address where nothing listens: a broker that is down from the start."""
    return f"127.0.0.1:{load_broker_module().free_port()}"


def count(outcome: str, stream: str = "inferences") -> float:
    value = REGISTRY.get_sample_value("understudy_log_records_total",
                                      {"stream": stream, "outcome": outcome})
    return value or 0.0


def value_for(i: int, size: int = 200) -> bytes:
    return b'{"i":%d,"pad":"%s"}' % (i, b"x" * size)


async def wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def keys_of(records: list[Any]) -> list[str]:
    return [r.key.decode() for r in records]


async def test_is_a_log_sink(tmp_path: Path) -> None:
    sink = KafkaSink(config(dead_bootstrap(), "unused"), tmp_path / "spill")
    assert isinstance(sink, LogSink)


async def test_delivers_every_record_exactly_once(kafka: KafkaBroker, kafka_topic: str,
                                                  tmp_path: Path) -> None:
    n = 3000
    produced = count("produced")
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic), tmp_path / "spill")
    await sink.start()
    for i in range(n):
        sink.emit("inferences", f"req-{i}", value_for(i))
    for i in range(10):
        sink.emit("labels", f"req-{i}", b'{"label":1}')
    sink.emit("audit", "change-1", b'{"who":"test"}')
    await sink.flush()
    await sink.close()

    records = await consume_all(kafka.bootstrap, kafka_topic, count=n)
    assert len(records) == n
    assert set(keys_of(records)) == {f"req-{i}" for i in range(n)}
    assert [r.value for r in records] == [value_for(i) for i in range(n)]  # one partition
    labels = await consume_all(kafka.bootstrap, f"{kafka_topic}.labels", count=10)
    assert sorted(keys_of(labels)) == sorted(f"req-{i}" for i in range(10))
    audit = await consume_all(kafka.bootstrap, f"{kafka_topic}.audit", count=1)
    assert keys_of(audit) == ["change-1"]
    assert count("produced") - produced == n
    assert not list((tmp_path / "spill").glob(f"*{SEGMENT_SUFFIX}"))


@pytest.mark.parametrize(("burst", "size"), [(20, 200), (400, 600)], ids=["paced", "bursts"])
async def test_broker_restart_mid_stream_loses_nothing(kafka: KafkaBroker, kafka_topic: str,
                                                       tmp_path: Path, burst: int,
                                                       size: int) -> None:
    """Records emitted while the broker stops and restarts all arrive. Bursts (same mean rate)
    fill whole batches, so the outage fails batches rather than single records: every record of
    a failed batch goes to the spill and is replayed. A record that never went to the spill
    arrives exactly once, so every duplicate is a spilled one (a batch acknowledged late, or
    its copy replayed): at-least-once, deduplicated by request id downstream."""
    spilled, replayed = count("spilled"), count("replayed")
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic), tmp_path / "spill")
    to_spill: list[str] = []
    append_span = sink.spill.append_span

    def spy(records: Any) -> Any:
        written, span = append_span(records)
        to_spill.extend(r.key for r in records[:written])
        return written, span

    sink.spill.append_span = spy  # type: ignore[method-assign]
    await sink.start()
    emitted: list[str] = []

    async def emit(n: int, pause: float) -> None:
        for _ in range(n):
            key = f"req-{len(emitted)}"
            sink.emit("inferences", key, value_for(len(emitted), size))
            emitted.append(key)
            if len(emitted) % burst == 0:
                await asyncio.sleep(pause * burst / 20)

    try:
        await emit(1000, 0.005)
        stopping = asyncio.ensure_future(asyncio.to_thread(kafka.stop))
        while not stopping.done():
            await emit(burst, 0.01)
        await emit(1000, 0.005)  # broker down
        starting = asyncio.ensure_future(asyncio.to_thread(kafka.start))
        while not starting.done():
            await emit(burst, 0.01)
        await starting
        await emit(1000, 0.002)
        await sink.flush()
        assert await wait_for(sink.spill.is_empty, 60), "spill did not drain after restart"
    finally:
        await sink.close()
        kafka.start()

    records = await consume_all(kafka.bootstrap, kafka_topic, count=len(emitted), wait_s=60)
    seen = Counter(keys_of(records))
    assert set(seen) == set(emitted), f"missing: {sorted(set(emitted) - set(seen))[:10]}"
    duplicated = {k for k, n in seen.items() if n > 1}
    assert duplicated <= set(to_spill), sorted(duplicated - set(to_spill))[:10]
    assert to_spill, "the outage did not go through the spill"
    assert count("spilled") - spilled == len(to_spill)  # the spill's writes, all counted
    assert count("replayed") > replayed  # ...and back out of it
    print(f"emitted={len(emitted)} spilled={len(to_spill)} "
          f"duplicates={sum(seen.values()) - len(seen)} "
          f"replayed={count('replayed') - replayed:.0f}")


async def test_shutdown_during_outage_is_delivered_by_next_start(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    """SIGTERM while the broker is down: close() spills, the next sink replays in order."""
    spill_dir = tmp_path / "spill"
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic), spill_dir)
    await sink.start()
    try:
        for i in range(500):
            sink.emit("inferences", f"req-{i}", value_for(i))
        await sink.flush()  # delivered while the broker is up
        await asyncio.to_thread(kafka.stop)
        for i in range(500, 1500):
            sink.emit("inferences", f"req-{i}", value_for(i))
            if i % 100 == 0:
                await asyncio.sleep(0.01)
        began = time.monotonic()
        await sink.close()  # records still in flight / queued: bounded, then spilled
        assert time.monotonic() - began < FAST["close_timeout_ms"] / 1000 + 5
        assert list(spill_dir.glob(f"*{SEGMENT_SUFFIX}")), "nothing was spilled"
        with pytest.raises(RuntimeError):
            sink.emit("inferences", "late", b"{}")
    finally:
        await asyncio.to_thread(kafka.start)

    replayed = count("replayed")
    successor = KafkaSink(config(kafka.bootstrap, kafka_topic), spill_dir)
    await successor.start()
    try:
        assert await wait_for(successor.spill.is_empty, 30), "leftover spill was not replayed"
    finally:
        await successor.close()
    assert count("replayed") > replayed
    assert not list(spill_dir.glob(f"*{SEGMENT_SUFFIX}")), "replayed segments were not deleted"

    records = await consume_all(kafka.bootstrap, kafka_topic, count=1500)
    got = keys_of(records)
    assert set(got) == {f"req-{i}" for i in range(1500)}
    first_seen = list(dict.fromkeys(got))
    assert first_seen == [f"req-{i}" for i in range(1500)]  # replayed in emit order


async def test_spill_left_by_a_dead_broker_run_is_replayed_in_order(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "spill"
    down = KafkaSink(config(dead_bootstrap(), kafka_topic), spill_dir)
    await down.start()
    for i in range(300):
        down.emit("inferences", f"req-{i}", value_for(i))
    await down.flush()  # broker down: flush means "on local disk"
    assert down.spill.pending_bytes > 0
    assert REGISTRY.get_sample_value("understudy_kafka_connected") == 0
    await down.close()

    up = KafkaSink(config(kafka.bootstrap, kafka_topic), spill_dir)
    await up.start()
    try:
        assert await wait_for(up.spill.is_empty, 30)
        assert await wait_for(
            lambda: REGISTRY.get_sample_value("understudy_kafka_connected") == 1, 5)
    finally:
        await up.close()
    records = await consume_all(kafka.bootstrap, kafka_topic, count=300)
    assert keys_of(records) == [f"req-{i}" for i in range(300)]  # exactly once, in order


async def test_oversized_record_is_set_aside_visibly(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    oversized = count("oversized")
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic, max_request_bytes=64 * 1024),
                     tmp_path / "spill")
    await sink.start()
    big = b'{"blob":"' + b"y" * 100_000 + b'"}'
    for i in range(10):
        sink.emit("inferences", f"req-{i}", value_for(i))
    sink.emit("inferences", "big/../1", big)
    for i in range(10, 20):
        sink.emit("inferences", f"req-{i}", value_for(i))
    await sink.flush()
    await sink.close()

    assert count("oversized") - oversized == 1
    (path,) = (tmp_path / "oversized" / "inferences").iterdir()
    assert path.read_bytes() == big
    assert "big_.._1" in path.name  # key sanitised for the file name
    assert str(path) in caplog.text
    records = await consume_all(kafka.bootstrap, kafka_topic, count=20)
    assert sorted(keys_of(records)) == sorted(f"req-{i}" for i in range(20))


async def test_record_refused_by_broker_is_isolated_and_set_aside(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    """A topic with a smaller max.message.bytes than the producer's limit: only the big record
    is set aside; the small ones that shared its batch are still delivered."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(kafka_topic, 1, 1,
                                             topic_configs={"max.message.bytes": "20000"})])
    finally:
        await admin.close()
    oversized = count("oversized")
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic), tmp_path / "spill")
    await sink.start()
    incompressible = base64.b64encode(os.urandom(60_000))
    for i in range(30):
        sink.emit("inferences", f"req-{i}", value_for(i, size=50))
        if i == 15:
            sink.emit("inferences", "huge", incompressible)
    await sink.flush()
    await sink.close()

    assert count("oversized") - oversized == 1
    (path,) = (tmp_path / "oversized" / "inferences").iterdir()
    assert path.read_bytes() == incompressible
    records = await consume_all(kafka.bootstrap, kafka_topic, count=30)
    assert set(keys_of(records)) == {f"req-{i}" for i in range(30)}


async def test_spill_at_budget_holds_then_drops_newest_loudly(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Documented limit: spill full -> memory up to 2x the queue bound -> drop the newest."""
    n, bound = 400, 20
    spill_dir = tmp_path / "spill"
    spilled, dropped = count("spilled"), count("dropped")
    sink = KafkaSink(config(dead_bootstrap(), kafka_topic, spill_budget_bytes=40 * 1024),
                     spill_dir, max_buffered_records=bound)
    await sink.start()
    for i in range(n):
        sink.emit("inferences", f"req-{i}", value_for(i, size=900))
        if i % 10 == 0:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)
    on_disk = int(count("spilled") - spilled)
    held = sink.queued
    assert 0 < on_disk < n
    assert held <= 2 * bound
    assert count("dropped") - dropped == n - on_disk - held
    assert sink.spill.full
    assert REGISTRY.get_sample_value("understudy_log_spill_full") == 1
    assert "spill buffer FULL" in caplog.text
    assert "DROPPED" in caplog.text
    await sink.close()  # what is only in memory cannot be spilled either: dropped, counted
    assert count("dropped") - dropped == n - on_disk

    successor = KafkaSink(config(kafka.bootstrap, kafka_topic), spill_dir)
    await successor.start()
    try:
        assert await wait_for(successor.spill.is_empty, 30)
    finally:
        await successor.close()
    assert REGISTRY.get_sample_value("understudy_log_spill_full") == 0
    records = await consume_all(kafka.bootstrap, kafka_topic, count=on_disk)
    assert keys_of(records) == [f"req-{i}" for i in range(on_disk)]  # the oldest survive


async def test_queue_overflow_spills_instead_of_blocking(kafka: KafkaBroker, kafka_topic: str,
                                                         tmp_path: Path) -> None:
    """A burst far above the memory bound: emit stays fast, overflow goes to disk, then Kafka."""
    n = 5000
    spilled = count("spilled")
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic), tmp_path / "spill",
                     max_buffered_records=100)
    await sink.start()
    for i in range(n):  # emit is synchronous: it can only hold memory, never wait on Kafka
        sink.emit("inferences", f"req-{i}", value_for(i))
    assert sink.queued <= 200
    await sink.flush()
    assert await wait_for(sink.spill.is_empty, 30)
    await sink.close()
    assert count("spilled") > spilled
    records = await consume_all(kafka.bootstrap, kafka_topic, count=n)
    assert len(records) == n
    assert set(keys_of(records)) == {f"req-{i}" for i in range(n)}


async def create_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        await admin.close()


async def test_inference_batches_spread_over_partitions_keyed_streams_keep_key_order(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    """Inference records go out in batches on rotating partitions (every partition gets some,
    each keeps the emit order); labels keep key partitioning: one partition per key, in order."""
    labels_topic = f"{kafka_topic}.labels"
    await create_topics(kafka.bootstrap, [kafka_topic, labels_topic], partitions=3)
    n, label_keys, label_rounds = 3000, 6, 5
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic), tmp_path / "spill")
    await sink.start()
    try:
        for i in range(n):
            sink.emit("inferences", f"req-{i}", value_for(i))
            if i % 100 == 99:
                await asyncio.sleep(0.01)
        for r in range(label_rounds):
            for k in range(label_keys):
                sink.emit("labels", f"lab-{k}", b'{"round":%d}' % r)
            await asyncio.sleep(0.01)
        await sink.flush()
    finally:
        await sink.close()

    records = await consume_all(kafka.bootstrap, kafka_topic, count=n)
    assert sorted(keys_of(records)) == sorted(f"req-{i}" for i in range(n))  # each once
    per_partition: dict[int, list[int]] = {}
    for r in records:
        per_partition.setdefault(r.partition, []).append(int(r.key.decode()[4:]))
    assert set(per_partition) == {0, 1, 2}, {p: len(v) for p, v in per_partition.items()}
    for indices in per_partition.values():
        assert indices == sorted(indices)  # emit order within each partition
    labels = await consume_all(kafka.bootstrap, labels_topic, count=label_keys * label_rounds)
    assert len(labels) == label_keys * label_rounds
    for k in range(label_keys):
        mine = [r for r in labels if r.key == f"lab-{k}".encode()]
        assert len({r.partition for r in mine}) == 1  # keyed: one partition per key
        assert [r.value for r in mine] == [b'{"round":%d}' % r for r in range(label_rounds)]


async def test_emit_rejects_unknown_stream(tmp_path: Path) -> None:
    sink = KafkaSink(config(dead_bootstrap(), "unused"), tmp_path / "spill")
    with pytest.raises(ValueError, match="unknown log stream"):
        sink.emit("nope", "k", b"{}")


async def test_records_coming_back_from_a_full_spill_keep_the_hard_bound(tmp_path: Path) -> None:
    """A spill write that could not take its chunk puts it back at the head while emit() kept
    queueing: beyond twice the queue bound the newest are dropped (what the load race hit)."""
    bound = 5
    sink = KafkaSink(config(dead_bootstrap(), "unused"), tmp_path / "spill",
                     max_buffered_records=bound)
    dropped = count("dropped")
    newer = [(10 + i, "inferences", f"new-{i}", b"{}", 0.0) for i in range(2 * bound)]
    for record in newer:
        sink._enqueue(record)
    older = [(i, "inferences", f"old-{i}", b"{}", 0.0) for i in range(3)]
    sink._requeue_front(older)
    assert sink.queued == 2 * bound
    assert [q[2] for q in sink._queue] == [*(q[2] for q in older), *(q[2] for q in newer[:-3])]
    assert count("dropped") - dropped == 3


# ---------------------------------------------------------------- the max_unspilled_ms bound

# Timeouts far above anything the tests wait for: whatever the sink does within them, it did
# because of max_unspilled_ms and the connection probe, not because aiokafka gave up.
PATIENT: dict[str, Any] = {"request_timeout_ms": 120_000, "delivery_timeout_ms": 120_000,
                           "max_unspilled_ms": 1000}


def spilled_keys(sink: KafkaSink) -> set[str]:
    return {r.key for r in sink.spill.peek(1_000_000, 1 << 30).records}


async def emit_paced(sink: KafkaSink, keys: list[str], every: int = 20) -> None:
    for n, key in enumerate(keys):
        sink.emit("inferences", key, value_for(n))
        if n % every == every - 1:
            await asyncio.sleep(0.01)


async def test_refused_connection_marks_the_sink_down_and_spills_without_waiting_for_timeouts(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: the sink waited request_timeout_ms with no progress before spilling, and a
    refused connection did not mark it down. Now the guard probes a stuck flight's brokers:
    refused on every address is "down" at once, with a WARNING; the INFO after the replay
    carries the counts."""
    caplog.set_level(logging.INFO, logger="gateway.backends.kafka_sink")
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic, **PATIENT), tmp_path / "spill")
    await sink.start()
    before = [f"before-{i}" for i in range(200)]
    during = [f"during-{i}" for i in range(300)]
    try:
        await emit_paced(sink, before)
        await sink.flush()
        await asyncio.to_thread(kafka.stop)
        await emit_paced(sink, during)
        # Far below the 120 s timeouts: only the guard can have put them there.
        assert await wait_for(lambda: set(during) <= spilled_keys(sink), 60), (
            f"{len(set(during) - spilled_keys(sink))} records still only in memory")
        # The probe runs beside the spilling: it may conclude a moment after the last copy.
        assert await wait_for(lambda: sink._down, 5)  # still far below the 120 s timeouts
        assert REGISTRY.get_sample_value("understudy_kafka_connected") == 0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("unreachable" in r.getMessage() and "connection refused" in r.getMessage()
                   for r in warnings), [r.getMessage() for r in warnings]
    finally:
        await asyncio.to_thread(kafka.start)
    try:
        assert await wait_for(sink.spill.is_empty, 60), "spill did not drain after restart"
        await sink.flush()
    finally:
        await sink.close()
    drained = [r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO and "spill drained" in r.getMessage()]
    assert drained, "no INFO when the spill drained"
    print(drained[-1])
    records = await consume_all(kafka.bootstrap, kafka_topic, count=500, wait_s=60)
    assert set(keys_of(records)) == set(before) | set(during)


async def test_frozen_broker_records_reach_the_spill_by_age_and_copies_are_discarded(
    kafka: KafkaBroker, kafka_topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that accepts connections but never answers (SIGSTOP) cannot be told from a
    slow one, so the sink is not "down"; its records reach the spill by age all the same. When
    the broker resumes and acknowledges the flight, the flight's copies are discarded."""
    pid = load_broker_module().status(kafka.directory).pid  # type: ignore[union-attr]
    sink = KafkaSink(config(kafka.bootstrap, kafka_topic, **PATIENT), tmp_path / "spill")
    await sink.start()
    before = [f"before-{i}" for i in range(200)]
    during = [f"during-{i}" for i in range(300)]
    try:
        await emit_paced(sink, before)
        await sink.flush()
        os.kill(pid, signal.SIGSTOP)
        try:
            await emit_paced(sink, during)
            assert await wait_for(lambda: set(during) <= spilled_keys(sink), 60), (
                f"{len(set(during) - spilled_keys(sink))} records still only in memory")
            assert not sink._down  # connections are accepted: nothing says it is down
            assert "going to the local spill" in caplog.text
        finally:
            os.kill(pid, signal.SIGCONT)
        await sink.flush()
        assert await wait_for(sink.spill.is_empty, 60), "spill did not drain after SIGCONT"
    finally:
        await sink.close()
    records = await consume_all(kafka.bootstrap, kafka_topic, count=500, wait_s=60)
    keys = keys_of(records)
    assert set(keys) == set(before) | set(during)
    print(f"frozen broker: {len(keys)} records for 500 emitted, "
          f"{len(keys) - len(set(keys))} duplicates")


def test_producer_timings_and_the_bound_come_from_the_config(tmp_path: Path) -> None:
    raw = {"log": {"sink": "kafka", "path": str(tmp_path),
                   "kafka": {"max_unspilled_ms": 400, "request_timeout_ms": 7000}}}
    env = {"UNDERSTUDY_LOG_KAFKA_DELIVERY_TIMEOUT_MS": "9000",
           "UNDERSTUDY_LOG_KAFKA_RETRY_BACKOFF_MS": "50",
           "UNDERSTUDY_LOG_KAFKA_LINGER_MS": "2"}
    cfg = parse_config(raw, env)
    kafka = cfg.log.kafka
    assert (kafka.max_unspilled_ms, kafka.request_timeout_ms, kafka.delivery_timeout_ms,
            kafka.retry_backoff_ms, kafka.linger_ms) == (400, 7000, 9000, 50, 2)
    sink = build_sink(cfg)
    assert isinstance(sink, KafkaSink)
    assert sink.max_unspilled == 0.4
    assert sink._producer_kwargs["request_timeout_ms"] == 7000
    assert sink._producer_kwargs["retry_backoff_ms"] == 50
    assert sink._delivery_timeout == 9.0
    assert KafkaConfig().max_unspilled_ms <= 1000


@pytest.mark.parametrize(("kafka_raw", "message"), [
    ({"max_unspilled_ms": 5}, "max_unspilled_ms: must be >= 20"),
    ({"max_unspilled_ms": 5000, "delivery_timeout_ms": 3000}, "below delivery_timeout_ms"),
    ({"request_timeout_ms": 0}, "request_timeout_ms: must be positive"),
    ({"retry_backoff_ms": "soon"}, "expected a number"),
])
def test_bad_log_kafka_timings_are_refused(kafka_raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"log": {"kafka": kafka_raw}}, {})
