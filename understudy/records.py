"""The inference log record, schema v1: the contract between the gateway and the evaluator.

One record per served request, JSON-encoded with orjson, keyed by request id. Field reference
(this docstring is the reference; the evaluator's reader is evaluator/ingest.py):

    schema_version   1
    kind             "inference"
    request_id       str, the client's `id`, its X-Request-Id header, or a generated 32-hex id
    ts               float, unix seconds when the gateway received the request
    route            str, the logical endpoint the client called
    registry_version int, the route's registry version whose config served the request
                     (optional: absent in records written before it existed)
    policy           {"type": "champion"|"epsilon_greedy"|"thompson", ...its parameters}
    served           {"model": str, "version": str}   the arm whose answer the client got
    propensity       float in (0, 1], probability the policy gave the served arm at decision time
    arms             {model: probability} for every arm the policy chose among (champion policy:
                     {champion: 1.0})
    key              str | null, the sticky/sampling key (e.g. a user id) when one was given
    inputs           {name: Tensor} the request's input tensors (binary tensors decoded)
    outputs          {model: ModelOutcome} for the served model and every challenger
    status           int, the HTTP status the client got
    gateway_latency_ms  float, receipt of the request to the response being handed to the client
    protocol         "http" | "grpc", the transport that carried the request (optional: absent
                     in records written before gRPC existed; readers take absent as "http").
                     `status` is the HTTP status either way (gRPC maps it, gateway/errors.py)

    Tensor        = {"datatype": str, "shape": [int], "data": [number | str | bool]}  (flat)
    ModelOutcome  = {"role": "champion"|"challenger", "mode": "served"|"shadow"|"explore",
                     "version": str, "status": "ok"|"error"|"timeout"|"shed"|"skipped",
                     "latency_ms": float | null, "outputs": {name: Tensor} | null,
                     "error": str | null, "batch_rows": int (optional),
                     "experiment": str (challengers only), "sample_rate": float (challengers only)}

    experiment / sample_rate are on every *challenger's* outcome (never the champion's): the
    challenger's current experiment id (gateway/control/state.py `Experiment`; a new one starts
    when it is added, its mode / sample rate / version changes, or the route's policy or
    champion changes) and its configured sample rate in that experiment. The experiment's start
    time is in the registry (`GET /admin/routes/{route}`) and in the audit entry that started
    it (`experiments: {model: {id, started}}`). Both are optional for readers: older records
    lack them.

    batch_rows is present only on a shadow copy that shared its Triton call with other copies
    (micro-batching, gateway/mirror/shadow.py): the call's row count. Its latency_ms is that
    call's, so
    it is not comparable with a single request's; the evaluator leaves such latencies out of
    latency statistics (each batching lane sends every `latency_probe_every`-th copy alone).

Labels (stream "labels") are `{"schema_version": 1, "kind": "label", "request_id", "label",
"reward", "event_time", "received_ts", "index"}`. `reward` is the reward the gateway computed
for the route's exploring policy from this label (`policy.reward`: correct | label | reward)
when the replica that received the label served the request under that policy and still
remembers it; otherwise the reward the client posted, otherwise null. Audit entries (stream
"audit") are `{"schema_version": 1, "kind": "audit", ...}`, with `experiments` when the change
started any.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

SCHEMA_VERSION = 1

INFERENCES = "inferences"
LABELS = "labels"
AUDIT = "audit"
STREAMS = (INFERENCES, LABELS, AUDIT)

OutcomeStatus = Literal["ok", "error", "timeout", "shed", "skipped"]
Transport = Literal["http", "grpc"]  # which adapter carried a request (the record's `protocol`)


class Tensor(TypedDict):
    datatype: str
    shape: list[int]
    data: list[Any]


class ModelOutcome(TypedDict):
    role: Literal["champion", "challenger"]
    mode: Literal["served", "shadow", "explore"]
    version: str
    status: OutcomeStatus
    latency_ms: float | None
    outputs: dict[str, Tensor] | None
    error: str | None
    batch_rows: NotRequired[int]
    experiment: NotRequired[str]
    sample_rate: NotRequired[float]


class ServedModel(TypedDict):
    model: str
    version: str


class InferenceRecord(TypedDict):
    schema_version: int
    kind: Literal["inference"]
    request_id: str
    ts: float
    route: str
    registry_version: NotRequired[int]
    policy: dict[str, Any]
    served: ServedModel
    propensity: float
    arms: dict[str, float]
    key: str | None
    inputs: dict[str, Tensor]
    outputs: dict[str, ModelOutcome]
    status: int
    gateway_latency_ms: float
    protocol: NotRequired[Transport]


class LabelRecord(TypedDict):
    schema_version: int
    kind: Literal["label"]
    request_id: str
    label: float | int | None
    reward: float | None
    event_time: float
    received_ts: float
    index: NotRequired[int]
