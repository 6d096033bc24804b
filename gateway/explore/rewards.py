"""Reward feedback for the exploration policies: credit each label to the arm that served it.

Only the replica that served a request remembers which arm did (a bounded `RewardTracker`), so
it resolves the label into a reward event and publishes it on the reward bus
(gateway/backends/reward_bus.py explains why a bus); every replica, this one included, applies
the events as it reads them back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from gateway import metrics
from gateway.backends.reward_bus import RewardBus, RewardEvent
from gateway.dataplane.routes import RouteTable
from gateway.errors import NotFound
from gateway.explore.credit import RewardTracker, reward_from_label
from understudy.records import LabelRecord

log = logging.getLogger(__name__)


class PolicyLearner:
    """Remembers exploration decisions and turns labels into policy updates via the bus."""

    def __init__(self, routes: RouteTable, bus: RewardBus, tracker: RewardTracker) -> None:
        self.routes = routes
        self.bus = bus
        self.tracker = tracker
        self._publishing: set[asyncio.Task[None]] = set()

    def remember(self, route: str, request_id: str, arm: str, score: float | None) -> None:
        self.tracker.remember(request_id, route, arm, score)

    def reward_for(self, label: LabelRecord) -> float | None:
        """The reward this label gives the policy, if this replica served the request under an
        exploring policy and still remembers it (else None); the label record logs it."""
        entry = self.tracker.peek(label["request_id"])
        if entry is None or entry.route not in self.routes:
            return None
        config = self.routes.get(entry.route).config
        try:
            return reward_from_label(label["label"], entry.score, config.threshold,
                                     config.policy.reward, label["reward"])
        except ValueError:
            return None

    def on_labels(self, labels: Sequence[LabelRecord]) -> None:
        """Feedback listener: resolve each label against what this replica served."""
        for label in labels:
            entry = self.tracker.resolve(label["request_id"])
            if entry is None:
                continue  # not served here, already credited, or forgotten: counted by tracker
            try:
                runtime = self.routes.get(entry.route)
                policy = runtime.config.policy
                reward = reward_from_label(
                    label["label"], entry.score, runtime.config.threshold, policy.reward,
                    label["reward"],
                )
            except (NotFound, ValueError) as exc:
                log.warning("label for %s not usable as a reward: %s", label["request_id"], exc)
                metrics.REWARDS.labels(entry.route, "invalid").inc()
                continue
            metrics.REWARDS.labels(entry.route, "matched").inc()
            event = {"route": entry.route, "arm": entry.arm, "reward": reward,
                     "request_id": label["request_id"]}
            task = asyncio.get_running_loop().create_task(self.bus.publish(event))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    def apply(self, event: RewardEvent) -> None:
        """Bus callback: update the route's policy (ignored when the arm is no longer there)."""
        route = event.get("route")
        if not isinstance(route, str) or route not in self.routes:
            return
        runtime = self.routes.get(route)
        arm = event.get("arm")
        if arm not in runtime.config.explore_arms:
            return
        try:
            runtime.policy.update(str(arm), float(event["reward"]))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring malformed reward event %r: %s", event, exc)
            return
        for name, mean in runtime.policy.means(runtime.config.explore_arms).items():
            if mean is not None:
                metrics.POSTERIOR_MEAN.labels(route, name).set(mean)

    async def drain(self) -> None:
        if self._publishing:
            await asyncio.gather(*list(self._publishing), return_exceptions=True)
