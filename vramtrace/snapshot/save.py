"""Write snapshot files that PyTorch's memory visualizer and torch.cuda._memory_viz open.

MemoryViz.js unpickles protocols 2-4 of plain types only, breaks on numpy scalars, sets and
bytes, and crashes when events carry ``category`` but none is ``'unknown'`` (a typo in its
annotate_snapshot). Files are written atomically (temp file + rename) so a crash mid-write
never leaves a truncated snapshot behind.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from vramtrace.attribution.taxonomy import UNKNOWN

PROTOCOL = 4   # MemoryViz accepts 2-4; Python 3.14 defaults to 5

# Top-level key naming what recorded a file vramtrace wrote: "cuda" (PyTorch's allocator
# history), "cpu" (the CPU shadow: tensors were real, the allocator model laid out the blocks)
# or "simulate" (fake tensors). Viewers ignore keys they do not know.
RECORDED_BY = "vramtrace_backend"
RECORDERS = {"cuda": "PyTorch's CUDA allocator", "cpu": "vramtrace's CPU shadow allocator",
             "simulate": "vramtrace's simulator (fake tensors)"}


def plain(value: Any, _memo: dict[int, Any] | None = None) -> Any:
    """Copy ``value`` with only dict/list/str/int/float/bool/None (numpy scalars -> Python).

    Containers shared in the input (torch shares frame dicts between events) stay shared in
    the copy, so pickle's memo writes them once: without this a file grows ~5x."""
    if isinstance(value, (str, bool, type(None))):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    memo = {} if _memo is None else _memo
    key = id(value)
    if key in memo:
        return memo[key]
    if isinstance(value, dict):
        mapping: dict = {}
        memo[key] = mapping
        for k, v in value.items():
            mapping[str(k)] = plain(v, memo)
        return mapping
    if isinstance(value, (list, tuple)):
        items: list = []
        memo[key] = items
        items.extend(plain(v, memo) for v in value)
        return items
    if hasattr(value, "item"):          # numpy / torch scalars
        return plain(value.item(), memo)
    raise TypeError(f"cannot store {type(value).__name__} in a snapshot")


def ensure_unknown_category(snap: dict) -> None:
    """If any event has a category, make sure one of them is 'unknown' (viewer crash otherwise).

    The marker goes on the first ``snapshot``/``alloc`` event that has no category of its own,
    else a zero-byte ``snapshot`` event is appended to the first device with a trace."""
    traces = snap.get("device_traces") or []
    cats = {e.get("category") for t in traces for e in t if "category" in e}
    if not cats or UNKNOWN in cats:
        return
    for trace in traces:
        for event in trace:
            if "category" not in event:
                event["category"] = UNKNOWN
                return
    for trace in traces:
        if trace:
            last = trace[-1]
            trace.append({"action": "snapshot", "addr": 0, "size": 0, "stream": 0,
                          "time_us": last.get("time_us", 0), "category": UNKNOWN})
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_snapshot(snap: dict, path: str | os.PathLike) -> Path:
    """Atomically write ``snap`` as a protocol-4 pickle of plain types; returns the path."""
    path = Path(path)
    data = plain(snap)
    ensure_unknown_category(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(data, fh, protocol=PROTOCOL)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; a snapshot is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
