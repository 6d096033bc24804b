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

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evaluator.config import EvaluatorConfig
from evaluator.dataset import EvalDataset, ExperimentInfo, JoinStats
from evaluator.lake import layout
from evaluator.lake.storage import Lake
from evaluator.store import (
    DAY,
    ROLE_CODES,
    DatasetReads,
    EmptyDatasetError,
    StoreError,
    _assemble,
    _fmt_ts,
    latest_experiments,
    window_sql,
)

# Every inference row, with the identity of its copy (file, row) for rules 1 and 2.
_INF = ("read_parquet({files}, filename=true, file_row_number=true, hive_partitioning=false, "
        "union_by_name=true)")
_LOSERS = """
SELECT filename, file_row_number FROM (
    SELECT filename, file_row_number, row_number() OVER (
        PARTITION BY request_id, row_ix ORDER BY src, pos, filename, file_row_number) AS k
    FROM {inf} SEMI JOIN (
        SELECT request_id, row_ix FROM {inf} WHERE {cond}
        GROUP BY request_id, row_ix HAVING count(*) > 1) d USING (request_id, row_ix)
    WHERE {cond})
WHERE k > 1
"""
_LABELS = """
SELECT request_id, row_ix, arg_max(label, k) AS label, arg_max(reward, k) AS reward,
       arg_max(has_label, k) AS has_label, arg_max(received_ts, k) AS received_ts,
       count(DISTINCT (src, pos)) AS n
FROM (SELECT *, (received_ts, src, pos) AS k FROM {labels}) GROUP BY request_id, row_ix
"""


