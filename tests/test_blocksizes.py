"""Exact block sizes from free-extent bookkeeping, checked against the full allocator model."""
from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import real_snapshot_params
from vramtrace.attribution.breakdown import build_report
from vramtrace.replay.agreement import rewound_state
from vramtrace.replay.allocator import AllocatorSettings, CachingAllocatorModel
from vramtrace.replay.blocksizes import StartLayout, exact_block_sizes, start_layout
from vramtrace.replay.timeline import build_timeline
from vramtrace.replay.whatif import what_if
from vramtrace.snapshot.load import load_snapshot
from vramtrace.trace import Action, Trace

MIB = 1 << 20
BASE = 0x7F00_0000_0000


@pytest.mark.parametrize("path", real_snapshot_params())
def test_peak_allocated_equals_the_full_model_on_real_files(path):
    trace = Trace.from_snapshot(load_snapshot(path), str(path))
    report = {d["device"]: d for d in build_report(trace)["devices"]}
    settings = AllocatorSettings.from_snapshot(trace.settings)
    for d in range(trace.n_devices):
        if not (trace.action[trace.device_slice(d)] == Action.ALLOC).any():
            continue
        assert _extents(start_layout(trace, d, settings)) == _rewound_extents(rewound_state(trace, d)[0])
        tl = build_timeline(trace, d)
        assert tl.peak_allocated == what_if(trace, settings, device=d).predicted_peak_allocated
        assert report[d]["estimated_block_sizes"] == 0


def _extents(layout: StartLayout) -> tuple[list, list, list]:
    return (layout.heads.tolist(), list(zip(layout.free_start.tolist(), layout.free_end.tolist())),
            list(zip(layout.live_addr.tolist(), layout.live_size.tolist())))


def _rewound_extents(segments: list[dict]) -> tuple[list, list, list]:
    """Segment heads, free extents and live blocks of snapshot-format segments."""
    blocks = [b for s in segments for b in s["blocks"]]
    return ([s["address"] for s in segments],
            [(b["address"], b["address"] + b["size"]) for b in blocks if b["state"] == "inactive"],
            [(b["address"], b["size"]) for b in blocks if b["state"] != "inactive"])


