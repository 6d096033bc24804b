"""The landing zone's on-disk contract: Parquet schemas, hive layout, file naming, read rules.

Every engine that reads the lake (DuckDB in evaluator/lake/reader.py, Spark for data beyond one
machine) implements exactly the rules below, so the `EvalDataset` — and the verdicts — do not
depend on which engine ran. This module is the single source of truth; keep it stable
(`LAKE_FORMAT`, written to `<root>/_lake.json`, changes when it cannot be).

Layout (`root` is a local directory or any fsspec URL, e.g. `s3://bucket/understudy`):

    <root>/_lake.json                                        {"format": 1}
    <root>/inferences/route=<route>/date=<YYYY-MM-DD>/<file>.parquet   date of the request's ts
    <root>/labels/date=<YYYY-MM-DD>/<file>.parquet                     date of received_ts
    <root>/rejects/date=<YYYY-MM-DD>/<file>.parquet                    date the member read it

Labels carry no route (record schema v1), so they are partitioned by date only. Dates are UTC,
four-digit years: every record time is within 1970 to 9999 (understudy/records.py MIN_TIME,
MAX_TIME; a record outside is a reject), so `YYYY-MM-DD` names every partition and sorts as
the dates do. A `date=` value that is not one (a lake written before times were checked may
hold `date=NaT` or a five-digit year) is not a partition date: `partition_date` says None and
retention leaves it alone, reporting it.
`route` and `date` live only in the directory names (hive partitioning: DuckDB
`hive_partitioning=true`, Spark's partition discovery); a route that is not a plain name
(`[A-Za-z0-9][A-Za-z0-9_.-]*`, what the gateway's registry allows) is percent-encoded.

Files: `<millis>-<member>-<uuid>.parquet` (`c-...` for compaction output), zstd, one row group
per ~128k rows. A file becomes visible atomically: on a local filesystem it is written as
`.<name>.<writer>.tmp` (ignored by `*.parquet` globs and by Spark, which skips `.`/`_`
names), fsynced and renamed; on object storage the PUT of the final name is atomic. Anything
not ending in `.parquet` or starting with `.`/`_` is not data.

Tables (Arrow/Parquet types; NaN, never NULL, marks an unknown float; NULL an unknown string):

    inferences  one row per prediction (an unbatched request is row 0; a batched request of n
                rows gives rows 0..n-1, all with the request's source position)
        request_id string, row_ix int32, ts float64 (unix s), policy string (policy type),
        served string (model), propensity float64, sticky_key string (NULL: none),
        status int32 (HTTP), gateway_latency_ms float64, registry_version int64 (-1 unknown),
        outcomes list<struct<model string, role int8 (0 champion, 1 challenger),
                             mode int8 (0 served, 1 shadow, 2 explore, -1 unknown),
                             version string, status int8 (0 ok, 1 error, 2 timeout, 3 shed,
                             4 skipped), score float64 (the row's score; NaN unless ok),
                             latency_ms float64 (NaN: unknown or micro-batched),
                             experiment string (challengers; NULL unknown),
                             sample_rate float64>>,
        arms     list<struct<model string, prob float64>>   the policy's probability per arm,
        inputs   list<struct<name string, datatype string, width int32,
                             num binary (width float64 little-endian; NULL for BYTES),
                             cat string (BYTES tensors: the row's values as a JSON list)>>,
        src string, pos int64
    labels      one row per label record
        request_id string, row_ix int32 (the label's `index`), label float64 (NaN: reward
        only), reward float64 (NaN: none), has_label bool, event_time float64,
        received_ts float64, src string, pos int64
    rejects     one row per record the evaluator did not use
        reason string (`bad:<why>` as the store counts it, or `ignored` for audit records),
        src string, pos int64

`src`/`pos` is where the record was read: `kafka:<topic>:<partition>` and its offset, or
`file:<stream dir>/<segment>` and the line's byte offset. Parsing is the store's
(evaluator/ingest.py `RecordParser`): same validation, same scores, same bad-record reasons.

Read rules (the store's semantics, evaluator/store.py, computed at read time):

1. Replays. At-least-once delivery into the lake (a member that dies after its file is durable
   but before its Kafka commit is re-read by the next owner; compaction briefly leaves a row in
   two files) shows as rows with the same `(src, pos, row_ix)` (labels, rejects: `(src, pos)`).
   They are one record: keep one of them, count it once.
2. Inference records. After rule 1, of a route's rows sharing `(request_id, row_ix)` the one
   with the smallest `(src, pos)` wins (first read wins; re-deliveries of one record share its
   route and its Kafka partition, as records are keyed by request id). `duplicate_inferences`
   of a window: per request (row 0) the number of distinct `(src, pos)` minus one, summed.
3. Labels. After rule 1, per `(request_id, row_ix)` the winner is the row with the largest
   `(received_ts, src, pos)` (last wins, ties to the one read last); `n` = its row count, so
   `n - 1` are duplicates. A label joins the inference winner with the same
   `(request_id, row_ix)`, in any route or date partition, however late.
4. Orphans. A label with no inference is an orphan; it is *expired* when its `received_ts` is
   older than `watermark - join_window` (`watermark` = the largest inference `ts` or label
   `received_ts` in the lake). `orphan_labels` / `expired_orphans` sum `n` over each set.
   Unlike the store the lake deletes nothing, so a label whose inference arrives more than a
   join window after it still joins.
5. Order. A route's dataset is in `(ts, src, pos, row_ix)` order; the champion is the model in
   the champion role on its last row.
6. Counters. `bad:<why>` = rejects rows with that reason after rule 1; `bad_records` their sum;
   `ignored_records` = rows with reason `ignored`.

A reader lists the files once and reads that snapshot; a compaction that deletes a listed file
meanwhile makes it fail, and a retry reads the merged file instead.
"""

