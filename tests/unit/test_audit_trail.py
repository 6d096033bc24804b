"""The audit view's completeness: the file store's journal (every applied change, whoever
applied it) and the merge that lists each entry once, one route's entries in version order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.backends.file_store import FileStore, journal_path, last_line, write_states
from gateway.backends.registry_store import StaleWrite
from gateway.config import ModelRef, RouteConfig
from gateway.control.audit import AuditLog, newest_first
from gateway.control.state import RouteState


def _entry(entry_id: str, route: str, version: int | None, ts: float,
           outcome: str = "applied") -> dict[str, Any]:
    return {"kind": "audit", "id": entry_id, "route": route, "version": version, "ts": ts,
            "outcome": outcome, "action": "test"}


def _state(route: str, version: int, champion: str) -> RouteState:
    entry = _entry(f"{route}-v{version}", route, version, float(version))
    return RouteState(route, version, RouteConfig(route, ModelRef(champion)), (), entry, {})


def test_one_routes_entries_follow_its_versions_even_when_clocks_disagree() -> None:
    """Replica B's clock is behind: its v3 has an earlier ts than A's v2. The route still reads
    v3, v2, v1 (newest first); a refusal against v2 sits between v2 and v3."""
    entries = [
        _entry("a-v1", "r", 1, 10.0),
        _entry("a-v2", "r", 2, 20.0),
        _entry("b-v3", "r", 3, 15.0),  # skewed clock
        _entry("b-no", "r", 2, 21.0, outcome="rejected"),
    ]
    assert [e["id"] for e in newest_first(entries)] == ["b-v3", "b-no", "a-v2", "a-v1"]


def test_routes_interleave_by_time_and_keep_their_own_version_order() -> None:
    entries = [
        _entry("r1", "r", 1, 1.0), _entry("q1", "q", 1, 2.0), _entry("r3", "r", 3, 3.0),
        _entry("r2", "r", 2, 4.0),  # r's v2 stamped after its v3: takes v3's place
        _entry("q2", "q", 2, 5.0),
    ]
    assert [e["id"] for e in newest_first(entries)] == ["q2", "r3", "r2", "q1", "r1"]
    # A refusal on a route that never existed has no version: before the route's first.
    assert [e["id"] for e in newest_first([_entry("v1", "n", 1, 1.0),
                                           _entry("none", "n", None, 2.0, "rejected")])] \
        == ["v1", "none"]


def test_the_log_lists_each_entry_once_whichever_way_it_arrived() -> None:
    """The same change reaches a replica as its own emit, with a state, and from the journal:
    one listing entry, and `limit`/`route` still apply."""
    log_ = AuditLog(sink=None, capacity=10)  # type: ignore[arg-type]  # never emits here
    log_.remember(_entry("v2", "r", 2, 2.0))
    log_.load([_entry("v1", "r", 1, 1.0), _entry("v2", "r", 2, 2.0), _entry("v3", "r", 3, 3.0),
               _entry("q1", "q", 1, 2.5)])
    log_.load([_entry("v3", "r", 3, 3.0)])
    assert [e["id"] for e in log_.recent()] == ["v3", "q1", "v2", "v1"]
    assert [e["id"] for e in log_.recent(2, route="r")] == ["v3", "v2"]
    assert log_.recent(0) == []


async def test_the_journal_has_every_commit_a_poll_of_the_state_file_would_skip(
        tmp_path: Path) -> None:
    """B commits three versions back to back; A's poll of the state file (never run here: the
    poller sleeps 60 s) would see only the last, A's `changes()` returns all three, in commit
    order, and nothing twice. A refused commit adds nothing."""
    path = tmp_path / "registry.json"
    a, b = FileStore(path, poll_interval_s=60), FileStore(path, poll_interval_s=60)
    seen_a: list[RouteState] = []
    await a.start(seen_a.append)
    await b.start(lambda _: None)
    try:
        assert await a.changes() == []  # no journal yet
        for version in (1, 2, 3):
            await b.commit(_state("r", version, "fraud_v3"), version - 1)
        with pytest.raises(StaleWrite):
            await b.commit(_state("r", 3, "fraud_v4"), 2)
        assert seen_a == []  # A's poll has not run: the state file alone would skip v1 and v2
        assert [e["id"] for e in await a.changes()] == ["r-v1", "r-v2", "r-v3"]
        assert await a.changes() == []
        await a.commit(_state("r", 4, "fraud_v4"), 3)
        assert [e["id"] for e in await b.changes()] == ["r-v1", "r-v2", "r-v3", "r-v4"]
        assert [e["id"] for e in await a.changes()] == ["r-v4"]  # its own commit, journaled
    finally:
        await a.close()
        await b.close()


async def test_a_trimmed_journal_is_read_again_from_its_start(tmp_path: Path) -> None:
    """Past `journal_max_bytes` the journal keeps its newer half (a new file): a reader notices
    and reads it from the start; a partial last line (a writer mid-append) waits for its end."""
    path = tmp_path / "registry.json"
    max_bytes = 2000  # about 20 entries
    writer = FileStore(path, poll_interval_s=60, journal_max_bytes=max_bytes)
    reader = FileStore(path, poll_interval_s=60)
    await writer.start(lambda _: None)
    await reader.start(lambda _: None)
    try:
        await writer.commit(_state("r", 1, "fraud_v3"), 0)
        assert [e["id"] for e in await reader.changes()] == ["r-v1"]
        for version in range(2, 31):
            await writer.commit(_state("r", version, "fraud_v3"), version - 1)
        ids = [e["id"] for e in await reader.changes()]
        assert ids[-1] == "r-v30" and "r-v1" not in ids  # the older half is gone
        versions = [int(i.removeprefix("r-v")) for i in ids]
        assert versions == list(range(versions[0], 31))  # a contiguous newest run
        assert journal_path(path).stat().st_size <= max_bytes
        with open(journal_path(path), "ab") as fh:
            fh.write(b'{"kind": "audit", "id": "half')
        assert await reader.changes() == []
        with open(journal_path(path), "ab") as fh:
            fh.write(b'"}\n')
        assert [e["id"] for e in await reader.changes()] == ["half"]
    finally:
        await writer.close()
        await reader.close()


async def test_a_change_its_writer_did_not_journal_is_journaled_by_the_next_commit(
        tmp_path: Path) -> None:
    """A writer killed after replacing the state file and before appending to the journal (or
    in the middle of the line): the next commit, on any route, appends that change first, on a
    line of its own."""
    path = tmp_path / "registry.json"
    store = FileStore(path, poll_interval_s=60)
    await store.start(lambda _: None)
    try:
        await store.commit(_state("r", 1, "fraud_v3"), 0)
        # What a writer killed between the two writes of v2 leaves: the state, no journal line
        # (and here even half a line).
        write_states(path, {"r": _state("r", 2, "fraud_v4")}, last="r")
        with open(journal_path(path), "ab") as fh:
            fh.write(b'{"kind": "audit", "id": "r-v')
        await store.commit(_state("q", 1, "price_v1"), 0)
        ids = [e["id"] for e in await store.changes()]
        assert ids == ["r-v1", "r-v2", "q-v1"]
        await store.commit(_state("q", 2, "price_v2"), 1)  # nothing missing: nothing repeated
        assert [e["id"] for e in await store.changes()] == ["q-v2"]
        assert last_line(journal_path(path), chunk=8).startswith(b'{"kind":"audit","id":"q-v2"')
    finally:
        await store.close()


async def test_a_journal_that_cannot_be_written_does_not_fail_the_commit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The state is committed before the journal is written, so a failed append is logged and
    the commit stands; the next commit appends the missing entry first."""
    path = tmp_path / "registry.json"
    store = FileStore(path, poll_interval_s=60)
    await store.start(lambda _: None)
    try:
        journal_path(path).mkdir()  # not writable as a file
        await store.commit(_state("r", 1, "fraud_v3"), 0)
        assert "cannot append change r-v1" in caplog.text
        journal_path(path).rmdir()
        await store.commit(_state("r", 2, "fraud_v4"), 1)
        assert [e["id"] for e in await store.changes()] == ["r-v1", "r-v2"]
    finally:
        await store.close()
