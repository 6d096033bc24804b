"""The joined, columnar view of one route's labelled requests that every statistic consumes.

The store (ingest + join) produces an `EvalDataset`; metrics, tests, off-policy estimators,
guardrails and the report only read it. Keeping it numpy-only makes the statistics easy to test
on simulated data without touching the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

Task = Literal["classification", "regression"]
Role = Literal["champion", "challenger"]

# Array aliases for the evaluator's signatures: the dtype is part of the contract (a float64
# score column, an int8 status column, an object column of str ids).
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
I8 = NDArray[np.int8]
Bool = NDArray[np.bool_]
Obj = NDArray[np.object_]
Array = NDArray[Any]  # any dtype: a fetched SQL column, a mask or an index
_A = TypeVar("_A", bound=Array)

# Outcome status codes stored in ModelColumn.status (see understudy.records.OutcomeStatus).
STATUS_CODES: dict[str, int] = {"ok": 0, "error": 1, "timeout": 2, "shed": 3, "skipped": 4}


@dataclass
class ModelColumn:
    """One model's view of the joined requests, aligned row-for-row with the dataset."""

    name: str
    role: Role
    scores: F64  # float64 [n]; NaN where status != ok (score = first element of the output)
    status: I8  # int8 [n], codes from STATUS_CODES
    latency_ms: F64  # float64 [n]; NaN where unknown
    modes: tuple[str, ...] = ()  # served / shadow / explore modes seen for this model
    # Challengers only (None for the champion or for records written before these fields):
    experiment: Obj | None = None  # object [n], the experiment id the copy belonged to
    sample_rate: F64 | None = None  # float64 [n], the challenger's sample rate; NaN unknown

    @property
    def ok(self) -> Bool:
        ok: Bool = self.status == STATUS_CODES["ok"]
        return ok


@dataclass
class JoinStats:
    """Bookkeeping the report shows so nobody mistakes a thin join for a thin effect."""

    inferences: int = 0  # distinct inference records in the window
    duplicate_inferences: int = 0  # at-least-once re-deliveries dropped
    labels: int = 0  # label records read
    duplicate_labels: int = 0  # second+ label for an id (policy: last wins)
    orphan_labels: int = 0  # labels whose id has no inference record (yet)
    expired_orphans: int = 0  # orphans dropped after the join window
    joined: int = 0  # requests with both an inference and a label


@dataclass(frozen=True)
class ExperimentInfo:
    """A challenger's current experiment: the verdict uses exactly its rows (never a window)."""

    id: str
    started: float  # unix seconds of its first logged request
    data_end: float  # unix seconds of its last logged request
    champion: str  # the champion it is compared with (a champion change starts a new one)
    registry_version: int  # the route's registry version at data_end (-1 unknown)


@dataclass
class EvalDataset:
    route: str
    task: Task
    champion: str  # the model that was champion for these requests (most recent if it changed)
    request_ids: Obj  # object [n]
    ts: F64  # float64 [n], unix seconds of the inference
    labels: F64  # float64 [n]; 0/1 for classification
    rewards: F64  # float64 [n]; NaN where no reward was given
    served: Obj  # object [n], model that answered the client
    propensity: F64  # float64 [n], probability of the served arm at decision time
    arm_probs: dict[str, F64]  # model -> float64 [n], its probability under the policy
    policy_types: Obj  # object [n], logging policy type per request
    models: dict[str, ModelColumn]  # champion and every challenger that scored these requests
    threshold: float = 0.5
    stats: JoinStats = field(default_factory=JoinStats)
    registry_version: I64 | None = None  # int64 [n], route registry version; -1 unknown
    label_ts: F64 | None = None  # float64 [n], label receipt time; NaN unknown
    experiments: dict[str, ExperimentInfo] = field(default_factory=dict)  # challenger -> current

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def challengers(self) -> list[str]:
        return [m for m in self.models if m != self.champion]

    def take(self, rows: Array | slice) -> EvalDataset:
        """The same dataset restricted to ``rows`` (a mask, indices or a slice) — one
        experiment's rows, or a past report's view in a simulation. Every per-row array moves."""

        def cut(a: _A | None) -> _A | None:
            return None if a is None else cast(_A, a[rows])  # indexing keeps the dtype

        models = {
            k: replace(
                m,
                scores=m.scores[rows],
                status=m.status[rows],
                latency_ms=m.latency_ms[rows],
                experiment=cut(m.experiment),
                sample_rate=cut(m.sample_rate),
            )
            for k, m in self.models.items()
        }
        return replace(
            self,
            request_ids=self.request_ids[rows],
            ts=self.ts[rows],
            labels=self.labels[rows],
            rewards=self.rewards[rows],
            served=self.served[rows],
            propensity=self.propensity[rows],
            arm_probs={k: v[rows] for k, v in self.arm_probs.items()},
            policy_types=self.policy_types[rows],
            models=models,
            registry_version=cut(self.registry_version),
            label_ts=cut(self.label_ts),
        )
