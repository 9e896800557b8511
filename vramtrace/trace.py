"""The Trace model: one loaded snapshot as columnar arrays, shared by every analysis.

Built once per file from the normalised snapshot dict; no analysis reads the raw dicts.
Events of all devices are concatenated device by device (``device_slice`` gives one device's
range, in chronological order). Frames and stacks are interned once: an event's ``stack`` is
an index into the StackTable, which turns it into frames and interned stack keys on demand,
and ``tag`` an index into ``tags`` (category, user_metadata, compile_context); -1 where absent.
"""
from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property
from itertools import chain, compress
from typing import Any, Callable, NamedTuple

import numpy as np

from vramtrace.gcpause import gc_paused
from vramtrace.snapshot.load import SnapshotError, check_event, load_snapshot
from vramtrace.snapshot.save import RECORDED_BY, RECORDERS


class Action(IntEnum):
    ALLOC = 0
    FREE_REQUESTED = 1
    FREE_COMPLETED = 2
    SEGMENT_ALLOC = 3
    SEGMENT_FREE = 4
    SEGMENT_MAP = 5
    SEGMENT_UNMAP = 6
    SNAPSHOT = 7
    OOM = 8
    ANNOTATE = 9


ACTION_CODES = {a.name.lower(): a.value for a in Action}
ACTION_NAMES = [a.name.lower() for a in Action]


class BlockState(IntEnum):
    INACTIVE = 0
    ACTIVE_ALLOCATED = 1
    ACTIVE_PENDING_FREE = 2


STATE_CODES = {s.name.lower(): s.value for s in BlockState}


class Frame(NamedTuple):
    name: str
    filename: str
    line: int


class Tag(NamedTuple):
    """What the recorder said about an allocation: owner in ``category``, detail as JSON."""

    category: str | None
    user_metadata: str | None
    compile_context: str | None

    @property
    def metadata(self) -> dict:
        if not self.user_metadata:
            return {}
        try:
            value = json.loads(self.user_metadata)
        except ValueError:
            return {"text": self.user_metadata}
        return value if isinstance(value, dict) else {"text": self.user_metadata}

    @property
    def owner(self) -> str | None:
        return self.category or self.metadata.get("owner")


@dataclass
class SegmentTable:
    """Final allocator segments, one row each, in file order."""

    device: np.ndarray
    address: np.ndarray
    total_size: np.ndarray
    stream: np.ndarray
    is_large: np.ndarray
    is_expandable: np.ndarray
    first_block: np.ndarray
    n_blocks: np.ndarray


@dataclass
class BlockTable:
    """Final allocator blocks, one row each; ``segment`` indexes SegmentTable."""

    segment: np.ndarray
    address: np.ndarray
    size: np.ndarray
    requested_size: np.ndarray
    state: np.ndarray
    stack: np.ndarray

    @property
    def active(self) -> np.ndarray:
        return self.state != BlockState.INACTIVE


