"""JSON Schema (draft 2020-12) of the log records, schema v1: the machine-checkable form of the
field reference in understudy/records.py, including the optional v1 additions.

Why a schema: the evaluator trusts what the gateway writes, so a record with, say, strings in
FP32 data is a silent corruption of its dataset. The test suite validates every record the
gateway writes in its end-to-end and fuzz tests against these schemas (`record_problems`).
`python -m understudy.record_schema` prints them; docs/record-schema-v1.json is that output and a
test keeps the two identical.

Besides the JSON Schema, `record_problems` checks what a schema cannot express: each tensor's
element count equals the product of its shape.

Non-finite floats: JSON has no NaN or infinity, so a binary FP16/FP32/FP64 tensor (request or
response) holding one is logged with `null` at that position; no other element may be null.
BF16 tensors are logged as their raw 16-bit patterns (integers), since JSON has no bfloat16.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping
from typing import Any

import orjson

from understudy.records import (
    DATATYPES,
    INT_RANGES,
    MAX_ID_LENGTH,
    MAX_TIME,
    MIN_TIME,
    SCHEMA_VERSION,
)
from understudy.vocabulary import MODES, OUTCOME_STATUSES, POLICY_TYPES, ROLES, TASKS, TRANSPORTS

_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH,
       "pattern": "^[!-~]([ -~]*[!-~])?$"}
_NUMBER = {"type": "number"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_TIME = {"type": "number", "minimum": MIN_TIME, "exclusiveMaximum": MAX_TIME}  # unix seconds


def _element_rules() -> list[dict[str, Any]]:
    """One if/then per datatype: the JSON type (and range) of its elements."""
    items: dict[str, dict[str, Any]] = {
        **dict.fromkeys(("FP16", "FP32", "FP64"), _NULLABLE_NUMBER),
        "BF16": {"type": "integer", "minimum": 0, "maximum": 0xFFFF},
        "BOOL": {"type": "boolean"},
        "BYTES": {"type": "string"},
        **{dt: {"type": "integer", "minimum": low, "maximum": high}
           for dt, (low, high) in INT_RANGES.items()},
    }
    assert items.keys() == DATATYPES
    return [
        {"if": {"properties": {"datatype": {"const": dt}}},
         "then": {"properties": {"data": {"items": rule}}}}
        for dt, rule in sorted(items.items())
    ]


TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["datatype", "shape", "data"],
    "additionalProperties": False,
    "properties": {
        "datatype": {"enum": sorted(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array"},
    },
    "allOf": _element_rules(),
}

MODEL_OUTCOME: dict[str, Any] = {
    "type": "object",
    "required": ["role", "mode", "version", "status", "latency_ms", "outputs", "error"],
    "additionalProperties": False,
    "properties": {
        "role": {"enum": list(ROLES)},
        "mode": {"enum": list(MODES)},
        "version": {"type": "string"},
        "status": {"enum": list(OUTCOME_STATUSES)},
        "latency_ms": {"type": ["number", "null"], "minimum": 0},
        "outputs": {"oneOf": [
            {"type": "null"},
            {"type": "object", "additionalProperties": {"$ref": "#/$defs/tensor"}},
        ]},
        "error": {"type": ["string", "null"]},
        "batch_rows": {"type": "integer", "minimum": 1},
        # v1 additions, challengers only: the experiment and its sample rate
        "experiment": {"type": "string"},
        "sample_rate": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "if": {"properties": {"role": {"const": "champion"}}},
    "then": {"not": {"anyOf": [{"required": ["experiment"]}, {"required": ["sample_rate"]}]}},
}


def _record(kind: str, required: list[str], properties: dict[str, Any],
            rest: dict[str, Any]) -> dict[str, Any]:
    """The schema of one record kind: the envelope every kind shares (`schema_version`, `kind`,
    `request_id`, nothing undeclared) around the kind's own fields, then `rest` (e.g. `$defs`)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"understudy/{kind}-record-v1",
        "title": f"Understudy {kind} record, schema v1",
        "type": "object",
        "required": ["schema_version", "kind", "request_id", *required],
        "additionalProperties": False,
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "kind": {"const": kind},
            "request_id": _ID,
            **properties,
        },
        **rest,
    }


