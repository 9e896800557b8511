"""`vramtrace viz` (files for PyTorch's viewer) and `vramtrace export` (Chrome trace counters)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import snapshots
from conftest import real_snapshot_files, validate_memviz
from vramtrace.attribution.breakdown import build_report
from vramtrace.cli import cli
from vramtrace.replay.timeline import build_timeline
from vramtrace.snapshot.from_trace import event_rows, to_snapshot
from vramtrace.snapshot.load import normalize, read_raw
from vramtrace.snapshot.save import write_snapshot
from vramtrace.trace import Action, Trace, load_trace

VALIDATE_MAX_BYTES = 700_000    # the viewer-rule checker replays segments slowly on bigger files
ERAS = {"modern": snapshots.modern, "without_time": snapshots.without_time,
        "bare_segment_list": snapshots.bare_segment_list, "torch20_history": snapshots.torch20_history,
        "tagged": snapshots.tagged, "two_devices": snapshots.two_devices, "with_oom": snapshots.with_oom,
        "expandable": snapshots.expandable}


def _invoke(*args: str):
    result = CliRunner().invoke(cli, [*args, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _viz_inputs(tmp_path: Path) -> list[Path]:
    """Every era built by hand, and the real snapshots small enough to check quickly."""
    built = []
    for name, make in ERAS.items():
        snap, path = make(), tmp_path / f"{name}.in.pkl"
        if isinstance(snap, list):     # a bare segment list, as torch.cuda.memory_snapshot() pickles it
            path.write_bytes(pickle.dumps(snap, protocol=4))
        else:
            write_snapshot(snap, path)
        built.append(path)
    return built + [p for p in real_snapshot_files() if p.stat().st_size <= VALIDATE_MAX_BYTES]


def test_viz_outputs_open_in_pytorchs_viewers(tmp_path):
    """Every file viz writes passes the viewer-rule checker and renders through _memory_viz."""
    from torch.cuda import _memory_viz

    outs = []
    for i, source in enumerate(_viz_inputs(tmp_path)):
        out = tmp_path / f"out{i}.pkl"
        _invoke("viz", str(source), "-o", str(out))
        outs.append(out)
        data = read_raw(out)
        assert out.read_bytes()[:2] == b"\x80\x04"
        cats = {e["category"] for t in data["device_traces"] for e in t if "category" in e}
        assert len(cats | {"unknown"}) <= 10 and (not cats or "unknown" in cats)
        for plot in (_memory_viz.trace_plot, _memory_viz.segment_plot):
            assert "snapshot.pickle" in plot(read_raw(out))
        _memory_viz.segsum(read_raw(out))
        _memory_viz.trace(read_raw(out))
    validate_memviz(*outs)


def test_viz_colours_tagged_allocations_by_owner(tmp_path):
    src = write_snapshot(snapshots.tagged(), tmp_path / "tagged.pkl")
    out = tmp_path / "viz.pkl"
    result = _invoke("viz", str(src), "-o", str(out))
    assert "coloured by owner: activation, unknown, weight" in result.stderr
    events = read_raw(out)["device_traces"][0]
    by_action = [(e["action"], e.get("category")) for e in events]
    assert by_action[1:5] == [("alloc", "weight"), ("alloc", "activation"),
                              ("free_requested", "activation"), ("free_completed", "activation")]
    assert json.loads(events[2]["user_metadata"])["module"] == "model.layers.1.mlp"
    assert "segment_alloc" == events[0]["action"] and events[0]["category"] == "unknown"


def test_viz_guesses_phases_for_untagged_files(tmp_path):
    path = next((p for p in real_snapshot_files() if p.name == "memory_forward_fp32_128.pickle"), None)
    if path is None:
        pytest.skip("../shared/fixtures/real-snapshots is absent")
    out = tmp_path / "viz.pkl"
    _invoke("viz", str(path), "-o", str(out))
    events = read_raw(out)["device_traces"][0]
    allocs = {e["addr"]: e for e in events if e["action"] == "alloc"}
    cats = {e["category"] for e in events if "category" in e}
    assert {"forward", "unknown"} <= cats
    for e in events:   # a free belongs to the allocation live at its address: same category
        if e["action"] == "free_requested" and e["addr"] in allocs:
            assert e["category"] == allocs[e["addr"]]["category"]
    meta = json.loads(next(e for e in events if e["action"] == "alloc")["user_metadata"])
    assert meta["guessed"] is True and "phase" in meta


def test_viz_html_uses_pytorchs_page_and_says_it_loads_code(tmp_path):
    src = write_snapshot(snapshots.tagged(), tmp_path / "tagged.pkl")
    result = _invoke("viz", str(src), "-o", str(tmp_path / "v.pkl"), "--html")
    page = (tmp_path / "v.html").read_text()
    assert "MemoryViz.js" in page and "base64" in page
    assert "loads PyTorch's MemoryViz.js" in result.stderr and "network" in result.stderr


@pytest.mark.parametrize("era", sorted(ERAS))
def test_to_snapshot_inverts_loading(era):
    """Loading what to_snapshot gives yields the same columns and final state."""
    trace = Trace.from_snapshot(normalize(ERAS[era]()))
    again = Trace.from_snapshot(normalize(to_snapshot(trace)))
    for column in ("action", "addr", "size", "stream", "time_us", "device", "tag"):
        assert np.array_equal(getattr(trace, column), getattr(again, column)), column
    assert [trace.stack_frames(s) for s in trace.stack] == [again.stack_frames(s) for s in again.stack]
    assert np.array_equal(trace.blocks.size, again.blocks.size)
    assert np.array_equal(trace.blocks.state, again.blocks.state)
    assert np.array_equal(trace.segments.total_size, again.segments.total_size)


def test_event_rows_pair_frees_with_their_allocation():
    trace = Trace.from_snapshot(normalize(snapshots.modern()))
    tl = build_timeline(trace, 0)
    rows = event_rows(trace, tl)
    # segment_alloc, alloc A, alloc B, free_requested B, free_completed B
    assert rows[0] == -1
    assert rows[3] == rows[4] == rows[2] != rows[1]
    assert tl.allocations.alloc_index[rows[2]] == 2


def _counters_at_peak(doc: dict) -> dict[str, int]:
    peak = next(e for e in doc["traceEvents"] if e["name"] == "peak allocated")
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C" and e["name"].startswith("allocated by")
                and e["ts"] == peak["ts"] and e["pid"] == peak["pid"]]
    assert len(counters) == 1
    return {k: v for k, v in counters[0]["args"].items() if v}


def test_export_counters_at_peak_equal_report_owner_totals(tmp_path):
    src = write_snapshot(snapshots.tagged(), tmp_path / "tagged.pkl")
    out = tmp_path / "trace.json"
    _invoke("export", str(src), "-o", str(out))
    doc = json.loads(out.read_text())
    owners = {r["name"]: r["bytes"] for r in build_report(load_trace(src))["devices"][0]["by_owner"]}
    assert _counters_at_peak(doc) == owners == {"weight": 1024, "activation": 4096}
    assert all(isinstance(e["ts"], int) for e in doc["traceEvents"] if e["ph"] == "C")


@pytest.mark.parametrize("name", ["memory_forward_fp32_128.pickle", "memory_2.7b_forward.pickle",
                                  "5a601013__snapshot.pickle"])
def test_export_of_real_snapshots_matches_report(name, tmp_path):
    path = next((p for p in real_snapshot_files() if p.name == name), None)
    if path is None:
        pytest.skip("../shared/fixtures/real-snapshots is absent")
    out = tmp_path / "trace.json"
    _invoke("export", str(path), "-o", str(out))
    doc = json.loads(out.read_text())
    report = build_report(load_trace(path))
    dev = max(report["devices"], key=lambda d: d["peak_allocated"]["bytes"])
    peak = next(e for e in doc["traceEvents"] if e["name"] == "peak allocated" and e["pid"] == dev["device"])
    assert peak["args"]["bytes"] == dev["peak_allocated"]["bytes"]
    phases = {r["name"]: r["bytes"] for r in dev["by_phase"] if r["bytes"]}
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C" and e["name"] == "allocated by phase"
                and e["pid"] == dev["device"] and e["ts"] == peak["ts"]]
    assert {k: v for k, v in counters[0]["args"].items() if v} == phases
    times = [e["ts"] for e in doc["traceEvents"] if e["ph"] == "C" and e["pid"] == dev["device"]]
    assert times == sorted(times)


def test_export_without_timestamps_uses_event_index(tmp_path):
    src = write_snapshot(snapshots.without_time(), tmp_path / "old.pkl")
    out = tmp_path / "trace.json"
    _invoke("export", str(src), "-o", str(out))
    doc = json.loads(out.read_text())
    assert doc["otherData"]["clock"] == "event index"
    assert [e["ts"] for e in doc["traceEvents"] if e["name"] == "allocator"] == list(range(5))


def test_export_marks_oom(tmp_path):
    src = write_snapshot(snapshots.with_oom(), tmp_path / "oom.pkl")
    out = tmp_path / "trace.json"
    _invoke("export", str(src), "-o", str(out))
    oom = [e for e in json.loads(out.read_text())["traceEvents"] if e["name"] == "out of memory"]
    assert len(oom) == 1 and oom[0]["args"]["requested"] == 80 << 30
    assert Action.OOM == load_trace(src).action[oom[0]["args"]["event_index"]]
