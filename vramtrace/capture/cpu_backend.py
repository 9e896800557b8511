"""CPU capture backend: exact alloc/free of tensor storages, replayed through the allocator model.

A TorchDispatchMode sees every op output; a storage it has not seen before is an allocation, and
the callback of a weak reference to that storage reports its free (DESIGN §7). No strong
reference to any tensor or storage is kept, so recording does not change what it measures. At dump time the
events go through :class:`vramtrace.replay.allocator.CachingAllocatorModel`, which lays them out
as a CUDA caching allocator would and yields a snapshot dict in PyTorch's exact format, with the
*final* owner (re-tags applied by allocation identity) in ``category``/``user_metadata`` of each
alloc event.
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch._C._profiler import CapturedTraceback, gather_traceback, symbolize_tracebacks
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode

from vramtrace.attribution import taxonomy as tx
from vramtrace.capture.lifetimes import BackwardEntry, final_owner, owner_when_kept
from vramtrace.capture.tagging import OWNER_PRIORITY, Tag, TaggingContext
from vramtrace.gcpause import gc_paused
from vramtrace.replay import allocator
from vramtrace.snapshot.save import RECORDED_BY

# The tracker's own frames (vramtrace/capture/): not the demo's training script or the
# simulator's step, which are the program being measured.
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_SKIP_FILES = frozenset({
    os.path.join(_TORCH_DIR, "utils", "_python_dispatch.py"),
    os.path.join(_TORCH_DIR, "_ops.py"),
    os.path.join(_TORCH_DIR, "_compile.py"),
    os.path.join(_TORCH_DIR, "_dynamo", "eval_frame.py"),
    weakref.__file__,
})
_PARAM_OWNERS = frozenset({tx.WEIGHT, tx.TRAINABLE, tx.QUANT_STATE})


def capture_stack() -> CapturedTraceback:
    """The caller's Python stack, captured natively as (code, instruction) pairs.

    torch's own traceback capture (what the CUDA allocator records) walks the frames in C++,
    ~4x faster than a Python loop over ``f_back``; names and lines are resolved once, at dump
    (:class:`StackResolver`). It holds code objects only, never frames or their locals."""
    return gather_traceback(True, False, False)


class StackResolver:
    """Frame lists (snapshot format, innermost first) of captured stacks, in one native call.

    The tracker's own frames and torch's dispatch plumbing are left out. Identical frames are
    one dict object, so the pickle stores each once; every event gets a list of its own."""

    def __init__(self, stacks: Iterable[CapturedTraceback | None]) -> None:
        captured = [tb for tb in stacks if tb is not None]
        # Symbolizing imports torch's fx/dynamo machinery on first use in a process (~1 s
        # when the program has not loaded it already); torch's own snapshots pay the same.
        resolved = symbolize_tracebacks(captured) if captured else []
        # symbolize returns one dict per distinct frame, and a training loop repeats a few
        # hundred distinct stacks: filter each distinct stack once, found by its frames' ids
        filtered: dict[tuple[int, ...], list[dict]] = {}
        self._frames: dict[int, list[dict]] = {}
        for tb, frames in zip(captured, resolved):
            ids = tuple(map(id, frames))
            out = filtered.get(ids)
            if out is None:
                out = filtered[ids] = [f for f in frames if f["filename"] not in _SKIP_FILES
                                       and not f["filename"].startswith(_OWN_DIR)]
            self._frames[id(tb)] = out

    def __call__(self, tb: CapturedTraceback | None) -> list[dict]:
        return [] if tb is None else self._frames[id(tb)].copy()


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True, eq=False)
class AllocRecord:
    """One storage's life; ``tag`` is updated in place by re-tags."""
    size: int
    time_us: int
    frames: CapturedTraceback | None
    tag: Tag
    free_time_us: int = -1
    free_frames: CapturedTraceback | None = None
    free_phase: str = ""
    free_step: int = -1


_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_PYTHON_KEY = torch._C.DispatchKey.Python


def _plain_cpu(args: tuple) -> bool:
    """All tensor arguments (at least one) are plain CPU tensors, no Python-dispatch subclass."""
    found = False
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                if t.device.type != "cpu" or torch._C._dispatch_keys(t).has(_PYTHON_KEY):
                    return False
                found = True
    return found


def _no_eval_frame_hook(callback: Any) -> None:
    """Stand-in where torch has no frame-evaluation hook to switch (then torch's own wrapper
    keeps torch.compile out of the mode)."""
    return None


