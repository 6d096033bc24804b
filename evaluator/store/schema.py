"""The store's tables, the codes it stores for roles and modes, and schema versions.

Schema (one row per *prediction*: an unbatched request is one row, row 0; a batched request of
n rows gives rows 0..n-1, and a label's `index` names the row):

    inferences  id, request_id, row_ix, route, ts, policy, served, propensity, sticky_key,
                status, gateway_latency_ms, dups, registry_version   unique (request_id, row_ix)
    outcomes    inf_id, model, role, mode, version, status, score, latency_ms, experiment,
                sample_rate                            (experiment: an interned id, NULL unknown)
    arms        inf_id, model, prob                        the policy's probability per arm
    inputs      inf_id, name, datatype, width, num, cat    the row's input tensors (drift)
    labels      request_id, row_ix, inf_id, label, reward, has_label, event_time, received_ts, n
    names       id, name        model / policy / tensor names interned to small integers
    offsets     source, pos     ingest position per source, committed with the data
    counters    name, amount    bad records, expired orphans, ...
    meta        key, val        schema version, watermark

Schema versions: 1 had no experiment columns; 2 adds `inferences.registry_version` (-1
unknown) and `outcomes.experiment` / `outcomes.sample_rate` (record schema v1 additions). A
writable open migrates a version-1 store in place (three `ALTER TABLE ... ADD COLUMN`, old rows
read as unknown); a read-only open of a version-1 store asks for one `run` to migrate it.
"""

from __future__ import annotations

import logging

from evaluator.dataset import STATUS_CODES
from evaluator.store.engines import Engine
from evaluator.store.errors import StoreError

log = logging.getLogger(__name__)

STORE_SCHEMA_VERSION = 2
ROLE_CODES: dict[str, int] = {"champion": 0, "challenger": 1}
MODE_CODES: dict[str, int] = {"served": 0, "shadow": 1, "explore": 2}
ROLE_NAMES = {v: k for k, v in ROLE_CODES.items()}
MODE_NAMES = {v: k for k, v in MODE_CODES.items()}
SKIPPED = STATUS_CODES["skipped"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, val VARCHAR);
CREATE TABLE IF NOT EXISTS names (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS inferences (
    id {ID} PRIMARY KEY, request_id VARCHAR NOT NULL, row_ix INTEGER NOT NULL,
    route VARCHAR NOT NULL, ts DOUBLE NOT NULL, policy INTEGER, served INTEGER,
    propensity DOUBLE, sticky_key VARCHAR, status INTEGER, gateway_latency_ms DOUBLE,
    dups INTEGER NOT NULL, registry_version BIGINT, UNIQUE (request_id, row_ix));
CREATE TABLE IF NOT EXISTS outcomes (
    inf_id BIGINT NOT NULL, model INTEGER NOT NULL, role INTEGER, mode INTEGER,
    version INTEGER, status INTEGER NOT NULL, score DOUBLE, latency_ms DOUBLE,
    experiment INTEGER, sample_rate DOUBLE);
CREATE TABLE IF NOT EXISTS arms (inf_id BIGINT NOT NULL, model INTEGER NOT NULL, prob DOUBLE);
CREATE TABLE IF NOT EXISTS inputs (
    inf_id BIGINT NOT NULL, name INTEGER NOT NULL, datatype INTEGER, width INTEGER,
    num BLOB, cat VARCHAR);
CREATE TABLE IF NOT EXISTS labels (
    request_id VARCHAR NOT NULL, row_ix INTEGER NOT NULL, inf_id BIGINT, label DOUBLE,
    reward DOUBLE, has_label BOOLEAN NOT NULL, event_time DOUBLE, received_ts DOUBLE NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (request_id, row_ix));
CREATE TABLE IF NOT EXISTS offsets (source VARCHAR PRIMARY KEY, pos VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name VARCHAR PRIMARY KEY, amount BIGINT NOT NULL);
"""

# A row store needs these to avoid scanning; DuckDB scans columns faster than it maintains them.
_SQLITE_INDEXES = """
CREATE INDEX IF NOT EXISTS inferences_route_ts ON inferences (route, ts);
CREATE INDEX IF NOT EXISTS outcomes_inf ON outcomes (inf_id);
CREATE INDEX IF NOT EXISTS arms_inf ON arms (inf_id);
CREATE INDEX IF NOT EXISTS inputs_inf ON inputs (inf_id);
CREATE INDEX IF NOT EXISTS labels_inf ON labels (inf_id);
"""

# Version 1 -> 2: the record schema's experiment additions; old rows read as unknown.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE inferences ADD COLUMN registry_version BIGINT",
    "ALTER TABLE outcomes ADD COLUMN experiment INTEGER",
    "ALTER TABLE outcomes ADD COLUMN sample_rate DOUBLE",
)


def create_schema(e: Engine, path: str) -> None:
    """Create missing tables (and SQLite's indexes); migrate a version-1 store in place."""
    for stmt in SCHEMA.format(ID=e.id_type).split(";"):
        if stmt.strip():
            e.execute(stmt)
    if e.kind == "sqlite":
        for stmt in _SQLITE_INDEXES.split(";"):
            if stmt.strip():
                e.execute(stmt)
    row = e.query("SELECT val FROM meta WHERE key = 'schema_version'")
    if not row:
        e.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(STORE_SCHEMA_VERSION)])
    elif row[0][0] == "1":
        _migrate_1_to_2(e, path)


def _migrate_1_to_2(e: Engine, path: str) -> None:
    """Add the experiment columns in one transaction (all or nothing on a crash)."""
    e.begin()
    try:
        for stmt in _MIGRATE_1_TO_2:
            e.execute(stmt)
        e.execute("UPDATE meta SET val = '2' WHERE key = 'schema_version'")
    except BaseException:
        e.rollback()
        raise
    e.commit()
    log.info("%s: store schema migrated from version 1 to 2 (experiment columns)", path)


def check_schema(e: Engine, path: str, read_only: bool) -> None:
    """Refuse a file that is not a store of this version, saying how to fix it."""
    try:
        row = e.query("SELECT val FROM meta WHERE key = 'schema_version'")
    except Exception as exc:
        raise StoreError(f"{path} is not an evaluator store ({exc})") from None
    if not row or int(row[0][0]) != STORE_SCHEMA_VERSION:
        found = row[0][0] if row else "none"
        hint = ("run `python -m evaluator run --once` once to migrate it in place"
                if found == "1" and read_only else "re-ingest into a new store path")
        raise StoreError(f"{path}: store schema {found}, this evaluator needs "
                         f"{STORE_SCHEMA_VERSION}; {hint}")
