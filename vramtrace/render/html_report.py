"""`vramtrace html`: one self-contained, offline page about a trace (or two).

Sections: summary figures and breakdown tables (``build_report``'s content), memory over time
stacked by owner with the peak and any OOM marked (inline SVG, a small script for the hover
read-out), the flame graph at the chosen point, OOM details, and with a second file the diff
(``vramtrace.diff``) with its differential flame graph. Big traces are summarised rather than
embedded: the time series is downsampled to ``MAX_POINTS`` peak-preserving samples, flame
frames narrower than a fraction of a pixel are left out and tables stop at ``TABLE_ROWS``
rows. The page states its own size.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np

from vramtrace.attribution.breakdown import device_report
from vramtrace.diff.compare import diff_runs, units_of
from vramtrace.diff.flame import run_trees
from vramtrace.diff.points import PEAK
from vramtrace.diff.render import headline
from vramtrace.render.export_chrome import GroupSeries, group_series, peak_samples, timestamps
from vramtrace.render.flame import default_levels, flame_tree, group_level
from vramtrace.render.flame_html import flame_section, html_page
from vramtrace.render.flame_svg import group_color
from vramtrace.render.report_text import BREAKDOWNS
from vramtrace.render.units import fmt_bytes, fmt_point, fmt_seconds, fmt_share, fmt_signed_bytes
from vramtrace.replay.timeline import DeviceTimeline
from vramtrace.snapshot.save import RECORDERS
from vramtrace.trace import Action, Trace

MAX_POINTS = 600
TABLE_ROWS = 15
CHART_W, CHART_H = 1200, 320
LEFT, RIGHT, TOP, BOTTOM = 86, 14, 14, 34
_SIZE_MARK = "@@PAGE_SIZE@@"
_CSS = """.summary th{font-weight:600;padding-right:2em}.tables{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}
caption{text-align:left;font-weight:600;padding:.3em 0}.legend{white-space:nowrap;margin-right:1em}
.readout{font-size:12px;min-height:2.6em;white-space:pre-wrap;margin:.2em 0}.chart svg{border:1px solid #eee}"""


def render_html_report(trace: Trace, tl: DeviceTimeline, at: str | int = "peak",
                       other: Trace | None = None) -> str:
    """The page for one device of ``trace`` at point ``at``; ``other``: a second run to diff against."""
    dev = device_report(trace, tl, at)
    index = dev["at"]["index"]
    level = group_level(trace)
    name = Path(trace.path).name
    parts = [f"<h1>vramtrace: {escape(name)}</h1>", _summary(trace, dev)]
    if not trace.has_tags:
        parts.append("<p class=warn>No vramtrace tags in this file: groups below are phases guessed from "
                     "stack frames (record with <code>vramtrace record</code> for owners).</p>")
    if tl.n_events:
        parts.append(_timeline_section(trace, tl, level))
    parts.append(_oom_section(trace, tl, dev))
    parts.append(_breakdowns(dev, trace.has_tags))
    levels = default_levels(trace)
    parts.append(f"<h2 id=flame>Flame graph at {escape(str(at))} (event {index})</h2>"
                 f"<p class=muted>Levels: {' &gt; '.join(levels)}, then Python frames outermost first. "
                 f"Click a frame to zoom.</p>"
                 + flame_section(flame_tree(trace, tl, index, levels), title=f"{name}: {fmt_bytes(dev['state']['allocated'])} "
                                 f"allocated at {at}"))
    if other is not None:
        parts.append(_diff_section(trace, other))
    parts.append(f"<p class=muted id=page-size>This page: {_SIZE_MARK}, self-contained (no network). "
                 f"Input {escape(trace.path)}: {fmt_bytes(_file_size(trace.path))}, {tl.n_events:,} events "
                 f"on device {tl.device}; the time series is summarised to at most {MAX_POINTS} "
                 f"peak-preserving samples, flame frames too narrow to see are left out, tables show "
                 f"their top {TABLE_ROWS} rows.</p>")
    page = html_page(f"vramtrace: {name}", "\n".join(parts), _CHART_SCRIPT, _CSS)
    return _state_size(page)


def _file_size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def _state_size(page: str) -> str:
    """Put the page's own size in it (the figure's length changes the size, so settle it)."""
    size = len(page.encode())
    for _ in range(3):
        text = page.replace(_SIZE_MARK, fmt_bytes(size))
        if len(text.encode()) == size:
            break
        size = len(text.encode())
    return text


def _summary(trace: Trace, dev: dict) -> str:
    state, at = dev["state"], dev["at"]
    frag = state["fragmentation"]
    rows = [
        ("device", f"{dev['device']} of {trace.n_devices}"),
        ("events", f"{dev['events']:,} over {fmt_seconds(dev['time_span_s'])}"),
        ("peak allocated", fmt_point(dev["peak_allocated"], dev["time_start_us"])),
        ("peak reserved", fmt_point(dev["peak_reserved"], dev["time_start_us"])),
        (f"at {at['point']} (event {at['index']})",
         f"{fmt_bytes(state['allocated'])} allocated ({fmt_bytes(state['requested'])} requested), "
         f"{fmt_bytes(state['reserved'])} reserved, {state['live_allocations']:,} live blocks"),
        ("fragmentation", f"{fmt_bytes(frag['internal'])} rounding inside blocks, "
                          f"{fmt_bytes(frag['external'])} cached but unallocated"),
        ("at end", f"{fmt_bytes(dev['end']['allocated'])} allocated, {fmt_bytes(dev['end']['reserved'])} "
                   f"reserved in {dev['end']['segments']} segments"),
        ("out of memory", f"{len(dev['oom_events'])} event(s)" if dev["oom_events"] else "none"),
        ("attribution", dev["attribution"]),
    ]
    if trace.recorded_by:
        rows.insert(1, ("recorded by", RECORDERS[trace.recorded_by]))
    if dev["trace_starts_mid_run"]:
        rows.append(("note", "the trace starts mid-run: blocks made before its first event come from the final state"))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<h2 id=summary>Summary</h2><table class=summary>{body}</table>"


def _timeline_section(trace: Trace, tl: DeviceTimeline, level: str) -> str:
    series = group_series(trace, tl, level)
    bucket = np.arange(tl.n_events) * MAX_POINTS // max(tl.n_events, 1)
    keep = peak_samples(bucket, tl.allocated)
    ooms = np.flatnonzero(trace.action[tl.events] == Action.OOM).tolist()
    svg = _chart(series, tl, keep, ooms)
    ts, timed = timestamps(tl)
    data = {"x": keep.tolist(), "names": series.names, "v": series.values[keep].tolist(),
            "reserved": tl.reserved[keep].tolist(),
            "t": np.round((ts[keep] - ts[0]) / 1e6, 6).tolist() if timed else None}
    legend = "".join(f'<span class=legend>{_swatch(n)}{escape(n)}</span> ' for n in series.names)
    return (f"<h2 id=timeline>Memory over time, stacked by {level}</h2>"
            f"<p class=muted>Allocated bytes by {level} (areas) and reserved bytes (line) after each event; "
            f"{tl.n_events:,} events shown as {len(keep):,} samples, each the fullest state of its stretch. "
            f"Hover for figures.</p><div class=chart>{svg}<pre class=readout> </pre>"
            f"<script type=application/json class=chart-data>{_json_for_html(data)}</script></div>"
            f"<p>{legend}</p>")


def _json_for_html(value: object) -> str:
    """JSON that cannot end its <script> element early."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def _chart(series: GroupSeries, tl: DeviceTimeline, keep: np.ndarray, ooms: list[int]) -> str:
    """Stacked areas per group over event index, the reserved line, peak and OOM marks."""
    stacked = np.cumsum(series.values[keep], axis=1)
    reserved = tl.reserved[keep]
    ymax = float(max(stacked[:, -1].max(initial=0) if stacked.size else 0, reserved.max(initial=0), 1))
    x1 = max(tl.n_events - 1, 1)
    plot_w, plot_h = CHART_W - LEFT - RIGHT, CHART_H - TOP - BOTTOM
    px = LEFT + keep / x1 * plot_w

    def py(values: np.ndarray) -> np.ndarray:
        return TOP + plot_h - values / ymax * plot_h

    out = [f'<svg class=timeline viewBox="0 0 {CHART_W} {CHART_H}" width="100%" data-left="{LEFT}" '
           f'data-right="{RIGHT}" data-last="{x1}" font-size="11" font-family="sans-serif">',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#ccc"/>']
    for k in range(6):
        value = ymax * k / 5
        y = float(py(np.array(value)))
        out.append(f'<line x1="{LEFT}" x2="{CHART_W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt_bytes(value)}</text>')
        out.append(f'<text x="{LEFT + plot_w * k / 5:.1f}" y="{CHART_H - 18}" text-anchor="middle">'
                   f"{round(x1 * k / 5):,}</text>")
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{CHART_H - 3}" text-anchor="middle" fill="#555">event index</text>')
    bottom = np.zeros(len(keep))
    xs = [f"{v:.1f}" for v in px]
    for g, name in enumerate(series.names):
        top = stacked[:, g].astype(float)
        if not top.any() and not bottom.any():
            continue
        upper = " ".join(f"{a},{b:.1f}" for a, b in zip(xs, py(top)))
        lower = " ".join(f"{a},{b:.1f}" for a, b in zip(reversed(xs), py(bottom)[::-1]))
        out.append(f'<polygon points="{upper} {lower}" fill="{group_color(name)}" fill-opacity="0.85">'
                   f"<title>{escape(name)}</title></polygon>")
        bottom = top
    line = " ".join(f"{a},{b:.1f}" for a, b in zip(xs, py(reserved.astype(float))))
    out.append(f'<polyline points="{line}" fill="none" stroke="#333" stroke-width="1.2"><title>reserved</title></polyline>')
    marks = [(tl.peak_index, f"peak {fmt_bytes(tl.peak_allocated)}", "#000")] if tl.peak_index >= 0 else []
    marks += [(i, "OOM", "#d00") for i in ooms]
    for i, label, colour in marks:
        xx = LEFT + i / x1 * plot_w
        anchor = ("end", -4) if xx > LEFT + plot_w * 0.8 else ("start", 4)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="{colour}" '
                   f'stroke-dasharray="4 3"/><text x="{xx + anchor[1]:.1f}" y="{TOP + 12}" fill="{colour}" '
                   f'text-anchor="{anchor[0]}">{escape(label)}</text>')
    out.append(f'<line class=cursor x1="0" x2="0" y1="{TOP}" y2="{TOP + plot_h}" stroke="#888" visibility="hidden"/>')
    out.append("</svg>")
    return "".join(out)


def _oom_section(trace: Trace, tl: DeviceTimeline, dev: dict) -> str:
    if not dev["oom_events"]:
        return ""
    rows = "".join(f"<tr><td>{o['index']}</td><td class=n>{fmt_bytes(o['requested'])}</td>"
                   f"<td class=n>{fmt_bytes(o['device_free'])}</td></tr>" for o in dev["oom_events"])
    first = dev["oom_events"][0]["index"]
    at_oom = device_report(trace, tl, first)
    key = "by_owner" if trace.has_tags else "by_phase"
    return (f"<h2 id=oom class=warn>Out of memory</h2><table><tr><th>event</th><th class=n>requested</th>"
            f"<th class=n>free on the device</th></tr>{rows}</table>"
            f"<p>At the first OOM (event {first}): {fmt_bytes(at_oom['state']['allocated'])} allocated, "
            f"{fmt_bytes(at_oom['state']['reserved'])} reserved "
            f"({fmt_bytes(at_oom['state']['fragmentation']['external'])} of it cached but unallocated).</p>"
            + _table(f"live at the OOM, by {key[3:]}", at_oom[key], True))


def _breakdowns(dev: dict, tagged: bool) -> str:
    out = [f"<h2 id=breakdown>Breakdown at {escape(dev['at']['point'])}</h2><div class=tables>"]
    for key, label in BREAKDOWNS:
        if not tagged and key in ("by_owner", "by_owner_dtype"):
            continue
        out.append(_table(label if tagged or key != "by_module" else "where (innermost user frame, guessed)",
                          dev[key], key in ("by_owner", "by_phase")))
    out.append("</div>")
    stacks = "".join(f"<tr><td class=n>{fmt_bytes(s['bytes'])}</td><td class=n>{s['count']}</td>"
                     f"<td>{escape(s['owner'])}</td><td><code>{'<br>'.join(escape(f) for f in s['frames']) or '-'}"
                     f"</code></td></tr>" for s in dev["top_stacks"])
    out.append("<h3>Top stacks (innermost frame first)</h3><table><tr><th class=n>bytes</th><th class=n>blocks</th>"
               f"<th>owner</th><th>stack</th></tr>{stacks}</table>")
    return "".join(out)


def _table(label: str, rows: list[dict], swatches: bool = False) -> str:
    body = [f'<tr><td>{_swatch(r["name"]) if swatches else ""}{escape(r["name"])}</td><td class=n>{fmt_bytes(r["bytes"])}</td>'
            f'<td class=n>{fmt_share(r["share"])}</td><td class=n>{r["count"]:,}</td></tr>' for r in rows[:TABLE_ROWS]]
    if len(rows) > TABLE_ROWS:
        rest = rows[TABLE_ROWS:]
        body.append(f"<tr class=muted><td>... {len(rest)} more</td><td class=n>{fmt_bytes(sum(r['bytes'] for r in rest))}"
                    f"</td><td class=n>{fmt_share(sum(r['share'] for r in rest))}</td>"
                    f"<td class=n>{sum(r['count'] for r in rest):,}</td></tr>")
    return (f"<table><caption>by {escape(label)}</caption><tr><th>{escape(label)}</th><th class=n>bytes</th>"
            f"<th class=n>share</th><th class=n>blocks</th></tr>{''.join(body)}</table>")


def _swatch(name: str) -> str:
    return f'<span class="sw" style="background:{group_color(name)}"></span>'


def _diff_section(a: Trace, b: Trace) -> str:
    name_a, name_b = Path(a.path).name, Path(b.path).name
    diff = diff_runs(units_of(a), units_of(b), (PEAK,), "module", name_a, name_b)
    point = diff["points"][0]
    owners = "".join(
        f"<tr><td>{_swatch(r['owner'])}{escape(r['owner'])}</td><td class=n>{fmt_bytes(r['a'])}</td>"
        f"<td class=n>{fmt_bytes(r['b'])}</td><td class='n {_sign(r['delta'])}'>{fmt_signed_bytes(r['delta'])}</td></tr>"
        for r in point["by_owner"])
    rows = "".join(
        f"<tr><td>{escape(r['owner'])}</td><td><code>{escape(r['module'])}</code></td><td>{escape(r['phase'])}</td>"
        f"<td class=n>{fmt_bytes(r['a'])}</td><td class=n>{fmt_bytes(r['b'])}</td>"
        f"<td class='n {_sign(r['delta'])}'>{fmt_signed_bytes(r['delta'])}</td></tr>"
        for r in point["rows"][:TABLE_ROWS])
    explain = "".join(f"<li>{escape(line)}</li>" for line in point["explanation"])
    tree_a, tree_b = run_trees(point)
    return (f"<h2 id=diff>Diff: A = {escape(name_a)}, B = {escape(name_b)}</h2><p><b>{escape(headline(diff))}</b></p>"
            f"<ul>{explain}</ul><h3>By owner, {escape(point['label'])}</h3><table><tr><th>owner</th>"
            f"<th class=n>A</th><th class=n>B</th><th class=n>change</th></tr>{owners}</table>"
            f"<h3>Largest changes by owner x module x phase</h3><table><tr><th>owner</th><th>module</th>"
            f"<th>phase</th><th class=n>A</th><th class=n>B</th><th class=n>change</th></tr>{rows}</table>"
            "<h3>Differential flame graph (B against A)</h3><p class=muted>Widths: bytes of B at its peak; "
            "red grew, blue shrank against A.</p>" + flame_section(tree_b, tree_a))


def _sign(delta: int) -> str:
    return "grow" if delta > 0 else "shrink" if delta < 0 else ""


# Hover read-out for each .chart: nearest sample's figures per group (data in its JSON block).
_CHART_SCRIPT = r"""
function fmtBytes(n) {
  var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'], i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return i ? n.toFixed(2) + ' ' + u[i] : n + ' B';
}
document.querySelectorAll('.chart').forEach(function (box) {
  var svg = box.querySelector('svg'), out = box.querySelector('.readout'), cursor = svg.querySelector('.cursor');
  var d = JSON.parse(box.querySelector('.chart-data').textContent);
  var vb = svg.viewBox.baseVal, L = +svg.dataset.left, R = +svg.dataset.right, last = +svg.dataset.last;
  svg.addEventListener('mousemove', function (ev) {
    var r = svg.getBoundingClientRect(), px = (ev.clientX - r.left) * vb.width / r.width;
    var want = (px - L) / (vb.width - L - R) * last, lo = 0, hi = d.x.length - 1;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (d.x[mid] < want) lo = mid + 1; else hi = mid; }
    var v = d.v[lo], total = v.reduce(function (a, b) { return a + b; }, 0);
    var parts = d.names.map(function (n, g) { return n + ' ' + fmtBytes(v[g]); });
    out.textContent = 'after event ' + d.x[lo] + (d.t ? ' (t=' + d.t[lo] + ' s)' : '') + ': ' + fmtBytes(total) +
      ' allocated, ' + fmtBytes(d.reserved[lo]) + ' reserved | ' + parts.join(', ');
    var cx = L + d.x[lo] / last * (vb.width - L - R);
    cursor.setAttribute('x1', cx); cursor.setAttribute('x2', cx); cursor.setAttribute('visibility', 'visible');
  });
});
"""
