"""Exact block sizes of a device's allocations, without replaying the allocator.

A block is larger than its rounded request whenever the allocator took a free block whole
(large pool: remainder <= 1 MiB, or a request >= max_split_size). A full model replay knows
this but pays for a best-fit search per alloc (~18 s per million events). The trace already
tells where every alloc landed, so only free extents need tracking: the alloc at X takes the
free block starting at X, split or whole by the allocator's own `split_threshold`; a free
merges with free neighbours in its segment; segment_alloc/segment_free add/remove a whole
free block. The extents start from the layout rewound to the first event, as `whatif` and
the agreement check use it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vramtrace.replay.agreement import start_block_size
from vramtrace.replay.allocator import (
    K_MIN_BLOCK, K_SMALL_BUFFER, K_SMALL_SIZE, NEVER_SPLIT, AllocatorSettings, round_size, split_threshold)
from vramtrace.trace import Action, BlockState, Trace

_BLOCK_EVENTS = (Action.ALLOC, Action.FREE_REQUESTED, Action.FREE_COMPLETED)
_SEGMENT_EVENTS = (Action.SEGMENT_ALLOC, Action.SEGMENT_FREE)


def exact_block_sizes(trace: Trace, device: int) -> np.ndarray:
    """Block size per event of `device` (aligned with `trace.device_slice(device)`): on ALLOC
    the block the alloc got, on FREE_COMPLETED the block the free released (including blocks
    that existed before the trace), 0 elsewhere. Also 0 from the first event the rewound layout
    cannot explain on (no free block at an alloc's address, a free of an unknown block, a
    segment released while in use): past that point every extent would be a guess. Where only
    the large pool is replayed (see below) that holds for its blocks alone."""
    sl = trace.device_slice(device)
    action = trace.action[sl]
    sizes = np.zeros(len(action), np.int64)
    is_alloc = action == Action.ALLOC
    is_free = action == Action.FREE_COMPLETED
    blocks = np.flatnonzero(is_alloc | is_free)
    if not len(blocks):
        return sizes
    settings = _device_settings(trace, device, action)
    # the rules run once per distinct size (real programs repeat a few hundred sizes)
    requests, inverse = np.unique(trace.size[sl][blocks], return_inverse=True)
    rounded_list = [round_size(r, settings) for r in requests.tolist()] if settings else []
    if not rounded_list or max(rounded_list) >= NEVER_SPLIT:  # settings or sizes beyond sense
        return sizes
    rounded, r_inverse = np.unique(rounded_list, return_inverse=True)
    inverse = r_inverse[inverse]
    thresholds = np.array([split_threshold(r, r <= K_SMALL_SIZE, settings) for r in rounded.tolist()],
                          np.int64)
    steps = np.flatnonzero(is_alloc | is_free | np.isin(action, _SEGMENT_EVENTS))
    aligned = _aligned(trace, device, steps)
    if thresholds.max() <= K_MIN_BLOCK and aligned:
        # every non-empty remainder is split off and all extents are multiples of 512 B, so
        # each block is its rounded request whatever the layout (small pool only, or
        # expandable segments)
        sizes[blocks] = rounded[inverse]
        return sizes
    if settings.expandable_segments:  # mapped pages are not tracked
        return sizes
    layout = start_layout(trace, device, settings)
    if settings.large_segment_size != K_SMALL_BUFFER and aligned:
        # the small pool's blocks are their rounded requests (as above), and its segments
        # (K_SMALL_BUFFER each, a size no large segment has) never hold a large block: only
        # the large pool's extents need the replay, a fifth of the events of a typical file
        small_block = thresholds[inverse] <= K_MIN_BLOCK
        sizes[blocks[small_block]] = rounded[inverse[small_block]]
        blocks, inverse = blocks[~small_block], inverse[~small_block]
        is_segment = np.isin(action, _SEGMENT_EVENTS)
        small_segment = is_segment & (trace.size[sl] == K_SMALL_BUFFER)
        steps = np.union1d(blocks, np.flatnonzero(is_segment & ~small_segment))
        layout = layout.without_small_segments()

    in_steps = np.searchsorted(steps, blocks)
    value = trace.size[sl][steps]          # segment events: the segment's size
    value[in_steps] = rounded[inverse]     # allocs: the rounded request (frees: unused)
    split_from = np.zeros(len(steps), np.int64)
    split_from[in_steps] = (rounded + thresholds)[inverse]
    sizes[steps] = _replay_extents(layout, action[steps].tolist(), trace.addr[sl][steps].tolist(),
                                   value.tolist(), split_from.tolist())
    return sizes


def _aligned(trace: Trace, device: int, steps: np.ndarray) -> bool:
    """Whether the device's final blocks and segments and the trace's block addresses and
    segment sizes are all multiples of 512 B (always, for files a real allocator wrote)."""
    sl = trace.device_slice(device)
    segment_steps = steps[np.isin(trace.action[sl][steps], _SEGMENT_EVENTS)]
    segs, blks = trace.segments, trace.blocks
    on_device = segs.device == device
    in_device = on_device[blks.segment] if len(blks.segment) else np.zeros(0, bool)
    values = np.concatenate([trace.addr[sl][steps], trace.size[sl][segment_steps],
                             segs.address[on_device], segs.total_size[on_device],
                             blks.address[in_device], blks.size[in_device]])
    return not (values % K_MIN_BLOCK).any()


def _device_settings(trace: Trace, device: int, action: np.ndarray) -> AllocatorSettings | None:
    """The file's settings (None if unreadable); expandable segments also when only the
    segments or events show them (files older than the settings echo)."""
    try:
        settings = AllocatorSettings.from_snapshot(trace.settings or None)
    except (TypeError, ValueError, AttributeError):
        return None
    segs = trace.segments
    expandable = bool(segs.is_expandable[segs.device == device].any()) or bool(
        np.isin(action, (Action.SEGMENT_MAP, Action.SEGMENT_UNMAP)).any())
    if expandable and not settings.expandable_segments:
        settings = dataclasses.replace(settings, expandable_segments=True)
    return settings


@dataclasses.dataclass
class StartLayout:
    """A device's allocator extents just before its first event (what the replay starts from):
    `rewound_state`'s segments reduced to what placement reads, as arrays."""

    heads: np.ndarray        # segment start addresses, ascending
    free_start: np.ndarray   # free extents, segment by segment in address order
    free_end: np.ndarray
    live_addr: np.ndarray    # blocks allocated or pending free, ascending
    live_size: np.ndarray
    small: np.ndarray        # per segment: of the small pool

    def without_small_segments(self) -> "StartLayout":
        """The large pool's part of the layout."""
        large = ~self.small
        free_in = large[np.searchsorted(self.heads, self.free_start, side="right") - 1]
        live_in = large[np.searchsorted(self.heads, self.live_addr, side="right") - 1]
        return StartLayout(self.heads[large], self.free_start[free_in], self.free_end[free_in],
                           self.live_addr[live_in], self.live_size[live_in], self.small[large])


