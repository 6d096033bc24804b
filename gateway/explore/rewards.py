"""Reward feedback for the exploration policies: credit each label to the arm that served it.

Why a bus: the policies' posteriors must survive restarts and be shared by every replica, but a
label can arrive at any replica while only the replica that served the request remembers which
arm did (a bounded `RewardTracker`). So a resolved label becomes a small *reward event*
`{route, arm, reward}` published on a shared, durable, ordered log, and every replica — the
publisher included — applies events only as it reads them back. Replaying the log from the
start on boot rebuilds the same posterior on every replica.

Two buses, like the other stores:
- `FileRewardBus` (embedded default): an append-only JSONL file next to the registry state;
  replicas on one machine tail it.
- `KafkaRewardBus` (`log.sink: kafka`): topic `log.kafka.rewards_topic`, read from the
  beginning by every replica (no consumer group: each replica needs every event); labels are
  read from `labels_topic` by every replica too, so whichever replica served a request credits
  it, wherever the label was posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson

from gateway import metrics
from gateway.dataplane.routes import RouteTable
from gateway.errors import NotFound
from gateway.explore.policies import RewardTracker, reward_from_label
from understudy.records import LabelRecord

log = logging.getLogger(__name__)

RewardEvent = dict[str, Any]  # {"route": str, "arm": str, "reward": float, "request_id": str}


LabelHandler = Callable[[Sequence[LabelRecord]], None]


class RewardBus(Protocol):
    async def start(self, apply: Callable[[RewardEvent], None], on_labels: LabelHandler) -> None:
        """Replay every past event through `apply`, then keep following new ones.

        A bus that also carries labels between replicas hands them to `on_labels`.
        """

    async def publish(self, event: RewardEvent) -> None: ...

    async def close(self) -> None: ...


class PolicyLearner:
    """Remembers exploration decisions and turns labels into policy updates via the bus."""

    def __init__(self, routes: RouteTable, bus: RewardBus, tracker: RewardTracker) -> None:
        self.routes = routes
        self.bus = bus
        self.tracker = tracker
        self._publishing: set[asyncio.Task[None]] = set()

    def remember(self, route: str, request_id: str, arm: str, score: float | None) -> None:
        self.tracker.remember(request_id, route, arm, score)

    def reward_for(self, label: LabelRecord) -> float | None:
        """The reward this label gives the policy, if this replica served the request under an
        exploring policy and still remembers it (else None); the label record logs it."""
        entry = self.tracker.peek(label["request_id"])
        if entry is None or entry.route not in self.routes:
            return None
        config = self.routes.get(entry.route).config
        try:
            return reward_from_label(label["label"], entry.score, config.threshold,
                                     config.policy.reward, label["reward"])
        except ValueError:
            return None

    def on_labels(self, labels: Sequence[LabelRecord]) -> None:
        """Feedback listener: resolve each label against what this replica served."""
        for label in labels:
            entry = self.tracker.resolve(label["request_id"])
            if entry is None:
                continue  # not served here, already credited, or forgotten: counted by tracker
            try:
                runtime = self.routes.get(entry.route)
                policy = runtime.config.policy
                reward = reward_from_label(
                    label["label"], entry.score, runtime.config.threshold, policy.reward,
                    label["reward"],
                )
            except (NotFound, ValueError) as exc:
                log.warning("label for %s not usable as a reward: %s", label["request_id"], exc)
                metrics.REWARDS.labels(entry.route, "invalid").inc()
                continue
            metrics.REWARDS.labels(entry.route, "matched").inc()
            event = {"route": entry.route, "arm": entry.arm, "reward": reward,
                     "request_id": label["request_id"]}
            task = asyncio.get_running_loop().create_task(self.bus.publish(event))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    def apply(self, event: RewardEvent) -> None:
        """Bus callback: update the route's policy (ignored when the arm is no longer there)."""
        route = event.get("route")
        if not isinstance(route, str) or route not in self.routes:
            return
        runtime = self.routes.get(route)
        arm = event.get("arm")
        if arm not in runtime.config.explore_arms:
            return
        try:
            runtime.policy.update(str(arm), float(event["reward"]))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring malformed reward event %r: %s", event, exc)
            return
        for name, mean in runtime.policy.means(runtime.config.explore_arms).items():
            if mean is not None:
                metrics.POSTERIOR_MEAN.labels(route, name).set(mean)

    async def drain(self) -> None:
        if self._publishing:
            await asyncio.gather(*list(self._publishing), return_exceptions=True)


class FileRewardBus:
    """Reward events in one append-only JSONL file; every process tails it."""

    def __init__(self, path: str | Path, poll_s: float = 0.2) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self._offset = 0
        self._apply: Callable[[RewardEvent], None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, apply: Callable[[RewardEvent], None], on_labels: LabelHandler) -> None:
        # Labels reach this process's learner directly from /v2/feedback in file mode.
        self._apply = apply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._read_new()
        self._task = asyncio.create_task(self._follow(), name="reward-bus-follow")

    def _read_new(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if self._apply is not None and isinstance(event, dict):
                self._apply(event)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self._read_new()
            except OSError:
                log.exception("cannot read reward events from %s", self.path)

    async def publish(self, event: RewardEvent) -> None:
        line = orjson.dumps(event) + b"\n"
        # O_APPEND writes of one short line are atomic between processes on a local file system.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            self._read_new()


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

    async def start(self, apply: Callable[[RewardEvent], None], on_labels: LabelHandler) -> None:
        self._tasks = [asyncio.create_task(self._run(apply, on_labels), name="reward-bus")]

    async def _run(self, apply: Callable[[RewardEvent], None], on_labels: LabelHandler) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        backoff = 0.5
        while True:
            async with contextlib.AsyncExitStack() as clients:
                try:
                    producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                                enable_idempotence=True, linger_ms=5)
                    clients.push_async_callback(producer.stop)
                    await producer.start()
                    rewards = await self._consumer(self.rewards_topic, "earliest", clients)
                    # Replay the reward history first, so posteriors resume where they were.
                    await _replay_to_end(rewards, apply)
                    labels = await self._consumer(self.labels_topic, "latest", clients)
                except (KafkaError, OSError) as exc:
                    log.warning("reward bus: Kafka not reachable (%s); retrying in %.1f s",
                                exc, backoff)
                else:
                    self._producer = producer
                    # Runs until close() cancels it; the exit stack then stops every client.
                    await asyncio.gather(
                        _follow(rewards, apply),
                        _follow(labels, lambda rec: on_labels([rec])),
                        self._send_pending(),
                    )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

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


async def _replay_to_end(consumer: Any, apply: Callable[[RewardEvent], None]) -> None:
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


def _deliver(value: bytes | None, handle: Callable[[Any], None] | Callable[[Any], Awaitable[None]]
             ) -> None:
    if not value:
        return
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return
    if isinstance(event, dict):
        handle(event)
