"""Does the allocator model reproduce a real GPU's allocator? (agreement check)

The real snapshot holds the *final* segments and blocks plus a trace that may start
mid-run (ring buffer). We rewind the final state to the moment of the trace's first
event, seed the model with it, replay every alloc/free in order on the real streams
(new segments take the address of the real `segment_alloc`, recorded `segment_free`s
are replayed as releases) and count how many allocations land on the real address and
whether the final segments/blocks come out identical.

Rewinding, and what cannot be known:
- segments: the final set, minus those the trace's `segment_alloc`s created, plus those
  its `segment_free`s released (pool from size: only small segments are 2 MiB);
- blocks alive before the first event: frees without an alloc in the trace (a lone
  `free_completed` = a free already requested, pending on another stream), and final
  active blocks never allocated in the trace. Their block size is the rounded request,
  widened by a trailing gap that only an unsplit block could leave (<= 1 MiB in the
  large pool); the rest of each segment is one free block per gap;
- a free block's stale `requested_size` from before the trace is unknowable; it is
  carried symbolically and read back from the real final block where it survives.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from vramtrace.trace import ACTION_NAMES, BlockState, Trace
from vramtrace.replay.allocator import (
    K_SMALL_BUFFER, K_SMALL_SIZE, AllocatorOOM, AllocatorSettings, CachingAllocatorModel, round_size)

_STATES = {int(s): s.name.lower() for s in BlockState}


@dataclass(frozen=True)
class Mismatch:
    """The first place the model parts from the real allocator."""

    event_index: int  # index into the device's trace; -1 = the final state
    expected: str
    got: str
    reason: str


@dataclass
class DeviceAgreement:
    """Agreement of the model with one device's recorded allocator."""

    device: int
    n_events: int
    n_allocs: int = 0
    n_same_address: int = 0
    final_state_exact: bool | None = None  # None: nothing to compare (no trace)
    first_mismatch: Mismatch | None = None
    reason: str = ""  # names the rule when agreement is not complete
    n_blocks_before_trace: int = 0
    n_segments_before_trace: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def pct_same_address(self) -> float:
        return 100.0 * self.n_same_address / self.n_allocs if self.n_allocs else 100.0

    @property
    def complete(self) -> bool:
        """100 % same address and an identical final state."""
        return self.n_allocs > 0 and self.n_same_address == self.n_allocs and bool(self.final_state_exact)


@dataclass(frozen=True)
class _Ev:
    action: str
    addr: int  # 0 where the file has none
    size: int
    stream: int


def check_agreement(trace: Trace) -> list[DeviceAgreement]:
    """Agreement of the allocator model with every device of a loaded snapshot."""
    settings = AllocatorSettings.from_snapshot(trace.settings or None)
    final = final_segments(trace)
    return [_check_device(d, _device_events(trace, d), [s for s in final if s["device"] == d], settings)
            for d in range(trace.n_devices)]


def rewound_state(trace: Trace, device: int = 0) -> tuple[list[dict], list[str]]:
    """Segments (snapshot format) as they were just before `device`'s first trace event,
    and the inconsistencies met on the way. Stale `requested_size`s of free blocks, unknowable
    from before the trace, are negative placeholders."""
    settings = AllocatorSettings.from_snapshot(trace.settings or None)
    final = [s for s in final_segments(trace) if s["device"] == device]
    return _rewind(_device_events(trace, device), final, settings)


def _device_events(trace: Trace, device: int) -> list[_Ev]:
    sl = trace.device_slice(device)
    return [_Ev(ACTION_NAMES[a], ad, sz, st) for a, ad, sz, st in zip(
        trace.action[sl].tolist(), trace.addr[sl].tolist(), trace.size[sl].tolist(),
        trace.stream[sl].tolist())]


def final_segments(trace: Trace) -> list[dict]:
    """The Trace's final segments/blocks in snapshot-dict form (the fields placement decides)."""
    segs, blks = trace.segments, trace.blocks
    out = []
    for i in range(len(segs.address)):
        first, n = int(segs.first_block[i]), int(segs.n_blocks[i])
        blocks = [{"address": int(blks.address[j]), "size": int(blks.size[j]),
                   "requested_size": int(blks.requested_size[j]), "state": _STATES[int(blks.state[j])],
                   "frames": []}
                  for j in range(first, first + n)]
        out.append({"device": int(segs.device[i]), "address": int(segs.address[i]),
                    "total_size": int(segs.total_size[i]), "stream": int(segs.stream[i]),
                    "segment_type": "large" if segs.is_large[i] else "small",
                    "is_expandable": bool(segs.is_expandable[i]), "frames": [], "blocks": blocks})
    return out


