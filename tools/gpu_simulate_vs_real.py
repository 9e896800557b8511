"""vramtrace's CPU simulation (fake tensors) against a real CUDA run of the same recipe.

For each recipe, on a Llama config written to a temporary config.json:

* predicted: ``simulate_recipe(recipe)`` on fake tensors, its peak allocated and peak reserved;
* real: the same build, optimizer and ``steps`` training steps on the device, measured with
  ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after ``reset_peak_memory_stats``.

The real model is built on the CPU exactly as ``build_model`` builds it (skeleton, then one
loaded copy of each weight; ``contextlib.nullcontext`` as ``paused``) and then moved with
``model.to(device)``. That is what the simulation counts for the load: one device copy of each
parameter and buffer, allocated one tensor at a time, with nothing of the skeleton on the device.
Building directly on the GPU would instead put the skeleton there too (two copies of each weight
for a moment) and so compare a different load. The script prints the allocated bytes right after
the move next to one copy of the parameters and buffers (each rounded to the allocator's 512-byte
blocks), so the check is visible.

The cuBLAS workspace (32 MiB per handle and stream on Hopper, see vramtrace/simulate/gpus.py) is
allocated through the caching allocator on a real run but never by the simulation: it is in the
real figures only. Workspaces are released between recipes, so each real run counts its own.

With ``--device cpu`` (a dry run on a tiny config) the "real" side is the same build and step
functions on real CPU tensors under vramtrace's CPU recorder (``simulate_step(..., fake=False)``):
it only exercises the code path end to end. Each recipe runs on its own: a failure prints one
line (its traceback goes to --json FILE, else to stderr) and the next recipe runs; the exit status
is 1 if any recipe failed.

    python tools/gpu_simulate_vs_real.py [--device cuda] [--json FILE] [--recipe NAME ...]
    python tools/gpu_simulate_vs_real.py --device cpu --json /tmp/sim_vs_real.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:      # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tools.llama_sizes import add_device_and_size_options, chosen_device  # noqa: E402
from vramtrace.simulate.core import paused, simulate_step  # noqa: E402
from vramtrace.attribution.workspaces import CUBLAS_WS_DEFAULT, CUBLAS_WS_HOPPER  # noqa: E402
from vramtrace.simulate.gpus import TRAINING_CUBLAS_HANDLES  # noqa: E402
from vramtrace.simulate.models import (Recipe, build_model, load_config, make_optimizer, simulate_recipe,  # noqa: E402
                                       training_step)

MiB = float(1 << 20)
BLOCK = 512   # the caching allocator rounds every block up to a multiple of this

RECIPES: dict[str, dict[str, Any]] = {
    "lora-fp16-bf16-autocast": dict(dtype="fp16", autocast="bf16", lora_r=8, lora_targets=("q_proj", "v_proj"),
                                    optimizer="adamw"),
    "full-fp32": dict(dtype="fp32", optimizer="adamw"),
    "lora-bf16-ckpt-nonreentrant": dict(dtype="bf16", lora_r=8, lora_targets=("q_proj", "v_proj"),
                                        checkpointing="non-reentrant", optimizer="adamw"),
}


def write_config(directory: Path, args: argparse.Namespace) -> Path:
    """A Llama config.json of the chosen size (no weights; nothing is downloaded)."""
    path = directory / "config.json"
    path.write_text(json.dumps(dict(
        model_type="llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        vocab_size=args.vocab, max_position_embeddings=args.max_position, rms_norm_eps=1e-5,
        use_cache=False, tie_word_embeddings=False)))
    return path


def factory(recipe: Recipe, device: torch.device,
            pause: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], tuple[nn.Module, torch.optim.Optimizer]]:
    """Build as ``build_model`` does (on the CPU, ``pause`` as its ``paused``), move to ``device``,
    then the recipe's optimizer."""
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_model(recipe, pause).to(device)
        return model, make_optimizer(recipe, model)
    return make


def one_copy_bytes(model: nn.Module) -> int:
    """Bytes of one copy of every parameter and buffer storage, in allocator blocks."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(-(-n // BLOCK) * BLOCK for n in storages.values())


def release(device: torch.device) -> None:
    """Free what the last recipe left: Python garbage, cuBLAS workspaces, the allocator's cache."""
    gc.collect()
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()


def predicted(recipe: Recipe) -> dict[str, Any]:
    """The simulation's figures for ``recipe`` (fake tensors)."""
    res = simulate_recipe(recipe)
    return {"peak_allocated": res.peak_allocated, "peak_reserved": res.peak_reserved, "wall_s": res.wall_s,
            "params": res.params}


def real_cuda(recipe: Recipe, vocab: int, device: torch.device) -> dict[str, Any]:
    """Build, move and train for real on ``device``; the allocator's peaks."""
    t0 = time.perf_counter()
    release(device)
    torch.cuda.reset_peak_memory_stats(device)
    base_alloc, base_res = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    model, optimizer = factory(recipe, device, contextlib.nullcontext)()
    loaded = torch.cuda.memory_allocated(device) - base_alloc
    weights = one_copy_bytes(model)
    step = training_step(recipe, vocab, device)
    for _ in range(recipe.steps):
        step(model, optimizer)
    torch.cuda.synchronize(device)
    out = {"peak_allocated": torch.cuda.max_memory_allocated(device),
           "peak_reserved": torch.cuda.max_memory_reserved(device),
           "baseline_allocated": base_alloc, "baseline_reserved": base_res,
           "allocated_after_load": loaded, "one_copy_of_weights": weights,
           "wall_s": time.perf_counter() - t0}
    del model, optimizer, step
    return out


