"""What-if replays: the same requests under other allocator settings, hand-computed peaks."""
from __future__ import annotations

from pathlib import Path

import pytest

from vramtrace.replay.allocator import MB, AllocatorSettings, CachingAllocatorModel
from vramtrace.replay.whatif import what_if
from vramtrace.trace import Trace, load_trace

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _trace(steps: list[tuple[str, int]]) -> Trace:
    """Record ('m', size) / ('f', index of the malloc) steps under default settings."""
    m = CachingAllocatorModel()
    addrs = []
    for op, n in steps:
        if op == "m":
            addrs.append(m.malloc(n))
        else:
            m.free(addrs[n])
    return Trace.from_snapshot(m.snapshot())


def test_expandable_segments_lower_reserved_when_a_tensor_grows() -> None:
    # a, b = 100 MiB; b freed; c = 110 MiB. Default: b's cached 100 MiB segment cannot hold c,
    # so a third segment: 100 + 100 + 110 = 310 MiB. Expandable: b's free range sits before the
    # unmapped tail, so one more 20 MiB page is mapped and c reuses it: 100 + 100 + 20 = 220 MiB.
    tr = _trace([("m", 100 * MB), ("m", 100 * MB), ("f", 1), ("m", 110 * MB)])
    base = what_if(tr, AllocatorSettings(), start="empty")
    exp = what_if(tr, AllocatorSettings.from_conf_string("expandable_segments:True"), start="empty")
    assert base.recorded_peak_reserved == 310 * MB == base.predicted_peak_reserved
    assert exp.predicted_peak_reserved == 220 * MB
    assert exp.reserved_saving == 90 * MB
    assert exp.predicted_peak_allocated == 210 * MB and exp.n_allocs == 3  # a + c


def test_max_split_size_changes_placement() -> None:
    # a = 50 MiB freed, b = 30 MiB. Default: b splits a's cached block, peak reserved 50 MiB.
    # max_split_size 40 MiB: a 30 MiB request may not take an oversize block: 50 + 30 MiB.
    tr = _trace([("m", 50 * MB), ("f", 0), ("m", 30 * MB)])
    assert what_if(tr, AllocatorSettings()).predicted_peak_reserved == 50 * MB
    r = what_if(tr, AllocatorSettings.from_conf_string("max_split_size_mb:40"))
    assert r.predicted_peak_reserved == 80 * MB and r.reserved_saving == -30 * MB


def test_capacity_reports_first_oom_event() -> None:
    tr = _trace([("m", 30 * MB), ("m", 30 * MB), ("f", 0), ("m", 40 * MB)])
    r = what_if(tr, AllocatorSettings(), capacity_bytes=64 * MB, start="empty")
    # events: seg, alloc, seg, alloc, free_req, free_done, seg, alloc -> the 40 MiB alloc (7) fails:
    # 30 MiB live + 40 MiB > 64 MiB even after releasing the cached 30 MiB segment.
    assert r.oom_event == 7
    assert what_if(tr, AllocatorSettings(), capacity_bytes=80 * MB, start="empty").oom_event is None


def test_rewound_start_keeps_blocks_alive_before_the_trace() -> None:
    m = CachingAllocatorModel()
    early = m.malloc(200 * MB)
    cut = len(m.trace)
    a = m.malloc(100 * MB)
    m.free(a)
    m.free(early)
    snap = m.snapshot()
    snap["device_traces"] = [snap["device_traces"][0][cut:]]
    tr = Trace.from_snapshot(snap)
    rew = what_if(tr, AllocatorSettings())
    assert rew.recorded_peak_reserved == 300 * MB == rew.predicted_peak_reserved
    assert rew.n_unknown_frees == 0
    empty = what_if(tr, AllocatorSettings(), start="empty")
    assert empty.predicted_peak_reserved == 100 * MB and empty.n_unknown_frees == 1


@pytest.mark.skipif(not (SHARED / "fixtures" / "real-snapshots").is_dir(), reason="../shared absent")
def test_recorded_settings_reproduce_recorded_peak_on_real_file() -> None:
    path = SHARED / "fixtures" / "real-snapshots" / "cranberrii__ftcourse" / "memory_snapshot.pickle"
    tr = load_trace(path)
    r = what_if(tr, AllocatorSettings.from_snapshot(tr.settings or None))
    assert r.predicted_peak_reserved == r.recorded_peak_reserved == 6471811072
    exp = what_if(tr, AllocatorSettings(expandable_segments=True))
    assert exp.predicted_peak_reserved < r.recorded_peak_reserved
