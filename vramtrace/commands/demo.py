"""`vramtrace demo`: record a tiny training run on this machine and report it."""
from __future__ import annotations

from pathlib import Path

import click

from vramtrace.attribution.breakdown import build_report
from vramtrace.commands.common import open_trace, stdout_console
from vramtrace.render.report_text import render_text


@click.command("demo")
@click.option("-o", "--output", default="vramtrace-demo.pkl", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the snapshot (opens in pytorch.org/memory_viz).")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(1, 100), help="Optimizer steps to run.")
@click.option("--backend", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: CUDA when available, else the CPU shadow allocator.")
def demo_command(output: str, steps: int, backend: str) -> None:
    """Train a tiny transformer for a few AdamW steps under the recorder, write the snapshot,
    and print the report: where the memory went at the peak, by owner, module and phase."""
    import torch

    import vramtrace
    from vramtrace.examples.tiny_training import train

    path = Path(output)   # the demo's own file: rerunning the demo replaces it
    device = "cuda" if backend == "cuda" or (backend == "auto" and torch.cuda.is_available()) else "cpu"
    click.echo(f"recording {steps} training steps of a tiny transformer on {device} ...", err=True)
    with vramtrace.record(path, backend=backend):
        train(steps=steps, device=device)
    click.echo(f"wrote {path} (open it in https://pytorch.org/memory_viz, or run `vramtrace report {path}`)",
               err=True)
    render_text(build_report(open_trace(path), "peak"), stdout_console())
