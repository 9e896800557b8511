"""`vramtrace report FILE...`: summary and breakdowns of a snapshot at its peak (or any point);
several per-rank files give one merged view (sum, max, imbalance, largest vs smallest rank)."""
from __future__ import annotations

import json
from typing import Callable

import click
from rich.console import Console

from vramtrace.attribution.breakdown import build_report
from vramtrace.commands.common import POINT_HELP, UserError, open_trace, parse_point, reading, stdout_console
from vramtrace.diff.ranks import build_rank_report
from vramtrace.diff.render import render_ranks_markdown, render_ranks_text
from vramtrace.render.report_markdown import render_markdown
from vramtrace.render.report_text import render_text


@click.command("report")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--device", "-d", type=int, default=None, help="Only this CUDA device (default: every device with data).")
@click.option("--at", "at", default="peak", show_default=True, help=POINT_HELP)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "md"]), default="text", show_default=True,
              help="text: tables for a terminal; json: stable machine-readable (docs/report-json.md); md: Markdown.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def report_command(files: tuple[str, ...], device: int | None, at: str, fmt: str, quiet: bool) -> None:
    """Where the memory went: peak and end figures, fragmentation, OOMs, and who owned the
    bytes at the chosen point (by owner, dtype, module, phase) with the top stacks.

    Files recorded by vramtrace carry owner tags; plain PyTorch snapshots get a best-effort
    phase guess from their stack frames, marked as such. Several FILES (one per rank) are
    merged: sum, max and imbalance per owner/module/phase, and the largest rank against the
    smallest."""
    point = parse_point(at)
    if len(files) > 1:
        _ranks(files, device, point, fmt, quiet)
        return
    file = files[0]
    trace = open_trace(file, quiet)
    if device is not None and not 0 <= device < trace.n_devices:
        raise UserError(f"{file}: no device {device} (the file has {trace.n_devices})")
    report = _build(file, lambda: build_report(trace, point, None if device is None else [device]))
    _emit(report, fmt, render_markdown, render_text)


def _ranks(files: tuple[str, ...], device: int | None, point: str | int, fmt: str, quiet: bool) -> None:
    if device is not None:
        raise UserError(f"{files[0]}: --device picks one device of one file; give that rank's file alone")
    traces = [open_trace(f, quiet) for f in files]
    report = _build(", ".join(files), lambda: build_rank_report(traces, point))
    _emit(report, fmt, render_ranks_markdown, render_ranks_text)


def _build(label: str, build: Callable[[], dict]) -> dict:
    """Run an analysis; problems found in the files (or a point out of range) name them."""
    try:
        with reading(label):
            return build()
    except ValueError as exc:
        raise UserError(f"{label}: {exc}") from None


def _emit(report: dict, fmt: str, markdown: Callable[[dict], str], text: Callable[[dict, Console], None]) -> None:
    if fmt == "json":
        click.echo(json.dumps(report, indent=1))
    elif fmt == "md":
        click.echo(markdown(report))
    else:
        text(report, stdout_console())
