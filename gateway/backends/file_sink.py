"""The embedded default sink: durable, append-only segment files on local disk.

Layout (understudy/segments.py, shared with the evaluator's reader):
`<path>/<stream>/<20-digit first sequence number>.jsonl`, one record per line (orjson never
emits a raw newline), segments rotated once they pass `segment_bytes`. A reader (the evaluator)
reads segments in name order and ignores a trailing line without its newline: that record is
still being written. The value already carries its request id (the key), so a line
is exactly the record's JSON.

fsync policy (`log.fsync`):
- `always`: every batch the writer takes is fsynced before `flush()` returns: a crash loses
  nothing that was written.
- `interval` (default): fsync at most every `fsync_interval_ms`; a power loss can lose that
  window, a process crash loses nothing (data is in the page cache).
- `never`: leave it to the OS.

Writes happen on the sink's own writer thread so the event loop never waits on disk; `emit`
only appends to an in-memory list (and, for the first record after a quiet spell, sets an
event the writer sleeps on). The writer then waits `flush_interval_ms` to gather a batch,
writes it, and sleeps again: the event loop is never woken by the sink, where a worker handing
results back to the loop every flush cost the loop about half a wake-up per request at
moderate rates (docs/BENCHMARKS.md). If the writer falls behind by more than `max_buffered`
records, `emit` writes the backlog synchronously: backpressure instead of unbounded memory or
dropped records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from gateway import metrics
from understudy.records import STREAMS
from understudy.segments import segment_name, segment_paths, segment_sequence

log = logging.getLogger(__name__)


class _SegmentWriter:
    """Appends lines to one stream's current segment; rotates by size. Used from one thread."""

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        existing = segment_paths(directory)
        self.sequence = 0
        if existing:
            last = existing[-1]
            self.sequence = segment_sequence(last) + _count_lines(last)
            self._open(last)
        else:
            self._open(self._path_for(self.sequence))

    def _path_for(self, sequence: int) -> Path:
        return self.directory / segment_name(sequence)

    def _open(self, path: Path) -> None:
        self.file = open(path, "ab")  # noqa: SIM115 - lives as long as the writer
        self.size = self.file.tell()
        if self.size and not _ends_with_newline(path):
            # A crash mid-line left a partial record: terminate it so the next one parses.
            self.file.write(b"\n")
            self.size += 1

    def write(self, lines: list[bytes]) -> None:
        """Append lines, starting a new segment whenever the current one reaches its size."""
        chunk: list[bytes] = []
        chunk_bytes = 0
        for line in lines:
            if chunk and self.size + chunk_bytes >= self.segment_bytes:
                self._append(chunk, chunk_bytes)
                chunk, chunk_bytes = [], 0
            if not chunk and self.size >= self.segment_bytes:
                self.file.close()
                self._open(self._path_for(self.sequence))
            chunk.append(line)
            chunk_bytes += len(line) + 1
        if chunk:
            self._append(chunk, chunk_bytes)

    def _append(self, chunk: list[bytes], chunk_bytes: int) -> None:
        self.file.write(b"\n".join(chunk) + b"\n")
        self.size += chunk_bytes
        self.sequence += len(chunk)

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sync()
        self.file.close()


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


