"""The landing zone's files: atomic Parquet writes, listing, compaction and retention.

A file becomes visible only when complete (layout.py): locally it is written under a hidden
temporary name, fsynced, renamed, and its directory fsynced, so after `write` returns the file
survives a crash and no reader ever sees half of it; on object storage (any other fsspec
filesystem) the upload of the final name is itself atomic. A writer killed mid-file leaves a
`.<name>.<writer>.tmp` that no reader looks at; `compact` removes such leftovers once they are
older than `stale_tmp_s`.

Compaction merges a partition's small files into one (`c-` prefix) — write the merged file,
then delete the inputs. A reader listing files in between sees some rows twice, which read
rule 1 (same source position = one record) already absorbs; it also drops replayed rows
physically. Retention deletes whole `date=` partitions older than a cutoff, in every table,
comparing dates: a directory whose name is not a partition date (layout.partition_date) is left
alone and reported, never taken for an old one.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from evaluator.lake import layout

log = logging.getLogger(__name__)


class LakeError(Exception):
    """A landing zone that cannot be used as configured; the message says why."""


@dataclass(frozen=True)
class MaintenanceResult:
    """What one `compact` / `expire` pass did (for the command's output and tests)."""

    partitions: int = 0
    files_in: int = 0
    files_out: int = 0
    rows_dropped: int = 0  # replayed rows compaction removed
    tmp_removed: int = 0
    skipped: tuple[str, ...] = ()  # expire: partitions (relative to the root) with no date


class Lake:
    """A landing zone root: a local directory or any fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not url:
            raise LakeError("lake.path is empty: set it to a directory or fsspec URL")
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, path: str) -> str:
        """A path as a URL another engine can open (DuckDB, Spark)."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path(layout.MARKER)))

    def ensure(self) -> None:
        """Create the root and its format marker, or check an existing marker's format."""
        marker = self.path(layout.MARKER)
        if self.fs.exists(marker):
            with self.fs.open(marker, "rb") as fh:
                found = json.loads(fh.read()).get("format")
            if found != layout.LAKE_FORMAT:
                raise LakeError(f"{self.url}: lake format {found}, this evaluator writes "
                                f"{layout.LAKE_FORMAT}; use a new lake.path")
            return
        self.fs.makedirs(self.root, exist_ok=True)
        self.put_bytes(marker, json.dumps({"format": layout.LAKE_FORMAT}).encode() + b"\n")

    # -- writing ----------------------------------------------------------------------------

    def write(self, rel_dir: str, table: pa.Table, member: str, prefix: str = "") -> str:
        """Write one Parquet file into a partition directory, atomically; returns its path."""
        directory = self.path(rel_dir)
        final = posixpath.join(directory, layout.file_name(member, prefix))

        def body(fh: Any) -> None:
            pq.write_table(table, fh, compression=layout.COMPRESSION,
                           row_group_size=layout.ROW_GROUP_ROWS)

        self._atomic(final, body)
        return final

    def put_bytes(self, path: str, data: bytes) -> None:
        """A small file (marker, offsets), replaced atomically."""
        self._atomic(path, lambda fh: fh.write(data))

    def _atomic(self, final: str, body: Any) -> None:
        directory, name = posixpath.split(final)
        if not self.local:
            self.fs.makedirs(directory, exist_ok=True)
            with self.fs.open(final, "wb") as fh:  # an object store's PUT is all-or-nothing
                body(fh)
            return
        created = _makedirs(directory)
        # A name of its own per writer: members starting together all create the marker, and
        # a shared temporary name let one member's rename pull the file from under another's.
        tmp = posixpath.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as fh:
            body(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        for d in [directory, *created]:
            _fsync_dir(d)

    def read_bytes(self, path: str) -> bytes | None:
        try:
            with self.fs.open(path, "rb") as fh:
                return bytes(fh.read())
        except FileNotFoundError:
            return None

    # -- listing ----------------------------------------------------------------------------

    def files(self, table: str, route: str | None = None) -> list[str]:
        """Every data file of a table (one route's, for inferences with `route`)."""
        base = self.path(table)
        if route is not None:
            base = posixpath.join(base, f"{layout.ROUTE_KEY}={layout.encode_route(route)}")
        if not self.fs.exists(base):
            return []
        return sorted(p for p in self.fs.find(base) if layout.is_data_file(posixpath.basename(p)))

    def partitions(self, table: str) -> list[str]:
        """Every leaf (`date=`) partition directory of a table."""
        base = self.path(table)
        if not self.fs.exists(base):
            return []
        depth = 2 if table == layout.INFERENCES else 1
        dirs = [base]
        for _ in range(depth):
            dirs = [d for parent in dirs for d in self.fs.ls(parent, detail=False)
                    if self.fs.isdir(d) and "=" in posixpath.basename(d)]
        return sorted(dirs)

    def routes(self) -> list[str]:
        base = self.path(layout.INFERENCES)
        if not self.fs.exists(base):
            return []
        prefix = f"{layout.ROUTE_KEY}="
        return sorted(layout.decode_route(posixpath.basename(d)[len(prefix):])
                      for d in self.fs.ls(base, detail=False)
                      if posixpath.basename(d).startswith(prefix))

    # -- maintenance ------------------------------------------------------------------------

    def compact(self, *, min_files: int = 2, small_bytes: int = 64 << 20, member: str = "compact",
                stale_tmp_s: float = 3600.0) -> MaintenanceResult:
        """Merge each partition's small files (< `small_bytes`) when it has `min_files`+."""
        parts = files_in = files_out = dropped = tmp_removed = 0
        for table in layout.TABLES:
            for part in self.partitions(table):
                entries = self.fs.ls(part, detail=True)
                tmp_removed += self._remove_stale_tmp(entries, stale_tmp_s)
                small = sorted(e["name"] for e in entries
                               if layout.is_data_file(posixpath.basename(e["name"]))
                               and e.get("size", 0) < small_bytes)
                if len(small) < max(min_files, 1):
                    continue
                merged = _drop_replays(pa.concat_tables(
                    [self._read_table(p, layout.SCHEMAS[table]) for p in small]), table)
                rel = posixpath.relpath(part, self.root)
                self.write(rel, merged.table, member, prefix="c-")
                self.fs.rm(small)
                parts, files_in, files_out = parts + 1, files_in + len(small), files_out + 1
                dropped += merged.dropped
        return MaintenanceResult(parts, files_in, files_out, dropped, tmp_removed)

    def expire(self, before_date: str) -> MaintenanceResult:
        """Delete every `date=` partition (all tables) dated before `before_date` (YYYY-MM-DD).

        A leaf directory whose name is no date (`date=NaT`, a five-digit year, written before
        record times were checked) is kept and listed in `skipped`: retention cannot tell
        how old its rows are, and removing data it cannot date would lose it silently.
        """
        cutoff = layout.partition_date(f"{layout.DATE_KEY}={before_date}")
        if cutoff is None:
            raise LakeError(f"expire: {before_date!r} is not a date (YYYY-MM-DD)")
        gone = files = 0
        skipped: list[str] = []
        for table in layout.TABLES:
            for part in self.partitions(table):
                date = layout.partition_date(posixpath.basename(part))
                if date is None:
                    skipped.append(posixpath.relpath(part, self.root))
                elif date < cutoff:
                    files += len(self.fs.ls(part, detail=False))
                    self.fs.rm(part, recursive=True)
                    gone += 1
        if skipped:
            log.warning("lake expire: kept %d partition(s) whose name is not a date, for an "
                        "operator to inspect: %s", len(skipped), ", ".join(skipped))
        return MaintenanceResult(partitions=gone, files_in=files, skipped=tuple(skipped))

    def _read_table(self, path: str, schema: pa.Schema) -> pa.Table:
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh, schema=schema)

    def _remove_stale_tmp(self, entries: Iterable[dict[str, Any]], stale_tmp_s: float) -> int:
        removed = 0
        now = time.time()
        for e in entries:
            name = posixpath.basename(e["name"])
            if name.startswith(".") and name.endswith(".tmp"):
                mtime = e.get("mtime") or e.get("created") or now
                if now - float(mtime) >= stale_tmp_s:
                    self.fs.rm(e["name"])
                    removed += 1
        return removed


@dataclass(frozen=True)
class _Deduped:
    table: pa.Table
    dropped: int


def _drop_replays(table: pa.Table, name: str) -> _Deduped:
    """Read rule 1 applied physically: one row per source position (and row, for inferences)."""
    keys = ["src", "pos", "row_ix"] if name == layout.INFERENCES else ["src", "pos"]
    first = table.append_column("_i", pa.array(range(table.num_rows), pa.int64())) \
        .group_by(keys, use_threads=False).aggregate([("_i", "min")])
    keep = pc.sort_indices(first.column("_i_min"))
    out = table.take(pc.take(first.column("_i_min"), keep))
    return _Deduped(out, table.num_rows - out.num_rows)


def _makedirs(directory: str) -> list[str]:
    """mkdir -p; the parents of every directory it created (their entries need an fsync)."""
    created: list[str] = []
    d = directory
    while not os.path.isdir(d):
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(directory, exist_ok=True)
    return [os.path.dirname(c) for c in created]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
