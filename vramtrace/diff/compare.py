"""Compare two runs by meaning: bytes per owner x module x phase at comparable points.

Addresses, event indices and allocation order differ between runs, so nothing is matched by
them. Each run's live allocations at a comparable point (``points``) are attributed (tags, or a
guess from frames) and summed into cells keyed by owner, dtype, folded module path (repeated
layers as ``model.layers.*``), creation phase and (optionally) call stack; two runs are compared
cell by cell. A run is one or more units (devices of a file, or per-rank files): cells and
byte totals are summed over its units, peaks are the largest unit's, as the GPU that runs out
first is the one that matters.

``diff_runs`` returns a JSON-ready dict (schema below); renderers only format it.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from vramtrace import __version__
from vramtrace.attribution.breakdown import fold_module
from vramtrace.attribution.classify import attribute, python_frames
from vramtrace.attribution import taxonomy as tx
from vramtrace.diff.points import PEAK, POINT_LABELS, Point, resolve
from vramtrace.render.units import fmt_bytes, fmt_signed_bytes
from vramtrace.replay.timeline import DeviceTimeline, build_timeline
from vramtrace.snapshot.load import SnapshotError
from vramtrace.trace import Trace

SCHEMA_VERSION = 1
FIELDS = ("owner", "dtype", "module", "phase", "stack")
GROUPS: dict[str, tuple[str, ...]] = {
    "owner": ("owner", "dtype"),
    "module": ("owner", "module", "phase"),
    "stack": ("owner", "stack"),
}
EXPLAIN_FIELDS = ("owner", "dtype", "phase", "region")
EXPLAIN_MAX = 5             # contributors named in the plain-language summary
EXPLAIN_SHARE = 0.97        # ... or fewer, once they account for this share of the change
EXPLAIN_MIN_SHARE = 0.01    # ignore changes below 1% of the larger run
_STAR = re.compile(r"^(.*?\.\*)(\.|$)")
_ROOT = re.compile(r"^[A-Z]\w*\.")                 # the root model's class name: LlamaForCausalLM.
_WRAPPER = re.compile(r"^(base_model\.model\.)+")   # PEFT's PeftModel -> LoraModel -> model

OWNER_WORDS = {
    tx.WEIGHT: "frozen {dtype} weights",
    tx.TRAINABLE: "trainable {dtype} weights (adapters)",
    tx.QUANT_STATE: "quantization state (scales)",
    tx.GRADIENT: "{dtype} gradients",
    tx.OPTIMIZER: "{dtype} optimizer state",
    tx.ACTIVATION: "{dtype} activations saved for backward",
    tx.AUTOCAST: "autocast {dtype} copies of frozen weights",
    tx.TEMPORARY: "{dtype} temporaries",
    tx.INPUT: "inputs",
    tx.UNKNOWN: "unattributed memory",
}


@dataclass(frozen=True)
class Unit:
    """One device of one file: what a rank is."""

    label: str
    trace: Trace
    timeline: DeviceTimeline


def units_of(trace: Trace, label: str | None = None) -> list[Unit]:
    """One unit per device that has events or segments (every device of an empty file: none)."""
    label = label or Path(trace.path).name
    devices = [d for d in range(trace.n_devices)
               if trace.device_slice(d).stop > trace.device_slice(d).start
               or bool((trace.segments.device == d).any())]
    return [Unit(label if len(devices) == 1 else f"{label}:cuda{d}", trace, build_timeline(trace, d))
            for d in devices]


@dataclass
class Amount:
    """Bytes (rounded blocks, what the device holds), requested bytes and block count."""

    bytes: int = 0
    requested: int = 0
    count: int = 0

    def add(self, other: "Amount") -> None:
        self.bytes += other.bytes
        self.requested += other.requested
        self.count += other.count


Cells = dict[tuple[str, ...], Amount]


@dataclass
class SideState:
    """One run at one comparable point: units' indices, summed totals and cells."""

    points: list[Point]
    allocated: int
    requested: int
    reserved: int
    cells: Cells = field(default_factory=dict)

    def to_json(self, units: Sequence[Unit]) -> dict:
        return {"allocated": self.allocated, "requested": self.requested, "reserved": self.reserved,
                "units": [{"label": u.label, "index": p.index, "fallback": p.fallback}
                          for u, p in zip(units, self.points)],
                "fallback": any(p.fallback for p in self.points)}


