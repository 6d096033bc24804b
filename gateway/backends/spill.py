"""A durable local buffer for log records that Kafka could not take yet.

The Kafka sink promises that no record is lost while the broker is unreachable; this module is
where those records wait. It is deliberately dumb and synchronous (the sink calls it from a
worker thread, or from `emit` in the rare overflow case): an append-only log of framed records
on local disk, read back in the order written, deleted once delivered.

Layout under the spill directory (`<log.path>/spill/`):

    000000000007.spill   segments, append-only, named by an increasing index
    cursor               "<segment index> <byte offset>": how far replay has got
    .lock                flock held by the one process that owns this directory

Frame: `>II` (body length, crc32 of body), then the body: `>B` stream length, stream (ASCII),
`>H` key length, key (UTF-8), value. The CRC makes a torn write (crash or full disk mid-append)
detectable: reading stops at the first bad frame of a segment and moves on to the next one.

Durability (the fsync policy): every `append` is one `write` of all its frames followed by one
`fsync` before it returns, so a record the sink counts as spilled survives a process crash or
power loss. The sink batches: it appends at most once per guard tick (`max_unspilled_ms / 10`)
plus once per failed flight or queue overflow, never once per record. The cursor is advanced
with an atomic rename but not fsynced: losing it replays a few records twice (Kafka consumers
see a duplicate), never loses one. Each process start appends to a fresh segment, so a torn
tail left by a crash is never appended after.

Budget: the bytes of all segment files on disk (what the operator actually pays for) never
exceed `budget_bytes`. `append` writes the longest prefix of its records that fits and returns
how many it took; the caller keeps the rest and decides what to do (see KafkaSink's docstring
for the limit behaviour). Going over the budget logs an ERROR once per episode and sets
`understudy_log_spill_full` to 1 until space is freed.

Ownership: one process per directory (an exclusive flock), because two writers appending to and
deleting the same segments would corrupt each other. A second opener gets SpillLockedError; run
several gateway workers with one spill directory each.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

from gateway import metrics

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".spill"
_HEADER = struct.Struct(">II")
_MAX_BODY = 1 << 30  # sanity bound: a longer length field is corruption, not a record


class SpillLockedError(RuntimeError):
    """Another process owns this spill directory."""


class SpillRecord(NamedTuple):
    """One log record as the sink received it: which stream, its key (request id) and value."""

    stream: str
    key: str
    value: bytes


@dataclass
class SpillBatch:
    """Records read from the head of the spill, and where the cursor goes after each of them."""

    records: list[SpillRecord] = field(default_factory=list)
    ends: list[tuple[int, int]] = field(default_factory=list)  # (segment index, end offset)

    def __len__(self) -> int:
        return len(self.records)


class SpillSpan(NamedTuple):
    """Where one append's frames lie: (segment index, offset) of their start and end."""

    start: tuple[int, int]
    end: tuple[int, int]


def encode(record: SpillRecord) -> bytes:
    """Frame one record (header + body)."""
    stream = record.stream.encode("ascii")
    key = record.key.encode("utf-8")
    body = b"".join((
        struct.pack(">B", len(stream)), stream, struct.pack(">H", len(key)), key, record.value,
    ))
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def framed_size(record: SpillRecord) -> int:
    """Bytes the record takes on disk (keys/streams are short; computed without encoding)."""
    return _HEADER.size + 3 + len(record.stream) + len(record.key.encode("utf-8")) + len(
        record.value)


def _decode(body: bytes) -> SpillRecord:
    n_stream = body[0]
    stream = body[1:1 + n_stream].decode("ascii")
    pos = 1 + n_stream
    (n_key,) = struct.unpack_from(">H", body, pos)
    pos += 2
    key = body[pos:pos + n_key].decode("utf-8")
    return SpillRecord(stream, key, body[pos + n_key:])