def real_cpu(recipe: Recipe, vocab: int, device: torch.device) -> dict[str, Any]:
    """Dry run: the same factory and step on real CPU tensors, under vramtrace's CPU recorder."""
    built: list[int] = []

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        model, optimizer = factory(recipe, device, paused)()
        built.append(one_copy_bytes(model))
        return model, optimizer

    res = simulate_step(make, training_step(recipe, vocab, device), steps=recipe.steps, fake=False)
    return {"peak_allocated": res.peak_allocated, "peak_reserved": res.peak_reserved,
            "one_copy_of_weights": built[0], "wall_s": res.wall_s}


def cublas_workspace(device: torch.device) -> int:
    """The workspaces PyTorch allocates for a training step's cuBLAS handles on this device
    (0 on CPU)."""
    if device.type != "cuda":
        return 0
    per_handle = CUBLAS_WS_HOPPER if torch.cuda.get_device_capability(device)[0] >= 9 else CUBLAS_WS_DEFAULT
    return TRAINING_CUBLAS_HANDLES * per_handle


def describe(recipe: Recipe) -> str:
    return (f"{recipe.dtype} weights" + (f", autocast {recipe.autocast}" if recipe.autocast else "")
            + (f", LoRA r={recipe.lora_r} on {','.join(recipe.lora_targets)}" if recipe.lora_r else ", full fine-tune")
            + (f", checkpointing {recipe.checkpointing}" if recipe.checkpointing else "")
            + f", {recipe.optimizer}, batch {recipe.batch_size} x seq {recipe.seq_len}, {recipe.steps} steps")


def print_result(name: str, recipe: Recipe, pred: dict[str, Any], real: dict[str, Any], ws: int,
                 device: torch.device) -> None:
    print(f"\n== {name}: {describe(recipe)}")
    print(f"   simulated in {pred['wall_s']:.1f} s, real run {real['wall_s']:.1f} s; "
          f"params {pred['params']['trainable']:,} trainable, {pred['params']['frozen']:,} frozen")
    print(f"   {'':16}{'predicted MiB':>15}{'real MiB':>12}{'real/pred':>11}{'real-pred MiB':>15}"
          f"{'real-pred-cuBLAS MiB':>22}")
    for key in ("peak_allocated", "peak_reserved"):
        p, r = pred[key], real[key]
        ratio = f"{r / p:.4f}" if p else "-"
        print(f"   {key:<16}{p / MiB:>15.2f}{r / MiB:>12.2f}{ratio:>11}{(r - p) / MiB:>+15.2f}{(r - p - ws) / MiB:>+22.2f}")
    if device.type == "cuda":
        print(f"   load: allocated after model.to = {real['allocated_after_load'] / MiB:.2f} MiB, one copy of "
              f"params+buffers = {real['one_copy_of_weights'] / MiB:.2f} MiB; baseline before the build "
              f"{real['baseline_allocated'] / MiB:.2f} MiB allocated, {real['baseline_reserved'] / MiB:.2f} MiB reserved")
    else:
        print(f"   load: one copy of params+buffers = {real['one_copy_of_weights'] / MiB:.2f} MiB "
              f"(allocated after the move is measured on cuda only)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_and_size_options(ap)
    ap.add_argument("--recipe", action="append", choices=sorted(RECIPES),
                    help="run only these recipes (repeatable); default all")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-position", type=int, default=2048)
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args(argv)
    device = chosen_device(ap, args)
    if device is None:
        return 1
    ws = cublas_workspace(device)
    names = args.recipe or list(RECIPES)
    header = {"device": str(device), "torch": torch.__version__, "args": vars(args), "cublas_workspace": ws}
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, device {header.get('gpu', device)}; Llama hidden {args.hidden}, "
          f"intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}, use_cache False")
    if device.type == "cuda":
        print(f"cuBLAS workspaces: {ws / MiB:.2f} MiB ({TRAINING_CUBLAS_HANDLES} handles), in the real figures only; "
              f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}")
    else:
        print("dry run: 'real' is vramtrace's CPU recorder on real CPU tensors, not a GPU")
    real_run = real_cuda if device.type == "cuda" else real_cpu
    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), args)
        vocab = load_config(str(config)).vocab_size
        for name in names:
            recipe = Recipe(model=str(config), batch_size=args.batch, seq_len=args.seq, steps=args.steps,
                            **RECIPES[name])
            row: dict[str, Any] = {"name": name, "recipe": recipe.to_dict()}
            try:
                row["predicted"] = predicted(recipe)
                row["real"] = real_run(recipe, vocab, device)
                print_result(name, recipe, row["predicted"], row["real"], ws, device)
            except Exception as exc:  # noqa: BLE001 - one recipe's failure must not stop the others
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
                print(f"\n== {name}: FAILED: {row['error'].splitlines()[0][:300]}")
                if not args.json:  # nowhere else to keep it
                    print(row["traceback"], file=sys.stderr)
            finally:
                release(device)
            results.append(row)
    print(f"\ntotal {time.perf_counter() - t_all:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(header | {"results": results}, indent=1, default=str))
        print(f"results: {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
