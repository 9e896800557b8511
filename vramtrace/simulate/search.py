"""Largest batch size (or sequence length) that fits a GPU, by galloping + binary search.

Peak memory grows monotonically with batch size and sequence length, so doubling until a run
does not fit and then bisecting the last interval needs about 2*log2(answer) simulations.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from vramtrace.simulate.gpus import GPU, Fit, fit
from vramtrace.simulate.models import Recipe, simulate_recipe

SEARCHABLE = ("batch_size", "seq_len")


@dataclass
class SearchResult:
    """The answer and every simulated point (value -> fit verdict)."""
    knob: str
    best: int                       # 0 when even the smallest value does not fit
    gpu: GPU
    tried: dict[int, Fit] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"knob": self.knob, "best": self.best, "gpu": self.gpu.name,
                "tried": {str(k): v.to_dict() for k, v in sorted(self.tried.items())}}


def find_max(recipe: Recipe, gpu: GPU, knob: str = "batch_size", *, start: int | None = None,
             limit: int = 1 << 16, step: int = 1,
             on_point: Callable[[int, Fit], None] | None = None) -> SearchResult:
    """Largest ``knob`` value (a multiple of ``step``, up to ``limit``) whose simulated step fits.

    ``start`` defaults to ``step``; each probe is a full simulation of ``recipe`` with the knob
    replaced, judged by :func:`vramtrace.simulate.gpus.fit` (reserved peak + overheads).
    """
    if knob not in SEARCHABLE:
        raise ValueError(f"can search {SEARCHABLE}, not {knob!r}")
    result = SearchResult(knob, 0, gpu)

    def probe(units: int) -> bool:
        value = units * step
        res = simulate_recipe(dataclasses.replace(recipe, **{knob: value}))
        verdict = fit(gpu, res.peak_reserved)
        result.tried[value] = verdict
        if on_point is not None:
            on_point(value, verdict)
        return verdict.fits

    lo_units = max(1, (start or step) // step)
    max_units = max(1, limit // step)
    if not probe(lo_units):
        if lo_units == 1:
            return result
        hi, lo = lo_units, 0
    else:
        lo, hi = lo_units, None
        while hi is None:
            nxt = min(lo * 2, max_units)
            if nxt == lo:
                result.best = lo * step
                return result
            if probe(nxt):
                lo = nxt
            else:
                hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    result.best = lo * step
    return result
