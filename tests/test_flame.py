"""`vramtrace flame`: the flame model and its outputs agree with the report's figures."""
from __future__ import annotations

import json
import pickle
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

import snapshots
from conftest import real_snapshot_params
from vramtrace.attribution.breakdown import build_report
from vramtrace.cli import cli
from vramtrace.commands.common import choose_device
from vramtrace.render.flame import FlameNode, diff_tree, flame_tree, fold, parse_folded, top_level
from vramtrace.render.flame_html import render_flame_html
from vramtrace.render.flame_svg import render_flame_svg
from vramtrace.replay.timeline import build_timeline
from vramtrace.snapshot.save import write_snapshot
from vramtrace.trace import Trace, load_trace


def _by(report: dict, key: str) -> dict[str, int]:
    return {r["name"]: r["bytes"] for r in report["devices"][0][key]}


def _flame(runner_args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["flame", *runner_args, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def tagged_file(tmp_path):
    return write_snapshot(snapshots.tagged(), tmp_path / "tagged.pkl")


def test_tagged_levels_owner_module_frames(tagged_file):
    lines = _flame([str(tagged_file)]).splitlines()
    # at the peak both allocations live: owner > folded module > frames outermost first
    assert "weight;model.layers.*.q_proj;u/train.py:42 train_step;u/model.py:10 forward 1024" in lines
    assert "activation;model.layers.*.mlp;u/train.py:42 train_step;u/model.py:10 forward 4096" in lines
    assert len(lines) == 2


def test_inverted_puts_allocation_sites_first(tagged_file):
    lines = _flame([str(tagged_file), "--inverted", "--by", "owner,stack"]).splitlines()
    assert sorted(lines) == ["u/model.py:10 forward;u/train.py:42 train_step;activation 4096",
                             "u/model.py:10 forward;u/train.py:42 train_step;weight 1024"]


@pytest.mark.parametrize("path", real_snapshot_params())
def test_folded_round_trips_to_report_totals(path, tmp_path):
    """Parse the .folded file back: per owner (and per guessed phase) the report's bytes."""
    out = tmp_path / "a.folded"
    for by, key in (("owner,module,stack", "by_owner"), ("phase,stack", "by_phase")):
        result = CliRunner().invoke(cli, ["flame", str(path), "-o", str(out), "--by", by, "-q"])
        if result.exit_code == 2 and "no device" in result.output:
            pytest.skip("snapshot holds no device")
        assert result.exit_code == 0, result.output
        tree = parse_folded(out.read_text())
        trace = load_trace(path)
        report = build_report(trace, "peak", [choose_device(trace, None, str(path)).device])
        assert top_level(tree) == {k: v for k, v in _by(report, key).items() if v}
        assert tree.value == report["devices"][0]["state"]["allocated"]


def test_fold_parse_are_inverse():
    tree = FlameNode("all")
    tree.add(["a", "b;c", "d"], 10)
    tree.add(["a"], 5)
    tree.add(["e"], 1)
    back = parse_folded("\n".join(fold(tree)))
    assert fold(back) == fold(tree) == ["a 5", "a;b,c;d 10", "e 1"]


def test_every_output_format(tagged_file, tmp_path):
    for ext in (".folded", ".svg", ".html", ".speedscope.json"):
        out = tmp_path / f"f{ext}"
        result = CliRunner().invoke(cli, ["flame", str(tagged_file), "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        text = out.read_text()
        assert "weight" in text
        if ext in (".svg", ".html"):
            assert "https://" not in text and "http://" not in text.replace('"http://www.w3.org/2000/svg"', "")
    ET.parse(tmp_path / "f.svg")                                 # well-formed standalone XML
    doc = json.loads((tmp_path / "f.speedscope.json").read_text())
    profile = doc["profiles"][0]
    assert profile["unit"] == "bytes" and sum(profile["weights"]) == profile["endValue"] == 1024 + 4096
    names = [f["name"] for f in doc["shared"]["frames"]]
    assert {names[s[0]] for s in profile["samples"]} == {"weight", "activation"}


def test_bad_output_and_levels_exit_2(tagged_file, tmp_path):
    result = CliRunner().invoke(cli, ["flame", str(tagged_file), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "x.png: unknown output type" in result.output
    result = CliRunner().invoke(cli, ["flame", str(tagged_file), "--by", "owner,colour"])
    assert result.exit_code == 2 and "colour" in result.output
    result = CliRunner().invoke(cli, ["flame", str(tmp_path / "missing.pkl")])
    assert result.exit_code == 2 and "vramtrace: error:" in result.output and "missing.pkl" in result.output
    result = CliRunner().invoke(cli, ["flame", str(tagged_file), "--at", "999"])
    assert result.exit_code == 2 and "out of range" in result.output


def _tree(snap: dict) -> FlameNode:
    trace = Trace.from_snapshot(snap)
    tl = build_timeline(trace, 0)
    return flame_tree(trace, tl, tl.peak_index)


def test_differential_tree_and_renderers():
    before = _tree(snapshots.tagged())
    grown = snapshots.tagged()
    grown["device_traces"][0][2]["size"] = 8000            # the activation grows to 8000 B (8192 rounded)
    after = _tree(grown)
    merged = diff_tree(before, after)
    activation = merged.children["activation"]
    assert (activation.before, activation.value) == (4096, 8192)
    assert merged.children["weight"].before == merged.children["weight"].value == 1024
    svg = render_flame_svg(after, diff=before, title="t")
    assert "baseline 4.00 KiB, change +4.00 KiB" in svg and "rgb(255," in svg
    page = render_flame_html(after, diff=before)
    assert "baseline" in page and "+4.00 KiB" in page


@pytest.mark.parametrize("verb, ext", [("flame", ".svg"), ("html", ".html"), ("viz", ".pkl"), ("export", ".json")])
def test_malformed_frames_are_one_line_errors(verb, ext, tmp_path):
    """Frames are read lazily, after loading: a bad one still ends as `vramtrace: error: FILE: ...`."""
    snap = snapshots.modern()
    for event in snap["device_traces"][0]:
        event["frames"] = [{"name": 5, "filename": "x.py", "line": 1}]
    src = tmp_path / "bad.pkl"
    src.write_bytes(pickle.dumps(snap, protocol=4))
    result = CliRunner().invoke(cli, [verb, str(src), "-o", str(tmp_path / f"out{ext}"), "-q"])
    assert result.exit_code == 2
    assert result.output.strip() == f"vramtrace: error: {src}: a stack frame has a non-text name/filename or non-integer line"
