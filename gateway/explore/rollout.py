"""The serving policy of a guarded rollout: the target serves a fixed fraction of requests.

Built by `build_policy` for a route whose policy is `{"type": "rollout", ...}` (the rollout
controller, gateway/control/rollout.py, sets it one step at a time). It is an exploration policy
like the others: the decision is an inverse-CDF pick over the route's explore arms (champion
first), sticky by key, and the served arm's probability is logged as its propensity, so the
evaluator's off-policy estimates and paired tests read rollout traffic like exploration traffic.
Explore arms other than the target get probability 0 (they are still scored as copies).

Rewards credited through /v2/feedback are counted per arm (the shared `_StatsPolicy` state), and
the controller reads them for its reward guard; rewards outside [0, 1] switch that guard off.
"""

from __future__ import annotations

from typing import Any

from gateway.explore.policies import _StatsPolicy, finite


class RolloutPolicy(_StatsPolicy):
    """Champion `1 - fraction`, `target` `fraction`, every other arm 0."""

    kind = "rollout"

    def __init__(self, target: str, fraction: float, salt: str = "") -> None:
        super().__init__(salt)
        f = finite(fraction, "fraction")
        if not 0.0 < f < 1.0:
            raise ValueError(f"a rollout fraction must be in (0, 1), got {fraction!r}")
        self.target = target
        self.fraction = f
        self.unit_rewards = True  # every reward so far in [0, 1]

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "target": self.target, "fraction": self.fraction}

    def _compute(self, arms: tuple[str, ...]) -> list[float]:
        probs = [0.0] * len(arms)
        probs[0] = 1.0
        if self.target in arms[1:]:
            probs[0] = 1.0 - self.fraction
            probs[arms.index(self.target)] = self.fraction
        return probs

    def update(self, arm: str, reward: float) -> None:
        super().update(arm, reward)
        if not 0.0 <= float(reward) <= 1.0:
            self.unit_rewards = False

    def reward_stats(self, arm: str) -> tuple[float, float]:
        """(count, reward sum) credited to `arm` since this policy was built."""
        return self._n.get(arm, 0.0), self._sum.get(arm, 0.0)