class SpillBuffer:
    """Append-only, fsynced, budgeted record log with a replay cursor. Thread-safe."""

    def __init__(
        self,
        directory: str | Path,
        budget_bytes: int,
        *,
        segment_bytes: int | None = None,
        fsync: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.budget_bytes = int(budget_bytes)
        # Small segments free disk soon after replay starts; big ones keep the file count low.
        self.segment_bytes = segment_bytes or max(1 << 20, min(64 << 20, self.budget_bytes // 16))
        self.fsync = fsync
        self._lock = threading.Lock()
        self._lock_file: BinaryIO | None = None
        self._sizes: dict[int, int] = {}  # segment index -> bytes on disk (valid or not)
        self._active: BinaryIO | None = None
        self._active_index: int | None = None
        self._cursor: tuple[int, int] = (0, 0)
        self._full = False
        self._opened = False
        self._pending = 0

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Take ownership of the directory and load what a previous run left behind."""
        with self._lock:
            if self._opened:
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.directory / ".lock", "ab")  # noqa: SIM115 - held until close
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.close()
                raise SpillLockedError(
                    f"spill directory {self.directory} is in use by another process") from None
            self._lock_file = lock_file
            for path in self.directory.glob(f"*{SEGMENT_SUFFIX}"):
                stem = path.name[: -len(SEGMENT_SUFFIX)]
                if stem.isdigit():
                    self._sizes[int(stem)] = path.stat().st_size
            self._cursor = self._load_cursor()
            self._drop_consumed()
            self._opened = True
            self._publish()
            if self._sizes:
                log.info("spill: %d bytes in %d segment(s) left by a previous run in %s; "
                         "they will be replayed", self._pending_locked(), len(self._sizes),
                         self.directory)

    def close(self) -> None:
        """fsync and release the directory. Pending records stay on disk for the next open."""
        with self._lock:
            if self._active is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._active.fileno())
                self._active.close()
                self._active = None
                self._active_index = None
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
            self._opened = False

    # ------------------------------------------------------------------ state

    @property
    def disk_bytes(self) -> int:
        """Bytes of all segment files: what counts against the budget."""
        with self._lock:
            return sum(self._sizes.values())

    @property
    def pending_bytes(self) -> int:
        """Bytes not yet replayed (frames after the cursor), as of the last completed change.

        Lock-free on purpose: the sink asks from the event loop, and waiting for the lock while
        a worker thread writes and fsyncs megabytes would stall every client request behind it.
        """
        return self._pending

    def is_empty(self) -> bool:
        return self.pending_bytes == 0

    @property
    def full(self) -> bool:
        """True since an append was refused for lack of budget, until space is freed."""
        return self._full

    def _pending_locked(self) -> int:
        index, offset = self._cursor
        total = 0
        for seg, size in self._sizes.items():
            if seg > index:
                total += size
            elif seg == index:
                total += max(0, size - offset)
        return total

    def _publish(self) -> None:
        """After every change, under the lock: the cached pending size and the gauges."""
        self._pending = self._pending_locked()
        metrics.LOG_SPILL_BYTES.set(self._pending)
        metrics.LOG_SPILL_FULL.set(1 if self._full else 0)

    # ------------------------------------------------------------------ append

    def append(self, records: Sequence[SpillRecord]) -> int:
        """Durably append the longest prefix of `records` that fits the budget; return its length.

        The write is one `write` + `fsync`. On an I/O error (e.g. the disk is really full) the
        segment is truncated back so no torn frame remains, and 0 is returned.
        """
        return self.append_span(records)[0]

    def append_span(self, records: Sequence[SpillRecord]) -> tuple[int, SpillSpan | None]:
        """`append`, also returning where the written frames lie (for `discard`)."""
        if not records:
            return 0, None
        with self._lock:
            if not self._opened:
                raise RuntimeError("SpillBuffer is not open")
            room = self.budget_bytes - sum(self._sizes.values())
            frames: list[bytes] = []
            used = 0
            for record in records:
                frame = encode(record)
                if used + len(frame) > room:
                    break
                frames.append(frame)
                used += len(frame)
            if len(frames) < len(records):
                if not self._full:
                    log.error(
                        "spill buffer FULL: %s holds %d bytes against a budget of %d bytes; "
                        "Kafka has been unreachable for too long. Records are now held in memory "
                        "up to the sink's bound and then DROPPED (counted in "
                        "understudy_log_records{outcome=\"dropped\"}).",
                        self.directory, sum(self._sizes.values()), self.budget_bytes)
                self._full = True
            if not frames:
                self._publish()
                return 0, None
            fh = self._writer()
            start = self._sizes[self._active_index]  # type: ignore[index]
            try:
                _write_all(fh, b"".join(frames))
                if self.fsync:
                    os.fsync(fh.fileno())
            except OSError:
                log.exception("spill: write to %s failed; records stay in memory", fh.name)
                with contextlib.suppress(OSError):
                    os.ftruncate(fh.fileno(), start)
                self._publish()
                return 0, None
            index = self._active_index
            assert index is not None
            self._sizes[index] = start + used
            if len(frames) == len(records):
                self._full = False
            self._publish()
            return len(frames), SpillSpan((index, start), (index, start + used))

    def discard(self, span: SpillSpan) -> bool:
        """Consume `span` without replaying it, if nothing older is still pending.

        The sink spills copies of records still in flight to Kafka once they pass its bound;
        when Kafka then acknowledges them, discarding the copies avoids a duplicate. Anything
        else (older records pending, or the span already partly replayed) leaves the spill as
        it is: the copies are then replayed, i.e. delivered twice, never lost.
        """
        with self._lock:
            if self._cursor != span.start or span.end[0] not in self._sizes:
                return False
            self._cursor = span.end
            self._drop_consumed()
            self._save_cursor()
            self._publish()
            return True

    def _writer(self) -> BinaryIO:
        """The segment appends go to, rotating by size; a new process always starts a new one."""
        if self._active is not None and self._active_index is not None:
            if self._sizes[self._active_index] < self.segment_bytes:
                return self._active
            self._active.close()
            self._active = None
        # Never the cursor's own segment once it is gone: the cursor's offset would point into
        # the middle of (or past) the new file's frames and hide them from replay.
        index = max(self._sizes, default=self._cursor[0]) + 1
        path = self._path(index)
        # Unbuffered: a failed write must not leave bytes in a user-space buffer to be flushed
        # later after the truncate that undoes it.
        self._active = open(path, "ab", buffering=0)  # noqa: SIM115 - closed on rotation/close
        self._active_index = index
        self._sizes[index] = self._active.tell()
        if not any(seg < index for seg in self._sizes) and self._cursor[0] < index:
            self._cursor = (index, 0)
        return self._active

    def _path(self, index: int) -> Path:
        return self.directory / f"{index:012d}{SEGMENT_SUFFIX}"

    # ------------------------------------------------------------------ replay

    def peek(self, max_records: int, max_bytes: int) -> SpillBatch:
        """Read up to `max_records` / about `max_bytes` from the head without consuming them.

        A frame that fails its length or CRC check ends its segment: the rest of that segment is
        reported (ERROR log) and skipped, because after a torn write nothing in it can be framed.
        """
        batch = SpillBatch()
        with self._lock:
            index, offset = self._cursor
            size_read = 0
            for seg in sorted(s for s in self._sizes if s >= index):
                start = offset if seg == index else 0
                size = self._sizes[seg]
                if start >= size:
                    continue
                try:
                    fh = open(self._path(seg), "rb")  # noqa: SIM115 - closed below
                except OSError as exc:
                    log.error("spill: cannot read segment %s (%s); skipping its %d bytes",
                              self._path(seg).name, exc, size - start)
                    batch.ends.append((seg, size))
                    batch.records.append(SpillRecord("", "", b""))  # placeholder
                    continue
                with fh:
                    fh.seek(start)
                    pos = start
                    while pos < size:
                        if len(batch) >= max_records or (batch.records and size_read >= max_bytes):
                            return batch
                        header = fh.read(_HEADER.size)
                        body = b""
                        ok = len(header) == _HEADER.size
                        if ok:
                            length, crc = _HEADER.unpack(header)
                            ok = length <= _MAX_BODY and pos + _HEADER.size + length <= size
                            if ok:
                                body = fh.read(length)
                                ok = len(body) == length and zlib.crc32(body) == crc
                        if not ok:
                            log.error("spill: segment %s has a damaged frame at byte %d; "
                                      "skipping its remaining %d bytes (torn write?)",
                                      self._path(seg).name, pos, size - pos)
                            pos = size
                            batch.ends.append((seg, size))
                            batch.records.append(SpillRecord("", "", b""))  # placeholder
                            break
                        pos += _HEADER.size + len(body)
                        size_read += len(body)
                        batch.records.append(_decode(body))
                        batch.ends.append((seg, pos))
        return batch

    def commit(self, batch: SpillBatch, count: int | None = None) -> None:
        """Mark the first `count` records of `batch` (default: all) as delivered.

        Fully consumed segments are deleted at once: that is what frees the budget.
        """
        count = len(batch) if count is None else count
        if count <= 0:
            return
        with self._lock:
            self._cursor = max(self._cursor, batch.ends[count - 1])
            self._drop_consumed()
            self._save_cursor()
            if self._full and sum(self._sizes.values()) < self.budget_bytes:
                log.warning("spill buffer has room again (%d of %d bytes used)",
                            sum(self._sizes.values()), self.budget_bytes)
                self._full = False
            self._publish()

    def _drop_consumed(self) -> None:
        index, offset = self._cursor
        for seg in sorted(self._sizes):
            consumed = seg < index or (seg == index and offset >= self._sizes[seg])
            if not consumed:
                break
            if seg == self._active_index and self._active is not None:
                self._active.close()
                self._active = None
                self._active_index = None
            with contextlib.suppress(FileNotFoundError):
                self._path(seg).unlink()
            del self._sizes[seg]
        if self._sizes:
            first = min(self._sizes)
            if first > self._cursor[0]:
                self._cursor = (first, 0)

    def _load_cursor(self) -> tuple[int, int]:
        first = min(self._sizes, default=0)
        try:
            seg_text, off_text = (self.directory / "cursor").read_text().split()
            seg, off = int(seg_text), int(off_text)
        except (OSError, ValueError):
            return (first, 0)
        if seg not in self._sizes:
            return (max(first, seg), 0) if seg >= first else (first, 0)
        return (seg, min(off, self._sizes[seg]))

    def _save_cursor(self) -> None:
        tmp = self.directory / "cursor.tmp"
        tmp.write_text(f"{self._cursor[0]} {self._cursor[1]}\n")
        os.replace(tmp, self.directory / "cursor")


def _write_all(fh: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = fh.write(view)
        if not written:
            raise OSError("short write to spill segment")
        view = view[written:]


def is_placeholder(record: SpillRecord) -> bool:
    """A damaged frame's stand-in in a SpillBatch: commit it, never deliver it."""
    return not record.stream