@dataclass
class Trace:
    """One snapshot file, loaded."""

    path: str
    n_devices: int
    action: np.ndarray
    addr: np.ndarray          # for OOM events: the device's free bytes (``device_free``)
    size: np.ndarray
    stream: np.ndarray
    time_us: np.ndarray       # -1 where the file has no timestamps
    device: np.ndarray
    stack: np.ndarray
    tag: np.ndarray
    segments: SegmentTable
    blocks: BlockTable
    stack_table: "StackTable"
    tags: list[Tag]
    settings: dict
    annotations: list[dict]
    extras: dict = field(default_factory=dict)   # other top-level keys (e.g. vramtrace_nvml)

    @classmethod
    def from_snapshot(cls, snap: dict, path: str = "<memory>") -> "Trace":
        return _TraceBuilder(snap, path).build()

    @cached_property
    def _device_bounds(self) -> np.ndarray:
        return np.searchsorted(self.device, np.arange(self.n_devices + 1), side="left")

    def device_slice(self, device: int) -> slice:
        bounds = self._device_bounds
        return slice(int(bounds[device]), int(bounds[device + 1]))

    @property
    def n_events(self) -> int:
        return len(self.action)

    @property
    def has_time(self) -> bool:
        return bool(len(self.time_us)) and bool((self.time_us >= 0).all())

    def stack_frames(self, stack: int) -> list[Frame]:
        """Frames (innermost first) of an event's or block's ``stack`` value."""
        return self.stack_table.frames_of(stack) if stack >= 0 else []

    def stack_key(self, stack: int) -> int:
        """Interned id of a ``stack`` value: equal frame sequences get equal keys (-1: none)."""
        return self.stack_table.key(stack) if stack >= 0 else -1

    def stack_keys(self, stacks: list[int]) -> list[int]:
        """``stack_key`` of many ``stack`` values, interned together."""
        keys = iter(self.stack_table.keys([s for s in stacks if s >= 0]))
        return [next(keys) if s >= 0 else -1 for s in stacks]

    def tag_of(self, tag_id: int) -> Tag | None:
        return self.tags[tag_id] if tag_id >= 0 else None

    @property
    def has_tags(self) -> bool:
        return any(t.owner for t in self.tags)

    @property
    def recorded_by(self) -> str | None:
        """What recorded the file, for files vramtrace wrote ("cuda", "cpu", "simulate")."""
        value = self.extras.get(RECORDED_BY)
        return value if isinstance(value, str) and value in RECORDERS else None


def _get(key: str, default: Any = None) -> Callable[[dict], Any]:
    return operator.methodcaller("get", key, default)


def _addr_or_device_free(e: dict) -> Any:
    return e["addr"] if "addr" in e else e["device_free"]


def _item(key: str) -> Callable[[dict], Any]:
    return operator.itemgetter(key)


def _int_column(rows: list[dict], key: str, default: Any, n: int,
                fallback: Callable[[dict], Any] | None = None) -> np.ndarray:
    """One integer field of every row (event, segment, block): itemgetter when every row has
    the key (2x faster than dict.get), else the per-row fallback. Text raises; floats are
    truncated."""
    try:
        return np.fromiter(map(operator.itemgetter(key), rows), np.int64, n)
    except KeyError:
        getter = fallback or _get(key, default)
        return np.fromiter(map(getter, rows), np.int64, n)


def _field(rows: list[dict], key: str, default: Any = None) -> list:
    """One field of every row: itemgetter when every row has the key (4x faster than
    dict.get), else dict.get with the default."""
    try:
        return list(map(operator.itemgetter(key), rows))
    except KeyError:
        return list(map(_get(key, default), rows))


_TAG_KEYS = frozenset(("category", "user_metadata", "compile_context"))


def load_trace(path: str | os.PathLike,
               progress: Callable[[int, int], None] | None = None) -> Trace:
    """Load a snapshot file of any era into a Trace (raises SnapshotError on bad input)."""
    with gc_paused():   # read_raw pauses it too; this also covers normalising and the build
        return Trace.from_snapshot(load_snapshot(path, progress), str(path))


_FRAME_FIELDS = operator.itemgetter("name", "filename", "line")


