"""A tiny training run for the record tests: a few AdamW steps of a small MLP on the CPU.

    python tiny_train.py [--steps N] [--device cpu|cuda] [--width W] [--then ok|raise|exit3|wait]

``wait`` prints READY and sleeps (the test then signals the launcher); everything else ends
right after training as named.
"""
import argparse
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--then", choices=["ok", "raise", "exit3", "wait"], default="ok")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, args.width), torch.nn.ReLU(),
                                torch.nn.Linear(args.width, 8)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        x = torch.randn(16, 64, device=args.device)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step} loss {loss.item():.4f}", flush=True)
    if args.then == "raise":
        raise RuntimeError("planned failure")
    if args.then == "exit3":
        sys.exit(3)
    if args.then == "wait":
        print("READY", flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
