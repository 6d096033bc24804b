"""The control plane's audit trail: who changed which route, when, from what to what.

Every change the admin API accepts *or refuses* becomes one entry on the log sink's "audit"
stream (Kafka topic `understudy.audit`, or this replica's local segment files: the durable
record) and in a bounded in-memory list (the newest `capacity`, 1000) served by
`GET /admin/audit`.

What `GET /admin/audit` lists, on any replica:

- every change *applied* by any replica sharing the registry, up to the moment of the request:
  before answering, the registry catches up with its store (`RegistryStore.changes`). With the
  state file, other replicas' changes are read from the store's audit journal next to the
  state file, which every commit appends to (gateway/backends/file_store.py); polling the
  state file alone would skip a change superseded between two polls. With Kafka, catching up
  with the registry topic applies every record, each carrying its change's entry;
- every change this replica *refused*, and those other replicas refused only as far as they
  are in the durable stream read at start (one Kafka topic for all replicas; with files, this
  replica's segment files and its `serve --workers` siblings');
- the changes before this replica started: `load_history` reads the durable stream back at
  start, and the first catch-up reads the state file's journal from its start.

Each entry is listed once (entries are keyed by their id), newest first, and one route's
entries are in the order of the route version they produced (a refusal right after the version
it was refused against); routes interleave by time.

Limits: only the newest `capacity` entries are kept; a writer killed between replacing the
state file and appending to the journal leaves that change out of the journal until the next
commit (which appends it first); a store that cannot catch up (Kafka unreachable) fails the
request (503) rather than answer with a list that may miss changes.

Identities are a scope plus a short fingerprint of the token, never the token: the fingerprint
is a slow salted hash (PBKDF2), so even a weak token cannot be recovered from the audit stream,
while the same token always shows up with the same fingerprint on every replica.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.backends.sink import LogSink, StreamReader
from understudy.records import AUDIT, SCHEMA_VERSION

log = logging.getLogger(__name__)

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
    experiments: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One audit entry (record schema: `kind: "audit"`, see understudy/records.py).

    `experiments`: the challengers' experiments this change started ({model: {id, started}}).
    """
    entry = {
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
    if experiments:
        entry["experiments"] = {
            m: e.to_json() if hasattr(e, "to_json") else dict(e) for m, e in experiments.items()
        }
    return entry


class AuditLog:
    """Recent entries in memory (bounded) and every local entry on the sink's audit stream."""

    def __init__(self, sink: LogSink, capacity: int = 1000) -> None:
        self.sink = sink
        self.capacity = capacity
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def load(self, entries: Iterable[Mapping[str, Any]]) -> int:
        """Add past entries (the history read at start) to what is already remembered, keeping
        the newest `capacity` by time; returns how many new ones were kept."""
        merged = {str(e.get("id", "")): dict(e) for e in entries}
        merged.pop("", None)
        if not merged:  # the usual catch-up of `GET /admin/audit`: nothing new, nothing to sort
            return 0
        before = set(self._entries)
        merged.update(self._entries)
        newest = sorted(merged.items(), key=lambda kv: float(kv[1].get("ts") or 0.0))
        self._entries = OrderedDict(newest[-self.capacity:])
        return len(set(self._entries) - before)

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
        """Newest first (`newest_first`)."""
        entries = [e for e in self._entries.values() if route is None or e.get("route") == route]
        return newest_first(entries)[: max(limit, 0)]


def _version_order(entry: Mapping[str, Any]) -> tuple[int, int, float]:
    """Within a route: by the version an applied change produced, a refusal after the version
    it was refused against (its `version`), then by time."""
    version = entry.get("version")
    return (version if isinstance(version, int) else 0, entry.get("outcome") != "applied",
            float(entry.get("ts") or 0.0))


def newest_first(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Entries newest first: each route's in (reverse) version order, even when the replicas'
    clocks disagree, and the routes interleaved by time (each route keeps the places its
    entries have in time order)."""
    by_time = sorted((dict(e) for e in entries), key=lambda e: float(e.get("ts") or 0.0))
    per_route: dict[str, list[dict[str, Any]]] = {}
    for entry in by_time:
        per_route.setdefault(str(entry.get("route", "")), []).append(entry)
    in_order = {r: iter(sorted(es, key=_version_order)) for r, es in per_route.items()}
    ordered = [next(in_order[str(e.get("route", ""))]) for e in by_time]
    ordered.reverse()
    return ordered


def history_entries(records: Iterable[bytes], capacity: int) -> list[dict[str, Any]]:
    """The last `capacity` audit entries among records read back from the audit stream."""
    tail: deque[dict[str, Any]] = deque(maxlen=capacity)
    for line in records:
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("kind") == "audit":
            tail.append(entry)
    return list(tail)


async def load_history(read: StreamReader, capacity: int) -> list[dict[str, Any]]:
    """Past audit entries from the durable stream; empty (and a WARNING) when unreadable."""
    try:
        return history_entries(await read(AUDIT, capacity), capacity)
    except Exception as exc:  # a history we cannot read must not stop the gateway
        log.warning("audit: cannot read past entries from the audit stream (%s); "
                    "GET /admin/audit lists only changes from now on", exc or type(exc).__name__)
        return []
