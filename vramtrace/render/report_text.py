"""`vramtrace report` as rich tables on a terminal."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vramtrace.render.units import fmt_bytes, fmt_point, fmt_seconds, fmt_share
from vramtrace.snapshot.save import RECORDERS

BREAKDOWNS = (("by_owner", "owner"), ("by_owner_dtype", "owner x dtype"),
              ("by_module", "module"), ("by_phase", "phase"))
MAX_ROWS = 15


def recorded_by(report: dict) -> str | None:
    """What recorded the file, in words (None for files vramtrace did not write)."""
    return RECORDERS.get(report.get("recorded_by"))


def render_text(report: dict, console: Console) -> None:
    recorder = recorded_by(report)
    console.print(f"[bold]{report['file']}[/bold]  ({report['n_devices']} device(s)"
                  f"{', recorded by ' + recorder if recorder else ''})")
    for dev in report["devices"]:
        _device(dev, console)


def _device(dev: dict, console: Console) -> None:
    state, at = dev["state"], dev["at"]
    summary = Table(title=f"device {dev['device']}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("events", f"{dev['events']:,}  over {fmt_seconds(dev['time_span_s'])}")
    summary.add_row("peak allocated", fmt_point(dev["peak_allocated"], dev["time_start_us"]))
    summary.add_row("peak reserved", fmt_point(dev["peak_reserved"], dev["time_start_us"]))
    summary.add_row("at end", f"{fmt_bytes(dev['end']['allocated'])} allocated, "
                              f"{fmt_bytes(dev['end']['reserved'])} reserved in {dev['end']['segments']} segments")
    summary.add_row(f"at {at['point']} (event {at['index']})",
                    f"{fmt_bytes(state['allocated'])} allocated ({fmt_bytes(state['requested'])} requested), "
                    f"{fmt_bytes(state['reserved'])} reserved, {state['live_allocations']:,} live blocks")
    frag = state["fragmentation"]
    summary.add_row("fragmentation", f"{fmt_bytes(frag['internal'])} rounding inside blocks, "
                                     f"{fmt_bytes(frag['external'])} cached but unallocated")
    if dev["trace_starts_mid_run"]:
        summary.add_row("note", "the trace starts mid-run: blocks made before its first event are included "
                                "from the final state")
    for oom in dev["oom_events"]:
        summary.add_row("[red]OUT OF MEMORY[/red]", f"event {oom['index']}: asked {fmt_bytes(oom['requested'])} "
                                                    f"with {fmt_bytes(oom['device_free'])} free on the device")
    console.print(summary)
    if dev["attribution"] != "vramtrace tags":
        console.print("[yellow]No vramtrace tags in this file: phases below are a guess from stack frames "
                      "(record with `vramtrace record` for owners).[/yellow]")
    for key, label in BREAKDOWNS:
        rows = dev[key]
        if dev["attribution"] != "vramtrace tags" and key in ("by_owner", "by_owner_dtype"):
            continue
        if dev["attribution"] != "vramtrace tags" and key == "by_module":
            label = "where (innermost user frame, guessed)"
        _breakdown(label, rows, console)
    _stacks(dev["top_stacks"], console)


def _breakdown(label: str, rows: list[dict], console: Console) -> None:
    table = Table(title=f"by {label}", title_justify="left")
    table.add_column(label)
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    table.add_column("blocks", justify="right")
    for r in rows[:MAX_ROWS]:
        table.add_row(r["name"], fmt_bytes(r["bytes"]), fmt_share(r["share"]), f"{r['count']:,}")
    if len(rows) > MAX_ROWS:
        rest = rows[MAX_ROWS:]
        table.add_row(f"... {len(rest)} more", fmt_bytes(sum(r["bytes"] for r in rest)),
                      fmt_share(sum(r["share"] for r in rest)), f"{sum(r['count'] for r in rest):,}")
    console.print(table)


def _stacks(stacks: list[dict], console: Console) -> None:
    table = Table(title="top stacks at this point", title_justify="left")
    table.add_column("bytes", justify="right")
    table.add_column("blocks", justify="right")
    table.add_column("owner")
    table.add_column("stack (innermost first)")
    for s in stacks:
        table.add_row(fmt_bytes(s["bytes"]), str(s["count"]), s["owner"], "\n".join(s["frames"]) or "-")
    console.print(table)
