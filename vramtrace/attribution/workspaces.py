"""cuBLAS workspaces: caching-allocator blocks that belong to no tensor.

PyTorch gives each cuBLAS handle and stream a workspace from the caching allocator
(``at::cuda::getNewWorkspace`` in aten/src/ATen/cuda/CublasHandlePool.cpp): made inside the first
matmul that needs it and kept for the rest of the process. With Python stacks only, it looks like
a temporary made in forward and still alive when backward begins, which the lifetime rules call
an activation; on a small model it can be the largest "activation" of all. The taxonomy counts
workspaces as temporaries.

Without C++ frames it is known by its size and by never being freed. On the real snapshots in
../shared that have C++ frames, "a cuBLAS workspace size, never freed in the trace" picks exactly
the ``getNewWorkspace`` allocations (tests/test_workspaces.py). cuBLASLt has a workspace of its
own unless torch unifies the two (``TORCH_CUBLASLT_UNIFIED_WORKSPACE``): ``CUBLASLT_WORKSPACE_SIZE``
KiB, 1 MiB by default; torch 2.11 on an H200 made one beside the 32 MiB cuBLAS one, in the first
forward linear, never freed.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

# torch's defaults per (handle, stream): ":4096:8" on compute capability 9, 10 and 12 (Hopper,
# Blackwell), ":4096:2:16:8" before; ROCm builds 32 MiB, or 128 MiB on gfx94x/gfx95x.
CUBLAS_WS_HOPPER = 4096 * 1024 * 8
CUBLAS_WS_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
_ROCM_WS_LARGE = 128 * 1024 * 1024
_DEFAULT_SIZES = frozenset({CUBLAS_WS_HOPPER, CUBLAS_WS_DEFAULT, _ROCM_WS_LARGE})

# C++ frames (stacks="all") of the functions that allocate a workspace
_WORKSPACE_FRAMES = ("at::cuda::getNewWorkspace", "at::cuda::getCUDABlasLtWorkspace")
_CONFIG_PAIR = re.compile(r":([0-9]+):([0-9]+)")
_CUBLASLT_DEFAULT_KIB = 1024

# user_metadata["workspace"] of such an allocation
CUBLAS, CUBLASLT = "cuBLAS", "cuBLASLt"


def cublas_workspace_sizes(env: Mapping[str, str] = os.environ) -> frozenset[int]:
    """Sizes a cuBLAS workspace can have in a process with this environment: the one
    ``CUBLAS_WORKSPACE_CONFIG`` asks for (``:SIZE_KiB:COUNT`` pairs, summed, as torch parses it),
    else torch's defaults for every architecture (the device is not known from a file)."""
    config = env.get("CUBLAS_WORKSPACE_CONFIG") or env.get("HIPBLAS_WORKSPACE_CONFIG") or ""
    pairs = _CONFIG_PAIR.findall(config)
    if not pairs:
        return _DEFAULT_SIZES
    return frozenset({sum(int(size) * 1024 * int(count) for size, count in pairs)})


def cublaslt_workspace_sizes(env: Mapping[str, str] = os.environ) -> frozenset[int]:
    """Size of a separate cuBLASLt workspace: ``CUBLASLT_WORKSPACE_SIZE`` KiB, else 1 MiB."""
    value = env.get("CUBLASLT_WORKSPACE_SIZE", "")
    kib = int(value) if value.isdigit() else _CUBLASLT_DEFAULT_KIB
    return frozenset({kib * 1024})


def is_workspace_frame(name: str) -> bool:
    """Whether a (C++) frame is the call that allocates a cuBLAS workspace."""
    return name.startswith(_WORKSPACE_FRAMES)
