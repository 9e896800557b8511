"""`vramtrace report` cost as ratios to a bare pickle.load of the same file, measured in one run.

    python benchmarks/bench_report.py [--events 1000000]

Targets (issue 2): report time <= 2x the load time; extra peak memory < 3x the file size.
Time: in-process, best of 7 rounds, load_trace + build_report (with the cyclic GC paused around
both, as `vramtrace report` runs them: cli.READING_VERBS) vs pickle.load; each round times every
variant once, interleaved, so slow spells of the machine hit both sides of a ratio. Memory: each
in a fresh process that has imported the same modules, peak RSS (VmHWM) of report minus that of
load.
"""
from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_synthetic  # noqa: E402

from vramtrace.gcpause import gc_paused  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "fixtures" / "real-snapshots"

# Peak RSS from /proc's VmHWM: ru_maxrss is inherited across fork+exec on Linux, so a child
# started by a big parent reports the parent's peak.
CHILD = """
import pickle, sys
import numpy, rich, click
from vramtrace.trace import load_trace
from vramtrace.attribution.breakdown import build_report
path, mode = sys.argv[1], sys.argv[2]
if mode == "load":
    with open(path, "rb") as fh:
        data = pickle.load(fh)
else:
    data = build_report(load_trace(path))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""


def without_gc(fn):
    def run():
        with gc_paused():
            fn()
    return run


def best_interleaved(fns: dict[str, Callable[[], None]], rounds: int = 7) -> dict[str, float]:
    """Best time of each function over rounds that run every function once."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def peak_rss(path: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return int(out.stdout.strip())


def measure(path: Path) -> dict:
    from vramtrace.attribution.breakdown import build_report
    from vramtrace.trace import load_trace

    def load():
        with open(path, "rb") as fh:
            pickle.load(fh)

    def report():
        build_report(load_trace(path))

    # report runs the command's way (see the docstring). pickle.load pays the cyclic GC, and
    # how much depends on the heap the process has built up: on small files it moves
    # pickle.load by 2x between runs. Paused for it too, the ratio is the work alone (shown for
    # reading the figures; the target is on the plain ratio).
    best = best_interleaved({"load": load, "report": without_gc(report), "load_nogc": without_gc(load)})
    t_load, t_report, t_load_nogc = best["load"], best["report"], best["load_nogc"]
    extra = peak_rss(path, "report") - peak_rss(path, "load")
    size = path.stat().st_size
    return {"file": path.name, "bytes": size, "load_s": t_load, "report_s": t_report,
            "time_ratio": t_report / t_load, "time_ratio_nogc": t_report / t_load_nogc,
            "extra_rss": extra, "rss_ratio": extra / size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    files = sorted((p for p in REAL.glob("*/*") if p.suffix != ".md"), key=lambda p: p.stat().st_size)[-1:]
    with tempfile.TemporaryDirectory() as tmp:
        files.append(write_synthetic(Path(tmp) / f"synthetic-{args.events}.pkl", args.events))
        print(f"{'file':40} {'MB':>7} {'load s':>8} {'report s':>9} {'time x':>7} {'no-GC x':>8} "
              f"{'extra RSS MB':>13} {'x size':>7}")
        for path in files:
            r = measure(path)
            print(f"{r['file'][:40]:40} {r['bytes'] / 1e6:7.1f} {r['load_s']:8.3f} {r['report_s']:9.3f} "
                  f"{r['time_ratio']:7.2f} {r['time_ratio_nogc']:8.2f} {r['extra_rss'] / 1e6:13.1f} "
                  f"{r['rss_ratio']:7.2f}")
    print("targets: time x <= 2.0, extra RSS < 3 x file size (no-GC x: both timed with the cyclic GC paused)")


if __name__ == "__main__":
    main()
