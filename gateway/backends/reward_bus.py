"""The reward bus: how reward events reach every replica's exploration policies.

Why a bus: the policies' posteriors must survive restarts and be shared by every replica, but a
label can arrive at any replica while only the replica that served the request remembers which
arm did (gateway/explore/rewards.py). So a resolved label becomes a small *reward event*
`{route, arm, reward}` published on a shared, durable, ordered log, and every replica — the
publisher included — applies events only as it reads them back. Replaying the log from the
start on boot rebuilds the same posterior on every replica.

Two buses, like the other backends (chosen in `gateway.backends.factory`):
- `FileRewardBus` (gateway/backends/file_bus.py, embedded default): an append-only JSONL file
  next to the registry state; replicas on one machine tail it.
- `KafkaRewardBus` (gateway/backends/kafka_bus.py, `log.sink: kafka`): topic
  `log.kafka.rewards_topic`, read from the beginning by every replica (no consumer group: each
  replica needs every event); labels are read from `labels_topic` by every replica too, so
  whichever replica served a request credits it, wherever the label was posted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from understudy.records import LabelRecord

RewardEvent = dict[str, Any]  # {"route": str, "arm": str, "reward": float, "request_id": str}
ApplyReward = Callable[[RewardEvent], None]
LabelHandler = Callable[[Sequence[LabelRecord]], None]


class RewardBus(Protocol):
    async def start(self, apply: ApplyReward, on_labels: LabelHandler) -> None:
        """Replay every past event through `apply`, then keep following new ones.

        A bus that also carries labels between replicas hands them to `on_labels`.
        """

    async def publish(self, event: RewardEvent) -> None: ...

    async def close(self) -> None: ...
