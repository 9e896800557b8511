"""`vramtrace viz FILE -o OUT.pkl`: any snapshot, rewritten for PyTorch's memory visualizer."""
from __future__ import annotations

from pathlib import Path

import click

from vramtrace.commands.common import open_trace
from vramtrace.commands.common import analysis_steps
from vramtrace.render.flame import group_level
from vramtrace.render.units import fmt_bytes
from vramtrace.snapshot.from_trace import memviz_snapshot
from vramtrace.snapshot.load import read_raw
from vramtrace.snapshot.save import write_snapshot

VIEWER = "https://pytorch.org/memory_viz"


@click.command("viz")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Snapshot file to write (.pkl).")
@click.option("--html", "html", is_flag=True,
              help="Also write OUT.html with torch.cuda._memory_viz.trace_plot (that page loads its code from the network).")
@click.option("--all-frames", is_flag=True, help="Keep C++ frames of stacks='all' files (default: Python frames only).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def viz_command(file: str, out: str, html: bool, all_frames: bool, quiet: bool) -> None:
    """Rewrite a snapshot of any era (torch 2.0 block history, bare segment lists, untagged
    files) so that PyTorch's memory visualizer opens it and colours the Active Memory Timeline
    by owner: the owner in each event's `category` (at most 9 plus `unknown`; the guessed
    phase for files without vramtrace tags), the detail as JSON in `user_metadata`,
    pickle protocol 4 of plain types only."""
    trace = open_trace(file, quiet)
    level = group_level(trace)
    with analysis_steps(file, 2, quiet) as step:
        step("labelling allocations")
        snap = memviz_snapshot(trace, level, python_only=not all_frames)
        step("writing")
        path = write_snapshot(snap, out)
    categories = sorted({e["category"] for t in snap["device_traces"] for e in t if "category" in e})
    click.echo(f"wrote {path} ({fmt_bytes(path.stat().st_size)}), coloured by "
               f"{'owner' if level == 'owner' else 'phase guessed from stack frames'}: "
               f"{', '.join(categories) or 'no allocation events to colour'}", err=True)
    click.echo(f"open it in {VIEWER} (drag and drop; the file stays on your machine)", err=True)
    if html:
        page = Path(out).with_suffix(".html")
        page.write_text(_trace_plot(path), encoding="utf-8")
        click.echo(f"wrote {page}: note that this page loads PyTorch's MemoryViz.js and d3 from the network "
                   f"(cdn.jsdelivr.net, cdn.skypack.dev); for an offline page use `vramtrace html`", err=True)


def _trace_plot(path: Path) -> str:
    """PyTorch's own Active Memory Timeline page for the file just written (exactly its content)."""
    from torch.cuda._memory_viz import trace_plot

    return trace_plot(read_raw(path))
