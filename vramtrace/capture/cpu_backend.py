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

import functools
import os
import sys
import time
import weakref
from threading import get_ident
from types import FrameType
from typing import Any

import torch
from torch._C._profiler import CapturedTraceback, gather_traceback, symbolize_tracebacks
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode

from vramtrace.attribution import taxonomy as tx
from vramtrace.capture.lifetimes import IN_BACKWARD, BackwardEntry, final_owner, owner_when_kept
from vramtrace.capture.tagging import OWNER_PRIORITY, TO_COPY, Tag, TaggingContext, dtype_name
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


class _LeftOut(dict):
    """filename -> whether its frames are left out of recorded stacks (the tracker's own and
    torch's dispatch plumbing), decided once per file: the dump asks for every frame of every
    distinct stack."""

    def __missing__(self, filename: str) -> bool:
        out = self[filename] = filename in _SKIP_FILES or filename.startswith(_OWN_DIR)
        return out


_LEFT_OUT = _LeftOut()


# capture_stack() -> CapturedTraceback: the caller's Python stack, captured natively as (code,
# instruction) pairs. torch's own traceback capture (what the CUDA allocator records) walks the
# frames in C++, ~4x faster than a Python loop over ``f_back``; names and lines are resolved once,
# at dump (resolve_stacks). It holds code objects only, never frames or their locals.
# A partial, not a def: a def's own frame would be one more frame object for every capture to
# create (and walk), with one capture per allocation and per free.
capture_stack = functools.partial(gather_traceback, True, False, False)

_graph_task_id = torch._C._current_graph_task_id   # -1 outside a backward graph task
# The frame the autograd engine's C++ loop runs under: every op it runs itself has this frame,
# at the same instruction, as the program's innermost one (None where torch has no such function).
_ENGINE_CODE = getattr(getattr(torch.autograd.graph, "_engine_run_backward", None), "__code__", None)


def resolve_stacks(stacks: list[CapturedTraceback | None]) -> list[list[dict]]:
    """Frame lists (snapshot format, innermost first) of captured stacks, in one native call:
    a list of its own per stack, in order ([] for None).

    The tracker's own frames and torch's dispatch plumbing are left out. Identical frames are
    one dict object, so the pickle stores each once."""
    # the backend hands the same traceback object to many events (see CpuBackend._capture)
    unique = list({id(tb): tb for tb in stacks if tb is not None}.values())
    # Symbolizing imports torch's fx/dynamo machinery on first use in a process (~1 s
    # when the program has not loaded it already); torch's own snapshots pay the same.
    resolved = symbolize_tracebacks(unique) if unique else []
    # symbolize returns one dict per distinct frame, and a training loop repeats a few
    # hundred distinct stacks: filter each distinct stack once, found by its frames' ids
    filtered: dict[tuple[int, ...], list[dict]] = {}
    kept_of: dict[int, list[dict]] = {}
    for tb, frames in zip(unique, resolved):
        ids = tuple(map(id, frames))
        kept = filtered.get(ids)
        if kept is None:
            kept = filtered[ids] = [f for f in frames if not _LEFT_OUT[f["filename"]]]
        kept_of[id(tb)] = kept
    return [[] if tb is None else kept_of[id(tb)].copy() for tb in stacks]


