"""Memory totals from torch.profiler's own allocation events (``profile_memory=True``): the
independent truth the CPU backend's alloc/free totals are compared with.

Kernel scratch: an allocation whose whole life lies inside the one op a TorchDispatchMode
dispatched (the op right under the profiler's ``PythonDispatchMode`` scope). It never becomes an
op output, so no dispatch mode can see it: a CPU kernel's temporary, such as TensorIterator's
copies of mixed-dtype inputs cast to the common dtype (CUDA kernels cast while they read) or the
CPU flash-attention kernel's buffers. The profiler's event tree names the op and both ends of
each allocation's life, so the scratch is measured, not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

DISPATCH_MODE_SCOPE = "PythonDispatchMode"


@dataclass(frozen=True)
class ProfiledMemory:
    alloc: int      # bytes allocated during the profiled call
    free: int       # bytes freed during it
    peak: int       # highest net bytes above the start
    scratch: int    # bytes of kernel scratch (allocated and freed inside one dispatched op)

    @property
    def visible_alloc(self) -> int:
        return self.alloc - self.scratch

    @property
    def visible_free(self) -> int:
        return self.free - self.scratch


def profiled_memory(fn: Callable[[], object]) -> ProfiledMemory:
    """Run ``fn`` under the profiler and total its allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []      # (event, its enclosing events, outermost first)
    pending = [(root, ()) for root in prof.profiler.kineto_results.experimental_event_tree()]
    while pending:
        node, outer = pending.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node, outer))
        pending.extend((child, outer + (node,)) for child in node.children)
    allocations.sort(key=lambda a: a[0].start_time_ns)

    alloc = free = cur = peak = scratch = 0
    live = {}             # address -> (allocation event, the dispatched op it happened in)
    for node, outer in allocations:
        size = node.extra_fields.alloc_size
        cur += size
        peak = max(peak, cur)
        if size > 0:
            alloc += size
            live[node.extra_fields.ptr] = (node, _dispatched_op(outer))
            continue
        free -= size
        hit = live.pop(node.extra_fields.ptr, None)
        if hit is not None and hit[1] is not None and node.start_time_ns <= hit[1].end_time_ns:
            scratch += hit[0].extra_fields.alloc_size
    return ProfiledMemory(alloc=alloc, free=free, peak=peak, scratch=scratch)


def _dispatched_op(outer: tuple) -> object | None:
    """The op a dispatch mode called, if the allocation happened inside one."""
    names = [n.name for n in outer]
    if DISPATCH_MODE_SCOPE not in names:
        return None
    k = len(names) - 1 - names[::-1].index(DISPATCH_MODE_SCOPE)
    return outer[k + 1] if k + 1 < len(outer) else None
