"""simulate_step: run a user's training step on fake tensors and predict the GPU's memory.

The step runs under ``FakeTensorMode`` (shapes, dtypes and storages, no data) with the
allocation tracker on top; the tracker's alloc/free events are replayed through the caching
allocator model, which yields a snapshot dict in PyTorch's exact format plus the peaks.
``fake=False`` runs the very same code on real CPU tensors (used to check the simulation).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vramtrace.attribution import taxonomy as tx
from vramtrace.replay.allocator import AllocatorSettings, CachingAllocatorModel
from vramtrace.simulate.gpu_semantics import cuda_semantics
from vramtrace.simulate.tracker import AllocationTracker

ModelFactory = Callable[[], "nn.Module | tuple[nn.Module, torch.optim.Optimizer | None]"]
StepFn = Callable[[nn.Module, "torch.optim.Optimizer | None"], Any]

_ACTIVE: list[AllocationTracker] = []


@dataclass
class SimulationResult:
    """What a simulated run predicts for the device's caching allocator."""
    snapshot: dict
    peak_allocated: int                  # bytes in allocated blocks (rounded sizes) at the peak
    peak_reserved: int                   # bytes in segments (what nvidia-smi sees, minus context)
    peak_requested: int                  # bytes requested by tensors at the allocated peak
    owners_at_peak: dict[str, int]       # requested bytes per owner at the allocated peak
    phase_at_peak: str
    final_owners: dict[str, int]         # requested bytes per owner still live at the end
    data_dependent_allocs: int           # allocations whose size needs data (counted as 0)
    wall_s: float
    params: dict[str, int] = field(default_factory=dict)   # numel of trainable / frozen params
    recipe: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """Plain-data summary (JSON output, without the snapshot)."""
        return {"peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                "peak_requested": self.peak_requested, "owners_at_peak": self.owners_at_peak,
                "phase_at_peak": self.phase_at_peak, "final_owners": self.final_owners,
                "data_dependent_allocs": self.data_dependent_allocs, "wall_s": round(self.wall_s, 3),
                "params": self.params, "recipe": self.recipe}


def paused() -> contextlib.AbstractContextManager:
    """Within a model factory: storages made here are not recorded (e.g. a skeleton to be loaded)."""
    return _ACTIVE[-1].paused() if _ACTIVE else contextlib.nullcontext()


@contextlib.contextmanager
def _mode(fake: bool) -> Iterator[None]:
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    # a ShapeEnv lets data-dependent sizes (LLM.int8() outlier columns) be symbolic instead of failing;
    # real inputs are allowed for bitsandbytes' constant lookup tables built outside fake mode
    original_swap = torch.utils.swap_tensors

    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        # Module._apply swaps FakeTensor parameters, which fails while the fake mode holds weakrefs
        # to them; re-pointing the parameter at the converted data is the same memory effect.
        if isinstance(t1, FakeTensor) and t1.shape == t2.shape:
            with torch.no_grad():
                t1.data = t2.data
            return
        original_swap(t1, t2)

    torch.utils.swap_tensors = swap_tensors
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.utils.swap_tensors = original_swap


def simulate_step(model_factory: ModelFactory, step_fn: StepFn, *, steps: int = 1, fake: bool = True,
                  settings: AllocatorSettings | None = None, recipe: dict[str, Any] | None = None) -> SimulationResult:
    """Predict the GPU memory of ``steps`` calls of ``step_fn(model, optimizer)``.

    ``model_factory()`` builds the model (and optionally its optimizer, as a tuple) inside the
    simulation, so its weights are recorded as the GPU would hold them; it must create tensors
    on the default (CPU) device. Everything runs on fake tensors unless ``fake=False``.
    """
    t0 = time.perf_counter()
    tracker = AllocationTracker()
    _ACTIVE.append(tracker)
    try:
        with _mode(fake), cuda_semantics(), tracker:
            built = model_factory()
            model, optimizer = built if isinstance(built, tuple) else (built, None)
            tracker.ctx.track_model(model)
            for _ in range(steps):
                step_fn(model, optimizer)
            tracker.ctx.sweep()
            params = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
            result = replay(tracker, settings)
            del model, optimizer, built
    finally:
        _ACTIVE.remove(tracker)
    result.params = params
    result.recipe = recipe
    result.wall_s = time.perf_counter() - t0
    return result


def replay(tracker: AllocationTracker, settings: AllocatorSettings | None = None) -> SimulationResult:
    """Feed the tracker's events through the caching-allocator model (owners are final tags)."""
    alloc = CachingAllocatorModel(settings or AllocatorSettings(), device=0)
    addr_of: dict[int, int] = {}
    by_owner: dict[str, int] = {}
    peak = -1
    at_peak: dict[str, int] = {}
    phase_at_peak = ""
    dd = 0
    for kind, rec in tracker.events:
        if rec.nbytes == 0:
            dd += rec.data_dependent and kind == "alloc"
            continue
        owner = rec.tag.owner
        fields = {"time_us": rec.time_us, "category": owner, "user_metadata": rec.tag.to_json(),
                  "compile_context": "N/A",
                  "frames": [{"name": rec.op, "filename": rec.tag.module or "<step>", "line": 0}]}
        if kind == "alloc":
            addr_of[rec.seq] = alloc.malloc(rec.nbytes, **fields)
            by_owner[owner] = by_owner.get(owner, 0) + rec.nbytes
            if alloc.allocated > peak:
                peak, at_peak, phase_at_peak = alloc.allocated, dict(by_owner), rec.created_phase
        else:
            del fields["frames"]
            alloc.free(addr_of.pop(rec.seq), **fields)
            by_owner[owner] -= rec.nbytes
    snap = alloc.snapshot()
    final = {o: b for o, b in by_owner.items() if b}
    return SimulationResult(snapshot=snap, peak_allocated=alloc.peak_allocated, peak_reserved=alloc.peak_reserved,
                            peak_requested=sum(at_peak.values()), owners_at_peak=_ordered(at_peak),
                            phase_at_peak=phase_at_peak, final_owners=_ordered(final),
                            data_dependent_allocs=dd, wall_s=0.0)


def _ordered(d: dict[str, int]) -> dict[str, int]:
    return {o: d[o] for o in tx.OWNERS if d.get(o)}
