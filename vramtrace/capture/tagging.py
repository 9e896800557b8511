"""Owner tagging shared by the CUDA and CPU capture backends.

A :class:`TaggingContext` installs global hooks (module forward pre/post, optimizer step pre/post,
autograd saved-tensor pack hooks, post-accumulate-grad hooks) and keeps track of *where* the
program is: module path, phase (setup / forward / backward / recompute / optimizer) and optimizer
step. From that it produces the context of a new allocation (:meth:`TaggingContext.where`) and
the thread's current context string (:meth:`TaggingContext.context_json`, what the CUDA backend
stamps with ``torch.cuda.memory._set_memory_metadata``).

Roles that become known only after an allocation was made (saved for backward, became ``.grad``,
optimizer state created lazily, parameter, quantization state, model input) are reported to the
backend as re-tags of a *tensor* (``listener.retag(tensor, tag)``); the backend joins them to the
allocation by identity (storage), never by address. Re-tags obey :data:`OWNER_PRIORITY` so that a
more specific role is never overwritten by a vaguer one (an autocast copy that is also saved for
backward stays ``autocast``).

The context never keeps a tensor alive: it stores module/optimizer references weakly, pack hooks
return the very tensor they receive, and hooks close over names only (DESIGN §6 pitfalls).
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch.nn.modules import module as _nn_module
from torch.optim import optimizer as _optim_mod

from vramtrace.attribution import taxonomy as tx

# A re-tag replaces the current owner only when its priority is at least as high.
OWNER_PRIORITY: dict[str, int] = {
    tx.WEIGHT: 90, tx.TRAINABLE: 90, tx.QUANT_STATE: 80, tx.GRADIENT: 70, tx.OPTIMIZER: 60,
    tx.AUTOCAST: 50, tx.INPUT: 40, tx.ACTIVATION: 30, tx.TEMPORARY: 10, tx.UNKNOWN: 0,
}

TO_COPY = torch.ops.aten._to_copy.default   # the op autocast casts a weight with


class _DtypeNames(dict):
    """dtype -> short label; a dtype without a short one is named on first use. Indexing it is
    one native lookup, where every allocation's tag needs one."""

    def __missing__(self, dtype: torch.dtype) -> str:
        name = self[dtype] = str(dtype).removeprefix("torch.")
        return name


