"""The OpenAPI document (gateway/rest/openapi.py): valid OpenAPI 3.1, complete (every route the
gateway registers, nothing else), and in agreement with the parsers it is derived from:

- bodies generated *from the document* (schemathesis' generator, the one that fuzzes the live
  gateway) are accepted by the parsers the handlers call, once the cross-field rules the
  document states only in words are met;
- every constraint the document states on an admin or feedback field (range, vocabulary,
  pattern, type, unknown keys), broken on purpose, is refused with a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import jsonschema
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.core import NOT_SET

from gateway.app import create_app
from gateway.config import (
    ChallengerConfig,
    PolicyConfig,
    RouteConfig,
    field_bound,
    parse_challenger,
    parse_config,
    parse_policy,
    parse_route,
)
from gateway.control.edits import parse_or_400, without_read_only
from gateway.control.rollout import START_FIELDS, parse_start
from gateway.dataplane.protocol import parse_request
from gateway.errors import BadRequest
from gateway.rest.admin import PROMOTE_FIELDS
from gateway.rest.openapi import OPERATIONS, document, registered_routes
from understudy.labels import LabelError, label_from_feedback

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.fixture(scope="module")
def app() -> Any:
    config = parse_config({"routes": {"r": {"champion": "m1",
                                            "challengers": [{"model": "m2"}]}}}, env={})
    return create_app(config)


@pytest.fixture(scope="module")
def doc(app: Any) -> dict[str, Any]:
    return document(app, ["r"])


DOC = document(create_app(parse_config({}, env={})))
SCHEMA = schemathesis.openapi.from_dict(DOC)
COMPONENTS: dict[str, Any] = DOC["components"]["schemas"]


def whole(value: Any) -> Any:
    """`value` with integral floats as integers. JSON Schema counts 1.0 as an integer, and the
    generator sends some; the validators want integers written without a fraction (Triton
    refuses a shape of [1.0] too), as the document's description says."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [whole(v) for v in value]
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    return value


def body_strategy(path: str, method: str) -> st.SearchStrategy[Any]:
    """Request bodies for one operation, generated from the document."""
    return SCHEMA[path][method].as_strategy().map(
        lambda case: None if case.body is NOT_SET else whole(case.body))  # optional: left out


def test_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["paths"]["/admin/routes/{route}"]["get"]["parameters"][0]["schema"][
        "examples"] == ["r"]


def test_every_registered_route_is_documented_and_nothing_else(app: Any,
                                                               doc: dict[str, Any]) -> None:
    registered = set(registered_routes(app))
    assert registered == set(OPERATIONS)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == registered
    assert ("PATCH", "/admin/routes/{route}/challengers/{model}") in registered


