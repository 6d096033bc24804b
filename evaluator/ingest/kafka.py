"""The Kafka source: consumer group on both topics, offsets kept in the store (see the package
docstring, evaluator/ingest/__init__.py, for the offset contract)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

from evaluator.config import EvaluatorConfig
from evaluator.ingest.loop import HANDOFF_S, Ingestor, Progress
from evaluator.ingest.parse import RecordParser
from evaluator.store import Batch, IngestResult, Store, StoreLockedError

log = logging.getLogger(__name__)


def _kafka_key(topic: str, partition: int) -> str:
    return f"kafka:{topic}:{partition}"


class KafkaIngestor(Ingestor):
    """The `run` loop for the Kafka source (see the package docstring for the offset contract)."""

    def __init__(self, config: EvaluatorConfig, store: Store, parser: RecordParser | None = None,
                 progress: Progress | None = None) -> None:
        super().__init__(config, store, parser, progress)
        self.next_offset: dict[Any, int] = {}  # TopicPartition -> first offset not yet stored

    def _consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.coordinator.assignors.range import RangePartitionAssignor

        k = self.config.source.kafka
        return AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap, group_id=k.group_id, client_id=k.client_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=self.config.source.batch_records,
        )

    def _listener(self, consumer: Any) -> Any:
        from aiokafka import ConsumerRebalanceListener

        ingestor = self

        class SeekToStore(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
                stored = await asyncio.to_thread(ingestor.store.offsets, "kafka:")
                fresh = []
                for tp in assigned:
                    pos = stored.get(_kafka_key(tp.topic, tp.partition))
                    if pos is None:
                        fresh.append(tp)
                        ingestor.next_offset[tp] = 0
                    else:
                        consumer.seek(tp, int(pos))
                        ingestor.next_offset[tp] = int(pos)
                if fresh:
                    await consumer.seek_to_beginning(*fresh)
                log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@"
                                                 f"{ingestor.next_offset[tp]}" for tp in assigned))

        return SeekToStore()

    async def _caught_up(self, consumer: Any, started: float) -> bool:
        assignment = consumer.assignment()
        if not assignment:
            timeout = self.config.source.kafka.assignment_timeout_s
            if time.monotonic() - started > timeout:
                log.warning("no partitions assigned after %.0fs (do the topics exist?); "
                            "nothing to drain", timeout)
                return True
            return False
        ends = await consumer.end_offsets(list(assignment))
        for tp in assignment:
            if await consumer.position(tp) < ends[tp]:
                return False
        return True

    async def run(self, once: bool = False, stop: asyncio.Event | None = None) -> None:
        from aiokafka.errors import KafkaError

        stop = stop or asyncio.Event()
        k = self.config.source.kafka
        consumer = self._consumer()
        consumer.subscribe([k.inferences_topic, k.labels_topic], listener=self._listener(consumer))
        await consumer.start()
        started = last_release = time.monotonic()
        last_expire = -math.inf
        poll_ms = int(self.config.source.poll_interval_s * 1000)
        try:
            while not stop.is_set():
                data = await consumer.getmany(timeout_ms=poll_ms,
                                              max_records=self.config.source.batch_records)
                if time.monotonic() - last_expire >= self.config.store.expire_interval_s:
                    await asyncio.to_thread(self.store.expire_orphans)
                    last_expire = time.monotonic()
                if not data:
                    if once and await self._caught_up(consumer, started):
                        await asyncio.to_thread(self.store.expire_orphans)
                        break
                    await asyncio.to_thread(self.store.release)
                    last_release = time.monotonic()
                    continue
                batch, positions, commits = self._batch(data)
                result = await self._ingest(batch, positions, stop)
                if result is None:
                    break  # stopped while the store was locked: the batch is re-read next run
                self.next_offset.update(commits)
                self.progress.add(result)
                try:
                    await consumer.commit(commits)
                except KafkaError as exc:
                    # The store holds the position; the group offset only feeds lag monitoring.
                    log.warning("Kafka offset commit failed (%s); the store has the position, "
                                "nothing is lost or counted twice", exc)
                if self.store.exclusive and \
                        time.monotonic() - last_release >= self.config.store.release_interval_s:
                    await asyncio.to_thread(self.store.release)  # hand a reader the file
                    await asyncio.sleep(HANDOFF_S)
                    last_release = time.monotonic()
        finally:
            await consumer.stop()
            self.progress.maybe_log(force=True)

    async def _ingest(self, batch: Batch, positions: dict[str, str],
                      stop: asyncio.Event) -> IngestResult | None:
        """Store the batch, waiting out a reader that holds the DuckDB file (never drop it)."""
        while not stop.is_set():
            try:
                return await asyncio.to_thread(self.store.ingest, batch, positions)
            except StoreLockedError as exc:
                log.warning("%s; retrying", exc)
                await asyncio.sleep(self.config.source.poll_interval_s)
        return None

    def _batch(self, data: dict[Any, list[Any]]) -> tuple[Batch, dict[str, str], dict[Any, int]]:
        batch = Batch()
        positions: dict[str, str] = {}
        commits: dict[Any, int] = {}
        for tp, messages in data.items():
            floor = self.next_offset.get(tp, 0)
            where = f"{tp.topic}[{tp.partition}]"
            for m in messages:
                if m.offset < floor:
                    continue  # already in the store (re-delivered around a rebalance)
                if m.value is None:
                    self.parser.count_bad(batch, "empty_message", f"offset {m.offset}", where)
                    continue
                self.parser.parse(batch, m.value, f"{where}@{m.offset}")
            last = messages[-1].offset + 1
            if last > floor:
                positions[_kafka_key(tp.topic, tp.partition)] = str(last)
                commits[tp] = last
        return batch, positions, commits
