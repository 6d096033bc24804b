"""Ground-truth labels and rewards posted to the gateway (`POST /v2/feedback`).

Labels are validated item by item (understudy/labels.py, the validator the evaluator's ingest
also reads labels with): good items of a batch are kept even when others are bad,
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

import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from gateway import metrics
from gateway.backends import LogSink
from understudy.labels import LabelError, label_from_feedback
from understudy.records import LABELS, LabelRecord

MAX_ITEMS = 10_000
LabelListener = Callable[[Sequence[LabelRecord]], None]
# The policy's reward for a label, when this replica can compute it (else None).
RewardFn = Callable[[LabelRecord], float | None]
# One feedback item -> its label record; raises LabelError (a ValueError) naming the problem.
# The contract's validator (understudy/labels.py): the evaluator reads labels by the same rules.
parse_item = label_from_feedback


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
            except LabelError as exc:
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