class StackTable:
    """Stacks as the file holds them, interned into frames only when an analysis asks.

    Interning every frame of every event costs several times the file's load time, while
    reports look at the stacks of a few live allocations; so raw frame lists are kept (pickle
    already shares their frame dicts) and converted once each, on first use.
    """

    def __init__(self) -> None:
        self._raw: list[list] = []
        self._keys: dict[int, int] = {}
        self._frame_ids: dict[tuple, int] = {}
        self._by_object: dict[int, int] = {}
        self._stack_ids: dict[tuple[int, ...], int] = {}
        self.frames: list[Frame] = []
        self.stacks: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self._raw)

    def extend(self, many: list) -> int:
        """Append several raw stacks; returns the id of the first."""
        first = len(self._raw)
        self._raw.extend(many)
        return first

    def key(self, raw: int) -> int:
        sid = self._keys.get(raw)   # callers ask row by row (flame, diff): a known stack costs a lookup
        if sid is None:
            self._intern_stacks([raw])
            sid = self._keys[raw]
        return sid

    def keys(self, raws: list[int]) -> list[int]:
        """Interned ids of several raw stacks; one call for a report's thousand-odd live stacks
        keeps the per-stack work in one loop without a method call per row or frame."""
        known = self._keys
        new = [r for r in dict.fromkeys(raws) if r not in known]
        if new:
            self._intern_stacks(new)
        return list(map(known.__getitem__, raws))

    def _intern_stacks(self, raws: list[int]) -> None:
        # pickle shares frame dicts between stacks: look them up by identity first (the raw
        # lists keep them alive, so ids stay unique), by content only when first met. A new
        # stack holds a few unmet frame objects among ~60: finding them with list.index
        # keeps the scan in C, where a Python loop over the whole stack cost more
        by_object, frame_ids, stack_ids = self._by_object, self._frame_ids, self._stack_ids
        by_identity = by_object.get
        for raw in raws:
            frames = self._raw[raw]
            if not isinstance(frames, list):
                raise SnapshotError("an event's 'frames' is not a list")
            ids = list(map(by_identity, map(id, frames)))
            k = -1
            for _ in range(ids.count(None)):
                k = ids.index(None, k + 1)
                f = frames[k]
                try:
                    content = _FRAME_FIELDS(f)
                    fid = frame_ids.get(content)
                except (TypeError, KeyError):   # not a dict, a key missing, a value unhashable
                    raise SnapshotError("a stack frame lacks a text name/filename or an integer line") from None
                if fid is None:
                    fid = self._new_frame(content)
                ids[k] = by_object[id(f)] = fid
            ids = tuple(ids)
            sid = stack_ids.setdefault(ids, len(self.stacks))
            if sid == len(self.stacks):
                self.stacks.append(ids)
            self._keys[raw] = sid

    def frames_of(self, raw: int) -> list[Frame]:
        return [self.frames[f] for f in self.stacks[self.key(raw)]]

    def raw(self, raw: int) -> list:
        return self._raw[raw]

    def _new_frame(self, content: tuple) -> int:
        name, filename, line = content
        if not isinstance(name, str) or not isinstance(filename, str) or not isinstance(line, int):
            raise SnapshotError("a stack frame has a non-text name/filename or non-integer line")
        fid = self._frame_ids[content] = len(self.frames)
        self.frames.append(Frame(name, filename, line))
        return fid


