"""Flame graphs as self-contained HTML: the inline SVG of render.flame_svg plus a search box,
a reset button and a table of the first level (owners or phases). No network, no CDN.

``html_page`` and ``flame_section`` are shared with the HTML report, which puts one or two
flame sections on its page; ``render_flame_html`` is the standalone page (see render.flame for
the differential use: ``render_flame_html(after, diff=before)``).
"""
from __future__ import annotations

from html import escape

from vramtrace.render.flame import FlameNode
from vramtrace.render.flame_svg import group_color, render_flame_svg
from vramtrace.render.units import fmt_bytes, fmt_share, fmt_signed_bytes

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1250px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.sw{display:inline-block;width:.9em;height:.9em;
margin-right:.4em;vertical-align:-1px;border-radius:2px}.muted{color:#666}.warn{color:#a40}
.controls{margin:.4em 0}.controls input{width:22em}.flame svg{border:1px solid #ddd}
.grow{color:#b00}.shrink{color:#00b}code{font-size:.95em}
"""

# Wires each .flame section's search box and reset button to its SVG (see flame_svg._SCRIPT).
PAGE_SCRIPT = """
document.querySelectorAll('.flame').forEach(function (box) {
  var svg = box.querySelector('svg.flamegraph'), out = box.querySelector('.matched');
  box.querySelector('input').addEventListener('input', function (ev) {
    var m = svg.flame.search(ev.target.value);
    out.textContent = m === null ? '' : 'matched ' + (100 * m).toFixed(1) + '% of the bytes';
  });
  box.querySelector('button').addEventListener('click', function () { svg.flame.reset(); });
});
"""


def html_page(title: str, body: str, script: str = "", css: str = "") -> str:
    """A complete page: inline CSS (plus ``css``), the body, the flame wiring and ``script``."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{escape(title)}</title><style>{CSS}{css}</style></head>\n<body>\n{body}\n"
            f"<script>{PAGE_SCRIPT}{script}</script>\n</body></html>\n")


def flame_section(tree: FlameNode, diff: FlameNode | None = None, *, title: str = "",
                  subtitle: str = "", inverted: bool = False) -> str:
    """Search box, reset button, the inline flame SVG and a first-level table."""
    svg = render_flame_svg(tree, diff, title=title, subtitle=subtitle, inverted=inverted, standalone=False)
    return (f'<div class="flame"><div class="controls"><input type="search" placeholder="search frames '
            f'(regular expression)"> <button type="button">reset zoom</button> <span class="matched muted">'
            f"</span></div>\n{svg}{first_level_table(tree, diff)}</div>\n")


def first_level_table(tree: FlameNode, diff: FlameNode | None = None) -> str:
    """Bytes per first-level node, with the baseline and change when ``diff`` is given."""
    names = sorted(set(tree.children) | set(diff.children if diff else ()),
                   key=lambda k: -max(_value(tree, k), _value(diff, k)))
    head = "<tr><th></th><th class=n>bytes</th><th class=n>share</th><th class=n>blocks</th>"
    head += "<th class=n>baseline</th><th class=n>change</th></tr>" if diff else "</tr>"
    rows = []
    for name in names:
        value = _value(tree, name)
        row = (f'<tr><td><span class="sw" style="background:{group_color(name)}"></span>{escape(name)}</td>'
               f"<td class=n>{fmt_bytes(value)}</td>"
               f"<td class=n>{fmt_share(value / tree.value) if tree.value else '-'}</td>"
               f"<td class=n>{tree.children[name].count if name in tree.children else 0:,}</td>")
        if diff:
            delta = value - _value(diff, name)
            cls = "grow" if delta > 0 else "shrink" if delta < 0 else ""
            row += f"<td class=n>{fmt_bytes(_value(diff, name))}</td><td class='n {cls}'>{fmt_signed_bytes(delta)}</td>"
        rows.append(row + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _value(tree: FlameNode | None, name: str) -> int:
    child = tree.children.get(name) if tree else None
    return child.value if child else 0


def render_flame_html(tree: FlameNode, diff: FlameNode | None = None, *, title: str = "vramtrace flame graph",
                      subtitle: str = "", inverted: bool = False) -> str:
    """A standalone interactive page for one flame graph (``diff``: baseline tree, see render.flame)."""
    body = (f"<h1>{escape(title)}</h1><p class=muted>{escape(subtitle)}</p>"
            f"<p class=muted>Click a frame to zoom, type to highlight matching frames. "
            + ("Widths: bytes of this run; red grew, blue shrank against the baseline.</p>" if diff else
               "Widths: bytes live at this point.</p>")
            + flame_section(tree, diff, inverted=inverted))
    return html_page(title, body)
