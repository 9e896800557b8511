"""Who owns each live allocation: from vramtrace's tags, or guessed from stack frames.

Tagged files (written by ``vramtrace record``/``simulate``) carry the owner in ``category`` and
module/phase/dtype in ``user_metadata``. Files from plain ``_dump_snapshot`` carry only stacks,
so the phase is guessed from well-known frames (autograd engine -> backward, torch.optim ->
optimizer step, DataLoader -> data loading, nn.Module.__call__ -> forward); reports say so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import compress

import numpy as np

from vramtrace.attribution.taxonomy import UNKNOWN
from vramtrace.replay.timeline import Allocations
from vramtrace.trace import Frame, Trace

GUESS_OPTIMIZER = "optimizer step"
GUESS_BACKWARD = "backward"
GUESS_FORWARD = "forward"
GUESS_DATA = "data loading"
GUESS_SETUP = "model setup"
GUESS_OTHER = "other"
GUESS_NO_STACK = "no stack recorded"
GUESS_BEFORE = "before the trace began"

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
    by_tag: dict[int, Attribution] = {}
    guess = _Guesser(trace)
    out = []
    for tag_id, stack, start in zip(allocs.tag[rows].tolist(), allocs.stack[rows].tolist(),
                                    allocs.alloc_index[rows].tolist()):
        tag = trace.tag_of(tag_id)
        if tag is not None and tag.owner:
            a = by_tag.get(tag_id)
            if a is None:
                meta = tag.metadata
                a = by_tag[tag_id] = Attribution(
                    owner=tag.owner, module=str(meta.get("module") or "-"),
                    phase=str(meta.get("phase") or "-"), dtype=str(meta.get("dtype") or "-"),
                    guessed=False)
            out.append(a)
        else:
            out.append(guess(stack, before_trace=start < 0))
    return out


class _Guesser:
    """Phase and user frame of untagged stacks, from facts learned once per distinct frame.

    Stacks recorded with C++ frames hold ~60 frames each while a file holds only a few
    thousand distinct frames: matching the rules per frame, then taking the first rule any
    frame of a stack matches, costs a lookup per frame instead of regex searches per stack."""

    _NO_STACK = {before: Attribution(UNKNOWN, f"({why})", why, "-", True)
                 for before, why in ((True, GUESS_BEFORE), (False, GUESS_NO_STACK))}

    def __init__(self, trace: Trace) -> None:
        self.table = trace.stack_table
        self.rule: dict[int, int] = {}  # per frame id matching a rule: the first rule's index
        self.user: list[bool] = []      # per frame id: user code (not Python's, torch's, generated)
        self.labels: dict[int, str] = {}  # per user frame id: "file.py:line name"
        self.by_key: dict[int, Attribution] = {}
        self.by_guess: dict[tuple[str, str], Attribution] = {}

    def __call__(self, stack: int, before_trace: bool) -> Attribution:
        if stack < 0:
            return self._NO_STACK[before_trace]
        key = self.table.key(stack)
        a = self.by_key.get(key)
        if a is None:
            if len(self.user) < len(self.table.frames):
                self._learn()
            ids = self.table.stacks[key]
            # intersection and compress walk the ~60 frames in C; few frames match a rule
            first_rule = min(map(self.rule.__getitem__, self.rule.keys() & ids), default=len(_PHASE_RULES))
            phase = _PHASE_RULES[first_rule][0] if first_rule < len(_PHASE_RULES) else GUESS_OTHER
            guess = (self._label(next(compress(ids, map(self.user.__getitem__, ids)), None)), phase)
            a = self.by_guess.get(guess)
            if a is None:
                a = self.by_guess[guess] = Attribution(UNKNOWN, guess[0], phase, "-", True)
            self.by_key[key] = a
        return a

    def _learn(self) -> None:
        for fid in range(len(self.user), len(self.table.frames)):
            f = self.table.frames[fid]
            rule = _first_rule(f)
            if rule < len(_PHASE_RULES):
                self.rule[fid] = rule
            self.user.append(is_python_frame(f) and not _LIBRARY.search(f.filename))

    def _label(self, frame_id: int | None) -> str:
        """Where a stack's first user frame is ("-": none); many stacks share it."""
        if frame_id is None:
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
