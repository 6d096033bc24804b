"""One way for every Kafka client of the gateway to connect and retry: capped backoff.

The log sink, the registry store and the reward bus all start (or restart) a client that may
find the broker down. None of them may fail the gateway for it: each keeps trying, waiting a
little longer each time, and says so in its own words. `Backoff` holds the delay sequence (the
sink shares it between failed connections and failed sends, so it is an object, not a loop
variable) and `connect_with_retry` is the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# What a failed attempt is reported with: the error and the delay before the next attempt
# (None when the caller gave up and no attempt follows).
OnFailure = Callable[[BaseException, float | None], None]


class Backoff:
    """Delays that start at `base_s` and grow by `factor` up to `max_s`; `reset` after success.

    `factor=1` gives a fixed retry interval.
    """

    def __init__(self, base_s: float, max_s: float, factor: float = 2.0) -> None:
        if base_s < 0 or max_s < base_s or factor < 1:
            raise ValueError(f"invalid backoff: base {base_s}, max {max_s}, factor {factor}")
        self.base_s = base_s
        self.max_s = max_s
        self.factor = factor
        self._next = base_s

    def next(self) -> float:
        """The delay to wait now; the following one grows (up to the cap)."""
        delay = self._next
        self._next = min(self._next * self.factor, self.max_s)
        return delay

    def reset(self) -> None:
        """Back to the shortest delay (after something worked)."""
        self._next = self.base_s


async def connect_with_retry(
    connect: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    errors: tuple[type[BaseException], ...] = (Exception,),
    on_failure: OnFailure | None = None,
    give_up: Callable[[], bool] = lambda: False,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T | None:
    """Call `connect` until it returns; between failures wait `backoff.next()` via `pause`.

    Only `errors` are retried (anything else, cancellation included, propagates). After a
    failure, `give_up()` true ends the loop with None: a client that is shutting down tries
    once and stops. `connect` cleans up after its own failed attempt. The backoff is not reset
    here: the caller knows when the connection has proved itself.
    """
    while True:
        try:
            return await connect()
        except errors as exc:
            if give_up():
                if on_failure is not None:
                    on_failure(exc, None)
                return None
            delay = backoff.next()
            if on_failure is not None:
                on_failure(exc, delay)
        await pause(delay)
