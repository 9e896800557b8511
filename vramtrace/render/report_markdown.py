"""`vramtrace report --format md`: the same content as Markdown tables, for issues and docs."""
from __future__ import annotations

from vramtrace.render.report_text import BREAKDOWNS, recorded_by
from vramtrace.render.units import fmt_bytes, fmt_point, fmt_share


def render_markdown(report: dict) -> str:
    out = [f"# vramtrace report: `{report['file']}`", ""]
    if recorder := recorded_by(report):
        out += [f"Recorded by {recorder}.", ""]
    for dev in report["devices"]:
        state, at = dev["state"], dev["at"]
        out += [f"## device {dev['device']}", "",
                "| figure | value |", "|---|---|",
                f"| events | {dev['events']} |",
                f"| peak allocated | {fmt_point(dev['peak_allocated'], dev['time_start_us'])} |",
                f"| peak reserved | {fmt_point(dev['peak_reserved'], dev['time_start_us'])} |",
                f"| at {at['point']} | {fmt_bytes(state['allocated'])} allocated, {fmt_bytes(state['reserved'])} reserved |",
                f"| fragmentation | {fmt_bytes(state['fragmentation']['internal'])} internal, "
                f"{fmt_bytes(state['fragmentation']['external'])} external |",
                f"| OOM events | {len(dev['oom_events'])} |",
                f"| attribution | {dev['attribution']} |", ""]
        for key, label in BREAKDOWNS:
            out += [f"### by {label}", "", f"| {label} | bytes | share | blocks |", "|---|---:|---:|---:|"]
            out += [f"| `{r['name']}` | {fmt_bytes(r['bytes'])} | {fmt_share(r['share'])} | {r['count']} |"
                    for r in dev[key]]
            out.append("")
        out += ["### top stacks", "", "| bytes | owner | innermost frames |", "|---:|---|---|"]
        out += [f"| {fmt_bytes(s['bytes'])} | {s['owner']} | {'<br>'.join(s['frames'][:4])} |"
                for s in dev["top_stacks"]]
        out.append("")
    return "\n".join(out)
