"""Where the challenger registry's state lives, and how replicas see each other's changes.

`RegistryStore` is the interface the registry (gateway/control/registry.py) talks to; two
implementations, chosen with the other backends in `gateway.backends.factory`:

- `FileStore` (gateway/backends/file_store.py, embedded default, `admin.state_path`): one JSON
  file holding every route's state, shared by the replicas of one machine.
- `KafkaStore` (gateway/backends/kafka_store.py, `log.sink: kafka`): a compacted topic
  (`log.kafka.registry_topic`), key = route, value = the route's full state, followed by every
  replica.

Conflicts. Every route state has a version; `commit(state, expected_version)` is a
compare-and-set on it and raises `StaleWrite` when the stored version is not the expected one.
The registry recomputes and retries an implicit change on the newer state (so no update is
lost), and answers 409 when the client pinned a version (`expected_version` / `If-Match`).

Both stores deliver states to one `on_change` callback, in order; `commit` returns only after
the committed state has been delivered, so the replica that made a change serves it at once.

A state carries the audit entry of the change that produced it, but a replica is not
guaranteed to see every state: the file store's poll sees only the latest one. `changes()` is
how a replica's audit view becomes complete: once it returns, every change any replica applied
before the call is among the entries this or an earlier call returned, or was delivered to
`on_change` with its state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from gateway.control.state import RouteState

OnChange = Callable[[RouteState], None]


class StaleWrite(Exception):
    """The stored version of a route is not the one the write was based on."""

    def __init__(self, route: str, expected: int, actual: int) -> None:
        super().__init__(f"route '{route}' is at version {actual}, not {expected}")
        self.route = route
        self.expected = expected
        self.actual = actual


class RegistryStore(Protocol):
    """Durable, shared registry state. One instance per gateway process."""

    async def start(self, on_change: OnChange) -> None:
        """Load the existing state (delivering every route to `on_change`), then follow changes
        made by other replicas until `close`."""

    async def latest(self, route: str) -> RouteState | None:
        """The freshest stored state of one route (None if the store never saw it)."""

    async def commit(self, state: RouteState, expected_version: int) -> RouteState:
        """Store `state` if the route is still at `expected_version` (0: absent), else raise
        StaleWrite. Returns once `on_change` has seen the state."""

    async def changes(self) -> list[dict[str, Any]]:
        """Catch up with every change committed so far, by any replica: the audit entries of
        those not yet returned that `on_change` may not have carried (any order; the audit log
        orders and deduplicates). Raises UpstreamUnavailable when the store cannot tell."""

    async def close(self) -> None:
        """Stop following; release files and connections."""
