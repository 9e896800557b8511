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

from vramtrace.replay.agreement import rewound_state
from vramtrace.replay.allocator import (
    K_MIN_BLOCK, K_SMALL_SIZE, NEVER_SPLIT, AllocatorSettings, round_size, split_threshold)
from vramtrace.trace import Action, Trace

_BLOCK_EVENTS = (Action.ALLOC, Action.FREE_REQUESTED, Action.FREE_COMPLETED)
_SEGMENT_EVENTS = (Action.SEGMENT_ALLOC, Action.SEGMENT_FREE)


def exact_block_sizes(trace: Trace, device: int) -> np.ndarray:
    """Block size per event of `device` (aligned with `trace.device_slice(device)`): on ALLOC
    the block the alloc got, on FREE_COMPLETED the block the free released (including blocks
    that existed before the trace), 0 elsewhere. Also 0 from the first event the rewound layout
    cannot explain on (no free block at an alloc's address, a free of an unknown block, a
    segment released while in use): past that point every extent would be a guess."""
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
    if thresholds.max() <= K_MIN_BLOCK and _aligned(trace, device, steps):
        # every non-empty remainder is split off and all extents are multiples of 512 B, so
        # each block is its rounded request whatever the layout (small pool only, or
        # expandable segments)
        sizes[blocks] = rounded[inverse]
        return sizes
    if settings.expandable_segments:  # mapped pages are not tracked
        return sizes

    in_steps = np.searchsorted(steps, blocks)
    value = trace.size[sl][steps]          # segment events: the segment's size
    value[in_steps] = rounded[inverse]     # allocs: the rounded request (frees: unused)
    split_from = np.zeros(len(steps), np.int64)
    split_from[in_steps] = (rounded + thresholds)[inverse]
    sizes[steps] = _replay_extents(rewound_layout(trace, device), action[steps].tolist(),
                                   trace.addr[sl][steps].tolist(), value.tolist(), split_from.tolist())
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


def rewound_layout(trace: Trace, device: int) -> list[dict]:
    """`rewound_state(trace, device)`'s segments, 25-45x faster on 1M-event traces.

    The rewind reads, per address, only whether its first alloc/free event is a free (a block
    alive before the trace) and whether its last one leaves a block live (the final state owns
    it), plus every segment event; so it is run on a trace holding just those events, for just
    the addresses where one of the two holds."""
    sl = trace.device_slice(device)
    action = trace.action[sl]
    rel = np.flatnonzero(np.isin(action, _BLOCK_EVENTS))
    order = np.argsort(trace.addr[sl][rel], kind="stable")
    addr = trace.addr[sl][rel][order]
    starts = np.flatnonzero(np.r_[True, addr[1:] != addr[:-1]])
    first = rel[order[starts]]
    last = rel[order[np.r_[starts[1:], len(addr)] - 1]]
    matters = (action[first] != Action.ALLOC) | (action[last] != Action.FREE_COMPLETED)
    keep = np.union1d(np.union1d(first[matters], last[matters]),
                      np.flatnonzero(np.isin(action, _SEGMENT_EVENTS))) + sl.start
    reduced = dataclasses.replace(
        trace, action=trace.action[keep], addr=trace.addr[keep], size=trace.size[keep],
        stream=trace.stream[keep], time_us=trace.time_us[keep], device=trace.device[keep],
        stack=trace.stack[keep], tag=trace.tag[keep])
    return rewound_state(reduced, device)[0]


def _replay_extents(layout: list[dict], action: list[int], addr: list[int], value: list[int],
                    split_from: list[int]) -> list[int]:
    """The per-event loop (kept tight: ~1 µs/event). `value` is the rounded request of an
    alloc or the size of a segment event; an alloc splits free blocks of `split_from` bytes
    or more. Returns block sizes, 0 from the first inconsistency on."""
    free_at: dict[int, int] = {}    # free block start -> end
    free_end: dict[int, int] = {}   # free block end -> start
    live: dict[int, int] = {}       # allocated or pending-free block start -> size
    heads: set[int] = set()         # segment starts: no merging across them
    for seg in layout:
        heads.add(seg["address"])
        for b in seg["blocks"]:
            a, s = b["address"], b["size"]
            if b["state"] == "inactive":
                free_at[a] = a + s
                free_end[a + s] = a
            else:
                live[a] = s
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
