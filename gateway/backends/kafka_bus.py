"""The reward bus on Kafka (`log.sink: kafka`): reward events and labels shared by replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import metrics
from gateway.backends.retry import Backoff, connect_with_retry
from gateway.backends.reward_bus import ApplyReward, LabelHandler, RewardEvent

log = logging.getLogger(__name__)


@dataclass
class _Clients:
    """The bus's connected clients; closing `stack` stops them all."""

    stack: contextlib.AsyncExitStack
    producer: Any
    rewards: Any
    labels: Any


class KafkaRewardBus:
    """Reward events on a Kafka topic; labels followed from the labels topic by every replica.

    Connecting happens in the background with backoff, so a broker that is down when the
    gateway starts delays reward updates but never the gateway. Events published meanwhile
    wait in a bounded queue (oldest dropped past `max_pending`, counted).
    """

    def __init__(self, bootstrap: str, rewards_topic: str, labels_topic: str,
                 max_pending: int = 100_000) -> None:
        self.bootstrap = bootstrap
        self.rewards_topic = rewards_topic
        self.labels_topic = labels_topic
        self._pending: deque[RewardEvent] = deque(maxlen=max_pending)
        self._wake = asyncio.Event()
        self._producer: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, apply: ApplyReward, on_labels: LabelHandler) -> None:
        self._tasks = [asyncio.create_task(self._run(apply, on_labels), name="reward-bus")]

    async def _run(self, apply: ApplyReward, on_labels: LabelHandler) -> None:
        from aiokafka.errors import KafkaError

        def unreachable(exc: BaseException, delay: float | None) -> None:
            log.warning("reward bus: Kafka not reachable (%s); retrying in %.1f s", exc, delay)

        clients = await connect_with_retry(
            lambda: self._open(apply), Backoff(0.5, 30.0), errors=(KafkaError, OSError),
            on_failure=unreachable)
        assert clients is not None  # never gives up
        async with clients.stack:
            self._producer = clients.producer
            # Runs until close() cancels it; the exit stack then stops every client.
            await asyncio.gather(
                _follow(clients.rewards, apply),
                _follow(clients.labels, lambda rec: on_labels([rec])),
                self._send_pending(),
            )

    async def _open(self, apply: ApplyReward) -> _Clients:
        """Start the producer and both consumers, replaying the reward history through `apply`
        first (so posteriors resume where they were); on failure every client started is
        stopped again."""
        from aiokafka import AIOKafkaProducer

        async with contextlib.AsyncExitStack() as stack:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                        enable_idempotence=True, linger_ms=5)
            stack.push_async_callback(producer.stop)
            await producer.start()
            rewards = await self._consumer(self.rewards_topic, "earliest", stack)
            await _replay_to_end(rewards, apply)
            labels = await self._consumer(self.labels_topic, "latest", stack)
            return _Clients(stack.pop_all(), producer, rewards, labels)

    async def _send_pending(self) -> None:
        while True:
            while self._pending:
                event = self._pending[0]
                try:
                    await self._producer.send_and_wait(
                        self.rewards_topic, orjson.dumps(event),
                        key=str(event.get("request_id", "")).encode(),
                    )
                except Exception:
                    log.warning("reward bus: publish failed; will retry", exc_info=True)
                    await asyncio.sleep(1.0)
                    continue
                self._pending.popleft()
            self._wake.clear()
            await self._wake.wait()

    async def _consumer(self, topic: str, reset: str, clients: contextlib.AsyncExitStack) -> Any:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(topic, bootstrap_servers=self.bootstrap, group_id=None,
                                    auto_offset_reset=reset, enable_auto_commit=False)
        clients.push_async_callback(consumer.stop)
        await consumer.start()
        return consumer

    async def publish(self, event: RewardEvent) -> None:
        if len(self._pending) == self._pending.maxlen:
            metrics.REWARDS.labels(str(event.get("route")), "dropped").inc()
        self._pending.append(event)
        self._wake.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _replay_to_end(consumer: Any, apply: ApplyReward) -> None:
    await consumer.getmany(timeout_ms=100)  # joins the topic's partitions
    partitions = consumer.assignment()
    if not partitions:
        return
    end = await consumer.end_offsets(list(partitions))
    await consumer.seek_to_beginning(*partitions)
    while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            for record in records:
                _deliver(record.value, apply)


async def _follow(consumer: Any, handle: Callable[[Any], None]) -> None:
    async for record in consumer:
        _deliver(record.value, handle)


def _deliver(value: bytes | None, handle: Callable[[Any], None]) -> None:
    if not value:
        return
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return
    if isinstance(event, dict):
        handle(event)