class _TraceBuilder:
    """Interns frames, stacks and tags while turning event dicts into columns."""

    def __init__(self, snap: dict, path: str):
        self.snap, self.path = snap, path
        self.stack_table = StackTable()
        self.tag_ids: dict[Tag, int] = {}
        self.tags: list[Tag] = []

    def build(self) -> Trace:
        snap = self.snap
        traces = snap["device_traces"]
        columns = [self._event_columns(d, t) for d, t in enumerate(traces)]
        cat = (lambda i, dtype: np.concatenate([c[i] for c in columns]).astype(dtype, copy=False)
               if columns else np.zeros(0, dtype))
        segments, blocks = self._final_state(snap["segments"])
        extras = {k: v for k, v in snap.items()
                  if k not in ("segments", "device_traces", "allocator_settings", "external_annotations")}
        return Trace(
            path=self.path, n_devices=len(traces),
            action=cat(0, np.int8), addr=cat(1, np.int64), size=cat(2, np.int64),
            stream=cat(3, np.int64), time_us=cat(4, np.int64), device=cat(5, np.int16),
            stack=cat(6, np.int32), tag=cat(7, np.int32),
            segments=segments, blocks=blocks, stack_table=self.stack_table, tags=self.tags, settings=snap.get("allocator_settings") or {},
            annotations=snap.get("external_annotations") or [], extras=extras)

    def _event_columns(self, device: int, events: list[dict]) -> list[np.ndarray]:
        """Columns of one device's events.

        Getters run through ``map`` (C loops) rather than per-event Python code: on a
        1,000,000-event trace this is ~5x faster, keeping the build below the pickle load."""
        n = len(events)
        try:
            action = np.fromiter(map(ACTION_CODES.__getitem__, map(_item("action"), events)), np.int8, n)
            addr = _int_column(events, "addr", None, n, fallback=_addr_or_device_free)
            size = _int_column(events, "size", 0, n)
            stream = _int_column(events, "stream", 0, n)
            time_us = _int_column(events, "time_us", -1, n)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
            self._find_bad_event(device, events)
            raise SnapshotError(f"device {device}: malformed event") from None
        return [action, addr, size, stream, time_us, np.full(n, device, np.int16),
                self._stack_column(_field(events, "frames")), self._tag_column(events)]

    def _stack_column(self, frames: list) -> np.ndarray:
        """Stack ids of rows with frames (added to the stack table, unparsed), -1 elsewhere."""
        has_stack = np.fromiter(map(bool, frames), bool, len(frames))
        stack = np.full(len(frames), -1, np.int32)
        first = self.stack_table.extend(list(compress(frames, has_stack)))
        stack[has_stack] = np.arange(first, len(self.stack_table), dtype=np.int32)
        return stack

    @staticmethod
    def _find_bad_event(device: int, events: list[dict]) -> None:
        """Slow path, only on failure: name the first malformed event."""
        for k, e in enumerate(events):
            check_event(device, k, e)

    def _tag_column(self, events: list[dict]) -> np.ndarray:
        # one C-level walk over the events' keys, stopping at the first tag key, settles
        # untagged files (plain _dump_snapshot), where reading three fields per event cost 3x more
        if _TAG_KEYS.isdisjoint(chain.from_iterable(events)):
            return np.full(len(events), -1, np.int32)
        categories = _field(events, "category")
        metas = _field(events, "user_metadata")
        contexts = _field(events, "compile_context")
        if not any(categories) and not any(metas) and set(contexts) <= {None, "", "N/A"}:
            return np.full(len(events), -1, np.int32)
        ids = [self._tag(*key) for key in zip(categories, metas, contexts)]
        return np.array(ids, np.int32)

    def _tag(self, category: Any, meta: Any, ctx: Any) -> int:
        ctx = None if ctx in ("", "N/A") else ctx
        meta = meta or None
        if category is None and meta is None and ctx is None:
            return -1
        tag = Tag(category if isinstance(category, str) else None,
                  meta if isinstance(meta, str) else None,
                  ctx if isinstance(ctx, str) else None)
        tid = self.tag_ids.get(tag)
        if tid is None:
            tid = self.tag_ids[tag] = len(self.tags)
            self.tags.append(tag)
        return tid

    def _final_state(self, segments: list[dict]) -> tuple[SegmentTable, BlockTable]:
        """Columns of the final segments and blocks, read field by field with C-level map."""
        per_segment = list(map(_item("blocks"), segments))
        n_blocks = np.fromiter(map(len, per_segment), np.int64, len(segments))
        blocks = list(chain.from_iterable(per_segment))
        n_segs, n_blks = len(segments), len(blocks)
        segs = SegmentTable(
            device=_int_column(segments, "device", 0, n_segs).astype(np.int16),
            address=_int_column(segments, "address", None, n_segs),
            total_size=_int_column(segments, "total_size", None, n_segs),
            stream=_int_column(segments, "stream", 0, n_segs),
            is_large=np.array([t == "large" for t in _field(segments, "segment_type", "large")], bool),
            is_expandable=np.fromiter(map(bool, _field(segments, "is_expandable")), bool, n_segs),
            first_block=np.cumsum(n_blocks) - n_blocks, n_blocks=n_blocks)
        blks = BlockTable(
            segment=np.repeat(np.arange(n_segs, dtype=np.int64), n_blocks),
            address=_int_column(blocks, "address", None, n_blks),
            size=_int_column(blocks, "size", None, n_blks),
            requested_size=_int_column(blocks, "requested_size", 0, n_blks),
            state=np.fromiter(map(STATE_CODES.__getitem__, map(_item("state"), blocks)), np.int8, n_blks),
            stack=self._stack_column(_field(blocks, "frames")))
        return segs, blks
