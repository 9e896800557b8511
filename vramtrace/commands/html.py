"""`vramtrace html FILE [FILE2] -o report.html`: one offline page with charts, tables and flames."""
from __future__ import annotations

from pathlib import Path

import click

from vramtrace.commands.common import POINT_HELP, UserError, open_trace, parse_point
from vramtrace.commands.common import analysis_steps, choose_device, resolve_point
from vramtrace.render.html_report import render_html_report
from vramtrace.render.units import fmt_bytes


@click.command("html")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("file2", type=click.Path(dir_okay=False), required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--at", "at", default="peak", show_default=True, help=POINT_HELP)
@click.option("--device", "-d", type=int, default=None, help="CUDA device (default: the one with the highest peak).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def html_command(file: str, file2: str | None, out: str, at: str, device: int | None, quiet: bool) -> None:
    """A self-contained HTML report (no network): summary figures, memory over time stacked by
    owner with the peak marked, breakdown tables, the flame graph at the peak and any OOM;
    with FILE2, what changed from FILE to FILE2 and a differential flame graph."""
    trace = open_trace(file, quiet)
    other = open_trace(file2, quiet) if file2 else None
    with analysis_steps(file, 2, quiet) as step:
        step("replaying the trace")
        tl = choose_device(trace, device, file)
        resolve_point(tl, at, file)    # a bad --at is a one-line error before any rendering
        step("rendering the report")
        try:
            page = render_html_report(trace, tl, parse_point(at), other)
        except ValueError as exc:      # e.g. a second file without any device data to diff
            raise UserError(f"{file2 or file}: {exc}") from None
    Path(out).write_text(page, encoding="utf-8")
    click.echo(f"wrote {out} ({fmt_bytes(len(page.encode()))})", err=True)
