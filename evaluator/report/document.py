"""The report as a list of content blocks, and its two renderings: Markdown and self-contained HTML.

Both renderers read the same blocks, so report.md and report.html cannot disagree."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evaluator.report.format import VERDICTS


@dataclass(frozen=True)
class FigureImage:
    """A rendered plot. ``note`` is set instead of an image's absence going unexplained."""

    name: str
    title: str
    caption: str
    png_base64: str
    note: str | None = None


@dataclass(frozen=True)
class Block:
    """One piece of report content. ``kind``: h1/h2/h3, p, ul, table, verdict, figures.

    Text uses a tiny inline syntax (``**bold**``, ```code```) that both renderers understand.
    """

    kind: str
    text: str = ""
    items: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    verdict: str = ""


def _h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    return Block(
        "table", header=tuple(header), rows=tuple(tuple(str(c) for c in r) for r in rows)
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    """report.md from the content blocks."""
    out: list[str] = []
    for b in blocks:
        if b.kind.startswith("h"):
            out += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "verdict":
            out += [f"**{b.text}**", ""]
        elif b.kind == "ul":
            out += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "figures":
            out += ["Plots (ROC or residuals, calibration, score distributions, the sequential "
                    "test over time, arm shares) are in report.html next to this file.", ""]
    return "\n".join(out).rstrip() + "\n"


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = _BOLD.sub(r"<strong>\1</strong>", s)
    return _CODE.sub(r"<code>\1</code>", s)


_CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:1400px;margin:0 auto;padding:24px 28px;background:#fff}
h1{font-size:22px;margin:0 0 6px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.table-wrap{max-width:100%;overflow-x:auto;margin:8px 0 12px}
table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #dde1e6;padding:4px 7px;text-align:left;vertical-align:top}
td{max-width:18em}td:first-child{white-space:nowrap;max-width:none}th{min-width:4em}
th{background:#f0f2f5}tr:nth-child(even) td{background:#fafbfc}
.verdict{border-radius:6px;padding:10px 14px;margin:14px 0 4px;font-weight:600;
border-left:6px solid}
.verdict.PROMOTE{background:#e8f6ec;border-color:#1e8e3e}
.verdict.KEEP{background:#eef1f5;border-color:#5f6b7a}
.verdict.BLOCKED{background:#fdecea;border-color:#c5221f}
.verdict.INCONCLUSIVE{background:#fff6e0;border-color:#e3a008}
ul{margin:4px 0 10px;padding-left:22px}li{margin:2px 0}
.figs{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;border:1px solid #e3e6ea;border-radius:6px;padding:8px;background:#fff}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#555;margin-top:4px;max-width:620px}
code{background:#f0f2f5;padding:0 3px;border-radius:3px}
"""


def render_html(blocks: Sequence[Block], figures: Sequence[FigureImage], *, title: str) -> str:
    """report.html: the same blocks, with inline CSS and the plots embedded as data: URIs."""
    body: list[str] = []
    for b in blocks:
        if b.kind.startswith("h"):
            body.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "verdict":
            cls = b.verdict if b.verdict in VERDICTS else ""
            body.append(f'<div class="verdict {cls}">{_inline(b.text)}</div>')
        elif b.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows
            )
            body.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                        f"<tbody>{rows}</tbody></table></div>")
        elif b.kind == "figures":
            if not any(f.png_base64 for f in figures):
                continue
            body.append("<h2>Plots</h2><div class=\"figs\">")
            for f in (f for f in figures if f.png_base64):
                body.append(
                    f'<figure id="fig-{html.escape(f.name)}"><img alt="{html.escape(f.title)}" '
                    f'src="data:image/png;base64,{f.png_base64}"><figcaption><strong>'
                    f"{html.escape(f.title)}</strong> — {html.escape(f.caption)}</figcaption>"
                    "</figure>"
                )
            body.append("</div>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )
