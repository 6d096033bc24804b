"""Always-valid harm tests for a guarded rollout: is the challenger's rate of bad events higher?

During a rollout step the challenger serves each request with a known probability p (its
logged propensity) and the champion serves the rest, both under the same traffic. A *bad event*
is an error, a latency above the champion's p99, or a loss (1 - reward). If the challenger's
bad-event rate is r_x and the champion's r_c, then, given that a bad event happened, it came
from the challenger with probability

    q = p r_x / (p r_x + (1 - p) r_c),

which is p exactly when the rates are equal (whatever they are: no nuisance parameter), and
grows with the rate ratio rho = r_x / r_c. So "no harm" (rho <= margin) is the one-parameter
null q <= q0 = p margin / (p margin + 1 - p), tested on the stream of bad events alone.

The test is a betting martingale (Waudby-Smith & Ramdas, 2023): after each event bet a fixed
fraction c of the wealth that it came from the challenger, wealth *= 1 + c (X / q0 - 1). Under
the null the wealth is a nonnegative supermartingale, so by Ville's inequality it ever reaches
1/alpha with probability <= alpha: the check may be looked at after every request, forever,
and its type I error stays alpha (no fixed-horizon p-values peeked at repeatedly). Wealth is
averaged over a grid of c (a mixture, itself a martingale), which is what makes it fast against
a broken model (every event from the challenger) and still sensitive to milder harm.

Because every factor depends only on whether the event came from the challenger, the wealth is
a function of two counts: k challenger events among n. For fractional losses (a reward in
[0, 1]) the counts are loss sums; a^L <= 1 + L (a - 1) for L in [0, 1] makes that product no
larger than the linear bet's, so the test stays valid (conservative).

Inverting the test at every margin gives a time-uniform lower confidence bound on rho (a
one-sided confidence sequence for the ratio; rho > 1 is the same as r_x - r_c > 0).

Caveat: events must be independent given the arm. With a sticky header (a user id), a user's
requests share an arm and may share errors; cluster-robust versions are future work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

BET_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
RATIO_GRID_MAX = 1e4


def null_share(p: float, margin: float = 1.0) -> float:
    """q0: the share of bad events the challenger contributes when its rate is `margin` times
    the champion's and it serves a fraction p of requests."""
    return p * margin / (p * margin + (1.0 - p))


def log_wealth(k: ArrayLike, n: ArrayLike, q0: float,
               fractions: Sequence[float] = BET_FRACTIONS) -> Any:
    """log of the mixture wealth after n bad events, k of them the challenger's (element-wise
    over arrays of counts, for simulations; a float for scalars)."""
    kk = np.asarray(k, dtype=np.float64)
    nn = np.asarray(n, dtype=np.float64)
    c = np.asarray(fractions, dtype=np.float64).reshape((-1,) + (1,) * kk.ndim)
    terms = kk * np.log1p(c * (1.0 / q0 - 1.0)) + (nn - kk) * np.log1p(-c)
    out = special.logsumexp(terms, axis=0) - math.log(len(fractions))
    return float(out) if out.ndim == 0 else out


def ratio_lower_bound(k: float, n: float, p: float, alpha: float) -> float:
    """The largest margin the test still rejects at level alpha (0 when it rejects none):
    a time-uniform lower confidence bound on the challenger/champion rate ratio."""
    threshold = math.log(1.0 / alpha)
    if log_wealth(k, n, null_share(p, 1e-6)) < threshold:
        return 0.0
    lo, hi = 1e-6, RATIO_GRID_MAX  # wealth falls as the margin grows: bisect in log space
    if log_wealth(k, n, null_share(p, hi)) >= threshold:
        return hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if log_wealth(k, n, null_share(p, mid)) >= threshold:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuardResult:
    """One guard's state: the evidence, the e-value of 'harm', and whether it breached."""

    name: str
    challenger_events: float
    events: float
    share_null: float
    e_value: float
    breached: bool
    ratio_lower: float

    def to_json(self) -> dict[str, float | str | bool]:
        return {
            "guard": self.name, "challenger_events": round(self.challenger_events, 6),
            "events": round(self.events, 6), "null_share": round(self.share_null, 6),
            "e_value": round(self.e_value, 6), "breached": self.breached,
            "ratio_lower_bound": round(self.ratio_lower, 6),
        }


def harm_test(name: str, challenger_events: float, champion_events: float, p: float,
              alpha: float, margin: float = 1.0) -> GuardResult:
    """Test 'the challenger's bad-event rate exceeds margin x the champion's' at level alpha."""
    n = challenger_events + champion_events
    q0 = null_share(p, margin)
    lw = log_wealth(challenger_events, n, q0)
    return GuardResult(
        name, challenger_events, n, q0, math.exp(min(lw, 700.0)), lw >= math.log(1.0 / alpha),
        ratio_lower_bound(challenger_events, n, p, alpha),
    )
