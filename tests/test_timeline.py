"""Replay figures against independent truth: torch.cuda._memory_viz and a dict-based rewind."""
from __future__ import annotations

import re

import pytest
import torch.cuda._memory_viz as memviz

from conftest import real_snapshot_params
from vramtrace.replay.timeline import build_timeline
from vramtrace.snapshot.load import load_snapshot
from vramtrace.trace import Trace


def rewind_requested(snap: dict, device: int) -> list[int]:
    """Requested bytes after each event, by walking back from the final blocks the way
    MemoryViz's Active Memory Timeline does (a dict of live addresses, no pairing step)."""
    live = {b["address"]: b["requested_size"] for seg in snap["segments"] if seg.get("device", 0) == device
            for b in seg["blocks"] if b["state"] != "inactive"}
    total = sum(live.values())
    after = []
    for e in reversed(snap["device_traces"][device]):
        after.append(total)
        if e["action"] == "alloc":
            total -= live.pop(e["addr"], e["size"])
        elif e["action"] == "free_completed":
            live[e["addr"]] = e["size"]
            total += e["size"]
    return after[::-1]


@pytest.mark.parametrize("path", real_snapshot_params())
def test_requested_series_matches_a_backward_walk(path):
    snap = load_snapshot(path)
    trace = Trace.from_snapshot(snap, str(path))
    for d in range(trace.n_devices):
        tl = build_timeline(trace, d)
        assert tl.requested.tolist() == rewind_requested(snap, d)


@pytest.mark.parametrize("path", real_snapshot_params())
def test_final_state_agrees_with_memory_viz_segsum(path):
    snap = load_snapshot(path)
    trace = Trace.from_snapshot(snap, str(path))
    text = memviz.segsum(snap)
    reserved = re.search(r"total_reserved: (.*)\n", text).group(1)
    n_segments = int(re.search(r"segments: (\d+)", text).group(1))
    active_blocks = sum(memviz.calc_active(seg) for seg in snap["segments"])
    timelines = [build_timeline(trace, d) for d in range(trace.n_devices)]
    ours_reserved = sum(tl.at(tl.end_index, "reserved") for tl in timelines)
    ours_allocated = sum(tl.at(tl.end_index, "allocated") for tl in timelines)
    assert str(memviz.Bytes(ours_reserved)) == reserved
    assert n_segments == len(trace.segments.address)
    # segsum's calc_active counts active_allocated and active_pending_free blocks, as we do
    assert ours_allocated == active_blocks


@pytest.mark.parametrize("path", real_snapshot_params())
def test_peak_is_the_maximum_of_the_series_and_live_set_sums_to_it(path):
    trace = Trace.from_snapshot(load_snapshot(path), str(path))
    for d in range(trace.n_devices):
        tl = build_timeline(trace, d)
        live = tl.allocations.live_at(tl.peak_index)
        assert int(tl.allocations.size[live].sum()) == tl.peak_allocated
        assert tl.peak_allocated == max([tl.initial_allocated, *tl.allocated.tolist()])
        assert tl.at(tl.peak_index, "reserved") >= tl.peak_allocated
        frag = tl.fragmentation(tl.peak_index)
        assert frag["internal"] >= 0
