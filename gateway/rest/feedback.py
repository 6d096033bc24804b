"""Ground-truth labels and rewards posted to the gateway (`POST /v2/feedback`).

Labels are validated item by item: good items of a batch are kept even when others are bad,
and the response lists each bad item with its reason. Accepted labels go to the log sink's
"labels" stream (Kafka topic `understudy.labels`, or the local segment files) for the
evaluator, and to any listeners (the exploration policies' reward updates).

Before a label is logged, the reward the gateway computes for the route's policy from it
(`policy.reward: correct | label | reward`, gateway/explore/credit.py `reward_from_label`)
replaces
the posted `reward` when this replica knows the request (it served it under an exploring policy
and still remembers it), so the evaluator's off-policy estimates see the reward the policy saw.

`orphans` in the answer counts items whose request id this replica does not know: it has not
recorded that request among its most recent ones (`Recorder.seen`, 100,000 by default). Behind
a load balancer, an id served by another replica is an orphan *here*: the count is a hint for
the poster (wrong ids, labels for traffic that never went through the gateway), not a verdict;
orphans are still accepted and logged, and the evaluator's join decides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson

from gateway import metrics
from gateway.backends import LogSink
from gateway.dataplane.protocol import request_id_problem
from understudy.records import LABELS, SCHEMA_VERSION, LabelRecord

MAX_ITEMS = 10_000
LabelListener = Callable[[Sequence[LabelRecord]], None]
# The policy's reward for a label, when this replica can compute it (else None).
RewardFn = Callable[[LabelRecord], float | None]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _event_time(value: Any, now: float) -> float:
    if value is None:
        return now
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"event_time {value!r} is not ISO 8601 or unix seconds") from None
        if parsed.tzinfo is None:
            raise ValueError(f"event_time {value!r} has no timezone")
        return parsed.timestamp()
    raise ValueError(f"event_time must be ISO 8601 or unix seconds, got {type(value).__name__}")


def parse_item(item: Any, now: float) -> LabelRecord:
    """One feedback item → a label record; raises ValueError naming the problem."""
    if not isinstance(item, dict):
        raise ValueError(f"expected an object, got {type(item).__name__}")
    request_id = item.get("request_id")
    if request_id is None or request_id == "":
        raise ValueError("'request_id' must be a non-empty string")
    problem = request_id_problem(request_id)  # the same rule as the inference ids it joins
    if problem is not None:
        raise ValueError(f"'request_id' {problem}")
    unknown = sorted(set(item) - {"request_id", "label", "reward", "event_time", "index"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    label = item.get("label")
    reward = item.get("reward")
    if label is None and reward is None:
        raise ValueError("give 'label' or 'reward'")
    if label is not None and _number(label) is None:
        raise ValueError(f"'label' must be a finite number or boolean, got {label!r}")
    if reward is not None and _number(reward) is None:
        raise ValueError(f"'reward' must be a finite number, got {reward!r}")
    index = item.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError("'index' must be a non-negative integer (row of a batched request)")
    record: LabelRecord = {
        "schema_version": SCHEMA_VERSION,
        "kind": "label",
        "request_id": request_id,
        "label": _number(label) if label is not None else None,
        "reward": _number(reward) if reward is not None else None,
        "event_time": _event_time(item.get("event_time"), now),
        "received_ts": now,
    }
    if index:
        record["index"] = index
    return record


def _open(_: str | None) -> None:
    """The default gate: feedback without a token (no feedback token configured)."""


class FeedbackService:
    def __init__(
        self,
        sink: LogSink,
        listeners: Sequence[LabelListener] = (),
        *,
        known: Callable[[str], bool] | None = None,
        reward: RewardFn | None = None,
    ) -> None:
        self.sink = sink
        self.listeners = list(listeners)
        self.known = known
        self.reward = reward
        # Raises Unauthorized/Forbidden; set by the admin wiring (AdminAuth.authorize_feedback).
        self.authorize: Callable[[str | None], None] = _open

    async def accept(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Validate and store a single item or a batch; returns (HTTP status, response body)."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return 400, {"error": f"malformed JSON: {exc}", "accepted": 0}
        items = payload if isinstance(payload, list) else [payload]
        if not items:
            return 400, {"error": "empty batch: nothing to accept", "accepted": 0}
        if len(items) > MAX_ITEMS:
            return 413, {"error": f"batch of {len(items)} items exceeds {MAX_ITEMS}",
                         "accepted": 0}
        now = time.time()
        accepted: list[LabelRecord] = []
        rejected: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            try:
                accepted.append(parse_item(item, now))
            except ValueError as exc:
                rejected.append({"index": i, "error": str(exc)})
        orphans = 0
        for record in accepted:
            if self.known is not None and not self.known(record["request_id"]):
                orphans += 1
            if self.reward is not None:
                computed = self.reward(record)
                if computed is not None:
                    record["reward"] = computed
            self.sink.emit(LABELS, record["request_id"], orjson.dumps(record))
        metrics.LOG_RECORDS.labels(LABELS, "accepted").inc(len(accepted))
        metrics.FEEDBACK_ITEMS.labels("accepted").inc(len(accepted))
        metrics.FEEDBACK_ITEMS.labels("rejected").inc(len(rejected))
        for listener in self.listeners:
            listener(accepted)
        if rejected:
            detail = "; ".join(f"item {r['index']}: {r['error']}" for r in rejected[:20])
            return 400, {
                "error": f"{len(rejected)} of {len(items)} feedback item(s) rejected: {detail}",
                "accepted": len(accepted),
                "orphans": orphans,
                "rejected": rejected,
            }
        return 200, {"accepted": len(accepted), "orphans": orphans}
