"""The JSON Schemas of the gateway's OpenAPI document, derived from what the parsers check.

Admin bodies from the config dataclasses and their `Bound`s (gateway/config.py), the feedback item
from the label validator (understudy/labels.py), the inference request from the request
validator's constants (gateway/dataplane/protocol.py). gateway/rest/openapi.py assembles the
document from these and the live router.
"""

from __future__ import annotations

import collections.abc
import types
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from gateway.config import (
    MODEL_NAME,
    MODEL_VERSION,
    Bound,
    ChallengerConfig,
    ModelRef,
    PolicyConfig,
    RouteConfig,
)
from gateway.control.plan import STATUSES, RolloutPlan
from gateway.control.state import READ_ONLY_KEYS
from gateway.dataplane import protocol
from gateway.dataplane.protocol import HEADER_LENGTH, MAX_DIM, MAX_RANK
from gateway.rest.feedback import MAX_ITEMS
from understudy.labels import FEEDBACK_ITEM_SCHEMA
from understudy.records import DATATYPES, INT_RANGES, MAX_ID_LENGTH
from understudy.settings import field_default

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# -- schemas from the config dataclasses ----------------------------------------------------

# Anchored forms of the patterns `check_model_name` / `check_model_version` match with.
MODEL_NAME_SCHEMA: Schema = {
    "type": "string", "pattern": f"^(?:{MODEL_NAME.pattern})$", "not": {"pattern": r"\.\."},
    "description": "A Triton model name: letters, digits, '_', '-', '.'; no '..'.",
}
MODEL_VERSION_SCHEMA: Schema = {
    "type": "string", "pattern": f"^(?:{MODEL_VERSION.pattern})?$",
    "description": "A model version (digits), or empty: Triton's version policy picks.",
}
# Fields whose strings the parsers check against a pattern, by (dataclass, field).
FIELD_SCHEMAS: dict[tuple[type, str], Schema] = {
    (ModelRef, "model"): MODEL_NAME_SCHEMA,
    (ModelRef, "version"): MODEL_VERSION_SCHEMA,
    (ChallengerConfig, "model"): MODEL_NAME_SCHEMA,
    (ChallengerConfig, "version"): MODEL_VERSION_SCHEMA,
    (RolloutPlan, "status"): {
        "enum": list(STATUSES),
        "description": "running; completed: passed every step, and the target was promoted in "
                       "the same change (the route's champion is already the target); "
                       "rolled_back: a guard breached, or the promotion was refused (see "
                       "`reason`); aborted: stopped by hand, no promotion.",
    },
}
_SCALARS: dict[type, str] = {str: "string", bool: "boolean", int: "integer", float: "number"}


