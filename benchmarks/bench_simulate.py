"""Simulation cost: vramtrace simulate vs torch's MemTracker running the same fake training step.

Each side runs in its own subprocess (so RSS is its own): build the model under FakeTensorMode,
one forward/backward/AdamW step, report wall time, CPU time, peak RSS and the predicted peak.
MemTracker fails on models with frozen parameters (DESIGN §6), so the step is a full fine-tune.

    python benchmarks/bench_simulate.py [--model llama-2-7b] [--batch 1] [--seq 512] [--dtype fp16]

Prints one JSON object per side and the ratios (vramtrace / MemTracker) in one run.

    python benchmarks/bench_simulate.py --published

simulates the settings of published Llama-2-7B memory tables (docs/simulation.md) and prints
our figure next to theirs as a ratio, in the unit each source reports (GB = 1e9 bytes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    args = json.loads(sys.argv[1])
    import torch
    from vramtrace.simulate.models import DTYPES, Recipe, build_model, load_config, make_optimizer, training_step
    recipe = Recipe(model=args["model"], batch_size=args["batch"], seq_len=args["seq"], dtype=args["dtype"],
                    optimizer="adamw", use_cache=False)
    t0, c0 = time.perf_counter(), time.process_time()
    if args["tool"] == "vramtrace":
        from vramtrace.simulate import simulate_recipe
        res = simulate_recipe(recipe)
        peak = res.peak_allocated
    else:
        import contextlib
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.mem_tracker import MemTracker
        vocab = load_config(recipe.model).vocab_size
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = build_model(recipe, contextlib.nullcontext)
            opt = make_optimizer(recipe, model)
            mt = MemTracker()
            mt.track_external(model, opt)
            with mt:
                training_step(recipe, vocab)(model, opt)
            snap = mt.get_tracker_snapshot("peak")
            peak = max(v.get("Total", 0) for v in snap.values())
    print(json.dumps({"tool": args["tool"], "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_bytes": peak}))
""")


def run(tool: str, args: argparse.Namespace) -> dict:
    """One side in a fresh interpreter; returns its JSON line."""
    payload = json.dumps({"tool": tool, "model": args.model, "batch": args.batch, "seq": args.seq,
                          "dtype": args.dtype})
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        return {"tool": tool, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (source, setting, measured GB, which figure, recipe); settings from each source's config
PUBLISHED = [
    ("litgpt resource-tables (A100-40GB)", "LoRA bf16-true, micro-batch 1", 21.30, "max_allocated",
     dict(dtype="bf16", batch_size=1, seq_len=1304, lora_r=8, lora_alpha=16, use_cache=False)),
    ("litgpt resource-tables (A100-40GB)", "LoRA bf16-true, micro-batch 2", 29.07, "max_allocated",
     dict(dtype="bf16", batch_size=2, seq_len=1304, lora_r=8, lora_alpha=16, use_cache=False)),
    ("litgpt resource-tables (A100-40GB)", "LoRA + bnb.nf4, micro-batch 1", 14.14, "max_allocated",
     dict(dtype="bf16", batch_size=1, seq_len=1304, lora_r=8, lora_alpha=16, quant="nf4", use_cache=False)),
    ("litgpt resource-tables (A100-40GB)", "LoRA + bnb.nf4-dq, micro-batch 1", 13.84, "max_allocated",
     dict(dtype="bf16", batch_size=1, seq_len=1304, lora_r=8, lora_alpha=16, quant="nf4", double_quant=True,
          use_cache=False)),
    ("torchtune QLoRA tutorial", "LoRA q,v r8, bs 2, act. ckpt, bf16", 15.57, "max_reserved",
     dict(dtype="bf16", batch_size=2, seq_len=1304, lora_r=8, lora_alpha=16, lora_dropout=0.0,
          checkpointing="non-reentrant", use_cache=False)),
    ("torchtune QLoRA tutorial", "QLoRA all linears r8, bs 2, act. ckpt, bf16", 9.29, "max_reserved",
     dict(dtype="bf16", batch_size=2, seq_len=1304, lora_r=8, lora_alpha=16, lora_dropout=0.0, quant="nf4",
          double_quant=True, checkpointing="non-reentrant", use_cache=False,
          lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))),
]


def published() -> None:
    """Our prediction for each published setting, with the ratio to the published figure."""
    from vramtrace.simulate import Recipe, simulate_recipe
    for source, setting, gb, figure, kw in PUBLISHED:
        res = simulate_recipe(Recipe(model="llama-2-7b", **kw))
        ours = (res.peak_allocated if figure == "max_allocated" else res.peak_reserved) / 1e9
        print(json.dumps({"source": source, "setting": setting, "figure": figure, "published_gb": gb,
                          "simulated_gb": round(ours, 2), "ratio": round(ours / gb, 3),
                          "owners_at_peak_gb": {k: round(v / 1e9, 2) for k, v in res.owners_at_peak.items()},
                          "wall_s": round(res.wall_s, 1)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--published", action="store_true", help="compare with published Llama-2-7B tables")
    args = p.parse_args()
    if args.published:
        published()
        return
    ours, theirs = run("vramtrace", args), run("memtracker", args)
    print(json.dumps(ours))
    print(json.dumps(theirs))
    if "error" not in ours and "error" not in theirs:
        print(json.dumps({"ratio_vramtrace_over_memtracker": {
            k: round(ours[k] / theirs[k], 3) for k in ("wall_s", "cpu_s", "maxrss_mb", "peak_bytes") if theirs[k]}}))


if __name__ == "__main__":
    main()
