"""`vramtrace html` cost as a ratio to `vramtrace report` on the same file, measured in one run.

    python benchmarks/bench_html.py [FILE]      # default: the largest real snapshot (3.1 MB)

Target (issue 6): the HTML report takes < 3x the report's time and is smaller than its input.
Both verbs run as the user runs them (a fresh `python -m vramtrace` process each, so neither
profits from the other's warm caches), alternating, best of 3 wall-clock times.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LARGEST = REPO.parent / "shared" / "fixtures" / "real-snapshots" / "kkaitlyn111__cs336-a2-systems" / "memory_2.7b_forward.pickle"
RUNS = 3


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vramtrace", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else LARGEST
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.html"
        report, html = [], []
        for _ in range(RUNS):
            report.append(run(["report", str(path), "-q"]))
            html.append(run(["html", str(path), "-o", str(out), "-q"]))
        size = out.stat().st_size
    ratio = min(html) / min(report)
    print(f"{path.name}: {path.stat().st_size:,} bytes")
    print(f"report  best of {RUNS}: {min(report):.3f} s")
    print(f"html    best of {RUNS}: {min(html):.3f} s   ratio {ratio:.2f}x (target < 3x)")
    print(f"html size: {size:,} bytes = {size / path.stat().st_size:.1%} of the input (target < 100%)")
    return 0 if ratio < 3 and size < path.stat().st_size else 1


if __name__ == "__main__":
    sys.exit(main())
