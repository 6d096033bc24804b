"""The segment-file layout the gateway's file sink writes and the evaluator's ingest reads.

    <log.path>/<stream>/<20-digit sequence number of the segment's first record>.jsonl
    <log.path>/worker-<N>/<stream>/...        (`gateway serve --workers N`: one tree per worker)

One record per line (JSON never holds a raw newline). Segments are rotated by size; their names
sort in write order. A trailing line without its newline is still being written: readers leave
it for the next poll.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

SEGMENT_SUFFIX: Final = ".jsonl"
SEQUENCE_DIGITS: Final = 20
WORKER_PREFIX: Final = "worker-"


def segment_name(sequence: int) -> str:
    """The file name of a segment whose first record has this sequence number."""
    return f"{sequence:0{SEQUENCE_DIGITS}d}{SEGMENT_SUFFIX}"


def segment_sequence(path: Path) -> int:
    """The sequence number of a segment's first record (the inverse of `segment_name`)."""
    return int(path.name[:SEQUENCE_DIGITS])


def segment_paths(stream_dir: Path) -> list[Path]:
    """Segments of one stream in write order (names are zero-padded sequence numbers)."""
    return sorted(p for p in stream_dir.glob(f"*{SEGMENT_SUFFIX}")
                  if p.name[:SEQUENCE_DIGITS].isdigit())


def worker_dir(root: Path, worker: int) -> Path:
    """The log tree of one worker process of `serve --workers N`."""
    return root / f"{WORKER_PREFIX}{worker}"


def stream_dirs(root: Path, streams: Iterable[str]) -> list[Path]:
    """Every directory of these streams under a log root: `<root>/<stream>` and
    `<root>/worker-N/<stream>` (two levels only: a recursive walk would list every segment)."""
    if not root.is_dir():
        return []
    return [p for stream in streams for pattern in (stream, f"*/{stream}")
            for p in root.glob(pattern) if p.is_dir()]
