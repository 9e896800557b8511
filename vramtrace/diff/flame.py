"""Differential flame graph of one comparable point: folded stacks, SVG and HTML.

The paths follow the diff's grouping: owner > dtype > phase > module path (``owner`` and
``module`` groups) or owner > Python frames outermost first (``stack``). Each run's cells
become a flame tree of the shared model (``vramtrace.render.flame``), drawn by its renderers:
widths are B's bytes and colour says what grew (red) or shrank (blue) against A. Stacks only A
has take no width there, so the HTML page adds the reverse view (widths of A). The folded
output is the two-column format of Brendan Gregg's ``difffolded.pl`` (``frame;frame A B``),
which ``flamegraph.pl`` draws as a differential flame graph.
"""
from __future__ import annotations

import re
from html import escape

from vramtrace.render.flame import ROOT, FlameNode, diff_tree
from vramtrace.render.flame_html import flame_section, html_page
from vramtrace.render.flame_svg import render_flame_svg

_MODULE_PATH = re.compile(r"[\w.*]+")


def cell_path(row: dict) -> list[str]:
    """A diff cell's frames: owner > dtype > phase > module parts, or owner > stack frames."""
    path = [str(row["owner"])]
    if row.get("stack"):
        path += row["stack"].split(";")
    else:
        path += [str(row.get("dtype", "-")), str(row.get("phase", "-"))]
        module = str(row.get("module", "-"))
        # a module path splits into levels; a guessed "file.py:22 forward" frame label does not
        path += [p for p in module.split(".") if p] if _MODULE_PATH.fullmatch(module) else [module]
    return [p.replace(";", ",") or "-" for p in path]


def run_trees(point: dict) -> tuple[FlameNode, FlameNode]:
    """Flame trees of runs A and B at one point of ``diff_runs``'s result (its ``cells``)."""
    a, b = FlameNode(ROOT), FlameNode(ROOT)
    for row in point["cells"]:
        path = cell_path(row)
        if row["a"]:
            a.add(path, row["a"], row["a_count"])
        if row["b"]:
            b.add(path, row["b"], row["b_count"])
    return a, b


def folded(a: FlameNode, b: FlameNode) -> str:
    """``frame;frame A_BYTES B_BYTES`` lines, one per path that holds bytes itself in A or B."""
    lines = []
    for path, node in diff_tree(a, b).walk():
        self_a = (node.before or 0) - sum(c.before or 0 for c in node.children.values())
        if self_a or node.self_value:
            lines.append(f"{';'.join(path)} {self_a} {node.self_value}")
    return "\n".join(lines) + ("\n" if lines else "")


def svg(a: FlameNode, b: FlameNode, title: str, subtitle: str = "") -> str:
    """Standalone SVG: widths of B, coloured by the change against A."""
    return render_flame_svg(b, diff=a, title=title, subtitle=subtitle)


def html(a: FlameNode, b: FlameNode, title: str, summary: list[str]) -> str:
    """One offline page: B against A, then A against B (what only A held), with the summary."""
    items = "".join(f"<li>{escape(line)}</li>" for line in summary)
    body = (f"<h1>{escape(title)}</h1><ul>{items}</ul>"
            "<h2>B against A</h2><p class=muted>Widths: bytes of B; red grew, blue shrank against A.</p>"
            + flame_section(b, a) +
            "<h2>A against B</h2><p class=muted>Widths: bytes of A, so what only A held shows; "
            "colours read reversed (red: A held more).</p>" + flame_section(a, b))
    return html_page(title, body)
