"""Reproduce the two llama-recipes quickstart runs (DESIGN §8) and explain their difference.

Reported: Llama-2-7B with load_in_8bit, batch 2, used ~14 GB; the same LoRA fine-tune with fp16
weights, batch 1, used ~40 GB. Both runs, as the notebook set them up:

    int8: from_pretrained(load_in_8bit=True, torch_dtype=float16) + prepare_model_for_int8_training
          (fp32 upcast of the non-int8 parameters, gradient checkpointing, reentrant as in 2023)
    fp16: from_pretrained(torch_dtype=float16), no prepare call (no checkpointing, no upcast)
    both: LoRA r=8, alpha=32, dropout 0.05 on q_proj, v_proj; bf16 autocast (TrainingArguments
          bf16=True); fused 32-bit AdamW; gradient_accumulation_steps=2; 2048-token sequences.

``--size tiny`` builds a 2-layer Llama from ``LlamaConfig``, saves it to a temporary directory
and runs both recipes for real on the CPU under vramtrace's CPU recorder (seconds).
``--size 7b`` simulates Llama-2-7B on fake tensors (``vramtrace.simulate``), no download.
One command writes int8.pkl and fp16.pkl, prints the report of each and their diff, and writes
the differential flame graph diff.html:

    python tools/quickstart_recipes.py --size tiny --out /tmp/quickstart
    python tools/quickstart_recipes.py --size 7b --out /tmp/quickstart-7b
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:      # run from a checkout without installing
    sys.path.insert(0, str(REPO))

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
GRAD_ACCUM = 2
SEQ_7B = 2048
SEQ_TINY = 64
# every layer type of Llama-2-7B, a few hundred thousand parameters
TINY_CONFIG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
                   use_cache=True, tie_word_embeddings=False)


@dataclass(frozen=True)
class Run:
    """One of the two quickstart runs: what differs between them."""

    name: str
    load_in_8bit: bool
    prepare: bool        # prepare_model_for_(int8|kbit)_training: fp32 upcast + checkpointing
    batch: int


INT8 = Run("int8", load_in_8bit=True, prepare=True, batch=2)
FP16 = Run("fp16", load_in_8bit=False, prepare=False, batch=1)
RUNS = (INT8, FP16)


def save_tiny_checkpoint(directory: Path) -> Path:
    """A randomly initialised fp16 tiny Llama saved as a Hugging Face checkpoint (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).to(torch.float16).save_pretrained(directory)
    return directory


def train_tiny(run: Run, checkpoint: Path, seq: int, steps: int) -> None:
    """The notebook's setup and ``steps`` optimizer steps of HF Trainer's loop, on the CPU."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_8bit=True) if run.load_in_8bit else None
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float16, quantization_config=quant,
                                                 device_map="cpu")
    if run.prepare:
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()  # from_pretrained returns eval mode; Trainer switches to train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    torch.manual_seed(1)
    for _ in range(steps):
        for _ in range(GRAD_ACCUM):
            ids = torch.randint(0, vocab, (run.batch, seq))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / GRAD_ACCUM
            loss.backward()
            del loss, ids
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def record_tiny(run: Run, checkpoint: Path, out: Path, seq: int = SEQ_TINY, steps: int = 1) -> Path:
    """Run one tiny recipe for real under vramtrace's CPU recorder; returns the snapshot file."""
    import vramtrace
    with vramtrace.record(out, backend="cpu"):
        train_tiny(run, checkpoint, seq, steps)
    return out


def recipe_7b(run: Run, seq: int = SEQ_7B, steps: int = 1) -> "object":
    """The run as a ``vramtrace.simulate.Recipe`` for Llama-2-7B."""
    from vramtrace.simulate import Recipe
    return Recipe(model="llama-2-7b", batch_size=run.batch, seq_len=seq, dtype="fp16", autocast="bf16",
                  quant="int8" if run.load_in_8bit else None, prepare_kbit=run.prepare,
                  checkpointing="reentrant" if run.prepare else None, lora_r=LORA["r"],
                  lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                  lora_targets=tuple(LORA["target_modules"]), optimizer="adamw-fused",
                  grad_accum=GRAD_ACCUM, steps=steps)


def simulate_7b(run: Run, out: Path, seq: int = SEQ_7B, steps: int = 1) -> Path:
    """Simulate one run of Llama-2-7B on fake tensors; returns the snapshot file."""
    from vramtrace.simulate import simulate_recipe
    from vramtrace.snapshot.save import write_snapshot
    return write_snapshot(simulate_recipe(recipe_7b(run, seq, steps)).snapshot, out)


def make_runs(size: str, out_dir: Path, seq: int | None = None, steps: int = 1) -> tuple[Path, Path]:
    """Write int8.pkl and fp16.pkl for ``size`` ('tiny' or '7b') into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = tuple(out_dir / f"{run.name}.pkl" for run in RUNS)
    if size == "7b":
        for run, path in zip(RUNS, files):
            simulate_7b(run, path, seq or SEQ_7B, steps)
        return files
    with tempfile.TemporaryDirectory(prefix="vramtrace-tiny-llama-") as tmp:
        checkpoint = save_tiny_checkpoint(Path(tmp))
        for run, path in zip(RUNS, files):
            record_tiny(run, checkpoint, path, seq or SEQ_TINY, steps)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--out", type=Path, default=Path("quickstart-runs"), help="directory for the files")
    parser.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (tiny {SEQ_TINY}, 7b {SEQ_7B})")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps (each of 2 micro-batches)")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):   # library chatter (loading bars) off the report
        int8, fp16 = make_runs(args.size, args.out, args.seq, args.steps)
    cli = [sys.executable, "-m", "vramtrace"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for path in (int8, fp16):
        subprocess.run([*cli, "report", str(path)], check=True, env=env)
    diff = subprocess.run([*cli, "diff", str(int8), str(fp16), "--at", "phase",
                           "-o", str(args.out / "diff.html")], env=env)
    print(f"\nfiles: {int8}, {fp16}, {args.out / 'diff.html'}")
    return diff.returncode


if __name__ == "__main__":
    sys.exit(main())
