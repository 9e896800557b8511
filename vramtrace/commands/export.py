"""`vramtrace export FILE -o trace.json`: memory per owner over time as Chrome trace counters."""
from __future__ import annotations

import json
from pathlib import Path

import click

from vramtrace.commands.common import UserError, open_trace
from vramtrace.commands.common import analysis_steps
from vramtrace.render.export_chrome import chrome_trace
from vramtrace.render.flame import group_level
from vramtrace.render.units import fmt_bytes
from vramtrace.replay.timeline import build_timeline


@click.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Chrome trace JSON to write.")
@click.option("--device", "-d", type=int, default=None, help="Only this CUDA device (default: every device with events).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def export_command(file: str, out: str, device: int | None, quiet: bool) -> None:
    """Allocated bytes per owner over time (guessed phase for files without vramtrace tags)
    as Chrome trace counter events ("ph": "C", ts in microseconds of the snapshot's clock),
    plus reserved bytes, the peak and any OOM. Open it in https://ui.perfetto.dev or
    chrome://tracing, alone or beside a torch.profiler trace of the same run."""
    trace = open_trace(file, quiet)
    if device is not None and not 0 <= device < trace.n_devices:
        raise UserError(f"{file}: no device {device} (the file has {trace.n_devices})")
    devices = [device] if device is not None else range(trace.n_devices)
    with analysis_steps(file, 2, quiet) as step:
        step("replaying the trace")
        timelines = [build_timeline(trace, d) for d in devices]
        step("writing counters")
        doc = chrome_trace(trace, timelines, group_level(trace))
        text = json.dumps(doc, separators=(",", ":"))
        Path(out).write_text(text, encoding="utf-8")
    counters = sum(1 for e in doc["traceEvents"] if e["ph"] == "C")
    click.echo(f"wrote {out} ({fmt_bytes(len(text))}, {counters:,} counter events); "
               f"open it in https://ui.perfetto.dev", err=True)
