"""Replay a device's trace into allocation lifetimes and byte counts over time.

The ring buffer often starts mid-run, so the state before the first event is recovered by
rewinding the final segment state: blocks freed in the trace without an alloc, and blocks
alive at the end without an alloc, existed before the first event.

Allocated bytes count whole blocks, at the size the allocator gave them (`exact_block_sizes`:
a block taken whole is larger than the rounded request); requested bytes count what callers
asked for; reserved bytes count segments. Values are "after event i" for i in 0..n-1 and a column
``-1`` (before the first event) is kept as ``initial_*``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vramtrace.replay.blocksizes import exact_block_sizes
from vramtrace.trace import Action, BlockState, Trace

NEVER = np.iinfo(np.int64).max
MIN_BLOCK = 512


@dataclass
class Allocations:
    """One row per allocation seen on a device (including ones made before the trace began).

    ``alloc_index`` is -1 for blocks that existed before the first event; ``free_index`` is
    ``n_events`` for blocks still alive at the end. Indices are local to the device's events.
    """

    alloc_index: np.ndarray
    free_index: np.ndarray
    addr: np.ndarray
    size: np.ndarray          # block bytes (what the allocator gave, >= the rounded request)
    requested: np.ndarray     # bytes the caller asked for
    stream: np.ndarray
    stack: np.ndarray         # raw stack id of the allocation (or of the final block), -1 unknown
    tag: np.ndarray           # tag id, -1 untagged
    size_exact: np.ndarray    # False where the block size is estimated (request rounded to 512 B)

    def __len__(self) -> int:
        return len(self.addr)

    def live_at(self, index: int) -> np.ndarray:
        """Row indices of allocations alive just after event ``index`` (-1: before any)."""
        return np.flatnonzero((self.alloc_index <= index) & (self.free_index > index))


def round_size(size: np.ndarray | int) -> np.ndarray:
    """The allocator's default rounding (DESIGN §5): at least 512 B, a multiple of 512."""
    size = np.asarray(size, dtype=np.int64)
    return np.maximum(MIN_BLOCK, (size + MIN_BLOCK - 1) // MIN_BLOCK * MIN_BLOCK)


@dataclass
class DeviceTimeline:
    device: int
    events: slice                   # the device's range in the Trace's event columns
    allocations: Allocations
    allocated: np.ndarray           # bytes after each event
    requested: np.ndarray
    reserved: np.ndarray
    initial_allocated: int
    initial_requested: int
    initial_reserved: int
    time_us: np.ndarray

    @property
    def n_events(self) -> int:
        return len(self.allocated)

    @cached_property
    def peak_index(self) -> int:
        """Event after which allocated bytes peak (-1: the state before the trace)."""
        if not self.n_events:
            return -1
        i = int(np.argmax(self.allocated))
        return i if self.allocated[i] > self.initial_allocated else -1

    def at(self, index: int, series: str) -> int:
        values = getattr(self, series)
        return int(values[index]) if index >= 0 else int(getattr(self, f"initial_{series}"))

    @property
    def peak_allocated(self) -> int:
        return self.at(self.peak_index, "allocated")

    @property
    def peak_reserved(self) -> int:
        return int(max(self.reserved.max(initial=0), self.initial_reserved))

    @property
    def peak_reserved_index(self) -> int:
        if not self.n_events or self.reserved.max() <= self.initial_reserved:
            return -1
        return int(np.argmax(self.reserved))

    @property
    def end_index(self) -> int:
        return self.n_events - 1

    def resolve_point(self, point: str | int) -> int:
        """'peak', 'end' or an event index (negative counts from the end) -> event index."""
        if point == "peak":
            return self.peak_index
        if point == "end":
            return self.end_index
        index = int(point)
        if index < 0:
            index += self.n_events
        if not -1 <= index < self.n_events:
            raise ValueError(f"event index {point} out of range (device {self.device} has "
                             f"{self.n_events} events)")
        return index

    def time_at(self, index: int) -> int | None:
        if index < 0 or not len(self.time_us) or self.time_us[index] < 0:
            return None
        return int(self.time_us[index])

    def fragmentation(self, index: int) -> dict[str, int]:
        """Internal (rounding inside blocks) and external (cached, unallocated) free bytes."""
        allocated = self.at(index, "allocated")
        return {"internal": allocated - self.at(index, "requested"),
                "external": self.at(index, "reserved") - allocated}


def build_timelines(trace: Trace) -> list[DeviceTimeline]:
    return [build_timeline(trace, d) for d in range(trace.n_devices)]


def build_timeline(trace: Trace, device: int) -> DeviceTimeline:
    sl = trace.device_slice(device)
    action = trace.action[sl]
    n = len(action)
    allocs = _allocations(trace, device, sl)

    alloc_rows = allocs.alloc_index >= 0
    free_rows = allocs.free_index < n
    d_alloc = np.zeros(n, np.int64)
    d_req = np.zeros(n, np.int64)
    np.add.at(d_alloc, allocs.alloc_index[alloc_rows], allocs.size[alloc_rows])
    np.add.at(d_req, allocs.alloc_index[alloc_rows], allocs.requested[alloc_rows])
    np.add.at(d_alloc, allocs.free_index[free_rows], -allocs.size[free_rows])
    np.add.at(d_req, allocs.free_index[free_rows], -allocs.requested[free_rows])
    pre = ~alloc_rows
    initial_allocated = int(allocs.size[pre].sum())
    initial_requested = int(allocs.requested[pre].sum())

    size = trace.size[sl]
    grow = np.isin(action, (Action.SEGMENT_ALLOC, Action.SEGMENT_MAP))
    shrink = np.isin(action, (Action.SEGMENT_FREE, Action.SEGMENT_UNMAP))
    d_res = np.where(grow, size, 0) - np.where(shrink, size, 0)
    seg_rows = trace.segments.device == device
    final_reserved = int(trace.segments.total_size[seg_rows].sum())
    initial_reserved = final_reserved - int(d_res.sum())

    return DeviceTimeline(
        device=device, events=sl, allocations=allocs,
        allocated=initial_allocated + np.cumsum(d_alloc),
        requested=initial_requested + np.cumsum(d_req),
        reserved=initial_reserved + np.cumsum(d_res),
        initial_allocated=initial_allocated, initial_requested=initial_requested,
        initial_reserved=initial_reserved, time_us=trace.time_us[sl])


def _allocations(trace: Trace, device: int, sl: slice) -> Allocations:
    """Pair each alloc with the free_completed of the same address that follows it."""
    action = trace.action[sl]
    n = len(action)
    ev = np.flatnonzero((action == Action.ALLOC) | (action == Action.FREE_COMPLETED))
    addr = trace.addr[sl][ev]
    order = np.lexsort((ev, addr))
    ev, addr = ev[order], addr[order]
    is_alloc = action[ev] == Action.ALLOC
    same_next = np.zeros(len(ev), bool)
    same_next[:-1] = addr[:-1] == addr[1:]
    same_prev = np.zeros(len(ev), bool)
    same_prev[1:] = same_next[:-1]
    next_is_alloc = np.zeros(len(ev), bool)
    next_is_alloc[:-1] = is_alloc[1:]
    prev_is_alloc = np.zeros(len(ev), bool)
    prev_is_alloc[1:] = is_alloc[:-1]

    # an alloc ends at the next event on its address (its free, or a reuse if a free is missing)
    a_pos = np.flatnonzero(is_alloc)
    a_end = np.where(same_next[a_pos], ev[np.minimum(a_pos + 1, len(ev) - 1)], n)
    # a free with no alloc just before it frees a block that existed before the trace
    f_pos = np.flatnonzero(~is_alloc & ~(same_prev & prev_is_alloc))

    ev_size = trace.size[sl]
    ev_stream = trace.stream[sl]
    ev_stack = trace.stack[sl]
    ev_tag = trace.tag[sl]
    a_idx, f_idx = ev[a_pos], ev[f_pos]

    final = _final_blocks(trace, device)
    alive = np.flatnonzero(a_end == n)
    # blocks alive at the end that no alloc event in the trace produced
    pre = np.flatnonzero(~np.isin(final["address"], addr[a_pos][alive]))

    # block sizes from the free-extent bookkeeping; 0 (unknown) past an inconsistent history
    block_size = exact_block_sizes(trace, device)
    a_requested = ev_size[a_idx]
    a_size, a_exact = _sized(block_size[a_idx], a_requested)
    # blocks alive at the end: the final state gives their exact size
    in_final, final_size = _final_size_at(final, addr[a_pos][alive])
    a_size[alive[in_final]] = final_size
    a_exact[alive[in_final]] = True

    f_requested = ev_size[f_idx]
    f_size, f_exact = _sized(block_size[f_idx], f_requested)
    allocs = Allocations(
        alloc_index=np.concatenate([a_idx, np.full(len(f_idx) + len(pre), -1)]),
        free_index=np.concatenate([a_end, f_idx, np.full(len(pre), n)]),
        addr=np.concatenate([addr[a_pos], addr[f_pos], final["address"][pre]]),
        size=np.concatenate([a_size, f_size, final["size"][pre]]),
        requested=np.concatenate([a_requested, f_requested, final["requested"][pre]]),
        stream=np.concatenate([ev_stream[a_idx], ev_stream[f_idx], final["stream"][pre]]),
        stack=np.concatenate([ev_stack[a_idx], np.full(len(f_idx), -1, np.int32), final["stack"][pre]]),
        tag=np.concatenate([ev_tag[a_idx], ev_tag[f_idx], np.full(len(pre), -1, np.int32)]),
        size_exact=np.concatenate([a_exact, f_exact, np.ones(len(pre), bool)]),
    )
    _apply_annotations(trace, sl, allocs)
    return allocs


def _sized(exact: np.ndarray, requested: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block sizes where known (> 0), else the rounded request; and which are known."""
    known = exact > 0
    return np.where(known, exact, round_size(requested)), known


def _final_size_at(final: dict[str, np.ndarray], addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of `addrs` hold a final block, and those blocks' sizes (of the last one listed,
    should a file list an address twice)."""
    order = np.argsort(final["address"], kind="stable")
    sorted_addr = final["address"][order]
    at = np.searchsorted(sorted_addr, addrs, side="right") - 1
    found = at >= 0
    found[found] = sorted_addr[at[found]] == addrs[found]
    return found, final["size"][order[at[found]]]


def _final_blocks(trace: Trace, device: int) -> dict[str, np.ndarray]:
    blocks, segs = trace.blocks, trace.segments
    on_device = segs.device[blocks.segment] == device if len(blocks.segment) else np.zeros(0, bool)
    rows = on_device & (blocks.state != BlockState.INACTIVE)
    return {"address": blocks.address[rows], "size": blocks.size[rows],
            "requested": blocks.requested_size[rows], "stack": blocks.stack[rows],
            "stream": segs.stream[blocks.segment[rows]]}


def _apply_annotations(trace: Trace, sl: slice, allocs: Allocations) -> None:
    """2.14 ``annotate`` events re-tag the live allocation at their address."""
    action = trace.action[sl]
    for i in np.flatnonzero(action == Action.ANNOTATE):
        live = allocs.live_at(int(i))
        hit = live[allocs.addr[live] == trace.addr[sl][i]]
        if len(hit) and trace.tag[sl][i] >= 0:
            allocs.tag[hit] = trace.tag[sl][i]
