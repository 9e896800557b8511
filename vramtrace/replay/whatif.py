"""What if the same program ran under other allocator settings?

The recorded trace fixes what the program asked for (sizes, streams, order of allocs and
frees); the allocator settings decide where it lands and how much gets reserved. We replay
those requests through the model under `settings` and compare peaks with the recording.
Recorded `segment_free` bursts are replayed as `empty_cache()` calls (the program's own
calls, or OOM retries), since the settings change which segments exist to release.
"""
from __future__ import annotations

from dataclasses import dataclass

from vramtrace.replay.agreement import rewound_state
from vramtrace.replay.allocator import AllocatorOOM, AllocatorSettings, CachingAllocatorModel
from vramtrace.trace import Action, Trace


@dataclass(frozen=True)
class WhatIfResult:
    """Predicted vs recorded peaks of one device's trace under other settings."""

    device: int
    settings: AllocatorSettings
    start: str                    # 'rewound' (state before the first event) or 'empty'
    n_allocs: int
    n_unknown_frees: int          # frees of blocks the start state does not hold (skipped)
    recorded_peak_reserved: int   # from the recorded segment events
    recorded_peak_requested: int  # from the recorded alloc/free sizes
    predicted_peak_reserved: int
    predicted_peak_allocated: int
    predicted_final_reserved: int
    oom_event: int | None = None  # index in the device trace of the first model OOM (capacity set)

    @property
    def reserved_saving(self) -> int:
        """Bytes of peak reserved memory the settings would save (negative: cost)."""
        return self.recorded_peak_reserved - self.predicted_peak_reserved


def what_if(trace: Trace, settings: AllocatorSettings, *, device: int = 0, start: str = "rewound",
            capacity_bytes: int | None = None) -> WhatIfResult:
    """Replay `trace`'s requests on `device` under `settings`, from the rewound state
    (blocks and segments alive before the trace began) or from an empty allocator."""
    if start not in ("rewound", "empty"):
        raise ValueError("start must be 'rewound' or 'empty'")
    sl = trace.device_slice(device)
    action = trace.action[sl].tolist()
    addr = trace.addr[sl].tolist()
    size = trace.size[sl].tolist()
    stream = trace.stream[sl].tolist()
    before, _ = rewound_state(trace, device)  # the recorded figures always start here
    for s in before:  # stale sizes of free blocks are unknown before the trace
        for b in s["blocks"]:
            b["requested_size"] = max(0, b["requested_size"])
    seeded = before if start == "rewound" else []

    model = CachingAllocatorModel(settings, device=device, capacity_bytes=capacity_bytes, record=False)
    model.load_segments(seeded)
    reserved = sum(s["total_size"] for s in before)
    requested = sum(b["requested_size"] for s in before for b in s["blocks"] if b["state"] != "inactive")
    peak_reserved, peak_requested = reserved, requested
    live = {b["address"]: b["address"] for s in seeded for b in s["blocks"] if b["state"] != "inactive"}
    pending: set[int] = {b["address"] for s in seeded for b in s["blocks"]
                         if b["state"] == "active_pending_free"}
    n_allocs = unknown = 0
    oom_at = None
    A = Action
    n = len(action)
    for i in range(n):
        a = action[i]
        if a == A.ALLOC:
            n_allocs += 1
            requested += size[i]
            peak_requested = max(peak_requested, requested)
            try:
                live[addr[i]] = model.malloc(size[i], stream[i])
            except AllocatorOOM:
                if oom_at is None:
                    oom_at = i
        elif a == A.FREE_REQUESTED:
            requested -= size[i]
            ma = live.get(addr[i])
            if ma is None:
                unknown += 1
                continue
            deferred = not (i + 1 < n and action[i + 1] == A.FREE_COMPLETED and addr[i + 1] == addr[i])
            model.free(ma, deferred=deferred)
            if deferred:
                pending.add(addr[i])
            else:
                del live[addr[i]]
        elif a == A.FREE_COMPLETED:
            if addr[i] in pending:
                pending.discard(addr[i])
                model.complete_free(live.pop(addr[i]))
            elif addr[i] not in live and (i == 0 or action[i - 1] != A.FREE_REQUESTED):
                unknown += 1
        elif a in (A.SEGMENT_ALLOC, A.SEGMENT_MAP):
            reserved += size[i]
            peak_reserved = max(peak_reserved, reserved)
        elif a in (A.SEGMENT_FREE, A.SEGMENT_UNMAP):
            reserved -= size[i]
            if i == 0 or action[i - 1] not in (A.SEGMENT_FREE, A.SEGMENT_UNMAP):
                model.empty_cache()  # also completes the model's pending frees
                for p in pending:
                    live.pop(p, None)
                pending.clear()
    return WhatIfResult(
        device=device, settings=settings, start=start, n_allocs=n_allocs, n_unknown_frees=unknown,
        recorded_peak_reserved=peak_reserved, recorded_peak_requested=peak_requested,
        predicted_peak_reserved=model.peak_reserved, predicted_peak_allocated=model.peak_allocated,
        predicted_final_reserved=model.reserved, oom_event=oom_at)
