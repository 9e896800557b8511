"""Read snapshot files of every era safely and normalise them to the modern dict form.

Snapshot pickles come from strangers; pickle can run code on load, so the unpickler here
resolves no globals at all. Every era found in the wild is brought to one shape (see
DESIGN.md §3): a dict with ``segments`` (each block with an ``address``), ``device_traces``
(one list per device, always present), ``allocator_settings`` and ``external_annotations``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
from itertools import chain, repeat
from operator import contains, itemgetter, methodcaller
from pathlib import Path
from typing import Any, Callable, Iterable

from vramtrace.gcpause import gc_paused

PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))
SEGMENT_KEYS = ("address", "total_size", "blocks")
BLOCK_KEYS = ("size", "state")
BLOCK_STATES = {"active_allocated", "active_pending_free", "inactive"}
KNOWN_ACTIONS = {"alloc", "free_requested", "free_completed", "segment_alloc", "segment_free",
                 "segment_map", "segment_unmap", "snapshot", "oom", "annotate"}
MAX_FILE_BYTES = 8 << 30


class SnapshotError(Exception):
    """A file that is not a readable memory snapshot; the message names the problem."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Refuses every global and persistent id: snapshots hold plain data only."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: snapshots hold plain data only")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: snapshots hold plain data only")


def safe_unpickle(stream: io.BufferedIOBase) -> Any:
    return _NoGlobalsUnpickler(stream).load()


