"""A large synthetic but well-formed snapshot: N events of alloc/free traffic with shared frames,
shaped like a real python-stacks trace (frame dicts shared, one frames list per event)."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

SEG_BASE = 0x7F00_0000_0000
SEG_SIZE = 1 << 30


def synthetic_snapshot(n_events: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    frames = [{"name": f"fn{i}", "filename": f"/src/pkg/mod{i % 17}.py", "line": i} for i in range(60)]
    stacks = [rng.sample(frames, 12) for _ in range(300)]
    trace = [{"action": "segment_alloc", "addr": SEG_BASE, "size": SEG_SIZE, "stream": 0, "time_us": 0}]
    live: list[tuple[int, int]] = []
    next_addr, t = SEG_BASE, 1
    while len(trace) < n_events:
        if live and (rng.random() < 0.5 or next_addr + (1 << 20) > SEG_BASE + SEG_SIZE):
            addr, size = live.pop(rng.randrange(len(live)))
            stack = list(rng.choice(stacks))
            trace.append({"action": "free_requested", "addr": addr, "size": size, "stream": 0, "time_us": t, "frames": stack})
            trace.append({"action": "free_completed", "addr": addr, "size": size, "stream": 0, "time_us": t, "frames": stack})
            if not live:
                next_addr = SEG_BASE
        else:
            size = rng.choice((512, 4096, 65536, 1 << 20)) - rng.randrange(0, 512)
            trace.append({"action": "alloc", "addr": next_addr, "size": size, "stream": 0, "time_us": t,
                          "frames": list(rng.choice(stacks))})
            live.append((next_addr, size))
            next_addr += (size + 511) // 512 * 512
        t += 1
    blocks, cursor = [], SEG_BASE
    for addr, size in sorted(live):
        if addr > cursor:
            blocks.append({"address": cursor, "size": addr - cursor, "requested_size": 0, "state": "inactive", "frames": []})
        rounded = (size + 511) // 512 * 512
        blocks.append({"address": addr, "size": rounded, "requested_size": size, "state": "active_allocated",
                       "frames": frames[:12]})
        cursor = addr + rounded
    blocks.append({"address": cursor, "size": SEG_BASE + SEG_SIZE - cursor, "requested_size": 0,
                   "state": "inactive", "frames": []})
    segment = {"device": 0, "address": SEG_BASE, "total_size": SEG_SIZE, "stream": 0, "segment_type": "large",
               "allocated_size": 0, "active_size": 0, "requested_size": 0, "segment_pool_id": [0, 0],
               "is_expandable": False, "frames": [], "blocks": blocks}
    return {"segments": [segment], "device_traces": [trace], "allocator_settings": {}}


def write_synthetic(path: Path, n_events: int) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(synthetic_snapshot(n_events), fh, protocol=4)
    return path