class FileSink:
    """Segment-file sink; see the module docstring for layout and durability."""

    def __init__(
        self,
        path: str | Path,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        fsync: str = "interval",
        fsync_interval_ms: int = 200,
        max_buffered: int = 50_000,
        flush_interval_ms: int = 20,
    ) -> None:
        self.root = Path(path)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.fsync_interval = fsync_interval_ms / 1000
        self.max_buffered = max_buffered
        self.flush_interval = flush_interval_ms / 1000
        self._pending: dict[str, list[bytes]] = {s: [] for s in STREAMS}
        self._buffered = 0  # records in _pending
        metrics.LOG_BUFFERED.labels("file").track(self)  # reads `_buffered` at scrape
        self._writers: dict[str, _SegmentWriter] = {}
        self._thread: threading.Thread | None = None
        # `_pending` and `_buffered` change on the loop thread (emit) and the writer's (take).
        self._pending_lock = threading.Lock()
        # Taking a batch and writing it happen under `_io_lock` together, so batches reach the
        # file in the order they were taken, whichever thread writes them.
        self._io_lock = threading.Lock()
        self._ready = threading.Event()  # set by emit when records wait and the writer may sleep
        self._stop_requested = threading.Event()
        self._last_sync = 0.0
        self._closed = False

    def _writer(self, stream: str) -> _SegmentWriter:
        writer = self._writers.get(stream)
        if writer is None:
            writer = _SegmentWriter(self.root / stream, self.segment_bytes)
            self._writers[stream] = writer
        return writer

    def gauge_value(self) -> float:
        """Records emitted and not yet handed to the writer: `understudy_log_buffered_records`."""
        return self._buffered

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._write_loop, name="file-sink-writer",
                                        daemon=True)
        self._thread.start()

    def emit(self, stream: str, key: str, value: bytes) -> None:
        if self._closed:
            raise RuntimeError("FileSink is closed")
        with self._pending_lock:
            try:  # a stream keeps a list once it has one (`_take` gives each a fresh one)
                pending = self._pending[stream]
            except KeyError:
                pending = self._pending[stream] = []
            pending.append(value)
            buffered = self._buffered = self._buffered + 1
        if buffered >= self.max_buffered:
            # The writer fell behind: write on the caller's thread rather than grow without bound.
            self._write_pending(force_sync=False)
        elif buffered == 1:
            self._ready.set()

    def _take(self) -> dict[str, list[bytes]]:
        with self._pending_lock:
            batches = {s: lines for s, lines in self._pending.items() if lines}
            self._pending = {s: [] for s in self._pending}
            self._buffered = 0
        return batches

    def _write_pending(self, force_sync: bool) -> None:
        """Take what is pending and write it (the writer thread, a backpressured emit on the
        loop thread, and flush/close may all get here)."""
        with self._io_lock:
            batches = self._take()
            if batches or force_sync:
                self._write_locked(batches, force_sync)

    def _write_locked(self, batches: dict[str, list[bytes]], force_sync: bool) -> None:
        for stream, lines in batches.items():
            self._writer(stream).write(lines)
            metrics.child(metrics.LOG_RECORDS, stream, "written").inc(len(lines))
        now = time.monotonic()
        if self.fsync == "always" or force_sync or (
            self.fsync == "interval" and now - self._last_sync >= self.fsync_interval
        ):
            for writer in self._writers.values():
                writer.sync()
            self._last_sync = now
        else:
            for writer in self._writers.values():
                writer.file.flush()

    def _write_loop(self) -> None:
        """The writer thread: sleep until records wait, gather for `flush_interval`, write."""
        stop = self._stop_requested
        while not stop.is_set():
            self._ready.wait()
            if stop.is_set():
                break
            # Cut short by close(); otherwise the records of the next flush_interval join in.
            stop.wait(self.flush_interval)
            self._ready.clear()  # before taking: an emit after the take wakes the next round
            try:
                self._write_pending(force_sync=False)
            except OSError:
                log.exception("file sink write failed; retrying")

    async def flush(self) -> None:
        await asyncio.to_thread(self._write_pending, self.fsync != "never")

    async def close(self) -> None:
        if self._thread is not None:
            self._stop_requested.set()
            self._ready.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        await self.flush()
        self._closed = True
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def read_stream(root: Path, stream: str) -> list[bytes]:
    """Every complete record of one stream under a file sink's directory, in file order.

    `serve --workers N` gives each worker its own `worker-K` directory; this reads every
    worker's, since any of them may have written what the reader needs.
    """
    roots = [root]
    if root.name.startswith("worker-") and root.parent.is_dir():
        roots = sorted(p for p in root.parent.iterdir() if p.name.startswith("worker-"))
    lines: list[bytes] = []
    for directory in roots:
        for segment in segment_paths(directory / stream):
            data = segment.read_bytes()
            lines.extend(data[: data.rfind(b"\n") + 1].splitlines())
    return lines
