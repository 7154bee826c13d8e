"""The one page design of fetaliqa's HTML reports (`evaluate`'s and `report`'s): the page shell, its CSS, tables.

Pages are static files: no script, no network; images are files beside the page referenced by relative path.
"""

from __future__ import annotations

import html

CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,.info td,.headline td:nth-child(3){text-align:left}
.cm td{min-width:7em}
figure{margin:1em 0 2em}figcaption{font-size:.9em;color:#444;max-width:900px}img{max-width:100%}
.note{font-size:.9em;color:#555}
.banner{background:#fff4d6;border:1px solid #e0b84f;padding:.5em 1em;margin:1em 0}
.gallery{display:flex;flex-wrap:wrap;gap:.75em}.gallery figure{margin:0;width:224px}
.gallery img{width:224px;height:224px;display:block;background:#000}.gallery figcaption{font-size:.8em}"""


def page(title: str, body: list[str]) -> str:
    """A whole HTML document: `title` in the head, the `body` fragments joined by newlines."""
    return "\n".join([f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>{CSS}</style></head><body>", *body, "</body></html>"])


def safe_name(text: str) -> str:
    """`text` with every character but letters, digits and `-_.` replaced by `_`: a file name for any id."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def fmt(value, digits: int = 3) -> str:
    """A table cell's text: floats to `digits` decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    """An HTML table of `rows` (cells through `fmt`, escaped) under `header`."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
