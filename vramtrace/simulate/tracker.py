"""Allocation tracker: every storage an op creates, when it dies, and what it was for.

One code path for real CPU tensors and for FakeTensors, so that a simulated step and a real CPU
run of the same recipe produce the same events by construction. A TorchDispatchMode sees each op
output, keys each storage it has not seen before, and a ``weakref.finalize`` on the storage
reports the free. Context (phase, module path, step) comes from global module/optimizer hooks,
which hold no tensors, so the tracker does not change what it measures. Owners are decided
after the run from roles observed while it ran (see ``classify``).
"""
from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vramtrace.attribution import taxonomy as tx

@dataclass
class AllocRecord:
    """One storage's life: the unit the allocator model replays."""
    seq: int
    nbytes: int
    phase: str
    module: str
    step: int
    op: str
    dtype: str
    shape: tuple[int, ...]
    time_us: int
    free_seq: int | None = None
    role: str | None = None          # owner learned from a role (param, grad, optimizer state, ...)
    param: str = ""
    data_dependent: bool = False     # size depends on data (unbacked symbolic size under fake tensors)
    saved: bool = False              # alive when backward started (or after its recompute)

    def metadata(self, owner: str) -> str:
        """JSON ``user_metadata`` for the viewer, keys from ``taxonomy.METADATA_KEYS``."""
        meta: dict[str, Any] = {"owner": owner, "module": self.module, "phase": self.phase,
                                "step": self.step, "dtype": self.dtype, "shape": list(self.shape)}
        if self.param:
            meta["param"] = self.param
        if self.data_dependent:
            meta["data_dependent"] = True
        return json.dumps(meta, separators=(",", ":"))