def start_layout(trace: Trace, device: int, settings: AllocatorSettings) -> StartLayout:
    """The layout `rewound_state(trace, device)` gives, computed with array operations.

    The rewind needs, per address, only its first and last block event and its first segment
    event; building snapshot dicts of every final segment and replaying the trace backwards
    in Python cost more than the rest of a report on files with few events."""
    sl = trace.device_slice(device)
    action, addr, size = trace.action[sl], trace.addr[sl], trace.size[sl]
    first, last = _first_and_last(addr, np.flatnonzero(np.isin(action, _BLOCK_EVENTS)))
    # a first event other than an alloc frees a block alive before the trace (its size is
    # derived from the request below); the final state holds the other blocks alive before
    # it: active at the end, yet neither freed first nor left live by the trace's last event
    freed_first = first[action[first] != Action.ALLOC]
    live_at_end = addr[last[action[last] != Action.FREE_COMPLETED]]
    segs, blks = trace.segments, trace.blocks
    final = (segs.device[blks.segment] == device) & (blks.state != BlockState.INACTIVE)
    final &= ~np.isin(blks.address, live_at_end) & ~np.isin(blks.address, addr[freed_first])
    block_addr = np.concatenate([addr[freed_first], blks.address[final]])
    block_size = np.concatenate([np.zeros(len(freed_first), np.int64), blks.size[final]])
    requested = np.concatenate([size[freed_first], blks.requested_size[final]])

    heads, seg_end, small = _start_segments(trace, device, action, addr, size)
    order = np.argsort(block_addr)
    block_addr, block_size, requested = block_addr[order], block_size[order], requested[order]
    seg = np.searchsorted(heads, block_addr, side="right") - 1
    inside = seg >= 0
    inside[inside] = block_addr[inside] < seg_end[seg[inside]]
    block_addr, block_size, requested, seg = block_addr[inside], block_size[inside], requested[inside], seg[inside]

    # each block reaches at most the next block of its segment, or the segment's end
    next_in_seg = np.zeros(len(seg), bool)
    next_in_seg[:-1] = seg[1:] == seg[:-1]
    room = np.where(next_in_seg, np.roll(block_addr, -1), seg_end[seg]) - block_addr
    unknown = np.flatnonzero(block_size == 0)
    block_size[unknown] = [start_block_size(r, m, s, settings) for r, m, s in zip(
        requested[unknown].tolist(), room[unknown].tolist(), small[seg[unknown]].tolist())]
    block_end = block_addr + np.minimum(block_size, room)

    # free extents: the gap before each block, and each segment's tail
    first_in_seg = np.ones(len(seg), bool)
    first_in_seg[1:] = ~next_in_seg[:-1]
    gap_start = np.where(first_in_seg, heads[seg], np.roll(block_end, 1))
    gap = block_addr > gap_start
    tail_start = heads.copy()
    tail_start[seg[~next_in_seg]] = block_end[~next_in_seg]
    tail = tail_start < seg_end
    free_seg = np.concatenate([seg[gap], np.flatnonzero(tail)])
    free_start = np.concatenate([gap_start[gap], tail_start[tail]])
    free_end = np.concatenate([block_addr[gap], seg_end[tail]])
    order = np.lexsort((free_start, free_seg))
    return StartLayout(heads, free_start[order], free_end[order], block_addr, block_end - block_addr, small)


