"""The Kafka sink: every record to Kafka, none lost, never on the client's critical path.

How a record travels
--------------------
`emit()` (synchronous, called from the gateway's record task) appends `(seq, stream, key,
value, emit time)` to an in-memory FIFO and returns. A single *pump* task takes the queue in
*flights* (up to `flight_records` records / `flight_bytes` bytes), hands each record to aiokafka's
`producer.send()` (which batches per partition, compresses and pipelines; never
`send_and_wait` per record) and then waits for all of the flight's delivery futures. Streams map
to topics (`inferences` -> `topic`, `labels` -> `labels_topic`, `audit` -> `audit_topic`), the
key is the request id, the producer is idempotent with `acks="all"`.

No loss: the guarantee
----------------------
A record leaves the sink's responsibility only when Kafka acknowledged it, it was written and
fsynced to the local spill (gateway/backends/spill.py, under `<log.path>/spill/`), or it was
set aside visibly (oversized, see below). On top of that, **no accepted record is held only in
memory for longer than `max_unspilled_ms`** (`log.kafka.max_unspilled_ms`, default 1000),
whether the broker is up, down or silently stalled. A *guard* task enforces it every
`max_unspilled_ms / 10` (at most 100 ms):

- Queued records (not yet handed to the producer) older than `max_unspilled_ms / 2`, or all
  of them every tick while Kafka is down, are moved to the spill (one batched write + fsync).
- The records of the flight in progress (handed to aiokafka, not all acknowledged) once its
  oldest is older than `max_unspilled_ms / 2`: the unacknowledged ones are *copied* to the spill
  and the flight goes on. If Kafka then acknowledges all of them and nothing older is pending
  in the spill, the copies are discarded (no duplicate); otherwise they are replayed, i.e.
  delivered twice. Delivery is at-least-once: the evaluator de-duplicates by request id.
- A flight outstanding for `max_unspilled_ms / 2` also triggers a TCP probe of the brokers:
  connection refused (or unreachable) on every address marks the sink *down at once*: the
  flight is failed through the producer (its records are already on the spill), the producer
  is discarded (after a failed batch an idempotent producer's sequence numbers are no longer
  trustworthy, so a fresh one is cheaper than repairing it) and the pump reconnects with
  backoff (`retry_backoff_ms` up to `reconnect_backoff_max_ms`). A broker that accepts
  connections but never answers is not "down" until `delivery_timeout_ms` pass without an
  acknowledgement; its records reach the spill by age meanwhile all the same.

So a SIGKILL (or OOM kill, or a crash) loses at most the records accepted in the last
`max_unspilled_ms`; a power loss the same, since every spill write is fsynced before its
records count as spilled (the spill's fsync interval is that of its writes: at most one per
guard tick, batched, never one per record). The design acts at half the bound plus one tick, so
the other ~40% is slack for a busy event loop or a slow disk; a loop blocked for longer than
that delays the guard by as much. Records reach the sink after the gateway answered and every
challenger copy finished (gateway/dataplane/recorder.py), so for a request the window is that time
plus `max_unspilled_ms`. Measured: tests/integration/test_kafka_crash.py (README, "What a crash
can lose").

Logs: a WARNING when records start going to the spill (with the reason), a WARNING every 30 s
while Kafka stays down, an INFO when the spill is drained again, each with record counts.

Replay and order
----------------
Whenever the spill is not empty the pump replays it, oldest first, before sending anything
from the queue: replay order is spill order, and the spill receives records in emit order, so
consumers see the emit order (with at-least-once duplicates). Delivered spill segments are
deleted. A spill left by a previous run (SIGTERM during an outage, or a crash) is replayed the
same way when the next sink starts. `close()` (SIGTERM) keeps delivering, spill backlog first,
for up to `close_timeout_ms` (one connection attempt if it has none, and it stops at once when
Kafka is down), then spills whatever is still unconfirmed, fsyncs and returns.

One ordering caveat: if the in-memory queue overflows (below) while a flight is out and that
flight then fails before the guard copied it, the flight's records land in the spill after the
overflowed (newer) ones. Nothing is lost; only that swap is possible, and only under overload
plus a failure.

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

Compression and the event loop
------------------------------
aiokafka compresses each batch on the event loop when it is sent, and its gzip runs at level 9:
on these machines that is ~4x the CPU of zstd per record and stalls the loop for tens of ms per
batch. `zstd` (or `lz4`; both need the `cramjam` package) is the better setting for a gateway;
`gzip` works and is what KafkaConfig defaults to. Batches are capped at `max_batch_bytes`
(256 KiB) so one compression call stays short, and the pump yields to the loop every
`_YIELD_EVERY` records while handing a flight to the producer.

Metrics: `understudy_log_records{stream, outcome}` with outcome `produced` (acknowledged by
Kafka, replays and duplicates included), `replayed` (the part of `produced` that came from the
spill), `spilled` (written to the spill, copies of in-flight records included), `oversized`,
`dropped`; `understudy_log_buffered_records{sink="kafka"}` (queued +
in flight, i.e. not yet durable anywhere), `understudy_log_spill_bytes`,
`understudy_log_spill_full`, `understudy_kafka_producer_errors{error}` (per record that failed
to produce, by exception type), `understudy_kafka_connected`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from gateway import metrics
from gateway.backends.kafka_topics import stream_topics
from gateway.backends.retry import Backoff, connect_with_retry
from gateway.backends.spill import (
    SpillBatch,
    SpillBuffer,
    SpillRecord,
    SpillSpan,
    is_placeholder,
)
from gateway.config import KafkaConfig

log = logging.getLogger(__name__)

_Queued = tuple[int, str, str, bytes, float]  # (seq, stream, key, value, monotonic emit time)


class UndeliverableError(KafkaError):
    """A spilled record that no retry can deliver (e.g. its stream has no topic any more)."""


class BrokerUnreachableError(KafkaConnectionError):
    """Every broker address refused the connection: the flight is failed at once, not after
    `delivery_timeout_ms` (its records are on the spill already)."""


_CONNECT_ERRORS = (KafkaError, OSError, TimeoutError)  # a producer that could not start
# Errors no retry can fix: the record is set aside (oversized/), never spilled or retried.
_PERMANENT = (MessageSizeTooLargeError, RecordTooLargeError, UndeliverableError)
_YIELD_EVERY = 64  # records handed to aiokafka per event-loop turn (~1-2 ms of work)
_DOWN_REMINDER_S = 30.0  # WARNING cadence while Kafka stays down
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class _Flight:
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
        return [i for i in range(len(self.records)) if not _acked(self.future(i))]

    def future(self, i: int) -> asyncio.Future[Any] | None:
        return self.futures[i] if i < len(self.futures) else None


class KafkaSink:
    """LogSink that produces to Kafka with a durable local spill; see the module docstring."""

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

        self._queue: collections.deque[_Queued] = collections.deque()
        self._queue_bytes = 0
        self._seq = 0
        self._flight: _Flight | None = None
        self._spilling: list[_Queued] | None = None  # chunk being written by the spiller
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
        self._episode: _Episode | None = None  # records going to the spill since...
        self._buffered_gauge = metrics.LOG_BUFFERED.labels("kafka")

    @property
    def queued(self) -> int:
        """Records held in memory only (neither acknowledged nor on the spill)."""
        return len(self._queue)

    # ------------------------------------------------------------------ LogSink

    async def start(self) -> None:
        """Open the spill (replaying a previous run's leftovers first) and start the pump.

        Never fails because Kafka is unreachable: the sink starts *down* and spills until the
        broker answers. It does fail if the spill directory is unusable or owned by another
        process, since then the no-loss promise could not be kept.
        """
        if self._started:
            return
        await asyncio.to_thread(self.spill.open)
        metrics.KAFKA_UP.set(0)
        self._started = True
        self._pump = asyncio.create_task(self._run_pump(), name="kafka-sink-pump")
        self._guard = asyncio.create_task(self._run_guard(), name="kafka-sink-guard")

    def emit(self, stream: str, key: str, value: bytes) -> None:
        """Queue one record; never waits on the network. See the module docstring for limits."""
        if self._closed:
            raise RuntimeError("KafkaSink is closed")
        if stream not in self.topics:
            raise ValueError(f"unknown log stream {stream!r}; expected one of {list(self.topics)}")
        size = len(key) + len(value)
        if size + 128 > self.config.max_request_bytes and self._too_large(key, value):
            self._set_aside(SpillRecord(stream, key, value), "larger than max_request_bytes")
            return
        self._seq += 1
        record = (self._seq, stream, key, value, time.monotonic())
        if (len(self._queue) < self.max_buffered_records
                and self._queue_bytes < self.max_buffered_bytes):
            self._enqueue(record)
            return
        self._overflow(record)

    async def flush(self) -> None:
        """Return once every record emitted before the call is acknowledged or on local disk.

        When the broker is down, or the spill has a backlog the queue would wait behind, the
        queue goes to the spill now instead of waiting for Kafka. Returns early (with a
        warning) only when neither Kafka nor the spill can take more: the spill is full.
        """
        self._check_pump()
        target = self._seq
        if self._down or not self.spill.is_empty():
            await self._spill_queue()
        self._wake.set()
        while not self._settled_before(target):
            if self.spill.full and self._down:
                log.warning("flush: Kafka is down and the spill is full; %d records are only "
                            "in memory", len(self._queue))
                return
            self._check_pump()
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=1.0)

    async def close(self) -> None:
        """Deliver what can be delivered within `close_timeout_ms`, spill the rest, fsync, stop."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_timeout
        if self._pump is not None:
            # The pump goes on delivering (spill first) until done, Kafka is down, or the
            # deadline; the guard keeps its promise meanwhile.
            done, _ = await asyncio.wait({self._pump}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            if self._pump.done() and not self._pump.cancelled() and self._pump.exception():
                log.error("kafka sink pump had crashed", exc_info=self._pump.exception())
        self._guard_stop = True
        self._spill_wake.set()
        if self._guard is not None:
            # Not cancelled: a cancelled spill write would lose track of the chunk it took.
            await self._guard
        for probe in list(self._probes):
            probe.cancel()
        self._closed = True  # emit() refuses from here: nothing can slip past the final spill
        leftovers: list[SpillRecord] = []
        flight, self._flight = self._flight, None
        if flight is not None:
            leftovers.extend(await self._settle_abandoned(flight))
        leftovers.extend(_records(self._take_all()))
        if leftovers:
            written = await asyncio.to_thread(self.spill.append, leftovers)
            self._note_spilled(leftovers[:written], "closing with Kafka unconfirmed")
            if written < len(leftovers):
                lost = leftovers[written:]
                self._count("dropped", lost)
                log.error("kafka sink closing: spill is full; %d records DROPPED", len(lost))
        for producer in [self._producer, *self._retiring]:
            if producer is not None:
                await self._stop_producer(producer)
        self._producer = None
        self._retiring.clear()
        await asyncio.to_thread(self.spill.close)
        metrics.KAFKA_UP.set(0)
        self._buffered_gauge.set(0)
        self._progress.set()

    # ------------------------------------------------------------------ emit helpers

    def _enqueue(self, record: _Queued) -> None:
        self._queue.append(record)
        self._queue_bytes += len(record[2]) + len(record[3])
        self._buffered_gauge.set(len(self._queue))
        if len(self._queue) == 1 and not self._down:
            self._wake.set()  # while down the guard takes the queue every tick, batched

    def _overflow(self, record: _Queued) -> None:
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
            records = _records(chunk)
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
        self._drop(_records([record])[0])

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
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key.encode(), value, [])
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

    def _take(self, max_records: int, max_bytes: int) -> list[_Queued]:
        taken: list[_Queued] = []
        size = 0
        while self._queue and len(taken) < max_records and (not taken or size < max_bytes):
            record = self._queue.popleft()
            size += len(record[2]) + len(record[3])
            taken.append(record)
        self._queue_bytes -= size
        self._buffered_gauge.set(len(self._queue) + len(taken))
        return taken

    def _take_all(self) -> list[_Queued]:
        taken = list(self._queue)
        self._queue.clear()
        self._queue_bytes = 0
        return taken

    def _requeue_front(self, records: Sequence[_Queued]) -> None:
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
            self._drop(_records([newest])[0])
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
                records = _records(chunk)
                written = await asyncio.to_thread(self.spill.append, records)
            finally:
                self._spilling = None
            why = (f"Kafka is down ({self._down_reason})" if self._down else
                   f"not acknowledged within {self._spill_after * 1000:.0f} ms")
            self._note_spilled(records[:written], why)
            self._requeue_front(chunk[written:])
            self._progress.set()

    # ------------------------------------------------------------------ background tasks

    async def _run_guard(self) -> None:
        """Keep the `max_unspilled_ms` promise: every tick, put what is too old on the spill."""
        while not self._guard_stop:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._spill_wake.wait(), timeout=self._tick)
            self._spill_wake.clear()
            if self._guard_stop:
                return
            try:
                await self._guard_once()
            except Exception:  # the guard must outlive any one failure (e.g. a disk error)
                log.exception("kafka sink guard pass failed")

    async def _guard_once(self) -> None:
        now = time.monotonic()
        flight = self._flight
        if flight is not None:
            # By record age, not flight age: a flight may take records that waited in the queue.
            if flight.seqs and flight.insuring is None and flight.oldest <= now - self._spill_after:
                await self._insure(flight)
            if (now - flight.started >= self._spill_after and not flight.aborted
                    and now - flight.probed >= self._spill_after and self._flight is flight):
                # In the background: a connect that hangs must not delay the spilling below.
                flight.probed = now
                probe = asyncio.create_task(self._probe(flight), name="kafka-sink-probe")
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)
        while self._queue and (self._down or self._queue[0][4] <= now - self._spill_after):
            before = len(self._queue)
            await self._spill_queue()
            if len(self._queue) >= before or not self._down:
                break  # spill full (replay frees space), or what is left is young enough
        if self._down and now - self._down_logged >= _DOWN_REMINDER_S:
            self._down_logged = now
            log.warning("Kafka at %s still unreachable after %.0f s (%s); %d records spilled "
                        "since, %d bytes waiting in %s", self.config.bootstrap,
                        now - self._down_since, self._down_reason,
                        self._episode.spilled if self._episode else 0, self.spill.pending_bytes,
                        self.spill_dir)

    async def _insure(self, flight: _Flight) -> None:
        """Copy a flight's unacknowledged records to the spill; the flight goes on meanwhile."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        flight.insuring = done
        try:
            async with self._order_lock:
                indices = flight.unacked()
                records = [flight.records[i] for i in indices]
                written, span = await asyncio.to_thread(self.spill.append_span, records)
            flight.insured = frozenset(indices[:written])
            flight.span = span
            self._note_spilled(records[:written], f"Kafka has not acknowledged them within "
                                                  f"{self._spill_after * 1000:.0f} ms")
        finally:
            done.set_result(None)

    async def _probe(self, flight: _Flight) -> None:
        refused = await self._brokers_refuse()
        if refused and self._flight is flight and not flight.aborted and not self._closed:
            self._abort(flight, refused)

    async def _brokers_refuse(self) -> str | None:
        """Why no broker can be reached (every address refuses), or None if one accepts or the
        answer is unclear (a timeout: the broker may just be slow)."""
        addresses = {_host_port(a) for a in self.config.bootstrap.split(",") if a.strip()}
        producer = self._producer
        if producer is not None:
            with contextlib.suppress(Exception):
                addresses |= {(b.host, b.port) for b in producer.client.cluster.brokers()}
        errors: list[str] = []
        for host, port in sorted(addresses):
            try:
                async with asyncio.timeout(min(1.0, self._spill_after)):
                    _, writer = await asyncio.open_connection(host, port)
            except TimeoutError:
                return None
            except OSError as exc:
                errors.append(f"{host}:{port}: {exc.strerror or exc!r}")
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return None
        return "; ".join(errors) if errors else None

    def _abort(self, flight: _Flight, why: str) -> None:
        """Fail a flight now (the broker refuses connections); its records are on the spill."""
        flight.aborted = True
        self._set_down(f"connection refused: {why}")
        producer = self._producer
        if producer is not None:
            _fail_pending(producer, BrokerUnreachableError(why))
        if flight.window is not None:  # a send() waiting for metadata or buffer space
            flight.window.reschedule(asyncio.get_running_loop().time())

    def _note_spilled(self, records: Sequence[SpillRecord], why: str) -> None:
        """Count records written to the spill; the first of an episode is a WARNING."""
        self._count("spilled", records)
        if not records:
            return
        if self._episode is None:
            self._episode = _Episode(time.monotonic())
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

    async def _run_pump(self) -> None:
        """Deliver forever; an unexpected error is logged and retried, never the end of the log."""
        while True:
            try:
                await self._pump_loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kafka sink pump failed; restarting it")
                flight, self._flight = self._flight, None
                if flight is not None:
                    leftovers = await self._settle_abandoned(flight)
                    if leftovers:
                        written = await asyncio.to_thread(self.spill.append, leftovers)
                        self._note_spilled(leftovers[:written], "internal error")
                        if written < len(leftovers):
                            now = time.monotonic()
                            self._requeue_front([(0, r.stream, r.key, r.value, now)
                                                 for r in leftovers[written:]])
                await self._retire_producer()
                self._set_down("internal error")
                await self._pause(self._backoff.max_s)

    async def _pump_loop(self) -> None:
        tried_at_close = False
        while True:
            if self._producer is None:
                if self._closing and tried_at_close:
                    return  # one more connection attempt at close, no backoff loop
                tried_at_close = self._closing
                if not await self._reconnect():
                    return
            if not self.spill.is_empty():
                ok = await self._replay_once()
            else:
                async with self._order_lock:
                    chunk = (self._take(self.flight_records, self.flight_bytes)
                             if self.spill.is_empty() else [])
                if chunk:
                    ok = await self._send_queued(chunk)
                elif not self.spill.is_empty():
                    continue
                else:
                    if self._closing:
                        return
                    self._wake.clear()
                    if not self._queue:
                        await self._wake.wait()
                    continue
            if ok:
                self._backoff.reset()
            else:
                await self._retire_producer()
                if self._closing:
                    return
                await self._pause(self._backoff.next())

    async def _pause(self, seconds: float) -> None:
        """Sleep for a backoff, but wake at once for close()."""
        if self._closing:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

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

    # ------------------------------------------------------------------ producer

    async def _open_producer(self) -> AIOKafkaProducer:
        """Start a fresh producer (a failed start is stopped again and raises)."""
        producer = AIOKafkaProducer(**self._producer_kwargs)
        try:
            async with asyncio.timeout(self._request_timeout):
                await producer.start()
        except BaseException:
            await self._stop_producer(producer)
            raise
        self._producer = producer
        if not self._down:
            metrics.KAFKA_UP.set(1)
        return producer

    def _connect_failed(self, exc: BaseException) -> None:
        metrics.KAFKA_PRODUCER_ERRORS.labels(type(exc).__name__).inc()
        log.debug("kafka producer start failed: %r", exc)

    async def _connect(self) -> bool:
        """One connection attempt (isolating an oversized record); the pump retries instead."""
        try:
            await self._open_producer()
        except _CONNECT_ERRORS as exc:
            self._connect_failed(exc)
            return False
        return True

    async def _reconnect(self) -> bool:
        """Connect with backoff until it works; at close, one attempt only. False: not connected
        (closing)."""

        def failed(exc: BaseException, _retry_in: float | None) -> None:
            self._connect_failed(exc)
            self._set_down("cannot connect")

        producer = await connect_with_retry(
            self._open_producer, self._backoff, errors=_CONNECT_ERRORS, on_failure=failed,
            give_up=lambda: self._closing, pause=self._pause)
        return producer is not None

    async def _retire_producer(self) -> None:
        """Discard the current producer after a failure; the next attempt starts a fresh one."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        self._retiring.add(producer)
        try:
            await self._stop_producer(producer, abandon=True)
        finally:
            self._retiring.discard(producer)

    async def _stop_producer(self, producer: AIOKafkaProducer, *, abandon: bool = False) -> None:
        """Stop a producer within a bounded time, even with undeliverable batches pending.

        `producer.stop()` waits for every pending batch; with the broker gone they only expire
        after `request_timeout_ms`. A producer retired after a failure (`abandon`) has had its
        unconfirmed records spilled already, so its batches are failed at once through the
        accumulator (aiokafka has no public call for this): delivering them late would only
        add duplicates. The client is closed explicitly at the end because `stop()` skips that
        when the sender task died with an error (aiokafka 0.14), which would leak sockets.
        """
        if abandon:
            _fail_pending(producer)
        task = asyncio.ensure_future(producer.stop())
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            _fail_pending(producer)
            done, _ = await asyncio.wait({task}, timeout=max(2.0, self._request_timeout))
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await producer.client.close()

    # ------------------------------------------------------------------ delivery

    async def _send_queued(self, chunk: list[_Queued]) -> bool:
        flight = _Flight(_records(chunk), [q[0] for q in chunk], oldest=chunk[0][4])
        self._flight = flight
        outcomes = await self._deliver(flight)
        if flight.insuring is not None:
            await asyncio.shield(flight.insuring)  # know which records have a copy on disk
        failed: list[_Queued] = []
        delivered: list[SpillRecord] = []
        first_error: BaseException | None = None  # the first that a retry may fix
        for i, (queued, record, outcome) in enumerate(
                zip(chunk, flight.records, outcomes, strict=True)):
            if outcome is None:
                delivered.append(record)
                continue
            permanent = isinstance(outcome, _PERMANENT)
            if not permanent:
                first_error = first_error or outcome
                metrics.KAFKA_PRODUCER_ERRORS.labels(type(outcome).__name__).inc()
            if i in flight.insured:
                continue  # its copy on the spill is replayed (or set aside there)
            if permanent:
                self._set_aside(record, _reason(outcome))
            else:
                failed.append(queued)
        self._count("produced", delivered)
        if first_error is not None:
            self._set_down(f"{len(chunk) - len(delivered)} of {len(chunk)} records not "
                           f"confirmed: {first_error!r}")
            if failed:
                async with self._order_lock:
                    records = _records(failed)
                    written = await asyncio.to_thread(self.spill.append, records)
                    self._note_spilled(records[:written], f"Kafka failed: {first_error!r}")
                    self._requeue_front(failed[written:])
        else:
            if (flight.span is not None and len(delivered) == len(flight.records)
                    and await asyncio.to_thread(self.spill.discard, flight.span)):
                if self._episode is not None:
                    self._episode.discarded += len(flight.insured)
                self._note_drained()
            if delivered:
                self._set_up()
        self._flight = None
        self._buffered_gauge.set(len(self._queue))
        self._progress.set()
        return first_error is None

    async def _replay_once(self) -> bool:
        batch = await asyncio.to_thread(self.spill.peek, self.flight_records, self.flight_bytes)
        if not batch.records:
            return True
        flight = _Flight(batch.records, [], batch)
        self._flight = flight
        outcomes = await self._deliver(flight)
        settled = _settled_prefix(batch.records, outcomes)
        delivered: list[SpillRecord] = []
        for i, (record, outcome) in enumerate(zip(batch.records, outcomes, strict=True)):
            if outcome is None:
                if not is_placeholder(record):
                    delivered.append(record)  # after a failure too: it will be a duplicate
            elif isinstance(outcome, _PERMANENT):
                if i < settled:  # else it is read again next time; set it aside then
                    self._set_aside(record, _reason(outcome))
            else:
                metrics.KAFKA_PRODUCER_ERRORS.labels(type(outcome).__name__).inc()
        self._count("produced", delivered)
        self._count("replayed", delivered)
        if self._episode is not None:
            self._episode.replayed += len(delivered)
        await asyncio.to_thread(self.spill.commit, batch, settled)
        self._flight = None
        self._progress.set()
        self._spill_wake.set()
        if settled < len(batch.records):
            first = outcomes[settled]
            self._set_down(f"replay not confirmed: {first!r}")
            return False
        self._set_up()
        self._note_drained()
        return True

    async def _deliver(self, flight: _Flight) -> list[BaseException | None]:
        """Send a flight; return per record None (acked) or the exception that stopped it.

        A batch the *broker* refuses as too large (topic `max.message.bytes` below our
        `max_request_bytes`) fails every record in it, small ones too. Those records are re-sent
        in halves until the refusal is pinned on single records, so only a record that is too
        large on its own is set aside; the rest are delivered (after the flight's other records).
        Each refusal also poisons the idempotent producer's sequence numbers, so each round of
        re-sending starts on a fresh producer.
        """
        n = len(flight.records)
        outcomes: list[BaseException | None] = [None] * n
        flight.futures = [None] * n
        await self._send_group(flight, list(range(n)), outcomes)
        first = self._refused(flight, range(n), outcomes)
        groups: collections.deque[list[int]] = collections.deque([first] if first else [])
        refused_last = bool(first)
        while groups:
            group = groups.popleft()
            await self._retire_producer()
            if not await self._connect():
                error = KafkaTimeoutError("reconnect failed while isolating an oversized record")
                for rest in (group, *groups):
                    for i in rest:
                        outcomes[i] = error
                return outcomes
            await self._send_group(flight, group, outcomes)
            refused = self._refused(flight, group, outcomes)
            refused_last = bool(refused)
            if not refused or len(group) == 1:
                continue  # delivered, or refused on its own: set aside by the caller
            if len(refused) < len(group):
                groups.append(refused)
            else:
                half = len(group) // 2
                groups.extend((group[:half], group[half:]))
        if refused_last:
            await self._retire_producer()  # the next flight must not inherit broken sequences
        return outcomes

    @staticmethod
    def _refused(flight: _Flight, indices: Iterable[int],
                 outcomes: Sequence[BaseException | None]) -> list[int]:
        """Records a broker refused as too large (not the client-side size check)."""
        return [i for i in indices
                if flight.futures[i] is not None and isinstance(outcomes[i], _PERMANENT)]

    async def _send_group(self, flight: _Flight, indices: list[int],
                          outcomes: list[BaseException | None]) -> None:
        """Send `flight.records[i]` for i in indices; fill `outcomes` (None = acknowledged).

        Waits while deliveries make progress; gives up after `delivery_timeout_ms` without any
        (the broker is gone, or aiokafka is stuck on it), marking the rest as timed out. The
        guard cuts that short when the brokers refuse connections (`_abort`).
        """
        producer = self._producer
        if producer is None:
            raise KafkaTimeoutError("no producer")
        loop = asyncio.get_running_loop()
        for i in indices:
            flight.futures[i] = None
            outcomes[i] = None
        sent = 0
        try:
            async with asyncio.timeout(self._request_timeout) as window:
                flight.window = window
                for pos, i in enumerate(indices):
                    record = flight.records[i]
                    sent = pos
                    if is_placeholder(record):
                        continue
                    topic = self.topics.get(record.stream)
                    if topic is None:
                        outcomes[i] = UndeliverableError(f"unknown stream {record.stream!r}")
                        continue
                    try:
                        flight.futures[i] = await producer.send(
                            topic, record.value, record.key.encode())
                    except _PERMANENT as exc:
                        outcomes[i] = exc
                    if pos % _YIELD_EVERY == _YIELD_EVERY - 1:
                        # send() rarely suspends: without this a flight would hold the event
                        # loop (and every client request behind it) for its whole length.
                        await asyncio.sleep(0)
                        if not flight.aborted:  # else _abort() has fired it: keep it fired
                            window.reschedule(loop.time() + self._request_timeout)
                sent = len(indices)
        except (KafkaError, OSError, TimeoutError) as exc:
            error = exc if not isinstance(exc, TimeoutError) else KafkaTimeoutError(
                "send not accepted within request_timeout_ms" if not flight.aborted
                else f"send interrupted: Kafka is down ({self._down_reason})")
            for i in indices[sent:]:
                outcomes[i] = error
        finally:
            flight.window = None
        pending = {f for i in indices if (f := flight.futures[i]) is not None}
        while pending:
            done, pending = await asyncio.wait(pending, timeout=self._delivery_timeout)
            if not done:
                break
        for i in indices:
            fut = flight.futures[i]
            if fut is None:
                continue
            if not fut.done():
                fut.add_done_callback(_retrieve)
                outcomes[i] = KafkaTimeoutError("delivery not confirmed within delivery_timeout_ms")
            elif fut.cancelled():
                outcomes[i] = KafkaTimeoutError("delivery cancelled")
            else:
                outcomes[i] = fut.exception()

    async def _settle_abandoned(self, flight: _Flight) -> list[SpillRecord]:
        """At close: what of an interrupted flight still needs the spill (in order)."""
        acked = [_acked(flight.future(i)) for i in range(len(flight.records))]
        for fut in flight.futures:
            if fut is not None and not fut.done():
                fut.add_done_callback(_retrieve)
        if flight.batch is not None:
            prefix = 0
            while prefix < len(acked) and (acked[prefix] or is_placeholder(
                    flight.records[prefix])):
                prefix += 1
            delivered = [r for r, a in zip(flight.records[:prefix], acked, strict=False) if a]
            self._count("produced", delivered)
            self._count("replayed", delivered)
            await asyncio.to_thread(self.spill.commit, flight.batch, prefix)
            return []
        delivered = [r for r, a in zip(flight.records, acked, strict=True) if a]
        self._count("produced", delivered)
        return [r for i, (r, a) in enumerate(zip(flight.records, acked, strict=True))
                if not a and i not in flight.insured]


