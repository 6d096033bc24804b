"""Parsed records as Arrow tables in the landing zone's layout, one table per partition.

`LakeBatch` is the store's columnar `Batch` with three differences the lake needs: every row
carries its source position (`src`, `pos`), nothing is de-duplicated (the read rules in
layout.py do that, so a replay is recognisable), and every label and rejected record is a row.
It is filled by fastparse.py's `FastParser`, which hands every record it does not handle to the
store's very `RecordParser` (same validation, scores and bad-record reasons, same columns).
`tables()` turns it into Arrow tables split by partition, each column converted by its type in
the layout's schemas, with numpy doing the per-row work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from evaluator.dataset import Array
from evaluator.lake import layout
from evaluator.store import Batch


@dataclass
class LakeBatch(Batch):
    """A `Batch` that keeps every record, with where it was read (see the module docstring)."""

    at_src: str = ""
    at_pos: int = 0
    records: int = 0  # inference records (a batched request counts once)
    src: list[str] = field(default_factory=list)  # per prediction row
    pos: list[int] = field(default_factory=list)
    # one entry per label record
    l_request_id: list[str] = field(default_factory=list)
    l_row_ix: list[int] = field(default_factory=list)
    l_label: list[float] = field(default_factory=list)
    l_reward: list[float] = field(default_factory=list)
    l_has_label: list[bool] = field(default_factory=list)
    l_event_time: list[float] = field(default_factory=list)
    l_received_ts: list[float] = field(default_factory=list)
    l_src: list[str] = field(default_factory=list)
    l_pos: list[int] = field(default_factory=list)
    # one entry per rejected or ignored record
    r_reason: list[str] = field(default_factory=list)
    r_src: list[str] = field(default_factory=list)
    r_pos: list[int] = field(default_factory=list)

    def at(self, src: str, pos: int) -> None:
        """The source position of the record parsed next."""
        self.at_src, self.at_pos = src, pos

    def __len__(self) -> int:
        """Records held (rows of a batched request count once)."""
        return self.records + len(self.l_request_id) + len(self.r_reason)

    def seen(self, request_id: str) -> bool:
        return False  # keep re-deliveries: read rule 2 counts them by source position

    def start_record(self, request_id: str) -> None:
        self.records += 1

    def add_row(self, request_id: str, row: int, route: str, ts: float, policy: str,
                served: str, propensity: float, sticky_key: str | None, status: int,
                gateway_latency_ms: float, registry_version: int = -1) -> int:
        self.src.append(self.at_src)
        self.pos.append(self.at_pos)
        return super().add_row(request_id, row, route, ts, policy, served, propensity,
                               sticky_key, status, gateway_latency_ms, registry_version)

    def add_label(self, request_id: str, row: int, label: float | None, reward: float | None,
                  event_time: float, received_ts: float) -> None:
        self.l_request_id.append(request_id)
        self.l_row_ix.append(row)
        self.l_label.append(math.nan if label is None else label)
        self.l_reward.append(math.nan if reward is None else reward)
        self.l_has_label.append(label is not None)
        self.l_event_time.append(event_time)
        self.l_received_ts.append(received_ts)
        self.l_src.append(self.at_src)
        self.l_pos.append(self.at_pos)
        if received_ts > self.watermark:
            self.watermark = received_ts

    def reject(self, reason: str) -> None:
        super().reject(reason)
        self._reject_row(f"bad:{reason}")

    def ignore(self) -> None:
        super().ignore()
        self._reject_row("ignored")

    def _reject_row(self, reason: str) -> None:
        self.r_reason.append(reason)
        self.r_src.append(self.at_src)
        self.r_pos.append(self.at_pos)

    # -- Arrow ------------------------------------------------------------------------------

    def tables(self, today: str) -> list[tuple[str, pa.Table]]:
        """(partition directory, table) for every non-empty partition; rejects go to `today`."""
        out: list[tuple[str, pa.Table]] = []
        if self.request_id:
            inf = self._inference_table()
            out += [(layout.partition_dir(layout.INFERENCES, date, route), _rows(inf, ix))
                    for route, date, ix in _partitions(self.ts, self.route)]
        if self.l_request_id:
            lab = pa.table({
                "request_id": self.l_request_id, "row_ix": self.l_row_ix, "label": self.l_label,
                "reward": self.l_reward, "has_label": self.l_has_label,
                "event_time": self.l_event_time, "received_ts": self.l_received_ts,
                "src": self.l_src, "pos": self.l_pos,
            }, schema=layout.LABEL_SCHEMA)
            out += [(layout.partition_dir(layout.LABELS, date), _rows(lab, ix))
                    for _, date, ix in _partitions(self.l_received_ts)]
        if self.r_reason:
            rej = pa.table({"reason": self.r_reason, "src": self.r_src, "pos": self.r_pos},
                           schema=layout.REJECT_SCHEMA)
            out.append((layout.partition_dir(layout.REJECTS, today), rej))
        return out

    def _inference_table(self) -> pa.Table:
        n = len(self.request_id)
        outcomes = _lists(n, self.o_pos, layout.OUTCOME, [
            self.o_model, self.o_role, self.o_mode, self.o_version, self.o_status, self.o_score,
            self.o_latency, self.o_experiment, self.o_sample_rate])
        arms = _lists(n, self.a_pos, layout.ARM, [self.a_model, self.a_prob])
        inputs = _lists(n, self.x_pos, layout.INPUT, [
            self.x_name, self.x_dtype, self.x_width, self.x_num, self.x_cat])
        return pa.table({
            "request_id": self.request_id, "row_ix": self.row_ix, "ts": self.ts,
            "policy": self.policy, "served": self.served, "propensity": self.propensity,
            "sticky_key": self.sticky_key, "status": self.status,
            "gateway_latency_ms": self.gateway_latency_ms,
            "registry_version": self.registry_version,
            "outcomes": outcomes, "arms": arms, "inputs": inputs,
            "src": self.src, "pos": self.pos,
        }, schema=layout.INFERENCE_SCHEMA)


def _lists(n: int, owner: list[int], struct: pa.StructType, children: list[list[Any]]
           ) -> pa.ListArray:
    """Child rows (in owner order, as the parser appends them) as a list per parent row;
    `children` holds the struct's columns, in its field order."""
    owners = np.asarray(owner, dtype=np.int64)
    offsets = np.searchsorted(owners, np.arange(n + 1), side="left").astype(np.int32)
    fields = list(struct)
    values = pa.StructArray.from_arrays(
        [pa.array(column, f.type) for column, f in zip(children, fields, strict=True)],
        fields=fields)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values,
                                    type=pa.list_(struct))