def test_security_follows_the_admin_scopes(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    assert paths["/admin/routes"]["get"]["security"] == [{"adminRead": []}, {"adminWrite": []}]
    assert paths["/admin/routes/{route}"]["put"]["security"] == [{"adminWrite": []}]
    assert {"feedbackToken": []} in paths["/v2/feedback"]["post"]["security"]
    assert "security" not in paths["/v2/models/{route}/infer"]["post"]
    put = paths["/admin/routes/{route}"]["put"]["responses"]
    assert {"200", "201", "400", "401", "403", "404", "409", "413", "422"} <= set(put)


@pytest.mark.parametrize("cls", [ChallengerConfig, PolicyConfig, RouteConfig])
def test_every_bound_the_parser_checks_is_in_the_document(cls: type) -> None:
    """A changed `Bound` changes the document: the keywords are read from the field."""
    name = {RouteConfig: "RouteBody"}.get(cls, cls.__name__)
    properties = COMPONENTS[name]["properties"]
    for f in fields(cls):
        bound = field_bound(cls, f.name)
        if bound is None:
            continue
        schema = properties[f.name]
        assert schema.get("minimum") == bound.ge and schema.get("maximum") == bound.le
        assert schema.get("exclusiveMinimum") == bound.gt
        assert schema.get("exclusiveMaximum") == bound.lt


# -- generated from the document: accepted ----------------------------------------------------


def _fit_challenger(body: dict[str, Any]) -> dict[str, Any]:
    """The one cross-field rule of a challenger: batch_max_wait_ms below timeout_ms."""
    timeout = body.get("timeout_ms", 1000)
    if body.get("batch_max_wait_ms", 2.0) >= timeout:
        body["batch_max_wait_ms"] = 0.0
    return body


def _fit_policy(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("type") == "rollout" and not (body.get("target") and 0 < body.get(
            "fraction", 0) < 1):
        body["type"] = "champion"
    return body


def _no_version(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "expected_version"}


@PROPERTY
@given(body=body_strategy("/admin/routes/{route}/challengers", "POST"))
def test_generated_challengers_are_accepted(body: dict[str, Any]) -> None:
    parse_or_400(lambda: parse_challenger(_fit_challenger(_no_version(body)), "challenger"))


@PROPERTY
@given(body=body_strategy("/admin/routes/{route}/policy", "PUT"))
def test_generated_policies_are_accepted(body: dict[str, Any] | None) -> None:
    parse_or_400(lambda: parse_policy(_fit_policy(_no_version(body or {})), "policy"))


@PROPERTY
@given(body=body_strategy("/admin/routes/{route}", "PUT"))
def test_generated_routes_are_accepted(body: dict[str, Any]) -> None:
    raw = without_read_only(body)
    raw["challengers"] = [_fit_challenger(c) for c in raw.get("challengers") or []]
    champion = raw["champion"]
    models = [champion if isinstance(champion, str) else champion["model"]]
    models = [models[0].partition(":")[0], *(c["model"] for c in raw["challengers"])]
    assume(len(set(models)) == len(models))  # no model twice (stated in the description)
    if raw.get("fallback") not in models[1:]:
        raw["fallback"] = None
    raw["policy"] = _fit_policy(dict(raw.get("policy") or {}))
    raw["rollout"] = None  # a stored plan must match the route's policy: not a client's field
    parse_or_400(lambda: parse_route("r", raw))


@PROPERTY
@given(body=body_strategy("/admin/routes/{route}/rollout", "POST"))
def test_generated_rollout_starts_are_accepted(body: dict[str, Any]) -> None:
    if "steps" in body:  # increasing, one below 100: stated in the description
        steps = sorted(set(body["steps"]))
        assume(steps[0] < 100)
        body["steps"] = steps
    parse_start(body)


@PROPERTY
@given(body=body_strategy("/v2/feedback", "POST"))
def test_generated_feedback_is_accepted(body: Any) -> None:
    for item in body if isinstance(body, list) else [body]:
        for key in ("label", "reward", "event_time"):  # JSON numbers a float can hold
            if isinstance(item.get(key), int) and not isinstance(item[key], bool):
                assume(abs(item[key]) < 2**1000)
        try:
            label_from_feedback(item, 0.0)
        except LabelError as exc:
            refusal = str(exc)
        else:
            continue
        # the one refusal: a date-time before 1970 (or past 9999) UTC, stated in the description
        assert isinstance(item.get("event_time"), str), refusal
        assert refusal.startswith("event_time must be unix seconds from 1970-01-01"), refusal


# The inference request's cross-field rules (the element count follows the shape; a binary
# size needs the binary extension), the only refusals a generated request may get.
CROSS_FIELD = ("needs", "'data' is nested deeper", "mixes lists and values",
               "has binary_data_size but the request has no", "has more than 2^63-1 elements",
               "is given twice")


@PROPERTY
@given(body=body_strategy("/v2/models/{route}/infer", "POST"))
def test_generated_inference_requests_are_accepted(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()  # orjson refuses integers beyond 64 bits
    try:
        request = parse_request(raw, None)
    except BadRequest as exc:
        refusal = exc.message
    else:
        assert request.inputs == body["inputs"]
        return
    assert any(phrase in refusal for phrase in CROSS_FIELD), refusal


@settings(PROPERTY, max_examples=50)
@given(rows=st.integers(0, 4), cols=st.integers(0, 4), datatype=st.sampled_from(
    ["FP32", "FP64", "INT8", "INT64", "UINT8", "BOOL", "BYTES"]), data=st.data())
def test_requests_that_meet_the_cross_field_rules_are_accepted(
        rows: int, cols: int, datatype: str, data: st.DataObject) -> None:
    """The complement of the test above: fill `data` to the shape, elements from the
    document's per-datatype rule; the validator accepts it."""
    rule = next(r["then"] for r in COMPONENTS["InferInputTensor"]["allOf"]
                if r["if"]["properties"]["datatype"]["const"] == datatype)
    element = rule["properties"]["data"]["items"]["anyOf"][0]
    strategy = {"number": st.floats(allow_nan=False, allow_infinity=False, width=32),
                "integer": st.integers(element.get("minimum"), element.get("maximum")),
                "boolean": st.booleans(), "string": st.text(max_size=5)}[element["type"]]
    values = data.draw(st.lists(strategy, min_size=rows * cols, max_size=rows * cols))
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [rows, cols],
                        "data": values}]}
    assert parse_request(orjson.dumps(body), None).flat["x"] == values


