"""Writing a parsed batch: dedup of re-delivered records, eager label join, counters, meta.

Join semantics (what the writes guarantee):
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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from evaluator.dataset import I64, Array
from evaluator.store.batch import Batch, IngestResult
from evaluator.store.engines import Engine, as_f64, as_i64, as_obj
from evaluator.store.errors import fmt_ts
from evaluator.store.names import NameTable

log = logging.getLogger(__name__)

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


def ingest_batch(e: Engine, names: NameTable, b: Batch, offsets: Mapping[str, str]
                 ) -> IngestResult:
    """Write one parsed batch and its source positions inside the caller's transaction."""
    names.intern(e, {*b.o_model, *b.a_model, *b.served, *b.policy, *b.o_version,
                     *b.x_name, *b.x_dtype, *(x for x in b.o_experiment if x is not None)})
    rec_ids = list(b.rec_index)
    existing: set[str] = set()
    if rec_ids:
        e.stage("s_rids", {"request_id": as_obj(rec_ids)})
        existing = {r for (r,) in e.query(
            "SELECT DISTINCT i.request_id FROM s_rids s "
            "JOIN inferences i ON i.request_id = s.request_id AND i.row_ix = 0")}
    dups: dict[str, int] = {rid: b.rec_dups.get(rid, 0) + 1 for rid in existing}
    for rid, k in b.rec_dups.items():
        dups.setdefault(rid, k)
    if existing:
        # Re-deliveries of stored records: count them on the stored row 0, store nothing.
        e.stage("s_dups", {"request_id": as_obj(list(existing)),
                           "n": as_i64([dups[r] for r in existing])})
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
        _insert_rows(e, names, b, new_pos, pos_to_id, dups)

    if b.labels:
        keys = list(b.labels)
        vals = list(b.labels.values())
        e.stage("s_labels", {
            "request_id": as_obj([k[0] for k in keys]),
            "row_ix": as_i64([k[1] for k in keys]),
            "label": as_f64([v[0] for v in vals]),
            "reward": as_f64([v[1] for v in vals]),
            "has_label": np.asarray([v[2] for v in vals], dtype=bool),
            "event_time": as_f64([v[3] for v in vals]),
            "received_ts": as_f64([v[4] for v in vals]),
            "n": as_i64([v[5] for v in vals]),
        })
        e.execute(_LABEL_UPSERT)

    bad = sum(b.bad.values())
    counts = {f"bad:{reason}": k for reason, k in b.bad.items()}
    counts.update({"bad_records": bad, "ignored_records": b.ignored})
    add_counters(e, {k: v for k, v in counts.items() if v})
    for source, pos in offsets.items():
        e.execute("INSERT INTO offsets VALUES (?, ?) ON CONFLICT (source) "
                  "DO UPDATE SET pos = excluded.pos", [source, pos])
    if b.watermark > -math.inf:
        old = meta_float(e, "watermark")
        if old is None or b.watermark > old:
            set_meta(e, "watermark", repr(b.watermark))
    return IngestResult(
        records=len(rec_ids) - len(existing), rows=new_rows,
        duplicates=sum(dups.values()), labels=b.label_records, bad=bad, ignored=b.ignored,
    )


def _insert_rows(e: Engine, names: NameTable, b: Batch, new_pos: I64, pos_to_id: I64,
                 dups: Mapping[str, int]) -> None:
    req = as_obj(b.request_id)[new_pos]
    row_ix = as_i64(b.row_ix)[new_pos]
    dup_col = np.zeros(new_pos.size, dtype=np.int64)
    if dups:
        first = row_ix == 0
        dup_col[first] = [dups.get(r, 0) for r in req[first]]
    e.insert("inferences", {
        "id": pos_to_id[new_pos],
        "request_id": req,
        "row_ix": row_ix,
        "route": as_obj(b.route)[new_pos],
        "ts": as_f64(b.ts)[new_pos],
        "policy": names.ids(b.policy)[new_pos],
        "served": names.ids(b.served)[new_pos],
        "propensity": as_f64(b.propensity)[new_pos],
        "sticky_key": as_obj(b.sticky_key)[new_pos],
        "status": as_i64(b.status)[new_pos],
        "gateway_latency_ms": as_f64(b.gateway_latency_ms)[new_pos],
        "dups": dup_col,
        "registry_version": as_i64(b.registry_version)[new_pos],
    })
    if b.o_pos:
        _insert_linked(e, "outcomes", pos_to_id[as_i64(b.o_pos)], {
            "model": names.ids(b.o_model),
            "role": as_i64(b.o_role),
            "mode": as_i64(b.o_mode),
            "version": names.ids(b.o_version),
            "status": as_i64(b.o_status),
            "score": as_f64(b.o_score),
            "latency_ms": as_f64(b.o_latency),
            "experiment": names.optional_ids(b.o_experiment),
            "sample_rate": as_f64(b.o_sample_rate),
        })
    if b.a_pos:
        _insert_linked(e, "arms", pos_to_id[as_i64(b.a_pos)], {
            "model": names.ids(b.a_model), "prob": as_f64(b.a_prob)})
    if b.x_pos:
        _insert_linked(e, "inputs", pos_to_id[as_i64(b.x_pos)], {
            "name": names.ids(b.x_name),
            "datatype": names.ids(b.x_dtype),
            "width": as_i64(b.x_width),
            "num": as_obj(b.x_num),
            "cat": as_obj(b.x_cat),
        })
    # Labels that arrived before their inference: join them now.
    e.stage("s_new", {"id": pos_to_id[new_pos], "request_id": req, "row_ix": row_ix})
    e.execute("UPDATE labels SET inf_id = s.id FROM s_new s WHERE labels.inf_id IS NULL "
              "AND labels.request_id = s.request_id AND labels.row_ix = s.row_ix")


def _insert_linked(e: Engine, table: str, ids: I64, cols: Mapping[str, Array]) -> None:
    """Insert rows that belong to an inference row: `ids` is that row's id, -1 where it was not
    written (a re-delivered record), and those rows are left out of every column."""
    keep = ids >= 0
    e.insert(table, {"inf_id": ids[keep], **{k: v[keep] for k, v in cols.items()}})


def add_counters(e: Engine, counts: Mapping[str, int]) -> None:
    for name, amount in counts.items():
        e.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) "
                  "DO UPDATE SET amount = counters.amount + excluded.amount",
                  [name, int(amount)])


def meta_float(e: Engine, key: str) -> float | None:
    row = e.query("SELECT val FROM meta WHERE key = ?", [key])
    return float(row[0][0]) if row else None


def set_meta(e: Engine, key: str, value: str) -> None:
    e.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET val = "
              "excluded.val", [key, value])


def expire_orphans(e: Engine, now: float | None, join_window: float) -> int:
    """Delete orphan labels received more than `join_window` before `now` (default: the
    watermark); returns the label records expired, added to the `expired_orphans` counter."""
    ref = now if now is not None else meta_float(e, "watermark")
    if ref is None:
        return 0
    cutoff = ref - join_window
    where = "inf_id IS NULL AND received_ts < ?"
    ids, records = e.query(f"SELECT COUNT(*), COALESCE(SUM(n), 0) FROM labels "  # noqa: S608
                           f"WHERE {where}", [cutoff])[0]
    if ids:
        e.execute(f"DELETE FROM labels WHERE {where}", [cutoff])  # noqa: S608
        add_counters(e, {"expired_orphans": int(records), "expired_orphan_ids": int(ids)})
        log.info("expired %d orphan label(s) received before %s (join window %.0fs)",
                 records, fmt_ts(cutoff), join_window)
    return int(records)

