"""`vramtrace record [OPTIONS] -- CMD [ARGS]...`: run a command unmodified and record where GPU
memory goes in every Python process it starts (see vramtrace/capture/launcher.py)."""
from __future__ import annotations

import os
from pathlib import Path

import click

from vramtrace.capture.launcher import (DEFAULT_MAX_ENTRIES, STACKS, LaunchError, RecordOptions, exit_like,
                                        parse_steps, record)
from vramtrace.capture.recorder import BACKENDS
from vramtrace.commands.common import UserError

TOP_OWNERS = 3
SUMMARY_MAX_BYTES = 256 << 20   # larger files take a while to load: only point to `report`


@click.command("record", context_settings={"ignore_unknown_options": True,
                                           "allow_interspersed_args": False,
                                           "help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="File to write (default vramtrace-<script>.<pid>.pkl in the current directory); "
                   "ranks of a distributed run write <name>.rank<N>.pkl.")
@click.option("--stacks", type=click.Choice(STACKS), default="python", show_default=True,
              help="Stack frames per event: python, or all (C++ too: several times larger and slower to dump).")
@click.option("--max-entries", type=click.IntRange(min=1), default=DEFAULT_MAX_ENTRIES, show_default=True,
              help="Allocator events kept (a ring buffer: a long run keeps its last ones).")
@click.option("--steps", default=None, metavar="A:B",
              help="Only optimizer steps A to B-1 (counted from 0; 'A:' to the end): recording "
                   "starts after step A-1 and the file is written after step B-1.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="cuda: PyTorch's allocator history; cpu: a CPU shadow of it; auto: cuda when a GPU is usable.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def record_command(ctx: click.Context, output: str | None, stacks: str, max_entries: int,
                   steps: str | None, backend: str, force: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND (python script.py, python -m module, torchrun ..., accelerate launch ...)
    unchanged and record GPU memory in each of its Python processes.

    The command's output, signals and exit status pass through; at the end the file names and
    a short summary go to stderr. Open a file with `vramtrace report FILE` or at
    pytorch.org/memory_viz."""
    try:
        opts = RecordOptions(output=Path(output) if output else None, stacks=stacks,
                             max_entries=max_entries, steps=parse_steps(steps) if steps else None,
                             backend=backend, force=force)
        result = record(list(command), opts)
    except LaunchError as exc:
        raise UserError(str(exc)) from None
    if result.files:
        for path in result.files:
            for line in summary_lines(path):
                click.echo(line, err=True)
    else:
        why = "" if opts.steps else " (no Python process of the command imported torch)"
        click.echo(f"vramtrace: no snapshot was written{why}", err=True)
    ctx.exit(exit_like(result.returncode))


def summary_lines(path: Path) -> list[str]:
    """Three lines about one file: where it is, its peaks, the top owners at the peak."""
    from vramtrace.attribution.breakdown import build_report
    from vramtrace.render.units import fmt_bytes, fmt_share
    from vramtrace.snapshot.load import SnapshotError
    from vramtrace.trace import load_trace

    shown = _display(path)
    size = path.stat().st_size
    head = f"vramtrace: wrote {shown} ({fmt_bytes(size)})"
    if size > SUMMARY_MAX_BYTES:
        return [head, f"  summary skipped for a file this large: vramtrace report {shown}"]
    try:
        devices = build_report(load_trace(path))["devices"]
    except (SnapshotError, ValueError) as exc:
        return [head, f"  could not summarise it: {exc}"]
    if not devices or not any(d["events"] for d in devices):
        return [head, "  no allocator events (the process made no allocations while recording)"]
    dev = max(devices, key=lambda d: d["peak_allocated"]["bytes"])
    where = f" on device {dev['device']}" if len(devices) > 1 else ""
    owners = ", ".join(f"{o['name']} {fmt_bytes(o['bytes'])} ({fmt_share(o['share'])})"
                       for o in dev["by_owner"][:TOP_OWNERS]) or "none"
    return [f"{head}, {dev['events']} events",
            f"  peak allocated {fmt_bytes(dev['peak_allocated']['bytes'])}, "
            f"peak reserved {fmt_bytes(dev['peak_reserved']['bytes'])}{where}",
            f"  top owners at the peak: {owners}   (details: vramtrace report {shown})"]


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:   # another drive on Windows
        return str(path)
    return rel if not rel.startswith("..") else str(path)


if __name__ == "__main__":
    record_command(prog_name="vramtrace record")