def _settled_prefix(
    records: Sequence[SpillRecord], outcomes: Sequence[BaseException | None]
) -> int:
    """How many leading records of a replay flight are done with (acked or set aside)."""
    for i, outcome in enumerate(outcomes):
        if outcome is not None and not isinstance(outcome, _PERMANENT):
            return i
    return len(records)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UndeliverableError):
        return str(exc)
    return f"refused as too large ({type(exc).__name__})"


def _fail_pending(producer: AIOKafkaProducer, error: KafkaError | None = None) -> None:
    """Fail every batch the producer holds (aiokafka has no public call for this)."""
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        accumulator.fail_all(error or KafkaTimeoutError("kafka sink abandoned this producer"))


def _records(chunk: Sequence[_Queued]) -> list[SpillRecord]:
    return [SpillRecord(q[1], q[2], q[3]) for q in chunk]


def _acked(fut: asyncio.Future[Any] | None) -> bool:
    return (fut is not None and fut.done() and not fut.cancelled()
            and fut.exception() is None)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 9092)


@dataclass
class _Episode:
    """Records going to the spill since `started` (a monotonic time), for the logs."""

    started: float
    spilled: int = 0
    replayed: int = 0
    discarded: int = 0


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a late future's exception as seen: its record was already spilled."""
    if not fut.cancelled():
        fut.exception()
