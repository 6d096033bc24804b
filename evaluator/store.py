"""The evaluator's embedded store: deduplicated inference log, per-model outcomes and labels.

Engine: DuckDB by default, SQLite selectable (`store.engine`). Both run this same schema and
SQL through a thin engine layer, and `loadtests/bench_store.py` loads 1M synthetic joined
requests with two challengers into each (docs/BENCHMARKS.md, "Evaluator store"). On the 2-core
dev VM (shared and busy: load average ~10, so CPU seconds are the steadier figure), wall (CPU):

    1M requests, 2 challengers   ingest (store only)   load_dataset    feature_columns   on disk
    DuckDB 2.0.1                 109 s (28 s)          5.5 s (2.0 s)   4.0 s             231 MB
    SQLite 3.40.1                177 s (45 s)          53 s (20 s)     19 s              474 MB

`load_dataset` sits on the path of every report (budget: 1M requests -> full report in 20 s);
SQLite must turn ~5M result rows into Python tuples before numpy sees them, DuckDB hands back
numpy columns: 10x less CPU. Ingest and disk also favour DuckDB. Its price is a single-process
file lock: the ingest loop lets go of the file whenever it is caught up and at least every
`store.release_interval_s` while busy, and a reader (`report`, `promote`) waits up to
`store.lock_timeout_s` for it. SQLite (WAL: readers never wait) stays selectable.

Schema (one row per *prediction*: an unbatched request is one row, row 0; a batched request of
n rows gives rows 0..n-1, and a label's `index` names the row):

    inferences  id, request_id, row_ix, route, ts, policy, served, propensity, sticky_key,
                status, gateway_latency_ms, dups, registry_version   unique (request_id, row_ix)
    outcomes    inf_id, model, role, mode, version, status, score, latency_ms, experiment,
                sample_rate                            (experiment: an interned id, NULL unknown)
    arms        inf_id, model, prob                        the policy's probability per arm
    inputs      inf_id, name, datatype, width, num, cat    the row's input tensors (drift)
    labels      request_id, row_ix, inf_id, label, reward, has_label, event_time, received_ts, n
    names       id, name        model / policy / tensor names interned to small integers
    offsets     source, pos     ingest position per source, committed with the data
    counters    name, amount    bad records, expired orphans, ...
    meta        key, val        schema version, watermark

Join semantics:
- Inference records are delivered at least once: a record whose request id is already stored is
  dropped and counted (`dups` on its row 0).
- Labels are joined eagerly in both directions: a label for a stored prediction gets its
  `inf_id` at once; a label that arrives first waits as an orphan (`inf_id` NULL) and is linked
  when its inference arrives. A late label is joined however late it is, as long as its
  inference is stored.
- Duplicate labels: last wins (latest `received_ts`, ties to the one read last); `n` counts every
  label record, so `n - 1` are duplicates.
- Orphans older than the join window are deleted by `expire_orphans` and counted. "Now" is the
  store's watermark — the newest inference `ts` / label `received_ts` ingested — not the wall
  clock, so replaying an old log behaves exactly like the live run did.
- Scores: the first element (of the prediction's row) of the first output tensor, or of the
  configured output; NaN when the model failed, emitted NaN/inf, or gave no such output.

Schema versions: 1 had no experiment columns; 2 adds `inferences.registry_version` (-1
unknown) and `outcomes.experiment` / `outcomes.sample_rate` (record schema v1 additions). A
writable open migrates a version-1 store in place (three `ALTER TABLE ... ADD COLUMN`, old rows
read as unknown); a read-only open of a version-1 store asks for one `run` to migrate it.

Experiments: `current_experiments(route)` is each challenger's most recently started experiment
with the route's current champion (the champion on its newest row): started = its first record's
ts, data_end = its last, registry_version = the highest seen in its rows. `load_experiments`
loads every row since the earliest of them, so the verdict's data never depends on a window.

Store-wide, not per route: orphan and expired label counts (a label carries no route).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from evaluator.config import StoreConfig
from evaluator.dataset import (
    STATUS_CODES,
    EvalDataset,
    ExperimentInfo,
    JoinStats,
    ModelColumn,
    Task,
)

log = logging.getLogger(__name__)

STORE_SCHEMA_VERSION = 2
DAY = 86400.0
ROLE_CODES: dict[str, int] = {"champion": 0, "challenger": 1}
MODE_CODES: dict[str, int] = {"served": 0, "shadow": 1, "explore": 2}
ROLE_NAMES = {v: k for k, v in ROLE_CODES.items()}
MODE_NAMES = {v: k for k, v in MODE_CODES.items()}
SKIPPED = STATUS_CODES["skipped"]


class StoreError(Exception):
    """A store that cannot be opened or queried as asked; the message says what to do."""


class StoreLockedError(StoreError):
    """Another process holds the DuckDB file (the ingest loop, mid-batch) past the timeout."""


class EmptyDatasetError(StoreError):
    """No labelled requests for the route and window; carries the join stats explaining why."""

    def __init__(self, message: str, stats: JoinStats) -> None:
        super().__init__(message)
        self.stats = stats


# --------------------------------------------------------------------------------------------
# Batch: the columnar buffer a parser fills and `Store.ingest` writes in one transaction.
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Parsed records, columnar. Deduplicates inference records and labels within itself."""

    # one entry per inference record (request)
    rec_index: dict[str, int] = field(default_factory=dict)  # request_id -> first row position
    rec_dups: Counter[str] = field(default_factory=Counter)  # repeats within this batch
    # one entry per prediction row
    request_id: list[str] = field(default_factory=list)
    row_ix: list[int] = field(default_factory=list)
    route: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    policy: list[str] = field(default_factory=list)
    served: list[str] = field(default_factory=list)
    propensity: list[float] = field(default_factory=list)
    sticky_key: list[str | None] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    gateway_latency_ms: list[float] = field(default_factory=list)
    registry_version: list[int] = field(default_factory=list)  # -1 unknown
    # outcomes: position of the prediction row, model, codes, score, latency
    o_pos: list[int] = field(default_factory=list)
    o_model: list[str] = field(default_factory=list)
    o_role: list[int] = field(default_factory=list)
    o_mode: list[int] = field(default_factory=list)
    o_version: list[str] = field(default_factory=list)
    o_status: list[int] = field(default_factory=list)
    o_score: list[float] = field(default_factory=list)
    o_latency: list[float] = field(default_factory=list)
    o_experiment: list[str | None] = field(default_factory=list)
    o_sample_rate: list[float] = field(default_factory=list)
    # arms: the policy's probability for each arm
    a_pos: list[int] = field(default_factory=list)
    a_model: list[str] = field(default_factory=list)
    a_prob: list[float] = field(default_factory=list)
    # input tensors of each row: float64 little-endian bytes (numeric) or a JSON list (BYTES)
    x_pos: list[int] = field(default_factory=list)
    x_name: list[str] = field(default_factory=list)
    x_dtype: list[str] = field(default_factory=list)
    x_width: list[int] = field(default_factory=list)
    x_num: list[bytes | None] = field(default_factory=list)
    x_cat: list[str | None] = field(default_factory=list)
    # labels by (request_id, row): [label, reward, has_label, event_time, received_ts, n]
    labels: dict[tuple[str, int], list[Any]] = field(default_factory=dict)
    bad: Counter[str] = field(default_factory=Counter)
    ignored: int = 0  # well-formed records the evaluator does not need (audit)
    watermark: float = -math.inf

    def reject(self, reason: str) -> None:
        """Count one record the evaluator cannot use (committed with the batch)."""
        self.bad[reason] += 1

    def ignore(self) -> None:
        """Count one well-formed record the evaluator does not need (audit)."""
        self.ignored += 1

    @property
    def label_records(self) -> int:
        return sum(v[5] for v in self.labels.values())

    def seen(self, request_id: str) -> bool:
        """True (and counted as a duplicate) when this batch already holds the record."""
        if request_id in self.rec_index:
            self.rec_dups[request_id] += 1
            return True
        return False

    def start_record(self, request_id: str) -> None:
        self.rec_index[request_id] = len(self.request_id)

    def add_row(self, request_id: str, row: int, route: str, ts: float, policy: str,
                served: str, propensity: float, sticky_key: str | None, status: int,
                gateway_latency_ms: float, registry_version: int = -1) -> int:
        self.request_id.append(request_id)
        self.row_ix.append(row)
        self.route.append(route)
        self.ts.append(ts)
        self.policy.append(policy)
        self.served.append(served)
        self.propensity.append(propensity)
        self.sticky_key.append(sticky_key)
        self.status.append(status)
        self.gateway_latency_ms.append(gateway_latency_ms)
        self.registry_version.append(registry_version)
        if ts > self.watermark:
            self.watermark = ts
        return len(self.request_id) - 1

    def add_outcome(self, pos: int, model: str, role: int, mode: int, version: str, status: int,
                    score: float, latency_ms: float, experiment: str | None = None,
                    sample_rate: float = math.nan) -> None:
        self.o_pos.append(pos)
        self.o_model.append(model)
        self.o_role.append(role)
        self.o_mode.append(mode)
        self.o_version.append(version)
        self.o_status.append(status)
        self.o_score.append(score)
        self.o_latency.append(latency_ms)
        self.o_experiment.append(experiment)
        self.o_sample_rate.append(sample_rate)

    def add_arm(self, pos: int, model: str, prob: float) -> None:
        self.a_pos.append(pos)
        self.a_model.append(model)
        self.a_prob.append(prob)

    def add_input(self, pos: int, name: str, datatype: str, width: int, num: bytes | None,
                  cat: str | None) -> None:
        self.x_pos.append(pos)
        self.x_name.append(name)
        self.x_dtype.append(datatype)
        self.x_width.append(width)
        self.x_num.append(num)
        self.x_cat.append(cat)

    def add_label(self, request_id: str, row: int, label: float | None, reward: float | None,
                  event_time: float, received_ts: float) -> None:
        """Last wins within the batch too: later received_ts, ties to the later record."""
        key = (request_id, row)
        entry = self.labels.get(key)
        value = [math.nan if label is None else label, math.nan if reward is None else reward,
                 label is not None, event_time, received_ts, 1]
        if entry is None:
            self.labels[key] = value
        else:
            value[5] = entry[5] + 1
            if received_ts >= entry[4]:
                self.labels[key] = value
            else:
                entry[5] = value[5]
        if received_ts > self.watermark:
            self.watermark = received_ts