def cells_at(unit: Unit, index: int, stacks: bool = False) -> Cells:
    """Live bytes after event ``index`` of one unit, summed by (owner, dtype, module, phase, stack)."""
    allocs = unit.timeline.allocations
    live = allocs.live_at(index)
    cells: Cells = defaultdict(Amount)
    labels: dict[int, str] = {}
    for row, a in zip(live.tolist(), attribute(unit.trace, allocs, live)):
        stack = _stack_label(unit.trace, int(allocs.stack[row]), labels) if stacks else ""
        cells[(a.owner, a.dtype, module_key(a.module), a.phase, stack)].add(
            Amount(int(allocs.size[row]), int(allocs.requested[row]), 1))
    return dict(cells)


def module_key(module: str) -> str:
    """A module path as both runs can share it: layers folded, root class and PEFT wrappers cut.

    ``PeftModelForCausalLM.base_model.model.model.layers.3.mlp`` and
    ``LlamaForCausalLM.model.layers.3.mlp`` are both ``model.layers.*.mlp``.
    """
    path = fold_module(module)
    root = _ROOT.match(path)
    rest = _WRAPPER.sub("", (path[root.end():] if root else path) + ".").rstrip(".")
    return rest or (root.group(0).rstrip(".") if root else path)


def _stack_label(trace: Trace, stack: int, cache: dict[int, str]) -> str:
    """Python frames outermost first as ``file.py:function``; no line numbers, so runs align."""
    if stack < 0:
        return "-"
    key = trace.stack_key(stack)
    label = cache.get(key)
    if label is None:
        frames = python_frames(trace.stack_frames(stack))
        label = cache[key] = ";".join(f"{Path(f.filename.replace(chr(92), '/')).name}:{f.name}"
                                      for f in reversed(frames)) or "-"
    return label


def side_at(units: Sequence[Unit], point: str, stacks: bool = False) -> SideState:
    """A run (its units summed) at a named comparable point."""
    resolved: list[Point] = []
    cells: Cells = defaultdict(Amount)
    for u in units:
        try:
            resolved.append(resolve(u.trace, u.timeline, point))
            unit_cells = cells_at(u, resolved[-1].index, stacks)
        except SnapshotError as exc:   # malformed frames are found only when first read
            exc.path = u.trace.path
            raise
        for key, amount in unit_cells.items():
            cells[key].add(amount)
    return SideState(resolved, *(sum(u.timeline.at(p.index, s) for u, p in zip(units, resolved))
                                 for s in ("allocated", "requested", "reserved")), dict(cells))


def project(a: Cells, b: Cells, fields: tuple[str, ...]) -> list[dict]:
    """Rows of the two runs' cells summed by ``fields`` (FIELDS or "region"), by |delta| first."""
    sums: dict[tuple, list[Amount]] = defaultdict(lambda: [Amount(), Amount()])
    for side, cells in enumerate((a, b)):
        for key, amount in cells.items():
            sums[tuple(_field(key, f) for f in fields)][side].add(amount)
    rows = [{**dict(zip(fields, k)), "a": x.bytes, "b": y.bytes, "delta": y.bytes - x.bytes,
             "a_requested": x.requested, "b_requested": y.requested,
             "delta_requested": y.requested - x.requested, "a_count": x.count, "b_count": y.count}
            for k, (x, y) in sums.items()]
    rows.sort(key=lambda r: (-abs(r["delta"]), -max(r["a"], r["b"]), tuple(r[f] for f in fields)))
    return rows


def _field(key: tuple[str, ...], name: str) -> str:
    """A cell key's field, or ``region`` (derived from the module)."""
    return region(key[2]) if name == "region" else key[FIELDS.index(name)]


def region(module: str) -> str:
    """Coarse place of a folded module path: up to its repeated layers (``...layers.*``)."""
    m = _STAR.match(module)
    return m.group(1) if m else module


def explain(rows: list[dict], scale: int) -> list[str]:
    """Plain-language lines for the largest contributors of ``project(..., EXPLAIN_FIELDS)``."""
    total = sum(abs(r["delta"]) for r in rows)
    out: list[str] = []
    covered = 0
    for r in rows:
        if len(out) >= EXPLAIN_MAX or covered >= EXPLAIN_SHARE * total:
            break
        if not r["delta"] or abs(r["delta"]) < EXPLAIN_MIN_SHARE * scale:
            break
        covered += abs(r["delta"])
        out.append(describe(r))
    return out