from __future__ import annotations

import datetime
import re
import time
import urllib.parse
import uuid

import pyarrow as pa

LAKE_FORMAT = 1
MARKER = "_lake.json"
SPARK_STAGING = "_spark"  # rows the Spark engine hands the report, removed once read
INFERENCES = "inferences"
LABELS = "labels"
REJECTS = "rejects"
TABLES = (INFERENCES, LABELS, REJECTS)
ROUTE_KEY, DATE_KEY = "route", "date"
SUFFIX = ".parquet"
ROW_GROUP_ROWS = 128 * 1024
COMPRESSION = "zstd"

OUTCOME = pa.struct([
    ("model", pa.string()), ("role", pa.int8()), ("mode", pa.int8()), ("version", pa.string()),
    ("status", pa.int8()), ("score", pa.float64()), ("latency_ms", pa.float64()),
    ("experiment", pa.string()), ("sample_rate", pa.float64()),
])
ARM = pa.struct([("model", pa.string()), ("prob", pa.float64())])
INPUT = pa.struct([("name", pa.string()), ("datatype", pa.string()), ("width", pa.int32()),
                   ("num", pa.binary()), ("cat", pa.string())])
SOURCE_FIELDS = [pa.field("src", pa.string(), nullable=False),
                 pa.field("pos", pa.int64(), nullable=False)]

INFERENCE_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("row_ix", pa.int32(), nullable=False),
    pa.field("ts", pa.float64(), nullable=False),
    ("policy", pa.string()), ("served", pa.string()), ("propensity", pa.float64()),
    ("sticky_key", pa.string()), ("status", pa.int32()), ("gateway_latency_ms", pa.float64()),
    ("registry_version", pa.int64()),
    ("outcomes", pa.list_(OUTCOME)), ("arms", pa.list_(ARM)), ("inputs", pa.list_(INPUT)),
    *SOURCE_FIELDS,
])
LABEL_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("row_ix", pa.int32(), nullable=False),
    ("label", pa.float64()), ("reward", pa.float64()),
    pa.field("has_label", pa.bool_(), nullable=False),
    ("event_time", pa.float64()),
    pa.field("received_ts", pa.float64(), nullable=False),
    *SOURCE_FIELDS,
])
REJECT_SCHEMA = pa.schema([pa.field("reason", pa.string(), nullable=False), *SOURCE_FIELDS])
SCHEMAS: dict[str, pa.Schema] = {INFERENCES: INFERENCE_SCHEMA, LABELS: LABEL_SCHEMA,
                                 REJECTS: REJECT_SCHEMA}

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PLAIN_ROUTE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MEMBER = re.compile(r"[^A-Za-z0-9_.]+")


def encode_route(route: str) -> str:
    """A route as its partition directory value (plain names unchanged)."""
    return route if _PLAIN_ROUTE.match(route) else urllib.parse.quote(route, safe="")


def decode_route(value: str) -> str:
    return urllib.parse.unquote(value) if "%" in value else value


def utc_date(ts: float) -> str:
    """YYYY-MM-DD (UTC) of unix seconds: the `date=` partition value."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def partition_date(name: str) -> datetime.date | None:
    """The date of a `date=YYYY-MM-DD` partition directory name; None for any other name."""
    key, _, value = name.partition("=")
    if key != DATE_KEY or not _DATE.fullmatch(value):
        return None
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:  # 2026-13-45
        return None


def partition_dir(table: str, date: str, route: str | None = None) -> str:
    """The partition directory of a table, relative to the root."""
    if table == INFERENCES:
        if route is None:
            raise ValueError("inference partitions need a route")
        return f"{INFERENCES}/{ROUTE_KEY}={encode_route(route)}/{DATE_KEY}={date}"
    return f"{table}/{DATE_KEY}={date}"


def file_name(member: str, prefix: str = "") -> str:
    """A new data file's name: write-time order, the member that wrote it, unique."""
    member = _MEMBER.sub("_", member)[:40] or "member"
    return f"{prefix}{int(time.time() * 1000):013d}-{member}-{uuid.uuid4().hex[:12]}{SUFFIX}"


def is_data_file(name: str) -> bool:
    return name.endswith(SUFFIX) and not name.startswith((".", "_"))
