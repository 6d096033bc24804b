"""Model, policy, version and tensor names interned to small integers (the `names` table).

The store keeps a cache of the table; a rolled-back batch's ids vanish with it, so the store
clears the cache on rollback and the next batch reloads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evaluator.dataset import I64, Obj
from evaluator.store.engines import Engine, as_i64, as_obj


class NameTable:
    """name <-> id, loaded lazily from the `names` table and extended by `intern`."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}

    def clear(self) -> None:
        self._ids.clear()
        self._names.clear()

    def load(self, e: Engine) -> None:
        self._ids = {str(n): int(i) for i, n in e.query("SELECT id, name FROM names")}
        self._names = {i: n for n, i in self._ids.items()}

    def intern(self, e: Engine, values: set[str]) -> None:
        """Give every name in `values` an id, inserting the new ones into `names`."""
        if not values - self._ids.keys():
            return
        self.load(e)
        missing = sorted(values - self._ids.keys())
        if not missing:
            return
        start = max(self._ids.values(), default=0) + 1
        ids = list(range(start, start + len(missing)))
        e.insert("names", {"id": as_i64(ids), "name": as_obj(missing)})
        for name, i in zip(missing, ids, strict=True):
            self._ids[name] = i
            self._names[i] = name

    def ids(self, values: Sequence[str]) -> I64:
        names = self._ids
        return np.fromiter((names[v] for v in values), dtype=np.int64, count=len(values))

    def optional_ids(self, values: Sequence[str | None]) -> Obj:
        """Interned ids, with None kept as a missing value (an object column: NULL in SQL)."""
        names = self._ids
        return as_obj([None if v is None else names[v] for v in values])

    def lookup(self, e: Engine) -> Obj:
        """id -> name as an object array, for vectorised decoding."""
        self.load(e)
        size = max(self._names, default=0) + 1
        table = np.full(size, "", dtype=object)
        for i, n in self._names.items():
            table[i] = n
        return table
