"""The caching-allocator model: each rule with hand-computed addresses, and agreement with
the real allocator on every recorded snapshot in ../shared."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from vramtrace.replay.agreement import check_agreement
from vramtrace.replay.allocator import (
    MB, AllocatorOOM, AllocatorSettings, CachingAllocatorModel, allocation_size, round_size)
from vramtrace.trace import Trace, load_trace

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "fixtures" / "real-snapshots"
VALIDATOR = SHARED / "tools" / "validate_memviz.py"
BASE = 0x7F0000000000  # the model's first synthetic segment address


def blocks(m: CachingAllocatorModel) -> list[tuple[int, int, str, int]]:
    return [(b["address"] - BASE, b["size"], b["state"], b["requested_size"])
            for s in m.segments() for b in s["blocks"]]


def actions(m: CachingAllocatorModel) -> list[str]:
    return [e["action"] for e in m.trace]


# ---- sizes ------------------------------------------------------------------------------
def test_round_size_default() -> None:
    assert [round_size(n) for n in (1, 511, 512, 513, 1000, 1536)] == [512, 512, 512, 1024, 1024, 1536]


def test_round_size_power2_divisions() -> None:
    st = AllocatorSettings.from_conf_string("roundup_power2_divisions:4")
    assert round_size(5 * MB + 1, st) == 6 * MB          # 4 MiB floor, 1 MiB steps
    assert round_size(5 * MB + MB // 2, st) == 6 * MB
    assert round_size(4 * MB, st) == 4 * MB              # powers of two stay
    assert round_size(1200, st) == 1536                  # below 512 * divisions: plain rounding


def test_allocation_size() -> None:
    assert allocation_size(MB) == 2 * MB
    assert allocation_size(MB + 512) == 20 * MB
    assert allocation_size(10 * MB - 512) == 20 * MB
    assert allocation_size(10 * MB) == 10 * MB
    assert allocation_size(11 * MB) == 12 * MB


# ---- settings ---------------------------------------------------------------------------
def test_settings_from_conf_string() -> None:
    st = AllocatorSettings.from_conf_string(
        "expandable_segments:True,max_split_size_mb:128,garbage_collection_threshold:0.6,"
        "roundup_power2_divisions:[64:8,128:2,256:4,>:1],backend:native")
    assert st.expandable_segments and st.max_split_size == 128 * MB
    assert st.garbage_collection_threshold == 0.6
    assert st.roundup_power2_divisions[:10] == (8, 8, 8, 8, 8, 8, 8, 2, 4, 1)
    with pytest.raises(ValueError):
        AllocatorSettings.from_conf_string("max_split_size_mb:10")


def test_settings_from_snapshot_roundtrip() -> None:
    raw = {"PYTORCH_CUDA_ALLOC_CONF": "", "max_split_size": -1, "garbage_collection_threshold": 0.0,
           "expandable_segments": False, "roundup_power2_divisions": {str(1 << i): 0 for i in range(16)}}
    st = AllocatorSettings.from_snapshot(raw)
    assert st == AllocatorSettings()
    st2 = AllocatorSettings(max_split_size=64 * MB, expandable_segments=True,
                            roundup_power2_divisions=(4,) * 16)
    assert AllocatorSettings.from_snapshot(st2.to_snapshot()) == st2
    assert AllocatorSettings.from_snapshot({"segments": []}) == AllocatorSettings()


# ---- placement --------------------------------------------------------------------------
def test_small_pool_packs_and_reuses() -> None:
    m = CachingAllocatorModel()
    a, b = m.malloc(1000), m.malloc(500)
    assert (a - BASE, b - BASE) == (0, 1024)
    m.free(a)
    assert m.malloc(700) == a  # exact 1024 B hole beats the big tail
    assert actions(m) == ["segment_alloc", "alloc", "alloc", "free_requested", "free_completed", "alloc"]
    assert m.reserved == 2 * MB and m.allocated == 1024 + 512


def test_best_fit_smallest_then_lowest_address() -> None:
    m = CachingAllocatorModel()
    a = m.malloc(4096)
    m.malloc(512)
    c = m.malloc(4096)
    m.malloc(512)
    e = m.malloc(8192)
    m.malloc(512)
    m.free(e)   # 8192 B hole, lowest freed first
    m.free(c)   # 4096 B hole
    m.free(a)   # 4096 B hole at the lowest address
    assert m.malloc(4000) == a          # tie on size: lowest address, not most recently freed
    assert m.malloc(4096) == c
    assert m.malloc(3000) == e          # only the 8192 B hole (and the tail) remain: smallest fits


def test_large_pool_split_rule() -> None:
    m = CachingAllocatorModel()
    a = m.malloc(3 * MB)                # 20 MiB segment, remainder 17 MiB
    assert a == BASE and m.reserved == 20 * MB
    b = m.malloc(16 * MB + MB // 2)     # 17 MiB free block, 0.5 MiB left: not split
    assert b == BASE + 3 * MB and m.block_size(b) == 17 * MB
    m2 = CachingAllocatorModel()
    m2.malloc(3 * MB)
    x = m2.malloc(16 * MB)              # exactly 1 MiB left: still not split (needs > 1 MiB)
    assert m2.block_size(x) == 17 * MB
    m3 = CachingAllocatorModel()
    m3.malloc(3 * MB)
    y = m3.malloc(16 * MB - 512)        # 1 MiB + 512 left: split
    assert m3.block_size(y) == 16 * MB - 512
    assert blocks(m3)[-1] == (19 * MB - 512, MB + 512, "inactive", 0)


def test_merge_and_stale_requested_size() -> None:
    m = CachingAllocatorModel()
    a = m.malloc(5 * MB)
    m.free(a)
    assert blocks(m) == [(0, 20 * MB, "inactive", 5 * MB)]     # merged block keeps a's request
    b = m.malloc(2 * MB)
    assert b == a
    assert blocks(m) == [(0, 2 * MB, "active_allocated", 2 * MB),
                         (2 * MB, 18 * MB, "inactive", 5 * MB)]  # remainder: stale 5 MiB


def test_streams_do_not_share_cached_blocks() -> None:
    m = CachingAllocatorModel()
    a = m.malloc(1000, stream=7)
    m.free(a)
    b = m.malloc(1000, stream=0)
    assert b == BASE + 2 * MB and m.reserved == 4 * MB
    assert [s["stream"] for s in m.segments()] == [7, 0]


def test_max_split_size_rules() -> None:
    m = CachingAllocatorModel(AllocatorSettings.from_conf_string("max_split_size_mb:40"))
    a = m.malloc(50 * MB)
    m.free(a)
    b = m.malloc(30 * MB)               # below max_split: may not take the 50 MiB oversize block
    assert b == BASE + 50 * MB
    c = m.malloc(45 * MB)               # oversize request: 50 < 45 + 20, taken whole, unsplit
    assert c == a and m.block_size(c) == 50 * MB
    m.free(c)
    d = m.malloc(29 * MB + MB)          # 30 MiB: not split either way; new segment
    assert d == BASE + 80 * MB


def test_max_non_split_rounding() -> None:
    m = CachingAllocatorModel(AllocatorSettings.from_conf_string("max_split_size_mb:40"))
    a = m.malloc(100 * MB)
    m.free(a)
    assert m.malloc(70 * MB) == BASE + 100 * MB   # 100 >= 70 + 20: refused
    m.free(BASE + 100 * MB)
    assert m.malloc(81 * MB) == a                 # 100 < 81 + 20: accepted


def test_empty_cache_releases_only_unsplit_segments() -> None:
    m = CachingAllocatorModel()
    a = m.malloc(3 * MB)
    b = m.malloc(3 * MB)
    c = m.malloc(16 * MB)               # 14 MiB left in the first segment: too small
    m.free(a)
    m.free(c)
    m.empty_cache()
    assert m.reserved == 20 * MB        # the 16 MiB segment went back; the split 20 MiB stayed
    assert [e for e in m.trace if e["action"] == "segment_free"] == [
        {"action": "segment_free", "addr": BASE + 20 * MB, "size": 16 * MB, "stream": 0}]
    m.free(b)
    m.empty_cache()
    assert m.reserved == 0 and m.segments() == []
    assert m.peak_reserved == 36 * MB and m.peak_allocated == 22 * MB


def test_oom_retry_then_oom() -> None:
    m = CachingAllocatorModel(capacity_bytes=40 * MB)
    a = m.malloc(15 * MB)               # 16 MiB segment
    m.free(a)
    b = m.malloc(30 * MB)               # 16 + 30 > 40: release cached, retry
    assert actions(m)[-3:] == ["segment_free", "segment_alloc", "alloc"]
    assert b == BASE + 16 * MB and m.reserved == 30 * MB
    with pytest.raises(AllocatorOOM):
        m.malloc(20 * MB)
    assert m.trace[-1] == {"action": "oom", "device_free": 10 * MB, "size": 20 * MB, "stream": 0}


def test_garbage_collection_frees_old_cached_segments() -> None:
    st = AllocatorSettings.from_conf_string("garbage_collection_threshold:0.5")
    m = CachingAllocatorModel(st, capacity_bytes=100 * MB)
    a = m.malloc(30 * MB)
    b = m.malloc(30 * MB)
    m.free(a)
    m.free(b)
    m.malloc(40 * MB)                   # reserved 60 > 50: GC releases both idle segments first
    assert actions(m)[-4:] == ["segment_free", "segment_free", "segment_alloc", "alloc"]
    assert m.reserved == 40 * MB


def test_pending_free_blocks_merge_only_when_completed() -> None:
    m = CachingAllocatorModel()
    a = m.malloc(1000)
    m.free(a, deferred=True)
    assert blocks(m)[0] == (0, 1024, "active_pending_free", 1000)
    assert m.malloc(1000) == BASE + 1024    # pending block is not reusable
    m.complete_free(a)
    assert m.malloc(900) == a


def test_expandable_segments_grow_in_place() -> None:
    m = CachingAllocatorModel(AllocatorSettings(expandable_segments=True))
    a = m.malloc(3 * MB)
    b = m.malloc(30 * MB)               # maps one more 20 MiB page after the free 17 MiB
    assert b == a + 3 * MB
    assert [(e["action"], e["addr"] - a, e["size"]) for e in m.trace if e["action"] == "segment_map"] == [
        ("segment_map", 0, 20 * MB), ("segment_map", 20 * MB, 20 * MB)]
    segs = m.segments()
    assert len(segs) == 1 and segs[0]["is_expandable"] and segs[0]["total_size"] == 40 * MB
    assert [(x["size"], x["state"]) for x in segs[0]["blocks"]] == [
        (3 * MB, "active_allocated"), (30 * MB, "active_allocated"), (7 * MB, "inactive")]
    m.free(a)
    m.free(b)
    m.empty_cache()
    assert [(e["action"], e["size"]) for e in m.trace[-1:]] == [("segment_unmap", 40 * MB)]
    assert m.reserved == 0 and m.segments() == []


# ---- output format ----------------------------------------------------------------------
def _recorded_model() -> CachingAllocatorModel:
    m = CachingAllocatorModel()
    frames = [{"name": "forward", "filename": "model.py", "line": 3}]
    a = m.malloc(1000, frames=frames, time_us=1, category="activations", user_metadata="x")
    b = m.malloc(5 * MB, frames=frames, time_us=2, category="unknown")
    m.malloc(12 * MB, time_us=3, category="unknown")
    m.malloc(2000, time_us=3, category="unknown")   # keeps the small segment split
    m.free(a, time_us=4)
    m.free(b, time_us=5)
    m.empty_cache(time_us=6)
    return m


def test_snapshot_format() -> None:
    snap = _recorded_model().snapshot()
    seg = snap["segments"][0]
    assert list(seg) == ["device", "address", "total_size", "allocated_size", "active_size",
                         "requested_size", "stream", "segment_type", "segment_pool_id",
                         "is_expandable", "frames", "blocks"]
    assert seg["blocks"][0]["frames"] == [] and seg["blocks"][0]["requested_size"] == 1000
    free = [e for e in snap["device_traces"][0] if e["action"] == "free_requested"][0]
    assert free["time_us"] == 4 and free["frames"][0]["name"] == "forward"  # allocation's stack
    assert snap["allocator_settings"]["max_split_size"] == -1


def test_written_snapshot_passes_memviz_validator(tmp_path: Path) -> None:
    if not VALIDATOR.is_file():
        pytest.skip("../shared/tools/validate_memviz.py is absent")
    m = _recorded_model()
    m2 = CachingAllocatorModel(AllocatorSettings(expandable_segments=True), capacity_bytes=64 * MB)
    m2.malloc(3 * MB, category="unknown")
    with pytest.raises(AllocatorOOM):
        m2.malloc(80 * MB)
    for i, snap in enumerate((m.snapshot(), m2.snapshot())):
        p = tmp_path / f"model{i}.pickle"
        p.write_bytes(pickle.dumps(snap, protocol=4))
        out = subprocess.run([sys.executable, str(VALIDATOR), str(p)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


# ---- agreement --------------------------------------------------------------------------
def test_agreement_on_model_written_trace_and_a_forged_address() -> None:
    m = CachingAllocatorModel()
    live = []
    for i in range(60):
        live.append(m.malloc((i * 7919) % (3 * MB) + 100))
        if i % 3 == 2:
            m.free(live.pop(i % len(live)))
    snap = m.snapshot()
    [res] = check_agreement(Trace.from_snapshot(snap))
    assert res.n_allocs == 60 and res.n_same_address == 60 and res.final_state_exact

    forged = [dict(e) for e in snap["device_traces"][0]]
    k = max(i for i, e in enumerate(forged) if e["action"] == "alloc"
            and not any(f["action"] == "free_requested" and f["addr"] == e["addr"] for f in forged[i:]))
    forged[k]["addr"] += 512
    bad = dict(snap, device_traces=[forged])
    [res] = check_agreement(Trace.from_snapshot(bad))
    assert res.n_same_address == 59
    assert res.first_mismatch is not None and res.first_mismatch.event_index == k
    assert res.reason


def test_agreement_rewinds_blocks_alive_before_the_trace() -> None:
    m = CachingAllocatorModel()
    early = [m.malloc(s) for s in (4 * MB, 600_000, 7 * MB, 2000)]
    cut = len(m.trace)                  # the ring buffer lost everything before this point
    m.free(early[0])
    x = m.malloc(3 * MB)
    m.free(early[1])
    m.malloc(590_000)
    snap = m.snapshot()
    snap["device_traces"] = [snap["device_traces"][0][cut:]]
    [res] = check_agreement(Trace.from_snapshot(snap))
    assert res.n_blocks_before_trace == 4 and res.n_segments_before_trace == 2
    assert res.complete, res
    assert x == early[0]


def _real_files() -> list:
    if not REAL.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason="../shared/fixtures/real-snapshots is absent"))]
    return [pytest.param(p, id=f"{p.parent.name[:18]}/{p.name[:30]}")
            for p in sorted(REAL.glob("*/*")) if p.is_file() and p.suffix != ".md"]


# files whose trace holds no alloc (state-only dumps): only the final state can be compared
STATE_ONLY_REASONS = ("no allocation history", "no alloc in the trace")


@pytest.mark.parametrize("path", _real_files())
def test_agreement_with_real_allocator(path: Path) -> None:
    trace = load_trace(path)
    results = check_agreement(trace)
    if not any(r.n_allocs for r in results):
        assert all(r.reason.startswith(STATE_ONLY_REASONS) for r in results if r.n_events)
        assert all(r.final_state_exact in (None, True) for r in results)
        pytest.skip("no alloc events: state-only snapshot")
    for r in results:
        if r.n_allocs:
            assert r.n_same_address == r.n_allocs, (r.first_mismatch, r.reason)
            assert r.final_state_exact, (r.first_mismatch, r.reason)
