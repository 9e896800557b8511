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
from itertools import compress
from typing import Any, Iterable

import torch
from torch._C._profiler import CapturedTraceback, gather_traceback, symbolize_tracebacks
from torch.utils._python_dispatch import TorchDispatchMode

from vramtrace.attribution import taxonomy as tx
from vramtrace.capture.lifetimes import BackwardEntry, final_owner, owner_when_kept
from vramtrace.capture.tagging import OWNER_PRIORITY, Tag, TaggingContext
from vramtrace.replay import allocator

FrameKey = tuple[str, str, int]

_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # vramtrace/
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

    vramtrace's own frames and torch's dispatch plumbing are left out. Identical frames are
    one dict object, so the pickle stores each once; every event gets a list of its own."""

    def __init__(self, stacks: Iterable[CapturedTraceback | None]) -> None:
        unique = list({id(tb): tb for tb in stacks if tb is not None}.values())
        # Symbolizing imports torch's fx/dynamo machinery on first use in a process (~1 s
        # when the program has not loaded it already); torch's own snapshots pay the same.
        resolved = symbolize_tracebacks(unique) if unique else []
        # Decide once per distinct frame dict, then filter each stack with C-level maps: a
        # Python loop over every frame of every stack cost as much as the rest of the dump.
        distinct: dict[int, dict] = {}
        for frames in resolved:
            distinct.update(zip(map(id, frames), frames))
        keep = {i: f["filename"] not in _SKIP_FILES and not f["filename"].startswith(_OWN_DIR)
                for i, f in distinct.items()}
        self._frames = {id(tb): list(compress(frames, map(keep.__getitem__, map(id, frames))))
                        for tb, frames in zip(unique, resolved)}

    def __call__(self, tb: CapturedTraceback | None) -> list[dict]:
        return [] if tb is None else self._frames[id(tb)].copy()


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


def _now_us() -> int:
    return time.time_ns() // 1000


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

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (self._internals and isinstance(func, torch._ops.OpOverload)
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


class CpuBackend:
    """Records storages on the CPU (or any device the dispatch mode sees) with owner tags."""

    name = "cpu"

    def __init__(self, stacks: str | None = "python", max_entries: int | None = None,
                 custom_op_internals: bool = False) -> None:
        self.stacks = stacks not in (None, "none", False)
        self.max_entries = max_entries
        self.ctx = TaggingContext(self)
        self._mode = _StorageMode(self, custom_op_internals)
        # storage key -> (record, weak reference whose callback reports the free); dropping the
        # entry drops the reference, and with it the callback
        self._live: dict[int, tuple[AllocRecord, weakref.ref]] = {}
        self._preexisting: list[AllocRecord] = []
        self._events: list[tuple[bool, AllocRecord]] = []   # (is_alloc, record), in order
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
            if hit[0].size == size:
                return
            self._on_free(st._cdata, hit[0])   # resized in place: old block freed, new one made
        if size == 0:
            return
        rec = AllocRecord(size, _now_us(), capture_stack() if self.stacks else None,
                          self.ctx.tag_for(t, func, args))
        self._track(st, rec)
        self._events.append((True, rec))

    def _track(self, st: torch.UntypedStorage, rec: AllocRecord) -> None:
        key = st._cdata
        on_free = self._on_free
        self._live[key] = (rec, weakref.ref(st, lambda _ref: on_free(key, rec)))

    def _on_free(self, key: int, rec: AllocRecord) -> None:
        hit = self._live.get(key)
        if hit is None or hit[0] is not rec:
            return
        del self._live[key]
        rec.free_time_us = _now_us()
        rec.free_frames = capture_stack() if self.stacks else None
        rec.free_phase = self.ctx.phase
        rec.free_step = self.ctx.step
        self._events.append((False, rec))

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
        cur = hit[0].tag
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
            for rec, _ in list(self._live.values()):
                rec.tag.owner = owner_when_kept(rec.tag.owner, rec.tag.phase, kept)

    # -- output ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """PyTorch-format snapshot of everything recorded so far, final owners on each event."""
        if self.active:
            self.ctx.sweep()
        model = allocator.CachingAllocatorModel(allocator.AllocatorSettings(), device=0)
        records = [(True, r) for r in self._preexisting] + self._events
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
        trace = snap["device_traces"][0]
        if self.max_entries is not None and len(trace) > self.max_entries:
            del trace[:len(trace) - self.max_entries]
        return snap
