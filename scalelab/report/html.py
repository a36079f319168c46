"""The report card as one self-contained HTML page: inline CSS, PNGs as base64 data URIs, nothing fetched."""

from __future__ import annotations

import base64
import html
import re

from markdown_it import MarkdownIt

from scalelab.report.blocks import STAGE_TITLES, Card, Code, Figure, Notes, RunInfo, Table

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; background: #f6f7f9;
       margin: 0; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 1.7em; border-bottom: 3px solid #3b6fd6; padding-bottom: 6px; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #d8dde6; padding-bottom: 4px; }
nav a { margin-right: 14px; color: #3b6fd6; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 18px; font-size: 0.9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #d8dde6; padding: 4px 10px; text-align: left; }
td { font-variant-numeric: tabular-nums; }
th { background: #eef2f8; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 12px 0 24px; }
figure img { max-width: 100%; border: 1px solid #d8dde6; }
figcaption { color: #556070; font-size: 0.9em; }
pre { background: #f3f5f8; padding: 10px 12px; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
.notes { border-left: 3px solid #d8dde6; padding-left: 14px; margin: 10px 0 20px; }
.runs { color: #556070; }
"""


def _inline(text: str) -> str:
    """The few inline Markdown marks the card's own paragraphs use: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    cap = html.escape(f.caption)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _notes(n: Notes) -> str:
    try:  # markdown-it-py (CommonMark) when installed renders a study's tables; otherwise the text as written

        body = MarkdownIt("commonmark", {"html": False}).enable("table").render(n.text)
        # a study's own headings sit below this card's sections; its image links would point outside the page
        body = re.sub(r"<(/?)h([1-3])>", lambda m: f"<{m.group(1)}h{int(m.group(2)) + 2}>", body)
        body = re.sub(r"<img [^>]*>", "", body)
    except ImportError:
        body = f"<pre>{html.escape(n.text)}</pre>"
    return f'<details open><summary>{html.escape(n.label)}</summary><div class="notes">{body}</div></details>'


def _block(b) -> str:
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        return _figure(b)
    if isinstance(b, Code):
        is_config = b.lang == "toml"
        return (f"<details{'' if is_config else ' open'}><summary>{html.escape(b.label)}</summary>"
                f"<pre>{html.escape(b.text.rstrip())}</pre></details>")
    if isinstance(b, Notes):
        return _notes(b)
    return f"<p>{_inline(b)}</p>"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def render_html(card: Card, runs: list[RunInfo]) -> str:
    nav = "".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in card.sections)
    runs_line = ", ".join(f"<code>{html.escape(str(r.path))}</code> ({html.escape(STAGE_TITLES.get(r.stage, r.stage))})"
                          for r in runs)
    parts = [f"<h1>{html.escape(card.title)}</h1>", f'<p class="runs">Runs: {runs_line}</p>', f"<nav>{nav}</nav>"]
    for sec in card.sections:
        parts.append(f'<section id="{_anchor(sec.title)}"><h2>{html.escape(sec.title)}</h2>')
        parts += [_block(b) for b in sec.blocks]
        parts.append("</section>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(card.title)}</title><style>{STYLE}</style></head>\n"
            f"<body><main>\n{body}\n</main></body></html>\n")
