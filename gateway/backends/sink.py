"""The sink interface every log backend implements.

Records are already serialised (orjson bytes) when they reach a sink, so a sink never needs to
know the schema. `emit` is synchronous and never waits on I/O: it is called from the gateway's
background record task, not from the client's critical path, and a sink that cannot keep up
must spill (to disk) rather than drop or block the event loop for long.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

# Reads a stream back from where the configured sink wrote it: (stream, count) -> at least the
# last `count` records (as written), oldest first. The audit log rebuilds its history with it.
StreamReader = Callable[[str, int], Awaitable[list[bytes]]]


@runtime_checkable
class LogSink(Protocol):
    """A destination for the gateway's streams ("inferences", "labels", "audit")."""

    async def start(self) -> None:
        """Open files/connections and start background writers."""

    def emit(self, stream: str, key: str, value: bytes) -> None:
        """Accept one record; must not block on network or disk in the common case."""

    async def flush(self) -> None:
        """Wait until everything emitted so far is durable (written+fsynced, or acked)."""

    async def close(self) -> None:
        """Flush, then release resources. Called on shutdown (SIGTERM included)."""
