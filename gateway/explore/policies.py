"""Exploration policies: which arm (champion or explore challenger) serves a request, and with what
probability.

This module is pure (no I/O, no metrics, no clock on the request path) so it can be tested on its
own; the gateway wires it into the request and feedback paths. Docs: docs/EXPLORATION.md.

Every policy works the same way at decision time:

1. `probabilities(arms)` gives each arm's selection probability under the current state. It is
   computed once and cached until the next `update()` (Thompson's numerical integration is far
   too slow for the request path; a cache hit is one dict lookup).
2. `decide()` draws one uniform u in [0, 1) (from the caller's RNG, or from a stable hash of the
   sticky key) and picks the arm by inverse CDF over those probabilities in the given arm order.
3. The served arm's probability is logged as its propensity, together with every arm's
   probability. Because the arm is *sampled from exactly that vector*, the logged propensity is the
   probability that was actually used (up to float rounding, ~1e-16), which is what off-policy
   estimators (IPS, SNIPS, DR) in the evaluator need.

Arm order is the route's `explore_arms`: champion first. Rewards are kept as additive sufficient
statistics per arm (count, reward sum), the same for every policy type, so state is JSON-able,
survives a policy switch, and replicas can share it.

Not thread-safe: one instance belongs to one event loop (the gateway is single-threaded asyncio).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from gateway.config import PolicyConfig
from gateway.explore.thompson import thompson_probabilities

Rng = random.Random | np.random.Generator

STATE_VERSION = 1
_CACHE_LIMIT = 32  # distinct arm tuples cached per policy; routes change rarely


@dataclass(frozen=True, slots=True)
class Decision:
    """One exploration decision, as logged: served arm, its propensity, every arm's probability."""

    arm: str
    propensity: float
    probabilities: dict[str, float]


@runtime_checkable
class Policy(Protocol):
    """What the gateway needs from an exploration policy (see module docstring)."""

    def decide(self, arms: Sequence[str], key: str | None, rng: Rng) -> Decision:
        """Pick the serving arm; sticky by `key` when given, else one draw from `rng`."""
        ...

    def probabilities(self, arms: Sequence[str]) -> dict[str, float]:
        """Every arm's selection probability under the current state (sums to 1)."""
        ...

    def update(self, arm: str, reward: float) -> None:
        """Record one reward for an arm; invalidates the cached probabilities."""
        ...

    def means(self, arms: Sequence[str]) -> dict[str, float | None]:
        """Per-arm mean reward estimate (posterior mean for Thompson), for metrics and reports."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-able snapshot of the learned state, for persistence and replica sharing."""
        ...

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the learned state with a snapshot produced by `state()` (any policy type)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The log record's `policy` field: {"type": ..., params}."""
        ...


def sticky_uniform(salt: str, key: str) -> float:
    """Map (salt, key) to a uniform float in [0, 1), stable across processes and restarts.

    blake2b is stable everywhere (unlike Python's salted `hash`). The top 53 bits are used so the
    result is exactly representable and strictly below 1 (a 64-bit int / 2**64 can round to 1.0).
    The salt (the route name) decorrelates the assignment of one key across routes.
    """
    data = f"{len(salt)}:{salt}:{key}".encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"understudy-stky").digest()
    return (int.from_bytes(digest, "big") >> 11) * 2.0**-53


@dataclass(frozen=True, slots=True)
class _Table:
    """Cached decision table for one arm tuple: probabilities and their inverse-CDF thresholds."""

    arms: tuple[str, ...]
    probs: tuple[float, ...]
    cum: tuple[float, ...]
    mapping: dict[str, float]


def _make_table(arms: tuple[str, ...], probs: Sequence[float]) -> _Table:
    """Build the inverse-CDF table; arms with probability 0 can never be picked.

    The last arm with positive probability gets threshold exactly 1.0 (absorbing float rounding),
    so every u in [0, 1) maps to an arm and zero-probability arms are never selected.
    """
    p = [max(0.0, float(x)) for x in probs]
    total = math.fsum(p)
    if not total > 0.0 or not math.isfinite(total):
        raise ValueError(f"invalid probability vector {list(probs)!r}")
    p = [x / total for x in p]
    cum: list[float] = []
    acc = 0.0
    for x in p:
        acc += x
        cum.append(acc)
    last = max(i for i, x in enumerate(p) if x > 0.0)
    for i in range(last, len(cum)):
        cum[i] = 1.0
    return _Table(arms, tuple(p), tuple(cum), dict(zip(arms, p, strict=True)))


def _check_arms(arms: tuple[str, ...]) -> None:
    if not arms:
        raise ValueError("a policy needs at least one arm")
    if len(set(arms)) != len(arms):
        raise ValueError(f"duplicate arms in {arms!r}")


