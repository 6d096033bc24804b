"""Crediting a label to the arm that served its request: what this replica served
(`RewardTracker`) and what the label is worth to the policy (`reward_from_label`). Pure, like
the policies; gateway/explore/rewards.py wires it to the feedback path and the reward bus."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from gateway.explore.policies import finite

RewardMode = Literal["correct", "label", "reward"]


@dataclass(frozen=True, slots=True)
class ServedEntry:
    """What the gateway served for a request, kept until its label arrives."""

    route: str
    arm: str
    score: float | None
    ts: float


class RewardTracker:
    """Bounded LRU of request id -> ServedEntry, so feedback can be credited to the served arm.

    Memory is bounded by `max_entries` (oldest evicted first, counted in `evicted`); labels for
    evicted, never-seen or already-resolved ids return None and count in `unknown`, so a label
    that arrives twice rewards the policy once. With `max_age_s`, entries older than that resolve
    to None and count in `late`. This is per replica; the evaluator does the durable join.
    """

    def __init__(self, max_entries: int = 100_000, max_age_s: float | None = None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = int(max_entries)
        self.max_age_s = max_age_s
        self._entries: OrderedDict[str, ServedEntry] = OrderedDict()
        self.matched = 0
        self.unknown = 0
        self.late = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def remember(
        self,
        request_id: str,
        route: str,
        arm: str,
        score: float | None,
        ts: float | None = None,
    ) -> None:
        """Record what was served; a reused request id replaces the older entry."""
        entry = ServedEntry(route, arm, score, time.time() if ts is None else ts)
        entries = self._entries
        entries[request_id] = entry
        entries.move_to_end(request_id)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evicted += 1

    def peek(self, request_id: str, now: float | None = None) -> ServedEntry | None:
        """The entry a label would resolve to, without consuming or counting it."""
        entry = self._entries.get(request_id)
        if entry is None or self.max_age_s is None:
            return entry
        current = time.time() if now is None else now
        return None if current - entry.ts > self.max_age_s else entry

    def resolve(self, request_id: str, now: float | None = None) -> ServedEntry | None:
        """Pop the entry for a label; None (and counted) when unknown or older than max_age_s."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            self.unknown += 1
            return None
        if self.max_age_s is not None:
            current = time.time() if now is None else now
            if current - entry.ts > self.max_age_s:
                self.late += 1
                return None
        self.matched += 1
        return entry

    def counters(self) -> dict[str, int]:
        """matched / unknown / late / evicted, for the `understudy_rewards` metric."""
        return {
            "matched": self.matched, "unknown": self.unknown,
            "late": self.late, "evicted": self.evicted,
        }


def reward_from_label(
    label: Any,
    score: float | None,
    threshold: float = 0.5,
    mode: RewardMode = "correct",
    reward: float | None = None,
) -> float:
    """Turn a feedback item into a bandit reward; ValueError when it cannot.

    - "correct": 1.0 if the served prediction's class (score >= threshold) equals the binary label
      (0/1 or bool), else 0.0. Needs the served score.
    - "label": the label itself is the reward (e.g. a 0/1 conversion).
    - "reward": the reward given directly (`reward`, or the label when no reward was sent).
    Range checks belong to the policy (Thompson needs [0, 1]).
    """
    if mode == "correct":
        if score is None:
            raise ValueError("mode 'correct' needs the served prediction score")
        s = finite(score, "score")
        y = finite(label, "label")
        if y not in (0.0, 1.0):
            raise ValueError(f"mode 'correct' needs a binary label (0/1), got {label!r}")
        predicted = 1.0 if s >= threshold else 0.0
        return 1.0 if predicted == y else 0.0
    if mode == "label":
        return finite(label, "label")
    if mode == "reward":
        return finite(reward if reward is not None else label, "reward")
    raise ValueError(f"unknown reward mode {mode!r}")
