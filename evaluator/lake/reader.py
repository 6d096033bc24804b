"""The report's view of the landing zone: DuckDB over the Parquet files builds the `EvalDataset`.

Implements the read rules of layout.py and hands the rows to the store's own assembly
(`evaluator.store._assemble`), so for the same records the dataset — every array, the join
stats, the experiments — is the one `Store.load_dataset` builds, and so are the verdicts.

How the rules become SQL (one in-memory DuckDB connection, explicit file lists, so a writer's
temporary files are never read and fsspec URLs work through `register_filesystem`):

- Rule 2's losers (all but the first `(src, pos)` of a `(request_id, row_ix)`) are computed on
  the key columns of the requests that occur more than once — a small set, as duplicates are
  rare — and anti-joined; rule 1 is the same anti-join, as a replay repeats `(src, pos)` and
  only the first copy (by file name and row number) stays.
- Rule 3 is one `GROUP BY request_id, row_ix` with `arg_max(..., (received_ts, src, pos))`.
- Rule 5: DuckDB returns rows unsorted; numpy ranks them by `(ts, src, pos, row_ix)` and that
  rank is the `id` `_assemble` orders by, which is how the store's ingest-order ids behave.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evaluator.config import EvaluatorConfig
from evaluator.dataset import Array, EvalDataset, ExperimentInfo, JoinStats
from evaluator.lake import layout
from evaluator.lake.storage import Lake
from evaluator.store import (
    DAY,
    ROLE_CODES,
    DatasetReads,
    EmptyDatasetError,
    FeatureFrame,
    ScoreSeries,
    StoreError,
    _assemble,
    _fmt_ts,
    feature_frame,
    latest_experiments,
    score_series_of,
    window_sql,
)

# Every row of a table, with the identity of its copy (file, row) for rules 1-3.
_INF = ("read_parquet({files}, filename=true, file_row_number=true, hive_partitioning=false, "
        "union_by_name=true)")
_LOSERS = """
SELECT filename, file_row_number FROM (
    SELECT filename, file_row_number, row_number() OVER (
        PARTITION BY request_id, row_ix ORDER BY src, pos, filename, file_row_number) AS k
    FROM {inf} SEMI JOIN (
        SELECT request_id, row_ix FROM {inf}
        GROUP BY request_id, row_ix HAVING count(*) > 1) d USING (request_id, row_ix))
WHERE k > 1
"""
# Rule 3 in three steps, so only the (few) duplicated labels go through a window function:
# the keys with more than one label and their record counts, the copies that lose, the rest.
_LABEL_DUPS = """
SELECT request_id, row_ix, count(DISTINCT (src, pos)) AS n FROM {labels} SEMI JOIN (
    SELECT request_id, row_ix FROM {labels} GROUP BY request_id, row_ix HAVING count(*) > 1
) d USING (request_id, row_ix) GROUP BY request_id, row_ix
"""
_LABEL_LOSERS = """
SELECT filename, file_row_number FROM (
    SELECT filename, file_row_number, row_number() OVER (
        PARTITION BY request_id, row_ix
        ORDER BY received_ts DESC, src DESC, pos DESC, filename DESC, file_row_number DESC) AS k
    FROM {labels} SEMI JOIN {dups} d USING (request_id, row_ix))
WHERE k > 1
"""
_LABELS = """
SELECT l.request_id, l.row_ix, l.label, l.reward, l.has_label, l.received_ts,
       coalesce(d.n, 1) AS n
