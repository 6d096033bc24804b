"""Ingest: inference and label records from segment files or Kafka into the evaluator's store.

Exactly-once in effect. Every batch is one store transaction that also records where the batch
ends (`file:<stream dir>` -> `<segment>:<byte offset>`, `kafka:<topic>:<partition>` -> next
offset). A restart resumes from those positions, so nothing is skipped and nothing is counted
twice — including duplicate-label and bad-record counts, which a "dedup by request id" alone
would inflate on every replay.

- Files: every `inferences`/`labels` directory under `source.path` (one per gateway worker:
  `<path>/<stream>/` or `<path>/worker-N/<stream>/`), segments in name order; a trailing line
  without its newline is still being written and is left for the next poll.
- Kafka: consumer group `source.kafka.group_id` on both topics, manual commits after the store
  transaction. On assignment each partition seeks to the store's position (or the beginning
  when the store has none): the store, not the group's committed offset, is the source of
  truth, so a crash between store commit and Kafka commit re-reads nothing. Scale-out: records
  are keyed by request id, and the range assignor gives one consumer the same partition numbers
  of both topics, so with equal partition counts each consumer (with its own store) sees an
  inference and its labels together — a shard of requests. Use static membership
  (`group_instance_id`) so shards do not move; a moved partition is re-read from the start
  into its new owner's store.
- Record schema v1 additions (optional, so older records still parse): the inference's
  `registry_version`, each challenger outcome's `experiment` and `sample_rate`, the label's
  `reward` (the reward the gateway computed for its policy) and `received_ts` (label receipt
  time). Missing or malformed values are stored as unknown, never as a bad record.
- Bad input (malformed JSON, unknown schema version or kind, missing fields) is counted in the
  store (`bad:<reason>`) and logged, rate-limited; it never stops the loop.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from evaluator.config import EvaluatorConfig
from evaluator.dataset import STATUS_CODES
from evaluator.store import MODE_CODES, ROLE_CODES, Batch, IngestResult, Store, StoreLockedError
from gateway.backends.file_sink import segment_paths
from understudy.records import LABELS, SCHEMA_VERSION

log = logging.getLogger(__name__)

STREAM_DIRS = ("inferences", LABELS)
OK = STATUS_CODES["ok"]
ERROR = STATUS_CODES["error"]
NAN = math.nan
HANDOFF_S = 0.5  # how long a busy ingest loop stays off a DuckDB file so a reader can open it


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _finite(value: Any) -> float | None:
    if type(value) is float:  # the common case first: x - x is 0.0 unless x is NaN or inf
        return value if value - value == 0.0 else None
    if isinstance(value, int | float):
        try:
            f = float(value)
        except OverflowError:
            return None
        return f if math.isfinite(f) else None
    return None


def _int_or(value: Any, default: int) -> int:
    """A JSON integer (not a bool), else `default`."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _experiment_id(value: Any) -> str | None:
    """An experiment id as the gateway writes it (a non-empty string), else unknown."""
    return value if isinstance(value, str) and value else None


def _score(value: Any) -> float:
    """A model output element as a score; NaN/inf/non-numbers become NaN (never an error)."""
    if type(value) is float:
        return value if value - value == 0.0 else NAN
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return NAN
    f = _finite(value)
    return NAN if f is None else f


def _pack(values: list[Any]) -> bytes:
    try:
        return struct.pack(f"<{len(values)}d", *values)
    except (struct.error, TypeError, OverflowError):
        return struct.pack(f"<{len(values)}d", *(_score(v) for v in values))


def _batch_rows(inputs: dict[str, Any]) -> int:
    """Rows of a (possibly batched) request: the first input's leading dim when it has >= 2."""
    for tensor in inputs.values():
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[0], int):
            return max(1, shape[0])
        return 1
    return 1


