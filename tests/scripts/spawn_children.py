"""Main process plus two spawned children for the record test: an idle one that only imports
torch (it leaves no file) and one that makes tensors (it gets its own .pid<N> file)."""
import multiprocessing as mp

import torch


def idle() -> None:
    pass


def work() -> None:
    x = torch.ones(256, 256)
    (x @ x).sum()


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    for target in (idle, work):
        p = ctx.Process(target=target)
        p.start()
        p.join()
    print(torch.zeros(1000).sum().item())