# ---------------------------------------------------------------------------------------
def _check_device(device: int, evs: list[_Ev], final: list[dict],
                  settings: AllocatorSettings) -> DeviceAgreement:
    res = DeviceAgreement(device=device, n_events=len(evs))
    allocs = [e for e in evs if e.action == "alloc"]
    res.n_allocs = len(allocs)
    if not any(e.action in ("alloc", "free_requested", "free_completed") for e in evs):
        res.reason = "no allocation history (state-only snapshot)"
        return res
    if any(not e.addr for e in evs if e.action in ("alloc", "free_requested", "free_completed")):
        res.reason = "trace without addresses (torch 2.0 era): placement cannot be compared"
        return res
    if any(s.get("is_expandable") for s in final) or any(
            e.action in ("segment_map", "segment_unmap") for e in evs):
        res.reason = "expandable segments: rewinding mapped pages is not modeled"
        return res

    start, problems = _rewind(evs, final, settings)
    res.notes.extend(problems)
    res.n_segments_before_trace = len(start)
    res.n_blocks_before_trace = sum(b["state"] != "inactive" for s in start for b in s["blocks"])
    _replay(res, evs, start, final, settings)
    if not res.complete and not res.reason:
        res.reason = _explain(res, evs)
    return res


# ---------------------------------------------------------------------------------------
def _rewind(evs: list[_Ev], final: list[dict], settings: AllocatorSettings) -> tuple[list[dict], list[str]]:
    """Segments and blocks as they were just before the first event."""
    problems: list[str] = []
    segs: dict[int, dict] = {s["address"]: {"address": s["address"], "total_size": s["total_size"],
                                            "stream": s.get("stream", 0),
                                            "segment_type": s.get("segment_type") or (
                                                "small" if s["total_size"] == K_SMALL_BUFFER else "large"),
                                            "frames": s.get("frames", [])}
                             for s in final}
    for i in range(len(evs) - 1, -1, -1):
        e = evs[i]
        if e.action == "segment_alloc":
            if segs.pop(e.addr, None) is None:
                problems.append(f"event {i}: segment_alloc of {e.addr:#x} absent from the later state")
        elif e.action == "segment_free":
            segs[e.addr] = {"address": e.addr, "total_size": e.size, "stream": e.stream,
                            "segment_type": "small" if e.size == K_SMALL_BUFFER else "large", "frames": []}

    # blocks alive before the first event
    live: dict[int, bool] = {}   # addr -> True while allocated, False once its free was requested
    pre: dict[int, dict] = {}    # addr -> block alive at the start
    for i, e in enumerate(evs):
        if e.action == "alloc":
            if e.addr in live:
                problems.append(f"event {i}: alloc at {e.addr:#x} while a block is live there")
            live[e.addr] = True
        elif e.action == "free_requested":
            if e.addr not in live:
                _discover(pre, problems, i, e, "active_allocated")
            live[e.addr] = False
        elif e.action == "free_completed":
            if e.addr in live:
                del live[e.addr]
            else:
                _discover(pre, problems, i, e, "active_pending_free")
    final_active = {b["address"]: (s, b) for s in final for b in s["blocks"] if b["state"] != "inactive"}
    for a in live:
        if a not in final_active:
            problems.append(f"block {a:#x} allocated in the trace and never freed is missing from the final state")
    for a, (s, b) in final_active.items():
        if a not in live:
            if a in pre:
                problems.append(f"final block {a:#x} was freed in the trace but never re-allocated")
                continue
            pre[a] = {"address": a, "requested_size": b.get("requested_size", 0), "stream": s.get("stream", 0),
                      "state": b["state"], "size": b["size"], "frames": b.get("frames", [])}

    start = []
    sentinel = -1
    seg_list = sorted(segs.values(), key=lambda s: s["address"])
    starts = [s["address"] for s in seg_list]
    by_seg: dict[int, list[dict]] = {s["address"]: [] for s in seg_list}
    for a, b in sorted(pre.items()):
        k = bisect.bisect_right(starts, a) - 1
        if k < 0 or a >= seg_list[k]["address"] + seg_list[k]["total_size"]:
            problems.append(f"block {a:#x} alive before the trace lies outside every segment")
            continue
        by_seg[seg_list[k]["address"]].append(b)
    for s in seg_list:
        small = s["segment_type"] == "small"
        end = s["address"] + s["total_size"]
        lives = by_seg[s["address"]]
        blocks = []
        cur = s["address"]
        for j, b in enumerate(lives):
            nxt = lives[j + 1]["address"] if j + 1 < len(lives) else end
            if b["address"] > cur:
                blocks.append({"address": cur, "size": b["address"] - cur, "requested_size": sentinel,
                               "state": "inactive", "frames": []})
                sentinel -= 1
            size = b.get("size") or start_block_size(b["requested_size"], nxt - b["address"], small, settings)
            if b["address"] + size > nxt:
                problems.append(f"block {b['address']:#x} alive before the trace overlaps its neighbour")
                size = nxt - b["address"]
            blocks.append({"address": b["address"], "size": size, "requested_size": b["requested_size"],
                           "state": b["state"], "frames": b.get("frames", [])})
            cur = b["address"] + size
        if cur < end:
            blocks.append({"address": cur, "size": end - cur, "requested_size": sentinel,
                           "state": "inactive", "frames": []})
            sentinel -= 1
        start.append(dict(s, blocks=blocks))
    return start, problems


