"""The file source: the gateway's segment files read incrementally, positions kept in the store.

Every `inferences`/`labels` directory under `source.path` (one per gateway worker:
`<path>/<stream>/` or `<path>/worker-N/<stream>/`, understudy/segments.py), segments in name
order; a trailing line without its newline is still being written and is left for the next
poll. The position (`file:<stream dir>` -> `<segment>:<byte offset>`) is committed with each
batch in one store transaction.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluator.config import EvaluatorConfig
from evaluator.ingest.loop import HANDOFF_S, Ingestor, Progress
from evaluator.ingest.parse import RecordParser
from evaluator.store import Batch, Store, StoreLockedError
from understudy.records import INFERENCES, LABELS
from understudy.segments import segment_paths, stream_dirs

log = logging.getLogger(__name__)

STREAM_DIRS = (INFERENCES, LABELS)


@dataclass(frozen=True)
class FilePosition:
    """Where the next unread byte of one stream directory is."""

    segment: str
    offset: int

    def encode(self) -> str:
        return f"{self.segment}:{self.offset}"

    @classmethod
    def decode(cls, value: str | None) -> FilePosition | None:
        if not value:
            return None
        segment, _, offset = value.rpartition(":")
        return cls(segment, int(offset))


@dataclass
class FileRead:
    lines: list[tuple[bytes, str, int]]  # (line, segment name, the line's byte offset)
    position: FilePosition | None
    # unterminated lines left behind in finished segments: (segment name, byte offset)
    partial: list[tuple[str, int]] = field(default_factory=list)

    @property
    def partial_lines(self) -> int:
        return len(self.partial)


class FileSource:
    """Reads the gateway's segment files (understudy/segments.py layout) incrementally."""

    def __init__(self, root: str | Path, chunk_bytes: int = 8 << 20) -> None:
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes

    def stream_dirs(self) -> list[Path]:
        """Every inferences/labels directory: `<root>/<stream>` and `<root>/worker-N/<stream>`."""
        found = stream_dirs(self.root, STREAM_DIRS)
        # inferences before labels: most labels then join on arrival instead of waiting
        return sorted(found, key=lambda p: (p.name != "inferences", p.as_posix()))

    def key(self, stream_dir: Path) -> str:
        return "file:" + stream_dir.relative_to(self.root).as_posix()

    def read(self, stream_dir: Path, start: FilePosition | None, max_records: int) -> FileRead:
        """Up to `max_records` complete lines after `start`, and the position after them."""
        segments = segment_paths(stream_dir)
        if not segments:
            return FileRead([], start)
        names = [s.name for s in segments]
        if start is None:
            i, offset = 0, 0
        else:
            i = bisect.bisect_left(names, start.segment)
            if i == len(names):
                return FileRead([], start)
            if names[i] == start.segment:
                offset = start.offset
            else:
                log.warning("%s: segment %s is gone (retention?); continuing at %s",
                            stream_dir, start.segment, names[i])
                offset = 0
        lines: list[tuple[bytes, str, int]] = []
        partial: list[tuple[str, int]] = []
        while len(lines) < max_records:
            segment = segments[i]
            size = segment.stat().st_size
            consumed, done = self._read_segment(segment, offset, size,
                                                max_records - len(lines), lines)
            offset += consumed
            if not done:
                break  # batch full
            if i + 1 >= len(segments):
                break  # the live segment: wait for more
            if offset < size:
                # An unterminated line in a segment the writer has left (it crashed mid-line).
                partial.append((segment.name, offset))
                log.warning("%s: unterminated last line (%d bytes) skipped", segment,
                            size - offset)
            i, offset = i + 1, 0
        return FileRead(lines, FilePosition(names[i], offset), partial)

    def _read_segment(self, segment: Path, offset: int, size: int, room: int,
                      lines: list[tuple[bytes, str, int]]) -> tuple[int, bool]:
        """Append complete lines from offset; (bytes consumed, reached the last full line)."""
        consumed = 0
        with open(segment, "rb") as fh:
            while room > 0 and offset + consumed < size:
                fh.seek(offset + consumed)
                remaining = size - offset - consumed
                data = fh.read(min(self.chunk_bytes, remaining))
                end = data.rfind(b"\n")
                if end < 0:
                    if len(data) == remaining:
                        return consumed, True  # only a partial line left
                    data += fh.read(remaining - len(data))  # one line longer than a chunk
                    end = data.rfind(b"\n")
                    if end < 0:
                        return consumed, True
                parts = data[:end].split(b"\n")
                if len(parts) > room:
                    parts = parts[:room]
                    used = sum(len(p) + 1 for p in parts)
                else:
                    used = end + 1
                name, at = segment.name, offset + consumed
                for p in parts:
                    if p:
                        lines.append((p, name, at))
                    at += len(p) + 1
                room -= len(parts)
                consumed += used
                if room <= 0:
                    return consumed, offset + consumed >= size
        return consumed, True