_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_PYTHON_KEY = torch._C.DispatchKey.Python
_CUSTOM_KERNEL = object()   # a custom op whose kernel runs with the mode on (custom_op_internals)


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
    """Reports every op output to the backend (the mode itself holds no tensor).

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
        self._observe = backend.observe
        self._observe_storage = backend.observe_storage
        self._live = backend._live     # the backend's own dict, for the check below
        self._internals = custom_op_internals
        # id(op) -> how to run it, decided once per op (keyed by id: OpOverload's __hash__ is a
        # Python call); _ops keeps each op alive, so its id stays its own
        self._runs: dict[int, Any] = {}
        self._ops: list[Any] = []

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps a subclass's __torch_dispatch__ in torch._dynamo.disable, whose
        # Python layers cost ~2.5 us per op (8% of what recording adds to a step); switching
        # torch.compile's frame hook off around the body (below) does the same directly.
        return _set_eval_frame is _no_eval_frame_hook

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # One method, no helper: every op pays each Python call here, and each frame on the
        # stack is one more for every stack capture under it to walk.
        prior = _set_eval_frame(None)
        try:
            run = self._runs.get(id(func))
            if run is None:
                run = self._runner(func)
            if run is not _CUSTOM_KERNEL:
                # most ops have no kwargs, and **{} would still build a dict per call
                out = run(*args, **kwargs) if kwargs else run(*args)
            elif _plain_cpu(args):
                with self:
                    out = func.redispatch(_CPU_KEYS, *args, **(kwargs or {}))
            else:
                out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                # Most outputs are views or in-place results on a storage already live at its
                # size, with nothing to record: settle those here, without a call.
                try:
                    st = out.untyped_storage()
                except (RuntimeError, NotImplementedError):  # no storage (sparse...): nothing to record
                    st = None
                if st is not None:
                    a = self._live.get(st._cdata)
                    if a is None or a.size != st.nbytes():
                        self._observe_storage(out, st, func, args)
            elif isinstance(out, (tuple, list)):
                observe = self._observe
                for t in out:
                    if isinstance(t, torch.Tensor):
                        observe(t, func, args)
                    elif isinstance(t, (tuple, list)):
                        for u in t:
                            if isinstance(u, torch.Tensor):
                                observe(u, func, args)
            return out
        finally:
            _set_eval_frame(prior)

    def _runner(self, func: Any) -> Any:
        """What __torch_dispatch__ calls to run ``func``, or _CUSTOM_KERNEL."""
        if self._internals and isinstance(func, OpOverload) and func.namespace not in ("aten", "prims"):
            run = _CUSTOM_KERNEL
        elif type(func) is OpOverload:
            run = func._op   # what OpOverload.__call__ calls, without its Python frame
        else:
            run = func
        self._runs[id(func)] = run
        self._ops.append(func)
        return run


class _Allocation(weakref.ref):
    """One storage's life, and the weak reference to that storage whose callback reports its
    free. One object per allocation, not a record plus a reference: the program's GC scans
    fewer objects, and the free callback finds everything on its argument. Fields are set by
    :meth:`CpuBackend.observe_storage` / :meth:`CpuBackend._track`, not a Python ``__init__`` (a
    call more per allocation). The tag is kept in parts and made a :class:`Tag` only at dump:
    most allocations share the context (module, phase, step) the backend was last told, one
    tuple for all of them. ``owner``, ``param`` and ``where`` change on re-tags, the ``free_*``
    fields when the storage dies. Times are ``time.time_ns()``, made microseconds at dump."""

    __slots__ = ("key", "size", "time_ns", "frames", "owner", "where", "dtype", "shape", "param",
                 "free_time_ns", "free_frames", "free_where", "addr")
    key: int
    size: int
    time_ns: int
    frames: CapturedTraceback | None
    owner: str
    where: tuple[str, str, int]       # module, phase, step when made
    dtype: torch.dtype
    shape: tuple[int, ...]            # the tensor's torch.Size
    param: str
    free_time_ns: int
    free_frames: CapturedTraceback | None
    free_where: tuple[str, str, int]  # _ALIVE while alive
    addr: int                         # in the allocator model, set by each dump


_ALIVE = ("", "", -1)


class CpuBackend:
    """Records storages on the CPU (or any device the dispatch mode sees) with owner tags."""

    name = "cpu"
    sees_casts = True   # the dispatch mode tags autocast's weight copies as they are made

    def __init__(self, stacks: str | None = "python", max_entries: int | None = None,
                 custom_op_internals: bool = False) -> None:
        self.stacks = stacks not in (None, "none", False)
        self.max_entries = max_entries
        self.ctx = TaggingContext(self)
        # storage key -> its live allocation; the callbacks of allocations no longer here (freed,
        # or recording stopped) do nothing
        self._live: dict[int, _Allocation] = {}
        self._on_free_callback = self._on_free   # one bound method, not one per allocation
        self._mode = _StorageMode(self, custom_op_internals)
        self._preexisting: list[_Allocation] = []
        # allocs and frees in order: the allocation, and 1 (alloc) or 0 (free) in the byte array
        # (one list append per event, no tuple: fewer objects for the program's GC to scan)
        self._events: list[_Allocation] = []
        self._is_alloc = bytearray()
        self._start_ns = 0
        self._backward_entry = BackwardEntry()
        # (thread, (module, phase, step)) last announced by the tagging context, or None where
        # it does not announce every change (see _where)
        self._context: tuple[int, tuple[str, str, int]] | None = None
        # (engine frame, its instruction, the stack captured there) until the next context
        # change (see _capture)
        self._engine_stack: tuple[FrameType, int, CapturedTraceback] | None = None
        self.active = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin recording on this thread (and the autograd threads it starts)."""
        self._start_ns = time.time_ns()
        self.active = True
        self.ctx.install()
        self._remember_context()
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
        self._engine_stack = None

    # -- observation ----------------------------------------------------------------------------
    def observe(self, t: torch.Tensor, func: Any = None, args: tuple = ()) -> None:
        """Record ``t``'s storage if it is new (called for each tensor in an op's output list)."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse/nested/wrapper tensors: no storage
            return
        self.observe_storage(t, st, func, args)

    def observe_storage(self, t: torch.Tensor, st: torch.UntypedStorage, func: Any = None,
                        args: tuple = ()) -> None:
        """Record storage ``st`` of op output ``t`` if it is new (the mode calls this directly for
        a single output it does not find live at its size)."""
        # is_meta first: reading .device builds a device object (a fake tensor is meta inside
        # but reports its fake device, so .device still decides)
        if not self.active or (t.is_meta and t.device.type == "meta"):
            return
        size = st.nbytes()
        hit = self._live.get(st._cdata)
        if hit is not None:
            if hit.size == size:
                return
            self._on_free(hit)   # resized in place: old block freed, new one made
        if size == 0:
            return
        a = self._track(st, size, time.time_ns(), self._capture(), t)
        a.param = self.ctx.autocast_param(args) if func is TO_COPY else ""
        a.owner = tx.AUTOCAST if a.param else tx.TEMPORARY
        a.where = self._where()
        self._events.append(a)
        self._is_alloc.append(1)

    def _track(self, st: torch.UntypedStorage, size: int, time_ns: int,
               frames: CapturedTraceback | None, t: torch.Tensor) -> _Allocation:
        """A live allocation of ``st`` (owner, param and where are the caller's to set)."""
        a = _Allocation(st, self._on_free_callback)
        a.key, a.size, a.time_ns, a.frames = st._cdata, size, time_ns, frames
        a.dtype, a.shape, a.free_where = t.dtype, t.shape, _ALIVE
        self._live[a.key] = a
        return a

    def _on_free(self, a: _Allocation) -> None:
        live = self._live
        if live.get(a.key) is not a:
            return
        del live[a.key]
        a.free_time_ns = time.time_ns()
        a.free_frames = self._capture()
        a.free_where = self._where()
        self._events.append(a)
        self._is_alloc.append(0)

    def _capture(self) -> CapturedTraceback | None:
        """The caller's stack, or None without stacks.

        Most allocations and frees in backward come from ops the autograd engine runs from its
        C++ loop, with nothing of the program's but the engine's entry frame inside: their stacks
        are the same until that frame moves on, and one capture serves them all. The cached
        frame is only held between two context changes, and the pass's end is one (as it must
        be: a finished frame keeps its locals, the loss among them)."""
        if not self.stacks:
            return None
        told = self._context
        if told is None or told[1][1] not in IN_BACKWARD:
            return capture_stack()
        f = sys._getframe(1)
        while f is not None and _LEFT_OUT[f.f_code.co_filename]:
            f = f.f_back
        if f is None or f.f_code is not _ENGINE_CODE:
            return capture_stack()
        hit = self._engine_stack
        if hit is not None and hit[0] is f and hit[1] == f.f_lasti:
            return hit[2]
        tb = capture_stack()
        self._engine_stack = (f, f.f_lasti, tb)
        return tb

    def _where(self) -> tuple[str, str, int]:
        """(module, phase, step) of an allocation or free made now on this thread: the context
        last announced, when it was announced on this thread, every change is announced, and
        the engine agrees about being in backward (a pass started from C++ is not announced)."""
        told = self._context
        if (told is not None and told[0] == get_ident()
                and (_graph_task_id() != -1) == (told[1][1] in IN_BACKWARD)):
            return told[1]
        return self._asked_where()

    def _asked_where(self) -> tuple[str, str, int]:
        module, phase = self.ctx.where()
        return module, phase, self.ctx.step

    def _remember_context(self) -> tuple[str, str, int]:
        where = self._asked_where()
        self._context = (get_ident(), where) if self.ctx.announces_changes else None
        return where

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
            a = self._track(st, size, self._start_ns, None, tensor)
            a.owner, a.param, a.where = tag.owner, tag.param, (tag.module, "setup", tag.step)
            self._preexisting.append(a)
            return
        if tag.owner == tx.INPUT and hit.where[1] != "setup":
            return  # only tensors made outside the model's forward are inputs (not logits fed to a loss)
        if OWNER_PRIORITY[tag.owner] < OWNER_PRIORITY[hit.owner]:
            return
        hit.owner = tag.owner
        if tag.param:
            hit.param = tag.param
        if tag.owner in _PARAM_OWNERS and tag.module:
            hit.where = (tag.module, *hit.where[1:])

    def context_changed(self, ctx: TaggingContext) -> None:
        """Remember the new context for the allocations that follow. On entering backward, live
        temporaries are kept by autograd (``lifetimes``)."""
        self._engine_stack = None
        kept = self._backward_entry.kept_phase(self._remember_context()[1])
        if kept is not None:
            for a in list(self._live.values()):
                a.owner = owner_when_kept(a.owner, a.where[1], kept)

    # -- output ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """PyTorch-format snapshot of everything recorded so far, final owners on each event."""
        if self.active:
            self.ctx.sweep()
        with gc_paused():   # a dict per event, none garbage (see gc_paused)
            return self._build_snapshot()

    def _build_snapshot(self) -> dict:
        model = allocator.CachingAllocatorModel(allocator.AllocatorSettings(), device=0)
        events = list(zip(b"\1" * len(self._preexisting) + self._is_alloc,
                          self._preexisting + self._events))
        stacks = resolve_stacks([a.frames if is_alloc else a.free_frames for is_alloc, a in events])
        metas: dict[tuple, str] = {}   # the same tag fields give the same JSON
        malloc, free = model.malloc, model.free
        for (is_alloc, a), frames in zip(events, stacks):
            if is_alloc:
                where, freed = a.where, a.free_where
                owner = final_owner(a.owner, where[1], where[2], freed[1], freed[2])
                key = (owner, where, a.dtype, a.shape, a.param)
                meta = metas.get(key)
                if meta is None:
                    meta = metas[key] = Tag(owner, *where, dtype_name(a.dtype), tuple(a.shape),
                                            a.param).to_json()
                a.addr = malloc(a.size, frames=frames, time_us=a.time_ns // 1000,
                                category=owner, user_metadata=meta, compile_context="N/A")
            else:
                free(a.addr, frames=frames, time_us=a.free_time_ns // 1000)
        snap = model.snapshot()
        snap[RECORDED_BY] = self.name
        trace = snap["device_traces"][0]
        if self.max_entries is not None and len(trace) > self.max_entries:
            del trace[:len(trace) - self.max_entries]
        return snap
