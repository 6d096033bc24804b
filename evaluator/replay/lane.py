"""The replay's own lane to Triton: a rate cap, a small pool, and shedding when busy.

Why a lane of its own: a replay shares Triton (and often the challenger's model instances) with
live traffic, so it must never queue in front of the champion. Three limits, each for a reason:

- `TokenBucket`: at most `rate` calls per second on average (bursts of at most `burst`), so a
  14-day log is resent at a pace the operator chose, not as fast as Triton answers;
- its own `KeepAlivePool` of `concurrency` connections (the gateway's lean pool, a separate
  instance): the replay never takes a connection the gateway's lanes need;
- shedding: when Triton is busy the call that is due is not queued: its turn is dropped
  (counted in `shed`) and it waits for the next token. Busy means every slot is taken (Triton
  answers slower than the cap), or the replay's recent call latency (an EWMA) is more than
  `slow_factor` times the fastest call seen (Triton's idle service time): live traffic is
  loading it. Each shed turn decays the EWMA toward that floor, so the replay probes again
  after a pause. A loaded Triton thus slows the replay down instead of the replay slowing
  Triton (and the champion) down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from gateway.upstream.keepalive import KeepAlivePool, RawResponse


class TokenBucket:
    """`rate` tokens per second, at most `burst` banked; `clock` injectable for tests."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate / 20))
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def reserve(self) -> float:
        """Take the next token now and return how long to wait until it is due (0: at once).

        Tokens may go negative: each reservation books the next slot, so calls are spaced
        exactly 1/rate apart however the caller's wake-ups jitter, and the long-run rate never
        exceeds `rate` (plus the initial `burst`)."""
        self._refill()
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self) -> None:
        """Wait for a token and take it."""
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


class ReplayLane:
    """Rate-capped, concurrency-limited POSTs to one Triton; sheds instead of queueing."""

    def __init__(self, triton_url: str, rate: float, concurrency: int = 4,
                 timeout_s: float = 5.0, slow_factor: float = 3.0) -> None:
        parts = urlsplit(triton_url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"Triton URL needs a host and a port: {triton_url!r}")
        self.url = triton_url
        self.bucket = TokenBucket(rate)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._pool = KeepAlivePool(parts.hostname, parts.port, concurrency)
        self.slow_factor = slow_factor
        self.in_flight = 0
        self.shed = 0
        self.fastest: float | None = None  # seconds: the fastest call seen
        self.recent: float | None = None  # seconds: EWMA of recent call latencies

    @property
    def busy(self) -> bool:
        if self.in_flight >= self.concurrency:
            return True
        return (self.fastest is not None and self.recent is not None
                and self.recent > self.slow_factor * self.fastest)

    def observe(self, latency_s: float) -> None:
        """A finished call's service time: the floor and the recent level of Triton's."""
        self.fastest = latency_s if self.fastest is None else min(self.fastest, latency_s)
        self.recent = latency_s if self.recent is None else 0.8 * self.recent + 0.2 * latency_s

    async def turn(self) -> bool:
        """Wait for the next token; False (a shed turn) when every slot is busy then."""
        await self.bucket.acquire()
        if self.busy:
            self.shed += 1
            if self.recent is not None and self.fastest is not None:
                self.recent = 0.9 * self.recent + 0.1 * self.fastest  # probe again later
            return False
        return True

    async def post(self, path: str, body: bytes, content_type: str,
                   extra_headers: bytes = b"") -> RawResponse:
        """One call on the lane's own pool, bounded by the lane's timeout."""
        self.in_flight += 1
        try:
            response = await asyncio.wait_for(
                self._pool.post(path, body, content_type, extra_headers), self.timeout_s)
            self.observe(response.latency_s)
            return response
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        self._pool.close()
