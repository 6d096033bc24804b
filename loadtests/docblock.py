"""Regenerating a measured block inside a hand-written document (benchmarks, simulations).

A development tool: the benchmarks and simulations rewrite their results table in docs/ between
two marker comments, and leave the prose around it alone.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_marked_block(path: Path, block: str, begin: str, end: str) -> None:
    """Replace the generated block between the `begin` and `end` markers of a document (append
    it if the markers are missing); the hand-written text around it is never touched. `block`
    includes both markers. The file is replaced atomically (temporary file + rename)."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
