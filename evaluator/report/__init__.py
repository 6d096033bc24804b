"""The promotion report of one route: ``report.json``, ``report.md`` and ``report.html``.

Who reads what, and why there are three files:

* ``report.json`` is the record ``python -m evaluator promote`` acts on (it reads ``route``,
  ``generated_at`` and ``decisions[i]["decision" / "challenger" / "experiment"]``, the last
  binding the verdict to the state it was made in: experiment id and start, route, champion,
  challenger, the data's end and the registry version) and what dashboards or audits parse.
  It is versioned (``report_schema_version``) so consumers can refuse a shape they do not
  know, and strict JSON: NaN/inf become ``null`` (a ``NaN`` that slipped into a p-value must
  read as "missing", never as a number), enforced by ``json.dumps(..., allow_nan=False)``.
* ``report.md`` is for whoever approves the promotion: one headline per challenger with the
  numbers behind the verdict, then the tables (join, metrics with CIs, tests, guardrails,
  off-policy values, notes) so a thin join or a failing guardrail cannot hide behind a verdict.
* ``report.html`` is the same content, self-contained (inline CSS, plots as base64 PNG), so it
  can be mailed or archived as one file and opened offline years later: ROC / calibration /
  score distributions (or predicted-vs-actual and residuals for regression), the always-valid
  test's path over time with its 1/alpha boundary, and arm shares over time when exploring.

Design: every number is computed once into the JSON payload, and the Markdown and HTML are both
rendered from one list of content blocks built from that payload, so the three files cannot
disagree. Only the plots read the dataset again (downsampled: ROC thinned to a few hundred
points, histograms, a few thousand scatter points), which keeps a 1M-row report to a fraction of
the time the statistics take (see ``loadtests/bench_report.py``).

Files are written atomically (temporary file + rename): ``promote`` may read ``report.json``
while a report is being produced and must never see half a file.

Modules: `payload` (report.json), `notes` (headlines and notes), `sections` and `serving` (the
content blocks), `drift` (the drift section, from drift.json's data), `document` (the block
model and its Markdown and HTML renderers), `plotting`, `figures` and `timeline` (the plots),
`format` (number formatting), `writer` (the three files, atomically).
"""

from __future__ import annotations

from evaluator.report.document import Block, FigureImage, render_html, render_markdown
from evaluator.report.figures import make_figures, roc_points
from evaluator.report.notes import headline
from evaluator.report.payload import REPORT_SCHEMA_VERSION, build_report
from evaluator.report.sections import report_blocks
from evaluator.report.timeline import look_limits
from evaluator.report.writer import (
    HTML_FILE,
    JSON_FILE,
    MARKDOWN_FILE,
    write_empty_report,
    write_report,
)

__all__ = [
    "HTML_FILE",
    "JSON_FILE",
    "MARKDOWN_FILE",
    "REPORT_SCHEMA_VERSION",
    "Block",
    "FigureImage",
    "build_report",
    "headline",
    "look_limits",
    "make_figures",
    "render_html",
    "render_markdown",
    "report_blocks",
    "roc_points",
    "write_empty_report",
    "write_report",
]