def read_raw(path: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> Any:
    """Parse a pickle or JSON snapshot file into plain Python objects, never running code."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SnapshotError(exc.strerror or str(exc)) from None
    if path.is_dir():
        raise SnapshotError("is a directory")
    if size == 0:
        raise SnapshotError("empty file")
    if size > MAX_FILE_BYTES:
        raise SnapshotError(f"file of {size} bytes is larger than any snapshot vramtrace reads")
    with open(path, "rb") as fh, gc_paused():
        head = fh.read(1)
        fh.seek(0)
        stream = _ProgressReader(fh, size, progress) if progress else fh
        try:
            if head in (b"{", b"["):
                return json.load(io.TextIOWrapper(stream, encoding="utf-8"))
            if head != b"\x80":
                raise SnapshotError("not a pickle or JSON memory snapshot (unknown file header)")
            return safe_unpickle(stream)
        except SnapshotError:
            raise
        except RecursionError:
            raise SnapshotError("pickle nests too deeply to be a memory snapshot") from None
        except MemoryError:
            raise SnapshotError("pickle asks for more memory than a snapshot needs") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, OverflowError, UnicodeDecodeError, struct.error) as exc:
            raise SnapshotError(f"corrupt or truncated file ({_short(exc)})") from None


class _ProgressReader(io.RawIOBase):
    """File wrapper that reports bytes consumed, for a progress bar on large files."""

    def __init__(self, fh: io.BufferedReader, total: int, progress: Callable[[int, int], None]):
        self._fh, self._total, self._progress, self._done = fh, total, progress, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._fh.readinto(b)
        self._done += n or 0
        self._progress(self._done, self._total)
        return n

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._done += len(data)
        self._progress(self._done, self._total)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data = self._fh.readline(size)
        self._done += len(data)
        return data

    def peek(self, n: int = 0) -> bytes:
        return self._fh.peek(n)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 120 else text[:117] + "..."


def load_snapshot(path: str | os.PathLike,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Load and normalise a snapshot file; raises SnapshotError with a one-line reason."""
    return normalize(read_raw(path, progress))


def normalize(raw: Any) -> dict:
    """Bring any snapshot era to the modern dict form, checking the structure on the way."""
    if isinstance(raw, list):  # torch.cuda.memory_snapshot(): a bare list of segments
        raw = {"segments": raw}
    if not isinstance(raw, dict):
        raise SnapshotError(f"not a memory snapshot (top level is {type(raw).__name__}, expected a dict)")
    if "segments" not in raw:
        raise SnapshotError("not a memory snapshot (no 'segments' key)")
    segments = raw["segments"]
    if not isinstance(segments, list):
        raise SnapshotError("'segments' is not a list")
    if not _segments_well_formed(segments):
        for i, seg in enumerate(segments):
            _check_segment(i, seg)
    traces = raw.get("device_traces")
    if traces is None:
        traces = []
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        raise SnapshotError("'device_traces' is not a list of lists")
    n_devices = max([len(traces)] + [seg.get("device", 0) + 1 for seg in segments])
    traces = traces + [[] for _ in range(n_devices - len(traces))]
    out = dict(raw)
    out["segments"] = segments
    out["device_traces"] = traces
    out.setdefault("allocator_settings", {})
    out.setdefault("external_annotations", [])
    if not isinstance(out["allocator_settings"], dict):
        raise SnapshotError("'allocator_settings' is not a dict")
    if not isinstance(out["external_annotations"], list):
        raise SnapshotError("'external_annotations' is not a list")
    return out


def _all_instances(values: Iterable[Any], kind: type) -> bool:
    return all(map(isinstance, values, repeat(kind)))


def _segments_well_formed(segments: list) -> bool:
    """The checks of `_check_segment` as C-level passes, for files that pass them all (every
    modern file): a third of the cost of walking each segment and block in Python. False
    sends the caller to that walk, which names the problem or upgrades torch 2.0 blocks."""
    try:
        if not _all_instances(segments, dict):
            return False
        devices = list(map(methodcaller("get", "device", 0), segments))
        per_segment = list(map(itemgetter("blocks"), segments))
        if not (_all_instances(map(itemgetter("address"), segments), int)
                and _all_instances(map(itemgetter("total_size"), segments), int)
                and _all_instances(devices, int) and _all_instances(per_segment, list)):
            return False
        if devices and not 0 <= min(devices) <= max(devices) < 4096:
            return False
        blocks = list(chain.from_iterable(per_segment))
        if not _all_instances(blocks, dict):
            return False
        sizes = list(map(itemgetter("size"), blocks))
        return (_all_instances(sizes, int) and (not sizes or min(sizes) >= 0)
                and set(map(itemgetter("state"), blocks)) <= BLOCK_STATES
                and all(map(contains, blocks, repeat("address"))))
    except (KeyError, TypeError):
        return False


def _check_segment(i: int, seg: Any) -> None:
    if not isinstance(seg, dict):
        raise SnapshotError(f"segment {i} is a {type(seg).__name__}, not a dict")
    for key in SEGMENT_KEYS:
        if key not in seg:
            raise SnapshotError(f"segment {i} has no '{key}'")
    if not isinstance(seg["address"], int) or not isinstance(seg["total_size"], int):
        raise SnapshotError(f"segment {i}: address and total_size must be integers")
    if not isinstance(seg.get("device", 0), int) or not 0 <= seg.get("device", 0) < 4096:
        raise SnapshotError(f"segment {i}: bad device {seg.get('device')!r}")
    blocks = seg["blocks"]
    if not isinstance(blocks, list):
        raise SnapshotError(f"segment {i}: 'blocks' is not a list")
    addr = seg["address"]
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise SnapshotError(f"segment {i} block {j} is not a dict")
        for key in BLOCK_KEYS:
            if key not in block:
                raise SnapshotError(f"segment {i} block {j} has no '{key}'")
        if block["state"] not in BLOCK_STATES:
            raise SnapshotError(f"segment {i} block {j}: unknown state {block['state']!r}")
        if not isinstance(block["size"], int) or block["size"] < 0:
            raise SnapshotError(f"segment {i} block {j}: bad size {block['size']!r}")
        if "address" not in block:  # torch 2.0: blocks tile the segment in order, no address
            block["address"] = addr
            _upgrade_legacy_block(block)
        addr += block["size"]


def _upgrade_legacy_block(block: dict) -> None:
    """torch 2.0 kept frames in a per-block 'history' list; newest entry describes the block."""
    history = block.get("history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        block.setdefault("frames", history[-1].get("frames", []))
        block.setdefault("requested_size", history[-1].get("real_size", block["size"]))
    block.setdefault("requested_size", block["size"] if block["state"] != "inactive" else 0)
    block.setdefault("frames", [])


def check_event(d: int, k: int, event: Any) -> None:
    """Raise SnapshotError naming what is wrong with one trace entry (Trace building calls
    this only after its fast column extraction failed, to name the culprit)."""
    if not isinstance(event, dict):
        raise SnapshotError(f"device {d} event {k} is not a dict")
    action = event.get("action")
    if action not in KNOWN_ACTIONS:
        raise SnapshotError(f"device {d} event {k}: unknown action {action!r}")
    if action == "oom":
        if not isinstance(event.get("size", 0), int):
            raise SnapshotError(f"device {d} event {k}: oom size is not an integer")
        return
    if not isinstance(event.get("addr"), int) or not isinstance(event.get("size"), int):
        raise SnapshotError(f"device {d} event {k}: {action} needs integer 'addr' and 'size'")
