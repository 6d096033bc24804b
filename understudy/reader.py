"""Records as the evaluator reads them: raw log lines -> typed `Inference` / `Label` values.

The gateway writes the TypedDicts of understudy/records.py; this module reads them back with
the same vocabulary (understudy/vocabulary.py), strictly where a record would be useless
without a field and leniently where the schema grew over time:

- Required (a record without them is bad, `RecordError` with a counted reason): a JSON object,
  schema_version 1, a known kind; for inferences a non-empty `request_id`, a `ts`, a
  non-empty `route`, `outputs` an object of objects (and `inputs` an object when present); for
  labels a non-empty `request_id` and the values `understudy.labels.label_values` accepts.
  Every time a record carries as a number (`ts`, `event_time`, `received_ts`) is unix seconds
  within the contract's range (`understudy.labels.unix_seconds`): the evaluator files records
  by the UTC date of their time, so one outside it is bad, never a bogus partition.
- Everything else is read as unknown when missing or malformed, never as a bad record: older
  records lack the v1 additions (`registry_version`, `experiment`, `sample_rate`, `reward`,
  `received_ts`, `protocol`), and a malformed optional value must not cost the whole record.

For a well-formed record `to_record()` gives back exactly what the gateway wrote, which is how
tests/unit/test_contract_records.py proves the two sides agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson

from understudy.labels import LabelError, TimeRangeError, finite_number, label_values, unix_seconds
from understudy.records import (
    SCHEMA_VERSION,
    InferenceRecord,
    LabelRecord,
    ModelOutcome,
    Tensor,
    type_name,
)
from understudy.vocabulary import (
    MODES,
    OUTCOME_STATUSES,
    ROLES,
    TASKS,
    TRANSPORTS,
    Mode,
    OutcomeStatus,
    Role,
    Task,
    Transport,
)

AUDIT_KIND: Final = "audit"  # audit entries share the log format; the evaluator skips them
# Membership sets, typed as the vocabulary: a string found in one is that Literal.
_ROLES: Final[frozenset[Role]] = frozenset(ROLES)
_MODES: Final[frozenset[Mode]] = frozenset(MODES)
_STATUSES: Final[frozenset[OutcomeStatus]] = frozenset(OUTCOME_STATUSES)
_TASKS: Final[frozenset[Task]] = frozenset(TASKS)
_TRANSPORTS: Final[frozenset[Transport]] = frozenset(TRANSPORTS)


class RecordError(ValueError):
    """A record the evaluator cannot use. `reason` is the counter it is stored under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(slots=True)
class Outcome:
    """One model's answer to one request. `mode` None: a mode this release does not know."""

    role: Role
    mode: Mode | None
    version: str
    status: OutcomeStatus
    latency_ms: float | None
    outputs: dict[str, Tensor] | None
    error: str | None = None
    batch_rows: int | None = None  # set: shared a micro-batched call (latency not comparable)
    experiment: str | None = None  # challengers only
    sample_rate: float | None = None  # challengers only

    @property
    def single_call_latency_ms(self) -> float | None:
        """The latency when the call carried this request alone (else None: not comparable)."""
        return None if self.batch_rows is not None else self.latency_ms

    def to_record(self) -> ModelOutcome:
        return cast(ModelOutcome, {
            "role": self.role, "mode": self.mode or "shadow", "version": self.version,
            "status": self.status, "latency_ms": self.latency_ms, "outputs": self.outputs,
            "error": self.error,
            **_present(batch_rows=self.batch_rows, experiment=self.experiment,
                       sample_rate=self.sample_rate),
        })


@dataclass(slots=True)
class Inference:
    """One served request. Optional fields are None when absent or malformed."""

    request_id: str
    ts: float
    route: str
    policy: dict[str, Any]
    served_model: str
    served_version: str
    propensity: float | None
    arms: dict[str, float | None]
    key: str | None
    inputs: dict[str, Tensor]
    outcomes: dict[str, Outcome]
    status: int  # the HTTP status the client got; 0 when the record has none
    gateway_latency_ms: float | None
    registry_version: int | None = None
    task: Task | None = None
    error: str | None = None
    fallback: bool = False
    protocol: Transport | None = None

    @property
    def policy_type(self) -> str:
        return str(self.policy.get("type") or "")

    def to_record(self) -> InferenceRecord:
        """The record as the gateway wrote it (exact for a well-formed record)."""
        return cast(InferenceRecord, {
            "schema_version": SCHEMA_VERSION, "kind": "inference",
            "request_id": self.request_id, "ts": self.ts, "route": self.route,
            "policy": self.policy,
            "served": {"model": self.served_model, "version": self.served_version},
            "propensity": _or_nan(self.propensity),
            "arms": {m: _or_nan(p) for m, p in self.arms.items()}, "key": self.key,
            "inputs": self.inputs,
            "outputs": {m: o.to_record() for m, o in self.outcomes.items()},
            "status": self.status, "gateway_latency_ms": _or_nan(self.gateway_latency_ms),
            **_present(registry_version=self.registry_version, task=self.task, error=self.error,
                       fallback=True if self.fallback else None, protocol=self.protocol),
        })


@dataclass(slots=True)
class Label:
    """Ground truth (or a reward) for one row of one request."""

    request_id: str
    label: float | None
    reward: float | None
    event_time: float
    received_ts: float
    index: int = 0

    def to_record(self) -> LabelRecord:
        return cast(LabelRecord, {
            "schema_version": SCHEMA_VERSION, "kind": "label", "request_id": self.request_id,
            "label": self.label, "reward": self.reward, "event_time": self.event_time,
            "received_ts": self.received_ts, **_present(index=self.index or None),
        })


