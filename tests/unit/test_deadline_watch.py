"""One timer for many in-order deadlines (gateway/upstream/callback.py DeadlineWatch): what the
connection pool's calls and a shadow lane's copies time out by."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.upstream.callback import DeadlineWatch


@dataclass
class Item:
    name: str
    deadline: float
    ended: bool = False


async def test_items_expire_in_order_and_ended_ones_are_skipped() -> None:
    loop = asyncio.get_running_loop()
    expired: list[str] = []
    all_expired = asyncio.Event()
    now = loop.time()
    later = Item("later", now + 0.08)

    def expire(item: Item) -> None:
        item.ended = True
        expired.append(item.name)
        if item.name == "a":  # a caller starting its next call from the timeout callback
            assert watch.watch(loop, later)
        if item.name == "later":
            all_expired.set()

    watch: DeadlineWatch[Item] = DeadlineWatch(expire)
    a, answered, b = Item("a", now + 0.02), Item("answered", now + 0.03), Item("b", now + 0.05)
    for item in (a, answered, b):
        assert watch.watch(loop, item)
    assert not watch.watch(loop, Item("early", now + 0.01))  # due before those watched
    answered.ended = True  # answered in time: never expired
    await asyncio.wait_for(all_expired.wait(), 5)
    assert expired == ["a", "b", "later"]
    assert loop.time() >= later.deadline - 0.002  # not early (timers round to ~1 ms)
    assert not watch.items
    # Nothing is watched any more: the next item, however early, starts the timer again.
    assert watch.watch(loop, Item("next", loop.time() + 10))


async def test_an_expiry_that_fails_leaves_the_other_items_watched() -> None:
    loop = asyncio.get_running_loop()
    expired: list[str] = []
    done = asyncio.Event()

    def expire(item: Item) -> None:
        if item.name == "buggy":
            raise RuntimeError("a bug in one owner's timeout handling")
        item.ended = True
        expired.append(item.name)
        done.set()

    watch: DeadlineWatch[Item] = DeadlineWatch(expire)
    now = loop.time()
    assert watch.watch(loop, Item("buggy", now + 0.01))
    assert watch.watch(loop, Item("next", now + 0.03))
    await asyncio.wait_for(done.wait(), 5)
    assert expired == ["next"] and not watch.items
