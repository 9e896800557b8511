"""The Llama sizes and the --device/size options shared by the GPU check scripts
(``tools/gpu_simulate_vs_real.py``, ``benchmarks/bench_cuda.py``): a mid-size model on CUDA, a
tiny one for a dry run of the same code on the CPU."""
from __future__ import annotations

import argparse
import sys

import torch

SIZES: dict[str, dict[str, int]] = {
    "cuda": dict(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=32000, seq=1024, batch=4),
    "cpu": dict(hidden=64, intermediate=176, layers=2, heads=4, vocab=128, seq=32, batch=2),
}


def add_device_and_size_options(ap: argparse.ArgumentParser) -> None:
    """--device, and one option per size whose default depends on the device."""
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    for key in SIZES["cuda"]:
        ap.add_argument(f"--{key}", type=int, default=None,
                        help=f"default {SIZES['cuda'][key]} on cuda, {SIZES['cpu'][key]} on cpu")


def chosen_device(ap: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device | None:
    """The device asked for, with the sizes left unset filled in for it; None (said on stderr)
    where CUDA is asked for and absent."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device must be cuda, cuda:N or cpu, not {args.device!r}")
    if device.type not in SIZES:
        ap.error(f"--device must be cuda or cpu, not {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a dry run", file=sys.stderr)
        return None
    for key, value in SIZES[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return device