def _row_slices(tensor: Any, rows: int) -> tuple[list[list[Any]], int] | None:
    """The tensor's data per prediction row, and the row width; None when unusable."""
    if not isinstance(tensor, dict):
        return None
    data = tensor.get("data")
    if not isinstance(data, list) or not data:
        return None
    shape = tensor.get("shape")
    if rows > 1 and isinstance(shape, list) and len(shape) >= 2 and shape[0] == rows \
            and len(data) % rows == 0:
        w = len(data) // rows
        return [data[i * w:(i + 1) * w] for i in range(rows)], w
    # Not batched along the rows: a request-level tensor every row shares.
    return [data] * rows, len(data)


def _scores(outputs: Any, name: str | None, rows: int) -> list[float]:
    """Score per row: the row's first element of the chosen output tensor (NaN if absent)."""
    if not isinstance(outputs, dict) or not outputs:
        return [NAN] * rows
    tensor = outputs.get(name) if name else next(iter(outputs.values()))
    if rows == 1:  # what _row_slices gives one row, without building the slices
        data = tensor.get("data") if isinstance(tensor, dict) else None
        return [_score(data[0])] if isinstance(data, list) and data else [NAN]
    sliced = _row_slices(tensor, rows)
    if sliced is None:
        return [NAN] * rows
    per_row, _ = sliced
    return [_score(r[0]) if r else NAN for r in per_row]


