"""Batch: the columnar buffer a parser fills and `Store.ingest` writes in one transaction."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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