@dataclass(frozen=True)
class IngestResult:
    """What one `Store.ingest` call changed (for progress lines and tests)."""

    records: int = 0  # new inference records
    rows: int = 0  # new prediction rows (records x batch rows)
    duplicates: int = 0  # inference records dropped as re-deliveries
    labels: int = 0  # label records applied
    bad: int = 0
    ignored: int = 0


@dataclass
class FeatureFrame:
    """Input features of a route's predictions in a window, one numpy column per feature.

    Numeric tensors give float64 columns (NaN where a row lacks the tensor); BYTES tensors give
    object columns of str (None where missing). A tensor of width 1 is one column named after
    the tensor; wider tensors give `tensor[j]` columns unless `features.names` names them.
    """

    route: str
    since: float | None
    until: float | None
    ts: np.ndarray
    request_ids: np.ndarray
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass
class ScoreSeries:
    """One model's scores over a window, in time order (for prediction drift)."""

    model: str
    role: str  # its role on its newest row in the window (a promotion mid-window shows)
    scores: np.ndarray  # float64; NaN where the model emitted NaN/inf
    ts: np.ndarray  # float64 unix seconds of each prediction


# --------------------------------------------------------------------------------------------
# Engines: the few operations that differ between SQLite and DuckDB.
# --------------------------------------------------------------------------------------------

Columns = Mapping[str, np.ndarray]


class _Engine(Protocol):
    kind: str
    id_type: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def columns(self, sql: str, params: Sequence[Any] = ()) -> dict[str, np.ndarray]: ...
    def stage(self, name: str, cols: Columns) -> None: ...
    def insert(self, table: str, cols: Columns) -> None: ...
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


def _native(col: np.ndarray) -> list[Any]:
    """numpy -> Python scalars for sqlite3, which does not take numpy integers."""
    return col.tolist()


class _SqliteEngine:
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

    def columns(self, sql: str, params: Sequence[Any] = ()) -> dict[str, np.ndarray]:
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


