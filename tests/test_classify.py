"""Phase guesses from stack frames: the word prefilter never changes which rule matches."""
from __future__ import annotations

import pytest

from vramtrace.attribution.classify import (
    _PHASE_RULES, GUESS_BACKWARD, GUESS_DATA, GUESS_FORWARD, GUESS_OPTIMIZER, GUESS_OTHER, GUESS_SETUP,
    _first_rule, guess_phase)
from vramtrace.trace import Frame


def _alternatives(pattern: str) -> list[str]:
    """Top-level alternatives of a regex: split on | outside groups, classes and escapes."""
    out, depth, start, in_class, i = [], 0, 0, False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    return out + [pattern[start:]]


@pytest.mark.parametrize("phase, words, pattern", _PHASE_RULES, ids=[r[0] for r in _PHASE_RULES])
def test_every_alternative_of_a_rule_contains_one_of_its_words(phase, words, pattern):
    for alternative in _alternatives(pattern.pattern):
        assert any(w in alternative for w in words), (phase, alternative)


@pytest.mark.parametrize("frame, phase", [
    (Frame("step", "/venv/lib/python3.11/site-packages/torch/optim/adamw.py", 1), GUESS_OPTIMIZER),
    (Frame("zero_grad", "train.py", 9), GUESS_OPTIMIZER),
    (Frame("_engine_run_backward", "/x/torch/autograd/graph.py", 1), GUESS_BACKWARD),
    (Frame("torch::autograd::Engine::thread_main(std::shared_ptr<GraphTask> const&)", "??", 0), GUESS_BACKWARD),
    (Frame("torch::autograd::generated::MmBackward0::apply(std::vector<at::Tensor>&&)", "??", 0), GUESS_BACKWARD),
    (Frame("__next__", "/x/torch/utils/data/dataloader.py", 1), GUESS_DATA),
    (Frame("from_pretrained", "/x/transformers/modeling_utils.py", 1), GUESS_SETUP),
    (Frame("_apply", "/x/torch/nn/modules/module.py", 1), GUESS_SETUP),
    (Frame("_call_impl", "/x/torch/nn/modules/module.py", 1), GUESS_FORWARD),
    (Frame("forward", "model.py", 3), GUESS_FORWARD),
    (Frame("at::native::empty_cuda(c10::ArrayRef<long>)", "??", 0), GUESS_OTHER),
    (Frame("forward_hook", "model.py", 3), GUESS_OTHER),
])
def test_first_rule_is_the_first_pattern_that_matches(frame, phase):
    text = f"{frame.filename}:{frame.name}"
    expected = next((i for i, (_, _, p) in enumerate(_PHASE_RULES) if p.search(text)), len(_PHASE_RULES))
    assert _first_rule(frame) == expected
    assert guess_phase([frame]) == phase
