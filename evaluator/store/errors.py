"""The store's exceptions: each message says what to do (the CLI prints it as is)."""

from __future__ import annotations

import time

from evaluator.dataset import JoinStats


class StoreError(Exception):
    """A store that cannot be opened or queried as asked; the message says what to do."""


class StoreLockedError(StoreError):
    """Another process holds the DuckDB file (the ingest loop, mid-batch) past the timeout."""


class EmptyDatasetError(StoreError):
    """No labelled requests for the route and window; carries the join stats explaining why."""

    def __init__(self, message: str, stats: JoinStats) -> None:
        super().__init__(message)
        self.stats = stats


def fmt_ts(ts: float | None) -> str:
    """A window bound for messages and logs (None: open-ended)."""
    if ts is None:
        return "…"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
