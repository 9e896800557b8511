"""Differential flame graph of one comparable point: folded stacks and a self-contained SVG/HTML.

The tree's paths follow the diff's grouping: owner > dtype > phase > module path (``owner``
and ``module`` groups) or owner > Python frames outermost first (``stack``). Folded output is
the two-column format of Brendan Gregg's ``difffolded.pl`` (``frame;frame A_bytes B_bytes``),
which ``flamegraph.pl`` draws as a differential flame graph. The SVG/HTML drawn here needs
nothing from the network: a node is as wide as the larger of its two runs' bytes and coloured
red where B grew, blue where it shrank.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Iterator

from vramtrace.render.units import fmt_bytes, fmt_signed_bytes

WIDTH = 1200
ROW = 18
CHAR = 7              # px per character of the 12 px monospace label
MIN_LABEL_PX = 30


@dataclass
class FlameNode:
    """A frame of the diff tree: bytes of A and B in its subtree, and bytes ending here."""

    name: str
    a: int = 0
    b: int = 0
    self_a: int = 0
    self_b: int = 0
    children: dict[str, "FlameNode"] = field(default_factory=dict)

    @property
    def delta(self) -> int:
        return self.b - self.a

    @property
    def width(self) -> int:
        """Layout weight: the larger run's bytes ending here plus the children's weights."""
        return max(self.self_a, self.self_b) + sum(c.width for c in self.children.values())

    def add(self, path: list[str], a: int, b: int) -> None:
        node = self
        node.a, node.b = node.a + a, node.b + b
        for name in path:
            node = node.children.setdefault(name, FlameNode(name))
            node.a, node.b = node.a + a, node.b + b
        node.self_a, node.self_b = node.self_a + a, node.self_b + b


def cell_path(row: dict) -> list[str]:
    """A diff cell's frames: owner > dtype > phase > module parts, or owner > stack frames."""
    clean = [str(row["owner"])]
    if row.get("stack"):
        clean += row["stack"].split(";")
    else:
        clean += [str(row.get("dtype", "-")), str(row.get("phase", "-"))]
        clean += [p for p in str(row.get("module", "-")).split(".") if p]
    return [p.replace(";", ":") or "-" for p in clean]


def diff_tree(point: dict) -> FlameNode:
    """The tree of one point of ``diff_runs``'s result (its ``cells``)."""
    root = FlameNode("all")
    for row in point["cells"]:
        if row["a"] or row["b"]:
            root.add(cell_path(row), row["a"], row["b"])
    return root


def folded(root: FlameNode) -> str:
    """``frame;frame A B`` lines, one per path that has bytes ending at it."""
    lines = []
    for path, node in _walk(root, []):
        if node.self_a or node.self_b:
            lines.append(f"{';'.join(path)} {node.self_a} {node.self_b}")
    return "\n".join(lines) + ("\n" if lines else "")


def _walk(node: FlameNode, path: list[str]) -> Iterator[tuple[list[str], FlameNode]]:
    for child in sorted(node.children.values(), key=lambda c: -c.width):
        p = path + [child.name]
        yield p, child
        yield from _walk(child, p)


def svg(root: FlameNode, title: str, standalone: bool = True) -> str:
    """The tree as an SVG flame graph (root at the bottom); ``standalone`` adds the xmlns."""
    depth = _depth(root)
    height = (depth + 1) * ROW + 2 * ROW
    scale = (WIDTH - 20) / root.width if root.width else 0.0
    rects: list[str] = []
    _draw(root, 10.0, depth, scale, rects)
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    return (f'<svg{ns} width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'font-family="monospace" font-size="12">'
            f'<text x="10" y="14" font-size="14">{html.escape(title)}</text>'
            f'<g transform="translate(0,{2 * ROW})">{"".join(rects)}</g></svg>')


def _depth(node: FlameNode) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=0) if node.children else 0


def _draw(node: FlameNode, x: float, level: int, scale: float, out: list[str]) -> None:
    w = node.width * scale
    if w < 0.5:
        return
    y = level * ROW
    tip = (f"{node.name}\nA {fmt_bytes(node.a)}  B {fmt_bytes(node.b)}  "
           f"delta {fmt_signed_bytes(node.delta)}")
    out.append(f'<g><title>{html.escape(tip)}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" '
               f'height="{ROW - 1}" fill="{_colour(node)}" rx="2"/>')
    if w >= MIN_LABEL_PX:
        n = int(w // CHAR) - 1
        label = node.name if len(node.name) <= n else node.name[:max(n - 1, 1)] + "…"
        out.append(f'<text x="{x + 3:.1f}" y="{y + ROW - 5}">{html.escape(label)}</text>')
    out.append("</g>")
    cx = x + max(node.self_a, node.self_b) * scale
    for child in sorted(node.children.values(), key=lambda c: -c.width):
        _draw(child, cx, level - 1, scale, out)
        cx += child.width * scale


def _colour(node: FlameNode) -> str:
    """Red where B grew, blue where it shrank, grey when equal; stronger for larger change."""
    big = max(node.a, node.b)
    if not big or not node.delta:
        return "rgb(220,220,220)"
    k = 0.2 + 0.8 * min(1.0, abs(node.delta) / big)
    fade = int(235 - 175 * k)
    return f"rgb(235,{fade},{fade})" if node.delta > 0 else f"rgb({fade},{fade},235)"


def html_page(root: FlameNode, title: str, summary: list[str]) -> str:
    """One offline HTML page: the SVG inline (no xmlns, no scripts, no links) and a summary."""
    items = "".join(f"<li>{html.escape(s)}</li>" for s in summary)
    return ("<!doctype html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:1em}"
            ".grew{background:rgb(235,60,60)}.shrank{background:rgb(60,60,235)}"
            ".key{display:inline-block;width:1em;height:1em;vertical-align:middle}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><ul>{items}</ul>"
            "<p><span class=\"key grew\"></span> grew in B &nbsp; <span class=\"key shrank\"></span> shrank in B"
            " &nbsp; width: the larger of the two runs; hover a frame for its bytes</p>"
            f"{svg(root, title, standalone=False)}</body></html>\n")
