"""The control plane's audit trail: who changed which route, when, from what to what.

Every change the admin API accepts *or refuses* becomes one entry: on the log sink's "audit"
stream (Kafka topic `understudy.audit`, or the local segment files: the durable record) and in
a bounded in-memory list served by `GET /admin/audit`. Changes made on another replica arrive
with the route state they produced and are added to the in-memory list too (but not emitted
again: the replica that made the change already did), so any replica answers for all of them.

Identities are a scope plus a short fingerprint of the token, never the token: the fingerprint
is a slow salted hash (PBKDF2), so even a weak token cannot be recovered from the audit stream,
while the same token always shows up with the same fingerprint on every replica.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.logsink import LogSink
from gateway.records import AUDIT, SCHEMA_VERSION

FINGERPRINT_SALT = b"understudy-admin-token-fingerprint/1"
FINGERPRINT_ROUNDS = 100_000


def token_fingerprint(token: str) -> str:
    """A 12-hex-digit, non-reversible, stable identifier of a token (computed once per token)."""
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), FINGERPRINT_SALT, FINGERPRINT_ROUNDS)
    return digest[:6].hex()


@dataclass(frozen=True)
class Actor:
    """Who made a change: `scope` is write/read for tokens, `config` for YAML seeding."""

    scope: str
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "fingerprint": self.fingerprint}


CONFIG_ACTOR = Actor("config")


def new_entry(
    actor: Actor,
    action: str,
    route: str,
    *,
    replica: str,
    before: Any = None,
    after: Any = None,
    version: int | None = None,
    outcome: str = "applied",
    error: str | None = None,
    request: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One audit entry (record schema: `kind: "audit"`, see gateway/records.py)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "audit",
        "id": uuid.uuid4().hex,
        "ts": time.time(),
        "actor": actor.to_json(),
        "action": action,
        "route": route,
        "version": version,
        "outcome": outcome,  # applied | rejected
        "error": error,
        "request": dict(request) if request is not None else None,
        "before": before,
        "after": after,
        "replica": replica,
    }


class AuditLog:
    """Recent entries in memory (bounded) and every local entry on the sink's audit stream."""

    def __init__(self, sink: LogSink, capacity: int = 1000) -> None:
        self.sink = sink
        self.capacity = capacity
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def remember(self, entry: Mapping[str, Any]) -> None:
        """Keep an entry for `recent` (idempotent by entry id)."""
        entry_id = str(entry.get("id", ""))
        if not entry_id or entry_id in self._entries:
            return
        self._entries[entry_id] = dict(entry)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def emit(self, entry: Mapping[str, Any]) -> None:
        """Remember the entry and write it to the durable audit stream (key = route)."""
        self.remember(entry)
        self.sink.emit(AUDIT, str(entry.get("route", "")), orjson.dumps(entry))

    def recent(self, limit: int = 100, route: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        entries = [e for e in self._entries.values() if route is None or e.get("route") == route]
        entries.sort(key=lambda e: float(e.get("ts") or 0.0), reverse=True)
        return entries[: max(limit, 0)]
