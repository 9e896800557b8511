"""`vramtrace report` end to end: formats, points, devices, and figures from the file."""
from __future__ import annotations

import json
import pickle

import pytest
from click.testing import CliRunner

import snapshots as S
from conftest import real_snapshot_files
from vramtrace.cli import cli


@pytest.fixture
def tagged_file(tmp_path):
    path = tmp_path / "tagged.pkl"
    path.write_bytes(pickle.dumps(S.tagged(), protocol=4))
    return path


def run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    return result


def test_json_report_figures(tagged_file):
    result = run("report", tagged_file, "--format", "json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    dev = report["devices"][0]
    assert report["schema"] == 1
    assert report["recorded_by"] is None         # not a file vramtrace wrote
    assert dev["peak_allocated"] == {"bytes": S.MODERN_PEAK_ALLOCATED, "index": 2, "time_us": 1002}
    assert dev["end"] == {"allocated": 1024, "requested": 1000, "reserved": 2 * S.MIB, "segments": 1}
    assert dev["state"]["fragmentation"] == {"internal": 5120 - 5000, "external": 2 * S.MIB - 5120}
    assert [(r["name"], r["bytes"]) for r in dev["by_owner_dtype"]] == [("activation bf16", 4096), ("weight int8", 1024)]


def test_peak_times_are_given_from_the_trace_start(tmp_path):
    snap = S.tagged()
    start = 1_764_000_000_000_000        # torch writes wall-clock epoch microseconds
    for k, e in enumerate(snap["device_traces"][0]):
        e["time_us"] = start + k * 750_000
    path = tmp_path / "timed.pkl"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    dev = json.loads(run("report", path, "--format", "json").stdout)["devices"][0]
    assert dev["time_start_us"] == start and dev["peak_allocated"]["index"] == 2
    for fmt in ("text", "md"):
        shown = run("report", path, "--format", fmt).stdout
        assert "after event 2, 1.500 s into the trace" in shown
        assert str(start)[:6] not in shown


@pytest.mark.parametrize("value, said", [("cpu", "cpu"), (["cpu"], None), ("gpu", None), ({}, None)])
def test_recorded_by_is_read_only_when_it_names_a_recorder(tmp_path, value, said):
    snap = S.tagged()
    snap["vramtrace_backend"] = value
    path = tmp_path / "by.pkl"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    result = run("report", path, "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["recorded_by"] == said


def test_at_end_and_at_index(tagged_file):
    end = json.loads(run("report", tagged_file, "--format", "json", "--at", "end").stdout)["devices"][0]
    assert [(r["name"], r["bytes"]) for r in end["by_owner"]] == [("weight", 1024)]
    first = json.loads(run("report", tagged_file, "--format", "json", "--at", "0").stdout)["devices"][0]
    assert first["state"]["allocated"] == 0 and first["state"]["reserved"] == 2 * S.MIB


def test_bad_point_and_device_are_clean_errors(tagged_file):
    r = run("report", tagged_file, "--at", "99")
    assert r.exit_code == 2 and "out of range" in r.stderr
    r = run("report", tagged_file, "--device", "3")
    assert r.exit_code == 2 and r.stderr.startswith(f"vramtrace: error: {tagged_file}: no device 3")
    r = run("report", tagged_file, "--at", "middle")
    assert r.exit_code == 2


def test_text_and_markdown_name_the_owners(tagged_file):
    text = run("report", tagged_file).stdout
    assert "activation" in text and "4.00 KiB" in text and "model.layers.*.q_proj" in text
    md = run("report", tagged_file, "--format", "md").stdout
    assert md.startswith("# vramtrace report") and "| `activation` | 4.00 KiB |" in md


def test_untagged_report_says_it_guesses():
    files = real_snapshot_files()
    if not files:
        pytest.skip("../shared is absent")
    path = next(p for p in files if p.name == "memory_snapshot.pickle" and "cranberrii" in str(p))
    result = run("report", path)
    assert result.exit_code == 0
    assert "guess from stack frames" in result.stdout
    report = json.loads(run("report", path, "--format", "json").stdout)["devices"][0]
    assert report["attribution"] == "guessed from stack frames"
    assert {r["name"] for r in report["by_phase"]} & {"forward", "backward", "optimizer step"}


def test_version_and_help():
    assert run("--version").stdout.startswith("vramtrace, version")
    assert "--format" in run("report", "--help").stdout


def test_reading_verbs_run_with_the_gc_paused_and_restore_it(tagged_file, monkeypatch):
    """The cyclic GC is off while `report` analyses (cli.READING_VERBS) and back on after,
    also when the file is bad; nothing else about the run changes."""
    import gc

    import vramtrace.commands.report as report_verb
    seen = []
    real = report_verb.build_report

    def watching(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(report_verb, "build_report", watching)
    assert gc.isenabled()
    assert run("report", tagged_file, "--format", "json").exit_code == 0
    assert seen == [False] and gc.isenabled()
    bad = tagged_file.with_name("bad.pkl")
    bad.write_bytes(b"\x80\x04garbage")
    assert run("report", bad).exit_code == 2 and gc.isenabled()


def test_guessed_report_names_the_cublas_workspace():
    """A foreign file with C++ frames: the block at::cuda::getNewWorkspace made is reported as
    the cuBLAS workspace (32 MiB on this Hopper-era file), not as the user frame of the matmul
    that first needed it."""
    files = real_snapshot_files()
    if not files:
        pytest.skip("../shared is absent")
    path = next(p for p in files if p.name == "memory_small_forward.pickle")
    rows = json.loads(run("report", path, "--format", "json").stdout)["devices"][0]["by_module"]
    workspace = [r for r in rows if r["name"].startswith("cuBLAS workspace")]
    assert [(r["bytes"], r["count"]) for r in workspace] == [(32 << 20, 1)]