class _DuckEngine:
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

    def columns(self, sql: str, params: Sequence[Any] = ()) -> dict[str, np.ndarray]:
        out = self.con.execute(sql, list(params)).fetchnumpy()
        return {k: (np.ma.filled(v, np.nan) if isinstance(v, np.ma.MaskedArray)
                    and v.dtype.kind == "f" else np.asarray(v)) for k, v in out.items()}

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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, val VARCHAR);
CREATE TABLE IF NOT EXISTS names (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS inferences (
    id {ID} PRIMARY KEY, request_id VARCHAR NOT NULL, row_ix INTEGER NOT NULL,
    route VARCHAR NOT NULL, ts DOUBLE NOT NULL, policy INTEGER, served INTEGER,
    propensity DOUBLE, sticky_key VARCHAR, status INTEGER, gateway_latency_ms DOUBLE,
    dups INTEGER NOT NULL, registry_version BIGINT, UNIQUE (request_id, row_ix));
CREATE TABLE IF NOT EXISTS outcomes (
    inf_id BIGINT NOT NULL, model INTEGER NOT NULL, role INTEGER, mode INTEGER,
    version INTEGER, status INTEGER NOT NULL, score DOUBLE, latency_ms DOUBLE,
    experiment INTEGER, sample_rate DOUBLE);
CREATE TABLE IF NOT EXISTS arms (inf_id BIGINT NOT NULL, model INTEGER NOT NULL, prob DOUBLE);
CREATE TABLE IF NOT EXISTS inputs (
    inf_id BIGINT NOT NULL, name INTEGER NOT NULL, datatype INTEGER, width INTEGER,
    num BLOB, cat VARCHAR);
CREATE TABLE IF NOT EXISTS labels (
    request_id VARCHAR NOT NULL, row_ix INTEGER NOT NULL, inf_id BIGINT, label DOUBLE,
    reward DOUBLE, has_label BOOLEAN NOT NULL, event_time DOUBLE, received_ts DOUBLE NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (request_id, row_ix));
CREATE TABLE IF NOT EXISTS offsets (source VARCHAR PRIMARY KEY, pos VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name VARCHAR PRIMARY KEY, amount BIGINT NOT NULL);
"""

# A row store needs these to avoid scanning; DuckDB scans columns faster than it maintains them.
_SQLITE_INDEXES = """
CREATE INDEX IF NOT EXISTS inferences_route_ts ON inferences (route, ts);
CREATE INDEX IF NOT EXISTS outcomes_inf ON outcomes (inf_id);
CREATE INDEX IF NOT EXISTS arms_inf ON arms (inf_id);
CREATE INDEX IF NOT EXISTS inputs_inf ON inputs (inf_id);
CREATE INDEX IF NOT EXISTS labels_inf ON labels (inf_id);
"""

# Version 1 -> 2: the record schema's experiment additions; old rows read as unknown.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE inferences ADD COLUMN registry_version BIGINT",
    "ALTER TABLE outcomes ADD COLUMN experiment INTEGER",
    "ALTER TABLE outcomes ADD COLUMN sample_rate DOUBLE",
)

_LABEL_UPSERT = """
INSERT INTO labels (request_id, row_ix, inf_id, label, reward, has_label, event_time,
                    received_ts, n)
SELECT s.request_id, s.row_ix, i.id, s.label, s.reward, s.has_label, s.event_time,
       s.received_ts, s.n
FROM s_labels s LEFT JOIN inferences i ON i.request_id = s.request_id AND i.row_ix = s.row_ix
WHERE true
ON CONFLICT (request_id, row_ix) DO UPDATE SET
    inf_id = COALESCE(labels.inf_id, excluded.inf_id),
    label = CASE WHEN excluded.received_ts >= labels.received_ts
                 THEN excluded.label ELSE labels.label END,
    reward = CASE WHEN excluded.received_ts >= labels.received_ts
                  THEN excluded.reward ELSE labels.reward END,
    has_label = CASE WHEN excluded.received_ts >= labels.received_ts
                     THEN excluded.has_label ELSE labels.has_label END,
    event_time = CASE WHEN excluded.received_ts >= labels.received_ts
                      THEN excluded.event_time ELSE labels.event_time END,
    received_ts = CASE WHEN excluded.received_ts >= labels.received_ts
                       THEN excluded.received_ts ELSE labels.received_ts END,
    n = labels.n + excluded.n
"""


def _f64(values: Sequence[Any]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _i64(values: Sequence[Any]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _obj(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _num(col: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """A fetched column as numbers (SQLite hands back objects; its NULL becomes NaN)."""
    if col.dtype == object:
        return np.asarray(col.tolist(), dtype=dtype)  # numpy maps None to NaN for floats
    if col.dtype.kind in "iu" and np.dtype(dtype).kind == "i":
        return col  # any integer width indexes and compares alike: skip the copy
    return col.astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


class DatasetReads(abc.ABC):
    """The reads built on `current_experiments`, `time_range` and `load_dataset`, shared by
    the store and the landing zone's reader (evaluator/lake/reader.py)."""

    @abc.abstractmethod
    def current_experiments(self, route: str) -> dict[str, ExperimentInfo]: ...

    @abc.abstractmethod
    def time_range(self, route: str) -> tuple[float, float] | None: ...

    @abc.abstractmethod
    def load_dataset(self, route: str, since: float | None = None, until: float | None = None,
                     *, task: str = "auto", threshold: float = 0.5,
                     require_label: bool = True) -> EvalDataset: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def experiment_span(self, route: str, window: float | None = None
                        ) -> tuple[dict[str, ExperimentInfo], float | None]:
        """(current experiments, the `since` that covers all of them).

        Without experiment ids (records from before experiments) `since` is the start of the
        `window` ending at the route's newest inference (None: everything), as it always was.
        """
        experiments = self.current_experiments(route)
        if experiments:
            return experiments, min(x.started for x in experiments.values())
        span = self.time_range(route) if window is not None else None
        return experiments, (None if span is None or window is None else span[1] - window)

    def load_experiments(self, route: str, window: float | None = None, *, task: str = "auto",
                         threshold: float = 0.5,
                         span: tuple[dict[str, ExperimentInfo], float | None] | None = None
                         ) -> EvalDataset:
        """Every labelled row since the earliest current experiment started, with
        `experiments` filled: the verdict's data, whatever a display window says.
        `span`: `experiment_span`'s answer when the caller already has it."""
        experiments, since = span if span is not None else self.experiment_span(route, window)
        dataset = self.load_dataset(route, since, None, task=task, threshold=threshold)
        dataset.experiments = experiments
        return dataset


class Store(DatasetReads):
    """The evaluator's store; see the module docstring for schema and join semantics.

    Thread-safe (one lock around the connection): the Kafka consumer's rebalance callback reads
    offsets while a worker thread may be writing a batch.
    """

    def __init__(self, path: str | Path, *, engine: str = "duckdb", join_window: float = 14 * DAY,
                 read_only: bool = False, lock_timeout_s: float = 60.0) -> None:
        if engine not in ("duckdb", "sqlite"):
            raise StoreError(f"unknown store engine {engine!r}: duckdb or sqlite")
        self.path = str(path)
        self.engine_name = engine
        self.join_window = float(join_window)
        self.read_only = read_only
        self.lock_timeout_s = lock_timeout_s
        self._lock = threading.RLock()
        self._engine: _Engine | None = None
        self._names: dict[str, int] = {}
        self._names_by_id: dict[int, str] = {}
        if self.path != ":memory:":
            if read_only and not Path(self.path).exists():
                raise StoreError(f"no evaluator store at {self.path}: run "
                                 f"`python -m evaluator run --config ...` first")
            if not read_only:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._connect()

    @classmethod
    def open(cls, config: StoreConfig, *, read_only: bool = False) -> Store:
        """From the `store:` section of the evaluator config."""
        return cls(config.path, engine=config.engine, join_window=config.join_window,
                   read_only=read_only, lock_timeout_s=config.lock_timeout_s)

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> _Engine:
        if self._engine is not None:
            return self._engine
        cls = _DuckEngine if self.engine_name == "duckdb" else _SqliteEngine
        engine: _Engine = cls(self.path, self.read_only, self.lock_timeout_s)
        self._engine = engine
        try:
            if not self.read_only:
                self._create_schema(engine)
            self._check_schema(engine)
        except Exception:
            self.release()
            raise
        return engine

    def _create_schema(self, e: _Engine) -> None:
        for stmt in _SCHEMA.format(ID=e.id_type).split(";"):
            if stmt.strip():
                e.execute(stmt)
        if e.kind == "sqlite":
            for stmt in _SQLITE_INDEXES.split(";"):
                if stmt.strip():
                    e.execute(stmt)
        row = e.query("SELECT val FROM meta WHERE key = 'schema_version'")
        if not row:
            e.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(STORE_SCHEMA_VERSION)])
        elif row[0][0] == "1":
            self._migrate_1_to_2(e)

    def _migrate_1_to_2(self, e: _Engine) -> None:
        """Add the experiment columns in one transaction (all or nothing on a crash)."""
        e.begin()
        try:
            for stmt in _MIGRATE_1_TO_2:
                e.execute(stmt)
            e.execute("UPDATE meta SET val = '2' WHERE key = 'schema_version'")
        except BaseException:
            e.rollback()
            raise
        e.commit()
        log.info("%s: store schema migrated from version 1 to 2 (experiment columns)", self.path)

    def _check_schema(self, e: _Engine) -> None:
        try:
            row = e.query("SELECT val FROM meta WHERE key = 'schema_version'")
        except Exception as exc:
            raise StoreError(f"{self.path} is not an evaluator store ({exc})") from None
        if not row or int(row[0][0]) != STORE_SCHEMA_VERSION:
            found = row[0][0] if row else "none"
            hint = ("run `python -m evaluator run --once` once to migrate it in place"
                    if found == "1" and self.read_only else "re-ingest into a new store path")
            raise StoreError(f"{self.path}: store schema {found}, this evaluator needs "
                             f"{STORE_SCHEMA_VERSION}; {hint}")

    @property
    def exclusive(self) -> bool:
        """True when an open connection locks other processes out (DuckDB)."""
        return self.engine_name == "duckdb" and self.path != ":memory:"

    def release(self) -> None:
        """Close the connection (lets other processes open a DuckDB file); reopens on next use."""
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def close(self) -> None:
        self.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Engine]:
        e = self._connect()
        e.begin()
        try:
            yield e
        except BaseException:
            e.rollback()
            self._names.clear()  # interned ids of a rolled-back batch are gone
            self._names_by_id.clear()
            raise
        e.commit()

    # -- names ------------------------------------------------------------------------------

    def _load_names(self, e: _Engine) -> None:
        self._names = {str(n): int(i) for i, n in e.query("SELECT id, name FROM names")}
        self._names_by_id = {i: n for n, i in self._names.items()}

    def _intern(self, e: _Engine, values: set[str]) -> None:
        missing = values - self._names.keys()
        if not missing:
            return
        self._load_names(e)
        missing = sorted(values - self._names.keys())
        if not missing:
            return
        start = max(self._names.values(), default=0) + 1
        ids = list(range(start, start + len(missing)))
        e.insert("names", {"id": _i64(ids), "name": _obj(missing)})
        for name, i in zip(missing, ids, strict=True):
            self._names[name] = i
            self._names_by_id[i] = name

    def _ids(self, values: Sequence[str]) -> np.ndarray:
        names = self._names
        return np.fromiter((names[v] for v in values), dtype=np.int64, count=len(values))

    def _optional_ids(self, values: Sequence[str | None]) -> np.ndarray:
        """Interned ids, with None kept as a missing value (an object column: NULL in SQL)."""
        names = self._names
        return _obj([None if v is None else names[v] for v in values])

    def _name_lookup(self, e: _Engine) -> np.ndarray:
        """id -> name as an object array, for vectorised decoding."""
        self._load_names(e)
        size = max(self._names_by_id, default=0) + 1
        table = np.full(size, "", dtype=object)
        for i, n in self._names_by_id.items():
            table[i] = n
        return table

    # -- ingest -----------------------------------------------------------------------------

    def ingest(self, batch: Batch, offsets: Mapping[str, str] | None = None) -> IngestResult:
        """Write one parsed batch and the source positions it ends at, atomically.

        Committing the positions with the data is what lets a restart resume exactly where the
        last committed batch ended, with nothing counted twice.
        """
        with self._lock, self._transaction() as e:
            return self._ingest(e, batch, offsets or {})

    def _ingest(self, e: _Engine, b: Batch, offsets: Mapping[str, str]) -> IngestResult:
        self._intern(e, {*b.o_model, *b.a_model, *b.served, *b.policy, *b.o_version,
                         *b.x_name, *b.x_dtype, *(x for x in b.o_experiment if x is not None)})
        rec_ids = list(b.rec_index)
        existing: set[str] = set()
        if rec_ids:
            e.stage("s_rids", {"request_id": _obj(rec_ids)})
            existing = {r for (r,) in e.query(
                "SELECT DISTINCT i.request_id FROM s_rids s "
                "JOIN inferences i ON i.request_id = s.request_id AND i.row_ix = 0")}
        dups: dict[str, int] = {rid: b.rec_dups.get(rid, 0) + 1 for rid in existing}
        for rid, k in b.rec_dups.items():
            dups.setdefault(rid, k)
        if existing:
            # Re-deliveries of stored records: count them on the stored row 0, store nothing.
            e.stage("s_dups", {"request_id": _obj(list(existing)),
                               "n": _i64([dups[r] for r in existing])})
            e.execute("UPDATE inferences SET dups = dups + s.n FROM s_dups s "
                      "WHERE inferences.request_id = s.request_id AND inferences.row_ix = 0")

        n_rows = len(b.request_id)
        pos_to_id = np.full(n_rows, -1, dtype=np.int64)
        new_rows = 0
        if n_rows:
            new_mask = np.fromiter((rid not in existing for rid in b.request_id), dtype=bool,
                                   count=n_rows)
            new_pos = np.flatnonzero(new_mask)
            new_rows = int(new_pos.size)
        if new_rows:
            base = int(e.query("SELECT COALESCE(MAX(id), 0) FROM inferences")[0][0]) + 1
            pos_to_id[new_pos] = np.arange(base, base + new_rows, dtype=np.int64)
            self._insert_rows(e, b, new_pos, pos_to_id, dups)

        if b.labels:
            keys = list(b.labels)
            vals = list(b.labels.values())
            e.stage("s_labels", {
                "request_id": _obj([k[0] for k in keys]),
                "row_ix": _i64([k[1] for k in keys]),
                "label": _f64([v[0] for v in vals]),
                "reward": _f64([v[1] for v in vals]),
                "has_label": np.asarray([v[2] for v in vals], dtype=bool),
                "event_time": _f64([v[3] for v in vals]),
                "received_ts": _f64([v[4] for v in vals]),
                "n": _i64([v[5] for v in vals]),
            })
            e.execute(_LABEL_UPSERT)

        bad = sum(b.bad.values())
        counts = {f"bad:{reason}": k for reason, k in b.bad.items()}
        counts.update({"bad_records": bad, "ignored_records": b.ignored})
        self._add_counters(e, {k: v for k, v in counts.items() if v})
        for source, pos in offsets.items():
            e.execute("INSERT INTO offsets VALUES (?, ?) ON CONFLICT (source) "
                      "DO UPDATE SET pos = excluded.pos", [source, pos])
        if b.watermark > -math.inf:
            old = self._meta_float(e, "watermark")
            if old is None or b.watermark > old:
                self._set_meta(e, "watermark", repr(b.watermark))
        return IngestResult(
            records=len(rec_ids) - len(existing), rows=new_rows,
            duplicates=sum(dups.values()), labels=b.label_records, bad=bad, ignored=b.ignored,
        )

    def _insert_rows(self, e: _Engine, b: Batch, new_pos: np.ndarray, pos_to_id: np.ndarray,
                     dups: Mapping[str, int]) -> None:
        req = _obj(b.request_id)[new_pos]
        row_ix = _i64(b.row_ix)[new_pos]
        dup_col = np.zeros(new_pos.size, dtype=np.int64)
        if dups:
            first = row_ix == 0
            dup_col[first] = [dups.get(r, 0) for r in req[first]]
        e.insert("inferences", {
            "id": pos_to_id[new_pos],
            "request_id": req,
            "row_ix": row_ix,
            "route": _obj(b.route)[new_pos],
            "ts": _f64(b.ts)[new_pos],
            "policy": self._ids(b.policy)[new_pos],
            "served": self._ids(b.served)[new_pos],
            "propensity": _f64(b.propensity)[new_pos],
            "sticky_key": _obj(b.sticky_key)[new_pos],
            "status": _i64(b.status)[new_pos],
            "gateway_latency_ms": _f64(b.gateway_latency_ms)[new_pos],
            "dups": dup_col,
            "registry_version": _i64(b.registry_version)[new_pos],
        })
        if b.o_pos:
            ids = pos_to_id[_i64(b.o_pos)]
            keep = ids >= 0
            e.insert("outcomes", {
                "inf_id": ids[keep],
                "model": self._ids(b.o_model)[keep],
                "role": _i64(b.o_role)[keep],
                "mode": _i64(b.o_mode)[keep],
                "version": self._ids(b.o_version)[keep],
                "status": _i64(b.o_status)[keep],
                "score": _f64(b.o_score)[keep],
                "latency_ms": _f64(b.o_latency)[keep],
                "experiment": self._optional_ids(b.o_experiment)[keep],
                "sample_rate": _f64(b.o_sample_rate)[keep],
            })
        if b.a_pos:
            ids = pos_to_id[_i64(b.a_pos)]
            keep = ids >= 0
            e.insert("arms", {"inf_id": ids[keep], "model": self._ids(b.a_model)[keep],
                              "prob": _f64(b.a_prob)[keep]})
        if b.x_pos:
            ids = pos_to_id[_i64(b.x_pos)]
            keep = ids >= 0
            e.insert("inputs", {
                "inf_id": ids[keep],
                "name": self._ids(b.x_name)[keep],
                "datatype": self._ids(b.x_dtype)[keep],
                "width": _i64(b.x_width)[keep],
                "num": _obj(b.x_num)[keep],
                "cat": _obj(b.x_cat)[keep],
            })
        # Labels that arrived before their inference: join them now.
        e.stage("s_new", {"id": pos_to_id[new_pos], "request_id": req, "row_ix": row_ix})
        e.execute("UPDATE labels SET inf_id = s.id FROM s_new s WHERE labels.inf_id IS NULL "
                  "AND labels.request_id = s.request_id AND labels.row_ix = s.row_ix")

    def _add_counters(self, e: _Engine, counts: Mapping[str, int]) -> None:
        for name, amount in counts.items():
            e.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) "
                      "DO UPDATE SET amount = counters.amount + excluded.amount",
                      [name, int(amount)])

    def _meta_float(self, e: _Engine, key: str) -> float | None:
        row = e.query("SELECT val FROM meta WHERE key = ?", [key])
        return float(row[0][0]) if row else None

    def _set_meta(self, e: _Engine, key: str, value: str) -> None:
        e.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET val = "
                  "excluded.val", [key, value])

    def expire_orphans(self, now: float | None = None) -> int:
        """Delete orphan labels received more than the join window before `now`.

        `now` defaults to the watermark (newest ts seen). Returns the label records expired;
        they are added to the store-wide `expired_orphans` counter.
        """
        with self._lock, self._transaction() as e:
            ref = now if now is not None else self._meta_float(e, "watermark")
            if ref is None:
                return 0
            cutoff = ref - self.join_window
            where = "inf_id IS NULL AND received_ts < ?"
            ids, records = e.query(f"SELECT COUNT(*), COALESCE(SUM(n), 0) FROM labels "  # noqa: S608
                                   f"WHERE {where}", [cutoff])[0]
            if ids:
                e.execute(f"DELETE FROM labels WHERE {where}", [cutoff])  # noqa: S608
                self._add_counters(e, {"expired_orphans": int(records),
                                       "expired_orphan_ids": int(ids)})
                log.info("expired %d orphan label(s) received before %s (join window %.0fs)",
                         records, _fmt_ts(cutoff), self.join_window)
            return int(records)

    # -- small reads ------------------------------------------------------------------------

    def offsets(self, prefix: str = "") -> dict[str, str]:
        """Committed ingest positions whose source starts with `prefix`."""
        with self._lock:
            rows = self._connect().query("SELECT source, pos FROM offsets")
        return {str(s): str(p) for s, p in rows if str(s).startswith(prefix)}

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {str(n): int(a) for n, a in
                    self._connect().query("SELECT name, amount FROM counters")}

    def watermark(self) -> float | None:
        with self._lock:
            return self._meta_float(self._connect(), "watermark")

    def routes(self) -> list[str]:
        with self._lock:
            return sorted(str(r) for (r,) in
                          self._connect().query("SELECT DISTINCT route FROM inferences"))

    def time_range(self, route: str) -> tuple[float, float] | None:
        """(first, last) inference ts of a route, None when the route has none."""
        with self._lock:
            lo, hi = self._connect().query(
                "SELECT MIN(ts), MAX(ts) FROM inferences WHERE route = ?", [route])[0]
        return None if lo is None else (float(lo), float(hi))

    # -- reads for the statistics -----------------------------------------------------------

    @staticmethod
    def _window(route: str, since: float | None, until: float | None) -> tuple[str, list[Any]]:
        """Half-open [since, until) on the inference ts."""
        return window_sql(since, until, "i.ts", ["i.route = ?"], [route])

    def join_stats(self, route: str, since: float | None = None, until: float | None = None,
                   *, require_label: bool = True) -> JoinStats:
        """Join bookkeeping for a route and window (orphans/expired are store-wide).

        `inferences` and `joined` count prediction rows; `duplicate_inferences` re-delivered
        records; `labels`/`duplicate_labels` label records for the window's predictions.
        """
        with self._lock:
            return self._join_stats(self._connect(), route, since, until, require_label)

    def _join_stats(self, e: _Engine, route: str, since: float | None, until: float | None,
                    require_label: bool) -> JoinStats:
        where, params = self._window(route, since, until)
        n_inf, n_dups = e.query(
            f"SELECT COUNT(*), COALESCE(SUM(dups), 0) FROM inferences i WHERE {where}", params)[0]  # noqa: S608
        joined_cond = "l.has_label" if require_label else "true"
        joined, n_labels, n_dup_labels = e.query(
            f"SELECT COALESCE(SUM(CASE WHEN {joined_cond} THEN 1 ELSE 0 END), 0), "  # noqa: S608
            f"COALESCE(SUM(l.n), 0), COALESCE(SUM(l.n - 1), 0) "
            f"FROM inferences i JOIN labels l ON l.inf_id = i.id WHERE {where}", params)[0]
        orphans = e.query("SELECT COALESCE(SUM(n), 0) FROM labels WHERE inf_id IS NULL")[0][0]
        expired = e.query("SELECT amount FROM counters WHERE name = 'expired_orphans'")
        return JoinStats(
            inferences=int(n_inf), duplicate_inferences=int(n_dups), labels=int(n_labels),
            duplicate_labels=int(n_dup_labels), orphan_labels=int(orphans),
            expired_orphans=int(expired[0][0]) if expired else 0, joined=int(joined),
        )

    def load_dataset(self, route: str, since: float | None = None, until: float | None = None,
                     *, task: str = "auto", threshold: float = 0.5,
                     require_label: bool = True) -> EvalDataset:
        """The joined, labelled predictions of a route in [since, until), ordered by ts.

        Vectorised: three column queries, then numpy scatters rows into per-model columns.
        Models missing for a row (not mirrored, added later) read as status `skipped`, score
        NaN. Raises EmptyDatasetError (with the join stats) when nothing is joined.
        `require_label=False` also keeps reward-only feedback (labels NaN there).
        """
        with self._lock:
            e = self._connect()
            stats = self._join_stats(e, route, since, until, require_label)
            if stats.joined == 0:
                raise EmptyDatasetError(self._empty_message(e, route, since, until, stats),
                                        stats)
            where, params = self._window(route, since, until)
            cond = " AND l.has_label" if require_label else ""
            rows = e.columns(
                "SELECT i.id, i.request_id, i.row_ix, i.ts, l.label, l.reward, i.served, "  # noqa: S608
                "i.propensity, i.policy, COALESCE(i.registry_version, -1) AS registry_version, "
                "l.received_ts "
                f"FROM inferences i JOIN labels l ON l.inf_id = i.id WHERE {where}{cond}", params)
            # Ids are assigned in ingest order, so the window's outcomes sit in one id range:
            # a range scan plus a numpy lookup is cheaper than joining 3 tables again.
            index = _RowIndex(_num(rows["id"], np.int64))
            span = [index.lo, index.hi]
            outs = e.columns("SELECT inf_id, model, role, mode, status, score, latency_ms, "
                             "COALESCE(experiment, -1) AS experiment, sample_rate FROM outcomes "
                             "WHERE inf_id BETWEEN ? AND ?", span)
            arms = e.columns("SELECT inf_id, model, prob FROM arms WHERE inf_id BETWEEN ? AND ?",
                             span)
            names = self._name_lookup(e)
        return _assemble(route, rows, outs, arms, names, stats, task, threshold)

    def current_experiments(self, route: str) -> dict[str, ExperimentInfo]:
        """Each challenger's current experiment on the route (see the module docstring).

        Empty for records without experiment ids (written before experiments existed).
        """
        with self._lock:
            e = self._connect()
            newest = e.query(
                "SELECT h.model FROM outcomes h JOIN inferences i ON i.id = h.inf_id "
                "WHERE i.route = ? AND h.role = ? ORDER BY i.ts DESC, i.id DESC LIMIT 1",
                [route, ROLE_CODES["champion"]])
            if not newest:
                return {}
            groups = e.query(
                "SELECT c.model, c.experiment, MIN(i.ts), MAX(i.ts), "
                "MAX(COALESCE(i.registry_version, -1)) "
                "FROM outcomes c JOIN inferences i ON i.id = c.inf_id "
                "JOIN outcomes h ON h.inf_id = c.inf_id AND h.role = ? "
                "WHERE i.route = ? AND c.role = ? AND c.experiment IS NOT NULL AND h.model = ? "
                "GROUP BY c.model, c.experiment",
                [ROLE_CODES["champion"], route, ROLE_CODES["challenger"], int(newest[0][0])])
            names = self._name_lookup(e)
        return latest_experiments(
            str(names[int(newest[0][0])]),
            [(str(names[int(m)]), str(names[int(x)]), s, d, v) for m, x, s, d, v in groups])


    def _empty_message(self, e: _Engine, route: str, since: float | None, until: float | None,
                       stats: JoinStats) -> str:
        window = f"[{_fmt_ts(since)}, {_fmt_ts(until)})"
        if stats.inferences == 0:
            known = sorted(str(r) for (r,) in e.query("SELECT DISTINCT route FROM inferences"))
            return (f"route {route!r}: no inferences in {window}. Routes in the store: "
                    f"{', '.join(known) or 'none (nothing ingested yet)'}.")
        return (f"route {route!r}: {stats.inferences} inferences in {window} but none has a "
                f"label yet ({stats.orphan_labels} orphan label(s) store-wide wait for their "
                f"inference; the join window is {self.join_window / DAY:g}d). Labels may not "
                f"have arrived: widen the window or wait.")

    def feature_columns(self, route: str, since: float | None = None,
                        until: float | None = None,
                        names: Mapping[str, Sequence[str]] | None = None) -> FeatureFrame:
        """Per-feature numpy columns of every prediction (labelled or not) in the window."""
        with self._lock:
            e = self._connect()
            where, params = self._window(route, since, until)
            rows = e.columns(f"SELECT i.id, i.request_id, i.row_ix, i.ts FROM inferences i "  # noqa: S608
                             f"WHERE {where}", params)
            ids = _num(rows["id"], np.int64)
            order = np.lexsort((ids, _num(rows["ts"])))
            rows = {k: v[order] for k, v in rows.items()}
            index = _RowIndex(ids[order])
            inputs = e.columns("SELECT inf_id, name, datatype, width, num, cat FROM inputs "
                               "WHERE inf_id BETWEEN ? AND ?", [index.lo, index.hi])
            lookup = self._name_lookup(e)
        pos = index.positions(inputs["inf_id"])
        keep = pos >= 0
        return feature_frame(
            route, since, until, _num(rows["ts"]), rows["request_id"],
            _num(rows["row_ix"], np.int64), pos[keep], _num(inputs["name"], np.int64)[keep],
            lookup[_num(inputs["datatype"], np.int64)[keep]] != "BYTES",
            _num(inputs["width"], np.int64)[keep], inputs["num"][keep], inputs["cat"][keep],
            lookup, names)

    def score_series(self, route: str, since: float | None = None,
                     until: float | None = None) -> dict[str, ScoreSeries]:
        """Per model, its ok-status scores on all of the route's predictions in the window —
        labelled or not — with their times, in time order (prediction drift)."""
        with self._lock:
            e = self._connect()
            where, params = self._window(route, since, until)
            outs = e.columns(
                "SELECT o.model, o.role, o.score, i.ts, i.id FROM outcomes o "  # noqa: S608
                f"JOIN inferences i ON i.id = o.inf_id WHERE {where} AND o.status = 0", params)
            lookup = self._name_lookup(e)
        ts = _num(outs["ts"])
        order = np.lexsort((_num(outs["id"], np.int64), ts))
        return score_series_of(_num(outs["model"], np.int64)[order],
                               _num(outs["role"], np.int64)[order], _num(outs["score"])[order],
                               ts[order], lookup)

    def prediction_scores(self, route: str, since: float | None = None,
                          until: float | None = None) -> dict[str, np.ndarray]:
        """`score_series` without the times: model -> scores."""
        return {m: s.scores for m, s in self.score_series(route, since, until).items()}