try:  # torch.compile's frame-evaluation hook (what torch._dynamo.disable switches off)
    from torch._C._dynamo.eval_frame import set_eval_frame as _set_eval_frame
except ImportError:  # pragma: no cover - builds without dynamo
    _set_eval_frame = _no_eval_frame_hook


class _StorageMode(TorchDispatchMode):
    """Reports every op output to the backend (the mode itself holds nothing).

    A mode is switched off while its ``__torch_dispatch__`` runs, so the tensors a custom op's
    Python kernel makes inside (bitsandbytes' dequantized weight inside ``gemm_4bit``, its
    optimizer's scratch) would go unseen. With ``custom_op_internals`` the kernel of a custom op
    on plain CPU tensors is called directly (redispatch to the CPU key) with the mode back on.
    (aten kernels' internal scratch stays unseen: boxed redispatch would need their scalar
    arguments wrapped.) Off by default: those internals are the CPU kernel's, not what the GPU
    kernel allocates, and a fake-tensor run (the simulator) cannot see them either.
    """

    def __init__(self, backend: "CpuBackend", custom_op_internals: bool) -> None:
        super().__init__()
        self._backend = backend
        self._internals = custom_op_internals

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps a subclass's __torch_dispatch__ in torch._dynamo.disable, whose
        # Python layers cost ~2.5 us per op (8% of what recording adds to a step); switching
        # torch.compile's frame hook off around the body (below) does the same directly.
        return _set_eval_frame is _no_eval_frame_hook

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        prior = _set_eval_frame(None)
        try:
            return self._dispatch(func, args, kwargs or {})
        finally:
            _set_eval_frame(prior)

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if (self._internals and isinstance(func, OpOverload)
                and func.namespace not in ("aten", "prims") and _plain_cpu(args)):
            with self:
                out = func.redispatch(_CPU_KEYS, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._backend.observe(out, func, args)
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self._backend.observe(t, func, args)
                elif isinstance(t, (tuple, list)):
                    for u in t:
                        if isinstance(u, torch.Tensor):
                            self._backend.observe(u, func, args)
        return out


class _StorageRef(weakref.ref):
    """Weak reference to a recorded storage that carries its record: the free callback needs
    both, and one object per allocation is cheaper than a closure over them. (Attributes are
    set after construction: a Python ``__init__`` would cost more than the closure.)"""

    __slots__ = ("key", "rec")
    key: int
    rec: AllocRecord


class CpuBackend:
    """Records storages on the CPU (or any device the dispatch mode sees) with owner tags."""

    name = "cpu"

    def __init__(self, stacks: str | None = "python", max_entries: int | None = None,
                 custom_op_internals: bool = False) -> None:
        self.stacks = stacks not in (None, "none", False)
        self.max_entries = max_entries
        self.ctx = TaggingContext(self)
        self._mode = _StorageMode(self, custom_op_internals)
        # storage key -> weak reference to the storage whose callback reports the free; dropping
        # the entry drops the reference, and with it the callback
        self._live: dict[int, _StorageRef] = {}
        self._preexisting: list[AllocRecord] = []
        # allocs and frees in order: the record, and 1 (alloc) or 0 (free) in the byte array
        # (one list append per event, no tuple: fewer objects for the program's GC to scan)
        self._events: list[AllocRecord] = []
        self._is_alloc = bytearray()
        self._start_us = 0
        self._backward_entry = BackwardEntry()
        self.active = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin recording on this thread (and the autograd threads it starts)."""
        self._start_us = _now_us()
        self.active = True
        self.ctx.install()
        self._mode.__enter__()

    def stop(self) -> None:
        """Stop recording; later frees of recorded storages are not reported."""
        if not self.active:
            return
        self._mode.__exit__(None, None, None)
        self.ctx.sweep()
        self.ctx.uninstall()
        self.active = False
        self._live.clear()

    # -- observation ----------------------------------------------------------------------------
    def observe(self, t: torch.Tensor, func: Any = None, args: tuple = ()) -> None:
        """Record ``t``'s storage if it is new (called for each op output)."""
        # is_meta first: reading .device builds a device object (a fake tensor is meta inside
        # but reports its fake device, so .device still decides)
        if not self.active or (t.is_meta and t.device.type == "meta"):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse/nested/wrapper tensors: no storage
            return
        size = st.nbytes()
        hit = self._live.get(st._cdata)
        if hit is not None:
            if hit.rec.size == size:
                return
            self._on_free(hit)   # resized in place: old block freed, new one made
        if size == 0:
            return
        rec = AllocRecord(size, _now_us(), capture_stack() if self.stacks else None,
                          self.ctx.tag_for(t, func, args))
        self._track(st, rec)
        self._events.append(rec)
        self._is_alloc.append(1)

    def _track(self, st: torch.UntypedStorage, rec: AllocRecord) -> None:
        ref = _StorageRef(st, self._on_free)
        ref.key, ref.rec = st._cdata, rec
        self._live[ref.key] = ref

    def _on_free(self, ref: "_StorageRef") -> None:
        if self._live.get(ref.key) is not ref:
            return
        del self._live[ref.key]
        rec = ref.rec
        rec.free_time_us = _now_us()
        rec.free_frames = capture_stack() if self.stacks else None
        rec.free_phase = self.ctx.phase
        rec.free_step = self.ctx.step
        self._events.append(rec)
        self._is_alloc.append(0)

    # -- TagListener ----------------------------------------------------------------------------
    def retag(self, tensor: torch.Tensor, tag: Tag) -> None:
        """Apply a role learned later to the allocation holding ``tensor`` (by storage identity).

        A storage never seen before existed before recording started (weights loaded earlier, a
        batch already on the device): it is recorded as allocated at the start."""
        if (not self.active or not isinstance(tensor, torch.Tensor)
                or (tensor.is_meta and tensor.device.type == "meta")):
            return
        try:
            st = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        size = st.nbytes()
        if size == 0:
            return
        hit = self._live.get(st._cdata)
        if hit is None:
            tag.phase = "setup"
            rec = AllocRecord(size, self._start_us, None, tag)
            self._track(st, rec)
            self._preexisting.append(rec)
            return
        cur = hit.rec.tag
        if tag.owner == tx.INPUT and cur.phase != "setup":
            return  # only tensors made outside the model's forward are inputs (not logits fed to a loss)
        if OWNER_PRIORITY[tag.owner] < OWNER_PRIORITY[cur.owner]:
            return
        cur.owner = tag.owner
        if tag.param:
            cur.param = tag.param
        if tag.owner in _PARAM_OWNERS and tag.module:
            cur.module = tag.module

    def context_changed(self, ctx: TaggingContext) -> None:
        """On entering backward, live temporaries are kept by autograd (``lifetimes``); nothing
        to stamp on CPU, tags are made per storage."""
        kept = self._backward_entry.kept_phase(ctx.phase)
        if kept is not None:
            for ref in list(self._live.values()):
                rec = ref.rec
                rec.tag.owner = owner_when_kept(rec.tag.owner, rec.tag.phase, kept)

    # -- output ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """PyTorch-format snapshot of everything recorded so far, final owners on each event."""
        if self.active:
            self.ctx.sweep()
        with gc_paused():   # a dict per event, none garbage (see gc_paused)
            return self._build_snapshot()

    def _build_snapshot(self) -> dict:
        model = allocator.CachingAllocatorModel(allocator.AllocatorSettings(), device=0)
        records = list(zip(b"\1" * len(self._preexisting) + self._is_alloc,
                           self._preexisting + self._events))
        frames = StackResolver(r.frames if is_alloc else r.free_frames for is_alloc, r in records)
        addr: dict[int, int] = {}
        metas: dict[tuple, str] = {}   # the same tag fields give the same JSON
        for is_alloc, rec in records:
            if is_alloc:
                t = rec.tag
                owner = final_owner(t.owner, t.phase, t.step, rec.free_phase, rec.free_step)
                key = (owner, t.module, t.phase, t.step, t.dtype, t.shape, t.param)
                meta = metas.get(key)
                if meta is None:
                    meta = metas[key] = Tag(*key).to_json()
                addr[id(rec)] = model.malloc(rec.size, frames=frames(rec.frames), time_us=rec.time_us,
                                             category=owner, user_metadata=meta, compile_context="N/A")
            else:
                a = addr.pop(id(rec), None)
                if a is not None:
                    model.free(a, frames=frames(rec.free_frames), time_us=rec.free_time_us)
        snap = model.snapshot()
        snap[RECORDED_BY] = self.name
        trace = snap["device_traces"][0]
        if self.max_entries is not None and len(trace) > self.max_entries:
            del trace[:len(trace) - self.max_entries]
        return snap
