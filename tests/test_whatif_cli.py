"""`vramtrace whatif`: the model replays a real file under its own and other settings."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import REAL_SNAPSHOTS
from vramtrace.cli import cli
from vramtrace.replay.timeline import build_timeline
from vramtrace.trace import load_trace

FILE = REAL_SNAPSHOTS / "cranberrii__ftcourse" / "memory_snapshot.pickle"


@pytest.fixture
def real_file():
    if not FILE.is_file():
        pytest.skip("../shared is absent")
    return FILE


def whatif(*args):
    result = CliRunner().invoke(cli, ["whatif", *map(str, args), "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_recorded_settings_reproduce_the_recorded_peak(real_file):
    out = whatif(real_file, "--check")
    tl = build_timeline(load_trace(real_file), 0)
    assert out["predicted_peak_reserved"] == out["recorded_peak_reserved"] == tl.peak_reserved
    assert out["model_agreement"][0]["same_address_pct"] == 100.0
    assert out["model_agreement"][0]["final_state_exact"] is True


def test_expandable_segments_lower_the_reserved_peak(real_file):
    out = whatif(real_file, "--conf", "expandable_segments:True", "--capacity", "80GiB")
    assert out["settings"]["expandable_segments"] is True
    assert 0 < out["reserved_saving"] < out["recorded_peak_reserved"]
    assert out["oom_event"] is None


def test_a_card_too_small_reports_the_first_oom(real_file):
    out = whatif(real_file, "--capacity", "4GiB")
    assert out["oom_event"] is not None


def test_bad_capacity_is_a_clean_error(real_file):
    result = CliRunner().invoke(cli, ["whatif", str(real_file), "--capacity", "lots"])
    assert result.exit_code == 2 and result.stderr.startswith("vramtrace: error:")
