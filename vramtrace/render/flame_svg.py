"""Flame graphs as self-contained SVG: click a frame to zoom, 'Search' to highlight by regex.

The SVG draws without script (image viewers, GitHub); a small inline script adds zoom, search
and a details line. The same SVG is inlined into HTML pages (render.flame_html, the HTML
report): the script finds its own ``<svg>`` and hangs ``svg.flame = {search, reset}`` on it,
so several graphs can share a page. Widths are bytes; frames narrower than ``MIN_WIDTH_PX``
are left out (their bytes stay in the parent's width), which bounds the size of the file.

With ``diff`` (a baseline tree, see render.flame), frames are coloured by how much they grew
(red) or shrank (blue) against it instead of by owner.
"""
from __future__ import annotations

import re
import zlib
from html import escape

from vramtrace.attribution import classify
from vramtrace.attribution.taxonomy import OWNERS
from vramtrace.render.flame import FlameNode, diff_tree
from vramtrace.render.units import fmt_bytes, fmt_share, fmt_signed_bytes

# Tableau 10, the palette of PyTorch's memory viewer, so owners keep their colours across tools
PALETTE = ("#4e79a7", "#f28e2c", "#e15759", "#76b7b2", "#59a14f",
           "#edc949", "#af7aa1", "#ff9da7", "#9c755f", "#bab0ab")
# guessed phases (classify) and tagged ones (taxonomy.PHASES) share colours by meaning
PHASE_COLORS = {classify.GUESS_FORWARD: 0, "forward": 0, classify.GUESS_BACKWARD: 1, "recompute": 6,
                classify.GUESS_OPTIMIZER: 4, "optimizer": 4, classify.GUESS_SETUP: 8, "setup": 8,
                classify.GUESS_DATA: 5, classify.GUESS_NO_STACK: 3, classify.GUESS_BEFORE: 9,
                classify.GUESS_OTHER: 7}
