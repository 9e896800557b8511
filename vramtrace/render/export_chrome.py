"""Memory per owner over time: the series, and as Chrome trace events for Perfetto.

``group_series`` replays a device's allocations into allocated bytes per owner (or guessed
phase) after every event; the HTML report draws it and ``chrome_trace`` exports it as
``"ph": "C"`` counter events (ts in microseconds: the snapshot's own Unix-epoch clock, the
clock torch.profiler traces use, so Perfetto shows the two side by side; event indices for
files without timestamps). Where several events share a timestamp (or, for the report, a
pixel), the state with the most allocated bytes stands for them, so peaks are never lost.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vramtrace import __version__
from vramtrace.attribution.classify import attribute
from vramtrace.replay.timeline import DeviceTimeline
from vramtrace.trace import Action, Trace


@dataclass
class GroupSeries:
    """Allocated bytes per group: ``values[i, g]`` just after event i, ``initial`` before any."""

    names: list[str]             # by bytes at the peak, largest first
    values: np.ndarray           # (n_events, n_groups) int64
    initial: np.ndarray          # (n_groups,) int64


def group_series(trace: Trace, tl: DeviceTimeline, level: str) -> GroupSeries:
    """Replay the device's allocations into bytes per ``level`` (owner, phase, ...) over time."""
    allocs, n = tl.allocations, tl.n_events
    attrs = attribute(trace, allocs, np.arange(len(allocs)))
    labels = [getattr(a, level) for a in attrs]
    at_peak = dict.fromkeys(labels, 0)
    for row in allocs.live_at(tl.peak_index).tolist():
        at_peak[labels[row]] += int(allocs.size[row])
    names = sorted(at_peak, key=lambda k: (-at_peak[k], k))
    index = {name: g for g, name in enumerate(names)}
    group = np.array([index[k] for k in labels], dtype=np.int64)
    deltas = np.zeros((n, len(names)), np.int64)
    made = allocs.alloc_index >= 0
    freed = allocs.free_index < n
    np.add.at(deltas, (allocs.alloc_index[made], group[made]), allocs.size[made])
    np.add.at(deltas, (allocs.free_index[freed], group[freed]), -allocs.size[freed])
    initial = np.bincount(group[~made], weights=allocs.size[~made], minlength=len(names)).astype(np.int64)
    return GroupSeries(names, initial + np.cumsum(deltas, axis=0), initial)


def peak_samples(bucket: np.ndarray, total: np.ndarray) -> np.ndarray:
    """For each distinct ``bucket`` value, the index where ``total`` is largest (the first
    such), in index order: a downsampled series that keeps its peak."""
    if not len(bucket):
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(len(total)), -total, bucket))
    first = np.ones(len(order), bool)
    first[1:] = bucket[order][1:] != bucket[order][:-1]
    return np.sort(order[first])


def timestamps(tl: DeviceTimeline) -> tuple[np.ndarray, bool]:
    """Event times in microseconds, or event indices where the file lacks timestamps."""
    if len(tl.time_us) and (tl.time_us >= 0).all():
        return tl.time_us, True
    return np.arange(tl.n_events, dtype=np.int64), False


def chrome_trace(trace: Trace, timelines: list[DeviceTimeline], level: str) -> dict:
    """Chrome trace JSON: per device a process with counters 'allocated by <level>' and
    'allocator' (allocated, reserved), and instants for the peak and any OOM."""
    events: list[dict] = []
    clocks = set()
    for tl in timelines:
        if not tl.n_events:
            continue
        series = group_series(trace, tl, level)
        ts, timed = timestamps(tl)
        clocks.add("unix epoch microseconds" if timed else "event index")
        pid = tl.device
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"GPU memory cuda:{tl.device} (vramtrace)"}})
        for i in peak_samples(ts, tl.allocated).tolist():
            t = int(ts[i])
            events.append({"name": f"allocated by {level}", "ph": "C", "ts": t, "pid": pid, "tid": 0,
                           "args": dict(zip(series.names, series.values[i].tolist()))})
            events.append({"name": "allocator", "ph": "C", "ts": t, "pid": pid, "tid": 0,
                           "args": {"allocated": int(tl.allocated[i]), "reserved": int(tl.reserved[i])}})
        if tl.peak_index >= 0:
            events.append({"name": "peak allocated", "ph": "i", "s": "p", "ts": int(ts[tl.peak_index]),
                           "pid": pid, "tid": 0,
                           "args": {"bytes": tl.peak_allocated, "event_index": tl.peak_index}})
        action = trace.action[tl.events]
        for i in np.flatnonzero(action == Action.OOM).tolist():
            events.append({"name": "out of memory", "ph": "i", "s": "p", "ts": int(ts[i]), "pid": pid, "tid": 0,
                           "args": {"requested": int(trace.size[tl.events][i]),
                                    "device_free": int(trace.addr[tl.events][i]), "event_index": i}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"exporter": f"vramtrace {__version__}", "file": trace.path,
                          "counters": f"allocated bytes by {level}", "clock": " / ".join(sorted(clocks))}}