def describe(row: dict) -> str:
    """"+13.1 GiB autocast bf16 copies of frozen weights made in forward, in model.layers.*"."""
    dtype = "" if row.get("dtype") in (None, "-", "") else row["dtype"]
    what = re.sub(r"\s+", " ", OWNER_WORDS.get(row["owner"], row["owner"]).format(dtype=dtype)).strip()
    phase = row.get("phase")
    where = row.get("region") or row.get("module")
    text = f"{fmt_signed_bytes(row['delta'])} {what}"
    if phase not in (None, "-", ""):
        text += f" made in {phase}"
    if where not in (None, "-", ""):
        text += f", in {where}"
    counts = f"{fmt_bytes(row['a'])} -> {fmt_bytes(row['b'])}"
    return f"{text} ({counts})"


def diff_point(a_units: Sequence[Unit], b_units: Sequence[Unit], point: str, group: str) -> dict:
    """One comparable point of two runs: totals, grouped rows, by owner, explanation."""
    stacks = group == "stack"
    a, b = side_at(a_units, point, stacks), side_at(b_units, point, stacks)
    scale = max(a.allocated, b.allocated, 1)
    return {
        "point": point, "label": POINT_LABELS[point],
        "a": a.to_json(a_units), "b": b.to_json(b_units),
        "delta": b.allocated - a.allocated,
        "rows": project(a.cells, b.cells, GROUPS[group]),
        "by_owner": project(a.cells, b.cells, ("owner",)),
        "explanation": explain(project(a.cells, b.cells, EXPLAIN_FIELDS), scale),
        "cells": project(a.cells, b.cells, FIELDS if stacks else FIELDS[:4]),
    }


def peak_of(units: Iterable[Unit]) -> int:
    """The largest per-unit peak of allocated bytes (the device that runs out first)."""
    return max((u.timeline.peak_allocated for u in units), default=0)


def growth_pct(a: int, b: int) -> float | None:
    """Percent growth from a to b (None when a is 0 and b is not)."""
    if a == 0:
        return 0.0 if b == 0 else None
    return 100.0 * (b - a) / a


def diff_runs(a_units: Sequence[Unit], b_units: Sequence[Unit], points: Sequence[str] = (PEAK,),
              group: str = "module", a_label: str = "A", b_label: str = "B") -> dict:
    """Everything ``vramtrace diff`` shows, as plain data.

    Keys: ``a``/``b`` (files, units with their peaks), ``peak`` (largest unit peak of each run,
    delta, growth_pct: what ``--fail-if-peak-grows`` gates on), ``points`` (one per point: each
    run's totals and unit event indices with ``fallback``, ``rows`` grouped by ``group``,
    ``by_owner``, ``explanation`` lines and the full ``cells``; every row has a/b/delta in block
    bytes, the same as ``*_requested`` in requested bytes, and block counts) and, when both runs
    have the same number of units (ranks), ``unit_pairs``."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r} (one of {', '.join(GROUPS)})")
    if not a_units or not b_units:
        raise ValueError("a run without any device data cannot be compared")
    a_peak, b_peak = peak_of(a_units), peak_of(b_units)
    out = {
        "schema": SCHEMA_VERSION, "vramtrace": __version__, "group": group,
        "a": _run_json(a_label, a_units), "b": _run_json(b_label, b_units),
        "peak": {"a": a_peak, "b": b_peak, "delta": b_peak - a_peak, "growth_pct": growth_pct(a_peak, b_peak)},
        "points": [diff_point(a_units, b_units, p, group) for p in points],
    }
    if len(a_units) > 1 and len(a_units) == len(b_units):
        out["unit_pairs"] = [{"a": x.label, "b": y.label, "a_peak": x.timeline.peak_allocated,
                              "b_peak": y.timeline.peak_allocated,
                              "delta": y.timeline.peak_allocated - x.timeline.peak_allocated}
                             for x, y in zip(a_units, b_units)]
    return out


def _run_json(label: str, units: Sequence[Unit]) -> dict:
    return {"label": label, "files": sorted({u.trace.path for u in units}),
            "units": [{"label": u.label, "events": u.timeline.n_events,
                       "peak_allocated": u.timeline.peak_allocated, "peak_reserved": u.timeline.peak_reserved,
                       "tagged": u.trace.has_tags} for u in units]}


def exceeds(diff: dict, pct: float) -> bool:
    """Whether B's peak grew by more than ``pct`` percent over A's (the CI gate)."""
    growth = diff["peak"]["growth_pct"]
    return growth is None or growth > pct
