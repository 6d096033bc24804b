"""The registry as a compacted Kafka topic: the source of truth when `log.sink: kafka`.

See `KafkaStore`; the interface and the conflict rules are in gateway/backends/registry_store.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from gateway.backends.file_store import read_states, write_states
from gateway.backends.kafka_topics import kafka_admin, topic_partitions
from gateway.backends.registry_store import OnChange, StaleWrite
from gateway.backends.retry import Backoff, connect_with_retry
from gateway.config import KafkaConfig
from gateway.control.state import RouteState
from gateway.errors import ConfigError, UpstreamUnavailable

log = logging.getLogger(__name__)


class KafkaStore:
    """The registry as a compacted Kafka topic: the source of truth when `log.sink: kafka`.

    Key = route name, value = the route's full `RouteState` JSON. A deleted route is a
    tombstone *state* (a value with `"config": null`), not a null Kafka value, so compaction
    keeps it and the YAML does not seed the route again.

    Every replica assigns itself all partitions (no consumer group: each one must read every
    record), reads from the beginning on start, and follows the topic. Records are applied in
    offset order, and the latest record for a key is both what every replica applied last and
    what compaction keeps: replicas converge, including ones that start after compaction.

    Writes: the writer first catches up to the topic's end, checks the route's version (the
    compare-and-set), produces with acks=all and waits until its own consumer has read the
    record back. Kafka has no compare-and-set, so two writes racing within that window on two
    replicas both land and the later one in the topic wins (last-writer-wins); both are in the
    audit stream. A client that must not overwrite a concurrent change sends
    `expected_version`, which is checked against the caught-up state.

    If the broker is unreachable at start, the store serves the last snapshot it cached in the
    local state file (`admin.state_path`) and keeps retrying in the background; writes are
    refused with 503 until it is connected.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        cache_path: str | Path,
        *,
        connect_timeout_s: float = 15.0,
        commit_timeout_s: float = 10.0,
        retry_interval_s: float = 2.0,
    ) -> None:
        self.kafka = kafka
        self.topic = kafka.registry_topic
        self.cache_path = Path(cache_path)
        self.connect_timeout_s = connect_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self.retry_interval_s = retry_interval_s
        self._on_change: OnChange | None = None
        self._states: dict[str, RouteState] = {}
        self._positions: dict[Any, int] = {}
        self._advanced = asyncio.Condition()
        self._consumer: Any = None
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._write_lock = asyncio.Lock()
        self._cache_task: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()
        # Set by the registry: run once the store becomes reachable after a degraded start
        # (it seeds the routes it could not seed then).
        self.on_connected: Callable[[], Coroutine[Any, Any, None]] | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        try:
            await self._open()
        except Exception as exc:  # timeout, refused connection, broker error: degrade
            cached = await asyncio.to_thread(self._read_cache)
            log.error(
                "registry topic %s unreachable at %s (%s); serving %d cached route state(s) "
                "from %s and retrying in the background; admin writes are refused until then",
                self.topic, self.kafka.bootstrap, exc or type(exc).__name__, len(cached),
                self.cache_path,
            )
            for state in cached.values():
                self._apply(state)
            self._task = asyncio.create_task(self._reconnect(), name="registry-kafka-reconnect")
            return
        self._task = asyncio.create_task(self._follow(), name="registry-kafka-follow")

    def _read_cache(self) -> dict[str, RouteState]:
        try:
            return read_states(self.cache_path)
        except (ConfigError, OSError) as exc:
            log.warning("registry cache %s unusable: %s", self.cache_path, exc)
            return {}

    async def _connect(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        partitions = await self._ensure_topic()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._positions = {tp: 0 for tp in tps}
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap, acks="all", enable_idempotence=True,
        )
        await self._producer.start()
        targets = await self._consumer.end_offsets(tps)
        await self._read_until(targets)
        self._connected = True
        log.info("registry: %d route state(s) read from topic %s", len(self._states), self.topic)

    async def _ensure_topic(self) -> set[int]:
        """Create the topic compacted if missing (auto-creation would make it non-compacted);
        return its partition ids."""
        from aiokafka.admin import NewTopic

        async with kafka_admin(self.kafka.bootstrap) as admin:
            if self.topic not in await admin.list_topics():
                topic = NewTopic(
                    self.topic, num_partitions=1, replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"},
                )
                # -1: the cluster's default.replication.factor (CreateTopics v4+), which
                # NewTopic's own argument check does not allow to say directly.
                topic.replication_factor = -1
                response = await admin.create_topics([topic])
                for error in getattr(response, "topic_errors", ()):
                    code = error[1]
                    if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (another replica won)
                        raise UpstreamUnavailable(
                            f"cannot create registry topic {self.topic}: {error}"
                        )
                log.info("registry: created compacted topic %s", self.topic)
            for _ in range(100):  # creation is asynchronous: wait for the partitions to exist
                if partitions := await topic_partitions(admin, self.topic):
                    return partitions
                await asyncio.sleep(0.1)
            raise UpstreamUnavailable(f"registry topic {self.topic} has no partitions")

    async def _disconnect(self) -> None:
        self._connected = False
        for client in (self._producer, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._producer = self._consumer = None

    async def _open(self) -> None:
        """One connection attempt within `connect_timeout_s`; a failed one leaves no client."""
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._connect()
        except Exception:
            await self._disconnect()
            raise

    async def _reconnect(self) -> None:
        """After a degraded start: retry every `retry_interval_s`, then follow the topic."""
        await asyncio.sleep(self.retry_interval_s)
        await connect_with_retry(
            self._open, Backoff(self.retry_interval_s, self.retry_interval_s, factor=1),
            on_failure=lambda exc, _: log.warning("registry topic still unreachable: %s",
                                                  exc or type(exc).__name__))
        log.info("registry topic %s reachable again; following it", self.topic)
        if self.on_connected is not None:
            hook = asyncio.create_task(self.on_connected())
            self._hooks.add(hook)
            hook.add_done_callback(self._hooks.discard)
        await self._follow()

    def _apply(self, state: RouteState) -> None:
        self._states[state.name] = state
        assert self._on_change is not None
        self._on_change(state)

    def _schedule_cache(self) -> None:
        """Snapshot the state to the local cache file, coalescing bursts into one write."""
        if self._cache_task is None or self._cache_task.done():
            self._cache_task = asyncio.create_task(self._write_cache())

    async def _write_cache(self) -> None:
        await asyncio.sleep(0.05)
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(write_states, self.cache_path, dict(self._states))
        except OSError as exc:
            log.warning("cannot write registry cache %s: %s", self.cache_path, exc)

    async def _poll_once(self, timeout_ms: int) -> None:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        changed = False
        for records in batches.values():
            for record in records:
                try:
                    state = RouteState.from_json(orjson.loads(record.value))
                except (orjson.JSONDecodeError, ConfigError, TypeError) as exc:
                    log.error("registry: skipping bad record at offset %d: %s", record.offset, exc)
                    continue
                self._apply(state)
                changed = True
        for tp in self._positions:
            self._positions[tp] = await self._consumer.position(tp)
        async with self._advanced:
            self._advanced.notify_all()
        if changed:
            self._schedule_cache()

    async def _read_until(self, targets: dict[Any, int]) -> None:
        while any(self._positions.get(tp, 0) < end for tp, end in targets.items()):
            await self._poll_once(200)

    async def _follow(self) -> None:
        while True:
            try:
                await self._poll_once(500)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry: error following topic %s; retrying", self.topic)
                await asyncio.sleep(self.retry_interval_s)

    async def _catch_up(self) -> None:
        """Wait until the follower has read everything in the topic as of now."""
        if not self._connected:
            raise UpstreamUnavailable(
                f"registry topic {self.topic} at {self.kafka.bootstrap} is unreachable; "
                "admin changes are refused until the gateway reconnects"
            )
        targets = await self._consumer.end_offsets(list(self._positions))
        async with asyncio.timeout(self.commit_timeout_s):
            async with self._advanced:
                await self._advanced.wait_for(
                    lambda: all(self._positions.get(tp, 0) >= end for tp, end in targets.items())
                )

    async def _read_to_end(self) -> None:
        """`_catch_up`, a timeout being the topic's unavailability (503)."""
        try:
            await self._catch_up()
        except TimeoutError:
            raise UpstreamUnavailable(f"registry topic {self.topic}: catch-up timed out") from None

    async def latest(self, route: str) -> RouteState | None:
        await self._read_to_end()
        return self._states.get(route)

    async def changes(self) -> list[dict[str, Any]]:
        """Every record is applied in offset order (none is skipped, unlike the file store's
        poll), so each applied change reaches `on_change` with its state: catching up with the
        topic's end is enough, and there is nothing more to return."""
        await self._read_to_end()
        return []

    async def commit(self, state: RouteState, expected_version: int) -> RouteState:
        async with self._write_lock:  # one write at a time per replica: no self-races
            try:
                await self._catch_up()
                current = self._states.get(state.name)
                actual = current.version if current is not None else 0
                if actual != expected_version:
                    raise StaleWrite(state.name, expected_version, actual)
                meta = await asyncio.wait_for(
                    self._producer.send_and_wait(
                        self.topic, key=state.name.encode(), value=orjson.dumps(state.to_json())
                    ),
                    self.commit_timeout_s,
                )
                from aiokafka import TopicPartition

                tp = TopicPartition(meta.topic, meta.partition)
                async with asyncio.timeout(self.commit_timeout_s):
                    async with self._advanced:
                        await self._advanced.wait_for(
                            lambda: self._positions.get(tp, 0) > meta.offset
                        )
            except TimeoutError:
                raise UpstreamUnavailable(
                    f"registry topic {self.topic}: write not confirmed within "
                    f"{self.commit_timeout_s:.0f} s"
                ) from None
        return state

    async def close(self) -> None:
        for task in (self._task, self._cache_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._cache_task is not None and self._states:
            # One last snapshot, so a start during a broker outage has the newest state.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(write_states, self.cache_path, dict(self._states))
        self._task = self._cache_task = None
        await self._disconnect()