def type_schema(hint: Any) -> Schema:
    """JSON Schema for a dataclass field's type: scalars, `Literal`s (the vocabulary), optional
    values, tuples (JSON arrays), mappings and nested dataclasses (references)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [type_schema(a) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is tuple:
        return {"type": "array", "items": type_schema(args[0])}
    if origin in (collections.abc.Mapping, dict):
        return {"type": "object"}
    if isinstance(hint, type) and is_dataclass(hint):
        return ref(hint.__name__)
    raise TypeError(f"no JSON Schema for {hint!r}")


def bound_schema(bound: Bound) -> Schema:
    keywords = {"minimum": bound.ge, "exclusiveMinimum": bound.gt, "maximum": bound.le,
                "exclusiveMaximum": bound.lt}
    return {k: v for k, v in keywords.items() if v is not None}


def dataclass_schema(cls: type, *, exclude: frozenset[str] = frozenset(),
                     description: str | None = None) -> Schema:
    """An object schema with one property per field of `cls` (its type, `Bound`, pattern and
    default); fields without a default are required; other keys are refused, as `build` does."""
    hints = get_type_hints(cls)
    properties: dict[str, Schema] = {}
    required: list[str] = []
    for f in fields(cls):
        if f.name in exclude:
            continue
        schema = {**type_schema(hints[f.name]), **FIELD_SCHEMAS.get((cls, f.name), {})}
        bound = f.metadata.get("bound")
        if isinstance(bound, Bound):
            schema.update(bound_schema(bound))
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
        else:
            default = field_default(f)
            if default is None or isinstance(default, str | int | float):
                schema["default"] = default
        properties[f.name] = schema
    out: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def with_properties(schema: Schema, **extra: Schema) -> Schema:
    """`schema` accepting more properties (e.g. `expected_version`, read-only view keys)."""
    return {**schema, "properties": {**schema["properties"], **extra}}


EXPECTED_VERSION: Schema = {
    "type": "integer",
    "description": "Compare-and-set: refuse (409) unless the route is at this version. Also "
                   "as `If-Match: \"N\"` or the `expected_version` query parameter.",
}


def _admin_schemas() -> dict[str, Schema]:
    challenger = dataclass_schema(
        ChallengerConfig,
        description="A challenger. batch_max_wait_ms must also be below timeout_ms.")
    policy = dataclass_schema(
        PolicyConfig,
        description="How the route picks the arm that serves a request. A 'rollout' policy "
                    "(set by the rollout controller) needs a target and a fraction in (0, 1); "
                    "an exploring policy needs a challenger in mode 'explore'.")
    route = dataclass_schema(
        RouteConfig, exclude=frozenset({"name"}),
        description="A route: `fallback` must be one of its challengers, and no model may be "
                    "listed twice. The keys a GET adds are accepted and ignored (GET, edit, "
                    "PUT).")
    route["properties"]["champion"] = {"anyOf": [
        ref("ModelRef"),
        {"type": "string", "description": "model or model:version",
         "pattern": f"^(?:{MODEL_NAME.pattern})(?::(?:{MODEL_VERSION.pattern})?)?$",
         "not": {"pattern": r"\.\."}},
    ]}
    view_only: dict[str, Schema] = {key: {} for key in sorted(READ_ONLY_KEYS)}
    view_only["expected_version"] = EXPECTED_VERSION
    route_challenger = with_properties(challenger, experiment={})
    route = with_properties(route, **view_only)
    route["properties"]["challengers"] = {"type": "array", "items": route_challenger}
    route_view = {
        "type": "object",
        "required": ["name", "version", "champion", "challengers", "policy"],
        "properties": {
            "name": {"type": "string"}, "version": {"type": "integer"},
            "champion": ref("ModelRef"), "policy": ref("PolicyConfig"),
            "challengers": {"type": "array", "items": {
                "type": "object", "required": ["model", "experiment"],
                "properties": {"experiment": {"type": ["object", "null"]}}}},
            "rollback_to": {"anyOf": [ref("ModelRef"), {"type": "null"}]},
        },
    }
    steps = {"type": "array", "minItems": 1,
             "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
             "description": "Percents of traffic, increasing, at least one below 100."}
    start: Schema = {
        "type": "object", "required": ["model"], "additionalProperties": False,
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "steps": steps,
            "min_requests": {"type": "integer", "minimum": 1},
            "min_seconds": {"type": "number", "minimum": 0, "exclusiveMaximum": 1e7},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
            "expected_version": EXPECTED_VERSION,
        },
    }
    promote_props: dict[str, Schema] = {
        "model": {"type": "string", "minLength": 1, "description": "The challenger."},
        "experiment": {"type": "string", "minLength": 1,
                       "description": "Refuse (409) unless this is the challenger's current "
                                      "experiment (the evaluator's evidence is from it)."},
        "expected_version": EXPECTED_VERSION,
    }
    return {
        "ModelRef": dataclass_schema(ModelRef),
        "ChallengerConfig": challenger,
        "ChallengerBody": with_properties(challenger, expected_version=EXPECTED_VERSION),
        "ChallengerPatch": {
            **with_properties(challenger, expected_version=EXPECTED_VERSION),
            "required": [], "minProperties": 1,
            "description": "The settings to change; a `model` must be the path's.",
        },
        "PolicyConfig": policy,
        "PolicyBody": with_properties(policy, expected_version=EXPECTED_VERSION),
        "RolloutPlan": {**dataclass_schema(RolloutPlan), "additionalProperties": True},
        "RouteBody": route,
        "RouteView": route_view,
        "PromoteBody": {"type": "object", "required": ["model"], "additionalProperties": False,
                        "properties": promote_props},
        "VersionOnly": {"type": "object", "additionalProperties": False,
                        "properties": {"expected_version": EXPECTED_VERSION}},
        "RolloutStart": start,
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string", "minLength": 1}}},
    }


# -- the inference request (KServe V2), from the request validator's constants ----------------

_PARAMETER_KINDS: dict[str, Schema] = {
    "uint": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
    "bool": {"type": "boolean"},
    "str": {"type": "string"},
}
_PARAMETER_KINDS["uint|str"] = {"anyOf": [_PARAMETER_KINDS["uint"], _PARAMETER_KINDS["str"]]}


def parameters_schema(typed: Mapping[str, str]) -> Schema:
    """A parameters object: the keys Triton reads with their types, other keys any scalar."""
    return {"type": "object",
            "properties": {key: _PARAMETER_KINDS[kind] for key, kind in typed.items()},
            "additionalProperties": {"type": ["string", "number", "boolean"]}}


def _element_rules() -> list[Schema]:
    """Per datatype, the JSON type (and integer range) of `data`'s elements, from the
    validator's table; FP16 and BF16 have no JSON form (binary extension only)."""
    rules: list[Schema] = []
    for datatype in sorted(DATATYPES):
        allowed = protocol.JSON_ELEMENT_TYPES.get(datatype)
        if allowed is None:
            then: Schema = {"not": {"required": ["data"]}}
        else:
            element: Schema = {"type": "number" if float in allowed
                               else _SCALARS[next(iter(allowed))]}
            if datatype in INT_RANGES:
                element["minimum"], element["maximum"] = INT_RANGES[datatype]
            # Nested rows are arrays; their elements are checked by the gateway.
            then = {"properties": {"data": {"items": {"anyOf": [element, {"type": "array"}]}}}}
        rules.append({"if": {"properties": {"datatype": {"const": datatype}},
                             "required": ["datatype"]}, "then": then})
    return rules


