"""The Kafka sink: every record to Kafka, none lost, never on the client's critical path.

How a record travels
--------------------
`emit()` (synchronous, called from the gateway's record task) appends `(seq, stream, key,
value, emit time)` to an in-memory FIFO and returns. A single *pump* task takes the queue in
*flights* (up to `flight_records` records / `flight_bytes` bytes), hands them to aiokafka (which
compresses and pipelines; never `send_and_wait` per record) and then waits for all of the
flight's delivery futures. Streams map to topics (`inferences` -> `topic`, `labels` ->
`labels_topic`, `audit` -> `audit_topic`), the key is the request id (the route for `audit`),
the producer is idempotent with `acks="all"`.

Batched sends
-------------
The `inferences` stream (one record per request id: its key only spreads load, no order per key
to keep) is sent as whole batches: `producer.create_batch()`, `append()` until the batch refuses
(full at `max_batch_bytes`) or the flight ends, then `send_batch()` to a partition chosen per
batch, round-robin over the partitions with a leader (what Kafka's sticky partitioner does,
without a murmur2 hash, a partitioner call and an accumulator append per record: ~5-15 us of CPU
per record, docs/BENCHMARKS.md). Every record of a batch shares the batch's future, so all of
them are acknowledged, or fail, together; the per-record outcomes the spill, the metrics and the
oversized-record isolation work on are read from it unchanged. `labels` and `audit` (their
readers rely on the order per key) keep `producer.send()` with key partitioning. Batches go out
closed, i.e. at once, so aiokafka's `linger_ms` no longer applies to them: the pump lingers
instead, taking a queue smaller than one batch only `linger_ms` after its oldest record or the
previous flight's end, whichever is later (at once for `flush()` / `close()`).

The sink is built in layers, one module each: the state and what it holds unacknowledged (queue,
flight, spill, oversized records, outage logs: gateway/backends/kafka_buffer.py), the producer's
life cycle (kafka_producer.py), the `max_unspilled_ms` guard and its no-loss guarantee
(kafka_guard.py), and here the `LogSink` API, the pump and the send path.

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
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from gateway import metrics
from gateway.backends.kafka_buffer import Flight, Queued, acked, as_records
from gateway.backends.kafka_guard import GuardedSink
from gateway.backends.spill import SpillRecord, is_placeholder
from understudy.records import INFERENCES

log = logging.getLogger(__name__)


class UndeliverableError(KafkaError):
    """A spilled record that no retry can deliver (e.g. its stream has no topic any more)."""


# Errors no retry can fix: the record is set aside (oversized/), never spilled or retried.
_PERMANENT = (MessageSizeTooLargeError, RecordTooLargeError, UndeliverableError)
_YIELD_EVERY = 64  # records handed to aiokafka per event-loop turn (~1-2 ms of work)
# Streams sent as whole batches on a partition chosen per batch (module docstring); the others
# keep send() per record with key partitioning, for their readers' order per key.
BATCHED_STREAMS = frozenset({INFERENCES})


@dataclass
class _OpenBatch:
    """A batch being filled for one topic, and the flight indices of its records."""

    builder: Any  # aiokafka's BatchBuilder (untyped)
    members: list[int] = field(default_factory=list)


class KafkaSink(GuardedSink):
    """LogSink that produces to Kafka with a durable local spill; see the module docstring."""

    _turn: int = 0  # batches sent so far: the round-robin partition cursor
    _last_flight: float = 0.0  # monotonic time the last queue flight was settled

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
        """Queue one record; never waits on the network (limits: kafka_buffer.py's docstring)."""
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
        leftovers.extend(as_records(self._take_all()))
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

    # ------------------------------------------------------------------ the pump

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
                await self._linger()
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

    async def _linger(self) -> None:
        """Let a queue smaller than one batch fill for `linger_ms`, counted from its oldest
        record or from the last flight's end, whichever is later.

        Batches are sent closed, so aiokafka does not linger on them: without this every flight
        would go out as soon as the last one was acknowledged, many small requests instead of
        a few full ones (under load: twice the flights, +18% gateway CPU per request). Counting
        from the last flight keeps the cycle aiokafka's linger gave, `linger_ms` + a round
        trip. flush() and close() cut the wait short (they set `_wake`).
        """
        if self._closing or not self._queue:
            return
        linger = min(self.config.linger_ms / 1000, self._spill_after / 4)
        wait = max(self._queue[0][4], self._last_flight) + linger - time.monotonic()
        if (wait <= 0 or len(self._queue) >= self.flight_records
                or self._queue_bytes >= self._producer_kwargs["max_batch_size"]):
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=wait)

    # ------------------------------------------------------------------ delivery

    async def _send_queued(self, chunk: list[Queued]) -> bool:
        flight = Flight(as_records(chunk), [q[0] for q in chunk], oldest=chunk[0][4])
        self._flight = flight
        outcomes = await self._deliver(flight)
        if flight.insuring is not None:
            await asyncio.shield(flight.insuring)  # know which records have a copy on disk
        failed: list[Queued] = []
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
                    records = as_records(failed)
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
        self._last_flight = time.monotonic()
        self._buffered_gauge.set(len(self._queue))
        self._progress.set()
        return first_error is None

    async def _replay_once(self) -> bool:
        batch = await asyncio.to_thread(self.spill.peek, self.flight_records, self.flight_bytes)
        if not batch.records:
            return True
        flight = Flight(batch.records, [], batch)
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

    async def _deliver(self, flight: Flight) -> list[BaseException | None]:
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
    def _refused(flight: Flight, indices: Iterable[int],
                 outcomes: Sequence[BaseException | None]) -> list[int]:
        """Records a broker refused as too large (not the client-side size check)."""
        return [i for i in indices
                if flight.futures[i] is not None and isinstance(outcomes[i], _PERMANENT)]

    async def _send_group(self, flight: Flight, indices: list[int],
                          outcomes: list[BaseException | None]) -> None:
        """Send `flight.records[i]` for i in indices; fill `outcomes` (None = acknowledged).

        `BATCHED_STREAMS` records go into batches (module docstring), each record's future
        being its batch's; the others go through send() one by one. Waits while deliveries make
        progress; gives up after `delivery_timeout_ms` without any (the broker is gone, or
        aiokafka is stuck on it), marking the rest as timed out. The guard cuts that short when
        the brokers refuse connections (`_abort`).
        """
        producer = self._producer
        if producer is None:
            raise KafkaTimeoutError("no producer")
        loop = asyncio.get_running_loop()
        for i in indices:
            flight.futures[i] = None
            outcomes[i] = None
        filling: dict[str, _OpenBatch] = {}
        try:
            async with asyncio.timeout(self._request_timeout) as window:
                flight.window = window
                for pos, i in enumerate(indices):
                    record = flight.records[i]
                    if is_placeholder(record):
                        continue
                    topic = self.topics.get(record.stream)
                    if topic is None:
                        outcomes[i] = UndeliverableError(f"unknown stream {record.stream!r}")
                        continue
                    try:
                        if record.stream in BATCHED_STREAMS:
                            await self._add_to_batch(producer, filling, topic, flight, i)
                        else:
                            flight.futures[i] = await producer.send(
                                topic, record.value, record.key.encode())
                    except _PERMANENT as exc:
                        outcomes[i] = exc
                    if pos % _YIELD_EVERY == _YIELD_EVERY - 1:
                        # Appending rarely suspends: without this a flight would hold the event
                        # loop (and every client request behind it) for its whole length.
                        await asyncio.sleep(0)
                        if not flight.aborted:  # else _abort() has fired it: keep it fired
                            window.reschedule(loop.time() + self._request_timeout)
                while filling:
                    topic, batch = filling.popitem()
                    await self._send_batch(producer, topic, batch, flight)
        except (KafkaError, OSError, TimeoutError) as exc:
            error = exc if not isinstance(exc, TimeoutError) else KafkaTimeoutError(
                "send not accepted within request_timeout_ms" if not flight.aborted
                else f"send interrupted: Kafka is down ({self._down_reason})")
            for i in indices:  # not handed to aiokafka: not reached, or in an unsent batch
                if (flight.futures[i] is None and outcomes[i] is None
                        and not is_placeholder(flight.records[i])):
                    outcomes[i] = error
        finally:
            flight.window = None
        pending = {f for i in indices if (f := flight.futures[i]) is not None}  # batches: once
        while pending:
            done, pending = await asyncio.wait(pending, timeout=self._delivery_timeout)
            if not done:
                break
        for late in pending:
            late.add_done_callback(_retrieve)
        for i in indices:
            fut = flight.futures[i]
            if fut is None:
                continue
            if not fut.done():
                outcomes[i] = KafkaTimeoutError("delivery not confirmed within delivery_timeout_ms")
            elif fut.cancelled():
                outcomes[i] = KafkaTimeoutError("delivery cancelled")
            else:
                outcomes[i] = fut.exception()

    async def _add_to_batch(self, producer: AIOKafkaProducer, filling: dict[str, _OpenBatch],
                            topic: str, flight: Flight, i: int) -> None:
        """Append record `i` to `topic`'s open batch, sending that batch first if it is full.

        Raises MessageSizeTooLargeError for a record above `max_request_bytes`, as send() does
        (only a spilled record from a run with a larger limit can be one: emit() sets them
        aside).
        """
        record = flight.records[i]
        key = record.key.encode()
        if (len(key) + len(record.value) + 128 > self.config.max_request_bytes
                and self._too_large(record.key, record.value)):
            raise MessageSizeTooLargeError(
                f"the record is larger than max_request_bytes={self.config.max_request_bytes}")
        batch = filling.get(topic)
        if batch is None:
            batch = filling[topic] = _OpenBatch(producer.create_batch())
        if batch.builder.append(key=key, value=record.value, timestamp=None) is None:
            del filling[topic]  # full: if sending it fails, its records are marked unsent
            await self._send_batch(producer, topic, batch, flight)
            batch = filling[topic] = _OpenBatch(producer.create_batch())
            batch.builder.append(key=key, value=record.value, timestamp=None)  # 1st always fits
        batch.members.append(i)

    async def _send_batch(self, producer: AIOKafkaProducer, topic: str, batch: _OpenBatch,
                          flight: Flight) -> None:
        """Hand a batch to aiokafka on the next partition; its future becomes its records'."""
        batch.builder.close()  # closed: drained at once, no append from send() on this batch
        partitions = await producer.partitions_for(topic)
        available = producer.client.cluster.available_partitions_for_topic(topic)
        choices = sorted(available or partitions)
        partition = choices[self._turn % len(choices)]
        self._turn += 1
        future = await producer.send_batch(batch.builder, topic, partition=partition)
        for i in batch.members:
            flight.futures[i] = future
        window = flight.window
        if window is not None and not flight.aborted:  # progress: extend the send window
            window.reschedule(asyncio.get_running_loop().time() + self._request_timeout)

    async def _settle_abandoned(self, flight: Flight) -> list[SpillRecord]:
        """At close: what of an interrupted flight still needs the spill (in order)."""
        acks = [acked(flight.future(i)) for i in range(len(flight.records))]
        for fut in {f for f in flight.futures if f is not None and not f.done()}:
            fut.add_done_callback(_retrieve)
        if flight.batch is not None:
            prefix = 0
            while prefix < len(acks) and (acks[prefix] or is_placeholder(
                    flight.records[prefix])):
                prefix += 1
            delivered = [r for r, a in zip(flight.records[:prefix], acks, strict=False) if a]
            self._count("produced", delivered)
            self._count("replayed", delivered)
            await asyncio.to_thread(self.spill.commit, flight.batch, prefix)
            return []
        delivered = [r for r, a in zip(flight.records, acks, strict=True) if a]
        self._count("produced", delivered)
        return [r for i, (r, a) in enumerate(zip(flight.records, acks, strict=True))
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


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a late future's exception as seen: its record was already spilled."""
    if not fut.cancelled():
        fut.exception()
