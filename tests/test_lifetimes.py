"""The lifetime owner rules both capture backends apply (``vramtrace.capture.lifetimes``)."""
from __future__ import annotations

import pytest

from vramtrace.attribution import taxonomy as tx
from vramtrace.capture.lifetimes import BackwardEntry, final_owner, owner_when_kept


def test_backward_entry_names_the_phase_whose_temporaries_are_kept() -> None:
    # forward, loss outside the model ("setup"), backward with one checkpointed segment's
    # recompute, optimizer, next step
    phases = ["forward", "setup", "backward", "backward", "recompute", "recompute", "backward",
              "setup", "optimizer", "setup", "forward", "backward"]
    entry = BackwardEntry()
    assert [entry.kept_phase(p) for p in phases] == [
        None, None, "forward", None, None, None, "recompute", None, None, None, None, "forward"]


def test_backward_entry_when_backward_begins_with_a_reentrant_recompute() -> None:
    entry = BackwardEntry()
    assert [entry.kept_phase(p) for p in ["forward", "setup", "recompute", "backward", "recompute"]] == [
        None, None, "forward", "recompute", None]


@pytest.mark.parametrize("owner, phase, kept, expected", [
    (tx.TEMPORARY, "forward", "forward", tx.ACTIVATION),       # held by autograd (e.g. on a ctx)
    (tx.TEMPORARY, "recompute", "recompute", tx.ACTIVATION),
    (tx.TEMPORARY, "forward", "recompute", tx.TEMPORARY),      # an earlier forward's: not this segment's
    (tx.TEMPORARY, "setup", "forward", tx.TEMPORARY),          # the loss, made outside the model
    (tx.GRADIENT, "forward", "forward", tx.GRADIENT),          # a known role stays
])
def test_owner_when_kept(owner: str, phase: str, kept: str, expected: str) -> None:
    assert owner_when_kept(owner, phase, kept) == expected


@pytest.mark.parametrize("owner, phase, step, free_phase, free_step, expected", [
    (tx.TEMPORARY, "forward", 0, "forward", 0, tx.TEMPORARY),
    (tx.TEMPORARY, "forward", 0, "backward", 0, tx.ACTIVATION),     # kept by a checkpoint holder
    (tx.TEMPORARY, "forward", 0, "recompute", 0, tx.ACTIVATION),
    (tx.TEMPORARY, "recompute", 0, "backward", 0, tx.ACTIVATION),
    (tx.TEMPORARY, "recompute", 0, "recompute", 0, tx.TEMPORARY),
    (tx.TEMPORARY, "forward", 0, "", -1, tx.TEMPORARY),             # alive at the end, never kept
    (tx.TEMPORARY, "optimizer", 3, "optimizer", 3, tx.TEMPORARY),   # scratch of one step
    (tx.TEMPORARY, "optimizer", 3, "optimizer", 4, tx.OPTIMIZER),   # lived into the next step
    (tx.TEMPORARY, "optimizer", 3, "setup", 4, tx.OPTIMIZER),
    (tx.TEMPORARY, "optimizer", 3, "", -1, tx.OPTIMIZER),           # lazily created state, alive
    (tx.TEMPORARY, "backward", 0, "optimizer", 0, tx.TEMPORARY),
    (tx.INPUT, "setup", 0, "backward", 0, tx.INPUT),                # only temporaries change
    (tx.AUTOCAST, "forward", 0, "backward", 0, tx.AUTOCAST),
])
def test_final_owner(owner: str, phase: str, step: int, free_phase: str, free_step: int,
                     expected: str) -> None:
    assert final_owner(owner, phase, step, free_phase, free_step) == expected
