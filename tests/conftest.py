"""Shared test fixtures: the real snapshots in ../shared (skipped cleanly where absent)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; VRAMTRACE_SHARED names another place (a machine it was copied to)
SHARED = Path(os.environ.get("VRAMTRACE_SHARED") or REPO.parent / "shared")
REAL_SNAPSHOTS = SHARED / "fixtures" / "real-snapshots"
VALIDATOR = SHARED / "tools" / "validate_memviz.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where torch sees no CUDA device (the marker's promise)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def real_snapshot_files() -> list[Path]:
    if not REAL_SNAPSHOTS.is_dir():
        return []
    return sorted(p for p in REAL_SNAPSHOTS.glob("*/*") if p.is_file() and p.suffix != ".md")


def real_snapshot_params() -> list:
    files = real_snapshot_files()
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason="../shared/fixtures/real-snapshots is absent"))]
    return [pytest.param(p, id=f"{p.parent.name[:18]}/{p.name[:28]}") for p in files]


def validate_memviz(*paths: Path) -> None:
    """Run PyTorch-viewer rule checker on written files; skip where ../shared is absent."""
    if not VALIDATOR.is_file():
        pytest.skip("../shared/tools/validate_memviz.py is absent")
    out = subprocess.run([sys.executable, str(VALIDATOR), *map(str, paths)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def tiny_llama_config():
    """The tiny Llama the capture tests train: hidden 64, 2 layers, vocab 128 (transformers
    imported here, so modules that skip without it can still import conftest)."""
    import transformers
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                    max_position_embeddings=64)
