"""Several ranks: two gloo DDP ranks, each recorded with the Python API, merged and diffed."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from vramtrace.cli import cli
from vramtrace.diff.compare import diff_runs, units_of
from vramtrace.diff.ranks import build_rank_report, imbalance
from vramtrace.trace import load_trace

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out_dir: str) -> None:
    """One DDP rank: rank r trains on a batch (r + 1) times larger, so its activations are."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import vramtrace
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with vramtrace.record(os.path.join(out_dir, f"rank{rank}.pkl"), backend="cpu"):
            torch.manual_seed(0)
            model = DistributedDataParallel(torch.nn.Sequential(
                torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for _ in range(2):
                model(torch.randn(64 * (rank + 1), 64)).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            del model, opt
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [out / f"rank{r}.pkl" for r in range(WORLD)]


def test_merged_view_sums_and_imbalance(rank_files):
    traces = [load_trace(p) for p in rank_files]
    report = build_rank_report(traces)
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == ["rank0.pkl", "rank1.pkl"]
    peaks = [r["peak_allocated"]["bytes"] for r in ranks]
    totals = report["totals"]["peak_allocated"]
    assert totals["sum"] == sum(peaks) and totals["max"] == max(peaks) and totals["max_rank"] == "rank1.pkl"
    assert totals["imbalance"] == pytest.approx(imbalance(peaks)) and totals["imbalance"] > 0
    merged = {r["name"]: r for r in report["merged"]["by_owner"]}
    for owner, row in merged.items():
        per_rank = [sum(x["bytes"] for x in r["by_owner"] if x["name"] == owner) for r in ranks]
        assert row["per_rank"] == per_rank and row["sum"] == sum(per_rank)
    # same model on both ranks: identical parameters, optimizer state and gradients
    for owner in ("trainable", "optimizer", "gradient"):
        if owner in merged:
            assert merged[owner]["imbalance"] == 0, owner
    assert merged["activation"]["max_rank"] == "rank1.pkl"
    assert report["largest_vs_smallest"]["b"] == "rank1.pkl"
    assert report["largest_vs_smallest"]["delta"] > 0


def test_report_cli_takes_several_rank_files(rank_files):
    result = CliRunner().invoke(cli, ["report", *map(str, rank_files), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["ranks"]) == WORLD
    text = CliRunner().invoke(cli, ["report", *map(str, rank_files)])
    assert text.exit_code == 0 and "imbalance" in text.stdout


def test_rank_vs_rank_diff(rank_files):
    diff = diff_runs(units_of(load_trace(rank_files[0])), units_of(load_trace(rank_files[1])))
    by_owner = {r["owner"]: r for r in diff["points"][0]["by_owner"]}
    assert by_owner["trainable"]["delta"] == 0
    assert by_owner["activation"]["delta"] > 0
    result = CliRunner().invoke(cli, ["diff", *map(str, rank_files), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["peak"]["delta"] == diff["peak"]["delta"]


def test_directories_of_rank_files_are_summed(rank_files):
    run_dir = str(rank_files[0].parent)
    result = CliRunner().invoke(cli, ["diff", run_dir, run_dir, "--format", "json"])
    assert result.exit_code == 0, result.output
    diff = json.loads(result.stdout)
    assert [p["a"] for p in diff["unit_pairs"]] == ["rank0.pkl", "rank1.pkl"]
    single = [load_trace(p) for p in rank_files]
    assert diff["points"][0]["a"]["allocated"] == sum(
        u.timeline.at(u.timeline.peak_index, "allocated") for t in single for u in units_of(t))
    assert diff["peak"]["a"] == max(u.timeline.peak_allocated for t in single for u in units_of(t))
