"""The embedded default registry store: one JSON state file shared by a machine's replicas.

Writes are read-modify-write under an exclusive `flock` on a side lock file, written to a temp
file, fsynced and renamed over the old one, so a reader never sees half a file and two
processes never lose each other's update. Replicas on the same machine (e.g. `serve --workers
N`, or several gateways sharing a volume with working flock) converge by polling the file's
stat signature every `poll_interval_s` (0.5 s). The same file format is the Kafka store's
local cache (gateway/backends/kafka_store.py).

The state file holds only each route's latest state, so a replica polling it misses a change
that another one superseded between two polls. Every commit therefore also appends the change's
audit entry to a journal next to it (`<state file>.audit.jsonl`, one JSON line per applied
change, in commit order, under the same lock): `changes()` reads what was appended since the
last call, and the registry serves `GET /admin/audit` from it, so every replica lists every
applied change (gateway/control/audit.py). The journal is trimmed to its newer half once it
passes `journal_max_bytes`. A writer killed between replacing the state file and appending
leaves that change out of the journal until the next commit: the state file names the route
its last commit changed (`last`), and a commit that finds the journal not ending with that
route's change appends it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from gateway.backends.registry_store import OnChange, StaleWrite
from gateway.control.state import RouteState
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

FILE_FORMAT = "understudy.registry/1"
JOURNAL_MAX_BYTES = 16 * 1024 * 1024


def journal_path(path: Path) -> Path:
    """Where the audit journal of the state file at `path` lives (same directory)."""
    return path.with_name(path.name + ".audit.jsonl")


def read_states(path: Path) -> dict[str, RouteState]:
    """Parse the state file; a missing file is an empty store. Raises ConfigError if corrupt."""
    return _read_file(path)[0]


def _read_file(path: Path) -> tuple[dict[str, RouteState], str | None]:
    """The states, and the route the last commit changed (`last`; None in older files)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, None
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: registry state file is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FILE_FORMAT:
        raise ConfigError(f"{path}: not an understudy registry state file")
    states = {name: RouteState.from_json(s) for name, s in (raw.get("routes") or {}).items()}
    last = raw.get("last")
    return states, last if isinstance(last, str) else None


def write_states(path: Path, states: dict[str, RouteState], last: str | None = None) -> None:
    """Atomic replace of the state file (`replace_file`); `last`: the route just changed."""
    document: dict[str, Any] = {
        "format": FILE_FORMAT, "routes": {n: s.to_json() for n, s in sorted(states.items())}}
    if last is not None:
        document["last"] = last
    replace_file(path, orjson.dumps(document, option=orjson.OPT_INDENT_2))


