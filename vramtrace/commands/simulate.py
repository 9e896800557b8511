"""`vramtrace simulate`: predict a GPU's memory for a fine-tuning recipe without the GPU.

Runs the training step on fake tensors through the same recorder as `vramtrace record`, lays
the allocations out as PyTorch's caching allocator would, and says whether it fits a GPU.
"""
from __future__ import annotations

import json

import click
from rich.table import Table

from vramtrace.commands.common import UserError, stdout_console

def _size(b: int) -> str:
    """Bytes in the unit that keeps 3 significant digits readable."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b} B"


def _recipe_options(f):  # noqa: ANN001, ANN202  (click decorator stack)
    from vramtrace.simulate.models import BUILTIN_CONFIGS, CHECKPOINTING, OPTIMIZERS
    opts = [
        click.option("--model", "-m", default="llama-2-7b", show_default=True,
                     help=f"Built-in config ({', '.join(BUILTIN_CONFIGS)}) or a local config.json / model dir."),
        click.option("--batch-size", "-b", type=int, default=1, show_default=True),
        click.option("--seq-len", "-s", type=int, default=512, show_default=True),
        click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True,
                     help="Weight dtype at load (torch_dtype)."),
        click.option("--autocast", type=click.Choice(["none", "fp16", "bf16"]), default="none", show_default=True),
        click.option("--quant", type=click.Choice(["none", "int8", "nf4", "fp4"]), default="none", show_default=True,
                     help="bitsandbytes quantization of every Linear but the output head."),
        click.option("--double-quant", is_flag=True, help="4-bit: quantize the quantization constants too."),
        click.option("--prepare-kbit", is_flag=True,
                     help="peft.prepare_model_for_kbit_training: fp32 upcast of non-quantized weights."),
        click.option("--lora-r", type=int, default=0, show_default=True, help="LoRA rank; 0 = full fine-tune."),
        click.option("--lora-alpha", type=int, default=16, show_default=True),
        click.option("--lora-dropout", type=float, default=0.05, show_default=True),
        click.option("--lora-targets", default="q_proj,v_proj", show_default=True, help="Comma-separated module names."),
        click.option("--checkpointing", type=click.Choice(["none", *[c for c in CHECKPOINTING if c]]),
                     default="none", show_default=True, help="Gradient checkpointing mode."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--steps", type=int, default=1, show_default=True,
                     help="Optimizer steps to simulate (the second can differ: lazily made state)."),
        click.option("--use-cache/--no-use-cache", default=None,
                     help="Override the config's use_cache (Llama-2 ships True: KV copies in training)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command("simulate")
@_recipe_options
@click.option("--gpu", "-g", default="a100-80gb", show_default=True, help="GPU to judge the fit against.")
@click.option("--find-max", type=click.Choice(["none", "batch", "seq"]), default="none", show_default=True,
              help="Search the largest batch size or sequence length that fits --gpu.")
@click.option("--limit", type=int, default=4096, show_default=True, help="Upper bound for --find-max.")
@click.option("--seq-step", type=int, default=128, show_default=True, help="--find-max seq: multiples of this.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the simulated snapshot (opens in pytorch.org/memory_viz and every vramtrace verb).")
@click.option("--stacks", is_flag=True, help="Record Python stacks for the snapshot (slower).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def simulate_command(model: str, batch_size: int, seq_len: int, dtype: str, autocast: str, quant: str,
                     double_quant: bool, prepare_kbit: bool, lora_r: int, lora_alpha: int, lora_dropout: float,
                     lora_targets: str, checkpointing: str, optimizer: str, grad_accum: int, steps: int,
                     use_cache: bool | None, gpu: str, find_max: str, limit: int, seq_step: int,
                     output: str | None, stacks: bool, fmt: str) -> None:
    """Predict peak GPU memory of a Hugging Face causal-LM training step, without a GPU.

    The model is built from its config (no weights are downloaded) on fake tensors; LoRA,
    bitsandbytes int8/4-bit, autocast, checkpointing and the optimizer run as in a real step,
    with CUDA's choices where CPU code paths keep different tensors (docs/simulation.md)."""
    from vramtrace.simulate.gpus import fit, get_gpu
    from vramtrace.simulate.models import Recipe, simulate_recipe
    from vramtrace.simulate.search import find_max as search
    from vramtrace.snapshot.save import write_snapshot

    try:
        device = get_gpu(gpu)
        recipe = Recipe(model=model, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                        autocast=None if autocast == "none" else autocast, quant=None if quant == "none" else quant,
                        double_quant=double_quant, prepare_kbit=prepare_kbit, lora_r=lora_r, lora_alpha=lora_alpha,
                        lora_dropout=lora_dropout, lora_targets=tuple(t for t in lora_targets.split(",") if t),
                        checkpointing=None if checkpointing == "none" else checkpointing, optimizer=optimizer,
                        grad_accum=grad_accum, steps=steps, use_cache=use_cache)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    console = stdout_console()
    found = None
    if find_max != "none":
        knob = "batch_size" if find_max == "batch" else "seq_len"
        step = 1 if knob == "batch_size" else seq_step

        def show(value: int, verdict: object) -> None:
            if fmt == "text":
                console.print(f"  {knob}={value}: {verdict.verdict()}")  # type: ignore[attr-defined]

        found = search(recipe, device, knob, limit=limit, step=step, on_point=show)
        if found.best:
            import dataclasses
            recipe = dataclasses.replace(recipe, **{knob: found.best})
    try:
        result = simulate_recipe(recipe, stacks=stacks)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    verdict = fit(device, result.peak_reserved)
    if output:
        write_snapshot(result.snapshot, output)
    if fmt == "json":
        out = result.summary() | {"fit": verdict.to_dict()}
        if found is not None:
            out["find_max"] = found.to_dict()
        if output:
            out["snapshot"] = output
        click.echo(json.dumps(out, indent=1))
        return
    _render(console, result, verdict, found, output)


