"""Flame graphs of the bytes live at one point: the tree model every flame output shares.

A flame graph here is a tree of FlameNodes whose levels are, by default, the owner, the folded
module path (``model.layers.*.mlp``) and then the Python frames of the allocating stack,
outermost first (innermost last), weighted by the live blocks' bytes. Untagged files have no
owners (all ``unknown``), so their default levels are the guessed phase and the stack.

Outputs: ``fold``/``parse_folded`` (collapsed stacks ``a;b;c BYTES`` that flamegraph.pl,
inferno and speedscope read), ``render.flame_svg`` (standalone SVG with zoom and search),
``render.flame_html`` (a self-contained page) and ``render.speedscope`` (speedscope JSON).

Differential flame graphs (``vramtrace diff``) reuse the same model::

    before = flame_tree(trace_a, timeline_a, index_a)
    after = flame_tree(trace_b, timeline_b, index_b)
    html = render_flame_html(after, diff=before)    # vramtrace.render.flame_html
    svg = render_flame_svg(after, diff=before)      # vramtrace.render.flame_svg

``diff`` is the baseline run: widths are the bytes of ``tree`` (the new run), colour says how
much each frame grew (red) or shrank (blue) against the baseline, and tooltips give both
figures. Stacks present only in the baseline have no width there; render
``render_flame_svg(before, diff=after)`` to see them (colours then read reversed).
``diff_tree(before, after)`` gives the merged tree (``value`` = after, ``before`` = baseline)
for callers that want the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from vramtrace.attribution.breakdown import fold_module
from vramtrace.attribution.classify import Attribution, attribute, format_frame, python_frames
from vramtrace.replay.timeline import DeviceTimeline
from vramtrace.trace import Trace

LEVELS = ("owner", "module", "phase", "dtype", "stack")
ROOT = "all"
_EMPTY = ("", "-")


@dataclass
class FlameNode:
    """One frame of a flame graph: ``value`` bytes (and ``count`` blocks) in its subtree."""

    name: str
    value: int = 0
    count: int = 0
    before: int | None = None          # differential trees only: the baseline's bytes
    children: dict[str, "FlameNode"] = field(default_factory=dict)

    def add(self, path: Iterable[str], value: int, count: int = 1) -> None:
        """Add ``value`` bytes at the end of ``path`` (and to every node on the way)."""
        node = self
        node.value += value
        node.count += count
        for name in path:
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = FlameNode(name)
            child.value += value
            child.count += count
            node = child

    @property
    def self_value(self) -> int:
        """Bytes that end exactly here (not in a child)."""
        return self.value - sum(c.value for c in self.children.values())

    def sorted_children(self) -> list["FlameNode"]:
        """Children by name, as flame graphs order them (so equal trees draw alike)."""
        return [self.children[k] for k in sorted(self.children)]

    def walk(self, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], "FlameNode"]]:
        """Every node below this one with its path (excluding this node's name), depth first."""
        for child in self.sorted_children():
            child_path = path + (child.name,)
            yield child_path, child
            yield from child.walk(child_path)

    @property
    def is_diff(self) -> bool:
        return self.before is not None


def group_level(trace: Trace) -> str:
    """The level that splits a trace best: owners where vramtrace tagged it, else guessed phases."""
    return "owner" if trace.has_tags else "phase"


def default_levels(trace: Trace) -> tuple[str, ...]:
    return ("owner", "module", "stack") if trace.has_tags else ("phase", "stack")


def parse_levels(text: str) -> tuple[str, ...]:
    """``"owner,module,stack"`` -> levels; raises ValueError naming a bad one."""
    levels = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in levels if p not in LEVELS]
    if bad or not levels:
        raise ValueError(f"unknown flame level {', '.join(bad) or '(none)'}; choose from {', '.join(LEVELS)}")
    return levels


def flame_tree(trace: Trace, tl: DeviceTimeline, index: int,
               levels: Sequence[str] | None = None, inverted: bool = False) -> FlameNode:
    """The blocks live just after event ``index`` of a device, as a flame tree.

    ``inverted`` reverses every path, so allocation sites (innermost frames) become the roots
    and owners the tips: what memray calls an inverted flame graph."""
    levels = tuple(levels or default_levels(trace))
    allocs = tl.allocations
    live = allocs.live_at(index)
    attrs = attribute(trace, allocs, live)
    frames_by_key: dict[int, tuple[str, ...]] = {}
    root = FlameNode(ROOT)
    for stack, size, a in zip(allocs.stack[live].tolist(), allocs.size[live].tolist(), attrs):
        path: list[str] = []
        for level in levels:
            if level == "stack":
                path.extend(_stack_labels(trace, stack, frames_by_key))
            else:
                label = _label(a, level)
                if label not in _EMPTY or level in ("owner", "phase"):
                    path.append(label or "-")
        root.add(reversed(path) if inverted else path, size)
    return root


def _label(a: Attribution, level: str) -> str:
    return fold_module(a.module) if level == "module" else getattr(a, level)


def _stack_labels(trace: Trace, stack: int, cache: dict[int, tuple[str, ...]]) -> tuple[str, ...]:
    """Python frames of a stack, outermost first, interned per distinct stack."""
    if stack < 0:
        return ()
    key = trace.stack_key(stack)
    labels = cache.get(key)
    if labels is None:
        labels = cache[key] = tuple(format_frame(f) for f in reversed(python_frames(trace.stack_frames(stack))))
    return labels


def diff_tree(before: FlameNode, after: FlameNode) -> FlameNode:
    """One tree over both runs: ``value``/``count`` from ``after``, ``before`` the baseline's bytes."""
    node = FlameNode(after.name, after.value, after.count, before.value)
    for name in sorted(set(before.children) | set(after.children)):
        node.children[name] = diff_tree(before.children.get(name) or FlameNode(name),
                                        after.children.get(name) or FlameNode(name))
    return node


def _folded_name(name: str) -> str:
    """Frame names may not hold the separators of the collapsed format."""
    return name.replace(";", ",").replace("\n", " ").replace("\r", " ") or "-"


def fold(tree: FlameNode) -> list[str]:
    """Collapsed stacks, one ``frame;frame;frame BYTES`` line per path that holds bytes itself."""
    return [";".join(_folded_name(n) for n in path) + f" {node.self_value}"
            for path, node in tree.walk() if node.self_value > 0]


def parse_folded(text: str) -> FlameNode:
    """Read collapsed stacks back into a tree (the inverse of ``fold``)."""
    root = FlameNode(ROOT)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        stack, _, value = line.rpartition(" ")
        try:
            root.add(stack.split(";"), int(value))
        except ValueError:
            raise ValueError(f"line {number}: not 'frame;frame BYTES'") from None
    return root


def top_level(tree: FlameNode) -> dict[str, int]:
    """Bytes per first-level node (owners or phases, by default)."""
    return {c.name: c.value for c in tree.children.values()}
