"""The HTML of ``mmlm report`` (:mod:`mmlm.app.report`): one self-contained page, no network.

Every part is a function from plain data to an HTML string: :func:`line_chart` (inline SVG), :func:`table`,
:func:`json_diff` (a predicted JSON beside its ground truth, field differences marked), :func:`gallery` (rows
filterable by verdict and type with a few lines of inline script) and :func:`page` that puts them together with the
inline stylesheet. Images arrive as ``data:`` URIs; nothing refers to a file or a server.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmlm.evaluation.documents import leaf_paths

#: Verdicts of a gallery row, in the order of the filter.
VERDICTS = ("right", "partial", "wrong", "unscored")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #ddd}
.chart text{font-size:10px;fill:#555}.chart .title{font-size:12px;fill:#222}
.filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #eee}
#gallery img{max-width:192px;max-height:256px;image-rendering:pixelated}
#gallery img.doc{max-width:360px;max-height:480px;image-rendering:auto}
.verdict{font-weight:bold;padding:1px 6px;border-radius:3px}
.v-right{background:#d9f2d9}.v-partial{background:#fff0c2}.v-wrong{background:#f8d4d4}.v-unscored{background:#eee}
pre.json{margin:0;font-size:12px;white-space:pre-wrap}
.f-same{background:#e6f5e6}.f-diff{background:#f8d4d4}.f-missing{background:#ffe6b3}.f-extra{background:#e0e0ff}
.tables{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
ol.ranked{margin:0;padding-left:1.4em}
.conf{color:#666;font-size:11px}.attn img{width:64px;height:64px;margin:1px}.note{color:#666}
"""

