"""Owner rules that need more of an allocation's life than its creation, shared by the backends.

The tagging context knows the phase an allocation was made in; some owners follow only from
what happened to it later. The CPU backend applies these rules to its live storage records, the
CUDA backend to the allocator trace (phases from the metadata stamped on each event), so both
name the same allocation alike (DESIGN §6).
"""
from __future__ import annotations

from vramtrace.attribution import taxonomy as tx


IN_BACKWARD = ("backward", "recompute")   # the phases the autograd engine runs


class BackwardEntry:
    """Follows the phase sequence and says when backward begins and which temporaries it keeps.

    Temporaries still alive when backward begins are held by autograd: this catches what pack
    hooks cannot see, tensors a custom autograd Function keeps on its ``ctx`` (bitsandbytes'
    int8 matmul keeps its input there), which die only when the graph is dropped, after
    backward. Backward may begin with a recompute (reentrant checkpointing). Likewise recompute
    temporaries alive when a checkpointed segment's recompute ends.
    """

    def __init__(self) -> None:
        self.last = "setup"

    def kept_phase(self, phase: str) -> str | None:
        """Move to ``phase``; the phase whose live temporaries are kept now: ``forward`` when
        backward begins, ``recompute`` when a recompute ends inside it, else None."""
        last, self.last = self.last, phase
        if phase in IN_BACKWARD and last not in IN_BACKWARD:
            return "forward"
        if phase == "backward" and last == "recompute":
            return "recompute"
        return None


def owner_when_kept(owner: str, phase: str, kept_phase: str) -> str:
    """Owner of an allocation made in ``phase`` that is alive as backward keeps ``kept_phase``."""
    return tx.ACTIVATION if owner == tx.TEMPORARY and phase == kept_phase else owner


def final_owner(owner: str, phase: str, step: int, free_phase: str, free_step: int) -> str:
    """Owner of an allocation once its free is known (``free_phase`` "" while it is alive).

    A ``temporary`` made in forward/recompute and freed in backward was kept for backward
    (saved by a checkpoint holder that pack hooks do not see, freed before the first module's
    backward began): an activation. One made in the optimizer step that outlives that step is
    optimizer state.
    """
    if owner != tx.TEMPORARY:
        return owner
    if phase == "forward" and free_phase in ("backward", "recompute"):
        return tx.ACTIVATION
    if phase == "recompute" and free_phase == "backward":
        return tx.ACTIVATION
    if phase == "optimizer" and not (free_phase == "optimizer" and free_step == step):
        return tx.OPTIMIZER
    return tx.TEMPORARY
