"""The data plane's callback style, and the one bridge from it to `await`.

Why callbacks: on the champion's path a Task per request and a Future plus a timeout context
per upstream call cost ~0.03–0.06 ms of CPU per request (issue 15); a completion callback and a
timer handle do the same job. Each step (pool call, upstream call, inference) is written once,
in callback form, and its coroutine API is that same step awaited through `wait_for`: the two
styles cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# A deadline timer may run this early (event loops round timers to their clock resolution); an
# item whose deadline is this close is due, as its own timer would have fired now.
TIMER_SLACK = 0.001


class Cancellable(Protocol):
    """A started call; `cancel` abandons it (its callback is then never called)."""

    def cancel(self) -> object: ...


def settle(future: asyncio.Future[T], outcome: T) -> None:
    """Hand a callback's outcome to a waiting coroutine (unless it stopped waiting)."""
    if not future.done():
        future.set_result(outcome)


async def wait_for(start: Callable[[Callable[[T | Exception], None]], Cancellable]) -> T:
    """Run a callback-style call as a coroutine: `start(on_done)` begins it and `on_done`
    receives its result or its exception (raised here). Cancelling the waiter cancels the call.
    """
    future: asyncio.Future[T | Exception] = asyncio.get_running_loop().create_future()
    call = start(partial(settle, future))
    try:
        outcome = await future
    except BaseException:
        call.cancel()
        raise
    finally:
        del future  # an error's traceback holds this frame: no cycle back to the error
    if isinstance(outcome, Exception):
        try:
            raise outcome
        finally:
            del outcome
    return outcome


class Expiring(Protocol):
    """What `DeadlineWatch` watches: a deadline in loop time, and whether it has ended."""

    deadline: float
    ended: bool


E = TypeVar("E", bound=Expiring)


class DeadlineWatch(Generic[E]):
    """Items (pool calls, shadow copies) whose deadlines come in order, watched by one loop
    timer set for the earliest instead of a timer each: with uvloop a timer made and cancelled
    per call cost ~2.5 µs, as much as the rest of the call's bookkeeping.

    `expire(item)` is called once for each item whose deadline has come. Items that end earlier
    stay in `items` until they reach the front: their owner drops them there as they end
    (`while items and items[0].ended: items.popleft()`), so they are freed by refcount, not
    held until the timer passes, and no timer is cancelled per item.
    """

    __slots__ = ("_expire", "_latest", "_loop", "_timer", "items")

    def __init__(self, expire: Callable[[E], object]) -> None:
        self._expire = expire
        self.items: deque[E] = deque()  # in deadline order
        self._latest = 0.0  # the deadline of the last item watched
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None  # None: nothing watched

    def watch(self, loop: asyncio.AbstractEventLoop, item: E) -> bool:
        """Watch `item`; False if it is due before items already watched (or before the timer
        still set for them): the caller then gives it a timer of its own."""
        deadline = item.deadline
        if self._timer is not None and deadline < self._latest:
            return False
        self.items.append(item)
        self._latest = deadline
        if self._timer is None:
            self._loop = loop
            self._timer = loop.call_at(deadline, self._fire)
        return True

    def _fire(self) -> None:
        """Expire every item whose deadline has come, then set the timer for the earliest
        left. `_timer` stays set meanwhile, so an item watched by an `expire` callback (a
        caller starting its next call) does not set a second timer."""
        loop = self._loop
        assert loop is not None
        due = loop.time() + TIMER_SLACK
        items = self.items
        while items:
            item = items[0]
            if item.deadline > due and not item.ended:
                self._timer = loop.call_at(item.deadline, self._fire)
                return
            items.popleft()
            if not item.ended:
                try:
                    self._expire(item)
                except Exception:  # one item's bug must not leave the others unwatched
                    log.exception("deadline expiry failed")
        self._timer = None
