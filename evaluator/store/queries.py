"""The SQL reads behind the statistics and drift: join bookkeeping, a route's labelled rows,
its current experiments, its input features and its score series.

Each function takes an open engine (the caller holds the store's lock) and returns the fetched
columns; `evaluator.store.assembly` turns them into datasets, frames and series after the lock
is released.

Experiments: `current_experiments(route)` is each challenger's most recently started experiment
with the route's current champion (the champion on its newest row): started = its first record's
ts, data_end = its last, registry_version = the highest seen in its rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evaluator.dataset import Array, ExperimentInfo, JoinStats
from evaluator.store.assembly import RowIndex, latest_experiments
from evaluator.store.engines import Engine, as_numbers
from evaluator.store.errors import fmt_ts
from evaluator.store.names import NameTable
from evaluator.store.schema import ROLE_CODES

DAY = 86400.0


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


def window(route: str, since: float | None, until: float | None) -> tuple[str, list[Any]]:
    """Half-open [since, until) on the inference ts of one route."""
    return window_sql(since, until, "i.ts", ["i.route = ?"], [route])


def join_stats(e: Engine, route: str, since: float | None, until: float | None,
               require_label: bool) -> JoinStats:
    where, params = window(route, since, until)
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


def empty_message(e: Engine, route: str, since: float | None, until: float | None,
                  stats: JoinStats, join_window: float) -> str:
    """Why a window has no labelled rows: no inferences at all, or labels not there yet."""
    span = f"[{fmt_ts(since)}, {fmt_ts(until)})"
    if stats.inferences == 0:
        known = sorted(str(r) for (r,) in e.query("SELECT DISTINCT route FROM inferences"))
        return (f"route {route!r}: no inferences in {span}. Routes in the store: "
                f"{', '.join(known) or 'none (nothing ingested yet)'}.")
    return (f"route {route!r}: {stats.inferences} inferences in {span} but none has a "
            f"label yet ({stats.orphan_labels} orphan label(s) store-wide wait for their "
            f"inference; the join window is {join_window / DAY:g}d). Labels may not "
            f"have arrived: widen the window or wait.")


def labelled_columns(e: Engine, route: str, since: float | None, until: float | None,
                     require_label: bool) -> tuple[dict[str, Array], dict[str, Array],
                                                   dict[str, Array]]:
    """(rows, outcomes, arms) columns of the window's joined predictions.

    Ids are assigned in ingest order, so the window's outcomes sit in one id range: a range
    scan plus a numpy lookup is cheaper than joining 3 tables again.
    """
    where, params = window(route, since, until)
    cond = " AND l.has_label" if require_label else ""
    rows = e.columns(
        "SELECT i.id, i.request_id, i.row_ix, i.ts, l.label, l.reward, i.served, "  # noqa: S608
        "i.propensity, i.policy, COALESCE(i.registry_version, -1) AS registry_version, "
        "l.received_ts "
        f"FROM inferences i JOIN labels l ON l.inf_id = i.id WHERE {where}{cond}", params)
    index = RowIndex(as_numbers(rows["id"], np.int64))
    span = [index.lo, index.hi]
    outs = e.columns("SELECT inf_id, model, role, mode, status, score, latency_ms, "
                     "COALESCE(experiment, -1) AS experiment, sample_rate FROM outcomes "
                     "WHERE inf_id BETWEEN ? AND ?", span)
    arms = e.columns("SELECT inf_id, model, prob FROM arms WHERE inf_id BETWEEN ? AND ?", span)
    return rows, outs, arms


def current_experiments(e: Engine, names: NameTable, route: str) -> dict[str, ExperimentInfo]:
    """Each challenger's current experiment on the route (see the module docstring)."""
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
    lookup = names.lookup(e)
    return latest_experiments(
        str(lookup[int(newest[0][0])]),
        [(str(lookup[int(m)]), str(lookup[int(x)]), s, d, v) for m, x, s, d, v in groups])


def feature_rows(e: Engine, names: NameTable, route: str, since: float | None,
                 until: float | None
                 ) -> tuple[dict[str, Array], RowIndex, dict[str, Array], Array]:
    """(every prediction in the window in time order, its index, the input rows of its id
    range, the name lookup): what `assembly.features_of` turns into a FeatureFrame."""
    where, params = window(route, since, until)
    rows = e.columns(f"SELECT i.id, i.request_id, i.row_ix, i.ts FROM inferences i "  # noqa: S608
                     f"WHERE {where}", params)
    ids = as_numbers(rows["id"], np.int64)
    order = np.lexsort((ids, as_numbers(rows["ts"])))
    rows = {k: v[order] for k, v in rows.items()}
    index = RowIndex(ids[order])
    inputs = e.columns("SELECT inf_id, name, datatype, width, num, cat FROM inputs "
                       "WHERE inf_id BETWEEN ? AND ?", [index.lo, index.hi])
    return rows, index, inputs, names.lookup(e)


def score_rows(e: Engine, names: NameTable, route: str, since: float | None,
               until: float | None) -> tuple[dict[str, Array], Array]:
    """(ok-status scores of every prediction in the window, the name lookup): what
    `assembly.scores_of` turns into score series."""
    where, params = window(route, since, until)
    outs = e.columns(
        "SELECT o.model, o.role, o.score, i.ts, i.id FROM outcomes o "  # noqa: S608
        f"JOIN inferences i ON i.id = o.inf_id WHERE {where} AND o.status = 0", params)
    return outs, names.lookup(e)
