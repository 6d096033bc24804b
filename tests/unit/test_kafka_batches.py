"""KafkaSink's batched sends, against a stand-in producer whose batch outcomes the test picks.

Real aiokafka batches (`BatchBuilder`) are built and read back; only the network is replaced, so
a batch can be failed on purpose and what happens to each of its records checked exactly. The
same paths against the real broker (restart mid-stream, partitions): tests/integration/
test_kafka_sink.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotLeaderForPartitionError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from prometheus_client import REGISTRY

from gateway.backends.kafka_buffer import Queued
from gateway.backends.kafka_sink import KafkaSink
from gateway.config import KafkaConfig

PARTITIONS = {0, 1, 2}


class StandInProducer:
    """create_batch/send_batch/send as aiokafka's producer has them; `fail` picks which batches
    (by 0-based send order) fail, and with what."""

    def __init__(self, fail: dict[int, BaseException] | None = None,
                 batch_bytes: int = 4096) -> None:
        self.fail = fail or {}
        self.batch_bytes = batch_bytes
        self.batches: list[tuple[str, int, list[str]]] = []  # (topic, partition, keys)
        self.sent: list[tuple[str, str]] = []  # send() per record: (topic, key)
        self.client = SimpleNamespace(cluster=SimpleNamespace(
            available_partitions_for_topic=lambda _topic: set(PARTITIONS)))

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_bytes, 0)  # 0: no compression

    async def partitions_for(self, _topic: str) -> set[int]:
        return set(PARTITIONS)

    async def send_batch(self, builder: BatchBuilder, topic: str, *,
                         partition: int) -> asyncio.Future[Any]:
        assert builder.closed()
        batch = MemoryRecords(bytes(builder._build())).next_batch()
        keys = [r.key.decode() for r in batch]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        error = self.fail.get(len(self.batches))
        self.batches.append((topic, partition, keys))
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
        return future

    async def send(self, topic: str, _value: bytes, key: bytes) -> asyncio.Future[Any]:
        self.sent.append((topic, key.decode()))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def count(outcome: str, stream: str = "inferences") -> float:
    value = REGISTRY.get_sample_value("understudy_log_records_total",
                                      {"stream": stream, "outcome": outcome})
    return value or 0.0


def queued(n: int, stream: str = "inferences", prefix: str = "req") -> list[Queued]:
    now = time.monotonic()
    return [(i + 1, stream, f"{prefix}-{i}", b'{"i":%d,"pad":"%s"}' % (i, b"x" * 200), now)
            for i in range(n)]


@pytest.fixture
def sink(tmp_path: Path) -> Any:
    sink = KafkaSink(KafkaConfig(bootstrap="127.0.0.1:1", topic="inf", labels_topic="lab",
                                 audit_topic="aud"), tmp_path / "spill")
    sink.spill.open()
    yield sink
    sink.spill.close()


async def test_a_failed_batch_sends_every_one_of_its_records_to_the_spill_then_replays_once(
    sink: KafkaSink,
) -> None:
    chunk = queued(60)
    producer = StandInProducer(fail={1: KafkaTimeoutError("batch expired")})
    sink._producer = producer  # type: ignore[assignment]
    produced, spilled, replayed = count("produced"), count("spilled"), count("replayed")

    assert not await sink._send_queued(chunk)  # a batch failed: the sink is down

    assert len(producer.batches) >= 3  # ~16 records of ~230 B fit a 4 KiB batch
    failed_keys = producer.batches[1][2]
    ok_keys = [k for i, (_, _, keys) in enumerate(producer.batches) if i != 1 for k in keys]
    assert sorted(failed_keys + ok_keys) == sorted(q[2] for q in chunk)  # each sent once
    on_disk = [r.key for r in sink.spill.peek(1000, 1 << 30).records]
    assert on_disk == failed_keys  # the whole failed batch, in emit order, nothing else
    assert count("spilled") - spilled == len(failed_keys)
    assert count("produced") - produced == len(ok_keys)
    assert sink._down

    producer = StandInProducer()
    sink._producer = producer  # type: ignore[assignment]
    assert await sink._replay_once()
    assert [k for _, _, keys in producer.batches for k in keys] == failed_keys  # once each
    assert sink.spill.is_empty()
    assert count("replayed") - replayed == len(failed_keys)
    assert count("produced") - produced == len(chunk)
    assert not sink._down


async def test_batches_rotate_over_the_partitions_keyed_streams_keep_send(
    sink: KafkaSink,
) -> None:
    chunk = [*queued(90), *queued(3, "labels", "lab"), *queued(2, "audit", "aud")]
    producer = StandInProducer()
    sink._producer = producer  # type: ignore[assignment]
    assert await sink._send_queued(chunk)

    partitions = [p for _, p, _ in producer.batches]
    assert len(partitions) >= 5
    assert {topic for topic, _, _ in producer.batches} == {"inf"}
    # Round-robin per batch: consecutive batches on consecutive partitions.
    assert all((b - a) % len(PARTITIONS) == 1 for a, b in itertools.pairwise(partitions))
    assert [k for _, _, keys in producer.batches for k in keys] == [f"req-{i}" for i in range(90)]
    assert producer.sent == [("lab", "lab-0"), ("lab", "lab-1"), ("lab", "lab-2"),
                             ("aud", "aud-0"), ("aud", "aud-1")]


async def test_a_refused_batch_is_split_until_the_refusal_is_on_one_record(
    sink: KafkaSink, tmp_path: Path
) -> None:
    """The broker refusing a batch as too large fails all its records; the halving isolates
    the one that is too large on its own (here: the stand-in refuses any batch holding it)."""
    chunk = queued(40)
    big = "req-17"

    class Refusing(StandInProducer):
        async def send_batch(self, builder: BatchBuilder, topic: str, *,
                             partition: int) -> asyncio.Future[Any]:
            future = await super().send_batch(builder, topic, partition=partition)
            if big in self.batches[-1][2]:
                from aiokafka.errors import MessageSizeTooLargeError

                future = asyncio.get_running_loop().create_future()
                future.set_exception(MessageSizeTooLargeError("batch too large"))
            return future

        async def stop(self) -> None:
            return None

    producers: list[Refusing] = []

    async def fresh() -> Refusing:
        producer = Refusing()
        producers.append(producer)
        sink._producer = producer  # type: ignore[assignment]
        return producer

    await fresh()
    sink._open_producer = fresh  # type: ignore[method-assign]
    oversized = count("oversized")
    assert await sink._send_queued(chunk)
    assert count("oversized") - oversized == 1
    (path,) = (tmp_path / "oversized" / "inferences").iterdir()
    assert big in path.name
    delivered = [k for p in producers for i, (_, _, keys) in enumerate(p.batches)
                 if big not in keys for k in keys]
    assert sorted(delivered) == sorted(q[2] for q in chunk if q[2] != big)  # each once


async def test_a_retriable_batch_error_is_counted_per_record(sink: KafkaSink) -> None:
    chunk = queued(10)
    producer = StandInProducer(fail={0: NotLeaderForPartitionError()})
    sink._producer = producer  # type: ignore[assignment]
    errors = REGISTRY.get_sample_value("understudy_kafka_producer_errors_total",
                                       {"error": "NotLeaderForPartitionError"}) or 0.0
    assert not await sink._send_queued(chunk)
    after = REGISTRY.get_sample_value("understudy_kafka_producer_errors_total",
                                      {"error": "NotLeaderForPartitionError"})
    assert after == errors + 10  # one batch, ten records: counted per record, as documented
    assert [r.key for r in sink.spill.peek(100, 1 << 30).records] == [q[2] for q in chunk]


async def test_the_pump_lingers_on_a_small_queue_until_woken_never_on_a_full_batch(
    tmp_path: Path,
) -> None:
    """Batches go out closed (no aiokafka linger), so the pump waits for a small queue to fill;
    flush()/close() wake it (`_wake`), and a queue holding a full batch is taken at once."""
    sink = KafkaSink(KafkaConfig(bootstrap="127.0.0.1:1", linger_ms=60_000,
                                 max_unspilled_ms=600_000), tmp_path / "spill")
    for record in queued(3):
        sink._enqueue(record)
    sink._wake.clear()
    lingering = asyncio.ensure_future(sink._linger())
    await asyncio.sleep(0.05)
    assert not lingering.done()  # a 60 s linger: still waiting
    sink._wake.set()  # what flush() and close() do
    await asyncio.wait_for(lingering, timeout=30)

    big = b"x" * sink._producer_kwargs["max_batch_size"]
    sink._enqueue((99, "inferences", "big", big, time.monotonic()))
    await asyncio.wait_for(sink._linger(), timeout=30)  # a full batch: no wait at all
