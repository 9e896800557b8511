"""Who owns each live allocation: from vramtrace's tags, or guessed from stack frames.

Tagged files (written by ``vramtrace record``/``simulate``) carry the owner in ``category`` and
module/phase/dtype in ``user_metadata``. Files from plain ``_dump_snapshot`` carry only stacks,
so the phase is guessed from well-known frames (autograd engine -> backward, torch.optim ->
optimizer step, DataLoader -> data loading, nn.Module.__call__ -> forward); reports say so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain

import numpy as np

from vramtrace.attribution import workspaces
from vramtrace.attribution.taxonomy import UNKNOWN
from vramtrace.replay.timeline import Allocations
from vramtrace.trace import Frame, Tag, Trace

GUESS_OPTIMIZER = "optimizer step"
GUESS_BACKWARD = "backward"
GUESS_FORWARD = "forward"
GUESS_DATA = "data loading"
GUESS_SETUP = "model setup"
GUESS_OTHER = "other"
GUESS_NO_STACK = "no stack recorded"
GUESS_BEFORE = "before the trace began"
# where a stack made by the call that allocates a cuBLAS workspace (C++ frames) is reported
WORKSPACE_WHERE = "cuBLAS workspace (kept per handle and stream)"

# (phase, words, pattern over a frame's "filename:name") in priority order. Every match of a
# pattern contains one of its words (tests/test_classify.py checks each alternative): substring
# tests of the words spare the regex searches, ~1 µs each on ~100-character frame texts, for
# the frames that match no rule, nearly all of them.
_PHASE_RULES: tuple[tuple[str, tuple[str, ...], re.Pattern], ...] = tuple(
    (phase, words, re.compile(pattern)) for phase, words, pattern in (
        (GUESS_OPTIMIZER, ("optim", "zero_grad"), r"torch[/\\]optim[/\\]|bitsandbytes[/\\]optim|zero_grad"),
        (GUESS_BACKWARD, ("autograd", "run_backward"),
         r"torch[/\\]autograd[/\\]__init__|_engine_run_backward|"
         r"torch::autograd::Engine|autograd::.*Backward|run_backward"),
        (GUESS_DATA, ("data",), r"torch[/\\]utils[/\\]data[/\\]"),
        (GUESS_SETUP, ("load_state_dict", "from_pretrained", "modeling_utils", "module"),
         r"load_state_dict|from_pretrained|modeling_utils|nn[/\\]modules[/\\]module\.py:(_apply|to|cuda)$"),
        (GUESS_FORWARD, ("module", "forward"),
         r"nn[/\\]modules[/\\]module\.py:(_call_impl|_wrapped_call_impl|forward)$|:forward$"),
    ))
_RULE_WORDS = tuple(dict.fromkeys(w for _, words, _ in _PHASE_RULES for w in words))

# Library code and generated code (torch.compile's inductor kernels live in /tmp/torchinductor_*)
_LIBRARY = re.compile(r"[/\\](site|dist)-packages[/\\]|[/\\]lib[/\\]python3|^<frozen|[/\\]torch[/\\]|"
                      r"torchinductor_")


@dataclass(frozen=True)
class Attribution:
    """The meaning of one allocation, as reports group it."""

    owner: str
    module: str
    phase: str
    dtype: str
    guessed: bool


def attribute(trace: Trace, allocs: Allocations, rows: np.ndarray) -> list[Attribution]:
    """Attribution of each allocation row (tags where present, else a guess from frames)."""
    tag_ids = allocs.tag[rows]
    by_tag = {t: _from_tag(trace.tags[t]) for t in np.unique(tag_ids[tag_ids >= 0]).tolist()}
    out: list[Attribution | None] = list(map(by_tag.get, tag_ids.tolist()))
    untagged = [i for i, a in enumerate(out) if a is None]
    if untagged:
        picked = rows[untagged]
        guesses = _Guesser(trace).guess(allocs.stack[picked], allocs.alloc_index[picked] < 0)
        for i, a in zip(untagged, guesses):
            out[i] = a
    return out


def _from_tag(tag: Tag) -> Attribution | None:
    if not tag.owner:
        return None
    meta = tag.metadata
    return Attribution(owner=tag.owner, module=str(meta.get("module") or "-"),
                       phase=str(meta.get("phase") or "-"), dtype=str(meta.get("dtype") or "-"),
                       guessed=False)


_WORKSPACE_FRAME = -2   # stands for the user frame of a workspace's stack


class _Guesser:
    """Phase and user frame of untagged stacks, from facts learned once per distinct frame.

    Stacks recorded with C++ frames hold ~60 frames each while a file holds only a few
    thousand distinct frames, and nearly every live stack differs from the others: the rules
    are matched once per frame, then each stack's first matching rule and first user frame are
    found for all stacks together with numpy (a per-stack Python walk cost 3x more)."""

    _NO_STACK = {before: Attribution(UNKNOWN, f"({why})", why, "-", True)
                 for before, why in ((True, GUESS_BEFORE), (False, GUESS_NO_STACK))}

    def __init__(self, trace: Trace) -> None:
        self.table = trace.stack_table
        self.labels: dict[int, str] = {}  # per user frame id: "file.py:line name"
        self.by_guess: dict[tuple[str, str], Attribution] = {}

    def guess(self, stacks: np.ndarray, before_trace: np.ndarray) -> list[Attribution]:
        """Attribution of each row's stack (`before_trace`: the block predates the trace)."""
        out = [self._NO_STACK[b] for b in before_trace.tolist()]
        with_stack = np.flatnonzero(stacks >= 0).tolist()
        keys = self.table.keys(stacks[with_stack].tolist())
        distinct = list(dict.fromkeys(keys))
        by_key = dict(zip(distinct, self._of_stacks(distinct)))
        for i, key in zip(with_stack, keys):
            out[i] = by_key[key]
        return out

    def _of_stacks(self, keys: list[int]) -> list[Attribution]:
        if not keys:
            return []
        rule, user, workspace = self._frame_facts()
        stacks = [self.table.stacks[k] for k in keys]
        lengths = np.fromiter(map(len, stacks), np.int64, len(stacks))
        flat = np.fromiter(chain.from_iterable(stacks), np.int64, int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        first_rule = np.minimum.reduceat(rule[flat], starts)
        first_user = np.minimum.reduceat(np.where(user[flat], np.arange(len(flat)), len(flat)), starts)
        user_frame = np.where(first_user < starts + lengths, flat[np.minimum(first_user, len(flat) - 1)], -1)
        # a stack that passes through the workspace call: reported as that, not as its user frame
        user_frame[np.maximum.reduceat(workspace[flat], starts)] = _WORKSPACE_FRAME
        return list(map(self._attribution, user_frame.tolist(), first_rule.tolist()))

    def _frame_facts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per frame id: the index of the first rule it matches, whether it is user code (not
        Python's, torch's or generated), and whether it is the call that allocates a cuBLAS
        workspace. Frames differing only in line share the answers (C++ and generated code
        often do: ~1,240 frames but ~35 files in a real file), and the rule tests cost ~2 µs a
        frame."""
        rule_of: dict[tuple[str, str], int] = {}
        user_of: dict[str, bool] = {}
        rule, user = [], []
        for f in self.table.frames:
            r = rule_of.get(f[:2])
            if r is None:
                r = rule_of[f[:2]] = _first_rule(f)
            rule.append(r)
            u = user_of.get(f.filename)
            if u is None:
                u = user_of[f.filename] = is_python_frame(f) and not _LIBRARY.search(f.filename)
            user.append(u)
        workspace = [workspaces.is_workspace_frame(f.name) for f in self.table.frames]
        return np.array(rule, np.int64), np.array(user, bool), np.array(workspace, bool)

    def _attribution(self, user_frame: int, rule: int) -> Attribution:
        phase = _PHASE_RULES[rule][0] if rule < len(_PHASE_RULES) else GUESS_OTHER
        guess = (self._label(user_frame), phase)
        a = self.by_guess.get(guess)
        if a is None:
            a = self.by_guess[guess] = Attribution(UNKNOWN, guess[0], phase, "-", True)
        return a

    def _label(self, frame_id: int) -> str:
        """Where a stack's first user frame is ("-": none, -1); many stacks share it."""
        if frame_id == _WORKSPACE_FRAME:
            return WORKSPACE_WHERE
        if frame_id < 0:
            return "-"
        label = self.labels.get(frame_id)
        if label is None:
            label = self.labels[frame_id] = _where(self.table.frames[frame_id])
        return label


def _first_rule(f: Frame) -> int:
    text = f"{f.filename}:{f.name}"
    if not any(w in text for w in _RULE_WORDS):
        return len(_PHASE_RULES)
    return next((i for i, (_, _, pattern) in enumerate(_PHASE_RULES) if pattern.search(text)), len(_PHASE_RULES))


def guess_phase(frames: tuple[Frame, ...] | list[Frame]) -> str:
    """The training phase a stack belongs to: the first rule that matches any frame."""
    first_rule = min(map(_first_rule, frames), default=len(_PHASE_RULES))
    return _PHASE_RULES[first_rule][0] if first_rule < len(_PHASE_RULES) else GUESS_OTHER


def _where(f: Frame) -> str:
    return f"{_short_path(f.filename)}:{f.line} {f.name}"


def is_python_frame(f: Frame) -> bool:
    """stacks='all' interleaves C++ frames ('??' or .cpp/.so files) with Python ones."""
    return f.filename.endswith(".py") or f.filename.startswith("<")


def python_frames(frames: list[Frame]) -> list[Frame]:
    """The Python frames of a stack, or all of it when it has none."""
    return [f for f in frames if is_python_frame(f)] or frames


def format_frame(f: Frame, width: int = 100) -> str:
    text = f"{_short_path(f.filename)}:{f.line} {f.name}" if f.filename not in ("??", "") else f.name
    return text if len(text) <= width else text[:width - 1] + "…"


def _short_path(path: str) -> str:
    parts = re.split(r"[/\\]", path)
    return "/".join(parts[-2:]) if len(parts) > 2 else path
