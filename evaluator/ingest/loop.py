"""What the file and Kafka ingest loops share: progress reporting and the store hand-off pause."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from evaluator.config import EvaluatorConfig
from evaluator.ingest.parse import RecordParser
from evaluator.store import IngestResult, Store

log = logging.getLogger(__name__)

HANDOFF_S = 0.5  # how long a busy ingest loop stays off a DuckDB file so a reader can open it


class Progress:
    """Rows ingested and rate, logged every `interval_s` on long runs and once at the end."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.emit = emit or (lambda line: log.info("%s", line))
        self.totals: Counter[str] = Counter()
        self.started = clock()
        self._last_at = self.started
        self._last_read = 0

    @property
    def read(self) -> int:
        t = self.totals
        return t["records"] + t["duplicates"] + t["labels"] + t["bad"] + t["ignored"]

    def add(self, result: IngestResult) -> None:
        for key in ("records", "rows", "duplicates", "labels", "bad", "ignored"):
            self.totals[key] += getattr(result, key)
        self.maybe_log()

    def line(self) -> str:
        now = self.clock()
        t = self.totals
        rate = (self.read - self._last_read) / max(now - self._last_at, 1e-9)
        overall = self.read / max(now - self.started, 1e-9)
        return (f"ingested {self.read:,} records ({rate:,.0f}/s now, {overall:,.0f}/s overall): "
                f"{t['records']:,} inferences ({t['rows']:,} predictions), "
                f"{t['duplicates']:,} duplicate inferences, {t['labels']:,} labels, "
                f"{t['bad']:,} bad, {t['ignored']:,} ignored")

    def maybe_log(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._last_at >= self.interval_s:
            self.emit(self.line())
            self._last_at = now
            self._last_read = self.read


class Ingestor:
    """What a source's loop starts from: the config, the store, a parser and a progress line."""

    def __init__(self, config: EvaluatorConfig, store: Store, parser: RecordParser | None = None,
                 progress: Progress | None = None) -> None:
        self.config = config
        self.store = store
        self.parser = parser or RecordParser.from_config(config)
        self.progress = progress or Progress(config.source.progress_interval_s)