FROM {labels} l ANTI JOIN {losers} x USING (filename, file_row_number)
LEFT JOIN {dups} d USING (request_id, row_ix)
"""
BATCH_ROWS = 256 * 1024  # rows per Arrow batch while a dataset is assembled


class LakeReader(DatasetReads):
    """Read-only access to a landing zone with the store's read API (the parts `report` uses)."""

    def __init__(self, lake: Lake, *, join_window: float = 14 * DAY, memory_limit: str = "",
                 threads: int = 0) -> None:
        import duckdb

        self.lake = lake
        self.join_window = float(join_window)
        self._lock = threading.RLock()
        self.con = duckdb.connect()
        # Spills (past memory_limit) go to the system's temporary directory, not the cwd.
        spill = os.path.join(tempfile.gettempdir(), f"understudy-duckdb-{os.getpid()}")
        self.con.execute(f"SET temp_directory = '{spill}'")
        if memory_limit:
            self.con.execute(f"SET memory_limit = '{memory_limit}'")
        if threads > 0:
            self.con.execute(f"SET threads = {int(threads)}")
        if not lake.local:
            self.con.register_filesystem(lake.fs)
        # One reader is one report: the file list, rule 2's losers, rule 3's label winners and
        # the watermark are computed once and reused by every query (a consistent snapshot).
        self._files_cache: dict[tuple[str, str | None], list[str]] = {}
        self._temp: dict[str, str | None] = {}
        self._mark: tuple[float | None] | None = None
        self._orphan_counts: tuple[tuple[int, int], tuple[int, int]] | None = None

    @classmethod
    def open(cls, config: EvaluatorConfig) -> LakeReader:
        lake = Lake(config.lake.path)
        if not lake.exists():
            raise StoreError(f"no landing zone at {config.lake.path}: run `python -m evaluator "
                             f"run --config ...` with lake.path set first")
        return cls(lake, join_window=config.store.join_window,
                   memory_limit=config.lake.memory_limit, threads=config.lake.threads)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> LakeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- relations --------------------------------------------------------------------------

    def _files(self, table: str, route: str | None = None) -> list[str]:
        key = (table, route)
        if key not in self._files_cache:
            self._files_cache[key] = [self.lake.uri(p) for p in self.lake.files(table, route)]
        return self._files_cache[key]

    def _temp_table(self, key: str, select: str | None) -> str | None:
        """`select` materialised once as a temporary table; its name (None: no data)."""
        if key not in self._temp:
            name = None
            if select is not None:
                name = f"t{len(self._temp)}"
                with self._lock:
                    self.con.execute(f"CREATE TEMP TABLE {name} AS {select}")
            self._temp[key] = name
        return self._temp[key]

    def _labels(self) -> str | None:
        """Rule 3's label winners (with `n`), as a table."""
        rel = self._rel(layout.LABELS)
        if rel is None:
            return None
        dups = self._temp_table("label_dups", _LABEL_DUPS.format(labels=rel))
        losers = self._temp_table("label_losers", _LABEL_LOSERS.format(labels=rel, dups=dups))
        return self._temp_table("labels", _LABELS.format(labels=rel, dups=dups, losers=losers))

    def _rel(self, table: str, route: str | None = None) -> str | None:
        """A FROM-clause over a table's files (one route's inferences); None when empty."""
        files = self._files(table, route)
        if not files:
            return None
        listed = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        return _INF.format(files=listed)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.con.execute(sql, list(params)).fetchall()

    def _arrow(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        with self._lock:
            return self.con.sql(sql, params=list(params)).to_arrow_table()

    def _batches(self, sql: str, params: Sequence[Any] = ()) -> Iterator[pa.RecordBatch]:
        """A query's result as Arrow batches, fetched as the caller consumes them (so only one
        batch of nested Arrow data is in memory next to the numpy columns built from it)."""
        with self._lock:
            yield from self.con.sql(sql, params=list(params)).to_arrow_reader(BATCH_ROWS)

    def _winners(self, route: str, since: float | None, until: float | None
                 ) -> tuple[str, list[Any]] | None:
        """A FROM-clause of the route's inference winners (rules 1-2) in the window."""
        inf = self._rel(layout.INFERENCES, route)
        if inf is None:
            return None
        cond, params = window_sql(since, until)
        losers = self._temp_table(f"losers:{route}", _LOSERS.format(inf=inf))
        sql = (f"(SELECT * FROM {inf} ANTI JOIN {losers} x "  # noqa: S608 - file names, quoted
               f"USING (filename, file_row_number) WHERE {cond})")
        return sql, params

    # -- small reads ------------------------------------------------------------------------

    def routes(self) -> list[str]:
        return self.lake.routes()

    def time_range(self, route: str) -> tuple[float, float] | None:
        inf = self._rel(layout.INFERENCES, route)
        if inf is None:
            return None
        lo, hi = self._query(f"SELECT min(ts), max(ts) FROM {inf}")[0]  # noqa: S608
        return None if lo is None else (float(lo), float(hi))

    def watermark(self) -> float | None:
        """The newest inference ts or label received_ts in the lake (rule 4)."""
        if self._mark is None:
            self._mark = (self._watermark(),)
        return self._mark[0]

    def _watermark(self) -> float | None:
        marks = []
        for route in self.routes():
            span = self.time_range(route)
            if span is not None:
                marks.append(span[1])
        labels = self._rel(layout.LABELS)
        if labels is not None:
            (hi,) = self._query(f"SELECT max(received_ts) FROM {labels}")[0]  # noqa: S608
            if hi is not None:
                marks.append(float(hi))
        return max(marks) if marks else None

    def counters(self) -> dict[str, int]:
        """The store's counters that the lake keeps: bad records by reason, ignored (rule 6)."""
        rejects = self._rel(layout.REJECTS)
        out: dict[str, int] = {}
        if rejects is not None:
            rows = self._query(f"SELECT reason, count(DISTINCT (src, pos)) FROM {rejects} "  # noqa: S608
                               "GROUP BY reason")
            for reason, k in rows:
                out["ignored_records" if reason == "ignored" else str(reason)] = int(k)
            bad = sum(v for k, v in out.items() if k.startswith("bad:"))
            if bad:
                out["bad_records"] = bad
        _, expired = self._orphans()
        if expired[0]:
            out["expired_orphans"] = expired[0]
            out["expired_orphan_ids"] = expired[1]
        return out

    def _orphans(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((orphan label records, ids), (expired ones, ids)) store-wide (rule 4)."""
        if self._orphan_counts is None:
            self._orphan_counts = self._count_orphans()
        return self._orphan_counts

    def _count_orphans(self) -> tuple[tuple[int, int], tuple[int, int]]:
        labels = self._labels()
        if labels is None:
            return (0, 0), (0, 0)
        keys = [f"SELECT request_id, row_ix FROM {rel}"  # noqa: S608 - quoted file names
                for route in self.routes()
                if (rel := self._rel(layout.INFERENCES, route)) is not None]
        known = " UNION ALL ".join(keys) or \
            "SELECT NULL::VARCHAR AS request_id, NULL::INTEGER AS row_ix WHERE false"
        mark = self.watermark()
        cutoff = -np.inf if mark is None else mark - self.join_window
        row = self._query(
            f"WITH o AS (SELECT * FROM {labels} l "  # noqa: S608
            f"ANTI JOIN ({known}) i USING (request_id, row_ix)) "
            "SELECT coalesce(sum(n) FILTER (WHERE received_ts >= ?), 0), "
            "count(*) FILTER (WHERE received_ts >= ?), "
            "coalesce(sum(n) FILTER (WHERE received_ts < ?), 0), "
            "count(*) FILTER (WHERE received_ts < ?) FROM o", [cutoff] * 4)[0]
        return (int(row[0]), int(row[1])), (int(row[2]), int(row[3]))

    # -- reads for the statistics -----------------------------------------------------------

    def join_stats(self, route: str, since: float | None = None, until: float | None = None,
                   *, require_label: bool = True) -> JoinStats:
        """The store's join bookkeeping for a route and window (orphans are lake-wide)."""
        (orphans, _), (expired, _) = self._orphans()
        inf = self._rel(layout.INFERENCES, route)
        if inf is None:
            return JoinStats(orphan_labels=orphans, expired_orphans=expired)
        cond, wparams = window_sql(since, until)
        # Rule 2 without the anti-join: winners = distinct (request_id, row_ix); duplicates of a
        # request = its distinct source positions on row 0, minus one.
        n_inf, n_dups = self._query(
            "SELECT count(DISTINCT (request_id, row_ix)), "  # noqa: S608
            "count(DISTINCT (request_id, src, pos)) FILTER (WHERE row_ix = 0) - "
            f"count(DISTINCT request_id) FILTER (WHERE row_ix = 0) FROM {inf} WHERE {cond}",
            wparams)[0]
        joined, n_labels, n_dup_labels = 0, 0, 0
        labels = self._labels()
        if labels is not None:
            joined_cond = "l.has_label" if require_label else "true"
            joined, n_labels, n_dup_labels = self._query(
                f"SELECT coalesce(sum(CASE WHEN {joined_cond} THEN 1 ELSE 0 END), 0), "  # noqa: S608
                "coalesce(sum(l.n), 0), coalesce(sum(l.n - 1), 0) "
                f"FROM (SELECT request_id, row_ix FROM {inf} WHERE {cond} GROUP BY ALL) i "
                f"JOIN {labels} l USING (request_id, row_ix)", wparams)[0]
        return JoinStats(
            inferences=int(n_inf), duplicate_inferences=int(n_dups or 0),
            labels=int(n_labels), duplicate_labels=int(n_dup_labels), orphan_labels=orphans,
            expired_orphans=expired, joined=int(joined))

    def load_dataset(self, route: str, since: float | None = None, until: float | None = None,
                     *, task: str = "auto", threshold: float = 0.5,
                     require_label: bool = True) -> EvalDataset:
        """The joined, labelled predictions of a route in [since, until), as the store's."""
        stats = self.join_stats(route, since, until, require_label=require_label)
        if stats.joined == 0:
            raise EmptyDatasetError(self._empty_message(route, since, until, stats), stats)
        sql, params = self._winners(route, since, until)  # type: ignore[misc]
        cond = "WHERE l.has_label" if require_label else ""
        batches = self._batches(
            "SELECT i.request_id, i.row_ix, i.ts, i.src, i.pos, i.served, i.propensity, "  # noqa: S608
            "i.policy, coalesce(i.registry_version, -1) AS registry_version, i.outcomes, "
            "i.arms, l.label, l.reward, l.received_ts "
            f"FROM {sql} i JOIN {self._labels()} l USING (request_id, row_ix) {cond}", params)
        return _dataset(route, batches, stats, task, threshold)

    def current_experiments(self, route: str) -> dict[str, ExperimentInfo]:
        """Each challenger's current experiment (the store's definition; duplicates of a
        record share its ts and content, so rule 2 cannot change these extremes)."""
        inf = self._rel(layout.INFERENCES, route)
        if inf is None:
            return {}
        champ = ROLE_CODES["champion"]
        newest = self._query(
            f"SELECT list_filter(outcomes, lambda o: o.role = {champ})[1].model AS m FROM {inf} "  # noqa: S608
            f"WHERE len(list_filter(outcomes, lambda o: o.role = {champ})) > 0 "
            "ORDER BY ts DESC, src DESC, pos DESC, row_ix DESC LIMIT 1")
        if not newest:
            return {}
        champion = str(newest[0][0])
        groups = self._query(
            "SELECT o.model, o.experiment, min(ts), max(ts), max(rv) FROM ("  # noqa: S608
            "SELECT ts, coalesce(registry_version, -1) AS rv, unnest(outcomes) AS o "
            f"FROM {inf} WHERE list_contains(list_transform(list_filter(outcomes, "
            f"lambda o: o.role = {champ}), lambda o: o.model), ?)) "
            f"WHERE o.role = {ROLE_CODES['challenger']} AND o.experiment IS NOT NULL "
            "GROUP BY o.model, o.experiment", [champion])
        return latest_experiments(champion, [(str(m), str(x), s, d, v)
                                             for m, x, s, d, v in groups])

    # -- drift inputs -------------------------------------------------------------------------

    def _predictions(self, route: str, since: float | None, until: float | None,
                     columns: str) -> tuple[pa.Table, Array, _Names]:
        """The route's prediction winners in the window (labelled or not) and the rank of
        each row in (ts, src, pos, row_ix) order (rule 5)."""
        names = _Names()
        win = self._winners(route, since, until)
        if win is None:
            return pa.table({}), np.empty(0, dtype=np.int64), names
        sql, params = win
        table = self._arrow(f"SELECT ts, src, pos, row_ix, {columns} FROM {sql}", params)  # noqa: S608
        return table, _rank(names.codes(table["src"]), table, names), names

    def feature_columns(self, route: str, since: float | None = None,
                        until: float | None = None,
                        names: Mapping[str, Sequence[str]] | None = None) -> FeatureFrame:
        """The store's `feature_columns` (drift's input features) from the lake."""
        table, ids, vocab = self._predictions(route, since, until, "request_id, inputs")
        if not ids.size:
            empty, objects = np.empty(0, dtype=np.int64), np.empty(0, dtype=object)
            return feature_frame(route, since, until, np.empty(0), objects, empty, empty, empty,
                                 np.empty(0, dtype=bool), empty, objects, objects,
                                 vocab.lookup(), names)
        order = np.argsort(ids)
        x_row, x = _flat(table["inputs"])
        tensor = vocab.codes(x.field("name"))
        lookup = vocab.lookup()
        return feature_frame(
            route, since, until, _np(table["ts"])[order],
            np.asarray(table["request_id"].to_pylist(), dtype=object)[order],
            _np(table["row_ix"], np.int64)[order], ids[x_row], tensor,
            np.asarray(x.field("datatype").to_pylist(), dtype=object) != "BYTES",
            _np(x.field("width"), np.int64),
            np.asarray(x.field("num").to_pylist(), dtype=object),
            np.asarray(x.field("cat").to_pylist(), dtype=object), lookup, names)

    def score_series(self, route: str, since: float | None = None,
                     until: float | None = None) -> dict[str, ScoreSeries]:
        """The store's `score_series` (prediction drift) from the lake."""
        table, ids, vocab = self._predictions(route, since, until, "outcomes")
        if not ids.size:
            return {}
        o_row, o = _flat(table["outcomes"])
        ok = _np(o.field("status"), np.int64) == 0
        models = vocab.codes(o.field("model"))[ok]
        at = ids[o_row][ok]
        order = np.argsort(at, kind="stable")
        return score_series_of(models[order], _np(o.field("role"), np.int64)[ok][order],
                               _np(o.field("score"))[ok][order],
                               _np(table["ts"])[o_row][ok][order], vocab.lookup())

    def prediction_scores(self, route: str, since: float | None = None,
                          until: float | None = None) -> dict[str, Array]:
        return {m: s.scores for m, s in self.score_series(route, since, until).items()}

    def _empty_message(self, route: str, since: float | None, until: float | None,
                       stats: JoinStats) -> str:
        window = f"[{_fmt_ts(since)}, {_fmt_ts(until)})"
        if stats.inferences == 0:
            return (f"route {route!r}: no inferences in {window}. Routes in the lake: "
                    f"{', '.join(self.routes()) or 'none (nothing ingested yet)'}.")
        return (f"route {route!r}: {stats.inferences} inferences in {window} but none has a "
                f"label yet ({stats.orphan_labels} orphan label(s) lake-wide wait for their "
                f"inference; the join window is {self.join_window / DAY:g}d). Labels may not "
                f"have arrived: widen the window or wait.")


# --------------------------------------------------------------------------------------------
# Arrow -> the store's assembly inputs
# --------------------------------------------------------------------------------------------


class _Names:
    """Strings -> small integer codes, one vocabulary for every column (the store's `names`)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {"": 0}

    def codes(self, column: pa.ChunkedArray | pa.Array, missing: int = -1) -> Array:
        encoded = pc.dictionary_encode(column)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        vocab = np.asarray([self.ids.setdefault(str(v), len(self.ids))
                            for v in encoded.dictionary.to_pylist()] + [missing],
                           dtype=np.int64)
        idx = encoded.indices.fill_null(len(vocab) - 1)
        return vocab[np.asarray(idx, dtype=np.int64)]

    def lookup(self) -> Array:
        table = np.full(len(self.ids), "", dtype=object)
        for name, i in self.ids.items():
            table[i] = name
        return table


def _np(column: pa.ChunkedArray | pa.Array | Array, dtype: Any = np.float64) -> Array:
    """A numeric Arrow column as numpy (NULL -> NaN for floats)."""
    if isinstance(column, np.ndarray):
        return column.astype(dtype, copy=False)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_floating(column.type):
        return np.asarray(column.fill_null(np.nan), dtype=dtype)
    return np.asarray(column.fill_null(-1), dtype=dtype)


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[Array, pa.StructArray]:
    """A list column's elements and the row each belongs to."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return (np.asarray(pc.list_parent_indices(lists), dtype=np.int64),
            pc.list_flatten(lists))


def _rank(src: Array, cols: pa.Table | dict[str, Array], names: _Names) -> Array:
    """Each row's position in (ts, src, pos, row_ix) order (rule 5); `src`: codes in `names`,
    which rank as the strings do."""
    src_rank = np.argsort(np.argsort(names.lookup(), kind="stable"), kind="stable")[src]
    order = np.lexsort((_np(cols["row_ix"], np.int64), _np(cols["pos"], np.int64), src_rank,
                        _np(cols["ts"])))
    ids = np.empty(order.size, dtype=np.int64)
    ids[order] = np.arange(order.size)
    return ids


def _dataset(route: str, batches: Iterable[pa.RecordBatch], stats: JoinStats, task: str,
             threshold: float) -> EvalDataset:
    """The store's assembly inputs, built batch by batch, then `_assemble`."""
    names = _Names()
    rows: dict[str, list[Array]] = {}
    outs: dict[str, list[Array]] = {}
    arms: dict[str, list[Array]] = {}
    base = 0
    for batch in batches:
        for key, value in {
            "src": names.codes(batch["src"]), "pos": _np(batch["pos"], np.int64),
            "request_id": np.asarray(batch["request_id"].to_pylist(), dtype=object),
            "row_ix": _np(batch["row_ix"], np.int64), "ts": _np(batch["ts"]),
            "label": _np(batch["label"]), "reward": _np(batch["reward"]),
            "served": names.codes(batch["served"]), "propensity": _np(batch["propensity"]),
            "policy": names.codes(batch["policy"]),
            "registry_version": _np(batch["registry_version"], np.int64),
            "received_ts": _np(batch["received_ts"]),
        }.items():
            rows.setdefault(key, []).append(value)
        o_row, o = _flat(batch["outcomes"])
        for key, value in {
            "row": o_row + base, "model": names.codes(o.field("model")),
            "role": _np(o.field("role"), np.int64), "mode": _np(o.field("mode"), np.int64),
            "status": _np(o.field("status"), np.int64), "score": _np(o.field("score")),
            "latency_ms": _np(o.field("latency_ms")),
            "experiment": names.codes(o.field("experiment")),
            "sample_rate": _np(o.field("sample_rate")),
        }.items():
            outs.setdefault(key, []).append(value)
        a_row, a = _flat(batch["arms"])
        for key, value in {"row": a_row + base, "model": names.codes(a.field("model")),
                           "prob": _np(a.field("prob"))}.items():
            arms.setdefault(key, []).append(value)
        base += batch.num_rows
    # Column by column, dropping the parts as they are joined: memory peaks at one extra column.
    row_cols = {k: np.concatenate(rows.pop(k)) for k in list(rows)}
    rank = _rank(row_cols["src"], row_cols, names)
    order = np.argsort(rank)
    for k in list(row_cols):  # rows in rule-5 order, so _assemble has nothing to reorder
        row_cols[k] = row_cols[k][order]
    del order
    row_cols["id"] = np.arange(rank.size, dtype=np.int64)
    out_cols = {k: np.concatenate(outs.pop(k)) for k in list(outs)}
    out_cols["inf_id"] = rank[out_cols.pop("row")]
    arm_cols = {k: np.concatenate(arms.pop(k)) for k in list(arms)}
    arm_cols["inf_id"] = rank[arm_cols.pop("row")]
    del rank
    return _assemble(route, row_cols, out_cols, arm_cols, names.lookup(), stats, task,
                     threshold)
