"""The `max_unspilled_ms` guard of the Kafka sink: no accepted record only in memory for long.

The third layer of `KafkaSink` (gateway/backends/kafka_sink.py), above the producer.

No loss: the guarantee
----------------------
A record leaves the sink's responsibility only when Kafka acknowledged it, it was written and
fsynced to the local spill (gateway/backends/spill.py, under `<log.path>/spill/`), or it was
set aside visibly (oversized: gateway/backends/kafka_buffer.py). On top of that, **no accepted
record is held only in memory for longer than `max_unspilled_ms`**
(`log.kafka.max_unspilled_ms`, default 1000),
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka.errors import KafkaConnectionError

from gateway.backends.kafka_buffer import SINK_LOGGER, Flight
from gateway.backends.kafka_producer import ProducerSink, fail_pending

log = logging.getLogger(SINK_LOGGER)


class BrokerUnreachableError(KafkaConnectionError):
    """Every broker address refused the connection: the flight is failed at once, not after
    `delivery_timeout_ms` (its records are on the spill already)."""


_DOWN_REMINDER_S = 30.0  # WARNING cadence while Kafka stays down


class GuardedSink(ProducerSink):
    """Adds the guard task that keeps the `max_unspilled_ms` promise (module docstring)."""

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

    async def _insure(self, flight: Flight) -> None:
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

    async def _probe(self, flight: Flight) -> None:
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

    def _abort(self, flight: Flight, why: str) -> None:
        """Fail a flight now (the broker refuses connections); its records are on the spill."""
        flight.aborted = True
        self._set_down(f"connection refused: {why}")
        producer = self._producer
        if producer is not None:
            fail_pending(producer, BrokerUnreachableError(why))
        if flight.window is not None:  # a send() waiting for metadata or buffer space
            flight.window.reschedule(asyncio.get_running_loop().time())


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 9092)