INFERENCE_RECORD: dict[str, Any] = _record(
    "inference",
    ["ts", "route", "policy", "served", "propensity", "arms", "key", "inputs", "outputs",
     "status", "gateway_latency_ms"],
    {
        "ts": _TIME,
        "route": {"type": "string", "minLength": 1},
        "policy": {"type": "object", "required": ["type"],
                   "properties": {"type": {"enum": list(POLICY_TYPES)}}},
        "served": {"type": "object", "required": ["model", "version"],
                   "additionalProperties": False,
                   "properties": {"model": {"type": "string", "minLength": 1},
                                  "version": {"type": "string"}}},
        "propensity": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "arms": {"type": "object",
                 "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}},
        "key": {"type": ["string", "null"]},
        "inputs": {"type": "object", "additionalProperties": {"$ref": "#/$defs/tensor"}},
        "outputs": {"type": "object", "minProperties": 1,
                    "additionalProperties": {"$ref": "#/$defs/outcome"}},
        "status": {"type": "integer", "minimum": 100, "maximum": 599},
        "gateway_latency_ms": {"type": "number", "minimum": 0},
        # optional fields
        "task": {"enum": list(TASKS)},
        "error": {"type": "string"},
        "fallback": {"const": True},
        "protocol": {"enum": list(TRANSPORTS)},  # the transport that carried the request
        "registry_version": {"type": "integer", "minimum": 0},  # the route's registry version
    },
    {"$defs": {"tensor": TENSOR, "outcome": MODEL_OUTCOME}},
)

LABEL_RECORD: dict[str, Any] = _record(
    "label",
    ["label", "reward", "event_time", "received_ts"],
    {
        "label": _NULLABLE_NUMBER,
        "reward": _NULLABLE_NUMBER,
        "event_time": _TIME,
        "received_ts": _TIME,
        "index": {"type": "integer", "minimum": 1},
    },
    {"anyOf": [{"properties": {"label": _NUMBER}}, {"properties": {"reward": _NUMBER}}]},
)

SCHEMAS: dict[str, dict[str, Any]] = {"inference": INFERENCE_RECORD, "label": LABEL_RECORD}


def _tensor_problems(where: str, tensors: Any) -> list[str]:
    problems = []
    if isinstance(tensors, Mapping):
        for name, t in tensors.items():
            if isinstance(t, Mapping) and isinstance(t.get("shape"), list) and isinstance(
                t.get("data"), list
            ) and all(type(d) is int for d in t["shape"]):
                count = math.prod(t["shape"])
                if count != len(t["data"]):
                    problems.append(f"{where}.{name}: shape {t['shape']} needs {count} "
                                    f"elements, data has {len(t['data'])}")
    return problems


@functools.cache
def _validator(kind: str) -> Any:
    import jsonschema  # dev-only dependency, loaded on first use

    return jsonschema.Draft202012Validator(SCHEMAS[kind])


def record_problems(record: Mapping[str, Any]) -> list[str]:
    """Everything wrong with one inference or label record (empty: valid schema v1).

    Needs the `jsonschema` package (a dev dependency: the gateway itself never imports it).
    """
    kind = record.get("kind")
    if kind not in SCHEMAS:
        return [f"unknown record kind {kind!r}"]
    validator = _validator(kind)
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '<record>'}: {e.message}"
                for e in validator.iter_errors(record)]
    if record.get("kind") == "inference":
        problems += _tensor_problems("inputs", record.get("inputs"))
        outputs = record.get("outputs")
        if isinstance(outputs, Mapping):
            for model, outcome in outputs.items():
                if isinstance(outcome, Mapping):
                    problems += _tensor_problems(f"outputs.{model}", outcome.get("outputs"))
    return problems


def main() -> None:
    """Print both schemas as one JSON document (what docs/record-schema-v1.json holds)."""
    sys.stdout.write(orjson.dumps(SCHEMAS, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
