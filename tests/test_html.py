"""`vramtrace html`: a self-contained page, smaller than the trace, that states its own size."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

import snapshots
from conftest import REAL_SNAPSHOTS
from vramtrace.cli import cli
from vramtrace.render.html_report import MAX_POINTS
from vramtrace.render.units import fmt_bytes
from vramtrace.replay.timeline import build_timeline
from vramtrace.snapshot.save import write_snapshot
from vramtrace.trace import load_trace

LARGEST = REAL_SNAPSHOTS / "kkaitlyn111__cs336-a2-systems" / "memory_2.7b_forward.pickle"
SECOND = REAL_SNAPSHOTS / "kkaitlyn111__cs336-a2-systems" / "memory_ctx128_forward.pickle"
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[^\s"'>]+|https?://(?!www\.w3\.org/2000/svg)""")


def _html(*args: str) -> str:
    result = CliRunner().invoke(cli, ["html", *args, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stderr


def _chart_data(page: str) -> dict:
    return json.loads(re.search(r'class=chart-data>(.*?)</script>', page, re.S).group(1))


@pytest.fixture(scope="module")
def largest_page(tmp_path_factory):
    if not LARGEST.is_file():
        pytest.skip("../shared/fixtures/real-snapshots is absent")
    out = tmp_path_factory.mktemp("html") / "report.html"
    _html(str(LARGEST), "-o", str(out))
    return out


def test_largest_real_snapshot_page_is_smaller_than_its_input(largest_page):
    assert largest_page.stat().st_size < LARGEST.stat().st_size


def test_page_states_its_own_size(largest_page):
    page = largest_page.read_text()
    assert f"This page: {fmt_bytes(len(page.encode()))}," in page


def test_page_is_self_contained(largest_page):
    page = largest_page.read_text()
    assert not EXTERNAL.findall(page)
    assert "<script" in page and "<style>" in page


def test_big_trace_is_summarised_with_its_peak(largest_page):
    page = largest_page.read_text()
    data = _chart_data(page)
    tl = build_timeline(load_trace(LARGEST), 0)
    assert len(data["x"]) <= MAX_POINTS < tl.n_events
    assert tl.peak_index in data["x"]
    at_peak = data["v"][data["x"].index(tl.peak_index)]
    assert sum(at_peak) == tl.peak_allocated
    assert "phases guessed from stack frames" in page and "Flame graph at peak" in page


def test_tagged_page_shows_owners(tmp_path):
    src = write_snapshot(snapshots.tagged(), tmp_path / "tagged.pkl")
    out = tmp_path / "r.html"
    _html(str(src), "-o", str(out))
    page = out.read_text()
    assert _chart_data(page)["names"] == ["activation", "weight"]
    for text in ("by owner", "weight", "activation", "model.layers.*.mlp", "Memory over time, stacked by owner"):
        assert text in page, text
    assert "id=oom" not in page and "id=diff" not in page


def test_oom_details(tmp_path):
    src = write_snapshot(snapshots.with_oom(), tmp_path / "oom.pkl")
    out = tmp_path / "r.html"
    _html(str(src), "-o", str(out))
    page = out.read_text()
    assert "id=oom" in page and "80.00 GiB" in page and "3.00 MiB" in page and ">OOM</text>" in page


def test_two_files_add_the_diff_and_a_differential_flame(tmp_path):
    if not SECOND.is_file():
        pytest.skip("../shared/fixtures/real-snapshots is absent")
    out = tmp_path / "diff.html"
    _html(str(LARGEST), str(SECOND), "-o", str(out))
    page = out.read_text()
    assert "id=diff" in page and "peak allocated: 32.01 GiB -&gt; 18.16 GiB" in page
    assert page.count('class="flamegraph"') == 2 and "baseline" in page
    assert not EXTERNAL.findall(page)


def test_bad_input_exits_2(tmp_path):
    src = write_snapshot(snapshots.tagged(), tmp_path / "tagged.pkl")
    for args, words in ((["html", str(tmp_path / "nope.pkl"), "-o", str(tmp_path / "r.html")], "nope.pkl"),
                        (["html", str(src), str(tmp_path / "gone.pkl"), "-o", str(tmp_path / "r.html")], "gone.pkl"),
                        (["html", str(src), "-o", str(tmp_path / "r.html"), "-d", "3"], "no device 3"),
                        (["html", str(src), "-o", str(tmp_path / "r.html"), "--at", "x"], "x")):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and words in result.output, result.output
