"""Ingest members: records from Kafka (one consumer group) or segment files into the lake.

Exactly-once in effect, without a transaction spanning Kafka and storage:

- At least once into the lake. A member parses what it polls into a `LakeBatch`, and every
  `lake.file_records` records or `lake.flush_interval_s` seconds (and before it gives up
  partitions in a rebalance, and when it stops) writes the batch's Parquet files — each
  atomically and durably (storage.py) — and only then commits the Kafka offsets after the
  records it wrote. A member killed at any point has committed only offsets whose records are
  durable: the partition's next owner resumes at the committed offset, so nothing is lost.
- At most once out of it. What the dead member wrote after its last commit is read again by the
  next owner and written again, with the same `(src, pos)` — Kafka topic, partition, offset.
  Read rule 1 (layout.py) makes rows with one source position one record, so the replay is
  neither counted twice nor mistaken for an at-least-once duplicate from the gateway (those
  have their own offsets and are counted, as the store counts them).

Scale-out: add members to the consumer group (Deployment replicas); any member may own any
partition, because nothing is joined at ingest — the report joins the whole dataset.

Files: the file source (one member per machine, the gateway's segment files) keeps its
positions in `<lake>/_offsets/<member>.json`, written after the data files, with the same
argument: a crash between the two re-reads lines whose rows are already there, with the same
`(src, pos)`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from evaluator.config import EvaluatorConfig
from evaluator.ingest import FilePosition, FileSource, Progress, RecordParser, run_source
from evaluator.lake import layout
from evaluator.lake.columns import LakeBatch
from evaluator.lake.fastparse import FastParser
from evaluator.lake.storage import Lake
from evaluator.store import IngestResult

log = logging.getLogger(__name__)


def member_name(config: EvaluatorConfig) -> str:
    return config.lake.member or f"{socket.gethostname()}-{os.getpid()}"


def open_lake(config: EvaluatorConfig) -> Lake:
    lake = Lake(config.lake.path)
    lake.ensure()
    return lake


class LakeWriter:
    """Buffers parsed records and writes them as one file per partition on `flush`."""

    def __init__(self, lake: Lake, member: str, parser: RecordParser,
                 progress: Progress) -> None:
        self.lake = lake
        self.member = member
        self.progress = progress
        self.fast = FastParser(parser)
        self.batch = LakeBatch()
        self.started = math.inf  # monotonic time of the first buffered record
        self.files_written = 0

    def add(self, src: str, positions: Sequence[int], raws: Sequence[bytes | None]) -> None:
        """Parse records read at `src` (record i at `positions[i]`) into the buffer."""
        if raws and not len(self.batch):
            self.started = time.monotonic()
        self.fast.parse_many(self.batch, src, positions, raws)

    def reject(self, src: str, pos: int, reason: str) -> None:
        self.batch.at(src, pos)
        if not len(self.batch):
            self.started = time.monotonic()
        self.batch.reject(reason)

    def due(self, file_records: int, interval_s: float) -> bool:
        n = len(self.batch)
        return n >= file_records or (n > 0 and time.monotonic() - self.started >= interval_s)

    def flush(self) -> list[str]:
        """Write every buffered record durably; returns the files (empty: nothing buffered)."""
        batch = self.batch
        if not len(batch):
            return []
        today = layout.utc_date(time.time())
        paths = [self.lake.write(rel, table, self.member) for rel, table in batch.tables(today)]
        self.batch = LakeBatch()
        self.started = math.inf
        self.files_written += len(paths)
        self.progress.add(IngestResult(
            records=batch.records, rows=len(batch.request_id),
            labels=len(batch.l_request_id), bad=sum(batch.bad.values()), ignored=batch.ignored))
        return paths


class _Member:
    """What both sources' members are: a named writer into the lake with a progress line."""

    def __init__(self, config: EvaluatorConfig, lake: Lake, member: str | None = None) -> None:
        self.config = config
        self.lake = lake
        self.member = member or member_name(config)
        self.progress = Progress(config.source.progress_interval_s)
        self.writer = LakeWriter(lake, self.member, RecordParser.from_config(config),
                                 self.progress)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class FileMember(_Member):
    """The file source into the lake: positions in `_offsets/<member>.json` after the data."""

    def __init__(self, config: EvaluatorConfig, lake: Lake, member: str | None = None) -> None:
        super().__init__(config, lake, member)
        self.source = FileSource(config.source.path)
        self.offsets_path = lake.path("_offsets", f"{self.member}.json")
        raw = lake.read_bytes(self.offsets_path)
        self.positions: dict[str, str] = json.loads(raw) if raw else {}
        self.pending: dict[str, str] = {}

    def drain(self, stop: threading.Event | None = None) -> int:
        """Read everything readable now into the buffer, flushing as it fills; lines read."""
        total = 0
        cfg = self.config
        while stop is None or not stop.is_set():
            moved = 0
            for stream_dir in self.source.stream_dirs():
                moved += self._read(stream_dir)
                if self.writer.due(cfg.lake.file_records, cfg.lake.flush_interval_s):
                    self.flush()
            total += moved
            if not moved:
                break
        return total

    def _read(self, stream_dir: Path) -> int:
        key = self.source.key(stream_dir)
        start = FilePosition.decode(self.pending.get(key) or self.positions.get(key))
        read = self.source.read(stream_dir, start, self.config.source.batch_records)
        if read.position is None or read.position == start:
            return 0
        prefix = f"{key}/"
        for segment, run in itertools.groupby(read.lines, key=lambda line: line[1]):
            lines = list(run)
            self.writer.add(prefix + segment, [at for _, _, at in lines],
                            [line for line, _, _ in lines])
        for segment, at in read.partial:
            self.writer.reject(prefix + segment, at, "partial_line")
        self.pending[key] = read.position.encode()
        return len(read.lines) + read.partial_lines

    def flush(self) -> None:
        """Data files first, then the positions after them (see the module docstring)."""
        self.writer.flush()
        if self.pending:
            self.positions.update(self.pending)
            self.pending = {}
            self.lake.put_bytes(self.offsets_path, json.dumps(self.positions).encode())

    def run(self, once: bool = False, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        cfg = self.config
        while not stop.is_set():
            self.drain(stop)
            if once:
                break
            if self.writer.due(cfg.lake.file_records, cfg.lake.flush_interval_s):
                self.flush()
            stop.wait(cfg.source.poll_interval_s)
        self.flush()
        self.progress.maybe_log(force=True)


# --------------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------------


class KafkaMember(_Member):
    """One member of the ingest consumer group (see the module docstring for the contract)."""

    def __init__(self, config: EvaluatorConfig, lake: Lake, member: str | None = None) -> None:
        super().__init__(config, lake, member)
        self.uncommitted: dict[Any, int] = {}  # TopicPartition -> next offset, once written
        self._flush_lock = asyncio.Lock()
        self.consumer: Any = None

    def _consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer

        k = self.config.source.kafka
        return AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap, group_id=k.group_id,
            client_id=f"{k.client_id}-{self.member}", enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.config.source.batch_records,
        )

    def _listener(self) -> Any:
        from aiokafka import ConsumerRebalanceListener

        member = self

        class FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
                # Hand partitions over with everything read from them durable and committed.
                await member.flush()

            async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
                log.info("%s: assigned %s", member.member,
                         ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned))

        return FlushOnRevoke()

    async def flush(self) -> None:
        """Write the buffer durably, then commit the offsets after it (never before)."""
        from aiokafka.errors import KafkaError

        async with self._flush_lock:
            commits = self.uncommitted
            self.uncommitted = {}
            await asyncio.to_thread(self.writer.flush)
            if not commits:
                return
            try:
                await self.consumer.commit(commits)
            except KafkaError as exc:
                # The rows are durable; the next owner re-reads them and read rule 1 makes
                # the copies one record. Nothing is lost or counted twice.
                log.warning("%s: Kafka offset commit failed (%s); the partition's next owner "
                            "re-reads records the lake already holds (deduplicated at read)",
                            self.member, exc)

    async def _caught_up(self, started: float) -> bool:
        assignment = self.consumer.assignment()
        if not assignment:
            timeout = self.config.source.kafka.assignment_timeout_s
            return time.monotonic() - started > timeout
        ends = await self.consumer.end_offsets(list(assignment))
        for tp in assignment:
            if await self.consumer.position(tp) < ends[tp]:
                return False
        return True

    async def run(self, once: bool = False, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        cfg = self.config
        k = cfg.source.kafka
        self.consumer = self._consumer()
        self.consumer.subscribe([k.inferences_topic, k.labels_topic], listener=self._listener())
        await self.consumer.start()
        started = time.monotonic()
        poll_ms = int(cfg.source.poll_interval_s * 1000)
        try:
            while not stop.is_set():
                data = await self.consumer.getmany(timeout_ms=poll_ms,
                                                   max_records=cfg.source.batch_records)
                for tp, messages in data.items():
                    src = f"kafka:{tp.topic}:{tp.partition}"
                    self.writer.add(src, [m.offset for m in messages],
                                    [m.value for m in messages])
                    if messages:
                        self.uncommitted[tp] = messages[-1].offset + 1
                if self.writer.due(cfg.lake.file_records, cfg.lake.flush_interval_s) or \
                        (not data and self.uncommitted):
                    await self.flush()
                if not data and once and await self._caught_up(started):
                    break
            await self.flush()
        finally:
            await self.consumer.stop()
            self.progress.maybe_log(force=True)


def run(config: EvaluatorConfig, *, once: bool = False,
        stop: threading.Event | None = None) -> Progress:
    """Run this process's ingest member until stopped (or, with once, until drained)."""
    lake = open_lake(config)
    return run_source(config, lambda: KafkaMember(config, lake), lambda: FileMember(config, lake),
                      once=once, stop=stop)
