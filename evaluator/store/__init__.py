"""The evaluator's store, one idea per module:

    errors      StoreError, StoreLockedError, EmptyDatasetError
    batch       Batch (the columnar buffer a parser fills), IngestResult
    engines     DuckDB and SQLite behind one small interface; column helpers
    schema      tables, role/mode codes, schema versions and the in-place migration
    names       names interned to small integers
    writes      ingest: dedup of re-deliveries, the eager label join, orphans, counters
    reads       DatasetReads: experiments and their span, shared with the landing zone's reader
    queries     the SQL reads: join stats, labelled rows, experiments, features, scores
    assembly    numpy assembly of those reads into EvalDataset, FeatureFrame, ScoreSeries
    core        Store: connection, lock and transactions around the writes and reads
"""

from evaluator.store.assembly import (
    FeatureFrame,
    ScoreSeries,
    assemble,
    feature_frame,
    latest_experiments,
    score_series_of,
)
from evaluator.store.batch import Batch, IngestResult
from evaluator.store.core import Store
from evaluator.store.engines import as_numbers
from evaluator.store.errors import EmptyDatasetError, StoreError, StoreLockedError, fmt_ts
from evaluator.store.queries import DAY, window_sql
from evaluator.store.reads import DatasetReads
from evaluator.store.schema import (
    MODE_CODES,
    MODE_NAMES,
    ROLE_CODES,
    ROLE_NAMES,
    STORE_SCHEMA_VERSION,
)

# The names evaluator/drift and evaluator/lake import from before the split into a package.
_num = as_numbers
_assemble = assemble
_fmt_ts = fmt_ts

__all__ = [
    "DAY",
    "MODE_CODES",
    "MODE_NAMES",
    "ROLE_CODES",
    "ROLE_NAMES",
    "STORE_SCHEMA_VERSION",
    "Batch",
    "DatasetReads",
    "EmptyDatasetError",
    "FeatureFrame",
    "IngestResult",
    "ScoreSeries",
    "Store",
    "StoreError",
    "StoreLockedError",
    "_assemble",
    "_fmt_ts",
    "_num",
    "as_numbers",
    "assemble",
    "feature_frame",
    "fmt_ts",
    "latest_experiments",
    "score_series_of",
    "window_sql",
]
