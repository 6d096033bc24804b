"""Writing report.json, report.md and report.html atomically."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evaluator.dataset import EvalDataset, JoinStats
from evaluator.decision import ChallengerDecision
from evaluator.report.document import render_html, render_markdown
from evaluator.report.figures import make_figures
from evaluator.report.format import _iso
from evaluator.report.payload import build_report
from evaluator.report.sections import _title, report_blocks
from evaluator.stats.significance import jsonable

JSON_FILE, MARKDOWN_FILE, HTML_FILE = "report.json", "report.md", "report.html"


def write_report(
    dataset: EvalDataset,
    decisions: list[ChallengerDecision],
    out_dir: Path,
    *,
    drift: Any | None = None,
    generated_at: float | None = None,
    window: tuple[float | None, float | None] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; return their paths.

    ``decisions`` are ``evaluator.decision.decide``'s output for ``dataset`` (the report shows
    them, it never re-decides). ``drift`` is an optional ``DriftResult`` or a loaded drift.json
    (shown as a section). ``window`` is the (since, until) the dataset was loaded for; without
    it the window is the span of the requests' timestamps.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = build_report(
        dataset, decisions, drift=drift, generated_at=generated_at, window=window
    )
    t_figures = time.perf_counter()
    figures = make_figures(dataset, payload)
    payload["figures"] = [f.name for f in figures if f.png_base64]
    payload["notes"].extend(f.note for f in figures if f.note)
    payload["timings_s"]["figures"] = round(time.perf_counter() - t_figures, 3)
    t_render = time.perf_counter()
    blocks = report_blocks(payload)
    markdown = render_markdown(blocks)
    page = render_html(blocks, figures, title=_title(payload))
    payload["timings_s"]["render"] = round(time.perf_counter() - t_render, 3)
    payload["timings_s"]["report_total"] = round(time.perf_counter() - started, 3)
    text = json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n"
    paths = {
        "json": out / JSON_FILE,
        "markdown": out / MARKDOWN_FILE,
        "html": out / HTML_FILE,
    }
    # JSON last: `promote` acts on it, so it should only appear next to a complete report.
    _write_atomic(paths["markdown"], markdown)
    _write_atomic(paths["html"], page)
    _write_atomic(paths["json"], text)
    return paths


def _write_atomic(path: Path, text: str) -> None:
    """Write next to the target, then rename over it: readers see the old file or the new one.

    The temporary name is unique (pid + random) and opened with mode "x" rather than via
    ``tempfile.mkstemp``, whose 0600 permissions would hide the report from other users.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_empty_report(out_dir: Path, route: str, since: float | None, stats: JoinStats,
                       error: str) -> Path:
    """report.json when the route has no labelled data to load: the join counts and why, and
    no decisions, so `promote` finds nothing to apply. No Markdown or HTML: nothing to show."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "route": route,
        "generated_at": time.time(),
        "window": {"since": since, "until": None,
                   "since_iso": _iso(since) or "…", "until_iso": "…"},
        "join_stats": asdict(stats),
        "n": 0,
        "decisions": [],
        "error": error,
    }
    path = out_dir / JSON_FILE
    _write_atomic(path, json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    return path