_DTYPE_NAMES = _DtypeNames({torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                            torch.float64: "fp64", torch.int8: "int8", torch.uint8: "uint8"})


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype label used in tags (reports split ``weight`` by it: int8, uint8 4-bit, fp16...)."""
    return _DTYPE_NAMES[dtype]


# The compact JSON json.dumps(..., separators=(",", ":")) writes for a Tag, formatted directly:
# the encoder walks a dict per call, and a recording encodes one tag per distinct allocation.
_TAG_JSON = '{"owner":%s,"module":%s,"phase":%s,"step":%d,"dtype":%s,"shape":[%s],"param":%s}'
_quote = json.encoder.encode_basestring_ascii


@dataclass(slots=True)
class Tag:
    """Owner plus the detail that travels in ``user_metadata`` (keys: taxonomy.METADATA_KEYS)."""
    owner: str = tx.UNKNOWN
    module: str = ""
    phase: str = "setup"
    step: int = 0
    dtype: str = ""
    shape: tuple[int, ...] = ()
    param: str = ""

    def to_json(self) -> str:
        """Compact JSON for ``user_metadata``; plain types only so the snapshot stays viewer-safe."""
        return _TAG_JSON % (_quote(self.owner), _quote(self.module), _quote(self.phase), self.step,
                            _quote(self.dtype), ",".join(map(str, self.shape)), _quote(self.param))


class TagListener(Protocol):
    """What a backend implements to receive re-tags and context changes. A listener that tags
    autocast's weight copies itself, as they are made (the CPU backend sees the cast op), says so
    with a true ``sees_casts`` attribute; for the others the saved-tensor hook names the copies."""

    def retag(self, tensor: torch.Tensor, tag: Tag) -> None: ...

    def context_changed(self, ctx: "TaggingContext") -> None: ...


def set_cuda_memory_metadata(metadata: str) -> bool:
    """Stamp ``metadata`` on every CUDA allocator trace entry this thread makes from now on.

    The one place the CUDA backend calls ``torch.cuda.memory._set_memory_metadata`` (torch 2.10+).
    Returns False where it does not exist or CUDA is off, so callers need no version checks.
    """
    fn = getattr(torch.cuda.memory, "_set_memory_metadata", None)
    if fn is None or not torch.cuda.is_available():
        return False
    try:
        fn(metadata)
    except (AttributeError, RuntimeError):
        return False
    return True


def _tensors_in(obj: Any, depth: int = 0, *, max_depth: int = 4,
                state_objects: bool = True) -> Iterator[torch.Tensor]:
    """Tensors held by optimizer state / quantization-state objects (dicts, lists, and with
    ``state_objects`` bitsandbytes' QuantState / MatmulLtState)."""
    if depth > max_depth:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif state_objects and type(obj).__name__ in ("QuantState", "MatmulLtState"):
        children = vars(obj).values()
    else:
        return
    for v in children:
        if isinstance(v, torch.Tensor):   # the common child, without a generator of its own
            if depth < max_depth:
                yield v
        else:
            yield from _tensors_in(v, depth + 1, max_depth=max_depth, state_objects=state_objects)


def _flat_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in forward args/kwargs/outputs (HF ModelOutput is a dict subclass)."""
    return _tensors_in(obj, max_depth=3, state_objects=False)


_graph_task_id = torch._C._current_graph_task_id   # -1 outside a backward graph task


def _in_backward() -> bool:
    """True on any thread while the autograd engine runs a backward graph task."""
    return _graph_task_id() != -1


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


@contextlib.contextmanager
def tagging_hooks(listener: TagListener) -> Iterator["TaggingContext"]:
    """The tagging hooks alone for the block, removed after it even on an exception.

    What a backend adds to a program before it records anything (the CUDA path's whole Python
    cost: the allocator records natively); for measuring that cost and testing the context.
    """
    ctx = TaggingContext(listener)
    ctx.install()
    try:
        yield ctx
    finally:
        ctx.uninstall()


class _BackwardStartHook:
    """Calls ``starts()`` before each backward pass (``backward()``, ``autograd.grad``),
    registers ``started`` as a pre-hook of its roots' nodes, which the engine runs first, on the
    thread that runs the pass, and calls ``ended(what starts returned)`` after it. torch has no
    global hook for these, so this wraps the one function every pass goes through; ``remove()``
    puts it back (like a hook handle), or, if something wrapped it since, leaves a pass-through."""

    def __init__(self, starts: Any, started: Any, ended: Any) -> None:
        self._starts, self._started, self._ended = starts, started, ended
        self._original = getattr(torch.autograd, "_engine_run_backward", None)
        self.active = self._original is not None   # without it, module hooks stamp backward alone
        if self.active:
            torch.autograd._engine_run_backward = self._run_backward

    def _run_backward(self, t_outputs: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self._original(t_outputs, *args, **kwargs)
        token = self._starts()
        roots = {id(t.grad_fn): t.grad_fn for t in t_outputs if getattr(t, "grad_fn", None) is not None}
        handles = [fn.register_prehook(self._started) for fn in roots.values()]
        try:
            return self._original(t_outputs, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self._ended(token)

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        if torch.autograd._engine_run_backward == self._run_backward:
            torch.autograd._engine_run_backward = self._original


class _Swept(weakref.ref):
    """A tensor a sweep re-tagged, with the owner it was given; its callback drops the entry.
    One object per entry (not a tuple, a reference and a closure): fewer for the GC to scan."""

    __slots__ = ("key", "owner")
    key: int
    owner: str


class _ThreadState(threading.local):
    """Per thread: the modules entered, innermost last, as (path, autocast on at entry)."""

    def __init__(self) -> None:
        self.stack: list[tuple[str, bool]] = []


class TaggingContext:
    """Tracks module path, phase and optimizer step, and turns them into allocation tags."""

    def __init__(self, listener: TagListener) -> None:
        self._listener = listener
        self._casts_on_save = not getattr(listener, "sees_casts", False)
        self._tls = _ThreadState()
        self._names: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
        self._roots: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
        self._optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self._handles: list[Any] = []
        self._param_handles: dict[int, Any] = {}
        self._params: dict[int, tuple[weakref.ref, str]] = {}  # id -> (weakref, name)
        self._swept: dict[int, _Swept] = {}                    # id -> the tensor and owner given
        self._forget_swept_callback = self._forget_swept       # one bound method for all entries
        self._saved_hooks: Any = None
        self._backward_hook: _BackwardStartHook | None = None
        self._optimizer_depth = 0
        self._backward_module = ""
        self.step = 0

    # -- state -------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """Phase of the calling thread: recompute = a module forward inside backward."""
        return self.where()[1]

    @property
    def module(self) -> str:
        """Innermost module path of this thread (in backward: the module whose outputs' grads run)."""
        return self.where()[0]

    def where(self) -> tuple[str, str]:
        """``(module, phase)`` of the calling thread, with one look at its stack and the engine."""
        st = self._tls.stack
        if _graph_task_id() != -1:   # _in_backward(), without a call: this runs per allocation
            return (st[-1][0], "recompute") if st else (self._backward_module, "backward")
        module = st[-1][0] if st else ""
        if self._optimizer_depth:
            return module, "optimizer"
        return module, ("forward" if st else "setup")

    def context_tag(self) -> Tag:
        """Tag for an allocation made now, before its tensor is known."""
        return Tag(tx.TEMPORARY, *self.where(), self.step)

    def context_json(self) -> str:
        """The context string the CUDA backend stamps as thread-local memory metadata."""
        return self.context_tag().to_json()

    def autocast_param(self, args: tuple) -> str:
        """Name of the parameter a ``TO_COPY`` op called with ``args`` copies, when it is
        autocast's cast (inside a module entered with autocast on); else ""."""
        st = self._tls.stack
        if st and st[-1][1] and args and isinstance(args[0], torch.Tensor):
            return self.param_name(args[0])
        return ""

    @property
    def announces_changes(self) -> bool:
        """Whether every change of :meth:`where` reaches the listener's ``context_changed``
        (installed, and torch lets backward passes be hooked: older torch announces backward
        only at the first module's gradients), so a listener may keep the last one it was told."""
        return self._backward_hook is not None and self._backward_hook.active

    def param_name(self, t: torch.Tensor) -> str:
        """Name of parameter ``t`` in its tracked model, "" if it is not one."""
        hit = self._params.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else ""

    # -- install -------------------------------------------------------------------------------
    def install(self) -> None:
        """Register the global hooks (idempotent per context)."""
        if self._handles:
            return
        self._handles = [
            _nn_module.register_module_forward_pre_hook(self._fwd_pre),
            _nn_module.register_module_forward_hook(self._fwd_post, always_call=True),
            _optim_mod.register_optimizer_step_pre_hook(self._opt_pre),
            _optim_mod.register_optimizer_step_post_hook(self._opt_post),
        ]
        self._backward_hook = _BackwardStartHook(self._backward_starts, self._backward_started,
                                                 self._backward_ended)
        self._handles.append(self._backward_hook)
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()

    def uninstall(self) -> None:
        """Remove every hook this context registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._backward_hook = None
        for h in self._param_handles.values():
            h.remove()
        self._param_handles = {}
        self._swept.clear()
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    # -- hooks ---------------------------------------------------------------------------------
    def _name_of(self, module: torch.nn.Module) -> str:
        name = self._names.get(module)
        if name is None:
            for root in list(self._roots):  # modules added after discovery (e.g. PEFT wrapping)
                self._index_root(root)
            name = self._names.get(module)
        if name is None:
            if not self._tls.stack:
                self.track_model(module)
                name = self._names.get(module, type(module).__name__)
            else:  # a module outside every tracked model, called inside one's forward
                name = self._names[module] = f"{self._tls.stack[-1][0]}.{type(module).__name__}"
        return name

    def _index_root(self, root: torch.nn.Module) -> None:
        prefix = type(root).__name__
        for n, m in root.named_modules(remove_duplicate=False):
            if m not in self._names:
                self._names[m] = f"{prefix}.{n}" if n else prefix

    def _fwd_pre(self, module: torch.nn.Module, args: tuple) -> None:
        outer = not self._tls.stack
        # Autocast reads as off inside __torch_dispatch__, so note it where the module is entered.
        autocast = autocast_enabled("cpu") or autocast_enabled("cuda")
        self._tls.stack.append((self._name_of(module), autocast, module))
        if outer and not _in_backward():
            for t in _flat_tensors(args):
                self._listener.retag(t, self._role(t, tx.INPUT))
        self._listener.context_changed(self)

    def _root_kwargs_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Per-root hook: the global pre hook does not see kwargs (HF models take input_ids=...)."""
        if len(self._tls.stack) == 1 and not _in_backward():
            for t in _flat_tensors(kwargs):
                self._listener.retag(t, self._role(t, tx.INPUT))

    def _fwd_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        st = self._tls.stack
        name = st.pop()[0] if st else ""
        if torch.is_grad_enabled() and not _in_backward():
            for t in _flat_tensors(output):
                fn = t.grad_fn if isinstance(t, torch.Tensor) else None
                if fn is not None:
                    fn.register_prehook(self._backward_prehook(name))
                    break
        self._listener.context_changed(self)

    def _backward_starts(self) -> str:
        """A backward pass is about to run: no module's gradients run yet. Returns the module
        of the pass it runs inside, if any (reentrant checkpointing runs one inside another)."""
        outer, self._backward_module = self._backward_module, ""
        return outer

    def _backward_ended(self, outer: str) -> None:
        """Back in the enclosing pass's module (and stamp it again on this thread)."""
        self._backward_module = outer
        self._listener.context_changed(self)

    def _backward_started(self, grad_outputs: Any) -> None:
        """First on the autograd thread: the CUDA allocator's metadata is per thread, and the
        loss's own backward (a loss computed outside any module) runs before any module's hook."""
        self._listener.context_changed(self)

    def _backward_prehook(self, name: str) -> Any:
        def prehook(grad_outputs: Any) -> None:
            self._backward_module = name
            self._listener.context_changed(self)
        return prehook

    def _opt_pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._optimizers.add(opt)
        self._optimizer_depth += 1
        self.sweep_optimizer(opt)
        self._listener.context_changed(self)

    def _opt_post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._optimizer_depth = max(0, self._optimizer_depth - 1)
        self.sweep_optimizer(opt)
        if not self._optimizer_depth:
            self.step += 1
        self._listener.context_changed(self)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        """Saved-for-backward pack hook: re-tag, and hand back the same tensor (no copy, no ref)."""
        st = self._tls.stack
        param = self._cast_weight(st[-1][2], t) if self._casts_on_save and st and st[-1][1] else ""
        self._listener.retag(t, self._role(t, tx.AUTOCAST, param) if param else self._role(t, tx.ACTIVATION))
        return t

    def _cast_weight(self, module: torch.nn.Module, t: torch.Tensor) -> str:
        """Name of the parameter of ``module`` (entered with autocast on) that saved tensor
        ``t`` is autocast's copy of, else "". A linear saves its weight's cast as the
        transposed view the matmul uses: shape (in, out), strides (1, in), another dtype than
        the weight's. An input of the same shape is saved contiguous, so it never matches."""
        if t.dim() != 2 or t.stride() != (1, t.shape[0]):
            return ""
        for p in module._parameters.values():
            if (p is not None and p.dim() == 2 and p.dtype != t.dtype
                    and p.shape[0] == t.shape[1] and p.shape[1] == t.shape[0]):
                return self.param_name(p)
        return ""

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _grad_hook(self, name: str) -> Any:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                self._listener.retag(p.grad, self._role(p.grad, tx.GRADIENT, name))
        return hook

    # -- roles ---------------------------------------------------------------------------------
    def _role(self, t: torch.Tensor, owner: str, param: str = "") -> Tag:
        return Tag(owner, *self.where(), self.step, _DTYPE_NAMES[t.dtype], tuple(t.shape), param)

    def track_model(self, root: torch.nn.Module) -> None:
        """Adopt ``root``: name its modules, tag its parameters/buffers, watch its gradients."""
        if root in self._roots:
            return
        self._roots.add(root)
        self._index_root(root)
        self._handles.append(root.register_forward_pre_hook(self._root_kwargs_pre, with_kwargs=True))
        self.sweep_model(root)

    def sweep_model(self, root: torch.nn.Module) -> None:
        """Re-tag parameters (weight/trainable), buffers, quantization state and ``.grad``."""
        prefix = type(root).__name__
        for name, p in root.named_parameters():
            owner = tx.TRAINABLE if p.requires_grad else tx.WEIGHT
            self._params[id(p)] = (weakref.ref(p), name)
            self._listener.retag(p, Tag(owner, f"{prefix}.{name.rpartition('.')[0]}".rstrip("."),
                                        "setup", self.step, dtype_name(p.dtype), tuple(p.shape), name))
            if p.requires_grad and id(p) not in self._param_handles:
                self._param_handles[id(p)] = p.register_post_accumulate_grad_hook(self._grad_hook(name))
            if p.grad is not None:
                self._listener.retag(p.grad, self._role(p.grad, tx.GRADIENT, name))
            for attr, v in vars(p).items():
                for q in _tensors_in(v):
                    self._listener.retag(q, Tag(tx.QUANT_STATE, "", "setup", self.step,
                                                dtype_name(q.dtype), tuple(q.shape), f"{name}.{attr}"))
        for name, b in root.named_buffers():
            self._listener.retag(b, Tag(tx.WEIGHT, "", "setup", self.step, dtype_name(b.dtype),
                                        tuple(b.shape), name))
        if "bitsandbytes" not in sys.modules:   # no MatmulLtState can exist: skip a walk of the model
            return
        for mname, m in root.named_modules():
            # read the instance attribute directly: getattr on a module without a "state" goes
            # through nn.Module.__getattr__ and an exception, for every module of every sweep
            state = getattr(m, "state", None) if hasattr(type(m), "state") else vars(m).get("state")
            if type(state).__name__ == "MatmulLtState":
                for q in _tensors_in(state):
                    self._listener.retag(q, Tag(tx.QUANT_STATE, "", "setup", self.step,
                                                dtype_name(q.dtype), tuple(q.shape), f"{mname}.state"))

    def sweep_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Re-tag an optimizer's state (created lazily on the first step) and its params' grads."""
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._retag_once(p.grad, tx.GRADIENT, p)
        for p, st in list(opt.state.items()):
            for t in _tensors_in(st):
                self._retag_once(t, tx.OPTIMIZER, p)
        for attr, v in vars(opt).items():  # e.g. bitsandbytes' name2qmap quantization maps
            if attr not in ("state", "param_groups", "defaults"):
                for t in _tensors_in(v):
                    self._retag_once(t, tx.OPTIMIZER, None)

    def _retag_once(self, t: torch.Tensor, owner: str, of: Any) -> None:
        """Re-tag ``t`` (the role ``owner`` of parameter ``of``, if a tensor) unless this very
        tensor object was already given ``owner``.

        Optimizer sweeps run twice a step over the same state tensors; a re-tag builds a tag and
        looks up the storage, an identity check does neither (nor the parameter's name). Entries
        leave with their tensor."""
        key = id(t)
        hit = self._swept.get(key)
        if hit is not None and hit.owner == owner and hit() is t:
            return
        ref = self._swept[key] = _Swept(t, self._forget_swept_callback)
        ref.key, ref.owner = key, owner
        param = self.param_name(of) if isinstance(of, torch.Tensor) else ""
        self._listener.retag(t, self._role(t, owner, param))

    def _forget_swept(self, ref: _Swept) -> None:
        if self._swept.get(ref.key) is ref:
            del self._swept[ref.key]

    def sweep(self) -> None:
        """Re-tag everything known (called before a dump so late roles are not missed)."""
        for root in list(self._roots):
            self.sweep_model(root)
        for opt in list(self._optimizers):
            self.sweep_optimizer(opt)