class RecordParser:
    """Raw record bytes -> rows of a `Batch`; bad records are counted and logged, never raised.

    `score_output(route)` names the output tensor that holds the score (None: the first one).
    """

    def __init__(self, score_output: Callable[[str], str | None] | None = None, *,
                 max_feature_elements: int = 1024, clock: Callable[[], float] = time.time,
                 log_every_s: float = 60.0) -> None:
        self.score_output = score_output or (lambda route: None)
        self.max_feature_elements = max_feature_elements
        self.clock = clock
        self.log_every_s = log_every_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    @classmethod
    def from_config(cls, config: EvaluatorConfig) -> RecordParser:
        return cls(config.score_output)

    def parse(self, batch: Batch, raw: bytes, where: str = "?") -> None:
        try:
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                # Other producers (Python's json) may write NaN/Infinity literals orjson refuses.
                try:
                    record = json.loads(raw)
                except ValueError as exc:
                    raise _Bad("malformed_json", f"not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise _Bad("not_an_object", f"expected a JSON object, got "
                                            f"{type(record).__name__}")
            version = record.get("schema_version")
            if version != SCHEMA_VERSION:
                raise _Bad("unsupported_schema_version",
                           f"schema_version {version!r} (this evaluator reads {SCHEMA_VERSION})")
            kind = record.get("kind")
            if kind == "inference":
                self._inference(batch, record)
            elif kind == "label":
                self._label(batch, record)
            elif kind == "audit":
                batch.ignore()
            else:
                raise _Bad("unknown_kind", f"unknown kind {kind!r}")
        except _Bad as bad:
            self.count_bad(batch, bad.reason, f"{bad}", where)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            self.count_bad(batch, "invalid_record", f"{type(exc).__name__}: {exc}", where)

    def count_bad(self, batch: Batch, reason: str, detail: str, where: str) -> None:
        """Count a bad record in the batch (committed with it) and log it, rate-limited."""
        batch.reject(reason)
        now = time.monotonic()
        last = self._last_logged.get(reason)
        if last is not None and now - last < self.log_every_s:
            self._suppressed[reason] += 1
            return
        more = self._suppressed.pop(reason, 0)
        self._last_logged[reason] = now
        log.warning("skipping bad record (%s) at %s: %s%s", reason, where, detail[:300],
                    f" [+{more} more of this kind since the last message]" if more else "")

    def _inference(self, b: Batch, rec: dict[str, Any]) -> None:
        rid = rec.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise _Bad("invalid_inference", "request_id must be a non-empty string")
        if b.seen(rid):
            return
        ts = _finite(rec.get("ts"))
        if ts is None:
            raise _Bad("invalid_inference", f"{rid}: ts must be unix seconds")
        route = rec.get("route")
        if not isinstance(route, str) or not route:
            raise _Bad("invalid_inference", f"{rid}: route must be a non-empty string")
        outputs = rec.get("outputs")
        inputs = rec.get("inputs") or {}
        if not isinstance(outputs, dict) or not isinstance(inputs, dict):
            raise _Bad("invalid_inference", f"{rid}: inputs/outputs must be objects")
        policy = rec.get("policy")
        policy_type = str(policy.get("type") or "") if isinstance(policy, dict) else ""
        served = rec.get("served")
        served_model = str(served.get("model") or "") if isinstance(served, dict) else ""
        propensity = _finite(rec.get("propensity"))
        arms = rec.get("arms")
        arms = arms if isinstance(arms, dict) else {}
        key = rec.get("key")
        status = rec.get("status")
        latency = _finite(rec.get("gateway_latency_ms"))
        registry_version = _int_or(rec.get("registry_version"), -1)
        rows = _batch_rows(inputs)
        score_name = self.score_output(route)

        # Parse everything before touching the batch, so a bad record adds nothing.
        outcomes = []
        for model, oc in outputs.items():
            if not isinstance(oc, dict):
                raise _Bad("invalid_inference", f"{rid}: outputs[{model!r}] is not an object")
            code = STATUS_CODES.get(oc.get("status"), ERROR)
            # A copy that shared a micro-batched call has that call's latency, not comparable
            # with a single request's: left out of latency statistics (understudy/records.py).
            lat = None if oc.get("batch_rows") is not None else _finite(oc.get("latency_ms"))
            rate = _finite(oc.get("sample_rate"))
            outcomes.append((
                str(model), ROLE_CODES.get(oc.get("role"), ROLE_CODES["challenger"]),
                MODE_CODES.get(oc.get("mode"), -1), str(oc.get("version") or ""), code,
                _scores(oc.get("outputs"), score_name, rows) if code == OK else [NAN] * rows,
                NAN if lat is None else lat, _experiment_id(oc.get("experiment")),
                NAN if rate is None else rate,
            ))
        arm_rows = [(str(m), _finite(p)) for m, p in arms.items()]
        features = []
        for name, tensor in inputs.items():
            sliced = _row_slices(tensor, rows)
            if sliced is None or sliced[1] > self.max_feature_elements:
                continue
            per_row, width = sliced
            datatype = str(tensor.get("datatype") or "")
            if datatype == "BYTES":
                features.append((str(name), datatype, width,
                                 [(None, orjson.dumps(r).decode()) for r in per_row]))
            else:
                features.append((str(name), datatype, width, [(_pack(r), None) for r in per_row]))

        b.start_record(rid)
        for r in range(rows):
            pos = b.add_row(rid, r, route, ts, policy_type, served_model,
                            NAN if propensity is None else propensity,
                            key if isinstance(key, str) else None,
                            status if isinstance(status, int) else 0,
                            NAN if latency is None else latency, registry_version)
            for model, role, mode, version, code, scores, lat, exp, rate in outcomes:
                b.add_outcome(pos, model, role, mode, version, code, scores[r], lat, exp, rate)
            for model, prob in arm_rows:
                b.add_arm(pos, model, NAN if prob is None else prob)
            for name, datatype, width, values in features:
                num, cat = values[r]
                b.add_input(pos, name, datatype, width, num, cat)

    def _label(self, b: Batch, rec: dict[str, Any]) -> None:
        rid = rec.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise _Bad("invalid_label", "request_id must be a non-empty string")
        index = rec.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise _Bad("invalid_label", f"{rid}: index must be a non-negative integer")
        raw_label, raw_reward = rec.get("label"), rec.get("reward")
        label = None if raw_label is None else _finite(raw_label)
        reward = None if raw_reward is None else _finite(raw_reward)
        if (raw_label is not None and label is None) or (raw_reward is not None and
                                                          reward is None):
            raise _Bad("invalid_label", f"{rid}: label/reward must be finite numbers")
        if label is None and reward is None:
            raise _Bad("invalid_label", f"{rid}: neither label nor reward")
        received = _finite(rec.get("received_ts"))
        event = _finite(rec.get("event_time"))
        if received is None:
            received = event if event is not None else self.clock()
        b.add_label(rid, index, label, reward, received if event is None else event, received)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress:
    """Rows ingested and rate, logged every `interval_s` on long runs and once at the end."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.emit = emit or (lambda line: log.info("%s", line))
        self.totals: Counter[str] = Counter()
        self.started = clock()
        self._last_at = self.started
        self._last_read = 0

    @property
    def read(self) -> int:
        t = self.totals
        return t["records"] + t["duplicates"] + t["labels"] + t["bad"] + t["ignored"]

    def add(self, result: IngestResult) -> None:
        for key in ("records", "rows", "duplicates", "labels", "bad", "ignored"):
            self.totals[key] += getattr(result, key)
        self.maybe_log()

    def line(self) -> str:
        now = self.clock()
        t = self.totals
        rate = (self.read - self._last_read) / max(now - self._last_at, 1e-9)
        overall = self.read / max(now - self.started, 1e-9)
        return (f"ingested {self.read:,} records ({rate:,.0f}/s now, {overall:,.0f}/s overall): "
                f"{t['records']:,} inferences ({t['rows']:,} predictions), "
                f"{t['duplicates']:,} duplicate inferences, {t['labels']:,} labels, "
                f"{t['bad']:,} bad, {t['ignored']:,} ignored")

    def maybe_log(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._last_at >= self.interval_s:
            self.emit(self.line())
            self._last_at = now
            self._last_read = self.read


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilePosition:
    """Where the next unread byte of one stream directory is."""

    segment: str
    offset: int

    def encode(self) -> str:
        return f"{self.segment}:{self.offset}"

    @classmethod
    def decode(cls, value: str | None) -> FilePosition | None:
        if not value:
            return None
        segment, _, offset = value.rpartition(":")
        return cls(segment, int(offset))


@dataclass
class FileRead:
    lines: list[tuple[bytes, str, int]]  # (line, segment name, the line's byte offset)
    position: FilePosition | None
    # unterminated lines left behind in finished segments: (segment name, byte offset)
    partial: list[tuple[str, int]] = field(default_factory=list)

    @property
    def partial_lines(self) -> int:
        return len(self.partial)


class FileSource:
    """Reads the gateway's segment files (`gateway.backends.file_sink` layout) incrementally."""

    def __init__(self, root: str | Path, chunk_bytes: int = 8 << 20) -> None:
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes

    def stream_dirs(self) -> list[Path]:
        """Every inferences/labels directory: `<root>/<stream>` and `<root>/worker-N/<stream>`."""
        if not self.root.is_dir():
            return []
        # Two levels only: a recursive walk would list every segment file on every pass.
        found = [p for stream in STREAM_DIRS for pattern in (stream, f"*/{stream}")
                 for p in self.root.glob(pattern) if p.is_dir()]
        # inferences before labels: most labels then join on arrival instead of waiting
        return sorted(found, key=lambda p: (p.name != "inferences", p.as_posix()))

    def key(self, stream_dir: Path) -> str:
        return "file:" + stream_dir.relative_to(self.root).as_posix()

    def read(self, stream_dir: Path, start: FilePosition | None, max_records: int) -> FileRead:
        """Up to `max_records` complete lines after `start`, and the position after them."""
        segments = segment_paths(stream_dir)
        if not segments:
            return FileRead([], start)
        names = [s.name for s in segments]
        if start is None:
            i, offset = 0, 0
        else:
            i = bisect.bisect_left(names, start.segment)
            if i == len(names):
                return FileRead([], start)
            if names[i] == start.segment:
                offset = start.offset
            else:
                log.warning("%s: segment %s is gone (retention?); continuing at %s",
                            stream_dir, start.segment, names[i])
                offset = 0
        lines: list[tuple[bytes, str, int]] = []
        partial: list[tuple[str, int]] = []
        while len(lines) < max_records:
            segment = segments[i]
            size = segment.stat().st_size
            consumed, done = self._read_segment(segment, offset, size,
                                                max_records - len(lines), lines)
            offset += consumed
            if not done:
                break  # batch full
            if i + 1 >= len(segments):
                break  # the live segment: wait for more
            if offset < size:
                # An unterminated line in a segment the writer has left (it crashed mid-line).
                partial.append((segment.name, offset))
                log.warning("%s: unterminated last line (%d bytes) skipped", segment,
                            size - offset)
            i, offset = i + 1, 0
        return FileRead(lines, FilePosition(names[i], offset), partial)

    def _read_segment(self, segment: Path, offset: int, size: int, room: int,
                      lines: list[tuple[bytes, str, int]]) -> tuple[int, bool]:
        """Append complete lines from offset; (bytes consumed, reached the last full line)."""
        consumed = 0
        with open(segment, "rb") as fh:
            while room > 0 and offset + consumed < size:
                fh.seek(offset + consumed)
                remaining = size - offset - consumed
                data = fh.read(min(self.chunk_bytes, remaining))
                end = data.rfind(b"\n")
                if end < 0:
                    if len(data) == remaining:
                        return consumed, True  # only a partial line left
                    data += fh.read(remaining - len(data))  # one line longer than a chunk
                    end = data.rfind(b"\n")
                    if end < 0:
                        return consumed, True
                parts = data[:end].split(b"\n")
                if len(parts) > room:
                    parts = parts[:room]
                    used = sum(len(p) + 1 for p in parts)
                else:
                    used = end + 1
                name, at = segment.name, offset + consumed
                for p in parts:
                    if p:
                        lines.append((p, name, at))
                    at += len(p) + 1
                room -= len(parts)
                consumed += used
                if room <= 0:
                    return consumed, offset + consumed >= size
        return consumed, True


