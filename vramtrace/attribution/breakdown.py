"""The report's content: figures and breakdowns of one trace at one point, as plain data.

``build_report`` returns a JSON-ready dict (schema in docs/report-json.md); renderers only
format it. Module paths of repeated layers are folded (``model.layers.*.mlp``) so that 32
identical layers read as one row.
"""
from __future__ import annotations

import re
from collections import defaultdict
from operator import attrgetter
from typing import Callable, Iterable

import numpy as np

from vramtrace import __version__
from vramtrace.attribution.classify import Attribution, attribute, format_frame, python_frames
from vramtrace.gcpause import gc_paused
from vramtrace.replay.timeline import DeviceTimeline, build_timeline
from vramtrace.trace import Action, Trace

SCHEMA_VERSION = 1
TOP_STACKS = 10
STACK_DEPTH = 8
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def fold_module(path: str) -> str:
    """``model.layers.17.mlp`` -> ``model.layers.*.mlp``."""
    return _LAYER_INDEX.sub(".*", path)


def build_report(trace: Trace, at: str | int = "peak", devices: Iterable[int] | None = None) -> dict:
    """Everything ``vramtrace report`` shows, for the chosen devices (default: all with data)."""
    if devices is None:
        devices = [d for d in range(trace.n_devices) if _has_data(trace, d)] or list(range(trace.n_devices))
    with gc_paused():   # many short-lived, acyclic objects: collections would only rescan the trace
        return _report(trace, at, devices)


def _report(trace: Trace, at: str | int, devices: Iterable[int]) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "vramtrace": __version__,
        "file": trace.path,
        "n_devices": trace.n_devices,
        "recorded_by": trace.recorded_by,
        "allocator_settings": _plain(trace.settings),
        "devices": [device_report(trace, build_timeline(trace, d), at) for d in devices],
    }


def _has_data(trace: Trace, device: int) -> bool:
    sl = trace.device_slice(device)
    return sl.stop > sl.start or bool((trace.segments.device == device).any())


def device_report(trace: Trace, tl: DeviceTimeline, at: str | int) -> dict:
    index = tl.resolve_point(at)
    live = tl.allocations.live_at(index)
    attrs = attribute(trace, tl.allocations, live)
    sizes = tl.allocations.size[live].tolist()
    totals = _totals(attrs, sizes)
    guessed = bool(attrs) and all(a.guessed for a in attrs)
    times = tl.time_us[tl.time_us >= 0]
    sl = tl.events
    return {
        "device": tl.device,
        "events": tl.n_events,
        "time_span_s": float((times.max() - times.min()) / 1e6) if len(times) else None,
        "time_start_us": int(times.min()) if len(times) else None,
        "at": {"point": str(at), "index": index, "time_us": tl.time_at(index)},
        "state": {
            "allocated": tl.at(index, "allocated"),
            "requested": tl.at(index, "requested"),
            "reserved": tl.at(index, "reserved"),
            "live_allocations": int(len(live)),
            "fragmentation": tl.fragmentation(index),
        },
        "peak_allocated": _point(tl, tl.peak_index, "allocated"),
        "peak_reserved": _point(tl, tl.peak_reserved_index, "reserved"),
        "end": {"allocated": tl.at(tl.end_index, "allocated"), "requested": tl.at(tl.end_index, "requested"),
                "reserved": tl.at(tl.end_index, "reserved"),
                "segments": int((trace.segments.device == tl.device).sum())},
        "trace_starts_mid_run": bool((tl.allocations.alloc_index < 0).any()),
        "estimated_block_sizes": int((~tl.allocations.size_exact).sum()),
        "oom_events": _ooms(trace, sl),
        "attribution": "guessed from stack frames" if guessed else "vramtrace tags",
        "by_owner": _group(totals, lambda a: a.owner),
        "by_owner_dtype": _group(totals, lambda a: f"{a.owner} {a.dtype}"),
        "by_module": _group(totals, lambda a: fold_module(a.module)),
        "by_phase": _group(totals, lambda a: a.phase),
        "top_stacks": _top_stacks(trace, tl.allocations.stack[live].tolist(), sizes, attrs),
    }


def _point(tl: DeviceTimeline, index: int, series: str) -> dict:
    return {"bytes": tl.at(index, series), "index": index, "time_us": tl.time_at(index)}


def _ooms(trace: Trace, sl: slice) -> list[dict]:
    rows = np.flatnonzero(trace.action[sl] == Action.OOM)
    return [{"index": int(i), "requested": int(trace.size[sl][i]), "device_free": int(trace.addr[sl][i]),
             "time_us": int(trace.time_us[sl][i]) if trace.time_us[sl][i] >= 0 else None} for i in rows]


def _totals(attrs: list[Attribution], sizes: list[int]) -> list[tuple[Attribution, int, int]]:
    """Bytes and count per Attribution object. Rows share a few hundred objects, so the
    groupings below run their key (a regex for modules) per object instead of per row."""
    totals: dict[int, list] = {}
    for a, s in zip(attrs, sizes):
        t = totals.get(id(a))
        if t is None:
            totals[id(a)] = [a, s, 1]
        else:
            t[1] += s
            t[2] += 1
    return [tuple(t) for t in totals.values()]


def _group(totals: list[tuple[Attribution, int, int]], key: Callable[[Attribution], str]) -> list[dict]:
    total = sum(b for _, b, _ in totals)
    bytes_by: dict[str, int] = defaultdict(int)
    count_by: dict[str, int] = defaultdict(int)
    for a, b, n in totals:
        k = key(a)
        bytes_by[k] += b
        count_by[k] += n
    rows = sorted(bytes_by.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"name": k, "bytes": b, "count": count_by[k], "share": b / total if total else 0.0}
            for k, b in rows]


def _top_stacks(trace: Trace, stacks: list[int], sizes: list[int], attrs: list[Attribution]) -> list[dict]:
    """The largest (stack, owner) groups of the live allocations. Grouped with numpy: a
    thousand-odd live rows with dict updates per row cost a third of the attribution."""
    if not stacks:
        return []
    owners = list(map(attrgetter("owner"), attrs))
    owner_code = {o: i for i, o in enumerate(dict.fromkeys(owners))}
    keys = np.array(trace.stack_keys(stacks), np.int64)
    group = (keys + 1) * len(owner_code) + np.fromiter(map(owner_code.__getitem__, owners), np.int64, len(owners))
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    total = np.zeros(len(first), np.int64)
    np.add.at(total, inverse, np.array(sizes, np.int64))
    count = np.bincount(inverse)
    # largest first; ties in the order the groups first appear
    top = np.lexsort((first, -total))[:TOP_STACKS].tolist()
    return [{"bytes": int(total[g]), "count": int(count[g]), "owner": owners[first[g]],
             "frames": [format_frame(f) for f in python_frames(trace.stack_frames(stacks[first[g]]))][:STACK_DEPTH]}
            for g in top]


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
