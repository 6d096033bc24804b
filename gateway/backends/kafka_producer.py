"""The Kafka sink's producer: started with backoff, retired after a failure, stopped in bounded
time. The second layer of `KafkaSink` (gateway/backends/kafka_sink.py), above the buffer.

A producer that failed a batch is discarded rather than repaired (an idempotent producer's
sequence numbers are no longer trustworthy after a failed batch, so a fresh one is cheaper), and
reconnecting waits `retry_backoff_ms`, doubling up to `reconnect_backoff_max_ms`
(gateway/backends/retry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from gateway import metrics
from gateway.backends.kafka_buffer import SINK_LOGGER, BufferedSink
from gateway.backends.retry import connect_with_retry

log = logging.getLogger(SINK_LOGGER)

CONNECT_ERRORS = (KafkaError, OSError, TimeoutError)  # a producer that could not start


class ProducerSink(BufferedSink):
    """Adds the producer's life cycle to the buffered sink."""

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
        except CONNECT_ERRORS as exc:
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
            self._open_producer, self._backoff, errors=CONNECT_ERRORS, on_failure=failed,
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
            fail_pending(producer)
        task = asyncio.ensure_future(producer.stop())
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            fail_pending(producer)
            done, _ = await asyncio.wait({task}, timeout=max(2.0, self._request_timeout))
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await producer.client.close()

    async def _pause(self, seconds: float) -> None:
        """Sleep for a backoff, but wake at once for close()."""
        if self._closing:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)


def fail_pending(producer: AIOKafkaProducer, error: KafkaError | None = None) -> None:
    """Fail every batch the producer holds (aiokafka has no public call for this).

    A batch failed before the sender took it also fails its drain waiter, which only a send
    queued behind it would read: marked read here, or asyncio logs "never retrieved" for it.
    """
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is None:
        return
    accumulator.fail_all(error or KafkaTimeoutError("kafka sink abandoned this producer"))
    for batches in list(accumulator._batches.values()):
        for batch in batches:
            waiter = batch._drain_waiter
            if waiter.done() and not waiter.cancelled():
                waiter.exception()
