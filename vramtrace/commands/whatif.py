"""`vramtrace whatif FILE --conf ...`: replay a recorded trace under other allocator settings."""
from __future__ import annotations

import json

import click
from rich.table import Table

from vramtrace.commands.common import UserError, open_trace, reading, stdout_console
from vramtrace.render.units import fmt_bytes, fmt_signed_bytes, parse_bytes
from vramtrace.replay.agreement import check_agreement
from vramtrace.replay.allocator import AllocatorSettings
from vramtrace.replay.whatif import what_if


@click.command("whatif")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--conf", default=None, metavar="PYTORCH_CUDA_ALLOC_CONF",
              help="Settings to try, in PYTORCH_CUDA_ALLOC_CONF syntax, e.g. "
                   "'expandable_segments:True' or 'max_split_size_mb:128,garbage_collection_threshold:0.8'. "
                   "Default: the settings the file was recorded with.")
@click.option("--device", "-d", type=int, default=0, show_default=True)
@click.option("--start", type=click.Choice(["rewound", "empty"]), default="rewound", show_default=True,
              help="rewound: begin from the blocks alive before the trace's first event; empty: leave them out.")
@click.option("--capacity", default=None, help="Card size (e.g. 24GiB): report the first event that would OOM.")
@click.option("--check", is_flag=True, help="Also report how well the allocator model reproduces the recorded "
                                             "placement (same address for every alloc, identical final state).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def whatif_command(file: str, conf: str | None, device: int, start: str, capacity: str | None,
                   check: bool, fmt: str) -> None:
    """Would other allocator settings (expandable segments, max_split_size, ...) lower the
    reserved peak of this run? The trace fixes what the program asked for; a model of
    PyTorch's caching allocator decides where it lands under the new settings."""
    trace = open_trace(file)
    if not 0 <= device < trace.n_devices:
        raise UserError(f"{file}: no device {device} (the file has {trace.n_devices})")
    try:
        settings = AllocatorSettings.from_conf_string(conf) if conf else AllocatorSettings.from_snapshot(trace.settings)
        capacity_bytes = parse_bytes(capacity) if capacity else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with reading(file):
        result = what_if(trace, settings, device=device, start=start, capacity_bytes=capacity_bytes)
        agreement = [a for a in check_agreement(trace) if a.device == device] if check else []
    out = {
        "file": file, "device": device, "settings": settings.to_snapshot(), "start": start,
        "recorded_peak_reserved": result.recorded_peak_reserved,
        "predicted_peak_reserved": result.predicted_peak_reserved,
        "predicted_peak_allocated": result.predicted_peak_allocated,
        "reserved_saving": result.reserved_saving,
        "oom_event": result.oom_event,
        "model_agreement": [{"allocs": a.n_allocs, "same_address_pct": a.pct_same_address,
                             "final_state_exact": a.final_state_exact, "reason": a.reason} for a in agreement],
    }
    if fmt == "json":
        click.echo(json.dumps(out, indent=1))
        return
    table = Table(title=f"what if: {settings.conf or 'recorded settings'} (device {device}, start {start})",
                  show_header=False, title_justify="left")
    table.add_row("recorded peak reserved", fmt_bytes(result.recorded_peak_reserved))
    table.add_row("predicted peak reserved", fmt_bytes(result.predicted_peak_reserved))
    table.add_row("saving", fmt_signed_bytes(result.reserved_saving))
    table.add_row("predicted peak allocated", fmt_bytes(result.predicted_peak_allocated))
    if capacity_bytes:
        table.add_row(f"fits {fmt_bytes(capacity_bytes)}?",
                      "yes" if result.oom_event is None else f"no: first OOM at event {result.oom_event}")
    for a in agreement:
        table.add_row("model agreement", f"{a.pct_same_address:.1f}% of {a.n_allocs} allocs at the recorded "
                                         f"address; final state {'identical' if a.final_state_exact else 'differs'}"
                                         + (f" ({a.reason})" if a.reason else ""))
    stdout_console().print(table)
