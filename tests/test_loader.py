"""Every snapshot era loads into the same Trace, with figures known by construction."""
from __future__ import annotations

import gc
import json
import pickle

import pytest

import snapshots as S
from conftest import real_snapshot_params
from vramtrace.attribution.breakdown import build_report
from vramtrace.replay.timeline import build_timeline
from vramtrace.snapshot.load import load_snapshot, safe_unpickle
from vramtrace.trace import Action, load_trace


def write(tmp_path, obj, name="snap.pkl", protocol=4):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("make", [S.modern, S.without_time, S.tagged, S.with_oom, S.torch214])
def test_modern_eras_give_the_known_figures(tmp_path, make):
    trace = load_trace(write(tmp_path, make()))
    tl = build_timeline(trace, 0)
    assert tl.peak_index == S.MODERN_PEAK_INDEX
    assert tl.peak_allocated == S.MODERN_PEAK_ALLOCATED
    assert tl.at(tl.end_index, "allocated") == S.MODERN_END_ALLOCATED
    assert tl.peak_reserved == S.MODERN_RESERVED
    assert tl.initial_reserved == 0 and tl.initial_allocated == 0
    assert tl.at(tl.end_index, "requested") == 1000


def test_json_form_loads_like_the_pickle(tmp_path):
    path = tmp_path / "snap.json"
    path.write_text(json.dumps(S.modern()))
    a, b = load_trace(path), load_trace(write(tmp_path, S.modern()))
    assert (a.action == b.action).all() and (a.size == b.size).all() and (a.addr == b.addr).all()
    assert a.stack_frames(a.stack[1]) == b.stack_frames(b.stack[1])


def test_bare_segment_list_is_state_only(tmp_path):
    trace = load_trace(write(tmp_path, S.bare_segment_list()))
    assert trace.n_events == 0 and trace.n_devices == 1
    tl = build_timeline(trace, 0)
    assert tl.peak_allocated == 1024 and tl.peak_reserved == 2 * S.MIB


def test_torch20_history_blocks_get_addresses_and_frames(tmp_path):
    trace = load_trace(write(tmp_path, S.torch20_history(), protocol=2))
    assert trace.blocks.address.tolist() == [S.SEG, S.SEG + 1024]
    assert [f.name for f in trace.stack_frames(int(trace.blocks.stack[0]))] == ["forward", "train_step"]
    assert build_timeline(trace, 0).at(0, "allocated") == 1024


def test_tags_are_parsed_from_category_and_user_metadata(tmp_path):
    trace = load_trace(write(tmp_path, S.tagged()))
    owners = {trace.tag_of(int(t)).owner for t in trace.tag if t >= 0}
    assert owners == {"weight", "activation", "unknown"}
    weight = next(t for t in trace.tags if t.category == "weight")
    assert weight.metadata["dtype"] == "int8" and weight.compile_context is None
    report = build_report(trace, "peak")["devices"][0]
    assert {r["name"]: r["bytes"] for r in report["by_owner"]} == {"weight": 1024, "activation": 4096}
    assert {r["name"] for r in report["by_module"]} == {"model.layers.*.q_proj", "model.layers.*.mlp"}
    assert report["attribution"] == "vramtrace tags"


def test_annotate_retags_the_live_allocation(tmp_path):
    trace = load_trace(write(tmp_path, S.torch214()))
    report = build_report(trace, "end")["devices"][0]
    assert [(r["name"], r["bytes"]) for r in report["by_owner"]] == [("activation", 1024)]
    assert "host_segments" in trace.extras


def test_several_devices_are_kept_apart(tmp_path):
    trace = load_trace(write(tmp_path, S.two_devices()))
    assert trace.n_devices == 2
    for d in (0, 1):
        tl = build_timeline(trace, d)
        assert tl.n_events == 5 and tl.peak_allocated == S.MODERN_PEAK_ALLOCATED
    assert trace.addr[trace.device_slice(1)][0] == S.SEG + 0x1000_0000


def test_oom_event_keeps_device_free(tmp_path):
    trace = load_trace(write(tmp_path, S.with_oom()))
    report = build_report(trace, "peak")["devices"][0]
    assert report["oom_events"] == [{"index": 5, "requested": 80 << 30, "device_free": 3 * S.MIB, "time_us": 1004}]


def test_expandable_segments_count_mapped_bytes(tmp_path):
    trace = load_trace(write(tmp_path, S.expandable()))
    tl = build_timeline(trace, 0)
    assert tl.initial_reserved == 0
    assert tl.reserved.tolist() == [22 * S.MIB] * 5 + [20 * S.MIB]
    assert tl.peak_allocated == 8 * S.MIB + 14 * S.MIB
    assert set(trace.action.tolist()) >= {Action.SEGMENT_MAP, Action.SEGMENT_UNMAP}


def test_empty_snapshot(tmp_path):
    trace = load_trace(write(tmp_path, S.empty()))
    assert trace.n_events == 0 and trace.n_devices == 0
    assert build_report(trace)["devices"] == []


@pytest.mark.parametrize("path", real_snapshot_params())
def test_every_real_snapshot_loads_and_reports(path):
    trace = load_trace(path)
    raw = safe_unpickle(open(path, "rb"))
    events = sum(len(t) for t in raw.get("device_traces", [])) if isinstance(raw, dict) else 0
    assert trace.n_events == events
    report = build_report(trace, "peak")
    for dev in report["devices"]:
        assert dev["peak_allocated"]["bytes"] >= dev["end"]["allocated"] >= 0
        assert sum(r["bytes"] for r in dev["by_phase"]) == dev["state"]["allocated"]


def test_normalised_snapshot_keeps_every_key(tmp_path):
    snap = load_snapshot(write(tmp_path, S.torch214()))
    assert {"segments", "device_traces", "allocator_settings", "external_annotations",
            "host_segments", "host_traces"} <= set(snap)


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_leaves_the_garbage_collector_as_it_was(tmp_path, enabled) -> None:
    """The loader pauses the cyclic GC while it builds objects; on success and on bad input the
    program's setting comes back."""
    good = write(tmp_path, S.modern())
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(S.modern(), protocol=4)[:-20])
    (gc.enable if enabled else gc.disable)()
    try:
        load_trace(good)
        assert gc.isenabled() is enabled
        with pytest.raises(Exception):
            load_trace(bad)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()