def _int(x: Any) -> tuple[int, bool]:
    """A concrete int from a possibly symbolic size; unbacked (data-dependent) sizes count as 0."""
    if isinstance(x, int):
        return x, False
    node = getattr(x, "node", None)
    if node is not None and node.has_hint():
        return int(node.hint), False
    try:
        return int(x), False
    except Exception:  # GuardOnDataDependentSymNode and friends: no value without data
        return 0, True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class AllocationTracker(TorchDispatchMode):
    """Records alloc/free of every storage produced by an op while active.

    Use as a context manager around model construction and training steps; ``events`` is the
    ordered list of ("alloc"|"free", record). ``watch(model)`` names parameters so that roles
    can be assigned; ``mark_*`` calls assign roles to live storages.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, AllocRecord]] = []
        self.live: dict[int, AllocRecord] = {}
        self._seq = 0
        self.phase = "setup"
        self.step = 0
        self._module_stack: list[str] = []
        self._names: dict[int, str] = {}
        self._in_backward = False
        self._recompute_start = 0
        self._hooks: list[Any] = []
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.recording = True

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> "AllocationTracker":
        mm = torch.nn.modules.module
        self._hooks = [
            mm.register_module_forward_pre_hook(self._pre_forward),
            mm.register_module_forward_hook(self._post_forward, always_call=True),
            torch.optim.optimizer.register_optimizer_step_pre_hook(self._pre_step),
            torch.optim.optimizer.register_optimizer_step_post_hook(self._post_step),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        super().__exit__(*exc)

    def watch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Name the model's modules and mark its parameters, buffers and quant state."""
        if model not in self.models:
            self.models.append(model)
            self._names.update({id(m): n for n, m in model.named_modules()})
        if optimizer is not None and optimizer not in self.optimizers:
            self.optimizers.append(optimizer)
        self.mark_model_state()

    def end_setup(self) -> None:
        """Setup (model build, quantization, adapters) is over: next ops make inputs."""
        self.mark_model_state()
        self.phase = "input"

    # -- hooks -------------------------------------------------------------------------------
    def _current_phase(self) -> str:
        in_bwd = torch._C._current_graph_task_id() != -1
        if in_bwd and not self._in_backward:
            self._start_backward()
        elif not in_bwd and self._in_backward:
            self._in_backward = False
            self.mark_model_state()
            self.phase = "input"
        if self._in_backward:
            return "recompute" if self._module_stack else "backward"
        return self.phase

    def _start_backward(self) -> None:
        self._in_backward = True
        for rec in self.live.values():
            if rec.phase == "forward":
                rec.saved = True

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        self._current_phase()
        if not self._in_backward and self.phase == "input":
            self.phase = "forward"
        if self._in_backward and not self._module_stack:
            self._recompute_start = self._seq
        self._module_stack.append(self._names.get(id(module), type(module).__name__))

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._module_stack:
            self._module_stack.pop()
        if self._in_backward and not self._module_stack:
            for rec in self.live.values():  # what survives a recompute is kept for backward
                if rec.seq >= self._recompute_start and rec.phase == "recompute":
                    rec.saved = True

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer not in self.optimizers:
            self.optimizers.append(optimizer)
        self._current_phase()
        self.mark_model_state()
        self.phase = "optimizer"

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.mark_optimizer_state()
        self.phase = "input"
        self.step += 1

    # -- roles -------------------------------------------------------------------------------
    def _mark(self, t: Any, role: str, name: str = "") -> None:
        if not isinstance(t, torch.Tensor):
            return
        rec = self.live.get(t.untyped_storage()._cdata)
        if rec is not None and (rec.role is None or rec.role == tx.ACTIVATION):
            rec.role, rec.param = role, rec.param or name

    def mark_model_state(self) -> None:
        """Roles of parameters (frozen or trainable), buffers, quant state and gradients."""
        for model in self.models:
            for name, p in model.named_parameters(remove_duplicate=True):
                self._mark(p, tx.TRAINABLE if p.requires_grad else tx.WEIGHT, name)
                if p.grad is not None:
                    self._mark(p.grad, tx.GRADIENT, name)
                for qname, q in _quant_tensors(p):
                    self._mark(q, tx.QUANT_STATE, f"{name}.{qname}")
            for name, b in model.named_buffers():
                self._mark(b, tx.WEIGHT, name)
            for name, m in model.named_modules():
                state = getattr(m, "state", None)  # bitsandbytes Linear8bitLt keeps CB/SCB here
                for attr in ("CB", "SCB"):
                    t = getattr(state, attr, None)
                    if isinstance(t, torch.Tensor):
                        self._mark(t, tx.WEIGHT if attr == "CB" else tx.QUANT_STATE, f"{name}.weight.{attr}")

    def mark_optimizer_state(self) -> None:
        """Optimizer state tensors (created lazily by the first ``step()``)."""
        for opt in self.optimizers:
            for st in opt.state.values():
                for k, v in st.items():
                    self._mark(v, tx.OPTIMIZER, str(k))

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.recording:
            return out
        phase = self._current_phase()
        autocast_copy = (func is torch.ops.aten._to_copy.default and torch.is_autocast_enabled()
                         and isinstance(args[0], torch.Tensor) and _is_param_storage(self, args[0]))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._record(t, func, phase, tx.AUTOCAST if autocast_copy else None)
        return out

    def _record(self, t: torch.Tensor, func: Any, phase: str, role: str | None) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        nbytes, dd = _int(st.nbytes())
        rec = AllocRecord(seq=self._seq, nbytes=nbytes, phase=phase,
                          module=self._module_stack[-1] if self._module_stack else "",
                          step=self.step, op=str(func.overloadpacket.__name__), dtype=_dtype_name(t.dtype),
                          shape=tuple(_int(s)[0] for s in t.shape), time_us=int(time.time() * 1e6),
                          role=role, data_dependent=dd)
        self._seq += 1
        self.live[key] = rec
        self.events.append(("alloc", rec))
        weakref.finalize(st, self._on_free, key, rec)

    def _on_free(self, key: int, rec: AllocRecord) -> None:
        if self.live.get(key) is rec:
            del self.live[key]
        rec.free_seq = self._seq
        self._seq += 1
        self.events.append(("free", rec))


def _is_param_storage(tracker: AllocationTracker, t: torch.Tensor) -> bool:
    rec = tracker.live.get(t.untyped_storage()._cdata)
    return rec is not None and rec.role in (tx.WEIGHT, tx.TRAINABLE)


def _quant_tensors(p: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Quantization state hanging off a bitsandbytes parameter (int8 SCB, 4-bit QuantState)."""
    scb = getattr(p, "SCB", None)
    if isinstance(scb, torch.Tensor):
        yield "SCB", scb
    qs = getattr(p, "quant_state", None)
    while qs is not None:
        for attr in ("absmax", "code", "offset"):
            t = getattr(qs, attr, None)
            if isinstance(t, torch.Tensor):
                yield attr, t
        qs = getattr(qs, "state2", None)


def classify(rec: AllocRecord) -> str:
    """Owner of one allocation from its role and life (DESIGN §6)."""
    if rec.role is not None:
        return rec.role
    if rec.phase == "input":
        return tx.INPUT
    if rec.saved and rec.phase in ("forward", "recompute"):
        return tx.ACTIVATION
    if rec.phase in ("forward", "recompute", "backward", "optimizer"):
        return tx.TEMPORARY
    return tx.UNKNOWN


def owner_bytes(records: Iterable[AllocRecord]) -> dict[str, int]:
    """Sum of requested bytes per owner."""
    out: dict[str, int] = {}
    for rec in records:
        o = classify(rec)
        out[o] = out.get(o, 0) + rec.nbytes
    return out