def _partitions(ts: list[float], routes: list[str] | None = None
                ) -> list[tuple[str | None, str, Array | None]]:
    """(route, UTC date YYYY-MM-DD, row indices) per distinct (route, date of `ts`), in
    first-seen order; indices None when every row is in the one partition (no copy then).
    Grouped by integer codes: only each partition's date is formatted."""
    days = np.floor(np.asarray(ts, dtype=np.float64) / 86400.0).astype("int64")
    day_values, key = np.unique(days, return_inverse=True)
    names: list[str | None] = [None]
    if routes is not None:
        encoded = pa.array(routes, pa.string()).dictionary_encode()
        names = encoded.dictionary.to_pylist()
        key = encoded.indices.to_numpy().astype(np.int64) * len(day_values) + key
    uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    dates = np.datetime_as_string(day_values.astype("datetime64[D]"), unit="D")
    if len(uniq) == 1:
        k = int(uniq[0])
        return [(names[k // len(day_values)], str(dates[k % len(day_values)]), None)]
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    out: list[tuple[str | None, str, Array | None]] = []
    for g in np.argsort(first):
        k = int(uniq[g])
        out.append((names[k // len(day_values)], str(dates[k % len(day_values)]),
                    order[bounds[g]:bounds[g + 1]]))
    return out


def _rows(table: pa.Table, ix: Array | None) -> pa.Table:
    return table if ix is None else table.take(pa.array(ix))
