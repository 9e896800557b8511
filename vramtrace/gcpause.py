"""Pausing Python's cyclic garbage collector around bulk building of acyclic data."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (as it was after).

    Reading, building or analysing a snapshot makes hundreds of thousands of dicts, lists and
    tuples, none of them cyclic garbage; each 700 new containers trigger a collection and the
    older generations get rescanned as the heap grows: on a 1,000,000-event file that is over
    half of pickle.load's time, and ~10% of a report of a small one."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