def _inference_schemas() -> dict[str, Schema]:
    tensor = {
        "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "datatype": {"enum": sorted(DATATYPES)},
            "shape": {"type": "array", "maxItems": MAX_RANK,
                      "items": {"type": "integer", "minimum": 0, "maximum": MAX_DIM}},
            "data": {"type": "array",
                     "description": "Flat or nested row-major, as many elements as the shape "
                                    "holds; FP16 and BF16 only in the binary extension."},
            "parameters": parameters_schema(protocol._INPUT_PARAMETERS),
        },
        "anyOf": [{"required": ["data"]},
                  {"required": ["parameters"], "properties": {
                      "parameters": {"required": ["binary_data_size"]}}}],
        "allOf": _element_rules(),
    }
    output = {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1},
                       "parameters": {"anyOf": [parameters_schema(protocol._OUTPUT_PARAMETERS),
                                                {"type": "null"}]}},
    }
    request = {
        "type": "object", "required": ["inputs"],
        "description": "A KServe V2 inference request (JSON). The binary tensor extension is "
                       f"accepted too: send the JSON header's length in {HEADER_LENGTH}.",
        "properties": {
            "id": {"anyOf": [{"const": ""}, FEEDBACK_ITEM_SCHEMA["properties"]["request_id"]],
                   "description": f"The request id (at most {MAX_ID_LENGTH} printable ASCII "
                                  "characters); the gateway makes one when absent."},
            "parameters": parameters_schema(protocol._REQUEST_PARAMETERS),
            "inputs": {"type": "array", "minItems": 1, "items": ref("InferInputTensor")},
            "outputs": {"type": "array", "items": ref("InferRequestedOutput")},
        },
    }
    response = {"type": "object", "properties": {
        "model_name": {"type": "string"}, "id": {"type": "string"},
        "outputs": {"type": "array", "items": {"type": "object"}}}}
    return {"InferInputTensor": tensor, "InferRequestedOutput": output,
            "InferenceRequest": request, "InferenceResponse": response}


def _feedback_schemas() -> dict[str, Schema]:
    return {
        "FeedbackItem": FEEDBACK_ITEM_SCHEMA,
        "FeedbackBody": {"anyOf": [
            ref("FeedbackItem"),
            {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": ref("FeedbackItem")},
        ]},
        "FeedbackAccepted": {
            "type": "object", "required": ["accepted", "orphans"],
            "properties": {"accepted": {"type": "integer", "minimum": 0},
                           "orphans": {"type": "integer", "minimum": 0}}},
    }


def schemas() -> dict[str, Schema]:
    """Every named schema of the document (components.schemas)."""
    return {**_admin_schemas(), **_inference_schemas(), **_feedback_schemas()}