# --------------------------------------------------------------------------------------------
# Vectorised assembly
# --------------------------------------------------------------------------------------------


def latest_experiments(champion: str, groups: Sequence[tuple[str, str, Any, Any, Any]]
                       ) -> dict[str, ExperimentInfo]:
    """Each challenger's newest experiment with `champion`, from (model, experiment, first ts,
    last ts, highest registry version) groups."""
    out: dict[str, ExperimentInfo] = {}
    for name, exp, started, end, version in groups:
        info = ExperimentInfo(id=exp, started=float(started), data_end=float(end),
                              champion=champion, registry_version=int(version))
        known = out.get(name)
        if known is None or (info.started, info.id) > (known.started, known.id):
            out[name] = info
    return dict(sorted(out.items()))


def window_sql(since: float | None, until: float | None, column: str = "ts",
               where: list[str] | None = None, params: list[Any] | None = None
               ) -> tuple[str, list[Any]]:
    """A SQL condition for the half-open window [since, until) on `column`, after `where`."""
    where, params = list(where or []), list(params or [])
    if since is not None:
        where.append(f"{column} >= ?")
        params.append(float(since))
    if until is not None:
        where.append(f"{column} < ?")
        params.append(float(until))
    return " AND ".join(where or ["true"]), params


def _fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "…"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class _RowIndex:
    """Store id -> dataset row position (-1 for ids not in the dataset).

    A dense lookup table over the window's id range when that range is not much wider than the
    dataset (the usual case: ids follow ingest order); binary search otherwise.
    """

    def __init__(self, ids: np.ndarray) -> None:
        self.n = int(ids.size)
        self.lo = int(ids.min()) if self.n else 0
        self.hi = int(ids.max()) if self.n else -1
        span = self.hi - self.lo + 1
        self.lut: np.ndarray | None = None
        if self.n and span <= 8 * self.n + (1 << 20):
            self.lut = np.full(span, -1, dtype=np.int64)
            self.lut[ids - self.lo] = np.arange(self.n)
        else:
            self.order = np.argsort(ids, kind="stable")
            self.sorted = ids[self.order]

    def positions(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.astype(np.int64, copy=False)
        out = np.full(ids.size, -1, dtype=np.int64)
        if not self.n:
            return out
        inside = (ids >= self.lo) & (ids <= self.hi)
        if self.lut is not None:
            out[inside] = self.lut[ids[inside] - self.lo]
            return out
        k = np.minimum(np.searchsorted(self.sorted, ids), self.n - 1)
        hit = inside & (self.sorted[k] == ids)
        out[hit] = self.order[k[hit]]
        return out


def _present(codes: np.ndarray) -> np.ndarray:
    """Distinct small non-negative integer codes, O(n) (np.unique sorts)."""
    return np.flatnonzero(np.bincount(codes)) if codes.size else np.empty(0, dtype=np.int64)


def _request_ids(request_ids: np.ndarray, row_ix: np.ndarray) -> np.ndarray:
    """Request ids, with `#row` appended for rows past the first of a batched request."""
    out = np.asarray(request_ids, dtype=object).copy()
    for k in np.flatnonzero(row_ix > 0):
        out[k] = f"{out[k]}#{int(row_ix[k])}"
    return out


def _detect_task(labels: np.ndarray, task: str) -> Task:
    if task in ("classification", "regression"):
        return task  # type: ignore[return-value]
    finite = labels[np.isfinite(labels)]
    return "classification" if np.isin(finite, (0.0, 1.0)).all() else "regression"


def _assemble(route: str, rows: dict[str, np.ndarray], outs: dict[str, np.ndarray],
              arms: dict[str, np.ndarray], names: np.ndarray, stats: JoinStats, task: str,
              threshold: float) -> EvalDataset:
    ids = _num(rows["id"], np.int64)
    ts = _num(rows["ts"])
    order = np.lexsort((ids, ts))  # rows in time order (ties by ingest order)
    if (order[1:] < order[:-1]).any():  # already in order (the lake's rows): no copies
        rows = {k: v[order] for k, v in rows.items()}
        ids = ids[order]
    n = ids.size
    index = _RowIndex(ids)
    labels = _num(rows["label"])

    o_pos = index.positions(outs["inf_id"])
    keep = o_pos >= 0  # the id range also holds unlabelled rows and other routes
    o_pos = o_pos[keep]
    o_model = _num(outs["model"], np.int64)[keep]
    o_role = _num(outs["role"], np.int64)[keep]
    o_mode = _num(outs["mode"], np.int64)[keep]
    o_status = _num(outs["status"], np.int64)[keep]
    o_score = _num(outs["score"])[keep]
    o_latency = _num(outs["latency_ms"])[keep]
    o_experiment = _num(outs["experiment"], np.int64)[keep]  # -1: unknown
    o_sample_rate = _num(outs["sample_rate"])[keep]

    # The champion is the model in the champion role on the most recent row.
    champ_rows = np.flatnonzero(o_role == ROLE_CODES["champion"])
    if champ_rows.size:
        champion = str(names[o_model[champ_rows[np.argmax(o_pos[champ_rows])]]])
    else:
        champion = str(names[np.bincount(_num(rows["served"], np.int64)).argmax()])

    models: dict[str, ModelColumn] = {}
    for mid in _present(o_model):
        name = str(names[mid])
        mask = o_model == mid
        pos = o_pos[mask]
        scores = np.full(n, np.nan)
        status = np.full(n, SKIPPED, dtype=np.int8)
        latency = np.full(n, np.nan)
        scores[pos] = o_score[mask]
        status[pos] = o_status[mask]
        latency[pos] = o_latency[mask]
        modes = tuple(MODE_NAMES.get(int(m) - 1, "unknown") for m in _present(o_mode[mask] + 1))
        role = "champion" if name == champion else "challenger"
        experiment: np.ndarray | None = None
        sample_rate: np.ndarray | None = None
        if role == "challenger":
            codes = np.full(n, -1, dtype=np.int64)
            codes[pos] = o_experiment[mask]
            experiment = np.full(n, None, dtype=object)
            known = codes >= 0
            experiment[known] = names[codes[known]]
            sample_rate = np.full(n, np.nan)
            sample_rate[pos] = o_sample_rate[mask]
        models[name] = ModelColumn(name=name, role=role, scores=scores, status=status,
                                   latency_ms=latency, modes=modes, experiment=experiment,
                                   sample_rate=sample_rate)
    # champion first, then challengers by name: a stable order for reports
    ordered = {champion: models[champion]} if champion in models else {}
    ordered.update({k: models[k] for k in sorted(models) if k != champion})

    arm_probs: dict[str, np.ndarray] = {}
    if arms["inf_id"].size:
        a_pos = index.positions(arms["inf_id"])
        keep = a_pos >= 0
        a_pos = a_pos[keep]
        a_model = _num(arms["model"], np.int64)[keep]
        a_prob = _num(arms["prob"])[keep]
        for mid in _present(a_model):
            mask = a_model == mid
            col = np.zeros(n)
            col[a_pos[mask]] = a_prob[mask]
            arm_probs[str(names[mid])] = col

    return EvalDataset(
        route=route,
        task=_detect_task(labels, task),
        champion=champion,
        request_ids=_request_ids(rows["request_id"], _num(rows["row_ix"], np.int64)),
        ts=_num(rows["ts"]),
        labels=labels,
        rewards=_num(rows["reward"]),
        served=names[_num(rows["served"], np.int64)],
        propensity=_num(rows["propensity"]),
        arm_probs=arm_probs,
        policy_types=names[_num(rows["policy"], np.int64)],
        models=ordered,
        threshold=float(threshold),
        stats=stats,
        registry_version=_num(rows["registry_version"], np.int64),
        label_ts=_num(rows["received_ts"]),
    )



def feature_frame(route: str, since: float | None, until: float | None, ts: np.ndarray,
                  request_ids: np.ndarray, row_ix: np.ndarray, pos: np.ndarray,
                  tensor: np.ndarray, numeric: np.ndarray, width: np.ndarray, num: np.ndarray,
                  cat: np.ndarray, lookup: np.ndarray,
                  names: Mapping[str, Sequence[str]] | None) -> FeatureFrame:
    """A FeatureFrame from predictions in time order and their input rows (`pos`: the
    prediction each input row belongs to; `tensor`: name codes into `lookup`)."""
    names = names or {}
    n = int(ts.size)
    columns: dict[str, np.ndarray] = {}
    for tid in sorted(_present(tensor), key=lambda i: str(lookup[i])):
        mask = tensor == tid
        name = str(lookup[tid])
        columns.update(_tensor_columns(name, n, pos[mask], width[mask], numeric[mask],
                                       num[mask], cat[mask], names.get(name)))
    return FeatureFrame(route, since, until, ts if n else np.empty(0),
                        _request_ids(request_ids, row_ix), columns)


def score_series_of(models: np.ndarray, roles: np.ndarray, scores: np.ndarray, ts: np.ndarray,
                    lookup: np.ndarray) -> dict[str, ScoreSeries]:
    """Per model (codes into `lookup`), its scores and times; rows already in time order."""
    out: dict[str, ScoreSeries] = {}
    for mid in sorted(_present(models), key=lambda i: str(lookup[i])):
        mask = models == mid
        name = str(lookup[mid])
        out[name] = ScoreSeries(name, ROLE_NAMES.get(int(roles[mask][-1]), "challenger"),
                                scores[mask], ts[mask])
    return out


def _tensor_columns(tensor: str, n: int, pos: np.ndarray, width: np.ndarray, numeric: np.ndarray,
                    num: np.ndarray, cat: np.ndarray,
                    names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Scatter one input tensor's stored rows into named per-feature columns."""
    out: dict[str, np.ndarray] = {}
    w = int(width.max()) if width.size else 0
    if w <= 0:
        return out
    cols = list(names) if names is not None and len(names) == w else \
        ([tensor] if w == 1 else [f"{tensor}[{j}]" for j in range(w)])
    if numeric.all():
        matrix = np.full((n, w), np.nan)
        uniform = bool((width == w).all()) and all(v is not None for v in num)
        if uniform:
            matrix[pos] = np.frombuffer(b"".join(num), dtype="<f8").reshape(-1, w)
        else:
            for p, k, v in zip(pos, width, num, strict=True):
                if v is not None and k:
                    matrix[p, :k] = np.frombuffer(bytes(v), dtype="<f8")[:k]
        for j, name in enumerate(cols):
            out[name] = matrix[:, j].copy()
        return out
    import orjson

    matrix_obj = np.full((n, w), None, dtype=object)
    for p, v in zip(pos, cat, strict=True):
        if v is not None:
            values = orjson.loads(v)
            matrix_obj[p, :len(values)] = [str(x) for x in values[:w]]
    for j, name in enumerate(cols):
        out[name] = matrix_obj[:, j].copy()
    return out
