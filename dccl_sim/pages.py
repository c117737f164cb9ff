"""Result pages: Markdown tables, and the one-file HTML page made from a Markdown page (`report.html`, `sweep.html`).

The HTML page is the Markdown rendered by markdown-it-py (CommonMark plus tables), with every image it links
embedded as a base64 data URI and the style inline: it reads in any browser without a network and travels as one
file (mail it, attach it to an issue). Raw HTML in the Markdown is escaped, not passed through.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from collections.abc import Sequence
from pathlib import Path

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.6em; border-bottom: 1px solid #eee; }
h3 { font-size: 1.1em; }
code { background: #f4f4f4; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
table { border-collapse: collapse; display: block; overflow-x: auto; margin: .8em 0; font-size: .88em;
        font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; }
td { white-space: nowrap; }
th { background: #f6f8fa; vertical-align: bottom; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; }
"""


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, every column right-aligned (they hold numbers), as lines."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def write_html_page(markdown: str, folder: Path, path: Path, title: str) -> Path:
    """Render `markdown` (whose image links are file names relative to `folder`) to a self-contained HTML page at
    `path`; return `path`."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = parser.parse(markdown)
    for token in tokens:
        for child in token.children or ():
            if child.type == "image":
                child.attrSet("src", _data_uri(folder / str(child.attrGet("src"))))
    body = parser.renderer.render(tokens, parser.options, {})
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def _data_uri(image: Path) -> str:
    kind = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(image.read_bytes()).decode('ascii')}"
