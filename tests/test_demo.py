"""The README's first command: `vramtrace demo` records and reports a real training run."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import validate_memviz
from vramtrace.attribution.breakdown import build_report
from vramtrace.cli import cli
from vramtrace.examples.tiny_training import TinyLM
from vramtrace.trace import load_trace


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.pkl"
    result = CliRunner().invoke(cli, ["demo", "-o", str(path), "--backend", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "by owner" in result.stdout and "trainable" in result.stdout
    return path


def test_demo_file_opens_in_the_viewer(demo_file):
    validate_memviz(demo_file)


def test_demo_peak_holds_the_weights_and_adam_state(demo_file):
    n_params = sum(p.numel() for p in TinyLM().parameters())
    n_tensors = len(list(TinyLM().parameters()))
    owners = {r["name"]: r for r in build_report(load_trace(demo_file), "peak")["devices"][0]["by_owner"]}
    weight_bytes = 4 * n_params
    # each parameter is its own block, rounded up to 512 B
    assert weight_bytes <= owners["trainable"]["bytes"] <= weight_bytes + 512 * n_tensors
    assert owners["trainable"]["count"] == n_tensors
    # AdamW: exp_avg and exp_avg_sq in fp32 per parameter, plus a scalar step tensor each
    adam_bytes = 2 * weight_bytes
    assert adam_bytes <= owners["optimizer"]["bytes"] <= adam_bytes + 512 * 3 * n_tensors


def test_demo_stacks_show_the_demo_training_script(demo_file):
    """Only the tracker's frames are left out of stacks, not the program vramtrace ships."""
    top = build_report(load_trace(demo_file), "peak")["devices"][0]["top_stacks"]
    assert any("tiny_training.py" in line for s in top for line in s["frames"])
    assert not any("capture/" in line for s in top for line in s["frames"])


def test_demo_reruns_over_its_own_file(tmp_path):
    path = tmp_path / "again.pkl"
    for steps in ("2", "1"):
        result = CliRunner().invoke(cli, ["demo", "-o", str(path), "--backend", "cpu", "--steps", steps])
        assert result.exit_code == 0
        if steps == "2":
            two_steps = load_trace(path).n_events
    assert 0 < load_trace(path).n_events < two_steps