def _discover(pre: dict[int, dict], problems: list[str], i: int, e: _Ev, state: str) -> None:
    """A free of a block the trace never allocated: it was alive before the first event."""
    if e.addr in pre:
        problems.append(f"event {i}: second free of {e.addr:#x} without an alloc in between")
        return
    pre[e.addr] = {"address": e.addr, "requested_size": e.size, "stream": e.stream, "state": state}


def start_block_size(requested: int, room: int, small: bool, settings: AllocatorSettings) -> int:
    """Size of a block alive before the trace: rounded request, plus the trailing gap when
    that gap is too small to be a block of its own (the allocator did not split)."""
    size = round_size(requested, settings)
    if small or size > room:
        return size
    gap = room - size
    limit = settings.split_limit
    if gap <= K_SMALL_SIZE or (size >= limit and gap < settings.max_non_split_rounding):
        return room
    return size


# ---------------------------------------------------------------------------------------
def _replay(res: DeviceAgreement, evs: list[_Ev], start: list[dict], final: list[dict],
            settings: AllocatorSettings) -> None:
    pending_segs: list[_Ev] = []
    state = {"i": 0}

    def mismatch(i: int, expected: str, got: str, reason: str) -> None:
        if res.first_mismatch is None:
            res.first_mismatch = Mismatch(i, expected, got, reason)

    synthetic = [1 << 60]

    def seg_addr(size: int, stream: int, small: bool) -> int:
        if pending_segs:
            e = pending_segs.pop(0)
            if e.size == size:
                return e.addr
            mismatch(state["i"], f"segment_alloc {e.size} B", f"segment_alloc {size} B",
                     "new segment size differs")
        else:
            mismatch(state["i"], "a cached block reused", f"new {size} B segment",
                     "model needed a new segment where the real allocator reused a cached block")
        synthetic[0] += 1 << 34
        return synthetic[0]

    model = CachingAllocatorModel(settings, device=res.device, segment_address=seg_addr, record=False)
    model.load_segments(start)
    try:
        _replay_events(res, evs, model, settings, pending_segs, state, mismatch)
    except AllocatorOOM as ex:  # only with a forced capacity; keeps the report usable
        mismatch(state["i"], "an allocation", str(ex), "model ran out of memory")
    _compare_final(res, model, final)