WIDTH = 1200
FRAME_H = 17
FONT_PX = 12
CHAR_PX = 7.0          # average glyph width of the 12 px monospace font
PAD = 10
TOP = 44               # title, subtitle and the Reset/Search buttons
BOTTOM = 24            # the details line
MIN_WIDTH_PX = 0.3
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def group_color(name: str) -> str:
    """A stable colour per owner (taxonomy order) or guessed phase; others by a hash of the name."""
    if name in OWNERS:
        return PALETTE[OWNERS.index(name)]
    if name in PHASE_COLORS:
        return PALETTE[PHASE_COLORS[name]]
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def render_flame_svg(tree: FlameNode, diff: FlameNode | None = None, *, title: str = "",
                     subtitle: str = "", inverted: bool = False, standalone: bool = True) -> str:
    """The flame graph of ``tree`` as SVG text; ``diff``: baseline tree for a differential graph.

    ``inverted`` draws an icicle (roots at the top), which suits trees built with
    ``flame_tree(..., inverted=True)``. ``standalone=False`` leaves out the XML prolog and
    scales to its container, for inlining into HTML."""
    if diff is not None:
        tree = diff_tree(diff, tree)
    rects: list[tuple[int, float, float, FlameNode, str]] = []
    _layout(tree, 0, PAD, WIDTH - 2 * PAD, None, rects)
    depth = max((r[0] for r in rects), default=0) + 1
    height = TOP + depth * FRAME_H + BOTTOM
    max_delta = max((abs(n.value - (n.before or 0)) for *_, n, _ in rects[1:]), default=0) if tree.is_diff else 0
    out = []
    if standalone:
        out.append('<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n')
        size = f'width="{WIDTH}" height="{height}"'
    else:
        size = 'width="100%"'
    out.append(f'<svg version="1.1" {size} viewBox="0 0 {WIDTH} {height}" xmlns="http://www.w3.org/2000/svg" '
               f'class="flamegraph" data-pad="{PAD}" data-width="{WIDTH}" data-ch="{CHAR_PX}" '
               f'font-family="monospace" font-size="{FONT_PX}">\n')
    out.append(f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#fbfbf8"/>\n')
    out.append(f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="15">{_esc(title)}</text>\n')
    out.append(f'<text x="{WIDTH / 2}" y="32" text-anchor="middle" fill="#555">{_esc(subtitle)}</text>\n')
    out.append(f'<text class="reset" x="{PAD}" y="32" style="cursor:pointer" visibility="hidden">Reset zoom</text>\n')
    out.append(f'<text class="search" x="{WIDTH - PAD}" y="32" text-anchor="end" style="cursor:pointer">Search</text>\n')
    for level, x, w, node, group in rects:
        y = TOP + (level if inverted else depth - 1 - level) * FRAME_H
        fill = _diff_fill(node, max_delta) if tree.is_diff else _fill(group, level)
        out.append(f'<g class="f" data-d="{level}" data-v="{node.value}"><title>{_esc(_tooltip(node, tree))}</title>'
                   f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{FRAME_H - 1}" rx="2" fill="{fill}"/>'
                   f'<text x="{x + 3:.2f}" y="{y + FRAME_H - 5}">{_esc(_fit(node.name, w))}</text></g>\n')
    out.append(f'<text class="details" x="{PAD}" y="{height - 8}"> </text>\n')
    out.append(f"<script><![CDATA[{_SCRIPT}]]></script>\n</svg>\n")
    return "".join(out)


def _layout(node: FlameNode, level: int, x: float, w: float, group: str | None,
            out: list[tuple[int, float, float, FlameNode, str]]) -> None:
    out.append((level, x, w, node, group or node.name))
    if node.value <= 0:
        return
    scale = w / node.value
    for child in node.sorted_children():
        cw = child.value * scale
        if cw >= MIN_WIDTH_PX:
            _layout(child, level + 1, x, cw, group if level else child.name, out)
        x += cw


def _fill(group: str, level: int) -> str:
    """The group's colour, lighter with depth so neighbouring frames stay distinct."""
    if level == 0:
        return "#d9d9d4"
    base = group_color(group)
    mix = 0.12 * ((level - 1) % 4)
    r, g, b = (int(base[i:i + 2], 16) for i in (1, 3, 5))
    return "#%02x%02x%02x" % tuple(round(c + (255 - c) * mix) for c in (r, g, b))


def _diff_fill(node: FlameNode, max_delta: int) -> str:
    delta = node.value - (node.before or 0)
    k = round(200 * abs(delta) / max_delta) if max_delta else 0
    if delta > 0:
        return f"rgb(255,{235 - k},{235 - k})"
    if delta < 0:
        return f"rgb({235 - k},{235 - k},255)"
    return "rgb(235,235,235)"


def _tooltip(node: FlameNode, root: FlameNode) -> str:
    share = fmt_share(node.value / root.value) if root.value else "-"
    text = f"{node.name}\n{fmt_bytes(node.value)} ({share}), {node.count:,} blocks"
    if node.is_diff:
        text += f"\nbaseline {fmt_bytes(node.before)}, change {fmt_signed_bytes(node.value - node.before)}"
    return text


def _fit(name: str, width: float) -> str:
    chars = int((width - 6) / CHAR_PX)
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[:chars - 2] + ".."


def _esc(text: str) -> str:
    return escape(_CONTROL_CHARS.sub("?", text))


# Zoom, search and details for one <svg class="flamegraph">; WIDTH, PAD and CHAR_PX come from
# data attributes so the script stays a fixed string. Frames come in depth-first order, so x
# never decreases and a match inside an earlier match is not counted twice.
_SCRIPT = r"""
(function () {
  var cur = document.currentScript, svg = cur ? cur.closest('svg') : document.documentElement;
  var W = +svg.dataset.width, P = +svg.dataset.pad, CH = +svg.dataset.ch;
  var details = svg.querySelector('.details'), reset = svg.querySelector('.reset');
  var nodes = Array.prototype.map.call(svg.querySelectorAll('g.f'), function (g) {
    var r = g.querySelector('rect'), tip = g.querySelector('title').textContent;
    return {g: g, r: r, t: g.querySelector('text'), x: +r.getAttribute('x'), w: +r.getAttribute('width'),
            d: +g.dataset.d, v: +g.dataset.v, name: tip.split('\n')[0], tip: tip, fill: r.getAttribute('fill')};
  });
  var root = nodes[0];
  function fit(name, w) {
    var c = Math.floor((w - 6) / CH);
    return c < 3 ? '' : (name.length <= c ? name : name.slice(0, c - 2) + '..');
  }
  function zoom(z) {
    var s = (W - 2 * P) / z.w, e = 1e-6;
    nodes.forEach(function (n) {
      var x, w;
      if (n.d >= z.d && n.x >= z.x - e && n.x + n.w <= z.x + z.w + e) { x = P + (n.x - z.x) * s; w = n.w * s; }
      else if (n.d < z.d && n.x <= z.x + e && n.x + n.w >= z.x + z.w - e) { x = P; w = W - 2 * P; }
      else { n.g.style.display = 'none'; return; }
      n.g.style.display = '';
      n.g.style.opacity = n.d < z.d ? 0.6 : 1;
      n.r.setAttribute('x', x.toFixed(2)); n.r.setAttribute('width', w.toFixed(2));
      n.t.setAttribute('x', (x + 3).toFixed(2)); n.t.textContent = fit(n.name, w);
    });
    reset.setAttribute('visibility', z === root ? 'hidden' : 'visible');
  }
  function search(text) {
    var re = null;
    if (text) { try { re = new RegExp(text); } catch (err) { re = null; } }
    var covered = 0, end = -1;
    nodes.forEach(function (n) {
      var hit = !!(re && n !== root && re.test(n.name));
      n.r.setAttribute('fill', hit ? 'rgb(230,0,230)' : n.fill);
      if (hit && n.x >= end) { covered += n.v; end = n.x + n.w; }
    });
    return re ? covered / (root.v || 1) : null;
  }
  nodes.forEach(function (n) {
    n.g.style.cursor = 'pointer';
    n.g.addEventListener('click', function () { zoom(n); });
    n.g.addEventListener('mouseover', function () { details.textContent = n.tip.replace(/\n/g, ' | '); });
    n.g.addEventListener('mouseout', function () { details.textContent = ' '; });
  });
  reset.addEventListener('click', function () { zoom(root); });
  svg.querySelector('.search').addEventListener('click', function () {
    var text = window.prompt('Search frames (regular expression)', '');
    if (text !== null) {
      var m = search(text);
      details.textContent = m === null ? ' ' : 'matched ' + (100 * m).toFixed(1) + '% of the bytes';
    }
  });
  svg.flame = {search: search, reset: function () { zoom(root); }};
})();
"""
