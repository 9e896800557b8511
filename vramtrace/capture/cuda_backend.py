"""CUDA capture backend: PyTorch's own allocator history, tagged with vramtrace owners.

Recording uses ``torch.cuda.memory._record_memory_history`` (DESIGN §4) and is *armed*, not
forced: it begins when the program initialises CUDA (``torch.cuda._lazy_call``), so recording a
process that never uses the GPU neither creates a CUDA context nor poisons ``fork``.

Tags: the tagging context's thread-local context string is stamped with
``_set_memory_metadata`` on every context change. Older torch lacks that call (it came with
pytorch#165490, 2.10): there each change is noted with its time instead, and at dump time every
trace event takes the context last noted before it (the allocator's ``time_us`` and Python's
clock are both Unix time). Roles learned later arrive as ``retag`` calls
(a live tensor and its new tag). Those are noted here with the storage address and the time and,
at dump time, joined to the allocation that was live at that address at that time, i.e. to the
alloc event's identity, never to whatever occupies the address at dump time. Where torch has
``_annotate_tensor`` (2.14+) the re-tag is also recorded natively. The snapshot is then
post-processed for PyTorch's viewer: each event's ``category`` is the owner (one of the
taxonomy's 9 owners or ``unknown``; frees and annotate events take their allocation's owner),
``user_metadata`` keeps the detail as JSON.

An OOM observer dumps through a callback before the OOM error is raised, so the file shows what
filled the card even if the process then dies. Everything here is a no-op without CUDA.
"""
from __future__ import annotations

import bisect
import collections
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vramtrace.attribution import taxonomy as tx
from vramtrace.attribution import workspaces
from vramtrace.capture.lifetimes import IN_BACKWARD, BackwardEntry, final_owner, owner_when_kept
from vramtrace.capture.nvml import NvmlSampler
from vramtrace.capture.recorder import DEFAULT_MAX_ENTRIES
from vramtrace.capture.tagging import OWNER_PRIORITY, Tag, TaggingContext, set_cuda_memory_metadata
from vramtrace.snapshot.save import RECORDED_BY

STACKS = ("python", "all")
_FREES = ("free_requested", "free_completed")


def cuda_usable() -> bool:
    """Whether this process can use a CUDA device, asked without initialising CUDA where
    possible (NVML count, honouring CUDA_VISIBLE_DEVICES), so the answer does not poison fork."""
    if not torch.cuda._is_compiled():
        return False
    if torch.cuda.is_initialized():
        return torch.cuda.device_count() > 0
    count_nvml = getattr(torch.cuda, "_device_count_nvml", None)
    count = count_nvml() if count_nvml is not None else -1
    return count > 0 if count >= 0 else torch.cuda.is_available()


@dataclass(frozen=True)
class _Retag:
    time_us: int
    device: int
    addr: int
    metadata: str


# torch has no way to detach an OOM observer: one is attached per process and forwards to the
# backend currently recording.
_oom_target: "CudaBackend | None" = None
_oom_attached = False


def _oom_observer(device: int, alloc: int, device_allocated: int, device_free: int) -> None:
    target = _oom_target
    if target is None:
        return
    try:
        target.on_oom()
    except Exception as exc:  # the program's own OOM error must surface, not ours
        print(f"vramtrace: could not dump the snapshot at the out-of-memory error: {exc}", file=sys.stderr)


def _dump_current_recording() -> None:
    """Default OOM action: write the in-process recording's file now (it is rewritten at stop)."""
    from vramtrace.capture import recorder
    if recorder.is_recording():
        recorder.dump()


