"""Turn a Trace back into a snapshot dict (DESIGN §3), optionally relabelled for the viewer.

``to_snapshot`` is the inverse of loading: any era that loads (torch 2.0 block history, bare
segment lists, files without timestamps) comes back in the modern form, which
``snapshot.save.write_snapshot`` writes for PyTorch's memory visualizer. ``memviz_snapshot``
adds what the viewer colours by: an owner (or guessed phase) per allocation in ``category``,
at most 9 of them plus ``unknown``, and the detail as JSON in ``user_metadata``.
Frame lists are shared between events with the same stack, so pickle stores each once.
"""
from __future__ import annotations

import json
from collections import defaultdict
from itertools import repeat
from typing import Any, Sequence

import numpy as np

from vramtrace.attribution.classify import Attribution, attribute, python_frames
from vramtrace.attribution.taxonomy import UNKNOWN
from vramtrace.replay.timeline import DeviceTimeline, build_timeline
from vramtrace.snapshot.load import SnapshotError
from vramtrace.trace import ACTION_NAMES, Action, BlockState, Frame, Trace

MAX_CATEGORIES = 10          # the viewer's legend: schemeTableau10
STATE_NAMES = {s.value: s.name.lower() for s in BlockState}


def to_snapshot(trace: Trace, category: Sequence[str | None] | None = None,
                user_metadata: Sequence[str | None] | None = None, python_only: bool = False) -> dict:
    """The trace as a snapshot dict; ``category``/``user_metadata`` (one per event, None: keep
    the file's own) relabel events; ``python_only`` drops C++ frames from stacks='all' files."""
    frames = _FrameLists(trace, python_only)
    tags = [{k: getattr(t, k) for k in ("category", "user_metadata", "compile_context") if getattr(t, k) is not None}
            for t in trace.tags]
    columns = zip(trace.action.tolist(), trace.addr.tolist(), trace.size.tolist(), trace.stream.tolist(),
                  trace.time_us.tolist(), trace.stack.tolist(), trace.tag.tolist(),
                  category if category is not None else repeat(None),
                  user_metadata if user_metadata is not None else repeat(None))
    events = [_event(frames, tags, *row) for row in columns]
    traces = [events[trace.device_slice(d)] for d in range(trace.n_devices)]
    snap = {"segments": _segments(trace, frames), "device_traces": traces,
            "allocator_settings": trace.settings, "external_annotations": trace.annotations}
    snap.update(trace.extras)
    return snap


def _event(frames: "_FrameLists", tags: list[dict], action: int, addr: int, size: int, stream: int,
           time_us: int, stack: int, tag: int, category: str | None, metadata: str | None) -> dict:
    event: dict = {"action": ACTION_NAMES[action], "device_free" if action == Action.OOM else "addr": addr,
                   "size": size, "stream": stream}
    if time_us >= 0:
        event["time_us"] = time_us
    if stack >= 0:
        event["frames"] = frames.of(stack)
    if tag >= 0:
        event.update(tags[tag])
    if category is not None:
        event["category"] = category
    if metadata is not None:
        event["user_metadata"] = metadata
    return event


def _segments(trace: Trace, frames: "_FrameLists") -> list[dict]:
    segs, blocks = trace.segments, trace.blocks
    out = []
    for s in range(len(segs.address)):
        first, count = int(segs.first_block[s]), int(segs.n_blocks[s])
        rows = []
        for b in range(first, first + count):
            state = int(blocks.state[b])
            stack = int(blocks.stack[b])
            rows.append({"address": int(blocks.address[b]), "size": int(blocks.size[b]),
                         "requested_size": int(blocks.requested_size[b]), "state": STATE_NAMES[state],
                         "frames": frames.of(stack) if stack >= 0 else []})
        active = [r for r in rows if r["state"] != "inactive"]
        out.append({
            "device": int(segs.device[s]), "address": int(segs.address[s]), "total_size": int(segs.total_size[s]),
            "allocated_size": sum(r["size"] for r in active if r["state"] == "active_allocated"),
            "active_size": sum(r["size"] for r in active),
            "requested_size": sum(r["requested_size"] for r in active),
            "stream": int(segs.stream[s]), "segment_type": "large" if segs.is_large[s] else "small",
            "segment_pool_id": [0, 0], "is_expandable": bool(segs.is_expandable[s]), "frames": [],
            "blocks": rows})
    return out