class FileIngestor:
    """The `run` loop for the file source."""

    def __init__(self, config: EvaluatorConfig, store: Store, parser: RecordParser | None = None,
                 progress: Progress | None = None) -> None:
        self.config = config
        self.store = store
        self.parser = parser or RecordParser.from_config(config)
        self.progress = progress or Progress(config.source.progress_interval_s)
        self.source = FileSource(config.source.path)
        self._positions: dict[str, str] | None = None

    def drain(self, stop: threading.Event | None = None, budget_s: float | None = None) -> int:
        """Ingest what is readable now, one batch per stream directory in turn (so a busy
        inference stream cannot starve the labels); returns the number of lines read.

        With `budget_s`, returns after about that long even if more is waiting
        (`self.caught_up` tells which).
        """
        if self._positions is None:
            self._positions = self.store.offsets("file:")
        deadline = math.inf if budget_s is None else time.monotonic() + budget_s
        total = 0
        self.caught_up = False
        while stop is None or not stop.is_set():
            moved = [n for d in self.source.stream_dirs() if (n := self._one_batch(d)) is not None]
            total += sum(moved)
            if not moved:
                self.caught_up = True
                break
            if time.monotonic() >= deadline:
                break
        return total

    def _one_batch(self, stream_dir: Path) -> int | None:
        """Lines read from one stream directory; None when its position did not move."""
        assert self._positions is not None
        key = self.source.key(stream_dir)
        start = FilePosition.decode(self._positions.get(key))
        read = self.source.read(stream_dir, start, self.config.source.batch_records)
        if read.position is None or read.position == start:
            return None
        batch = Batch()
        prefix = stream_dir.name
        for line, segment, at in read.lines:
            self.parser.parse(batch, line, f"{prefix}/{segment}@{at}")
        for _ in read.partial:
            batch.reject("partial_line")
        position = read.position.encode()
        self.progress.add(self.store.ingest(batch, {key: position}))
        self._positions[key] = position
        return len(read.lines) + read.partial_lines

    def run(self, once: bool = False, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        cfg = self.config
        last_expire = -math.inf
        while not stop.is_set():
            try:
                self.drain(stop, budget_s=cfg.store.release_interval_s)
            except StoreLockedError as exc:  # a long report holds the DuckDB file: wait
                log.warning("%s; retrying", exc)
                stop.wait(cfg.source.poll_interval_s)
                continue
            if (once and self.caught_up) or \
                    time.monotonic() - last_expire >= cfg.store.expire_interval_s:
                self.store.expire_orphans()
                last_expire = time.monotonic()
            if self.caught_up:
                if once:
                    break
                self.store.release()  # idle: let `report`/`promote` open a DuckDB store
                stop.wait(cfg.source.poll_interval_s)
            elif self.store.exclusive:
                # Busy for release_interval_s: hand the file to any waiting reader briefly.
                self.store.release()
                stop.wait(HANDOFF_S)
        self.progress.maybe_log(force=True)


# --------------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------------


def _kafka_key(topic: str, partition: int) -> str:
    return f"kafka:{topic}:{partition}"


class KafkaIngestor:
    """The `run` loop for the Kafka source (see the module docstring for the offset contract)."""

    def __init__(self, config: EvaluatorConfig, store: Store, parser: RecordParser | None = None,
                 progress: Progress | None = None) -> None:
        self.config = config
        self.store = store
        self.parser = parser or RecordParser.from_config(config)
        self.progress = progress or Progress(config.source.progress_interval_s)
        self.next_offset: dict[Any, int] = {}  # TopicPartition -> first offset not yet stored

    def _consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.coordinator.assignors.range import RangePartitionAssignor

        k = self.config.source.kafka
        return AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap, group_id=k.group_id, client_id=k.client_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=self.config.source.batch_records,
        )

    def _listener(self, consumer: Any) -> Any:
        from aiokafka import ConsumerRebalanceListener

        ingestor = self

        class SeekToStore(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
                stored = await asyncio.to_thread(ingestor.store.offsets, "kafka:")
                fresh = []
                for tp in assigned:
                    pos = stored.get(_kafka_key(tp.topic, tp.partition))
                    if pos is None:
                        fresh.append(tp)
                        ingestor.next_offset[tp] = 0
                    else:
                        consumer.seek(tp, int(pos))
                        ingestor.next_offset[tp] = int(pos)
                if fresh:
                    await consumer.seek_to_beginning(*fresh)
                log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@"
                                                 f"{ingestor.next_offset[tp]}" for tp in assigned))

        return SeekToStore()

    async def _caught_up(self, consumer: Any, started: float) -> bool:
        assignment = consumer.assignment()
        if not assignment:
            timeout = self.config.source.kafka.assignment_timeout_s
            if time.monotonic() - started > timeout:
                log.warning("no partitions assigned after %.0fs (do the topics exist?); "
                            "nothing to drain", timeout)
                return True
            return False
        ends = await consumer.end_offsets(list(assignment))
        for tp in assignment:
            if await consumer.position(tp) < ends[tp]:
                return False
        return True

    async def run(self, once: bool = False, stop: asyncio.Event | None = None) -> None:
        from aiokafka.errors import KafkaError

        stop = stop or asyncio.Event()
        k = self.config.source.kafka
        consumer = self._consumer()
        consumer.subscribe([k.inferences_topic, k.labels_topic], listener=self._listener(consumer))
        await consumer.start()
        started = last_release = time.monotonic()
        last_expire = -math.inf
        poll_ms = int(self.config.source.poll_interval_s * 1000)
        try:
            while not stop.is_set():
                data = await consumer.getmany(timeout_ms=poll_ms,
                                              max_records=self.config.source.batch_records)
                if time.monotonic() - last_expire >= self.config.store.expire_interval_s:
                    await asyncio.to_thread(self.store.expire_orphans)
                    last_expire = time.monotonic()
                if not data:
                    if once and await self._caught_up(consumer, started):
                        await asyncio.to_thread(self.store.expire_orphans)
                        break
                    await asyncio.to_thread(self.store.release)
                    last_release = time.monotonic()
                    continue
                batch, positions, commits = self._batch(data)
                result = await self._ingest(batch, positions, stop)
                if result is None:
                    break  # stopped while the store was locked: the batch is re-read next run
                self.next_offset.update(commits)
                self.progress.add(result)
                try:
                    await consumer.commit(commits)
                except KafkaError as exc:
                    # The store holds the position; the group offset only feeds lag monitoring.
                    log.warning("Kafka offset commit failed (%s); the store has the position, "
                                "nothing is lost or counted twice", exc)
                if self.store.exclusive and \
                        time.monotonic() - last_release >= self.config.store.release_interval_s:
                    await asyncio.to_thread(self.store.release)  # hand a reader the file
                    await asyncio.sleep(HANDOFF_S)
                    last_release = time.monotonic()
        finally:
            await consumer.stop()
            self.progress.maybe_log(force=True)

    async def _ingest(self, batch: Batch, positions: dict[str, str],
                      stop: asyncio.Event) -> IngestResult | None:
        """Store the batch, waiting out a reader that holds the DuckDB file (never drop it)."""
        while not stop.is_set():
            try:
                return await asyncio.to_thread(self.store.ingest, batch, positions)
            except StoreLockedError as exc:
                log.warning("%s; retrying", exc)
                await asyncio.sleep(self.config.source.poll_interval_s)
        return None

    def _batch(self, data: dict[Any, list[Any]]) -> tuple[Batch, dict[str, str], dict[Any, int]]:
        batch = Batch()
        positions: dict[str, str] = {}
        commits: dict[Any, int] = {}
        for tp, messages in data.items():
            floor = self.next_offset.get(tp, 0)
            where = f"{tp.topic}[{tp.partition}]"
            for m in messages:
                if m.offset < floor:
                    continue  # already in the store (re-delivered around a rebalance)
                if m.value is None:
                    self.parser.count_bad(batch, "empty_message", f"offset {m.offset}", where)
                    continue
                self.parser.parse(batch, m.value, f"{where}@{m.offset}")
            last = messages[-1].offset + 1
            if last > floor:
                positions[_kafka_key(tp.topic, tp.partition)] = str(last)
                commits[tp] = last
        return batch, positions, commits


def run(config: EvaluatorConfig, *, once: bool = False, store: Store | None = None,
        stop: threading.Event | None = None) -> Progress:
    """Run the configured ingest loop until stopped (or, with once, until drained)."""
    own = store is None
    store = store or Store.open(config.store)
    try:
        if config.source.type == "kafka":
            ingestor_k = KafkaIngestor(config, store)
            asyncio.run(run_until_stopped(ingestor_k, once, stop))
            return ingestor_k.progress
        ingestor_f = FileIngestor(config, store)
        ingestor_f.run(once=once, stop=stop)
        return ingestor_f.progress
    finally:
        if own:
            store.close()


class _AsyncRunner(Protocol):
    async def run(self, once: bool = False, stop: asyncio.Event | None = None) -> None: ...


async def run_until_stopped(runner: _AsyncRunner, once: bool,
                            stop: threading.Event | None) -> None:
    """`runner.run` on this event loop, stopped when the `stop` thread event is set."""
    event = asyncio.Event()
    if stop is not None:
        loop = asyncio.get_running_loop()

        def watch() -> None:
            stop.wait()
            loop.call_soon_threadsafe(event.set)

        threading.Thread(target=watch, daemon=True, name="evaluator-stop").start()
    await runner.run(once=once, stop=event)
