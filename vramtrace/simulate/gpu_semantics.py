"""Make a CPU run keep the tensors a CUDA run would keep (docs/simulation.md, "CPU vs GPU").

The simulation runs on (fake) CPU tensors, but a prediction for a GPU must follow the GPU's code
paths wherever the two keep different tensors alive:

* dropout: CUDA runs ``native_dropout`` and saves a 1-byte bool mask; CPU draws a full-width
  noise tensor of the input dtype and saves that. We route ``F.dropout`` to ``native_dropout``.
* bitsandbytes int8: in training on CPU it picks ``MatMul8bitFp`` (dequantize + matmul); CUDA
  uses ``MatMul8bitLt`` (int8 double quant, saves the int8 transposed input and its scales). We
  make ``bnb.matmul`` pick ``MatMul8bitLt`` as on CUDA.
* LLM.int8() outlier columns depend on the data; fake tensors cannot know them. bitsandbytes'
  fake kernels return them with an unbacked symbolic size, which is slow (no fake-op caching) and
  counts as 0 bytes anyway; we return them empty, which is what the size-0 case is.
* transformers 5 packed-sequence detection: under FakeTensors it cannot read position_ids and
  assumes packed rows, building a 4-D mask a real run never builds. Simulated batches are
  unpacked rows, so we answer "not packed" for fake inputs, as the real check would.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def _cuda_dropout() -> Iterator[None]:
    """``F.dropout`` as CUDA runs it: the fused kernel with a bool mask (``is_fused_kernel_acceptable``).

    A module-attribute patch rather than a TorchFunctionMode: a mode is switched off while it
    handles ``Tensor.backward``, so it would miss the dropouts that checkpointing recomputes.
    """
    original = F.dropout

    def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        if training and 0.0 < p < 1.0 and input.numel() > 0 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)

    with mock.patch.object(F, "dropout", dropout):
        yield


@contextlib.contextmanager
def _bnb_cuda_matmul() -> Iterator[None]:
    try:
        import bitsandbytes as bnb
        from bitsandbytes.autograd import _functions as bf
    except ImportError:
        yield
        return

    def matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, state: Any = None,
               threshold: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
        state = state or bf.MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        return bf.MatMul8bitLt.apply(A, B, out, bias, state)

    with mock.patch.object(bnb, "matmul", matmul), mock.patch.object(bf, "matmul", matmul):
        yield


@contextlib.contextmanager
def _unpacked_position_ids() -> Iterator[None]:
    try:
        from transformers import masking_utils as mu
    except ImportError:
        yield
        return
    original = mu.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(position_ids, torch._subclasses.fake_tensor.FakeTensor):
            return original(position_ids)
        mask = original(position_ids)
        if mask is not None:
            (mask[:, -1] == 0).all()  # the real check's temporaries; its answer for unpacked rows is None
        return None

    with mock.patch.object(mu, "find_packed_sequence_indices", find_packed_sequence_indices):
        yield


@contextlib.contextmanager
def _int8_outliers_empty() -> Iterator[None]:
    try:
        import bitsandbytes  # noqa: F401  (defines the ops)
    except ImportError:
        yield
        return
    from torch._library.simple_registry import singleton

    def vectorwise_quant(A: torch.Tensor, threshold: float = 0.0) -> tuple:
        rows = A.numel() // A.shape[-1]
        return (torch.empty(A.shape, device=A.device, dtype=torch.int8),
                torch.empty(rows, device=A.device, dtype=torch.float32),
                None if threshold == 0.0 else A.new_empty(0, dtype=torch.int64))

    def double_quant(A: torch.Tensor, threshold: float = 0.0) -> tuple:
        return (torch.empty_like(A, dtype=torch.int8), torch.empty_like(A, dtype=torch.int8),
                torch.empty(A.numel() // A.shape[-1], device=A.device, dtype=torch.float32),
                torch.empty(A.shape[-1], device=A.device, dtype=torch.float32),
                A.new_empty(0, dtype=torch.int64))

    def mixed_scaled_mm(A: torch.Tensor, CA: torch.Tensor, CB: torch.Tensor, SCA: torch.Tensor,
                        SCB: torch.Tensor, outlier_cols: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> tuple:
        out = torch.empty((*CA.shape[:-1], CB.shape[0]), device=A.device, dtype=A.dtype)
        return out, A.new_empty(0, dtype=torch.int64)

    impls = {"bitsandbytes::int8_vectorwise_quant": vectorwise_quant,
             "bitsandbytes::int8_double_quant": double_quant,
             "bitsandbytes::int8_mixed_scaled_mm": mixed_scaled_mm}
    lib = torch.library.Library("bitsandbytes", "FRAGMENT")
    handles = [_override_fake(singleton.find(name).fake_impl, fn, lib) for name, fn in impls.items()]
    try:
        yield
    finally:
        for h in handles:
            h.destroy()
        lib._destroy()


def _override_fake(holder: Any, fn: Callable, lib: torch.library.Library) -> Any:
    """Register ``fn`` over the fake impl bitsandbytes registered. torch 2.13 overrides by
    default; earlier 2.x builds (2.11 on the GPU machine) refuse unless asked with
    ``allow_override``, and the oldest have no such switch."""
    if "allow_override" in inspect.signature(holder.register).parameters:
        return holder.register(fn, "vramtrace.simulate", lib, allow_override=True)
    return holder.register(fn, "vramtrace.simulate", lib)


@contextlib.contextmanager
def cuda_semantics() -> Iterator[None]:
    """Run the enclosed step with CUDA's choices of saved tensors (see module docstring)."""
    with _bnb_cuda_matmul(), _int8_outliers_empty(), _unpacked_position_ids(), _cuda_dropout():
        yield