class FileIngestor(Ingestor):
    """The `run` loop for the file source."""

    def __init__(self, config: EvaluatorConfig, store: Store, parser: RecordParser | None = None,
                 progress: Progress | None = None) -> None:
        super().__init__(config, store, parser, progress)
        self.source = FileSource(config.source.path)
        self._positions: dict[str, str] | None = None

    def drain(self, stop: threading.Event | None = None, budget_s: float | None = None) -> int:
        """Ingest what is readable now, one batch per stream directory in turn (so a busy
        inference stream cannot starve the labels); returns the number of lines read.

        With `budget_s`, returns after about that long even if more is waiting
        (`self.caught_up` tells which).
        """
        if self._positions is None:
            self._positions = self.store.offsets("file:")
        deadline = math.inf if budget_s is None else time.monotonic() + budget_s
        total = 0
        self.caught_up = False
        while stop is None or not stop.is_set():
            moved = [n for d in self.source.stream_dirs() if (n := self._one_batch(d)) is not None]
            total += sum(moved)
            if not moved:
                self.caught_up = True
                break
            if time.monotonic() >= deadline:
                break
        return total

    def _one_batch(self, stream_dir: Path) -> int | None:
        """Lines read from one stream directory; None when its position did not move."""
        assert self._positions is not None
        key = self.source.key(stream_dir)
        start = FilePosition.decode(self._positions.get(key))
        read = self.source.read(stream_dir, start, self.config.source.batch_records)
        if read.position is None or read.position == start:
            return None
        batch = Batch()
        prefix = stream_dir.name
        for line, segment, at in read.lines:
            self.parser.parse(batch, line, f"{prefix}/{segment}@{at}")
        for _ in read.partial:
            batch.reject("partial_line")
        position = read.position.encode()
        self.progress.add(self.store.ingest(batch, {key: position}))
        self._positions[key] = position
        return len(read.lines) + read.partial_lines

    def run(self, once: bool = False, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        cfg = self.config
        last_expire = -math.inf
        while not stop.is_set():
            try:
                self.drain(stop, budget_s=cfg.store.release_interval_s)
            except StoreLockedError as exc:  # a long report holds the DuckDB file: wait
                log.warning("%s; retrying", exc)
                stop.wait(cfg.source.poll_interval_s)
                continue
            if (once and self.caught_up) or \
                    time.monotonic() - last_expire >= cfg.store.expire_interval_s:
                self.store.expire_orphans()
                last_expire = time.monotonic()
            if self.caught_up:
                if once:
                    break
                self.store.release()  # idle: let `report`/`promote` open a DuckDB store
                stop.wait(cfg.source.poll_interval_s)
            elif self.store.exclusive:
                # Busy for release_interval_s: hand the file to any waiting reader briefly.
                self.store.release()
                stop.wait(HANDOFF_S)
        self.progress.maybe_log(force=True)
