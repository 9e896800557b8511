"""Hand-built snapshot dicts of each era, with figures known by construction."""
from __future__ import annotations

import copy

SEG = 0x7F00_0000_0000
MIB = 1 << 20
FRAME_A = {"name": "forward", "filename": "/home/u/model.py", "line": 10}
FRAME_B = {"name": "train_step", "filename": "/home/u/train.py", "line": 42}


def modern() -> dict:
    """One 2 MiB small-pool segment; trace: segment_alloc, two allocs, one freed.

    Final blocks: [0, 1024) active (requested 1000), [1024, 2 MiB) inactive.
    Peak allocated = 1024 + 4096 after the second alloc."""
    stack = [FRAME_A, FRAME_B]
    return {
        "segments": [{
            "device": 0, "address": SEG, "total_size": 2 * MIB, "allocated_size": 1024,
            "active_size": 1024, "requested_size": 1000, "stream": 0, "segment_type": "small",
            "segment_pool_id": (0, 0), "is_expandable": False, "frames": stack,
            "blocks": [
                {"address": SEG, "size": 1024, "requested_size": 1000, "state": "active_allocated",
                 "frames": stack},
                {"address": SEG + 1024, "size": 2 * MIB - 1024, "requested_size": 4000,
                 "state": "inactive", "frames": []},
            ]}],
        "device_traces": [[
            {"action": "segment_alloc", "addr": SEG, "size": 2 * MIB, "stream": 0, "time_us": 1000, "frames": stack},
            {"action": "alloc", "addr": SEG, "size": 1000, "stream": 0, "time_us": 1001, "frames": stack},
            {"action": "alloc", "addr": SEG + 1024, "size": 4000, "stream": 0, "time_us": 1002, "frames": stack},
            {"action": "free_requested", "addr": SEG + 1024, "size": 4000, "stream": 0, "time_us": 1003,
             "frames": [FRAME_B]},
            {"action": "free_completed", "addr": SEG + 1024, "size": 4000, "stream": 0, "time_us": 1003,
             "frames": [FRAME_B]},
        ]],
        "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "", "max_split_size": -1,
                               "expandable_segments": False, "roundup_power2_divisions": {"1": 0}},
        "external_annotations": [{"name": "step", "stage": "START", "device": 0, "time_us": 999}],
    }


MODERN_PEAK_ALLOCATED = 1024 + 4096
MODERN_PEAK_INDEX = 2
MODERN_END_ALLOCATED = 1024
MODERN_RESERVED = 2 * MIB


def without_time() -> dict:
    snap = modern()
    for e in snap["device_traces"][0]:
        del e["time_us"]
    del snap["allocator_settings"], snap["external_annotations"]
    return snap


def bare_segment_list() -> list:
    return modern()["segments"]


def torch20_history() -> dict:
    """torch 2.0: blocks without addresses, frames in a per-block history list."""
    snap = modern()
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            del b["address"]
            frames = b.pop("frames")
            b["history"] = [{"addr": 0, "real_size": b["requested_size"], "frames": frames}] if frames else []
        for key in ("frames", "is_expandable", "segment_pool_id"):
            del seg[key]
    snap["device_traces"] = [[{"action": "free_completed", "addr": SEG + 4096, "size": 0, "stream": 0}]]
    del snap["allocator_settings"], snap["external_annotations"]
    return snap


def tagged() -> dict:
    """vramtrace tags: owner in category, detail JSON in user_metadata; plus compile_context."""
    snap = modern()
    a1, a2 = snap["device_traces"][0][1], snap["device_traces"][0][2]
    a1.update(category="weight", compile_context="N/A",
              user_metadata='{"owner": "weight", "module": "model.layers.0.q_proj", "phase": "setup", "dtype": "int8"}')
    a2.update(category="activation", compile_context="0/0",
              user_metadata='{"owner": "activation", "module": "model.layers.1.mlp", "phase": "forward", "dtype": "bf16"}')
    snap["device_traces"][0][0]["category"] = "unknown"
    return snap


def two_devices() -> dict:
    """Device 1 holds a copy of device 0's state at a different address."""
    snap = modern()
    seg1 = copy.deepcopy(snap["segments"][0])
    seg1["device"] = 1
    delta = 0x1000_0000
    seg1["address"] += delta
    for b in seg1["blocks"]:
        b["address"] += delta
    trace1 = copy.deepcopy(snap["device_traces"][0])
    for e in trace1:
        e["addr"] += delta
    snap["segments"].append(seg1)
    snap["device_traces"].append(trace1)
    return snap


def with_oom() -> dict:
    snap = modern()
    snap["device_traces"][0].append({"action": "oom", "size": 80 * (1 << 30), "device_free": 3 * MIB,
                                     "stream": 0, "time_us": 1004, "frames": [FRAME_A]})
    return snap


def expandable() -> dict:
    """An expandable segment: 20 MiB mapped, grown by segment_map, one 2 MiB page unmapped."""
    base = SEG
    return {
        "segments": [{
            "device": 0, "address": base, "total_size": 20 * MIB, "allocated_size": 8 * MIB,
            "active_size": 8 * MIB, "requested_size": 8 * MIB, "stream": 0, "segment_type": "large",
            "segment_pool_id": (0, 0), "is_expandable": True, "frames": [],
            "blocks": [
                {"address": base, "size": 8 * MIB, "requested_size": 8 * MIB, "state": "active_allocated",
                 "frames": [FRAME_A]},
                {"address": base + 8 * MIB, "size": 12 * MIB, "requested_size": 0, "state": "inactive",
                 "frames": []},
            ]}],
        "device_traces": [[
            {"action": "segment_map", "addr": base, "size": 22 * MIB, "stream": 0, "time_us": 1},
            {"action": "alloc", "addr": base, "size": 8 * MIB, "stream": 0, "time_us": 2, "frames": [FRAME_A]},
            {"action": "alloc", "addr": base + 8 * MIB, "size": 14 * MIB, "stream": 0, "time_us": 3},
            {"action": "free_requested", "addr": base + 8 * MIB, "size": 14 * MIB, "stream": 0, "time_us": 4},
            {"action": "free_completed", "addr": base + 8 * MIB, "size": 14 * MIB, "stream": 0, "time_us": 4},
            {"action": "segment_unmap", "addr": base + 20 * MIB, "size": 2 * MIB, "stream": 0, "time_us": 5},
        ]],
        "allocator_settings": {"expandable_segments": True, "max_split_size": -1},
    }


def torch214() -> dict:
    """2.14: annotate events re-tag a live allocation; pinned host memory keys."""
    snap = modern()
    snap["device_traces"][0].append({"action": "annotate", "addr": SEG, "size": 1000, "stream": 0,
                                     "time_us": 1005, "category": "activation",
                                     "user_metadata": '{"owner": "activation"}'})
    snap["device_traces"][0][1]["category"] = "temporary"
    snap["device_traces"][0][0]["category"] = "unknown"
    snap["host_segments"] = []
    snap["host_traces"] = [[]]
    return snap


def empty() -> dict:
    return {"segments": [], "device_traces": []}