class _FrameLists:
    """Frame lists for the output, built from the raw lists the file held (interning every
    event's frames costs seconds on big files). Loaded files share frame dicts, so a raw
    stack is keyed by the identities of its frames: one output list per distinct stack and
    one dict per distinct frame, which pickle then stores once each, as PyTorch's dumps do."""

    def __init__(self, trace: Trace, python_only: bool):
        self.table, self.python_only = trace.stack_table, python_only
        self.lists: dict[tuple[int, ...], list[dict]] = {}
        self.frames: dict[int, Frame] = {}
        self.dicts: dict[Frame, dict] = {}

    def of(self, stack: int) -> list[dict]:
        raw = self.table.raw(stack)
        key = tuple(map(id, raw))
        found = self.lists.get(key)
        if found is None:
            fs = [self._parse(f) for f in raw]
            if self.python_only:
                fs = python_frames(fs)
            found = self.lists[key] = [self._dict(f) for f in fs]
        return found

    def _parse(self, raw: Any) -> Frame:
        found = self.frames.get(id(raw))
        if found is None:
            try:
                found = Frame(raw["name"], raw["filename"], raw["line"])
            except (TypeError, KeyError):
                raise SnapshotError("a stack frame lacks name/filename/line") from None
            if not isinstance(found.name, str) or not isinstance(found.filename, str) or not isinstance(found.line, int):
                raise SnapshotError("a stack frame has a non-text name/filename or non-integer line")
            self.frames[id(raw)] = found
        return found

    def _dict(self, f: Frame) -> dict:
        found = self.dicts.get(f)
        if found is None:
            found = self.dicts[f] = {"name": f.name, "filename": f.filename, "line": f.line}
        return found


def event_rows(trace: Trace, tl: DeviceTimeline) -> np.ndarray:
    """For each of the device's events, the Allocations row it belongs to (-1: none).

    alloc and free_completed events come from the replay; free_requested and annotate events
    belong to the allocation live at their address at that moment."""
    allocs, n = tl.allocations, tl.n_events
    action = trace.action[tl.events]
    addr = trace.addr[tl.events]
    rows = np.full(n, -1, np.int64)
    freed = np.flatnonzero(allocs.free_index < n)
    freed = freed[action[allocs.free_index[freed]] == Action.FREE_COMPLETED]
    rows[allocs.free_index[freed]] = freed
    made = np.flatnonzero(allocs.alloc_index >= 0)
    rows[allocs.alloc_index[made]] = made
    query = np.flatnonzero((action == Action.FREE_REQUESTED) | (action == Action.ANNOTATE))
    if not len(query) or not len(allocs):
        return rows
    # key = (address rank, alloc index + 1): the last allocation at or before the query
    uniq, rank = np.unique(allocs.addr, return_inverse=True)
    span = n + 2
    keys = rank * span + allocs.alloc_index + 1
    order = np.argsort(keys, kind="stable")
    q_rank = np.minimum(np.searchsorted(uniq, addr[query]), len(uniq) - 1)
    pos = np.searchsorted(keys[order], q_rank * span + query + 1, side="left") - 1
    cand = order[np.maximum(pos, 0)]
    ok = ((pos >= 0) & (uniq[q_rank] == addr[query]) & (rank[cand] == q_rank)
          & (allocs.free_index[cand] >= query))
    rows[query[ok]] = cand[ok]
    return rows


def memviz_snapshot(trace: Trace, level: str = "owner", python_only: bool = True) -> dict:
    """The snapshot PyTorch's viewer renders best: ``level`` ("owner" or "phase") of each
    allocation in ``category`` (the biggest 9 by bytes allocated, the rest ``unknown``),
    the attribution as JSON in ``user_metadata``, Python frames only unless told otherwise."""
    n = trace.n_events
    category: list[str | None] = [None] * n
    metadata: list[str | None] = [None] * n
    labelled: list[tuple[int, np.ndarray, list[Attribution], np.ndarray]] = []   # start, rows, attrs, tags
    bytes_by: dict[str, int] = defaultdict(int)
    for d in range(trace.n_devices):
        tl = build_timeline(trace, d)
        allocs = tl.allocations
        attrs = attribute(trace, allocs, np.arange(len(allocs)))
        for a, size in zip(attrs, allocs.size.tolist()):
            bytes_by[getattr(a, level)] += size
        labelled.append((tl.events.start, event_rows(trace, tl), attrs, allocs.tag))
    ranked = sorted(bytes_by, key=lambda k: (k == UNKNOWN, -bytes_by[k], k))
    kept = set(ranked[:MAX_CATEGORIES - 1]) - {UNKNOWN}
    labels: dict[tuple[Attribution, int], tuple[str, str]] = {}   # one text object per distinct label
    for start, rows, attrs, tags in labelled:
        tag_list = tags.tolist()
        for local in np.flatnonzero(rows >= 0).tolist():
            row = int(rows[local])
            a, tag = attrs[row], tag_list[row]
            label = labels.get((a, tag))
            if label is None:
                group = getattr(a, level)
                label = labels[(a, tag)] = (group if group in kept else UNKNOWN, _metadata(trace, a, tag))
            category[start + local], metadata[start + local] = label
    return to_snapshot(trace, category, metadata, python_only)


def _metadata(trace: Trace, a: Attribution, tag_id: int) -> str:
    """The recorder's own detail where it tagged the allocation, else the attribution."""
    tag = trace.tag_of(tag_id)
    if not a.guessed and tag is not None and tag.user_metadata:
        return tag.user_metadata
    detail = {k: v for k, v in (("owner", a.owner), ("module", a.module), ("phase", a.phase),
                                ("dtype", a.dtype)) if v not in ("", "-")}
    if a.guessed:
        detail["guessed"] = True
    return json.dumps(detail, separators=(",", ":"))
