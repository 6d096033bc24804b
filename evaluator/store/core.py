"""The evaluator's embedded store: deduplicated inference log, per-model outcomes and labels.

Engine: DuckDB by default, SQLite selectable (`store.engine`); both run the same schema
(`evaluator.store.schema`) and SQL through a thin engine layer (`evaluator.store.engines`, which
also says why DuckDB is the default). `Store` owns the connection, its lock and its
transactions; the writes (`writes`: dedup, the eager label join, orphans) and the reads
(`queries`, assembled with numpy in `assembly`) are plain functions over an open engine.

Experiments (`reads.DatasetReads`, shared with the landing zone's reader): `load_experiments`
loads every row since the earliest current experiment started (`queries.current_experiments`),
so the verdict's data never depends on a window.

Store-wide, not per route: orphan and expired label counts (a label carries no route).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from evaluator.config import StoreConfig
from evaluator.dataset import Array, EvalDataset, ExperimentInfo, JoinStats, Obj
from evaluator.store import queries, writes
from evaluator.store.assembly import (
    FeatureFrame,
    ScoreSeries,
    assemble,
    features_of,
    scores_of,
)
from evaluator.store.batch import Batch, IngestResult
from evaluator.store.engines import Engine, open_engine
from evaluator.store.errors import EmptyDatasetError, StoreError
from evaluator.store.names import NameTable
from evaluator.store.queries import DAY
from evaluator.store.reads import DatasetReads
from evaluator.store.schema import check_schema, create_schema


class Store(DatasetReads):
    """The evaluator's store; see the module docstrings of the package for schema and joins.

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
        self._engine: Engine | None = None
        self._names = NameTable()
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

    def _connect(self) -> Engine:
        if self._engine is not None:
            return self._engine
        engine = open_engine(self.engine_name, self.path, self.read_only, self.lock_timeout_s)
        self._engine = engine
        try:
            if not self.read_only:
                create_schema(engine, self.path)
            check_schema(engine, self.path, self.read_only)
        except Exception:
            self.release()
            raise
        return engine

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
    def _transaction(self) -> Iterator[Engine]:
        e = self._connect()
        e.begin()
        try:
            yield e
        except BaseException:
            e.rollback()
            self._names.clear()  # interned ids of a rolled-back batch are gone
            raise
        e.commit()

    # evaluator/drift reads score timestamps through these two (with a fallback to the
    # public calls); `score_series` now returns the same data publicly.
    _window = staticmethod(queries.window)

    def _name_lookup(self, e: Engine) -> Obj:
        return self._names.lookup(e)

    # -- writes -----------------------------------------------------------------------------

    def ingest(self, batch: Batch, offsets: Mapping[str, str] | None = None) -> IngestResult:
        """Write one parsed batch and the source positions it ends at, atomically.

        Committing the positions with the data is what lets a restart resume exactly where the
        last committed batch ended, with nothing counted twice.
        """
        with self._lock, self._transaction() as e:
            return writes.ingest_batch(e, self._names, batch, offsets or {})

    def expire_orphans(self, now: float | None = None) -> int:
        """Delete orphan labels received more than the join window before `now`.

        `now` defaults to the watermark (newest ts seen). Returns the label records expired;
        they are added to the store-wide `expired_orphans` counter.
        """
        with self._lock, self._transaction() as e:
            return writes.expire_orphans(e, now, self.join_window)

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
            return writes.meta_float(self._connect(), "watermark")

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

    def join_stats(self, route: str, since: float | None = None, until: float | None = None,
                   *, require_label: bool = True) -> JoinStats:
        """Join bookkeeping for a route and window (orphans/expired are store-wide).

        `inferences` and `joined` count prediction rows; `duplicate_inferences` re-delivered
        records; `labels`/`duplicate_labels` label records for the window's predictions.
        """
        with self._lock:
            return queries.join_stats(self._connect(), route, since, until, require_label)

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
            stats = queries.join_stats(e, route, since, until, require_label)
            if stats.joined == 0:
                raise EmptyDatasetError(
                    queries.empty_message(e, route, since, until, stats, self.join_window),
                    stats)
            rows, outs, arms = queries.labelled_columns(e, route, since, until, require_label)
            names = self._names.lookup(e)
        return assemble(route, rows, outs, arms, names, stats, task, threshold)

    def current_experiments(self, route: str) -> dict[str, ExperimentInfo]:
        """Each challenger's current experiment on the route (`queries.current_experiments`).

        Empty for records without experiment ids (written before experiments existed).
        """
        with self._lock:
            return queries.current_experiments(self._connect(), self._names, route)

    def feature_columns(self, route: str, since: float | None = None,
                        until: float | None = None,
                        names: Mapping[str, Sequence[str]] | None = None) -> FeatureFrame:
        """Per-feature numpy columns of every prediction (labelled or not) in the window."""
        with self._lock:
            rows, index, inputs, lookup = queries.feature_rows(self._connect(), self._names,
                                                               route, since, until)
        return features_of(route, since, until, rows, index, inputs, lookup, names)

    def score_series(self, route: str, since: float | None = None,
                     until: float | None = None) -> dict[str, ScoreSeries]:
        """Per model, its ok-status scores on all of the route's predictions in the window —
        labelled or not — with their times, in time order (prediction drift)."""
        with self._lock:
            outs, lookup = queries.score_rows(self._connect(), self._names, route, since, until)
        return scores_of(outs, lookup)

    def prediction_scores(self, route: str, since: float | None = None,
                          until: float | None = None) -> dict[str, Array]:
        """`score_series` without the times: model -> scores."""
        return {m: s.scores for m, s in self.score_series(route, since, until).items()}
