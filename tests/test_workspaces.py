"""cuBLAS workspaces told apart from activations (vramtrace.attribution.workspaces)."""
from __future__ import annotations

import pytest

from conftest import real_snapshot_files
from vramtrace.attribution.workspaces import CUBLAS_WS_DEFAULT, CUBLAS_WS_HOPPER, cublas_workspace_sizes, \
    cublaslt_workspace_sizes, is_workspace_frame
from vramtrace.snapshot.load import load_snapshot

_FREES = ("free_requested", "free_completed")


def test_workspace_sizes_follow_cublas_workspace_config():
    assert cublas_workspace_sizes({}) >= {CUBLAS_WS_DEFAULT, CUBLAS_WS_HOPPER}
    assert CUBLAS_WS_DEFAULT == 8519680 and CUBLAS_WS_HOPPER == 33554432   # torch's ":4096:2:16:8", ":4096:8"
    assert cublas_workspace_sizes({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) == {CUBLAS_WS_HOPPER}
    assert cublas_workspace_sizes({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == {16 * 1024 * 8}  # deterministic mode
    assert cublas_workspace_sizes({"CUBLAS_WORKSPACE_CONFIG": "nonsense"}) == cublas_workspace_sizes({})
    assert cublaslt_workspace_sizes({}) == {1 << 20}
    assert cublaslt_workspace_sizes({"CUBLASLT_WORKSPACE_SIZE": "4096"}) == {4 << 20}


def test_size_and_never_freed_pick_exactly_the_workspaces_real_cxx_frames_name():
    """On every real snapshot with C++ frames: the allocations made by at::cuda::getNewWorkspace
    are exactly those of a workspace size that the trace never frees (what the CUDA backend goes
    by when it has Python stacks only)."""
    files = real_snapshot_files()
    if not files:
        pytest.skip("../shared/fixtures/real-snapshots is absent")
    sizes, found = cublas_workspace_sizes({}), 0
    for path in files:
        for trace in load_snapshot(path).get("device_traces", []):
            never_freed: dict[int, dict] = {}    # addr -> the alloc event live there
            for event in trace:
                if event["action"] == "alloc":
                    never_freed[event["addr"]] = event
                elif event["action"] in _FREES:
                    never_freed.pop(event["addr"], None)
            by_frames = {id(e) for e in _allocs(trace)
                         if any(is_workspace_frame(f.get("name", "")) for f in e.get("frames") or ())}
            by_size = {id(e) for e in never_freed.values() if e["size"] in sizes}
            assert by_size == by_frames, path.name
            found += len(by_frames)
    assert found >= 8   # nine in eight files of ../shared when this test was written


def _allocs(trace: list[dict]) -> list[dict]:
    return [e for e in trace if e["action"] == "alloc"]