# -- every stated constraint, broken: refused with 400 naming the field ------------------------


def _violations(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values `schema` (one property's) refuses: out of its range, outside its vocabulary or
    pattern, or of another JSON type. Not the coercions the parsers allow on purpose (a
    number for a string, "5" or 5.0 for an integer, as YAML and environment values arrive)."""
    numbers = st.integers(-(10**9), 10**9)
    if schema.get("type") == "number":
        numbers |= st.floats(-1e9, 1e9, allow_nan=False)
    texts = st.sampled_from(["abc", "x y", "a/b", "..", "x?y", "#", "a" * 200, "1.5", "é"]) \
        | st.text(max_size=8)
    numeric = schema.get("type") in ("number", "integer")
    candidates = st.one_of(
        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.none(),
                                                             max_size=1),
        numbers if numeric else texts,
        texts.filter(lambda v: not _is_number(v)) if numeric else st.nothing(),
    )
    validator = jsonschema.Draft202012Validator(schema)
    return candidates.filter(lambda v: not validator.is_valid(v))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _constrained(name: str) -> list[str]:
    """The properties of a component with a checkable constraint (not free-form ones)."""
    props = COMPONENTS[name]["properties"]
    return sorted(k for k, v in props.items()
                  if k != "expected_version" and v and ("type" in v or "enum" in v)
                  and v.get("type") not in ("object", "array")
                  and "null" not in v.get("type", ()) and "anyOf" not in v)


BASE = {"ChallengerConfig": {"model": "m9"}, "PolicyConfig": {}, "RolloutStart": {"model": "m9"}}
PARSERS = {"ChallengerConfig": lambda raw: parse_challenger(raw, "challenger"),
           "PolicyConfig": lambda raw: parse_policy(raw, "policy"),
           "RolloutStart": parse_start}


def test_hand_listed_bodies_name_the_handlers_fields() -> None:
    """The two bodies not built from a dataclass list exactly the fields their handlers take
    (gateway/control/rollout.py START_FIELDS, gateway/rest/admin.py PROMOTE_FIELDS); their
    constraints are checked against the parsers by the property tests here."""
    assert set(COMPONENTS["RolloutStart"]["properties"]) == START_FIELDS | {"expected_version"}
    assert set(COMPONENTS["PromoteBody"]["properties"]) == set(PROMOTE_FIELDS)


@pytest.mark.parametrize("component", sorted(PARSERS))
@settings(PROPERTY, max_examples=200)
@given(data=st.data())
def test_broken_constraints_are_refused_naming_the_field(component: str,
                                                         data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(_constrained(component)))
    value = data.draw(_violations(COMPONENTS[component]["properties"][key]))
    raw = {**BASE[component], key: value}
    with pytest.raises(BadRequest) as info:
        parse_or_400(lambda: PARSERS[component](raw))
    assert info.value.status == 400
    assert re.search(rf"\b{key}\b", info.value.message), (key, value, info.value.message)


@pytest.mark.parametrize("component", sorted(PARSERS))
def test_unknown_keys_are_refused(component: str) -> None:
    assert COMPONENTS[component]["additionalProperties"] is False
    with pytest.raises(BadRequest, match=r"unknown (key|field)"):
        parse_or_400(lambda: PARSERS[component]({**BASE[component], "colour": 1}))


@settings(PROPERTY, max_examples=100)
@given(key=st.sampled_from(["champion", "log_sample_rate", "threshold", "task",
                            "sample_key_header", "challengers"]), data=st.data())
def test_broken_route_fields_are_refused_naming_the_field(key: str, data: st.DataObject) -> None:
    schema = COMPONENTS["RouteBody"]["properties"][key]
    value = data.draw(_violations(schema) if key != "champion"
                      else st.sampled_from([[1], 5, "a/b", {"model": ".."}, {"version": "1"}]))
    if key == "challengers":
        value = data.draw(st.sampled_from([5, "x", {"model": "m2"}, [5]]))
    with pytest.raises(BadRequest) as info:
        parse_or_400(lambda: parse_route("r", {"champion": "m1", key: value}))
    assert f"routes.r.{key}" in info.value.message, (value, info.value.message)


@settings(PROPERTY, max_examples=150)
@given(key=st.sampled_from(["request_id", "label", "reward", "event_time", "index"]),
       data=st.data())
def test_broken_feedback_fields_are_refused_naming_the_field(key: str,
                                                             data: st.DataObject) -> None:
    index = COMPONENTS["FeedbackItem"]["properties"]["index"]
    bad: dict[str, st.SearchStrategy[Any]] = {
        "request_id": st.sampled_from(["", " x", "x\n", "é", "a" * 300, 5, None]),
        "label": st.sampled_from(["1", [1], {"a": 1}, 2**1100]),
        "reward": st.sampled_from(["1", [1], "x", 2**1100]),
        "event_time": st.sampled_from(["yesterday", "2024-01-01T00:00:00", [1], True]),
        "index": st.sampled_from([-1, 1.5, "2", True]) if index["minimum"] == 0 else st.none(),
    }
    item = {"request_id": "r-1", "label": 1, key: data.draw(bad[key])}
    with pytest.raises(LabelError) as info:
        label_from_feedback(item, 0.0)
    assert key in str(info.value) or (key == "request_id" and "request_id" in str(info.value))


def test_feedback_without_label_or_reward_is_refused() -> None:
    assert len(COMPONENTS["FeedbackItem"]["anyOf"]) == 2
    with pytest.raises(LabelError, match="give 'label' or 'reward'"):
        label_from_feedback({"request_id": "r-1", "label": None}, 0.0)


def test_event_times_in_the_documented_format_are_read() -> None:
    """RFC 3339 (`date-time`), lower-case t/z and leap seconds included."""
    assert COMPONENTS["FeedbackItem"]["properties"]["event_time"]["anyOf"][0][
        "format"] == "date-time"
    when = datetime(2026, 12, 3, 2, 30, tzinfo=UTC)
    for text in ("2026-12-03T02:30:00Z", "2026-12-03T02:30:00+00:00",
                 "2026-12-03t02:30:00z", "2026-12-03T02:30:00.000000001Z"):
        got = label_from_feedback({"request_id": "r", "label": 1, "event_time": text}, 0.0)
        assert math.isclose(got["event_time"], when.timestamp()), text
    leap = label_from_feedback({"request_id": "r", "label": 1,
                                "event_time": "2016-12-31T23:59:60Z"}, 0.0)
    assert leap["event_time"] == datetime(2017, 1, 1, tzinfo=UTC).timestamp()
