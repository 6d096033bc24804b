"""The inference log record, schema v1: the contract between the gateway and the evaluator.

One record per served request, JSON-encoded with orjson, keyed by request id. Field reference
(this docstring is the reference). The types below are the written form: the gateway builds
them (gateway/dataplane/recorder.py, gateway/rest/feedback.py) and serialises them once; the
evaluator reads them back through understudy/reader.py into the same vocabulary
(understudy/vocabulary.py).

    schema_version   1
    kind             "inference"
    request_id       str, the client's `id`, its X-Request-Id header, or a generated 32-hex id
    ts               float, unix seconds when the gateway received the request; every record
                     time (`ts`, a label's `event_time` and `received_ts`) is within
                     MIN_TIME <= t < MAX_TIME (1970-01-01 up to the end of 9999, UTC)
    route            str, the logical endpoint the client called
    registry_version int, the route's registry version whose config served the request
                     (optional: absent in records written before it existed)
    policy           {"type": "champion"|"epsilon_greedy"|"thompson"|"rollout", ...its parameters}
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
    task             "classification" | "regression", the route's task (optional)
    error            str, why the client got an error status (optional)
    fallback         true when the route's fallback challenger answered (optional)

    Tensor        = {"datatype": str, "shape": [int], "data": [number | str | bool]}  (flat)
    ModelOutcome  = {"role": "champion"|"challenger",
                     "mode": "served"|"shadow"|"explore"|"replay",
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

    mode "replay" is never written by the gateway: `python -m evaluator replay` sends logged
    inputs to a challenger offline and writes its outcome so (evaluator/replay/).

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

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, NotRequired, TypedDict

from understudy.vocabulary import Mode, OutcomeStatus, Role, Task, Transport

if TYPE_CHECKING:
    import orjson

SCHEMA_VERSION: Final = 1

INFERENCES: Final = "inferences"
LABELS: Final = "labels"
AUDIT: Final = "audit"
STREAMS: Final = (INFERENCES, LABELS, AUDIT)
# The Kafka topic of each stream unless configured otherwise (gateway log.kafka.*_topic,
# evaluator source.kafka.*_topic): the defaults both programs must agree on.
DEFAULT_TOPICS: Final[dict[str, str]] = {stream: f"understudy.{stream}" for stream in STREAMS}

__all__ = ["AUDIT", "DATATYPES", "DEFAULT_TOPICS", "INFERENCES", "INT_RANGES", "JSON_TYPE_NAMES",
           "LABELS", "MAX_ID_LENGTH", "MAX_TIME", "MIN_TIME", "SCHEMA_VERSION", "STREAMS",
           "InferenceRecord", "LabelRecord", "ModelOutcome", "OutcomeStatus", "ServedModel",
           "Tensor", "Transport", "request_id_problem", "type_name"]

# Tensor element types (KServe V2 / Triton names) a record may carry.
DATATYPES: Final = frozenset(["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                              "INT32", "INT64", "FP16", "BF16", "FP32", "FP64", "BYTES"])
INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    **{f"INT{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (8, 16, 32, 64)},
    **{f"UINT{b}": (0, 2**b - 1) for b in (8, 16, 32, 64)},
}

# Request ids join an inference to its labels. Printable ASCII without leading/trailing space:
# the id is echoed in X-Request-Id (a header value, which clients strip and aiohttp refuses with
# control characters) and is the Kafka key.
MAX_ID_LENGTH: Final = 256
_ID_PATTERN = re.compile(r"[!-~](?:[ -~]*[!-~])?")
# Record times are unix seconds from the epoch up to the end of year 9999 UTC. The evaluator
# files each record under the UTC date of its time (the lake's `date=YYYY-MM-DD` partitions:
# four-digit years, which retention compares as text) and a watermark made of them ages labels
# out, so one absurd time (milliseconds for seconds, an unset clock) would land in a partition
# that cannot be named or expired and expire every pending label. Outside the range: refused
# by the gateway's feedback, a bad record to the evaluator (understudy.labels.unix_seconds).
MIN_TIME: Final = 0
MAX_TIME: Final = 253_402_300_800  # 10000-01-01T00:00:00Z, excluded
JSON_TYPE_NAMES: Final[dict[type, str]] = {
    int: "integer", float: "number", bool: "boolean", str: "string", list: "list",
    dict: "object", type(None): "null",
}


def type_name(value: object) -> str:
    """A JSON value's type as a client would call it (for error messages)."""
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def request_id_problem(value: object) -> str | None:
    """Why `value` cannot be a request id (None: it can). Inference ids and labels share it."""
    if not isinstance(value, str):
        return f"must be a string, got {type_name(value)}"
    if len(value) > MAX_ID_LENGTH:
        return f"is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
    if not _ID_PATTERN.fullmatch(value):
        return ("must be printable ASCII without control characters or leading/trailing "
                "spaces")
    return None


class Tensor(TypedDict):
    datatype: str
    shape: list[int]
    data: list[Any]


class TensorText(TypedDict):
    """A tensor whose `data` is already the JSON text of its element list: how the gateway writes
    a large binary input without making Python objects of it. It reads back as a `Tensor`."""

    datatype: str
    shape: list[int]
    data: orjson.Fragment


class ModelOutcome(TypedDict):
    role: Role
    mode: Mode
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
    inputs: Mapping[str, Tensor | TensorText]
    outputs: dict[str, ModelOutcome]
    status: int
    gateway_latency_ms: float
    task: NotRequired[Task]
    error: NotRequired[str]  # why the client got an error status
    fallback: NotRequired[Literal[True]]  # the route's fallback challenger answered
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