SCRIPT = """
function applyFilter(){
  var v=document.getElementById('filter-verdict').value, t=document.getElementById('filter-type').value, n=0;
  document.querySelectorAll('#gallery tbody tr').forEach(function(row){
    var show=(v==='all'||row.dataset.verdict===v)&&(t==='all'||row.dataset.type===t);
    row.hidden=!show; if(show){n++;}
  });
  document.getElementById('shown-count').textContent=String(n);
}
document.addEventListener('DOMContentLoaded',function(){
  ['filter-verdict','filter-type'].forEach(function(id){
    var el=document.getElementById(id); if(el){el.addEventListener('change',applyFilter);}
  });
  if(document.getElementById('gallery')){applyFilter();}
});
"""


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def number(value: Any) -> str:
    """A metric value for a table cell: 4 significant digits, integers as they are, text escaped."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """An HTML table; numbers are right-aligned (:func:`number`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{number(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    title = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scale(values: Sequence[float], low: float, high: float) -> tuple[float, float, Any]:
    """``(min, max, f)`` with ``f`` mapping a value of ``values``' range linearly onto ``[low, high]``."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return lo, hi, lambda v: low + (v - lo) / span * (high - low)


def line_chart(title: str, points: Sequence[tuple[float, float]], width: int = 300, height: int = 170) -> str:
    """An inline SVG line chart of ``(step, value)`` points (non-finite values dropped), axes labelled with the
    first/last step and the min/max value; ``""`` when no point is finite."""
    points = sorted((x, y) for x, y in points if math.isfinite(y))
    if not points:
        return ""
    left, right, top, bottom = 48, width - 8, 20, height - 20
    x0, x1, fx = _scale([p[0] for p in points], left, right)
    y0, y1, fy = _scale([p[1] for p in points], bottom, top)
    path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="2"><title>step {x:g}: {y:.4g}</title></circle>'
                   for x, y in points) if len(points) <= 60 else ""
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="{esc(title)}"><text class="title" x="{left}" y="13">{esc(title)}</text>'
            f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#aaa"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#aaa"/>'
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{left}" y="{height - 6}">{x0:g}</text>'
            f'<text x="{right}" y="{height - 6}" text-anchor="end">{x1:g}</text>'
            f'<polyline fill="none" stroke="#1f6fb4" stroke-width="1.5" points="{path}"/>{dots}</svg>')


def charts(curves: dict[str, list[tuple[float, float]]]) -> str:
    """One :func:`line_chart` per curve, side by side."""
    return '<div class="charts">' + "".join(line_chart(name, points) for name, points in curves.items()) + "</div>"


def field_status(prediction: Any, reference: Any) -> dict[str, str]:
    """``same``/``diff``/``extra`` per leaf path of ``prediction`` and ``missing`` per reference-only path."""
    predicted, expected = leaf_paths(prediction), leaf_paths(reference)
    status = {p: "extra" if p not in expected else "same" if expected[p] == v else "diff" for p, v in predicted.items()}
    return status | {p: "missing" for p in expected if p not in predicted}


def _child_path(path: str, key: Any, in_dict: bool) -> str:
    """The path of ``key`` under ``path`` (``a.b`` in an object, ``a[0]`` in a list)."""
    return (f"{path}.{key}" if path else str(key)) if in_dict else f"{path}[{key}]"


def _json_lines(data: Any, status: dict[str, str], notes: dict[str, str], path: str = "", indent: int = 0,
                label: str = "") -> list[str]:
    """Indented HTML lines of ``data`` (``label``: the ``"key": `` before it); each leaf wrapped in a span of its
    status class, followed by its note if any."""
    pad = "  " * indent
    if isinstance(data, (dict, list)) and data:
        in_dict = isinstance(data, dict)
        items = data.items() if in_dict else enumerate(data)
        children = [_json_lines(v, status, notes, _child_path(path, k, in_dict), indent + 1,
                                f'"{esc(k)}": ' if in_dict else "") for k, v in items]
        lines = [f"{pad}{label}{'{' if in_dict else '['}"]
        for i, child in enumerate(children):
            lines += child[:-1] + [child[-1] + ("," if i < len(children) - 1 else "")]
        return lines + [f"{pad}{'}' if in_dict else ']'}"]
    note = f' <span class="conf">{esc(notes[path])}</span>' if path in notes else ""
    text = esc(json.dumps(data, ensure_ascii=False))
    return [f'{pad}{label}<span class="f-{status.get(path, "same")}" title="{esc(path)}">{text}</span>{note}']


def json_block(data: Any, status: dict[str, str], notes: dict[str, str] | None = None) -> str:
    """``data`` pretty-printed in a ``<pre>``, leaves coloured by ``status`` (path → same/diff/missing/extra)."""
    return '<pre class="json">' + "\n".join(_json_lines(data, status, notes or {})) + "</pre>"


def json_diff(prediction: Any, reference: Any, notes: dict[str, str] | None = None) -> tuple[str, str]:
    """``(predicted, ground truth)`` HTML blocks: leaves equal in both green, different red, only predicted blue,
    only in the ground truth orange; ``notes`` (path → text, e.g. a field's confidence) follow predicted leaves."""
    status = field_status(prediction, reference)
    return json_block(prediction, status, notes), json_block(reference, status)


@dataclass
class GalleryRow:
    """One example of the gallery.

    Attributes:
        id: the example's evaluation id.
        type: its filter type (``"vqa · colour"``, ``"caption"``, ``"cord-v2"``).
        verdict: one of :data:`VERDICTS`.
        image: a ``data:`` URI, or ``""`` when the image was not found.
        prompt: the question or prompt.
        prediction: HTML of the prediction cell.
        references: HTML of the references cell.
        score: the example's score (VQA accuracy, TED accuracy, …), ``None`` when unscored.
        document: whether the image is a document (shown larger).
        extra: HTML below the image (attention maps).
    """

    id: str
    type: str
    verdict: str
    image: str
    prompt: str
    prediction: str
    references: str
    score: float | None = None
    document: bool = False
    extra: str = ""


def _options(element_id: str, label: str, values: Sequence[str]) -> str:
    options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in ("all", *values))
    return f'<label>{esc(label)} <select id="{element_id}">{options}</select></label>'


def gallery_row(row: GalleryRow) -> str:
    """The ``<tr>`` of one example (``data-verdict``/``data-type`` drive the filter)."""
    image = (f'<img src="{row.image}" alt="{esc(row.id)}"{" class=doc" if row.document else ""}>' if row.image
             else '<span class="note">image not found</span>')
    score = "" if row.score is None else f" {row.score:.2f}"
    return (f'<tr data-verdict="{esc(row.verdict)}" data-type="{esc(row.type)}"><td>{image}{row.extra}</td>'
            f"<td>{esc(row.id)}<br>{esc(row.type)}</td><td>{esc(row.prompt)}</td><td>{row.prediction}</td>"
            f'<td>{row.references}</td><td><span class="verdict v-{esc(row.verdict)}">{esc(row.verdict)}</span>'
            f"{score}</td></tr>")


def gallery(rows: Sequence[GalleryRow]) -> str:
    """The filterable table of examples (filters by verdict and type, a count of the rows shown)."""
    types = sorted({r.type for r in rows})
    verdicts = [v for v in VERDICTS if any(r.verdict == v for r in rows)]
    filters = (f'<div class="filters">{_options("filter-verdict", "verdict", verdicts)} '
               f'{_options("filter-type", "type", types)} <span id="shown-count">{len(rows)}</span> of {len(rows)} '
               "shown</div>")
    header = "".join(f"<th>{h}</th>" for h in ("image", "id / type", "prompt", "prediction", "references", "verdict"))
    body = "".join(gallery_row(r) for r in rows)
    return f'{filters}<table id="gallery"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


@dataclass
class Section:
    """A titled part of the page; ``body`` is HTML."""

    title: str
    body: str
    anchor: str = ""


@dataclass
class Page:
    """The whole report: a title, lines under it (HTML-escaped) and sections in order."""

    title: str
    subtitle: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)


def page(report: Page) -> str:
    """The self-contained HTML document: inline style and script, a contents list, every section."""
    contents = "".join(f'<li><a href="#{esc(s.anchor or i)}">{esc(s.title)}</a></li>'
                       for i, s in enumerate(report.sections))
    body = "".join(f'<h2 id="{esc(s.anchor or i)}">{esc(s.title)}</h2>{s.body}' for i, s in enumerate(report.sections))
    lines = "".join(f'<div class="note">{esc(line)}</div>' for line in report.subtitle)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(report.title)}</title>'
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>{esc(report.title)}</h1>{lines}"
            f"<ul>{contents}</ul>{body}</body></html>\n")