def replace_file(path: Path, payload: bytes) -> None:
    """Atomic replace: temp file in the same directory, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def append_journal(path: Path, entry: dict[str, Any], max_bytes: int) -> None:
    """Append one audit entry as a line (the caller holds the store's lock); past `max_bytes`,
    first keep only the newer half of the lines, replaced atomically (a reader sees the new
    inode and reads the file again from its start)."""
    line = orjson.dumps(entry) + b"\n"
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size + len(line) > max_bytes:
            data = path.read_bytes()
            cut = data.find(b"\n", len(data) - max_bytes // 2) + 1
            replace_file(path, data[cut:] if cut > 0 else b"")
    with open(path, "a+b") as fh:
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = b"\n" + line  # a writer died mid-line: end it, so this line parses
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def last_line(path: Path, chunk: int = 1 << 16) -> bytes:
    """The journal's last complete line (empty if none), read from the end."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed just below
    except FileNotFoundError:
        return b""
    with fh:
        size = os.fstat(fh.fileno()).st_size
        start = size
        while start > 0:
            start = max(0, start - chunk)
            fh.seek(start)
            data = fh.read(size - start)
            data = data[: data.rfind(b"\n") + 1]
            begin = data.rfind(b"\n", 0, len(data) - 1)
            if begin >= 0 or start == 0:
                return data[begin + 1:]
            chunk *= 2
    return b""


def parse_journal(data: bytes) -> list[dict[str, Any]]:
    """The audit entries among journal lines (a line that does not parse is skipped)."""
    entries: list[dict[str, Any]] = []
    for line in data.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes whenever the file is replaced (a rename gives a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FileStore:
    """The embedded default: a JSON state file shared by the replicas of one machine."""

    def __init__(self, path: str | Path, *, poll_interval_s: float = 0.5,
                 journal_max_bytes: int = JOURNAL_MAX_BYTES) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.journal_path = journal_path(self.path)
        self.journal_max_bytes = journal_max_bytes
        self.poll_interval_s = poll_interval_s
        self._journal_at: tuple[int, int] = (-1, 0)  # (inode, offset) read up to
        self._journal_lock = asyncio.Lock()
        self._on_change: OnChange | None = None
        self._delivered: dict[str, int] = {}  # route -> version last handed to on_change
        self._signature: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # orders deliveries between the poller and local commits

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock across processes for a read-modify-write (blocking: run in a thread)."""
        with open(self.lock_path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    async def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._refresh()
        self._task = asyncio.create_task(self._poll(), name="registry-file-poll")

    def _deliver(self, states: dict[str, RouteState]) -> None:
        """Hand newer states to the registry; versions only grow, so older reads are ignored."""
        assert self._on_change is not None
        for name, state in sorted(states.items()):
            if state.version > self._delivered.get(name, 0):
                self._delivered[name] = state.version
                self._on_change(state)

    async def _refresh(self) -> None:
        signature = await asyncio.to_thread(_signature, self.path)
        if signature == self._signature:
            return
        async with self._lock:
            states = await asyncio.to_thread(read_states, self.path)
            self._signature = signature
            self._deliver(states)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self._refresh()
            except ConfigError as exc:
                # Keep serving the last good state; a writer will replace the file again.
                log.error("registry state file unreadable, keeping the current routes: %s", exc)
            except OSError as exc:
                log.error("cannot read registry state file %s: %s", self.path, exc)

    async def latest(self, route: str) -> RouteState | None:
        states = await asyncio.to_thread(read_states, self.path)
        return states.get(route)

    def _commit_sync(self, state: RouteState, expected_version: int) -> dict[str, RouteState]:
        with self._locked():
            states, last = _read_file(self.path)
            current = states.get(state.name)
            actual = current.version if current is not None else 0
            if actual != expected_version:
                raise StaleWrite(state.name, expected_version, actual)
            if last is not None and (previous := states.get(last)) is not None:
                self._journal(previous.change, only_if_missing=True)
            states[state.name] = state
            write_states(self.path, states, last=state.name)
            self._journal(state.change)
            return states

    def _journal(self, change: Mapping[str, Any], *, only_if_missing: bool = False) -> None:
        """Append a committed change's entry. `only_if_missing`: the previous commit's, which
        the journal must end with unless its writer died before journaling it. A failed write
        is logged, not raised: the state is committed already, and the next commit retries."""
        if not change:
            return
        try:
            if only_if_missing:
                tail = parse_journal(last_line(self.journal_path))
                if tail and tail[-1].get("id") == change.get("id"):
                    return
                log.warning("registry: the journal lacks change %s of route '%s' (its writer "
                            "stopped before journaling it); appending it", change.get("id"),
                            change.get("route"))
            append_journal(self.journal_path, dict(change), self.journal_max_bytes)
        except OSError as exc:
            log.error("registry: cannot append change %s to the journal %s (%s); the next "
                      "commit retries", change.get("id"), self.journal_path, exc)

    async def commit(self, state: RouteState, expected_version: int) -> RouteState:
        async with self._lock:
            states = await asyncio.to_thread(self._commit_sync, state, expected_version)
            self._signature = await asyncio.to_thread(_signature, self.path)
            # Deliver everything read under the lock: other routes may have changed too.
            self._deliver(states)
        return state

    def _read_journal(self) -> list[dict[str, Any]]:
        """Complete lines appended since the last read (from the start after a trim)."""
        try:
            fh = open(self.journal_path, "rb")  # noqa: SIM115 - closed just below
        except FileNotFoundError:
            return []
        with fh:
            st = os.fstat(fh.fileno())
            inode, offset = self._journal_at
            if st.st_ino != inode or st.st_size < offset:
                offset = 0
            fh.seek(offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._journal_at = (st.st_ino, offset + len(complete))
        return parse_journal(complete)

    async def changes(self) -> list[dict[str, Any]]:
        """Audit entries of the changes any replica committed since the last call (all of
        them on the first), in commit order, read from the journal."""
        async with self._journal_lock:
            return await asyncio.to_thread(self._read_journal)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
