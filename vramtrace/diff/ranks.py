"""Several ranks (per-rank files, or devices of one file) as one merged view.

Distributed runs write one snapshot per rank. The question is rarely "what does rank 3 hold"
but "how much do all ranks hold together, which rank is the largest, and why is it larger":
so each rank is reported as ``vramtrace report`` does (``device_report``), then every breakdown
is merged into sum, max, min and an imbalance (max / mean - 1: how far the worst rank exceeds
the average), and the largest rank is diffed against the smallest by owner x module x phase.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from vramtrace import __version__
from vramtrace.attribution.breakdown import device_report
from vramtrace.diff.compare import Unit, diff_point, units_of
from vramtrace.trace import Trace

SCHEMA_VERSION = 1
MERGED_BREAKDOWNS = ("by_owner", "by_owner_dtype", "by_module", "by_phase")
RANK_DIFF_ROWS = 10


def imbalance(values: Sequence[int]) -> float:
    """max / mean - 1 (0 when all ranks are equal or hold nothing)."""
    mean = sum(values) / len(values) if values else 0
    return max(values) / mean - 1 if mean else 0.0


def _stats(values: list[int], labels: list[str]) -> dict:
    top = max(range(len(values)), key=values.__getitem__)
    return {"sum": sum(values), "max": values[top], "min": min(values), "max_rank": labels[top],
            "imbalance": imbalance(values), "per_rank": values}


def merge_rows(per_rank: list[list[dict]], labels: list[str]) -> list[dict]:
    """Merge one breakdown (rows of name/bytes) of every rank; missing rows count as 0 bytes."""
    by_name: dict[str, list[int]] = defaultdict(lambda: [0] * len(per_rank))
    for i, rows in enumerate(per_rank):
        for r in rows:
            by_name[r["name"]][i] += r["bytes"]
    merged = [{"name": name, **_stats(values, labels)} for name, values in by_name.items()]
    merged.sort(key=lambda r: (-r["sum"], r["name"]))
    return merged


def build_rank_report(traces: Sequence[Trace], at: str | int = "peak") -> dict:
    """Per-rank reports plus their merge, for ``vramtrace report R0 R1 ...`` (one unit per device)."""
    units = [u for t in traces for u in units_of(t)]
    if not units:
        raise ValueError("no rank has any events or segments")
    labels = [u.label for u in units]
    ranks = [{"rank": u.label, **device_report(u.trace, u.timeline, at)} for u in units]
    totals = {
        "at_point": _stats([r["state"]["allocated"] for r in ranks], labels),
        "peak_allocated": _stats([r["peak_allocated"]["bytes"] for r in ranks], labels),
        "peak_reserved": _stats([r["peak_reserved"]["bytes"] for r in ranks], labels),
    }
    out = {
        "schema": SCHEMA_VERSION, "vramtrace": __version__, "at": str(at),
        "files": [t.path for t in traces], "ranks": ranks, "totals": totals,
        "merged": {k: merge_rows([r[k] for r in ranks], labels) for k in MERGED_BREAKDOWNS},
    }
    if len(units) > 1:
        out["largest_vs_smallest"] = largest_vs_smallest(units)
    return out


def largest_vs_smallest(units: Sequence[Unit]) -> dict:
    """Diff (at each one's peak) of the rank with the smallest peak against the largest."""
    order = sorted(units, key=lambda u: u.timeline.peak_allocated)
    small, large = order[0], order[-1]
    point = diff_point([small], [large], "peak", "module")
    return {"a": small.label, "b": large.label, "delta": point["delta"],
            "explanation": point["explanation"], "rows": point["rows"][:RANK_DIFF_ROWS]}
