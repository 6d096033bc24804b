"""Reading a training snapshot (CSV, JSONL, Parquet) into typed feature columns."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluator.drift.data import (
    ALL_MODELS,
    IGNORED_COLUMNS,
    SCORE_PREFIXES,
    TS_COLUMNS,
    FeatureData,
    _is_numeric,
    _obj,
)
from evaluator.drift.errors import EmptyReferenceError, FeatureTypeError, ReferenceFormatError
from understudy.labels import TimeRangeError, unix_seconds


def load_reference(path: str | Path, *, categorical: Iterable[str] = (),
                   names: Mapping[str, Sequence[str]] | None = None) -> FeatureData:
    """Read a training snapshot: `.csv`, `.jsonl`/`.ndjson`, or `.parquet` (needs pyarrow).

    One row per prediction, one column per feature. Optional columns: `ts`/`timestamp` (unix
    seconds or ISO 8601; needed for seasonal segments), `score` (reference scores for every
    model) or `score:<model>`; `request_id`, `label` and similar are ignored. A JSONL value that
    is a list of numbers is a tensor: its columns are named like the store names them
    (`features.names` in the config, else `name[j]`).
    """
    p = Path(path)
    if not p.exists():
        raise ReferenceFormatError(f"reference file {p} does not exist")
    if not p.is_file():
        raise ReferenceFormatError(f"reference {p} is not a file")
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    if p.stat().st_size == 0:
        raise EmptyReferenceError(f"reference file {p} is empty")
    if suffix == ".csv":
        raw, texts = _read_csv(p)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        raw, texts = _read_jsonl(p, names or {}), {}
    elif suffix == ".parquet":
        raw, texts = _read_parquet(p), {}
    else:
        raise ReferenceFormatError(f"reference file {p}: unknown format {suffix or '(none)'}; "
                                   f"use .csv, .jsonl or .parquet")
    return _reference_frame(raw, texts, str(p), set(categorical))


def _read_csv(path: Path) -> tuple[dict[str, list[Any]], dict[str, np.ndarray]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReferenceFormatError(f"reference file {path}: cannot read CSV: {exc}") from None
    rows = [r for r in rows if r and any(cell.strip() for cell in r)]
    if not rows:
        raise EmptyReferenceError(f"reference file {path} is empty")
    header = [h.strip() for h in rows[0]]
    if any(not h for h in header) or len(set(header)) != len(header):
        raise ReferenceFormatError(f"reference file {path}: the header row needs unique, "
                                   f"non-empty column names, got {header}")
    body = rows[1:]
    if not body:
        raise EmptyReferenceError(f"reference file {path} has a header but no rows")
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise ReferenceFormatError(f"reference file {path} line {i}: {len(r)} fields, the "
                                       f"header has {len(header)}")
    out: dict[str, list[Any]] = {}
    texts: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        cells = [r[j].strip() for r in body]
        values: list[Any] = []
        numeric = True
        for cell in cells:
            if cell == "" or cell.lower() in ("na", "nan", "null", "none"):
                values.append(None)
                continue
            try:
                values.append(float(cell))
            except ValueError:
                numeric = False
                values.append(cell)
        out[name] = values
        if numeric:
            texts[name] = _obj([c if c else None for c in cells])
    return out, texts


def _read_jsonl(path: Path, names: Mapping[str, Sequence[str]]) -> dict[str, list[Any]]:
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise ReferenceFormatError(f"reference file {path} line {i}: invalid JSON "
                                               f"({exc})") from None
                if not isinstance(rec, dict):
                    raise ReferenceFormatError(f"reference file {path} line {i}: expected a "
                                               f"JSON object per line, got "
                                               f"{type(rec).__name__}")
                rows.append(_flatten(rec, names, path, i))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceFormatError(f"reference file {path}: cannot read: {exc}") from None
    if not rows:
        raise EmptyReferenceError(f"reference file {path} has no records")
    keys: list[str] = []
    seen: set[str] = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    return {k: [r.get(k) for r in rows] for k in keys}


def _flatten(rec: dict[str, Any], names: Mapping[str, Sequence[str]], path: Path,
             line: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rec.items():
        if isinstance(value, list):
            cols = names.get(key)
            if cols is None or len(cols) != len(value):
                cols = [key] if len(value) == 1 else [f"{key}[{j}]" for j in range(len(value))]
            for c, v in zip(cols, value, strict=True):
                if isinstance(v, dict | list):
                    raise FeatureTypeError(f"reference file {path} line {line}: {key!r} holds "
                                           f"nested values; expected a flat list", str(c))
                out[c] = v
        elif isinstance(value, dict):
            raise FeatureTypeError(f"reference file {path} line {line}: feature {key!r} is an "
                                   f"object; expected a number or a string", key)
        else:
            out[key] = value
    return out


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq  # optional: only for Parquet references
    except ImportError:
        raise ReferenceFormatError(f"reference file {path}: reading Parquet needs pyarrow "
                                   f"(pip install pyarrow), or convert it to CSV or "
                                   f"JSONL") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types
        raise ReferenceFormatError(f"reference file {path}: cannot read Parquet: {exc}") from None
    if table.num_rows == 0:
        raise EmptyReferenceError(f"reference file {path} has no rows")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _reference_frame(raw: Mapping[str, list[Any]], texts: Mapping[str, np.ndarray], source: str,
                     categorical: set[str]) -> FeatureData:
    """Typed columns from raw per-column values; splits off ts and score columns."""
    columns: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    ts: np.ndarray | None = None
    for name, values in raw.items():
        lowered = name.lower()
        if lowered in IGNORED_COLUMNS:
            continue
        if lowered in TS_COLUMNS:
            ts = _parse_ts(values, source, name)
            continue
        if lowered == "score" or lowered.startswith(SCORE_PREFIXES):
            model = ALL_MODELS if lowered == "score" else name[len("score:"):]
            col = _typed(values, source, name, force_categorical=False)
            if not _is_numeric(col):
                raise FeatureTypeError(f"{source}: score column {name!r} must be numeric", name)
            scores[model] = col
            continue
        columns[name] = _typed(values, source, name, force_categorical=name in categorical)
    if not columns:
        raise EmptyReferenceError(f"{source}: no feature columns (only "
                                  f"{', '.join(raw) or 'nothing'})")
    since = float(np.nanmin(ts)) if ts is not None and ts.size else None
    until = float(np.nanmax(ts)) if ts is not None and ts.size else None
    score_ts = {m: ts for m in scores} if ts is not None else {}
    return FeatureData(columns=columns, ts=ts, scores=scores, score_ts=score_ts, source=source,
                       since=since, until=until,
                       raw_text={k: v for k, v in texts.items() if k in columns})


def _typed(values: list[Any], source: str, name: str, *, force_categorical: bool) -> np.ndarray:
    """float64 when every present value is a number (bool excluded), else str objects."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and
                                                           math.isnan(v))]
    if not present:
        raise EmptyReferenceError(f"{source}: feature {name!r} has no values (every row is "
                                  f"empty)")
    numbers = [isinstance(v, int | float) and not isinstance(v, bool) for v in present]
    if all(numbers) and not force_categorical:
        return np.asarray([math.nan if v is None else float(v) for v in values], dtype=float)
    return _obj([None if v is None or (isinstance(v, float) and math.isnan(v)) else
                 _category(v) for v in values])


def _category(v: Any) -> str:
    """Canonical text of a category value: 3.0 -> '3', True -> 'true'."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _parse_ts(values: list[Any], source: str, name: str) -> np.ndarray:
    """Unix seconds per row, each within the record times' range (NaN: a missing time)."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        seconds = _seconds(v)
        if seconds is None:
            raise FeatureTypeError(f"{source}: column {name!r} row {i + 1}: {v!r} is not a "
                                   f"timestamp (unix seconds or ISO 8601)", name)
        if seconds == seconds:  # the shared check: a time no date can name is refused here
            try:
                unix_seconds(name, seconds)
            except TimeRangeError as exc:
                raise FeatureTypeError(f"{source}: column {name!r} row {i + 1}: {exc}",
                                       name) from None
        out[i] = seconds
    return out


def _seconds(v: Any) -> float | None:
    """A timestamp cell (number, numeric text or ISO 8601) as unix seconds; None if none."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        try:
            return float(v)
        except OverflowError:  # an integer no float holds: out of range below
            return math.inf
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
        try:
            from datetime import datetime, timezone

            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)  # noqa: UP017 - explicit for readers
            return dt.timestamp()
        except ValueError:
            pass
    return None