def test_matches_the_model_block_by_block_on_a_trace_starting_mid_run():
    """A model-made trace (small and large requests, unsplit remainders), cut like a ring
    buffer: every alloc's size must be the block the model gave it."""
    rng = random.Random(7)
    model = CachingAllocatorModel(AllocatorSettings())
    live: list[int] = []
    given: list[int] = []   # block size of each alloc, in trace order
    while len(model.trace) < 6000:
        if live and (rng.random() < 0.5 or len(live) > 60):
            model.free(live.pop(rng.randrange(len(live))))
        else:
            size = rng.randrange(1, MIB) if rng.random() < 0.4 else rng.randrange(MIB, 30 * MIB)
            live.append(model.malloc(size))
            given.append(model.block_size(live[-1]))
    snap = model.snapshot()
    events = snap["device_traces"][0]
    cut = 2000
    n_before = sum(e["action"] == "alloc" for e in events[:cut])
    snap["device_traces"][0] = events[cut:]
    trace = Trace.from_snapshot(snap)
    sizes = exact_block_sizes(trace, 0)
    got = sizes[trace.action == Action.ALLOC]
    assert got.tolist() == given[n_before:]
    assert any(g > -(-s // 512) * 512 for g, s in zip(got, trace.size[trace.action == Action.ALLOC]))
    assert build_timeline(trace, 0).peak_allocated == what_if(trace, AllocatorSettings()).predicted_peak_allocated


def _segment(address: int, total: int, blocks: list[tuple[int, int, str]], small: bool = False) -> dict:
    return {"device": 0, "address": address, "total_size": total, "stream": 0,
            "segment_type": "small" if small else "large", "is_expandable": False, "frames": [],
            "blocks": [{"address": a, "size": s, "requested_size": 0, "state": st, "frames": []}
                       for a, s, st in blocks]}


def _trace(segments: list[dict], events: list[tuple[str, int, int]], settings: dict | None = None) -> Trace:
    return Trace.from_snapshot({"segments": segments, "allocator_settings": settings or {}, "device_traces": [
        [{"action": a, "addr": x, "size": s, "stream": 0} for a, x, s in events]]})


def _alloc_free(addr: int, size: int) -> list[tuple[str, int, int]]:
    return [("alloc", addr, size), ("free_requested", addr, size), ("free_completed", addr, size)]


@pytest.mark.parametrize("request_mib, block_mib", [
    (19.5, 20),          # 0.5 MiB left: taken whole
    (19, 20),            # exactly 1 MiB left: still whole (the large pool splits only > 1 MiB)
    (18.75, 18.75),      # 1.25 MiB left: split
])
def test_large_pool_remainder_of_at_most_1_mib_is_taken_whole(request_mib, block_mib):
    request = int(request_mib * MIB)
    trace = _trace([_segment(BASE, 20 * MIB, [(BASE, 20 * MIB, "inactive")])],
                   [("segment_alloc", BASE, 20 * MIB), *_alloc_free(BASE, request)])
    sizes = exact_block_sizes(trace, 0)
    assert sizes.tolist() == [0, block_mib * MIB, 0, block_mib * MIB]
    tl = build_timeline(trace, 0)
    assert tl.peak_allocated == block_mib * MIB and tl.allocations.size_exact.all()


def test_request_at_or_above_max_split_size_is_never_split():
    """max_split_size 25 MiB: a 30 MiB request takes a cached 40 MiB segment whole (10 MiB left)."""
    trace = _trace([_segment(BASE, 40 * MIB, [(BASE, 40 * MIB, "inactive")])],
                   _alloc_free(BASE, 30 * MIB), {"max_split_size": 25 * MIB})
    assert exact_block_sizes(trace, 0).tolist() == [40 * MIB, 0, 40 * MIB]
    settings = AllocatorSettings.from_snapshot(trace.settings)
    assert build_timeline(trace, 0).peak_allocated == what_if(trace, settings).predicted_peak_allocated


def test_small_pool_remainder_below_512_b_is_taken_whole():
    """Real extents are multiples of 512 B, so a sub-512 B remainder needs a hand-made layout:
    a block alive throughout leaves 768 B free, and a 500 B request takes all of it."""
    tail = BASE + 2 * MIB - 768
    seg = _segment(BASE, 2 * MIB, [(BASE, 2 * MIB - 768, "active_allocated"), (tail, 768, "inactive")], small=True)
    assert exact_block_sizes(_trace([seg], _alloc_free(tail, 500)), 0).tolist() == [768, 0, 768]
    tail = BASE + 2 * MIB - 1024  # 512 B left: split
    seg = _segment(BASE, 2 * MIB, [(BASE, 2 * MIB - 1024, "active_allocated"), (tail, 1024, "inactive")], small=True)
    assert exact_block_sizes(_trace([seg], _alloc_free(tail, 500)), 0).tolist() == [512, 0, 512]


def test_free_merges_only_within_a_segment():
    """Two adjacent 20 MiB segments: freeing the first block must not merge across the
    boundary, so a later 19.5 MiB request there still gets 20 MiB, not 40."""
    second = BASE + 20 * MIB
    segs = [_segment(BASE, 20 * MIB, [(BASE, 20 * MIB, "inactive")]),
            _segment(second, 20 * MIB, [(second, 20 * MIB, "inactive")])]
    events = [("segment_alloc", BASE, 20 * MIB), ("segment_alloc", second, 20 * MIB),
              *_alloc_free(BASE, 19 * MIB + 1), *_alloc_free(BASE, 19 * MIB + 1)]
    sizes = exact_block_sizes(_trace(segs, events), 0)
    assert sizes[[2, 4, 5, 7]].tolist() == [20 * MIB] * 4


def test_block_alive_before_the_trace_takes_its_size_from_the_rewound_layout():
    trace = _trace([_segment(BASE, 20 * MIB, [(BASE, 20 * MIB, "inactive")])],
                   [("free_requested", BASE, int(19.5 * MIB)), ("free_completed", BASE, int(19.5 * MIB))])
    assert exact_block_sizes(trace, 0).tolist() == [0, 20 * MIB]
    tl = build_timeline(trace, 0)
    assert tl.initial_allocated == 20 * MIB and tl.allocations.size_exact.all()


def test_inconsistent_history_falls_back_to_estimates():
    """An alloc where the layout holds no free block (inside a live one): sizes are unknown
    from there on and the timeline estimates them, without failing."""
    seg = _segment(BASE, 20 * MIB, [(BASE, 4 * MIB, "active_allocated"), (BASE + 4 * MIB, 16 * MIB, "inactive")])
    trace = _trace([seg], [*_alloc_free(BASE + 4 * MIB, 15 * MIB + 1), *_alloc_free(BASE + MIB, 2 * MIB)])
    sizes = exact_block_sizes(trace, 0)
    assert sizes.tolist() == [16 * MIB, 0, 16 * MIB, 0, 0, 0]
    allocs = build_timeline(trace, 0).allocations
    by_addr = dict(zip(allocs.addr.tolist(), zip(allocs.size.tolist(), allocs.size_exact.tolist())))
    assert by_addr == {BASE: (4 * MIB, True), BASE + 4 * MIB: (16 * MIB, True), BASE + MIB: (2 * MIB, False)}


def test_small_pool_sizes_stay_exact_past_a_large_pool_inconsistency():
    """Only the large pool's extents are replayed: a small block is its rounded request
    whatever the layout, so an unexplained large alloc leaves the small sizes known."""
    small_base = BASE + 64 * MIB
    segs = [_segment(BASE, 20 * MIB, [(BASE, 4 * MIB, "active_allocated"), (BASE + 4 * MIB, 16 * MIB, "inactive")]),
            _segment(small_base, 2 * MIB, [(small_base, 2 * MIB, "inactive")], small=True)]
    trace = _trace(segs, [*_alloc_free(BASE + MIB, 2 * MIB), *_alloc_free(small_base, 1000)])
    assert exact_block_sizes(trace, 0).tolist() == [0, 0, 0, 1024, 0, 1024]


def test_expandable_segments_split_every_remainder():
    """With expandable segments every remainder of >= 512 B is split off: blocks are the
    rounded requests, whatever the layout (map/unmap events need no bookkeeping)."""
    seg = dict(_segment(BASE, 20 * MIB, [(BASE, 20 * MIB, "inactive")]), is_expandable=True)
    trace = _trace([seg], [("segment_map", BASE, 20 * MIB), *_alloc_free(BASE, int(19.5 * MIB))])
    assert exact_block_sizes(trace, 0).tolist() == [0, int(19.5 * MIB), 0, int(19.5 * MIB)]


def test_no_events():
    trace = _trace([], [])
    assert exact_block_sizes(trace, 0).tolist() == []
    assert np.array_equal(build_timeline(trace, 0).allocated, [])


def test_unreadable_settings_fall_back_to_estimates():
    trace = Trace.from_snapshot({
        "segments": [_segment(BASE, 20 * MIB, [(BASE, 20 * MIB, "inactive")])],
        "device_traces": [[{"action": "alloc", "addr": BASE, "size": 19 * MIB, "stream": 0}]],
        "allocator_settings": {"max_split_size": "lots"}})
    assert exact_block_sizes(trace, 0).tolist() == [0]
    assert build_timeline(trace, 0).allocations.size_exact.tolist() == [False]
