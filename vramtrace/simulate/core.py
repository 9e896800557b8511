"""simulate_step: run a user's training step on fake tensors and predict the GPU's memory.

The step runs under ``FakeTensorMode`` (shapes, dtypes and storages, no data) with the CPU
recorder of ``vramtrace record`` on top (a dispatch mode keyed by storage identity, with the
shared owner tagger); its events are replayed through the caching-allocator model, which yields
a snapshot dict in PyTorch's exact format, and ``vramtrace report``'s figures at the peak.
``fake=False`` runs the very same code on real CPU tensors (used to check the simulation).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vramtrace.attribution.breakdown import device_report
from vramtrace.capture.cpu_backend import CpuBackend
from vramtrace.capture.tagging import Tag
from vramtrace.replay.timeline import build_timeline
from vramtrace.simulate.gpu_semantics import cuda_semantics
from vramtrace.trace import Trace

ModelFactory = Callable[[], "nn.Module | tuple[nn.Module, torch.optim.Optimizer | None]"]
StepFn = Callable[[nn.Module, "torch.optim.Optimizer | None"], Any]

_ACTIVE: list[CpuBackend] = []


class SimBackend(CpuBackend):
    """The CPU recorder, plus storages that stand for CUDA managed memory (paged optimizer
    state), which the caching allocator never sees and the snapshot must not hold."""

    name = "simulate"

    def __init__(self, stacks: str | None = None) -> None:
        super().__init__(stacks=stacks)
        self._managed: set[int] = set()
        self.managed_bytes = 0

    def add_managed(self, t: torch.Tensor) -> None:
        """``t`` lives outside the caching allocator (CUDA managed memory): never record it."""
        st = t.untyped_storage()
        self._managed.add(st._cdata)
        self.managed_bytes += st.nbytes()

    def observe_storage(self, t: torch.Tensor, st: torch.UntypedStorage, func: Any = None,
                        args: tuple = ()) -> None:
        if not self._managed or st._cdata not in self._managed:
            super().observe_storage(t, st, func, args)

    def retag(self, tensor: torch.Tensor, tag: Tag) -> None:
        if not self._managed or tensor.untyped_storage()._cdata not in self._managed:
            super().retag(tensor, tag)


@dataclass
class SimulationResult:
    """What a simulated run predicts for the device's caching allocator."""
    snapshot: dict                       # PyTorch snapshot format, owners in category/user_metadata
    report: dict                         # ``vramtrace report``'s device figures at the allocated peak
    wall_s: float
    params: dict[str, int] = field(default_factory=dict)   # numel of trainable / frozen params
    managed_bytes: int = 0               # CUDA managed memory outside the allocator (paged optimizers)
    recipe: dict[str, Any] | None = None

    @property
    def peak_allocated(self) -> int:
        """Bytes in allocated (rounded) blocks at the peak."""
        return int(self.report["peak_allocated"]["bytes"])

    @property
    def peak_reserved(self) -> int:
        """Bytes in cudaMalloc'd segments at their peak (nvidia-smi shows this plus the context)."""
        return int(self.report["peak_reserved"]["bytes"])

    @property
    def owners_at_peak(self) -> dict[str, int]:
        """Block bytes per owner live at the allocated peak, largest first."""
        return {row["name"]: int(row["bytes"]) for row in self.report["by_owner"]}

    def summary(self) -> dict[str, Any]:
        """Plain-data summary (JSON output, without the snapshot)."""
        rep = self.report
        return {"peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                "owners_at_peak": self.owners_at_peak,
                "owner_dtype_at_peak": {r["name"]: int(r["bytes"]) for r in rep["by_owner_dtype"]},
                "phase_at_peak": {r["name"]: int(r["bytes"]) for r in rep["by_phase"]},
                "modules_at_peak": {r["name"]: int(r["bytes"]) for r in rep["by_module"][:10]},
                "managed_bytes": self.managed_bytes,
                "end": rep["end"], "events": rep["events"], "wall_s": round(self.wall_s, 3),
                "params": self.params, "recipe": self.recipe}


def managed(t: torch.Tensor) -> torch.Tensor:
    """Within a simulation: ``t`` stands for CUDA managed memory (paged optimizer state), which
    the caching allocator never sees; its bytes are reported as ``managed_bytes``."""
    if _ACTIVE:
        _ACTIVE[-1].add_managed(t)
    return t


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Within a model factory: storages made here are not recorded (e.g. a skeleton to be loaded)."""
    backend = _ACTIVE[-1] if _ACTIVE else None
    if backend is None or not backend.active:
        yield
        return
    backend.active = False
    try:
        yield
    finally:
        backend.active = True


@contextlib.contextmanager
def _mode(fake: bool) -> Iterator[None]:
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
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
        # real inputs are allowed for bitsandbytes' constant lookup tables built outside fake mode
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.utils.swap_tensors = original_swap


def simulate_step(model_factory: ModelFactory, step_fn: StepFn, *, steps: int = 1, fake: bool = True,
                  stacks: bool = False, recipe: dict[str, Any] | None = None) -> SimulationResult:
    """Predict the GPU memory of ``steps`` calls of ``step_fn(model, optimizer)``.

    ``model_factory()`` builds the model (and optionally its optimizer, as a tuple) inside the
    simulation, so its weights are recorded as the GPU would hold them; it must create tensors
    on the default (CPU) device. Everything runs on fake tensors unless ``fake=False``, through
    the same CPU recorder as ``vramtrace record`` (``stacks`` records Python frames, slower).
    """
    t0 = time.perf_counter()
    backend = SimBackend(stacks="python" if stacks else None)
    _ACTIVE.append(backend)
    try:
        with _mode(fake), cuda_semantics():
            backend.start()
            try:
                built = model_factory()
                model, optimizer = built if isinstance(built, tuple) else (built, None)
                backend.ctx.track_model(model)
                for _ in range(steps):
                    step_fn(model, optimizer)
                snap = backend.snapshot()
                params = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                          "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
            finally:
                backend.stop()
    finally:
        _ACTIVE.remove(backend)
    trace = Trace.from_snapshot(snap)
    report = device_report(trace, build_timeline(trace, 0), "peak")
    return SimulationResult(snapshot=snap, report=report, wall_s=time.perf_counter() - t0,
                            params=params, managed_bytes=backend.managed_bytes, recipe=recipe)
