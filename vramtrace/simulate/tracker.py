"""Allocation tracker: every storage an op creates, when it dies, and who owns it.

One code path for real CPU tensors and for FakeTensors, so that a simulated step and a real CPU
run of the same recipe produce the same events by construction. A TorchDispatchMode sees each op
output, keys each storage it has not seen before (storage identity, never address), and a
``weakref.finalize`` on the storage reports the free. Owners come from the shared
:class:`vramtrace.capture.tagging.TaggingContext` (the tagger the recorders use), plus two rules
for tensors that autograd keeps without the saved-tensor hooks seeing them:

* a forward temporary still alive when backward starts is kept for backward (bitsandbytes'
  int8 matmul stores its inputs on ``ctx``, not through ``save_for_backward``);
* a recompute temporary still alive when its checkpointed segment returns is a recomputed
  activation (non-reentrant checkpointing packs them with its own hooks, hiding ours).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vramtrace.attribution import taxonomy as tx
from vramtrace.capture.tagging import OWNER_PRIORITY, Tag, TaggingContext


@dataclass(slots=True)
class AllocRecord:
    """One storage's life: the unit the allocator model replays."""
    seq: int
    nbytes: int
    tag: Tag
    created_phase: str
    time_us: int
    op: str
    free_seq: int | None = None
    data_dependent: bool = False     # size depends on data (unbacked symbolic size under fake tensors)

    @property
    def owner(self) -> str:
        return self.tag.owner


def _int(x: Any) -> tuple[int, bool]:
    """A concrete int from a possibly symbolic size; unbacked (data-dependent) sizes count as 0."""
    if isinstance(x, int):
        return x, False
    node = getattr(x, "node", None)
    if node is not None and node.has_hint():
        return int(node.hint), False
    return 0, True


class AllocationTracker(TorchDispatchMode):
    """Records alloc/free of every storage an op produces while active (a TagListener).

    ``events`` is the ordered list of ("alloc" | "free", record). Use ``paused()`` around work
    whose storages must not count (a model skeleton that is "loaded" afterwards).
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, AllocRecord]] = []
        self.live: dict[int, AllocRecord] = {}
        self.ctx = TaggingContext(self)
        self._seq = 0
        self._recording = True
        self._last_phase = "setup"
        self._segment_start = 0

    def __enter__(self) -> "AllocationTracker":
        self.ctx.install()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.ctx.uninstall()

    class _Paused:
        def __init__(self, tracker: "AllocationTracker") -> None:
            self.tracker = tracker

        def __enter__(self) -> None:
            self.tracker._recording = False

        def __exit__(self, *exc: Any) -> None:
            self.tracker._recording = True

    def paused(self) -> "AllocationTracker._Paused":
        """A context in which new storages are not recorded."""
        return AllocationTracker._Paused(self)

    # -- TagListener -------------------------------------------------------------------------
    def retag(self, tensor: torch.Tensor, tag: Tag) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        rec = self.live.get(tensor.untyped_storage()._cdata)
        if rec is not None and OWNER_PRIORITY[tag.owner] >= OWNER_PRIORITY[rec.tag.owner]:
            if tag.owner == rec.tag.owner and tag.owner in (tx.ACTIVATION, tx.INPUT):
                return  # keep the first context of a role
            rec.tag = tag

    def context_changed(self, ctx: TaggingContext) -> None:
        self._phase_transition(ctx.phase)

    def _phase_transition(self, phase: str) -> None:
        last, self._last_phase = self._last_phase, phase
        if phase == last:
            return
        if phase in ("backward", "recompute") and last not in ("backward", "recompute"):
            self._promote("forward", 0)
        if phase == "recompute" and last == "backward":
            self._segment_start = self._seq
        if phase == "backward" and last == "recompute":
            self._promote("recompute", self._segment_start)

    def _promote(self, created_phase: str, since: int) -> None:
        for rec in self.live.values():
            if rec.tag.owner == tx.TEMPORARY and rec.created_phase == created_phase and rec.seq >= since:
                rec.tag = Tag(tx.ACTIVATION, rec.tag.module, rec.tag.phase, rec.tag.step, rec.tag.dtype,
                              rec.tag.shape, rec.tag.param)

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self._recording:
            return out
        phase = self.ctx.phase
        if phase != self._last_phase:
            self._phase_transition(phase)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live:
                    self._record(st, key, self.ctx.tag_for(t, func, args), phase, func)
        return out

    def _record(self, st: torch.UntypedStorage, key: int, tag: Tag, phase: str, func: Any) -> None:
        nbytes, dd = _int(st.nbytes())
        tag.shape = tuple(_int(s)[0] for s in tag.shape)
        rec = AllocRecord(seq=self._seq, nbytes=nbytes, tag=tag, created_phase=phase,
                          time_us=int(time.time() * 1e6), op=func.overloadpacket.__name__, data_dependent=dd)
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

    def records(self) -> Iterator[AllocRecord]:
        """Every allocation, in order of creation."""
        return (rec for kind, rec in self.events if kind == "alloc")
