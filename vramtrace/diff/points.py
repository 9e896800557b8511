"""Comparable points of a run: where two runs are looked at side by side.

Event indices mean nothing across runs, so runs are compared at points with the same meaning:
each run's own peak, its peak once training began (a loading spike is not what a fine-tune
needs), its end, the end of the first forward pass, the end of backward just before
the first optimizer step, and the state after that step. The phase points come from the phase that
vramtrace's tags stamp on each allocation (its creation context); files without tags get the
phase guessed from the allocation's stack frames, and where neither finds the point it falls
back to the peak (train-peak, forward, backward) or the end (optimizer), marked as such.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vramtrace.attribution.classify import GUESS_OPTIMIZER, guess_phase
from vramtrace.replay.timeline import DeviceTimeline
from vramtrace.trace import Action, Trace

PEAK, TRAIN, END = "peak", "train-peak", "end"
FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"
POINTS: tuple[str, ...] = (PEAK, TRAIN, FORWARD, BACKWARD, OPTIMIZER, END)
POINT_LABELS = {PEAK: "at each run's peak", TRAIN: "at each run's peak once training began (setup excluded)",
                FORWARD: "at the end of the first forward pass",
                BACKWARD: "at the end of backward, before the first optimizer step",
                OPTIMIZER: "after the first optimizer step", END: "at the end of the trace"}

# phase codes per alloc event
_NONE, _SETUP, _FWD, _BWD, _OPT = 0, 1, 2, 3, 4
_PHASE_CODE = {"forward": _FWD, "recompute": _BWD, "backward": _BWD, "optimizer": _OPT,
               GUESS_OPTIMIZER: _OPT, "setup": _SETUP, "input": _SETUP}


@dataclass(frozen=True)
class Point:
    """A resolved point: the event index in one device timeline, and how it was found."""

    name: str
    index: int
    fallback: bool      # True when the phase could not be found and peak/end stands in


def resolve(trace: Trace, tl: DeviceTimeline, name: str) -> Point:
    """The event index of point ``name`` (one of POINTS) in a device timeline."""
    if name == PEAK:
        return Point(name, tl.peak_index, False)
    if name == END:
        return Point(name, tl.end_index, False)
    if name not in POINTS:
        raise ValueError(f"unknown point {name!r} (one of {', '.join(POINTS)})")
    found = _phase_points(trace, tl).get(name)
    if found is not None:
        return Point(name, found, False)
    return Point(name, tl.end_index if name == OPTIMIZER else tl.peak_index, True)


def _train_peak(tl: DeviceTimeline, start: int) -> int:
    """Peak of allocated bytes after event ``start`` - 1 (a loading spike is not a training peak)."""
    return start + int(np.argmax(tl.allocated[start:]))


def _phase_points(trace: Trace, tl: DeviceTimeline) -> dict[str, int]:
    """End of first forward/backward and after the first optimizer step, from alloc phases."""
    sl = tl.events
    allocs = np.flatnonzero(trace.action[sl] == Action.ALLOC)
    phase, step = _alloc_phases(trace, sl, allocs)
    out: dict[str, int] = {}
    bwd = np.flatnonzero(phase == _BWD)
    if not len(bwd) or not (phase[:bwd[0]] == _FWD).any():
        return out
    b0 = int(bwd[0])
    out[TRAIN] = _train_peak(tl, int(allocs[int(np.flatnonzero(phase == _FWD)[0])]))
    out[FORWARD] = int(allocs[b0]) - 1
    opt = np.flatnonzero((phase == _OPT) & (np.arange(len(phase)) > b0))
    if not len(opt):
        return out
    o0 = int(opt[0])
    out[BACKWARD] = int(allocs[o0]) - 1
    # the step's allocations run until one of a later step or of a new forward/backward/input
    after = np.arange(len(phase)) > o0
    nxt = np.flatnonzero(after & ((np.isin(phase, (_FWD, _BWD, _SETUP))) | (step > step[o0])))
    last = int(nxt[0]) - 1 if len(nxt) else len(phase) - 1
    step_allocs = allocs[o0:last + 1][phase[o0:last + 1] == _OPT]
    out[OPTIMIZER] = _after_own_frees(trace, tl, int(step_allocs[-1]), step_allocs)
    return out


def _after_own_frees(trace: Trace, tl: DeviceTimeline, index: int, made: np.ndarray) -> int:
    """Move past the frees that follow ``index`` of blocks allocated at ``made`` (the step's own
    temporaries), stopping before anything else (zero_grad, teardown, the next step)."""
    rows = tl.allocations
    own_frees = set(rows.free_index[np.isin(rows.alloc_index, made)].tolist())
    action = trace.action[tl.events]
    j = index + 1
    while j < tl.n_events and (j in own_frees or action[j] == Action.FREE_REQUESTED):
        j += 1
    while j - 1 > index and action[j - 1] == Action.FREE_REQUESTED:
        j -= 1
    return j - 1


def _alloc_phases(trace: Trace, sl: slice, allocs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phase code and optimizer step of each alloc event (tag, else a guess from its stack)."""
    tag_phase = np.array([_PHASE_CODE.get(str(t.metadata.get("phase")), _NONE) if t.owner else _NONE
                          for t in trace.tags] + [_NONE], np.int8)
    tag_step = np.array([_int(t.metadata.get("step")) for t in trace.tags] + [-1], np.int64)
    tags = trace.tag[sl][allocs]
    phase = tag_phase[tags]          # tag -1 picks the trailing _NONE
    step = tag_step[tags]
    stacks = trace.stack[sl][allocs]
    guess: dict[int, int] = {}
    for k in np.flatnonzero((phase == _NONE) & (stacks >= 0)):
        key = trace.stack_key(int(stacks[k]))
        code = guess.get(key)
        if code is None:
            code = guess[key] = _PHASE_CODE.get(guess_phase(trace.stack_frames(int(stacks[k]))), _NONE)
        phase[k] = code
    return phase, step


def _int(value: object) -> int:
    return value if isinstance(value, int) else -1
