"""`vramtrace diff A B`: what changed between two runs, by owner x module x phase, not by address."""
from __future__ import annotations

import json
import re
from pathlib import Path

import click

from vramtrace.commands.common import UserError, open_trace, stdout_console
from vramtrace.diff.compare import GROUPS, Unit, diff_runs, exceeds, units_of
from vramtrace.diff.flame import folded, html, run_trees, svg
from vramtrace.diff.points import POINTS
from vramtrace.diff.render import headline, render_markdown, render_text
from vramtrace.snapshot.load import SnapshotError

SNAPSHOT_SUFFIXES = (".pkl", ".pickle")
FLAME_SUFFIXES = (".folded", ".svg", ".html")
AT_CHOICES = (*POINTS, "phase")


def natural_key(path: Path) -> list:
    """rank2 before rank10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def load_run(arg: str, quiet: bool) -> list[Unit]:
    """A run: one snapshot file, or a directory of per-rank snapshot files (all their devices)."""
    path = Path(arg)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix in SNAPSHOT_SUFFIXES), key=natural_key)
        if not files:
            raise UserError(f"{arg}: no {'/'.join(SNAPSHOT_SUFFIXES)} snapshot files in this directory")
    else:
        files = [path]
    units = [u for f in files for u in units_of(open_trace(f, quiet), f.name)]
    if not units:
        raise UserError(f"{arg}: no device in it has any events or segments to compare")
    return units


@click.command("diff")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--at", "at", type=click.Choice(AT_CHOICES), default="peak", show_default=True,
              help="Comparable point: each run's peak, end, end of the first forward, end of backward "
                   "(before the first optimizer step), after the first optimizer step; 'phase': all of them.")
@click.option("--group", type=click.Choice(list(GROUPS)), default="module", show_default=True,
              help="Rows: owner x dtype, owner x module x phase, or owner x call stack.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "md"]), default="text", show_default=True)
@click.option("--fail-if-peak-grows", "fail_pct", type=float, default=None, metavar="PCT",
              help="Exit 1 when B's peak allocated bytes exceed A's by more than PCT percent (CI gate).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Differential flame graph of the first point: .folded (difffolded.pl format), .svg or .html.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def diff_command(runs: tuple[str, ...], at: str, group: str, fmt: str, fail_pct: float | None,
                 output: str | None, quiet: bool) -> None:
    """Compare runs by meaning: signed byte deltas per owner, module (repeated layers folded)
    and phase at comparable points, largest first, with a plain-language summary.

    \b
    RUNS: two snapshot files A B (or directories of per-rank files, summed per run);
    with more than two, each is compared with the first (e.g. rank vs rank 0)."""
    if len(runs) < 2:
        raise UserError(f"{runs[0]}: diff needs at least two runs (A B)")
    if output is not None and Path(output).suffix not in FLAME_SUFFIXES:
        raise UserError(f"{output}: the flame graph output must end in {', '.join(FLAME_SUFFIXES)}")
    if output is not None and len(runs) > 2:
        raise UserError(f"{output}: a flame graph compares exactly two runs")
    points = POINTS if at == "phase" else (at,)
    loaded = [load_run(r, quiet) for r in runs]
    try:
        diffs = [diff_runs(loaded[0], other, points, group, runs[0], name)
                 for name, other in zip(runs[1:], loaded[1:])]
    except SnapshotError as exc:
        raise UserError(f"{getattr(exc, 'path', runs[0])}: {exc}") from None
    if fmt == "json":
        click.echo(json.dumps(diffs[0] if len(diffs) == 1 else {"diffs": diffs}, indent=1))
    elif fmt == "md":
        click.echo("\n\n".join(render_markdown(d) for d in diffs))
    else:
        console = stdout_console()
        for d in diffs:
            render_text(d, console)
    if output is not None:
        _write_flame(diffs[0], Path(output))
    if fail_pct is not None:
        grown = [d for d in diffs if exceeds(d, fail_pct)]
        for d in grown:
            click.echo(f"vramtrace: {d['b']['label']}: {headline(d)}, more than the {fail_pct:g}% allowed",
                       err=True)
        if grown:
            raise SystemExit(1)


def _write_flame(diff: dict, path: Path) -> None:
    point = diff["points"][0]
    a, b = run_trees(point)
    title = f"vramtrace diff {point['label']}: {diff['a']['label']} -> {diff['b']['label']}"
    if path.suffix == ".folded":
        text = folded(a, b)
    elif path.suffix == ".svg":
        text = svg(a, b, title, headline(diff))
    else:
        text = html(a, b, title, [headline(diff), *point["explanation"]])
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