def _present(**optional: object) -> dict[str, object]:
    """The optional fields that are set (a record leaves the others out)."""
    return {key: value for key, value in optional.items() if value is not None}


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def decode(raw: bytes) -> dict[str, Any]:
    """One log line -> its JSON object, schema version checked; RecordError when unusable."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # Other producers (Python's json) may write NaN/Infinity literals orjson refuses.
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # nested deeper than the stack allows
            raise RecordError("malformed_json", f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError("unsupported_schema_version",
                          f"schema_version {version!r} (this evaluator reads {SCHEMA_VERSION})")
    return obj


def read_record(raw: bytes, clock: Callable[[], float]) -> Inference | Label | None:
    """One log line -> an Inference or a Label; None for an audit entry (not evaluated).

    `clock` dates a label that carries neither `received_ts` nor `event_time`.
    """
    obj = decode(raw)
    kind = obj.get("kind")
    if kind == "inference":
        return read_inference(obj)
    if kind == "label":
        return read_label(obj, clock)
    if kind == AUDIT_KIND:
        return None
    raise RecordError("unknown_kind", f"unknown kind {kind!r}")


def read_outcome(raw: Mapping[str, Any]) -> Outcome:
    """One entry of `outputs`: unknown words read as the safe side (an error, a challenger)."""
    get = raw.get
    role, mode, status = get("role"), get("mode"), get("status")
    outputs, error, experiment = get("outputs"), get("error"), get("experiment")
    batch_rows = get("batch_rows")
    batched = type(batch_rows) is int
    # Positional, in field order: this runs for every model of every record the evaluator reads.
    return Outcome(
        role if type(role) is str and role in _ROLES else "challenger",
        mode if type(mode) is str and mode in _MODES else None,
        str(get("version") or ""),
        status if type(status) is str and status in _STATUSES else "error",
        # a batch_rows the reader cannot read may still mean a shared call: no latency then
        None if batch_rows is not None and not batched else finite_number(get("latency_ms")),
        outputs if type(outputs) is dict else None,
        error if type(error) is str else None,
        batch_rows if batched else None,
        experiment if type(experiment) is str and experiment else None,
        finite_number(get("sample_rate")),
    )


def read_inference(obj: Mapping[str, Any]) -> Inference:
    """An inference record's object -> Inference; RecordError("invalid_inference") if unusable."""
    get = obj.get
    rid = get("request_id")
    if type(rid) is not str or not rid:
        raise RecordError("invalid_inference", "request_id must be a non-empty string")
    try:
        ts = unix_seconds("ts", get("ts"))
    except TimeRangeError as exc:
        raise RecordError("invalid_inference", f"{rid}: {exc}") from None
    if ts is None:
        raise RecordError("invalid_inference",
                          f"{rid}: ts must be unix seconds, got {type_name(get('ts'))}")
    route = get("route")
    if type(route) is not str or not route:
        raise RecordError("invalid_inference", f"{rid}: route must be a non-empty string")
    outputs = get("outputs")
    inputs = get("inputs") or {}
    if type(outputs) is not dict or type(inputs) is not dict:
        raise RecordError("invalid_inference", f"{rid}: inputs/outputs must be objects")
    outcomes: dict[str, Outcome] = {}
    for model, raw in outputs.items():
        if type(raw) is not dict:
            raise RecordError("invalid_inference", f"{rid}: outputs[{model!r}] is not an object")
        outcomes[model] = read_outcome(raw)
    policy, served, arms = get("policy"), get("served"), get("arms")
    served = served if type(served) is dict else {}
    key, status, error = get("key"), get("status"), get("error")
    task, protocol, registry_version = get("task"), get("protocol"), get("registry_version")
    return Inference(
        rid, ts, route,
        policy if type(policy) is dict else {},
        str(served.get("model") or ""),
        str(served.get("version") or ""),
        finite_number(get("propensity")),
        {m: finite_number(p) for m, p in arms.items()} if type(arms) is dict else {},
        key if type(key) is str else None,
        inputs,
        outcomes,
        int(status) if isinstance(status, int) else 0,
        finite_number(get("gateway_latency_ms")),
        registry_version if type(registry_version) is int else None,
        task if type(task) is str and task in _TASKS else None,
        error if type(error) is str else None,
        get("fallback") is True,
        protocol if type(protocol) is str and protocol in _TRANSPORTS else None,
    )


def read_label(obj: Mapping[str, Any], clock: Callable[[], float]) -> Label:
    """A label record's object -> Label; RecordError("invalid_label") if unusable.

    Times: the receipt time dates the label for last-wins and the join window; without one the
    event time stands in, and without either the reader's clock.
    """
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise RecordError("invalid_label", "request_id must be a non-empty string")
    try:
        label, reward, index = label_values(obj.get("label"), obj.get("reward"),
                                            obj.get("index", 0))
    except LabelError as exc:
        raise RecordError("invalid_label", f"{rid}: {exc}") from None
    try:
        received = unix_seconds("received_ts", obj.get("received_ts"))
        event = unix_seconds("event_time", obj.get("event_time"))
    except TimeRangeError as exc:
        raise RecordError("invalid_label", f"{rid}: {exc}") from None
    if received is None:
        received = event if event is not None else clock()
    return Label(rid, label, reward, received if event is None else event, received, index)