def finite(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return x


class _StatsPolicy:
    """Shared machinery: per-arm (count, reward sum), cached decision tables, state, decide()."""

    kind: ClassVar[str] = ""

    def __init__(self, salt: str = "") -> None:
        self.salt = salt
        self._n: dict[str, float] = {}
        self._sum: dict[str, float] = {}
        self._cache: dict[tuple[str, ...], _Table] = {}

    # -- subclass hooks ------------------------------------------------------------------------
    def _compute(self, arms: tuple[str, ...]) -> list[float]:
        raise NotImplementedError

    def _check_reward(self, reward: float) -> None:
        """Subclasses restrict the reward range (Thompson: [0, 1])."""

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind}

    def means(self, arms: Sequence[str]) -> dict[str, float | None]:
        return {a: (self._sum[a] / self._n[a] if self._n.get(a) else None) for a in arms}

    # -- decisions -----------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._cache.clear()

    def _table(self, arms: Sequence[str]) -> _Table:
        key = arms if isinstance(arms, tuple) else tuple(arms)
        table = self._cache.get(key)
        if table is None:
            _check_arms(key)
            table = _make_table(key, self._compute(key))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = table
        return table

    def probabilities(self, arms: Sequence[str]) -> dict[str, float]:
        return dict(self._table(arms).mapping)

    def decide(self, arms: Sequence[str], key: str | None, rng: Rng) -> Decision:
        """Inverse-CDF pick: u from the sticky hash when a key is given, else one `rng.random()`.

        Sticky: u is a deterministic function of (salt, key), uniform over keys, so the same key
        gets the same arm while the probabilities are unchanged, and over the key population arm i
        is chosen with probability p_i: its propensity is still p_i. When the probabilities move,
        only keys whose u lies near a moved threshold switch arm. Note for off-policy analysis:
        requests of one key are then not independent draws (cluster by key).
        """
        table = self._table(arms)
        u = sticky_uniform(self.salt, key) if key is not None else rng.random()
        i = bisect_right(table.cum, u)
        return Decision(table.arms[i], table.probs[i], dict(table.mapping))

    # -- learning ------------------------------------------------------------------------------
    def update(self, arm: str, reward: float) -> None:
        r = finite(reward, "reward")
        self._check_reward(r)
        self._n[arm] = self._n.get(arm, 0.0) + 1.0
        self._sum[arm] = self._sum.get(arm, 0.0) + r
        self._invalidate()

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policy": self.describe(),
            "arms": {a: {"n": self._n[a], "reward_sum": self._sum[a]} for a in self._n},
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Validate fully, then replace: a bad snapshot leaves the current state untouched."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported policy state (want version {STATE_VERSION})")
        arms = state.get("arms")
        if not isinstance(arms, Mapping):
            raise ValueError("policy state: 'arms' must be a mapping")
        n: dict[str, float] = {}
        sums: dict[str, float] = {}
        for arm, stats in arms.items():
            if not isinstance(arm, str) or not isinstance(stats, Mapping):
                raise ValueError(f"policy state: bad entry for arm {arm!r}")
            count = finite(stats.get("n"), f"state[{arm}].n")
            total = finite(stats.get("reward_sum"), f"state[{arm}].reward_sum")
            if count < 0:
                raise ValueError(f"state[{arm}].n must be >= 0")
            self._check_stats(arm, count, total)
            n[arm], sums[arm] = count, total
        self._n, self._sum = n, sums
        self._invalidate()

    def _check_stats(self, arm: str, n: float, reward_sum: float) -> None:
        """Subclasses check that loaded statistics fit their reward range."""


class ChampionPolicy(_StatsPolicy):
    """No exploration: always the champion (arms[0]) with propensity 1.

    Rewards are still recorded so that switching the route to a bandit later keeps the evidence.
    """

    kind = "champion"

    def _compute(self, arms: tuple[str, ...]) -> list[float]:
        return [1.0] + [0.0] * (len(arms) - 1)


