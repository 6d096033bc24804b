"""The one label validator: what a label's values may be, for the gateway and the evaluator alike.

A label enters through the gateway's `POST /v2/feedback` (`label_from_feedback`, which also
applies the request-id rule, rejects unknown fields and reads ISO 8601 event times) and is read
back by the evaluator's ingest (understudy/reader.py), possibly after another producer wrote it.
Both go through `label_values`, so a label the gateway accepts is a label the evaluator joins,
and one it refuses is one the evaluator counts as bad: the two programs cannot drift apart.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from typing import Any, Final

from understudy.record_schema import LABEL_RECORD
from understudy.records import MAX_TIME, MIN_TIME, SCHEMA_VERSION, LabelRecord, request_id_problem

# The largest row index a label may name: the evaluator stores it in an int32 column, and no
# request carries that many rows.
MAX_ROW_INDEX: Final = 2**31 - 1

# One posted feedback item as JSON Schema (draft 2020-12): what `label_from_feedback` accepts,
# stated once. The gateway's OpenAPI document (gateway/rest/openapi.py) serves it, the fields it
# lists are the only ones the validator lets through, and a test generates items from it and
# checks the validator agrees (tests/unit/test_openapi.py).
FEEDBACK_ITEM_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["request_id"],
    "additionalProperties": False,
    "properties": {
        # The same rule as the inference ids the label joins (and as the stored record's).
        "request_id": LABEL_RECORD["properties"]["request_id"],
        "label": {"type": ["number", "boolean", "null"],
                  "description": "The ground truth (a boolean counts as 0/1)."},
        "reward": {"type": ["number", "null"]},
        "event_time": {
            "anyOf": [{"type": "string", "format": "date-time"},
                      {"type": "number", "minimum": MIN_TIME, "exclusiveMaximum": MAX_TIME},
                      {"type": "null"}],
            "description": "ISO 8601 with a timezone, or unix seconds; from 1970-01-01 up to "
                           "the end of 9999 UTC; default: now.",
        },
        "index": {"type": "integer", "minimum": 0, "maximum": MAX_ROW_INDEX, "default": 0,
                  "description": "The row of a batched request (0: the first or only)."},
    },
    # At least one of label and reward is a number.
    "anyOf": [{"required": [key], "properties": {key: {"not": {"type": "null"}}}}
              for key in ("label", "reward")],
}
FEEDBACK_FIELDS: Final = frozenset(FEEDBACK_ITEM_SCHEMA["properties"])
_LEAP_SECOND: Final = re.compile(r"(?P<head>.*[T ]\d\d:\d\d:)60(?P<tail>(?:\.\d+)?[+-].*)")


class LabelError(ValueError):
    """A label that cannot be used; the message names the field and the problem."""


class TimeRangeError(ValueError):
    """A record time that is a number but no date the evaluator can file it under."""


def finite_number(value: object) -> float | None:
    """A JSON number or boolean as a finite float, else None (NaN, infinities, huge ints, text).

    Called several times per record by the evaluator's ingest: plain floats take one branch.
    """
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


def unix_seconds(field: str, value: object) -> float | None:
    """A record's time (`ts`, `event_time`, `received_ts`) as unix seconds, checked: the one
    range check every reader of record times goes through (records.py, MIN_TIME).

    None when the value is absent or not a number (text, a list, a boolean: a reader takes it
    as unknown, and an inference record without a usable `ts` is bad). A number outside
    MIN_TIME <= t < MAX_TIME — NaN, an infinity, before 1970, from year 10000 on, an integer
    no float holds — raises TimeRangeError naming the field and the value: such a time is a
    producer's bug, and no partition, watermark or join window can use it.
    """
    if type(value) is float or (isinstance(value, int) and type(value) is not bool):
        if MIN_TIME <= value < MAX_TIME:  # False for NaN
            return float(value)
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:24]}... " \
            f"({len(str(value))} characters)"
        raise TimeRangeError(f"{field} must be unix seconds from 1970-01-01 up to the end of "
                             f"9999 UTC ({MIN_TIME} <= {field} < {MAX_TIME}), got {shown}")
    return None


def label_values(label: object, reward: object,
                 index: object = 0) -> tuple[float | None, float | None, int]:
    """(label, reward, row index) of a label, checked; raises LabelError naming the problem.

    At least one of label and reward is a finite number (a boolean label counts as 0/1); the
    index is the row of a batched request (0 for the first or only row).
    """
    if label is None and reward is None:
        raise LabelError("give 'label' or 'reward'")
    label_value = None if label is None else finite_number(label)
    if label is not None and label_value is None:
        raise LabelError(f"'label' must be a finite number or boolean, got {label!r}")
    reward_value = None if reward is None else finite_number(reward)
    if reward is not None and reward_value is None:
        raise LabelError(f"'reward' must be a finite number, got {reward!r}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_ROW_INDEX:
        raise LabelError(f"'index' must be a non-negative integer up to {MAX_ROW_INDEX} (row of a "
                         "batched request)")
    return label_value, reward_value, index


def event_time(value: object, now: float) -> float:
    """A posted event time (ISO 8601 with a timezone, or unix seconds) as unix seconds, in
    the range every record time is in (`unix_seconds`): what the gateway logs, the evaluator
    reads."""
    if value is None:
        return now
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds: float | None = value
    elif isinstance(value, str):
        seconds = _iso_seconds(value)
    else:
        raise LabelError("event_time must be ISO 8601 or unix seconds, got "
                         f"{type(value).__name__}")
    try:
        checked = unix_seconds("event_time", seconds)
    except TimeRangeError as exc:
        raise LabelError(f"{exc}" if seconds is value else f"{exc} (from {value!r})") from None
    assert checked is not None  # a number: in range, or it raised
    return checked


def _iso_seconds(value: str) -> float:
    """An ISO 8601 time with a timezone as unix seconds (inf past 9999); LabelError if it is
    not one.

    RFC 3339 (the OpenAPI `date-time` the feedback schema names) also allows a lower-case t and
    z and a leap second, which Python's ISO reader does not: a leap second is read as the start
    of the next second.
    """
    text = value.upper().replace("Z", "+00:00")
    leap = _LEAP_SECOND.fullmatch(text)
    try:
        if leap is not None:
            parsed = datetime.fromisoformat(leap.expand(r"\g<head>59\g<tail>")) \
                + timedelta(seconds=1)
        else:
            parsed = datetime.fromisoformat(text)
    except ValueError:
        raise LabelError(f"event_time {value!r} is not ISO 8601 or unix seconds") from None
    except OverflowError:  # a leap second at the end of 9999: past the last date there is
        return math.inf
    if parsed.tzinfo is None:
        raise LabelError(f"event_time {value!r} has no timezone")
    return parsed.timestamp()


def label_from_feedback(item: object, now: float) -> LabelRecord:
    """One posted feedback item -> the label record the gateway logs; raises LabelError."""
    if not isinstance(item, dict):
        raise LabelError(f"expected an object, got {type(item).__name__}")
    request_id = item.get("request_id")
    if request_id is None or request_id == "":
        raise LabelError("'request_id' must be a non-empty string")
    problem = request_id_problem(request_id)  # the same rule as the inference ids it joins
    if problem is not None:
        raise LabelError(f"'request_id' {problem}")
    assert isinstance(request_id, str)  # request_id_problem said so
    unknown = sorted(set(item) - FEEDBACK_FIELDS)
    if unknown:
        raise LabelError(f"unknown field(s) {', '.join(map(str, unknown))}")
    label, reward, index = label_values(item.get("label"), item.get("reward"),
                                        item.get("index", 0))
    record: LabelRecord = {
        "schema_version": SCHEMA_VERSION,
        "kind": "label",
        "request_id": request_id,
        "label": label,
        "reward": reward,
        "event_time": event_time(item.get("event_time"), now),
        "received_ts": now,
    }
    if index:
        record["index"] = index
    return record
