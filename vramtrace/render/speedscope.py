"""Flame trees as speedscope's file format (https://www.speedscope.app/file-format-schema.json).

One "sampled" profile whose samples are the tree's paths and whose weights are bytes, so
speedscope's left-heavy and sandwich views rank frames by the memory they hold.
"""
from __future__ import annotations

from vramtrace import __version__
from vramtrace.render.flame import FlameNode

SCHEMA = "https://www.speedscope.app/file-format-schema.json"


def to_speedscope(tree: FlameNode, name: str) -> dict:
    """A JSON-ready speedscope document for ``tree`` (weights in bytes)."""
    frame_ids: dict[str, int] = {}
    samples, weights = [], []
    for path, node in tree.walk():
        if node.self_value > 0:
            samples.append([frame_ids.setdefault(n, len(frame_ids)) for n in path])
            weights.append(node.self_value)
    return {
        "$schema": SCHEMA,
        "shared": {"frames": [{"name": n} for n in frame_ids]},
        "profiles": [{"type": "sampled", "name": name, "unit": "bytes", "startValue": 0,
                      "endValue": sum(weights), "samples": samples, "weights": weights}],
        "name": name,
        "activeProfileIndex": 0,
        "exporter": f"vramtrace {__version__}",
    }
