"""GPU catalogue: capacity and the memory a process loses before its first tensor.

``total_bytes`` is the "memory.total" nvidia-smi prints (MiB x 2**20). ``context_bytes`` is
what a PyTorch process holds outside the caching allocator once it has run a training step:
the CUDA context (driver state, lazily loaded kernel images, cuDNN/cuBLAS handles). The cuBLAS
workspace goes through the caching allocator since PyTorch 1.11 but is not seen by the
simulation (it is made by the CUDA build only), so it is added to the reserved prediction.
Justification and sources: docs/simulation.md, "GPU catalogue".
"""
from __future__ import annotations

from dataclasses import dataclass

from vramtrace.attribution.workspaces import CUBLAS_WS_DEFAULT, CUBLAS_WS_HOPPER

MiB = 1 << 20
# cuBLAS handles a training step uses on one device, each with its own workspace: the main
# thread's (forward, optimizer) and the autograd engine's device thread's (backward). Seen on an
# H200 (torch 2.11): two 32 MiB workspaces, forward and backward; the real peak was the
# simulated one plus 63.99 MiB on all three recipes of tools/gpu_simulate_vs_real.py.
TRAINING_CUBLAS_HANDLES = 2


@dataclass(frozen=True)
class GPU:
    """One GPU model as a training process sees it."""
    name: str
    total_bytes: int
    context_bytes: int
    cublas_workspace_bytes: int
    arch: str

    @property
    def workspaces_bytes(self) -> int:
        """The cuBLAS workspaces of a training step (one per handle; see TRAINING_CUBLAS_HANDLES)."""
        return TRAINING_CUBLAS_HANDLES * self.cublas_workspace_bytes

    @property
    def usable_bytes(self) -> int:
        """What the caching allocator can reserve: total minus context and cuBLAS workspaces."""
        return self.total_bytes - self.context_bytes - self.workspaces_bytes


def _gpu(name: str, total_mib: int, context_mib: int, arch: str) -> GPU:
    ws = CUBLAS_WS_HOPPER if arch in ("hopper", "blackwell") else CUBLAS_WS_DEFAULT
    return GPU(name, total_mib * MiB, context_mib * MiB, ws, arch)


GPUS: dict[str, GPU] = {g.name: g for g in (
    _gpu("a100-40gb", 40960, 500, "ampere"),
    _gpu("a100-80gb", 81920, 500, "ampere"),
    _gpu("h100-80gb", 81559, 550, "hopper"),
    _gpu("h200-141gb", 143771, 550, "hopper"),
    _gpu("l4-24gb", 23034, 450, "ada"),
    _gpu("rtx4090-24gb", 24564, 450, "ada"),
    _gpu("rtx3090-24gb", 24576, 450, "ampere"),
    _gpu("a10g-24gb", 23028, 450, "ampere"),
    _gpu("t4-16gb", 15360, 400, "turing"),
    _gpu("v100-16gb", 16160, 400, "volta"),
    _gpu("v100-32gb", 32510, 400, "volta"),
)}


def get_gpu(name: str) -> GPU:
    """Look a GPU up by catalogue name (case-insensitive)."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


@dataclass(frozen=True)
class Fit:
    """Verdict for one simulated run on one GPU."""
    gpu: GPU
    peak_reserved: int
    needed_bytes: int       # reserved peak + cuBLAS workspaces + context: nvidia-smi's figure

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.gpu.total_bytes

    @property
    def headroom_bytes(self) -> int:
        """Positive: bytes to spare; negative: bytes short."""
        return self.gpu.total_bytes - self.needed_bytes

    def verdict(self) -> str:
        gib = float(1 << 30)
        if self.fits:
            return f"fits on {self.gpu.name} ({self.headroom_bytes / gib:.2f} GiB to spare)"
        return f"does not fit on {self.gpu.name}, short by {-self.headroom_bytes / gib:.2f} GiB"

    def to_dict(self) -> dict:
        return {"gpu": self.gpu.name, "total_bytes": self.gpu.total_bytes,
                "context_bytes": self.gpu.context_bytes,
                "cublas_workspaces_bytes": self.gpu.workspaces_bytes,
                "peak_reserved": self.peak_reserved, "needed_bytes": self.needed_bytes,
                "fits": self.fits, "headroom_bytes": self.headroom_bytes, "verdict": self.verdict()}


def fit(gpu: GPU, peak_reserved: int) -> Fit:
    """Would a run whose allocator reserves ``peak_reserved`` at most fit on ``gpu``?

    The allocator retries by freeing its cache before failing, so a peak of reserved bytes
    that exceeds capacity because of cached-but-free blocks could still fit; the reserved peak
    is the conservative bound, the allocated peak plus overheads the optimistic one.
    """
    return Fit(gpu, peak_reserved, peak_reserved + gpu.workspaces_bytes + gpu.context_bytes)
