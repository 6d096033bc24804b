"""The evaluator's store, one idea per module:

    errors      StoreError, StoreLockedError, EmptyDatasetError
    batch       Batch (the columnar buffer a parser fills), IngestResult
    engines     DuckDB and SQLite behind one small interface; column helpers
    schema      tables, role/mode codes, schema versions and the in-place migration
    names       names interned to small integers
    writes      ingest: dedup of re-deliveries, the eager label join, orphans, counters
    queries     the SQL reads: join stats, labelled rows, experiments, features, scores
    assembly    numpy assembly of those reads into EvalDataset, FeatureFrame, ScoreSeries
    core        Store: connection, lock and transactions around the writes and reads
"""

from evaluator.store.assembly import FeatureFrame, ScoreSeries
from evaluator.store.batch import Batch, IngestResult
from evaluator.store.core import Store
from evaluator.store.engines import as_numbers
from evaluator.store.errors import EmptyDatasetError, StoreError, StoreLockedError
from evaluator.store.queries import DAY
from evaluator.store.schema import (
    MODE_CODES,
    MODE_NAMES,
    ROLE_CODES,
    ROLE_NAMES,
    STORE_SCHEMA_VERSION,
)

# The name evaluator/drift.py imports for fetched columns (`as_numbers` here).
_num = as_numbers

__all__ = [
    "DAY",
    "MODE_CODES",
    "MODE_NAMES",
    "ROLE_CODES",
    "ROLE_NAMES",
    "STORE_SCHEMA_VERSION",
    "Batch",
    "EmptyDatasetError",
    "FeatureFrame",
    "IngestResult",
    "ScoreSeries",
    "Store",
    "StoreError",
    "StoreLockedError",
    "_num",
    "as_numbers",
]
