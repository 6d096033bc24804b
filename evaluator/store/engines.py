"""The few operations that differ between SQLite and DuckDB, behind one small interface.

Both engines run the same schema and SQL (`evaluator.store.schema`), and
`loadtests/bench_store.py` loads 1M synthetic joined requests with two challengers into each
(docs/BENCHMARKS.md, "Evaluator store"). On the 2-core dev VM (shared and busy: load average
~10, so CPU seconds are the steadier figure), wall (CPU):

    1M requests, 2 challengers   ingest (store only)   load_dataset    feature_columns   on disk
    DuckDB 2.0.1                 109 s (28 s)          5.5 s (2.0 s)   4.0 s             231 MB
    SQLite 3.40.1                177 s (45 s)          53 s (20 s)     19 s              474 MB

`load_dataset` sits on the path of every report (budget: 1M requests -> full report in 20 s);
SQLite must turn ~5M result rows into Python tuples before numpy sees them, DuckDB hands back
numpy columns: 10x less CPU. Ingest and disk also favour DuckDB. Its price is a single-process
file lock: the ingest loop lets go of the file whenever it is caught up and at least every
`store.release_interval_s` while busy, and a reader (`report`, `promote`) waits up to
`store.lock_timeout_s` for it. SQLite (WAL: readers never wait) stays selectable.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from evaluator.dataset import F64, I64, Array, Obj
from evaluator.store.errors import StoreError, StoreLockedError

Columns = Mapping[str, Array]


class Engine(Protocol):
    kind: str
    id_type: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def columns(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Array]: ...
    def stage(self, name: str, cols: Columns) -> None: ...
    def insert(self, table: str, cols: Columns) -> None: ...
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


def open_engine(kind: str, path: str, read_only: bool, lock_timeout_s: float) -> Engine:
    """A connection to `path` with the named engine ("duckdb" or "sqlite")."""
    cls = DuckEngine if kind == "duckdb" else SqliteEngine
    engine: Engine = cls(path, read_only, lock_timeout_s)
    return engine


def _native(col: Array) -> list[Any]:
    """numpy -> Python scalars for sqlite3, which does not take numpy integers."""
    values: list[Any] = col.tolist()
    return values


def _nan_filled(col: Any) -> Array:
    """DuckDB's NULLs arrive masked; a float column reads them as NaN, like SQLite's."""
    if isinstance(col, np.ma.MaskedArray) and col.dtype.kind == "f":
        filled: Array = np.ma.filled(col, np.nan)  # type: ignore[no-untyped-call]  # np.ma: no hints
        return filled
    return np.asarray(col)


class SqliteEngine:
    kind = "sqlite"
    id_type = "INTEGER"  # INTEGER PRIMARY KEY is SQLite's rowid: the fastest key it has

    def __init__(self, path: str, read_only: bool, lock_timeout_s: float) -> None:
        import sqlite3

        self._sqlite3 = sqlite3
        if read_only:
            uri = f"file:{path}?mode=ro" if path != ":memory:" else path
            self.con = sqlite3.connect(uri, uri=path != ":memory:", isolation_level=None,
                                       check_same_thread=False, timeout=lock_timeout_s)
        else:
            self.con = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=lock_timeout_s)
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("PRAGMA temp_store=MEMORY")
        self.con.execute("PRAGMA cache_size=-262144")
        self.con.execute("PRAGMA mmap_size=1073741824")
        self._staged: set[str] = set()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.con.execute(sql, tuple(params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, tuple(params)).fetchall()

    def columns(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Array]:
        cur = self.con.execute(sql, tuple(params))
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        if not rows:
            return {n: np.empty(0, dtype=object) for n in names}
        return {n: np.array(col, dtype=object) for n, col in
                zip(names, zip(*rows, strict=True), strict=True)}

    def stage(self, name: str, cols: Columns) -> None:
        names = list(cols)
        self.con.execute(f"DROP TABLE IF EXISTS temp.{name}")
        self.con.execute(f"CREATE TEMP TABLE {name} ({', '.join(names)})")
        self._insert(f"temp.{name}", cols)

    def insert(self, table: str, cols: Columns) -> None:
        self._insert(table, cols)

    def _insert(self, table: str, cols: Columns) -> None:
        names = list(cols)
        marks = ", ".join("?" * len(names))
        rows = zip(*(_native(np.asarray(c)) for c in cols.values()), strict=True)
        self.con.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})", rows)  # noqa: S608

    def begin(self) -> None:
        self.con.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.con.execute("COMMIT")

    def rollback(self) -> None:
        if self.con.in_transaction:
            self.con.execute("ROLLBACK")

    def close(self) -> None:
        self.con.close()


class DuckEngine:
    kind = "duckdb"
    id_type = "BIGINT"

    def __init__(self, path: str, read_only: bool, lock_timeout_s: float) -> None:
        import duckdb

        deadline = time.monotonic() + lock_timeout_s
        delay = 0.02
        while True:
            try:
                self.con = duckdb.connect(path, read_only=read_only)
                break
            except duckdb.IOException as exc:
                # Another process (the ingest loop) holds the file lock; it lets go when idle.
                if "lock" not in str(exc).lower():
                    raise StoreError(f"cannot open DuckDB store {path}: {exc}") from None
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"DuckDB store {path} is locked by another process (the ingest loop?) "
                        f"for more than {lock_timeout_s:g}s; retry, or raise "
                        f"store.lock_timeout_s") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        if not read_only:
            # Checkpoints (WAL -> file) dominated commit time at the default 16MB; close and
            # release() checkpoint anyway, so a bigger WAL only costs replay after a crash.
            self.con.execute("SET checkpoint_threshold = '256MB'")
        self._n = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.con.execute(sql, list(params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, list(params)).fetchall()

    def columns(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Array]:
        out = self.con.execute(sql, list(params)).fetchnumpy()
        return {k: _nan_filled(v) for k, v in out.items()}

    def stage(self, name: str, cols: Columns) -> None:
        with contextlib.suppress(Exception):
            self.con.unregister(name)
        self.con.register(name, {k: np.asarray(v) for k, v in cols.items()})

    def insert(self, table: str, cols: Columns) -> None:
        self._n += 1
        view = f"_ins_{self._n}"
        self.con.register(view, {k: np.asarray(v) for k, v in cols.items()})
        try:
            names = ", ".join(cols)
            self.con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {view}")  # noqa: S608
        finally:
            self.con.unregister(view)

    def begin(self) -> None:
        self.con.begin()

    def commit(self) -> None:
        self.con.commit()

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.con.rollback()

    def close(self) -> None:
        self.con.close()


def as_f64(values: Sequence[Any]) -> F64:
    return np.asarray(values, dtype=np.float64)


def as_i64(values: Sequence[Any]) -> I64:
    return np.asarray(values, dtype=np.int64)


def as_obj(values: Sequence[Any]) -> Obj:
    """An object column (str, bytes or None per row) without numpy guessing a dtype."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def as_numbers(col: Array, dtype: Any = np.float64) -> Array:
    """A fetched column as numbers (SQLite hands back objects; its NULL becomes NaN)."""
    if col.dtype == object:
        return np.asarray(col.tolist(), dtype=dtype)  # numpy maps None to NaN for floats
    if col.dtype.kind in "iu" and np.dtype(dtype).kind == "i":
        return col  # any integer width indexes and compares alike: skip the copy
    return col.astype(dtype, copy=False)
