"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp).

CONTRACT (other modules code against this; the implementation fills it in):

    settings = AllocatorSettings.from_snapshot(snapshot_dict_or_trace_settings)  # or AllocatorSettings()
    model = CachingAllocatorModel(settings, device=0)
    addr = model.malloc(size, stream=0, **fields)   # records 'segment_alloc' (if any) + 'alloc'
    model.free(addr, **fields)                     # records 'free_requested' + 'free_completed'
    model.empty_cache()                            # releases unsplit cached segments ('segment_free')
    model.segments() -> list[dict]                 # PyTorch snapshot 'segments' format, address order
    model.trace -> list[dict]                      # PyTorch 'device_traces' entry format
    model.snapshot() -> dict                       # {'segments', 'device_traces', 'allocator_settings'}
    model.reserved, model.allocated, model.requested   # current byte counts
    model.peak_reserved, model.peak_allocated

`fields` are copied into the recorded trace entries (frames, time_us, category,
user_metadata, compile_context; never the entry's own action, addr, size, stream).
Addresses are synthetic (a fake cudaMalloc), unless a segment address is forced (used when
replaying a real trace).

The rules follow the C++ source, not its comments:
- sizes: `round_size` (512 B minimum, multiples of 512, or power-of-2 divisions);
  requests <= 1 MiB use the small pool (2 MiB segments), others the large pool
  (20 MiB segments below 10 MiB, else rounded up to 2 MiB).
- best fit: free blocks of a pool are ordered by (stream, size, address); the first
  one >= the rounded size on the same stream is taken (`get_free_block`), subject to
  the `max_split_size` / `max_non_split_rounding` refusals, which do not look further.
- split (`should_split`): small pool or expandable segments: >= 512 B left; large pool:
  request < max_split_size and > 1 MiB left. The new block takes the front; the old
  block becomes the remainder and keeps its stale `requested_size`.
- free (`free_block`): merge with free neighbours of the same segment; the merged block
  keeps the freed block's `requested_size`.
- memory goes back only through `empty_cache`, the OOM retry (oversize blocks first when
  max_split_size is set, then every unsplit cached segment) and garbage collection.
- expandable segments: one virtual range per (stream, pool) grown by 2 MiB / 20 MiB
  pages at the lowest free address (`segment_map`), unmapped on release (`segment_unmap`).
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

MB = 1024 * 1024
K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 * MB
K_SMALL_BUFFER = 2 * MB
K_LARGE_BUFFER = 20 * MB
K_MIN_LARGE_ALLOC = 10 * MB
K_ROUND_LARGE = 2 * MB
N_ROUNDUP_INTERVALS = 16  # 1 MiB .. 64 GiB, one entry per power of two
_SYNTHETIC_BASE = 0x7F0000000000
_DEFAULT_VA_SIZE = 1 << 40  # virtual range reserved per expandable segment


class AllocatorOOM(MemoryError):
    """Raised by `CachingAllocatorModel.malloc` when `capacity_bytes` cannot fit a request
    even after the allocator's retries (the model's `torch.OutOfMemoryError`)."""

    def __init__(self, size: int, device_free: int, reserved: int, allocated: int) -> None:
        super().__init__(
            f"model out of memory: tried to allocate {size} B with {device_free} B free "
            f"({reserved} B reserved, {allocated} B allocated)")
        self.size = size
        self.device_free = device_free


@dataclass(frozen=True)
class AllocatorSettings:
    """The allocator options that change placement (PYTORCH_CUDA_ALLOC_CONF)."""

    max_split_size: int | None = None            # bytes; None = unlimited (-1 in snapshots)
    max_non_split_rounding: int = K_LARGE_BUFFER  # bytes an oversize block may exceed a request
    roundup_power2_divisions: tuple[int, ...] = (0,) * N_ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    large_segment_size: int = K_LARGE_BUFFER
    conf: str = ""

    @classmethod
    def from_snapshot(cls, settings: Mapping[str, Any] | None) -> "AllocatorSettings":
        """Parse a snapshot's `allocator_settings` (or a whole snapshot dict holding one);
        files older than ~2.4 have none and get the defaults."""
        if settings is None:
            return cls()
        if "allocator_settings" in settings or "segments" in settings:
            return cls.from_snapshot(settings.get("allocator_settings"))
        msz = settings.get("max_split_size", -1)
        divs = [0] * N_ROUNDUP_INTERVALS
        rp2 = settings.get("roundup_power2_divisions") or {}
        if isinstance(rp2, Mapping):
            for k, v in rp2.items():
                idx = max(0, int(k).bit_length() - 1)
                if idx < N_ROUNDUP_INTERVALS:
                    divs[idx] = int(v)
        elif isinstance(rp2, (list, tuple)):
            for i, v in enumerate(list(rp2)[:N_ROUNDUP_INTERVALS]):
                divs[i] = int(v)
        return cls(
            max_split_size=None if msz is None or int(msz) < 0 else int(msz),
            max_non_split_rounding=int(settings.get("max_non_split_rounding_size", K_LARGE_BUFFER)),
            roundup_power2_divisions=tuple(divs),
            garbage_collection_threshold=float(settings.get("garbage_collection_threshold", 0.0) or 0.0),
            expandable_segments=bool(settings.get("expandable_segments", False)),
            large_segment_size=int(settings.get("large_segment_size", K_LARGE_BUFFER)),
            conf=str(settings.get("PYTORCH_CUDA_ALLOC_CONF", "") or ""),
        )

    @classmethod
    def from_conf_string(cls, conf: str) -> "AllocatorSettings":
        """Parse PYTORCH_CUDA_ALLOC_CONF syntax, e.g. 'expandable_segments:True,max_split_size_mb:128,
        roundup_power2_divisions:[256:1,512:2,>:4]'. Unknown keys are skipped, as PyTorch does."""
        toks: list[str] = []
        buf = ""
        for ch in conf:
            if ch in ",:[]":
                if buf.strip():
                    toks.append(buf.strip())
                buf = ""
                toks.append(ch)
            else:
                buf += ch
        if buf.strip():
            toks.append(buf.strip())
        vals: dict[str, Any] = {}
        divs = [0] * N_ROUNDUP_INTERVALS
        i = 0
        while i < len(toks):
            key = toks[i]
            if key == ",":
                i += 1
                continue
            if i + 2 >= len(toks) or toks[i + 1] != ":":
                raise ValueError(f"allocator conf: expected 'key:value' at {key!r}")
            i += 2
            if toks[i] == "[":
                j = toks.index("]", i)
                group = toks[i + 1:j]
                i = j + 1
            else:
                group = [toks[i]]
                i += 1
            if key == "max_split_size_mb":
                v = int(group[0])
                if v < K_LARGE_BUFFER // MB:
                    raise ValueError(f"max_split_size_mb too small, must be >= {K_LARGE_BUFFER // MB}")
                vals["max_split_size"] = v * MB
            elif key == "max_non_split_rounding_mb":
                v = int(group[0])
                if v < K_LARGE_BUFFER // MB:
                    raise ValueError(f"max_non_split_rounding_mb too small, must be >= {K_LARGE_BUFFER // MB}")
                vals["max_non_split_rounding"] = v * MB
            elif key == "large_segment_size_mb":
                vals["large_segment_size"] = int(group[0]) * MB
            elif key == "garbage_collection_threshold":
                v = float(group[0])
                if not 0.0 < v < 1.0:
                    raise ValueError("garbage_collection_threshold must be in (0.0, 1.0)")
                vals["garbage_collection_threshold"] = v
            elif key == "expandable_segments":
                vals["expandable_segments"] = group[0].lower() == "true"
            elif key == "roundup_power2_divisions":
                divs = _parse_roundup(group)
        return cls(roundup_power2_divisions=tuple(divs), conf=conf, **vals)

    def to_snapshot(self) -> dict:
        """The `allocator_settings` dict PyTorch writes into snapshots."""
        return {
            "PYTORCH_CUDA_ALLOC_CONF": self.conf,
            "max_split_size": -1 if self.max_split_size is None else self.max_split_size,
            "garbage_collection_threshold": self.garbage_collection_threshold,
            "expandable_segments": self.expandable_segments,
            "pinned_num_register_threads": 1,
            "release_lock_on_cudamalloc": False,
            "pinned_use_cuda_host_register": False,
            "roundup_power2_divisions": {str(1 << i): d for i, d in enumerate(self.roundup_power2_divisions)},
            "max_non_split_rounding_size": self.max_non_split_rounding,
            "large_segment_size": self.large_segment_size,
        }

    @functools.cached_property   # read twice per modelled alloc
    def split_limit(self) -> int:
        """max_split_size as a number (PyTorch's SIZE_MAX when unset)."""
        return (1 << 64) - 1 if self.max_split_size is None else self.max_split_size


def _parse_roundup(group: list[str]) -> list[int]:
    """roundup_power2_divisions: a single value, or [MB:div,...,>:div] per power-of-2 interval."""
    divs = [0] * N_ROUNDUP_INTERVALS
    items = [t for t in group if t not in (",",)]
    if len(items) == 1:
        return [int(items[0])] * N_ROUNDUP_INTERVALS
    first = True
    last = 0
    for k in range(0, len(items) - 2, 3):
        bound, _, value = items[k], items[k + 1], int(items[k + 2])
        if bound == ">":
            for j in range(last + 1, N_ROUNDUP_INTERVALS):
                divs[j] = value
            continue
        idx = min(max(int(bound).bit_length() - 1, 0), N_ROUNDUP_INTERVALS - 1)
        if first:
            for j in range(idx):
                divs[j] = value
            first = False
        divs[idx] = value
        last = idx
    return divs


def round_size(size: int, settings: AllocatorSettings | None = None) -> int:
    """PyTorch's round_size: the block size a request of `size` bytes needs."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    if settings is not None:
        idx = min(max(size.bit_length() - 1 - 20, 0), N_ROUNDUP_INTERVALS - 1)
        div = settings.roundup_power2_divisions[idx]
        if div > 1 and size > K_MIN_BLOCK * div:
            return _roundup_power2_next_division(size, div)
    return K_MIN_BLOCK * ((size + K_MIN_BLOCK - 1) // K_MIN_BLOCK)


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def allocation_size(rounded: int, settings: AllocatorSettings | None = None) -> int:
    """Size of the segment cudaMalloc'd for a rounded request (get_allocation_size)."""
    if rounded <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if rounded < K_MIN_LARGE_ALLOC:
        return settings.large_segment_size if settings else K_LARGE_BUFFER
    return K_ROUND_LARGE * ((rounded + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


NEVER_SPLIT = 1 << 62  # above any remainder (4 EiB) yet an int64: the block is taken whole


def split_threshold(size: int, small: bool, settings: AllocatorSettings) -> int:
    """Smallest remainder `should_split` cuts off a free block serving a rounded request of
    `size` bytes from the small or large pool (NEVER_SPLIT: taken whole). A threshold rather
    than a predicate, so that replays can look it up once per request size."""
    if small or settings.expandable_segments:
        return K_MIN_BLOCK
    return K_SMALL_SIZE + 1 if size < settings.split_limit else NEVER_SPLIT


class _ExpSeg:
    """One reserved virtual range of an expandable segment; pages are mapped on demand."""

    __slots__ = ("base", "page", "npages", "mapped", "stream", "small")

    def __init__(self, base: int, page: int, va_size: int, stream: int, small: bool) -> None:
        self.base, self.page, self.stream, self.small = base, page, stream, small
        self.npages = va_size // page
        self.mapped: set[int] = set()


class _Block:
    __slots__ = ("addr", "size", "requested", "stream", "small", "allocated", "pending",
                 "prev", "next", "mapped", "es", "fields", "seg_fields", "gc_base")

    def __init__(self, addr: int, size: int, stream: int, small: bool) -> None:
        self.addr, self.size, self.stream, self.small = addr, size, stream, small
        self.requested = 0
        self.allocated = False
        self.pending = False
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.mapped = True
        self.es: _ExpSeg | None = None
        self.fields: dict | None = None       # context_when_allocated
        self.seg_fields: dict | None = None   # context_when_segment_allocated
        self.gc_base = 0


class _Pool:
    """Free blocks ordered like BlockComparatorSize (stream, size, address), plus the
    unmapped parts of expandable segments ordered by (stream, address)."""

    __slots__ = ("small", "keys", "unmapped", "gc_calls")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[tuple[int, int, int]] = []
        self.unmapped: list[tuple[int, int]] = []
        self.gc_calls = 0


SegmentAddressFn = Callable[[int, int, bool], int]


@dataclass
class _Counters:
    reserved: int = 0
    allocated: int = 0
    requested: int = 0
    peak_reserved: int = 0
    peak_allocated: int = 0
    peak_requested: int = 0


class CachingAllocatorModel:
    """One device of the caching allocator, recording PyTorch-format trace entries.

    `capacity_bytes` plays the device's free memory (cudaMalloc fails beyond it), which
    drives the OOM-retry path and garbage collection. `segment_address(size, stream,
    is_small)` forces where a new segment lands (replaying a real trace)."""

    def __init__(self, settings: AllocatorSettings | None = None, device: int = 0, *,
                 capacity_bytes: int | None = None,
                 segment_address: SegmentAddressFn | None = None,
                 record: bool = True) -> None:
        self.settings = settings or AllocatorSettings()
        self.device = device
        self.capacity_bytes = capacity_bytes
        self.segment_address = segment_address
        self.record = record
        self.trace: list[dict] = []
        self._pools = {True: _Pool(True), False: _Pool(False)}
        self._free: dict[int, _Block] = {}      # free mapped blocks by address
        self._unmapped: dict[int, _Block] = {}  # unmapped expandable ranges by address
        self._active: dict[int, _Block] = {}    # allocated or pending-free blocks by address
        self._expandable: dict[tuple[int, bool], list[_ExpSeg]] = {}
        self._next_va = _SYNTHETIC_BASE
        self._c = _Counters()
        # Decided once from the settings and capacity (fixed at construction), not per request:
        # round_size without settings rounds to 512 B multiples, which is what the divisions
        # do too when no interval has more than one
        divided = any(d > 1 for d in self.settings.roundup_power2_divisions)
        self._rounding = self.settings if divided else None
        self._collects_garbage = capacity_bytes is not None and self.settings.garbage_collection_threshold > 0.0

    # ---- public counters -------------------------------------------------------------
    @property
    def reserved(self) -> int:
        return self._c.reserved

    @property
    def allocated(self) -> int:
        return self._c.allocated

    @property
    def requested(self) -> int:
        return self._c.requested

    @property
    def peak_reserved(self) -> int:
        return self._c.peak_reserved

    @property
    def peak_allocated(self) -> int:
        return self._c.peak_allocated

    @property
    def peak_requested(self) -> int:
        return self._c.peak_requested

    def block_size(self, addr: int) -> int:
        """Rounded size of the live block at `addr` (KeyError if none)."""
        return self._active[addr].size

    # ---- recording -------------------------------------------------------------------
    def _rec(self, action: str, addr: int, size: int, stream: int, fields: dict | None) -> None:
        if self.record:
            self.trace.append({"action": action, "addr": addr, "size": size, "stream": stream,
                               **(fields or {})})

    # ---- free-block index ------------------------------------------------------------
    def _insert_free(self, b: _Block) -> None:
        pool = self._pools[b.small]
        bisect.insort(pool.keys, (b.stream, b.size, b.addr))
        b.gc_base = pool.gc_calls
        self._free[b.addr] = b

    def _remove_free(self, b: _Block, at: int | None = None) -> None:
        """Take ``b`` out of the free-block index (``at``: its position in its pool's keys, when
        the caller has just found it there)."""
        keys = self._pools[b.small].keys
        if at is None:
            k = (b.stream, b.size, b.addr)
            at = bisect.bisect_left(keys, k)
            assert keys[at] == k, "free-block index out of sync"
        del keys[at]
        del self._free[b.addr]

    def _insert_unmapped(self, b: _Block) -> None:
        bisect.insort(self._pools[b.small].unmapped, (b.stream, b.addr))
        self._unmapped[b.addr] = b

    def _remove_unmapped(self, b: _Block) -> None:
        lst = self._pools[b.small].unmapped
        i = bisect.bisect_left(lst, (b.stream, b.addr))
        del lst[i]
        del self._unmapped[b.addr]

    # ---- malloc ----------------------------------------------------------------------
    def malloc(self, size: int, stream: int = 0, **fields: Any) -> int:
        """Allocate `size` bytes on `stream`; returns the block address."""
        rsize = round_size(size, self._rounding)
        pool = self._pools[rsize <= K_SMALL_SIZE]
        block = self._get_free_block(pool, stream, rsize)
        if block is None:
            block = self._block_from_device(pool, stream, rsize, fields)
        return self._alloc_found_block(block, rsize, size, fields)

    def _block_from_device(self, pool: _Pool, stream: int, rsize: int, fields: dict) -> _Block:
        """No cached block fits: a new segment, after the allocator's retries (AllocatorOOM
        when none succeeds)."""
        alloc_size = allocation_size(rsize, self.settings)
        if self._collects_garbage:
            self._garbage_collect(fields)
        block = (self._alloc_block(pool, stream, rsize, alloc_size, fields)
                 or (self._release_available_cached_blocks(pool, stream, rsize, fields)
                     and self._alloc_block(pool, stream, rsize, alloc_size, fields))
                 or (self._release_cached_blocks(fields)
                     and self._alloc_block(pool, stream, rsize, alloc_size, fields)))
        if not block:
            free = max(0, (self.capacity_bytes or 0) - self._c.reserved)
            if self.record:
                e = {"action": "oom", "device_free": free, "size": rsize, "stream": stream}
                e.update(fields)
                self.trace.append(e)
            raise AllocatorOOM(alloc_size, free, self._c.reserved, self._c.allocated)
        return block

    def _get_free_block(self, pool: _Pool, stream: int, size: int) -> _Block | None:
        st = self.settings
        if self._collects_garbage:
            pool.gc_calls += 1
        keys = pool.keys
        i = bisect.bisect_left(keys, (stream, size, -1))
        if i == len(keys) or keys[i][0] != stream:
            return None
        b = self._free[keys[i][2]]
        if b.es is not None:
            if st.expandable_segments:
                def exp_size(x: _Block) -> int:
                    nx = x.next
                    return x.size + (nx.size if nx is not None and not nx.mapped else 0)
                j = i + 1
                while (b.es is not None and j < len(keys) and keys[j][0] == stream
                       and exp_size(self._free[keys[j][2]]) < exp_size(b)):
                    i, j = j, j + 1
                    b = self._free[keys[i][2]]
            else:
                i += 1
                while i < len(keys) and keys[i][0] == stream and self._free[keys[i][2]].es is not None:
                    i += 1
                if i == len(keys) or keys[i][0] != stream:
                    return None
                b = self._free[keys[i][2]]
        limit = st.split_limit
        if size < limit and b.size >= limit:
            return None
        if size >= limit and b.size >= size + st.max_non_split_rounding:
            return None
        self._remove_free(b, at=i)
        return b

    def _alloc_found_block(self, b: _Block, rsize: int, orig: int, fields: dict) -> int:
        if b.size - rsize >= split_threshold(rsize, b.small, self.settings):  # should_split
            nb = _Block(b.addr, rsize, b.stream, b.small)
            nb.es = b.es
            nb.prev = b.prev
            if nb.prev is not None:
                nb.prev.next = nb
            nb.next = b
            b.prev = nb
            b.addr += rsize
            b.size -= rsize
            self._insert_free(b)
            b = nb
        b.allocated = True
        b.requested = orig
        b.fields = fields or None   # malloc's own **fields dict, which nothing changes: no copy
        addr = b.addr
        self._active[addr] = b
        self._rec("alloc", addr, orig, b.stream, fields)
        c = self._c
        c.allocated += b.size
        c.requested += orig
        if c.allocated > c.peak_allocated:
            c.peak_allocated = c.allocated
        if c.requested > c.peak_requested:
            c.peak_requested = c.requested
        return addr

    def _over_capacity(self, extra: int) -> bool:
        return self.capacity_bytes is not None and self._c.reserved + extra > self.capacity_bytes

    def _new_address(self, size: int, stream: int, small: bool) -> int:
        if self.segment_address is not None:
            return self.segment_address(size, stream, small)
        addr = self._next_va
        self._next_va += (size + K_ROUND_LARGE - 1) // K_ROUND_LARGE * K_ROUND_LARGE
        return addr

    def _grow_reserved(self, n: int) -> None:
        c = self._c
        c.reserved += n
        c.peak_reserved = max(c.peak_reserved, c.reserved)

    def _alloc_block(self, pool: _Pool, stream: int, rsize: int, alloc_size: int,
                     fields: dict) -> _Block | None:
        if self.settings.expandable_segments:
            return self._alloc_expandable(pool, stream, rsize, fields)
        if self._over_capacity(alloc_size):
            return None
        addr = self._new_address(alloc_size, stream, pool.small)
        b = _Block(addr, alloc_size, stream, pool.small)
        b.seg_fields = fields or None   # malloc's own **fields dict, which nothing changes: no copy
        self._grow_reserved(alloc_size)
        self._rec("segment_alloc", addr, alloc_size, stream, fields)
        return b

    # ---- expandable segments ---------------------------------------------------------
    def _alloc_expandable(self, pool: _Pool, stream: int, size: int, fields: dict) -> _Block | None:
        cand = self._find_expandable_block(pool, stream, size)
        if not cand.mapped and not self._map_block(cand, min(cand.size, size), fields):
            return None
        while cand.size < size:
            nxt = cand.next
            assert nxt is not None
            if not self._map_block(nxt, min(size - cand.size, nxt.size), fields):
                return None
            cand = nxt
        self._remove_free(cand)
        return cand

    @staticmethod
    def _allocatable(b: _Block | None) -> bool:
        return b is not None and not b.allocated and not b.pending

    def _find_expandable_block(self, pool: _Pool, stream: int, size: int) -> _Block:
        lst = pool.unmapped
        i = bisect.bisect_left(lst, (stream, -1))
        while i < len(lst) and lst[i][0] == stream:
            c = self._unmapped[lst[i][1]]
            if self._allocatable(c.prev):
                c = c.prev
            n, x = 0, c
            while n < size and self._allocatable(x):
                n += x.size
                x = x.next
            if n >= size:
                return c
            i += 1
        page = K_SMALL_BUFFER if pool.small else self.settings.large_segment_size
        va = _DEFAULT_VA_SIZE
        if self.capacity_bytes is not None:
            va = max(page, (self.capacity_bytes + self.capacity_bytes // 8 + page - 1) // page * page)
        base = self._next_va
        self._next_va += va + K_LARGE_BUFFER * 16
        es = _ExpSeg(base, page, va, stream, pool.small)
        self._expandable.setdefault((stream, pool.small), []).append(es)
        b = _Block(base, es.npages * page, stream, pool.small)
        b.mapped = False
        b.es = es
        self._insert_unmapped(b)
        return b

    def _map_block(self, b: _Block, size: int, fields: dict) -> bool:
        es = b.es
        assert es is not None
        begin = (b.addr - es.base) // es.page
        end = (b.addr + size - es.base + es.page - 1) // es.page
        nbytes = (end - begin) * es.page
        if self._over_capacity(nbytes):
            return False
        es.mapped.update(range(begin, end))
        self._remove_unmapped(b)
        b.mapped = True
        if nbytes < b.size:
            rest = _Block(b.addr + nbytes, b.size - nbytes, b.stream, b.small)
            rest.mapped = False
            rest.es = es
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            self._insert_unmapped(rest)
            b.size = nbytes
        seg_head = b.prev is None or not b.prev.mapped
        b = self._merge(b, b.prev)
        b = self._merge(b, b.next)
        self._insert_free(b)
        self._grow_reserved(nbytes)
        self._rec("segment_map", es.base + begin * es.page, nbytes, b.stream, fields)
        if seg_head and b.seg_fields is None and fields:
            b.seg_fields = dict(fields)
        return True

    def _unmap_block(self, b: _Block, fields: dict) -> None:
        es = b.es
        assert es is not None
        begin = (b.addr - es.base + es.page - 1) // es.page
        end = (b.addr + b.size - es.base) // es.page
        if begin >= end:
            return
        self._remove_free(b)
        ustart, usize = es.base + begin * es.page, (end - begin) * es.page
        before = ustart - b.addr
        if before > 0:
            nb = _Block(b.addr, before, b.stream, b.small)
            nb.es = es
            nb.prev, nb.next = b.prev, b
            if b.prev is not None:
                b.prev.next = nb
            b.prev = nb
            self._insert_free(nb)
        after = b.size - before - usize
        if after > 0:
            nb = _Block(ustart + usize, after, b.stream, b.small)
            nb.es = es
            nb.prev, nb.next = b, b.next
            if b.next is not None:
                b.next.prev = nb
            b.next = nb
            self._insert_free(nb)
        b.addr, b.size, b.mapped = ustart, usize, False
        es.mapped.difference_update(range(begin, end))
        b = self._merge(b, b.prev)
        b = self._merge(b, b.next)
        self._insert_unmapped(b)
        self._c.reserved -= usize
        self._rec("segment_unmap", ustart, usize, b.stream, fields or b.seg_fields)
        if b.prev is None and b.next is None:
            self._remove_unmapped(b)
            self._expandable[(es.stream, es.small)].remove(es)

    # ---- free ------------------------------------------------------------------------
    def free(self, addr: int, *, deferred: bool = False, **fields: Any) -> None:
        """Free the block at `addr`. `deferred=True` models a block used on another stream
        (record_stream): only 'free_requested' now; `complete_free` finishes it."""
        b = self._active[addr]
        if not b.allocated:
            raise ValueError(f"double free of {addr:#x}")
        b.allocated = False
        self._c.allocated -= b.size
        requested = self._rec_free("free_requested", b, fields)
        if deferred:
            b.pending = True
            return
        if requested is not None:
            # the same context at the same moment: a copy of the entry, not a second build
            completed = requested.copy()
            completed["action"] = "free_completed"
            self.trace.append(completed)
        self._free_block(b)

    def complete_free(self, addr: int, **fields: Any) -> None:
        """Finish a deferred free (the recorded stream's work completed)."""
        b = self._active[addr]
        if not b.pending:
            raise ValueError(f"no pending free at {addr:#x}")
        b.pending = False
        self._rec_free("free_completed", b, fields)
        self._free_block(b)

    def _rec_free(self, action: str, b: _Block, fields: dict) -> dict | None:
        """Record a free's trace entry and return it (None when not recording). Like PyTorch,
        a free without its own context reports the allocation's (its stack, metadata), but
        never the allocation's timestamp."""
        if not self.record:
            return None
        e = {"action": action, "addr": b.addr, "size": b.requested, "stream": b.stream}
        if b.fields:
            e.update(b.fields)
            e.pop("time_us", None)
        e.update(fields)
        self.trace.append(e)
        return e

    def _free_block(self, b: _Block) -> None:
        del self._active[b.addr]
        self._c.requested -= b.requested
        b.fields = None
        b = self._merge(b, b.prev)
        b = self._merge(b, b.next)
        self._insert_free(b)

    def _merge(self, dst: _Block, src: _Block | None) -> _Block:
        """try_merge_blocks: absorb a free neighbour with the same mapped state."""
        if src is None or src.allocated or src.pending or src.mapped != dst.mapped:
            return dst
        if src.mapped:
            self._remove_free(src)
        else:
            self._remove_unmapped(src)
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
            dst.seg_fields = src.seg_fields
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return dst

    # ---- releasing memory ------------------------------------------------------------
    def empty_cache(self, **fields: Any) -> None:
        """torch.cuda.empty_cache(): finish pending frees, release every unsplit cached segment."""
        self._release_cached_blocks(fields)

    def releasable_segments(self) -> list[int]:
        """Addresses `empty_cache` would release now (non-expandable, in release order)."""
        out = []
        for small in (False, True):
            for s, sz, a in self._pools[small].keys:
                b = self._free[a]
                if b.es is None and b.prev is None and b.next is None:
                    out.append(a)
        return out

    def release_segment(self, addr: int, **fields: Any) -> None:
        """cudaFree one cached, unsplit segment (replaying a recorded 'segment_free')."""
        b = self._free.get(addr)
        if b is None or b.prev is not None or b.next is not None or b.es is not None:
            raise ValueError(f"no unsplit cached segment at {addr:#x}")
        self._release_block(b, fields)

    def _release_block(self, b: _Block, fields: dict) -> None:
        self._remove_free(b)
        self._c.reserved -= b.size
        self._rec("segment_free", b.addr, b.size, b.stream, fields or b.seg_fields)

    def _release_cached_blocks(self, fields: dict) -> bool:
        for b in [b for b in self._active.values() if b.pending]:
            self.complete_free(b.addr, **fields)
        for small in (False, True):
            to_unmap = []
            for _, _, a in list(self._pools[small].keys):
                b = self._free[a]
                if b.es is not None:
                    to_unmap.append(b)
                elif b.prev is None and b.next is None:
                    self._release_block(b, fields)
            for b in to_unmap:
                self._unmap_block(b, fields)
        return True

    def _release_available_cached_blocks(self, pool: _Pool, stream: int, size: int,
                                         fields: dict) -> bool:
        limit = self.settings.max_split_size
        if limit is None:
            return False
        key = max(size, limit)
        keys = pool.keys
        i = bisect.bisect_left(keys, (stream, key, -1))
        if i == len(keys) or keys[i][0] != stream:
            if i == 0:
                return False
            released = 0
            i -= 1
            while i >= 0 and released < key and keys[i][1] >= limit and keys[i][0] == stream:
                b = self._free[keys[i][2]]
                released += b.size
                self._release_block(b, fields)
                i -= 1
            return released >= key
        self._release_block(self._free[keys[i][2]], fields)
        return True

    def _garbage_collect(self, fields: dict) -> None:
        cap = self.capacity_bytes or 0
        threshold = int(self.settings.garbage_collection_threshold * cap)
        if self._c.reserved <= threshold:
            return
        target = self._c.reserved - threshold
        pool = self._pools[False]

        def candidates() -> list[_Block]:
            return [self._free[a] for _, _, a in pool.keys
                    if self._free[a].prev is None and self._free[a].next is None
                    and self._free[a].es is None]

        blocks = candidates()
        if not blocks:
            return
        total_age = sum(pool.gc_calls - b.gc_base for b in blocks)
        count = len(blocks)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            avg = total_age / count
            freed = False
            for b in candidates():
                age = pool.gc_calls - b.gc_base
                if age >= avg:
                    freed = True
                    reclaimed += b.size
                    total_age -= age
                    count -= 1
                    self._release_block(b, fields)

    # ---- seeding and output ----------------------------------------------------------
    def load_segments(self, segments: list[dict]) -> None:
        """Seed the model with non-expandable segments in snapshot format (this device's),
        e.g. a snapshot's state rewound to the start of its trace."""
        for seg in segments:
            if seg.get("is_expandable"):
                raise ValueError("seeding expandable segments is not supported")
            small = seg.get("segment_type") == "small" or (
                "segment_type" not in seg and seg["total_size"] == K_SMALL_BUFFER)
            stream = seg.get("stream", 0)
            prev: _Block | None = None
            addr = seg["address"]
            for bd in seg["blocks"]:
                b = _Block(bd.get("address", addr), bd["size"], stream, small)
                addr = b.addr + b.size
                b.requested = bd.get("requested_size", 0)
                b.prev = prev
                if prev is not None:
                    prev.next = b
                else:
                    b.seg_fields = {"frames": seg["frames"]} if seg.get("frames") else None
                prev = b
                state = bd.get("state", "inactive")
                if state == "inactive":
                    self._insert_free(b)
                else:
                    b.allocated = state == "active_allocated"
                    b.pending = not b.allocated
                    b.fields = {"frames": bd["frames"]} if bd.get("frames") else None
                    self._active[b.addr] = b
                    if b.allocated:
                        self._c.allocated += b.size
                    self._c.requested += b.requested
            self._grow_reserved(seg["total_size"])
            self._next_va = max(self._next_va, seg["address"] + seg["total_size"])
        c = self._c
        c.peak_allocated = max(c.peak_allocated, c.allocated)
        c.peak_requested = max(c.peak_requested, c.requested)

    def segments(self) -> list[dict]:
        """Current state in the snapshot 'segments' format, address order."""
        heads = [b for b in list(self._free.values()) + list(self._active.values())
                 if b.prev is None or not b.prev.mapped]
        out = []
        for h in sorted(heads, key=lambda x: x.addr):
            blocks = []
            tot = alloc = active = req = 0
            b: _Block | None = h
            while b is not None and b.mapped:
                if b.allocated:
                    state = "active_allocated"
                elif b.pending:
                    state = "active_pending_free"
                else:
                    state = "inactive"
                frames = list((b.fields or {}).get("frames", [])) if state != "inactive" else []
                blocks.append({"address": b.addr, "size": b.size, "requested_size": b.requested,
                               "state": state, "frames": frames})
                tot += b.size
                if b.allocated:
                    alloc += b.size
                if state != "inactive":
                    active += b.size
                    req += b.requested
                b = b.next
            out.append({
                "device": self.device, "address": h.addr, "total_size": tot,
                "allocated_size": alloc, "active_size": active, "requested_size": req,
                "stream": h.stream, "segment_type": "small" if h.small else "large",
                "segment_pool_id": (0, 0), "is_expandable": h.es is not None,
                "frames": list((h.seg_fields or {}).get("frames", [])), "blocks": blocks,
            })
        return out

    def snapshot(self) -> dict:
        """A dict in torch.cuda.memory._snapshot() format (write with pickle protocol 4)."""
        traces: list[list[dict]] = [[] for _ in range(self.device + 1)]
        traces[self.device] = list(self.trace)
        return {"segments": self.segments(), "device_traces": traces,
                "allocator_settings": self.settings.to_snapshot()}
