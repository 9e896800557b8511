"""Tagging overhead of the CUDA capture path on a real GPU training step.

Issue acceptance: "<= 5% over the untagged step on the CUDA path's hooks". A full fine-tune
Llama (fp32 weights, bf16 autocast, foreach AdamW), one fixed batch, three variants per round:

* untagged: the plain step;
* history: PyTorch's own recording around the step, no vramtrace:
  ``torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python")``,
  the step, ``_snapshot()``, ``_record_memory_history(enabled=None)``;
* vramtrace: ``CudaBackend(stacks="python")``: ``start()`` (and ``ctx.track_model``, once per
  recording as in bench_capture.py), the step, ``stop()``, ``snapshot()``: the same recording
  plus vramtrace's hooks and its finalize.

Step time is wall time between two ``torch.cuda.synchronize()`` calls around the step alone;
starting the recording and the dump (snapshot / stop + finalize) are timed separately. Warm-up
steps first, then every variant once per round, interleaved (the order rotates each round), so
the variants share the machine's drift; ``gc.collect()`` before each timed step. Figures are best
and median of N rounds, and the median over rounds of the per-round ratio. The hooks' cost is
vramtrace / history (target <= 1.05). Exits 0; no timed asserts.

``--device cpu`` runs the same code on a tiny model as a dry run: there the CUDA backend records
nothing (no CUDA: its hooks run, the allocator history does not) and the history variant is
skipped, so the figures say nothing about the GPU.

    python benchmarks/bench_cuda.py [--device cuda] [--rounds 10] [--warmup 2] [--json FILE]
    python benchmarks/bench_cuda.py --device cpu --rounds 3 --warmup 1
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vramtrace.capture.cuda_backend import CudaBackend  # noqa: E402
from vramtrace.capture.recorder import DEFAULT_MAX_ENTRIES  # noqa: E402
from tools.llama_sizes import add_device_and_size_options, chosen_device  # noqa: E402


@dataclass
class Timing:
    """One variant's round: seconds to start recording, for the step alone, for the dump."""
    start_s: float
    step_s: float
    dump_s: float
    events: int          # allocator trace events in the round's snapshot (0: nothing recorded)


def build(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """A full fine-tune Llama built on ``device``, foreach AdamW, one fixed batch."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, vocab_size=args.vocab,
                                   max_position_embeddings=max(args.seq, 2048), use_cache=False,
                                   tie_word_embeddings=False)
    with device:
        model = transformers.LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    return model, opt, torch.randint(0, args.vocab, (args.batch, args.seq), device=device)


def events_in(snap: dict) -> int:
    return sum(len(trace) for trace in snap.get("device_traces", []))


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_and_size_options(ap)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", metavar="FILE", help="also write each variant's per-round times here")
    args = ap.parse_args(argv)
    device = chosen_device(ap, args)
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be at least 1 and --warmup at least 0")
    if device is None:
        return 1
    cuda = device.type == "cuda"
    if cuda and device.index is not None:   # the snapshots are of the current device
        torch.cuda.set_device(device.index)
    model, opt, x = build(args, device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed_step() -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    def untagged() -> Timing:
        return Timing(0.0, timed_step(), 0.0, 0)

    def history() -> Timing:
        t0 = time.perf_counter()
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                 max_entries=DEFAULT_MAX_ENTRIES)
        try:
            started = time.perf_counter() - t0
            step_s = timed_step()
            t1 = time.perf_counter()
            snap = torch.cuda.memory._snapshot()
        finally:                            # never leave recording on for the other variants
            torch.cuda.memory._record_memory_history(enabled=None)
        return Timing(started, step_s, time.perf_counter() - t1, events_in(snap))

    def vramtrace() -> Timing:
        t0 = time.perf_counter()
        backend = CudaBackend(stacks="python")
        try:
            backend.start()
            backend.ctx.track_model(model)  # once per recording, not per step: outside the step
            started = time.perf_counter() - t0
            step_s = timed_step()
            t1 = time.perf_counter()
        finally:                            # never leave hooks or recording on for the others
            backend.stop()
        snap = backend.snapshot()
        return Timing(started, step_s, time.perf_counter() - t1, events_in(snap))

    variants: dict[str, Callable[[], Timing]] = {"untagged": untagged, "history": history, "vramtrace": vramtrace}
    errors: dict[str, str] = {}
    if not cuda:
        del variants["history"]
        errors["history"] = "skipped (PyTorch's allocator history needs CUDA)"
    rounds: dict[str, list[Timing]] = {name: [] for name in variants}

    def run(name: str, keep: bool) -> None:
        """One call of a variant; one that fails is reported and dropped, the others go on."""
        try:
            gc.collect()
            timing = variants[name]()
        except Exception as exc:  # noqa: BLE001 - report why a side cannot run, keep the others
            errors[name] = f"cannot run: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            del variants[name], rounds[name]
            return
        if keep:
            rounds[name].append(timing)

    for name in list(variants):
        for _ in range(args.warmup):
            if name in variants:
                run(name, keep=False)
    for r in range(args.rounds):
        names = list(variants)
        if not names:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            run(name, keep=True)
    steps = {name: [t.step_s for t in ts] for name, ts in rounds.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "errors": errors,
                                               "rounds": {n: [asdict(t) for t in ts] for n, ts in rounds.items()}},
                                              indent=1))

    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, fp32 weights, bf16 autocast, AdamW (foreach), "
          f"full fine-tune; {args.rounds} interleaved rounds after {args.warmup} warm-up steps per variant; "
          f"torch {torch.__version__}, {gpu}")
    if not cuda:
        print("DRY RUN on cpu: the CUDA backend records nothing here (its hooks run, no allocator history); "
              "the history variant is skipped. These times say nothing about the GPU.")
    print(f"{'variant':<11}{'best step ms':>13}{'median step ms':>15}{'median start ms':>16}"
          f"{'median dump ms':>15}{'events first/last round':>25}")
    for name, ts in rounds.items():
        print(f"{name:<11}{1e3 * min(steps[name]):>13.2f}{1e3 * median(steps[name]):>15.2f}"
              f"{1e3 * median([t.start_s for t in ts]):>16.2f}{1e3 * median([t.dump_s for t in ts]):>15.2f}"
              f"{f'{ts[0].events}/{ts[-1].events}':>25}")
    for name, why in errors.items():
        print(f"{name:<11}{why}")
    print()
    print(f"{'step-time ratio':<34}{'best/best':>10}{'median of per-round':>21}  target")
    for num, den, target in (("vramtrace", "history", "<= 1.05 (the hooks' cost)"),
                             ("vramtrace", "untagged", ""), ("history", "untagged", "")):
        label = f"{num} / {den}"
        if num in steps and den in steps:
            paired = median([a / b for a, b in zip(steps[num], steps[den])])
            print(f"{label:<34}{min(steps[num]) / min(steps[den]):>10.3f}{paired:>21.3f}  {target}".rstrip())
        else:
            print(f"{label:<34}{'n/a':>10}{'n/a':>21}  {target}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