class EpsilonGreedy(_StatsPolicy):
    """Exploit the best empirical mean; with probability epsilon explore uniformly over ALL arms.

    Exploring over all K arms (greedy one included) keeps the propensities exact and simple:
    greedy arm 1 - epsilon + epsilon/K, every other arm epsilon/K; every arm keeps probability
    >= epsilon/K, so the logs support off-policy evaluation of any policy when epsilon > 0.
    Greedy = highest mean among arms that have rewards, ties to the earliest arm in the given order
    (champion first); with no rewards at all the champion is greedy. Rewards may be any finite real.
    """

    kind = "epsilon_greedy"

    def __init__(self, epsilon: float = 0.1, salt: str = "") -> None:
        super().__init__(salt)
        eps = finite(epsilon, "epsilon")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        self.epsilon = eps

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "epsilon": self.epsilon}

    def greedy(self, arms: Sequence[str]) -> str:
        """The exploit arm: best empirical mean, ties to the earliest arm, champion if no data."""
        best, best_mean = arms[0], -math.inf
        for arm in arms:
            n = self._n.get(arm, 0.0)
            if n > 0 and self._sum[arm] / n > best_mean:
                best, best_mean = arm, self._sum[arm] / n
        return best

    def _compute(self, arms: tuple[str, ...]) -> list[float]:
        k = len(arms)
        g = arms.index(self.greedy(arms))
        probs = [self.epsilon / k] * k
        probs[g] = 1.0 - self.epsilon * (k - 1) / k  # = 1 - eps + eps/K, exactly 1.0 when K == 1
        return probs


class ThompsonSampling(_StatsPolicy):
    """Beta-Bernoulli Thompson sampling; a reward r in [0, 1] adds r to alpha and 1 - r to beta.

    Instead of drawing one sample per arm and taking the argmax, the decision samples the arm from
    P(arm's draw is the largest) (`thompson_probabilities`). Both procedures give each arm the
    same probability, so they are distributionally identical for a single decision, and this one
    makes the logged propensity exactly the probability used (posterior sampling has no
    closed-form propensity) and costs one uniform draw per request instead of K Beta draws.

    `min_refresh_s` > 0 lets the cached vector live that long after an update (for very high
    label rates); the logged propensity is still the vector actually used.
    """

    kind = "thompson"

    def __init__(
        self,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        salt: str = "",
        min_refresh_s: float = 0.0,
    ) -> None:
        super().__init__(salt)
        self.prior_alpha = finite(prior_alpha, "prior_alpha")
        self.prior_beta = finite(prior_beta, "prior_beta")
        if self.prior_alpha <= 0 or self.prior_beta <= 0:
            raise ValueError("Thompson priors must be > 0")
        self.min_refresh_s = max(0.0, finite(min_refresh_s, "min_refresh_s"))
        self._dirty = False
        self._computed_at = 0.0

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "prior_alpha": self.prior_alpha, "prior_beta": self.prior_beta}

    def posterior(self, arm: str) -> tuple[float, float]:
        """(alpha, beta) of the arm's Beta posterior."""
        n, s = self._n.get(arm, 0.0), self._sum.get(arm, 0.0)
        return self.prior_alpha + s, self.prior_beta + (n - s)

    def means(self, arms: Sequence[str]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for arm in arms:
            al, be = self.posterior(arm)
            out[arm] = al / (al + be)
        return out

    def _check_reward(self, reward: float) -> None:
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"Thompson sampling needs rewards in [0, 1], got {reward!r}")

    def _check_stats(self, arm: str, n: float, reward_sum: float) -> None:
        if not 0.0 <= reward_sum <= n:
            raise ValueError(f"state[{arm}]: reward_sum must be in [0, n] for Thompson sampling")

    def _invalidate(self) -> None:
        if self.min_refresh_s <= 0.0:
            self._cache.clear()
        else:
            self._dirty = True

    def _table(self, arms: Sequence[str]) -> _Table:
        if self._dirty and time.monotonic() - self._computed_at >= self.min_refresh_s:
            self._cache.clear()
            self._dirty = False
        return super()._table(arms)

    def _compute(self, arms: tuple[str, ...]) -> list[float]:
        post = [self.posterior(a) for a in arms]
        self._computed_at = time.monotonic() if self.min_refresh_s > 0 else 0.0
        probs = thompson_probabilities([p[0] for p in post], [p[1] for p in post])
        return [float(p) for p in probs]

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        self._cache.clear()
        self._dirty = False


def build_policy(config: PolicyConfig, salt: str = "") -> Policy:
    """Policy for a route's `PolicyConfig`; `salt` (the route name) scopes sticky hashing."""
    if config.type == "champion":
        return ChampionPolicy(salt=salt)
    if config.type == "epsilon_greedy":
        return EpsilonGreedy(config.epsilon, salt=salt)
    if config.type == "thompson":
        return ThompsonSampling(config.prior_alpha, config.prior_beta, salt=salt)
    if config.type == "rollout":
        from gateway.explore.rollout import RolloutPolicy  # lazily: it subclasses _StatsPolicy

        return RolloutPolicy(str(config.target), config.fraction, salt=salt)
    raise ValueError(f"unknown policy type {config.type!r}")
