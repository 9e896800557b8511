"""`vramtrace flame FILE -o OUT`: a flame graph of the bytes live at the peak (or any point)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from vramtrace.commands.common import (POINT_HELP, UserError, analysis_steps, choose_device, open_trace,
                                      resolve_point)
from vramtrace.render.flame import FlameNode, default_levels, flame_tree, fold, parse_levels
from vramtrace.render.flame_html import render_flame_html
from vramtrace.render.flame_svg import render_flame_svg
from vramtrace.render.speedscope import to_speedscope
from vramtrace.render.units import fmt_bytes
from vramtrace.replay.timeline import DeviceTimeline

FORMATS = (".folded", ".svg", ".html", ".speedscope.json")


def point_label(tl: DeviceTimeline, at: str, index: int) -> str:
    where = "before the first event" if index < 0 else f"after event {index}"
    return f"device {tl.device}, {at} ({where}): {fmt_bytes(tl.at(index, 'allocated'))} allocated"


def output_format(out: str) -> str:
    for ext in FORMATS:
        if out.endswith(ext):
            return ext
    raise UserError(f"{out}: unknown output type (use {', '.join(FORMATS)})")


def render(tree: FlameNode, fmt: str, title: str, subtitle: str, inverted: bool) -> str:
    if fmt == ".folded":
        return "\n".join(fold(tree)) + "\n"
    if fmt == ".svg":
        return render_flame_svg(tree, title=title, subtitle=subtitle, inverted=inverted)
    if fmt == ".html":
        return render_flame_html(tree, title=title, subtitle=subtitle, inverted=inverted)
    return json.dumps(to_speedscope(tree, title))


@click.command("flame")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", default=None,
              help=f"Output file; the type follows the extension ({', '.join(FORMATS)}). "
                   "Default: collapsed stacks on stdout.")
@click.option("--at", "at", default="peak", show_default=True, help=POINT_HELP)
@click.option("--by", "by", default=None,
              help="Levels, outermost first, from owner, module, phase, dtype, stack. "
                   "Default: owner,module,stack; phase,stack for files without vramtrace tags.")
@click.option("--inverted", is_flag=True, help="Allocation sites at the root, owners at the tips (icicle).")
@click.option("--device", "-d", type=int, default=None, help="CUDA device (default: the one with the highest peak).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def flame_command(file: str, out: str | None, at: str, by: str | None, inverted: bool,
                  device: int | None, quiet: bool) -> None:
    """Flame graph of the bytes live at a point: owner, folded module path, then the Python
    frames of each allocation (outermost first). Writes collapsed stacks (.folded, for
    flamegraph.pl, inferno, speedscope), a zoomable .svg, an interactive .html (no network)
    or a .speedscope.json."""
    fmt = output_format(out) if out else ".folded"
    try:
        levels = parse_levels(by) if by else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    trace = open_trace(file, quiet)
    with analysis_steps(file, 2, quiet) as step:
        step("replaying the trace")
        tl = choose_device(trace, device, file)
        index = resolve_point(tl, at, file)
        levels = levels or default_levels(trace)
        step("building the flame graph")
        tree = flame_tree(trace, tl, index, levels, inverted)
        text = render(tree, fmt, f"{Path(file).name}: {point_label(tl, at, index)}",
                      f"levels: {' > '.join(levels)}" + ("" if trace.has_tags else
                                                         "; no vramtrace tags, phases guessed from frames"),
                      inverted)
    if out is None:
        click.echo(text, nl=False)
        return
    Path(out).write_text(text, encoding="utf-8")
    click.echo(f"wrote {out} ({fmt_bytes(len(text.encode()))})", err=True)
