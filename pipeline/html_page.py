"""Self-contained HTML pages (the QC report, the eval page): one file, inline style and script,
images embedded as data URIs, so a page opens offline and can be mailed or archived as it is."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MISSING = "\u2014"  # an em dash: shown where a value is missing (never a 0)

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 18px; margin: 28px 0 8px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d0d5; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f2f2f5; position: sticky; top: 0; }
th.sortable { cursor: pointer; user-select: none; } th.sortable::after { content: " \\2195"; color: #999; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #999; text-align: center; }
.ok { color: #137333; font-weight: 600; } .failed { color: #b3261e; font-weight: 600; }
.muted { color: #666; } .small { font-size: 12px; } td.small { min-width: 170px; }
.stats { display: flex; gap: 12px; flex-wrap: wrap; margin: 8px 0 16px; }
.stat { border: 1px solid #d0d0d5; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.stat b { display: block; font-size: 20px; }
.pair { display: flex; gap: 6px; flex-wrap: nowrap; }
.pair img { height: 112px; width: auto; max-width: none; }  /* a narrow column must not shrink them */
img { max-width: 100%; height: auto; }
figure { display: inline-block; max-width: 100%; margin: 0 6px 0 0; text-align: center; }
figcaption { font-size: 12px; color: #666; }
img.pixelated { image-rendering: pixelated; }
"""

# Click a header to sort by it (again: reverse). Cells sort by data-sort when they have it
# (numbers as numbers); missing values go last either way.
SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th.sortable').forEach(function (th, column) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
      function key(row) {
        var cell = row.cells[column], v = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
        return v === '' ? null : (isNaN(Number(v)) ? v.toLowerCase() : Number(v));
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return x === y ? 0 : (x === null ? 1 : -1);
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Cell:
    """One table cell: its HTML, the value it sorts by ('' = missing, sorts last) and its class."""

    html: str
    sort: str | None = None
    css: str = ""


def number(value: float | int | None, digits: int = 2, unit: str = "") -> Cell:
    """A numeric cell; None and NaN are shown as missing, never as 0."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return Cell(MISSING, "", "missing")
    text = f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"
    return Cell(esc(text + unit), repr(value), "num")


def text(value: object) -> Cell:
    return Cell(MISSING, "", "missing") if value in (None, "") else Cell(esc(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], titles: Sequence[str] = ()) -> str:
    """A sortable table; `titles` are optional header tooltips (a metric's meaning and direction)."""
    head = "".join(
        f"<th class='sortable' title='{esc(titles[i]) if i < len(titles) else ''}'>{h}</th>" for i, h in enumerate(headers)
    )
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(cell: Cell) -> str:
    css = f" class='{cell.css}'" if cell.css else ""
    sort = f" data-sort='{esc(cell.sort)}'" if cell.sort is not None else ""
    return f"<td{css}{sort}>{cell.html}</td>"


def stats(items: Sequence[tuple[str, str]]) -> str:
    """A row of headline numbers: (label, value)."""
    return "<div class='stats'>" + "".join(f"<div class='stat'><b>{esc(v)}</b>{esc(k)}</div>" for k, v in items) + "</div>"


def image_uri(rgb: np.ndarray, fmt: str = "png", quality: int = 88) -> str:
    """An RGB image as a data URI (PNG, or JPEG for photographic thumbnails)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else []
    ok, data = cv2.imencode(
        ".jpg" if fmt == "jpeg" else ".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params
    )
    if not ok:
        raise ValueError("image could not be encoded")
    return f"data:image/{fmt};base64,{base64.b64encode(data.tobytes()).decode()}"


def figure(uri: str, caption: str, width: int | None = None, pixelated: bool = False) -> str:
    size = f" width='{width}'" if width else ""
    css = " class='pixelated'" if pixelated else ""
    return f"<figure><img src='{uri}' alt='{esc(caption)}'{size}{css}><figcaption>{esc(caption)}</figcaption></figure>"


def pair(*figures: str) -> str:
    """Figures side by side, never wrapped under each other (before | after)."""
    return "<div class='pair'>" + "".join(figures) + "</div>"


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}<script>{SORT_SCRIPT}</script></body></html>"
    )