def _render(console, result, verdict, found, output) -> None:  # noqa: ANN001
    s = result.summary()
    r = s["recipe"]
    console.print(f"[bold]{r['model']}[/] batch {r['batch_size']} x seq {r['seq_len']}, {r['dtype']} weights"
                  + (f", autocast {r['autocast']}" if r["autocast"] else "")
                  + (f", {r['quant']}" if r["quant"] else "")
                  + (f", LoRA r={r['lora_r']} on {','.join(r['lora_targets'])}" if r["lora_r"] else ", full fine-tune")
                  + (f", checkpointing {r['checkpointing']}" if r["checkpointing"] else "")
                  + f", {r['optimizer']}, grad-accum {r['grad_accum']}")
    console.print(f"params: {s['params']['trainable']:,} trainable, {s['params']['frozen']:,} frozen; "
                  f"simulated in {s['wall_s']:.1f} s")
    table = Table(title="owners at the allocated peak")
    table.add_column("owner")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    total = sum(s["owners_at_peak"].values()) or 1
    for owner, b in s["owner_dtype_at_peak"].items():
        table.add_row(owner, _size(b), f"{100 * b / total:.1f}%")
    console.print(table)
    g = verdict.gpu
    console.print(f"peak allocated {_size(s['peak_allocated'])}, peak reserved {_size(s['peak_reserved'])}; "
                  f"+ cuBLAS workspaces {_size(g.workspaces_bytes)} + CUDA context "
                  f"{_size(g.context_bytes)} = {_size(verdict.needed_bytes)} of {_size(g.total_bytes)}")
    style = "green" if verdict.fits else "red"
    console.print(f"[bold {style}]{verdict.verdict()}[/]")
    if found is not None:
        console.print(f"largest {found.knob} that fits {g.name}: {found.best}")
    if output:
        console.print(f"snapshot: {output}")