def _first_and_last(addr: np.ndarray, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and the last of `events` (ascending indices) at each address they touch."""
    if not len(events):
        return events, events
    order = np.argsort(addr[events], kind="stable")
    sorted_addr = addr[events[order]]
    starts = np.flatnonzero(np.r_[True, sorted_addr[1:] != sorted_addr[:-1]])
    return events[order[starts]], events[order[np.r_[starts[1:], len(events)] - 1]]


def _start_segments(trace: Trace, device: int, action: np.ndarray, addr: np.ndarray,
                    size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start address, end and small-pool flag of the segments that existed before the first
    event, by start address: the final ones, except where an address's first segment event
    says otherwise (an alloc: not yet there; a free: there, at the freed size)."""
    segs = trace.segments
    on_device = segs.device == device
    first, _ = _first_and_last(addr, np.flatnonzero(np.isin(action, _SEGMENT_EVENTS)))
    freed = first[action[first] == Action.SEGMENT_FREE]
    kept = on_device & ~np.isin(segs.address, addr[first])
    heads = np.concatenate([segs.address[kept], addr[freed]])
    total = np.concatenate([segs.total_size[kept], size[freed]])
    small = np.concatenate([~segs.is_large[kept], size[freed] == K_SMALL_BUFFER])
    order = np.argsort(heads)
    return heads[order], heads[order] + total[order], small[order]


def _replay_extents(layout: StartLayout, action: list[int], addr: list[int], value: list[int],
                    split_from: list[int]) -> list[int]:
    """The per-event loop (kept tight: ~1 µs/event). `value` is the rounded request of an
    alloc or the size of a segment event; an alloc splits free blocks of `split_from` bytes
    or more. Returns block sizes, 0 from the first inconsistency on."""
    starts, ends = layout.free_start.tolist(), layout.free_end.tolist()
    free_at = dict(zip(starts, ends))       # free block start -> end
    free_end = dict(zip(ends, starts))      # free block end -> start
    live = dict(zip(layout.live_addr.tolist(), layout.live_size.tolist()))  # allocated or pending-free block start -> size
    heads = set(layout.heads.tolist())      # segment starts: no merging across them
    ALLOC, FREE, SEG_ALLOC = int(Action.ALLOC), int(Action.FREE_COMPLETED), int(Action.SEGMENT_ALLOC)
    out = [0] * len(action)
    for k, (act, x, v, split) in enumerate(zip(action, addr, value, split_from)):
        if act == ALLOC:
            end = free_at.pop(x, None)
            if end is None or end - x < v:
                break
            if end - x >= split:
                free_at[x + v] = end
                free_end[end] = x + v
            else:
                del free_end[end]
                v = end - x
            live[x] = out[k] = v
        elif act == FREE:
            v = live.pop(x, None)
            if v is None:
                break
            out[k] = v
            start, end = x, x + v
            if x not in heads and x in free_end:
                start = free_end.pop(x)
                del free_at[start]
            if end not in heads and end in free_at:
                end = free_at.pop(end)
                del free_end[end]
            free_at[start] = end
            free_end[end] = start
        elif act == SEG_ALLOC:
            if x in heads or x in free_at:
                break
            heads.add(x)
            free_at[x] = x + v
            free_end[x + v] = x
        else:  # SEGMENT_FREE: only a whole, free segment goes back
            if x not in heads or free_at.get(x) != x + v:
                break
            heads.discard(x)
            del free_at[x], free_end[x + v]
    return out
