"""The data plane's callback style, and the one bridge from it to `await`.

Why callbacks: on the champion's path a Task per request and a Future plus a timeout context
per upstream call cost ~0.03–0.06 ms of CPU per request (issue 15); a completion callback and a
timer handle do the same job. Each step (pool call, upstream call, inference) is written once,
in callback form, and its coroutine API is that same step awaited through `wait_for`: the two
styles cannot drift apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

T = TypeVar("T")


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
