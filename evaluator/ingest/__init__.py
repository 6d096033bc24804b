"""Ingest: inference and label records from segment files or Kafka into the evaluator's store.

Exactly-once in effect. Every batch is one store transaction that also records where the batch
ends (`file:<stream dir>` -> `<segment>:<byte offset>`, `kafka:<topic>:<partition>` -> next
offset). A restart resumes from those positions, so nothing is skipped and nothing is counted
twice — including duplicate-label and bad-record counts, which a "dedup by request id" alone
would inflate on every replay.

- Files: every `inferences`/`labels` directory under `source.path` (one per gateway worker:
  `<path>/<stream>/` or `<path>/worker-N/<stream>/`), segments in name order; a trailing line
  without its newline is still being written and is left for the next poll.
- Kafka: consumer group `source.kafka.group_id` on both topics, manual commits after the store
  transaction. On assignment each partition seeks to the store's position (or the beginning
  when the store has none): the store, not the group's committed offset, is the source of
  truth, so a crash between store commit and Kafka commit re-reads nothing. Scale-out: records
  are keyed by request id, and the range assignor gives one consumer the same partition numbers
  of both topics, so with equal partition counts each consumer (with its own store) sees an
  inference and its labels together — a shard of requests. Use static membership
  (`group_instance_id`) so shards do not move; a moved partition is re-read from the start
  into its new owner's store.
- Records are read with the contract's reader (understudy/reader.py), the types and vocabulary
  the gateway writes with; labels pass the one label validator (understudy/labels.py).
- Record schema v1 additions (optional, so older records still parse): the inference's
  `registry_version`, each challenger outcome's `experiment` and `sample_rate`, the label's
  `reward` (the reward the gateway computed for its policy) and `received_ts` (label receipt
  time). Missing or malformed values are stored as unknown, never as a bad record.
- Bad input (malformed JSON, unknown schema version or kind, missing fields) is counted in the
  store (`bad:<reason>`) and logged, rate-limited; it never stops the loop.

Modules: `parse` (records -> rows of a store batch), `files` and `kafka` (the two sources and
their loops), `loop` (what both loops share); `run` below starts the configured one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

from evaluator.config import EvaluatorConfig
from evaluator.ingest.files import FileIngestor, FilePosition, FileRead, FileSource
from evaluator.ingest.kafka import KafkaIngestor
from evaluator.ingest.loop import HANDOFF_S, Progress
from evaluator.ingest.parse import RecordParser
from evaluator.store import Store

__all__ = ["HANDOFF_S", "FileIngestor", "FilePosition", "FileRead", "FileSource",
           "KafkaIngestor", "Progress", "RecordParser", "run", "run_source", "run_until_stopped"]


def run(config: EvaluatorConfig, *, once: bool = False, store: Store | None = None,
        stop: threading.Event | None = None) -> Progress:
    """Run the configured ingest loop until stopped (or, with once, until drained)."""
    opened = store or Store.open(config.store)
    try:
        return run_source(config, lambda: KafkaIngestor(config, opened),
                          lambda: FileIngestor(config, opened), once=once, stop=stop)
    finally:
        if store is None:
            opened.close()


class _AsyncRunner(Protocol):
    progress: Progress

    async def run(self, once: bool = False, stop: asyncio.Event | None = None) -> None: ...


class _Runner(Protocol):
    progress: Progress

    def run(self, once: bool = False, stop: threading.Event | None = None) -> None: ...


def run_source(config: EvaluatorConfig, kafka: Callable[[], _AsyncRunner],
               files: Callable[[], _Runner], *, once: bool,
               stop: threading.Event | None) -> Progress:
    """The configured source's loop (`kafka()` or `files()` builds it) until stopped; the
    Kafka one on its own event loop. Shared by the store's ingest and the lake's members."""
    if config.source.type == "kafka":
        consumer = kafka()
        asyncio.run(run_until_stopped(consumer, once, stop))
        return consumer.progress
    reader = files()
    reader.run(once=once, stop=stop)
    return reader.progress


async def run_until_stopped(runner: _AsyncRunner, once: bool,
                            stop: threading.Event | None) -> None:
    """`runner.run` on this event loop, stopped when the `stop` thread event is set."""
    event = asyncio.Event()
    if stop is not None:
        loop = asyncio.get_running_loop()

        def watch() -> None:
            stop.wait()
            loop.call_soon_threadsafe(event.set)

        threading.Thread(target=watch, daemon=True, name="evaluator-stop").start()
    await runner.run(once=once, stop=event)