def _replay_events(res: DeviceAgreement, evs: list[_Ev], model: CachingAllocatorModel,
                   settings: AllocatorSettings, pending_segs: list[_Ev], state: dict,
                   mismatch: Callable[[int, str, str, str], None]) -> None:
    amap: dict[int, int] = {}
    skip = -1
    n = len(evs)
    for i, e in enumerate(evs):
        if i == skip:
            continue
        state["i"] = i
        a = e.action
        if a == "segment_alloc":
            pending_segs.append(e)
        elif a == "alloc":
            got = model.malloc(e.size, e.stream)
            if pending_segs:
                mismatch(i, f"new segment at {pending_segs[0].addr:#x}", f"cached block {got:#x}",
                         "real allocator cudaMalloc'd a new segment where the model reused a cached block")
                pending_segs.clear()
            amap[e.addr] = got
            if got == e.addr:
                res.n_same_address += 1
            else:
                mismatch(i, f"alloc {e.size} B at {e.addr:#x}", f"at {got:#x}", "best-fit placement differs")
        elif a == "free_requested":
            ma = amap.pop(e.addr, e.addr)
            complete = i + 1 < n and evs[i + 1].action == "free_completed" and evs[i + 1].addr == e.addr
            try:
                model.free(ma, deferred=not complete)
            except (KeyError, ValueError):
                mismatch(i, f"free of {e.addr:#x}", "no such live block in the model",
                         "free of a block the rewound state does not hold")
                continue
            if not complete:
                amap[e.addr] = ma
            else:
                skip = i + 1
        elif a == "free_completed":
            ma = amap.pop(e.addr, e.addr)
            try:
                model.complete_free(ma)
            except (KeyError, ValueError):
                mismatch(i, f"free_completed of {e.addr:#x}", "no pending free in the model",
                         "completed free of a block the rewound state does not hold")
        elif a == "segment_free":
            if i == 0 or evs[i - 1].action != "segment_free":
                burst = []
                j = i
                while j < n and evs[j].action in ("segment_free", "free_completed"):
                    if evs[j].action == "segment_free":
                        burst.append(evs[j].addr)
                    j += 1
                if settings.max_split_size is None and settings.garbage_collection_threshold == 0.0:
                    want = set(model.releasable_segments())
                    if want != set(burst):
                        mismatch(i, f"release of {len(burst)} cached segments",
                                 f"{len(want)} releasable in the model",
                                 "cached segments released by empty_cache/OOM retry differ")
            try:
                model.release_segment(e.addr)
            except ValueError:
                mismatch(i, f"segment_free {e.addr:#x}", "not an unsplit cached segment in the model",
                         "released segment is not free in the model")


def _compare_final(res: DeviceAgreement, model: CachingAllocatorModel, final: list[dict]) -> None:
    got = model.segments()
    real_blocks = {(b["address"], b["size"]): b.get("requested_size", 0)
                   for s in final for b in s["blocks"]}
    bound: dict[int, int] = {}
    for s in got:
        for b in s["blocks"]:
            r = b["requested_size"]
            if r < 0:
                real = real_blocks.get((b["address"], b["size"]))
                if real is not None and bound.setdefault(r, real) == real:
                    b["requested_size"] = real

    def key(segs: Iterable[dict]) -> list[tuple]:
        return [(s["address"], s["total_size"], s.get("stream", 0), s.get("segment_type"),
                 tuple((b["address"], b["size"], b["state"], b.get("requested_size", 0)) for b in s["blocks"]))
                for s in sorted(segs, key=lambda s: s["address"])]

    kg, kr = key(got), key(final)
    res.final_state_exact = kg == kr
    if not res.final_state_exact and res.first_mismatch is None:
        diff = _first_diff(kr, kg)
        res.first_mismatch = Mismatch(-1, diff[0], diff[1], "final segments/blocks differ")


def _first_diff(real: Sequence[tuple], got: Sequence[tuple]) -> tuple[str, str]:
    for r, g in zip(real, got):
        if r != g:
            if r[:4] != g[:4]:
                return f"segment {r[:4]}", f"segment {g[:4]}"
            for br, bg in zip(r[4], g[4]):
                if br != bg:
                    return f"block {br}", f"block {bg}"
            return f"{len(r[4])} blocks in segment {r[0]:#x}", f"{len(g[4])} blocks"
    return f"{len(real)} segments", f"{len(got)} segments"


def _explain(res: DeviceAgreement, evs: list[_Ev]) -> str:
    """Name the rule that keeps agreement below 100 %."""
    streams = {e.stream for e in evs if e.action == "alloc"}
    deferred = any(e.action == "free_requested" and (i + 1 >= len(evs) or evs[i + 1].action != "free_completed"
                                                     or evs[i + 1].addr != e.addr)
                   for i, e in enumerate(evs))
    if not res.n_allocs:
        return "no alloc in the trace (state-only snapshot): only the final state is compared"
    if res.notes:
        return "inconsistent history (ring buffer started mid-way): " + res.notes[0]
    if len(streams) > 1 and deferred:
        return "several streams with cross-stream record_stream frees"
    m = res.first_mismatch
    return m.reason if m else "unexplained"