class LakeReader(DatasetReads):
    """Read-only access to a landing zone with the store's read API (the parts `report` uses)."""

    def __init__(self, lake: Lake, *, join_window: float = 14 * DAY, memory_limit: str = "",
                 threads: int = 0) -> None:
        import duckdb

        self.lake = lake
        self.join_window = float(join_window)
        self._lock = threading.RLock()
        self.con = duckdb.connect()
        if memory_limit:
            self.con.execute(f"SET memory_limit = '{memory_limit}'")
        if threads > 0:
            self.con.execute(f"SET threads = {int(threads)}")
        if not lake.local:
            self.con.register_filesystem(lake.fs)
        self._views: dict[str, str] = {}

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
        return [self.lake.uri(p) for p in self.lake.files(table, route)]

    def _rel(self, table: str, route: str | None = None) -> str | None:
        """A FROM-clause over a table's files (one route's inferences); None when empty."""
        files = self._files(table, route)
        if not files:
            return None
        listed = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        if table == layout.INFERENCES:
            return _INF.format(files=listed)
        return f"read_parquet({listed}, hive_partitioning=false, union_by_name=true)"

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.con.execute(sql, list(params)).fetchall()

    def _arrow(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        with self._lock:
            return self.con.sql(sql, params=list(params)).to_arrow_table()

    def _winners(self, route: str, since: float | None, until: float | None
                 ) -> tuple[str, list[Any]] | None:
        """A FROM-clause of the route's inference winners (rules 1-2) in the window."""
        inf = self._rel(layout.INFERENCES, route)
        if inf is None:
            return None
        cond, params = window_sql(since, until)
        losers = _LOSERS.format(inf=inf, cond=cond)
        sql = (f"(SELECT * FROM {inf} ANTI JOIN ({losers}) x "  # noqa: S608 - file names, quoted
               f"USING (filename, file_row_number) WHERE {cond})")
        return sql, params * 3

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
        labels = self._rel(layout.LABELS)
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
            f"WITH l AS ({_LABELS.format(labels=labels)}), o AS (SELECT * FROM l "  # noqa: S608
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
        win = self._winners(route, since, until)
        (orphans, _), (expired, _) = self._orphans()
        if win is None:
            return JoinStats(orphan_labels=orphans, expired_orphans=expired)
        sql, params = win
        inf = self._rel(layout.INFERENCES, route)
        cond, wparams = window_sql(since, until)
        n_inf = self._query(f"SELECT count(*) FROM {sql}", params)[0][0]  # noqa: S608
        n_dups = self._query(
            f"SELECT coalesce(sum(k - 1), 0) FROM (SELECT count(DISTINCT (src, pos)) AS k "  # noqa: S608
            f"FROM {inf} WHERE row_ix = 0 AND {cond} GROUP BY request_id)", wparams)[0][0]
        joined, n_labels, n_dup_labels = 0, 0, 0
        labels = self._rel(layout.LABELS)
        if labels is not None:
            joined_cond = "l.has_label" if require_label else "true"
            joined, n_labels, n_dup_labels = self._query(
                f"SELECT coalesce(sum(CASE WHEN {joined_cond} THEN 1 ELSE 0 END), 0), "  # noqa: S608
                "coalesce(sum(l.n), 0), coalesce(sum(l.n - 1), 0) "
                f"FROM {sql} i JOIN ({_LABELS.format(labels=labels)}) l "
                "USING (request_id, row_ix)", params)[0]
        return JoinStats(
            inferences=int(n_inf), duplicate_inferences=int(n_dups), labels=int(n_labels),
            duplicate_labels=int(n_dup_labels), orphan_labels=orphans, expired_orphans=expired,
            joined=int(joined))

    def load_dataset(self, route: str, since: float | None = None, until: float | None = None,
                     *, task: str = "auto", threshold: float = 0.5,
                     require_label: bool = True) -> EvalDataset:
        """The joined, labelled predictions of a route in [since, until), as the store's."""
        stats = self.join_stats(route, since, until, require_label=require_label)
        if stats.joined == 0:
            raise EmptyDatasetError(self._empty_message(route, since, until, stats), stats)
        sql, params = self._winners(route, since, until)  # type: ignore[misc]
        labels = self._rel(layout.LABELS)
        cond = "WHERE l.has_label" if require_label else ""
        table = self._arrow(
            "SELECT i.request_id, i.row_ix, i.ts, i.src, i.pos, i.served, i.propensity, "  # noqa: S608
            "i.policy, coalesce(i.registry_version, -1) AS registry_version, i.outcomes, "
            "i.arms, l.label, l.reward, l.received_ts "
            f"FROM {sql} i JOIN ({_LABELS.format(labels=labels)}) l "
            f"USING (request_id, row_ix) {cond}", params)
        return _dataset(route, table, stats, task, threshold)

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

    def codes(self, column: pa.ChunkedArray | pa.Array, missing: int = -1) -> np.ndarray:
        encoded = pc.dictionary_encode(column)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        vocab = np.asarray([self.ids.setdefault(str(v), len(self.ids))
                            for v in encoded.dictionary.to_pylist()] + [missing],
                           dtype=np.int64)
        idx = encoded.indices.fill_null(len(vocab) - 1)
        return vocab[np.asarray(idx, dtype=np.int64)]

    def lookup(self) -> np.ndarray:
        table = np.full(len(self.ids), "", dtype=object)
        for name, i in self.ids.items():
            table[i] = name
        return table


def _np(column: pa.ChunkedArray | pa.Array, dtype: Any = np.float64) -> np.ndarray:
    """A numeric Arrow column as numpy (NULL -> NaN for floats)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_floating(column.type):
        return np.asarray(column.fill_null(np.nan), dtype=dtype)
    return np.asarray(column.fill_null(-1), dtype=dtype)


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.StructArray]:
    """A list column's elements and the row each belongs to."""
    lists = column.combine_chunks()
    return (np.asarray(pc.list_parent_indices(lists), dtype=np.int64),
            pc.list_flatten(lists))


def _dataset(route: str, table: pa.Table, stats: JoinStats, task: str,
             threshold: float) -> EvalDataset:
    names = _Names()
    ts = _np(table["ts"])
    src = names.codes(table["src"])
    # Rule 5: rank by (ts, src, pos, row_ix); src codes rank as the strings do.
    lookup = names.lookup()
    src_rank = np.argsort(np.argsort(lookup, kind="stable"), kind="stable")[src]
    order = np.lexsort((_np(table["row_ix"], np.int64), _np(table["pos"], np.int64), src_rank,
                        ts))
    ids = np.empty(order.size, dtype=np.int64)
    ids[order] = np.arange(order.size)
    rows = {
        "id": ids, "request_id": np.asarray(table["request_id"].to_pylist(), dtype=object),
        "row_ix": _np(table["row_ix"], np.int64), "ts": ts, "label": _np(table["label"]),
        "reward": _np(table["reward"]), "served": names.codes(table["served"]),
        "propensity": _np(table["propensity"]), "policy": names.codes(table["policy"]),
        "registry_version": _np(table["registry_version"], np.int64),
        "received_ts": _np(table["received_ts"]),
    }
    o_row, o = _flat(table["outcomes"])
    outs = {
        "inf_id": ids[o_row], "model": names.codes(o.field("model")),
        "role": _np(o.field("role"), np.int64), "mode": _np(o.field("mode"), np.int64),
        "status": _np(o.field("status"), np.int64), "score": _np(o.field("score")),
        "latency_ms": _np(o.field("latency_ms")),
        "experiment": names.codes(o.field("experiment")),
        "sample_rate": _np(o.field("sample_rate")),
    }
    a_row, a = _flat(table["arms"])
    arms = {"inf_id": ids[a_row], "model": names.codes(a.field("model")),
            "prob": _np(a.field("prob"))}
    return _assemble(route, rows, outs, arms, names.lookup(), stats, task, threshold)

