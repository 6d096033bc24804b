"""What the Kafka sink holds that Kafka has not acknowledged yet, and how it reports it.

`BufferedSink` is the first layer of `KafkaSink` (gateway/backends/kafka_sink.py): its state,
the in-memory queue `emit` fills, the flight handed to the producer, the durable local spill
(gateway/backends/spill.py) the queue goes to when Kafka is slow or down, the `oversized/`
directory, and the counts and logs of an outage. The layers above add the producer
(kafka_producer.py), the `max_unspilled_ms` guard (kafka_guard.py) and the delivery pump.

Limits (each visible: a metric and an ERROR log, never silent)
--------------------------------------------------------------
- In-memory queue full (`max_buffered_records` / `max_buffered_bytes`): `emit` writes the queue
  and the new record to the spill synchronously (one write + fsync) rather than block on or drop
  anything. If a background spill write is in progress (it is about to drain the queue anyway),
  the queue may grow to twice the bound first, so two writers never interleave.
- Spill at its disk budget: what does not fit stays in memory (below), so the
  `max_unspilled_ms` guarantee holds only while the spill has room.
- Spill at its disk budget (`spill_budget_bytes`): ERROR log once per episode,
  `understudy_log_spill_full` = 1. The sink then keeps records in memory up to **twice** the
  queue bound and beyond that **drops the newest record**, counting it in
  `understudy_log_records{outcome="dropped"}` with a (rate-limited) ERROR log.
  Why not block: `emit` runs on the gateway's event loop, so blocking it would turn a Kafka
  outage into a gateway outage, against the first rule that the client never waits for the log;
  the disk budget is the operator's own statement of how much outage to absorb. Why drop the
  newest: what is already buffered is older, already ordered and (on disk) durable; evicting it
  would reorder and lose data that is closer to being delivered.
- A record larger than the producer's `max_request_bytes` (or refused by the broker as too
  large) can never be delivered, so it is neither retried nor spilled (it would block the
  replay forever): it is written to `<log.path>/oversized/<stream>/<ns>-<key>.json` (fsynced),
  counted in `understudy_log_records{outcome="oversized"}`, and logged as an ERROR with its path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from gateway import metrics
from gateway.backends.kafka_topics import stream_topics
from gateway.backends.retry import Backoff
from gateway.backends.spill import SpillBatch, SpillBuffer, SpillRecord, SpillSpan, is_placeholder
from gateway.config import KafkaConfig

# Every layer of the sink logs under the one name operators know (and tests capture).
SINK_LOGGER = "gateway.backends.kafka_sink"
log = logging.getLogger(SINK_LOGGER)

Queued = tuple[int, str, str, bytes, float]  # (seq, stream, key, value, monotonic emit time)

_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Flight:
    """Records handed to the producer and not yet settled (acked, spilled or set aside)."""

    records: list[SpillRecord]
    seqs: list[int]  # emit sequence numbers; empty for a replay flight
    batch: SpillBatch | None = None  # set for a replay flight
    futures: list[asyncio.Future[Any] | None] = field(default_factory=list)
    oldest: float = 0.0  # emit time of the oldest record (queue flights)
    started: float = field(default_factory=time.monotonic)
    probed: float = 0.0  # when the guard last probed the brokers for this flight
    aborted: bool = False  # the brokers refused connections: fail it, do not extend it
    insured: frozenset[int] = frozenset()  # indices whose copy is on the spill
    span: SpillSpan | None = None  # where those copies lie
    insuring: asyncio.Future[None] | None = None  # set while the copy is being written
    window: asyncio.Timeout | None = None  # the send loop's timeout, to interrupt it

    def unacked(self) -> list[int]:
        """Indices not (yet) acknowledged by Kafka: not sent, pending or failed."""
        return [i for i in range(len(self.records)) if not acked(self.future(i))]

    def future(self, i: int) -> asyncio.Future[Any] | None:
        return self.futures[i] if i < len(self.futures) else None


@dataclass
class Episode:
    """Records going to the spill since `started` (a monotonic time), for the logs."""

    started: float
    spilled: int = 0
    replayed: int = 0
    discarded: int = 0


class BufferedSink:
    """The Kafka sink's state and everything it holds unacknowledged (module docstring)."""

    def __init__(
        self,
        config: KafkaConfig,
        spill_dir: str | Path,
        *,
        oversized_dir: str | Path | None = None,
        max_buffered_records: int = 50_000,
        max_buffered_bytes: int = 64 * 1024 * 1024,
        flight_records: int = 2_000,
        flight_bytes: int = 8 * 1024 * 1024,
        max_batch_bytes: int = 256 * 1024,
        client_id: str = "understudy-gateway",
        spill_fsync: bool = True,
    ) -> None:
        self.config = config
        self.spill_dir = Path(spill_dir)
        self.oversized_dir = (
            Path(oversized_dir) if oversized_dir else self.spill_dir.parent / "oversized")
        self.topics = stream_topics(config)
        self.max_buffered_records = max_buffered_records
        self.max_buffered_bytes = max_buffered_bytes
        self.flight_records = flight_records
        self.flight_bytes = flight_bytes
        self.close_timeout = config.close_timeout_ms / 1000
        self._request_timeout = config.request_timeout_ms / 1000
        self._delivery_timeout = config.delivery_timeout_ms / 1000
        self._backoff = Backoff(
            config.retry_backoff_ms / 1000,
            max(config.reconnect_backoff_max_ms, config.retry_backoff_ms) / 1000)
        # The guard acts at half the bound (+ one tick): the rest is slack for a busy loop/disk.
        self.max_unspilled = config.max_unspilled_ms / 1000
        self._spill_after = self.max_unspilled / 2
        self._tick = min(0.1, self.max_unspilled / 10)
        compression = (config.compression or "none").lower()
        self._producer_kwargs: dict[str, Any] = {
            "bootstrap_servers": config.bootstrap,
            "client_id": client_id,
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": None if compression == "none" else compression,
            "linger_ms": config.linger_ms,
            "max_request_size": config.max_request_bytes,
            "max_batch_size": min(max_batch_bytes, config.max_request_bytes),
            "request_timeout_ms": config.request_timeout_ms,
            "retry_backoff_ms": config.retry_backoff_ms,
            "metadata_max_age_ms": config.metadata_max_age_ms,
        }
        self.spill = SpillBuffer(self.spill_dir, config.spill_budget_bytes, fsync=spill_fsync)

        self._queue: collections.deque[Queued] = collections.deque()
        self._queue_bytes = 0
        self._seq = 0
        self._flight: Flight | None = None
        self._spilling: list[Queued] | None = None  # chunk being written by the spiller
        self._producer: AIOKafkaProducer | None = None
        self._retiring: set[AIOKafkaProducer] = set()
        self._down = False
        self._down_reason = ""
        self._closing = False
        self._guard_stop = False
        self._closed = False
        self._started = False
        self._pump: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None  # the guard
        self._probes: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._spill_wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._order_lock = asyncio.Lock()
        self._dropped_since_log = 0
        self._last_drop_log = 0.0
        self._down_since = 0.0
        self._down_logged = 0.0
        self._episode: Episode | None = None  # records going to the spill since...
        self._buffered_gauge = metrics.LOG_BUFFERED.labels("kafka")

    @property
    def queued(self) -> int:
        """Records held in memory only (neither acknowledged nor on the spill)."""
        return len(self._queue)

    # ------------------------------------------------------------------ emit helpers

    def _enqueue(self, record: Queued) -> None:
        self._queue.append(record)
        self._queue_bytes += len(record[2]) + len(record[3])
        self._buffered_gauge.set(len(self._queue))
        if len(self._queue) == 1 and not self._down:
            self._wake.set()  # while down the guard takes the queue every tick, batched

    def _overflow(self, record: Queued) -> None:
        """The queue is at its bound: spill synchronously, hold, or drop (module docstring)."""
        hard = (len(self._queue) >= 2 * self.max_buffered_records
                or self._queue_bytes >= 2 * self.max_buffered_bytes)
        can_spill = self._started and not self.spill.full
        if not hard and (self._spilling is not None or not can_spill):
            self._enqueue(record)  # a spill write is draining the queue / the disk is full
            return
        if can_spill:
            chunk = self._take_all()
            chunk.append(record)
            records = as_records(chunk)
            written = self.spill.append(records)
            self._note_spilled(records[:written], "in-memory queue full")
            self._requeue_front(chunk[written:])
            self._progress.set()
            if written == len(chunk) or not hard:
                return
            self._queue.pop()  # the new record, last of the chunk, did not fit
            self._queue_bytes -= len(record[2]) + len(record[3])
        elif not hard:
            self._enqueue(record)
            return
        self._drop(as_records([record])[0])

    def _drop(self, record: SpillRecord) -> None:
        self._count("dropped", [record])
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:
            log.error(
                "kafka sink DROPPED %d record(s) (latest: %s key=%s): Kafka is not taking them, "
                "the spill is at its budget of %d bytes and the memory queue is at its bound",
                self._dropped_since_log, record.stream, record.key,
                self.config.spill_budget_bytes)
            self._dropped_since_log = 0
            self._last_drop_log = now

    def _too_large(self, key: str, value: bytes) -> bool:
        size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key.encode(), value, [])
        return size > self.config.max_request_bytes

    def _set_aside(self, record: SpillRecord, reason: str) -> None:
        """Write an undeliverable record to `oversized/` (fsynced) and say so loudly."""
        directory = self.oversized_dir / (record.stream or "unknown")
        safe_key = _SAFE_KEY.sub("_", record.key)[:80] or "nokey"
        path = directory / f"{time.time_ns():020d}-{safe_key}.json"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(record.value)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            log.exception("could not write oversized record %s key=%s (%d bytes) to %s: DROPPED",
                          record.stream, record.key, len(record.value), path)
            self._count("dropped", [record])
            return
        self._count("oversized", [record])
        log.error("log record %s key=%s is %d bytes, %s; it cannot go to Kafka and was written "
                  "to %s", record.stream, record.key, len(record.value), reason, path)

    def _count(self, outcome: str, records: Iterable[SpillRecord]) -> None:
        per_stream = collections.Counter(r.stream for r in records if not is_placeholder(r))
        for stream, n in per_stream.items():
            metrics.LOG_RECORDS.labels(stream, outcome).inc(n)

    # ------------------------------------------------------------------ queue helpers

    def _take(self, max_records: int, max_bytes: int) -> list[Queued]:
        taken: list[Queued] = []
        size = 0
        while self._queue and len(taken) < max_records and (not taken or size < max_bytes):
            record = self._queue.popleft()
            size += len(record[2]) + len(record[3])
            taken.append(record)
        self._queue_bytes -= size
        self._buffered_gauge.set(len(self._queue) + len(taken))
        return taken

    def _take_all(self) -> list[Queued]:
        taken = list(self._queue)
        self._queue.clear()
        self._queue_bytes = 0
        return taken

    def _requeue_front(self, records: Sequence[Queued]) -> None:
        """Put records back at the head (they are older than anything queued).

        They come back because the spill did not take them (at its budget) while emit() kept
        queueing, so the hard bound (twice the queue bound) is enforced here too: beyond it
        the newest records are dropped, as in `_overflow`.
        """
        for record in reversed(records):
            self._queue.appendleft(record)
            self._queue_bytes += len(record[2]) + len(record[3])
        while self._queue and (len(self._queue) > 2 * self.max_buffered_records
                               or self._queue_bytes > 2 * self.max_buffered_bytes):
            newest = self._queue.pop()
            self._queue_bytes -= len(newest[2]) + len(newest[3])
            self._drop(as_records([newest])[0])
        self._buffered_gauge.set(len(self._queue))

    def _settled_before(self, target: int) -> bool:
        if self._queue and self._queue[0][0] <= target:
            return False
        flight = self._flight
        if (flight is not None and flight.seqs and flight.seqs[0] <= target
                and len(flight.insured) < len(flight.records)):
            return False
        return not (self._spilling and self._spilling[0][0] <= target)

    def _check_pump(self) -> None:
        if self._pump is not None and self._pump.done() and not self._closing:
            exc = None if self._pump.cancelled() else self._pump.exception()
            raise RuntimeError("kafka sink pump is not running") from exc

    async def _spill_queue(self) -> None:
        """Move the whole queue to the spill now (order kept; what does not fit stays)."""
        async with self._order_lock:
            chunk = self._take_all()
            if not chunk:
                return
            self._spilling = chunk
            try:
                records = as_records(chunk)
                written = await asyncio.to_thread(self.spill.append, records)
            finally:
                self._spilling = None
            why = (f"Kafka is down ({self._down_reason})" if self._down else
                   f"not acknowledged within {self._spill_after * 1000:.0f} ms")
            self._note_spilled(records[:written], why)
            self._requeue_front(chunk[written:])
            self._progress.set()

    # ------------------------------------------------------------------ outage reporting

    def _note_spilled(self, records: Sequence[SpillRecord], why: str) -> None:
        """Count records written to the spill; the first of an episode is a WARNING."""
        self._count("spilled", records)
        if not records:
            return
        if self._episode is None:
            self._episode = Episode(time.monotonic())
            if not self._down:  # else _set_down said so already
                log.warning("log records are going to the local spill %s: %s",
                            self.spill_dir, why)
        self._episode.spilled += sum(1 for r in records if not is_placeholder(r))

    def _note_drained(self) -> None:
        """INFO once the spill is empty again after an episode, with its counts."""
        episode = self._episode
        if episode is None or not self.spill.is_empty():
            return
        self._episode = None
        log.info("spill drained: %d records went to the spill over the last %.1f s; %d replayed "
                 "to Kafka, %d were acknowledged before replay (their copies discarded)",
                 episode.spilled, time.monotonic() - episode.started, episode.replayed,
                 episode.discarded)

    def _set_down(self, why: str) -> None:
        metrics.KAFKA_UP.set(0)
        if not self._down:
            log.warning("Kafka at %s unreachable (%s); log records go to the spill at %s "
                        "(%d queued in memory now)", self.config.bootstrap, why, self.spill_dir,
                        len(self._queue))
            self._down = True
            self._down_reason = why
            self._down_since = self._down_logged = time.monotonic()
        self._spill_wake.set()
        self._progress.set()

    def _set_up(self) -> None:
        metrics.KAFKA_UP.set(1)
        if self._down:
            log.info("Kafka at %s is delivering again after %.1f s; replaying %d bytes of spill",
                     self.config.bootstrap, time.monotonic() - self._down_since,
                     self.spill.pending_bytes)
            self._down = False


def as_records(chunk: Sequence[Queued]) -> list[SpillRecord]:
    return [SpillRecord(q[1], q[2], q[3]) for q in chunk]


def acked(fut: asyncio.Future[Any] | None) -> bool:
    return (fut is not None and fut.done() and not fut.cancelled()
            and fut.exception() is None)
