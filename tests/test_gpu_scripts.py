"""The GPU check scripts, dry-run on the CPU so they still work when a GPU session comes.

``tools/gpu_simulate_vs_real.py --device cpu`` runs the same build and step on real CPU tensors
through the CPU recorder, which must predict exactly what the fake-tensor simulation predicts;
``benchmarks/bench_cuda.py --device cpu`` runs every code path but the CUDA recording."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("transformers")


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600)


def test_simulate_vs_real_dry_run_agrees_exactly(tmp_path: Path) -> None:
    out = run("tools/gpu_simulate_vs_real.py", "--recipe", "lora-fp16-bf16-autocast", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert "error" not in row, row
    for key in ("peak_allocated", "peak_reserved"):
        assert row["predicted"][key] == row["real"][key] > 0, (key, row)


def test_bench_cuda_dry_run(tmp_path: Path) -> None:
    out = run("benchmarks/bench_cuda.py", "--rounds", "1", "--warmup", "0", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vramtrace / untagged" in out.stdout
    assert json.loads((tmp_path / "b.json").read_text())


def test_bad_device_is_a_usage_error() -> None:
    out = run("benchmarks/bench_cuda.py", "--device", "tpu")
    assert out.returncode == 2 and "--device must be" in out.stderr and "Traceback" not in out.stderr