class CudaBackend:
    """Records one process's CUDA allocator history; a ``TagListener`` for ``TaggingContext``."""

    name = "cuda"

    def __init__(self, stacks: str | None = "python", max_entries: int | None = DEFAULT_MAX_ENTRIES,
                 on_oom: Callable[[], None] | None = None, nvml_interval_s: float = 0.1) -> None:
        if stacks not in (*STACKS, None):
            raise ValueError(f"stacks must be one of {STACKS} or None, not {stacks!r}")
        if max_entries is not None and max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.stacks = stacks
        self.max_entries = DEFAULT_MAX_ENTRIES if max_entries is None else max_entries
        self.on_oom = on_oom or _dump_current_recording
        self.ctx = TaggingContext(self)
        self.started = False           # recording really began (CUDA initialised)
        self._armed = False
        self._final: dict | None = None
        self._retags: collections.deque[_Retag] = collections.deque(maxlen=self.max_entries)
        # (time_us, context) per context change, where torch cannot stamp it (older torch)
        self._contexts: collections.deque[tuple[int, str]] | None = None
        self._annotate = getattr(torch.cuda.memory, "_annotate_tensor", None)
        self._nvml = NvmlSampler(nvml_interval_s)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Install the tagging hooks and arm recording: it begins when CUDA initialises, at
        once if it already has."""
        if self._armed:
            return
        self._armed = True
        self._final = None
        self.ctx.install()
        if torch.cuda._is_compiled():
            torch.cuda._lazy_call(self._enable)

    def _enable(self) -> None:
        """Runs inside torch's CUDA initialisation, where an exception would break the
        program's first CUDA call: failures are reported and recording stays off."""
        try:
            self._enable_now()
        except Exception as exc:  # noqa: BLE001 - the user's CUDA init must not fail because of us
            print(f"vramtrace: could not start CUDA recording: {exc}", file=sys.stderr)

    def _enable_now(self) -> None:
        global _oom_target, _oom_attached
        if not self._armed or self.started:
            return
        torch.cuda.memory._record_memory_history(
            enabled="all", context="all" if self.stacks else None, stacks=self.stacks or "python",
            max_entries=self.max_entries)
        self.started = True
        _oom_target = self
        if not _oom_attached:
            torch._C._cuda_attach_out_of_memory_observer(_oom_observer)
            _oom_attached = True
        self._contexts = None
        if not set_cuda_memory_metadata(self.ctx.context_json()):
            self._contexts = collections.deque(maxlen=self.max_entries)
            self._note_context(self.ctx)
        self._nvml.start(_device_uuids())

    def snapshot(self) -> dict:
        """The allocator's snapshot so far, post-processed for the viewer; after ``stop()`` the
        final one; empty if the process never used CUDA."""
        if self._final is not None:
            return self._final
        if not self.started:
            return {"segments": [], "device_traces": []}
        self.ctx.sweep()
        self._nvml.sample()
        snap = finalize(torch.cuda.memory._snapshot(), list(self._retags),
                        list(self._contexts) if self._contexts is not None else None)
        snap["vramtrace_nvml"] = self._nvml.samples()
        snap[RECORDED_BY] = self.name
        return snap

    def stop(self) -> None:
        """Keep the final snapshot, then recording off (its buffer freed), hooks removed and
        the sampler stopped."""
        global _oom_target
        if not self._armed:
            return
        self._final = self.snapshot()
        self._armed = False
        if self.started:
            set_cuda_memory_metadata("")
            torch.cuda.memory._record_memory_history(enabled=None)
            self.started = False
        if _oom_target is self:
            _oom_target = None
        self.ctx.uninstall()
        self._nvml.stop()

    # -- TagListener ---------------------------------------------------------------------------
    def context_changed(self, ctx: TaggingContext) -> None:
        if not self.started:
            return
        if self._contexts is None:
            set_cuda_memory_metadata(ctx.context_json())
        else:
            self._note_context(ctx)

    def _note_context(self, ctx: TaggingContext) -> None:
        context = ctx.context_json()
        if not self._contexts or self._contexts[-1][1] != context:
            self._contexts.append((time.time_ns() // 1000, sys.intern(context)))

    def retag(self, tensor: torch.Tensor, tag: Tag) -> None:
        if not self.started or tensor.device.type != "cuda":
            return
        try:
            addr = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, fake)
            return
        metadata = sys.intern(tag.to_json())
        self._retags.append(_Retag(time.time_ns() // 1000, tensor.device.index or 0, addr, metadata))
        if self._annotate is not None:
            try:
                self._annotate(tensor, metadata)
            except (RuntimeError, TypeError):  # an older or different signature: ours suffices
                self._annotate = None


def _device_uuids() -> list[str] | None:
    """UUIDs of the CUDA devices (to match NVML's devices); None where torch cannot say."""
    try:
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except (AttributeError, RuntimeError):
        return None


def _metadata(text: Any) -> dict:
    if not isinstance(text, str) or not text.startswith("{"):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _owner(meta: dict) -> str:
    owner = meta.get("owner")
    return owner if owner in tx.OWNERS else tx.UNKNOWN


def _merge(alloc_meta: dict, retag_meta: dict) -> dict:
    """The allocation's tag after a re-tag: the new role (owner, param, dtype, shape); when and
    where it was allocated (phase, step, module) stay, unless unknown."""
    merged = dict(alloc_meta)
    for key, value in retag_meta.items():
        if key in ("phase", "step", "module") and alloc_meta.get(key) not in (None, ""):
            continue
        if value not in ("", None, []):
            merged[key] = value
    return merged


def finalize(snap: dict, retags: list[_Retag], contexts: list[tuple[int, str]] | None = None) -> dict:
    """Set ``category`` (owner) on every trace event and fold re-tags into their allocations.

    ``contexts``, (time_us, context) in time order, stands in for torch's own metadata where it
    could not stamp it: each event takes the last context noted at or before its time.

    Walks each device's trace in order keeping the alloc event live at each address; a re-tag
    made at time t applies to the allocation live at its address at t, if its owner's priority
    is at least the current one (``tagging.OWNER_PRIORITY``). The allocator's clock and Python's
    can disagree by a few microseconds, so a re-tag that finds nothing live at its address goes
    to the next allocation there if that one is at most ``RETAG_SLACK_US`` later. The CPU
    backend's lifetime rules (``lifetimes``) then apply, with the phase stamped on each event:
    temporaries alive when backward begins, or freed in it, are activations; optimizer-step
    temporaries that outlive the step are optimizer state. Frees and annotate events take their
    allocation's owner; segment, snapshot and oom events are ``unknown``. Mutates and returns
    ``snap``."""
    by_device: dict[int, list[_Retag]] = collections.defaultdict(list)
    for r in retags:
        by_device[r.device].append(r)
    context_times = [t for t, _ in contexts] if contexts is not None else None
    for device, trace in enumerate(snap.get("device_traces", [])):
        if contexts is not None:
            _stamp_contexts(trace, context_times, contexts)
        _DeviceTags(sorted(by_device.get(device, []), key=lambda r: r.time_us)).run(trace)
    return snap


RETAG_SLACK_US = 1000


def _stamp_contexts(trace: list[dict], times: list[int], contexts: list[tuple[int, str]]) -> None:
    """Give each event the context noted last at or before its time (none before the first);
    ``times`` are the contexts' own, made once for all devices."""
    for event in trace:
        t = event.get("time_us")
        i = bisect.bisect_right(times, t) - 1 if t is not None else -1
        if i >= 0:
            event["user_metadata"] = contexts[i][1]


class _DeviceTags:
    def __init__(self, retags: list[_Retag]) -> None:
        self.retags = retags
        self.times = [r.time_us for r in retags]
        self.done = 0
        self.live: dict[int, dict] = {}        # addr -> alloc event live there
        self.tags: dict[int, dict] = {}        # id(alloc event) -> its tag so far
        self.orphans: dict[int, _Retag] = {}   # addr -> re-tag that found nothing live yet
        self.changed: set[int] = set()         # id(alloc event) whose tag differs from its stamp
        self.freed: dict[int, dict] = {}       # id(alloc event) -> context of its first free
        self.kept: set[int] = set()            # id(alloc event) made an activation at backward entry
        self.retagged: set[int] = set()        # id(alloc event) a re-tag changed
        self.workspace_sizes = {**dict.fromkeys(workspaces.cublaslt_workspace_sizes(), workspaces.CUBLASLT),
                                **dict.fromkeys(workspaces.cublas_workspace_sizes(), workspaces.CUBLAS)}
        self.backward = BackwardEntry()
        self.parsed: dict[Any, dict] = {}      # metadata string -> its dict (never mutated: shared)

    def run(self, trace: list[dict]) -> None:
        owner_of: list[tuple[dict, dict | None]] = []   # (free/annotate event, its alloc)
        for event in trace:
            t = event.get("time_us")
            if t is not None:
                self._apply_until(bisect.bisect_left(self.times, t))
            text = event.get("user_metadata")
            context = self.parsed.get(text) if isinstance(text, str) else None
            if context is None:
                context = _metadata(text)
                if isinstance(text, str):
                    self.parsed[text] = context
            if context.get("phase"):
                self._enter(context["phase"])
            action, addr = event.get("action"), event.get("addr")
            if action == "alloc":
                self._alloc(event, addr, t, context)
            elif action in _FREES or action == "annotate":
                alloc = self.live.get(addr)
                if action == "annotate" and alloc is not None:
                    self._retag(alloc, context)
                elif alloc is not None:
                    self.freed.setdefault(id(alloc), context)
                owner_of.append((event, alloc))
                if action == "free_completed":
                    self.live.pop(addr, None)
            else:
                event["category"] = tx.UNKNOWN
        self._apply_until(len(self.retags))
        for event in trace:
            if event.get("action") == "alloc":
                self._final(event)
                tag = self.tags[id(event)]
                event["category"] = _owner(tag)
                if id(event) in self.changed:
                    event["user_metadata"] = json.dumps(tag, separators=(",", ":"))
        for event, alloc in owner_of:
            tag = self.tags[id(alloc)] if alloc is not None else {}
            event["category"] = _owner(tag)
            if event["action"] == "annotate" and tag:
                event["user_metadata"] = json.dumps(tag, separators=(",", ":"))

    def _alloc(self, event: dict, addr: int, t: int | None, context: dict) -> None:
        self.live[addr] = event
        self.tags[id(event)] = context
        orphan = self.orphans.pop(addr, None)
        if orphan is not None and t is not None and t - orphan.time_us <= RETAG_SLACK_US:
            self._retag(event, _metadata(orphan.metadata))

    def _enter(self, phase: str) -> None:
        """An event stamped ``phase``: on entering backward, live temporaries are kept (not
        those the program freed whose block waits for its streams: they left autograd)."""
        kept = self.backward.kept_phase(phase)
        if kept is None:
            return
        for alloc in self.live.values():
            if id(alloc) in self.freed:
                continue
            tag = self.tags[id(alloc)]
            owner = owner_when_kept(_owner(tag), tag.get("phase", ""), kept)
            if owner != _owner(tag):
                self.tags[id(alloc)] = {**tag, "owner": owner}
                self.changed.add(id(alloc))
                self.kept.add(id(alloc))

    def _final(self, alloc: dict) -> None:
        """Apply the owner rules that need the allocation's free (none while it is alive)."""
        tag, free = self.tags[id(alloc)], self.freed.get(id(alloc), {})
        owner = final_owner(_owner(tag), tag.get("phase", ""), tag.get("step", -1),
                            free.get("phase", ""), free.get("step", -1))
        made_in_pass = tag.get("phase") == "forward" or tag.get("phase") in IN_BACKWARD
        if made_in_pass and (owner == tx.TEMPORARY or (owner == tx.ACTIVATION and id(alloc) in self.kept)):
            library = self._workspace(alloc)
            if library:
                self.tags[id(alloc)] = {**tag, "owner": tx.TEMPORARY, "workspace": library}
                self.changed.add(id(alloc))
                return
        if owner != _owner(tag):
            self.tags[id(alloc)] = {**tag, "owner": owner}
            self.changed.add(id(alloc))

    def _workspace(self, alloc: dict) -> str:
        """The library whose workspace a temporary (or one kept at backward entry) is, else "":
        its C++ frames say so, or (Python stacks only) it has a workspace's size, is never freed
        and no re-tag gave it a role (``workspaces``). A workspace is no activation: on its own
        the lifetime rule makes the one a forward matmul creates one."""
        if any(workspaces.is_workspace_frame(f.get("name", "")) for f in alloc.get("frames") or ()):
            return workspaces.CUBLAS
        if id(alloc) in self.freed or id(alloc) in self.retagged:
            return ""
        return self.workspace_sizes.get(alloc.get("size"), "")

    def _apply_until(self, upto: int) -> None:
        for r in self.retags[self.done:upto]:
            event = self.live.get(r.addr)
            if event is None:
                self.orphans[r.addr] = r
            else:
                self._retag(event, _metadata(r.metadata))
        self.done = max(self.done, upto)

    def _retag(self, alloc: dict, new: dict) -> None:
        cur = self.tags[id(alloc)]
        if _owner(new) == tx.INPUT and cur.get("phase", "setup") != "setup":
            return  # as the CPU backend: only tensors made outside the model's forward are inputs
        if OWNER_PRIORITY.get(_owner(new), 0) >= OWNER_PRIORITY.get(_owner(cur), 0):
            self.tags[id(alloc)] = _merge(cur, new)
            self.changed.add(id(alloc))
            self.retagged.add(id(alloc))
