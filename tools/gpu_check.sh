#!/usr/bin/env bash
# The real CUDA path of `vramtrace record`, end to end; run only where a GPU is lent:
#   tools/gpu_check.sh            (writes into $OUT, else out/gpu_check)
# 1. records a small training run with --backend cuda, reports it, validates the file for
#    PyTorch's viewer and torch.cuda._memory_viz; 2. records the same script on the CPU shadow
#    (--backend cpu) and prints both sets of figures side by side; 3. runs the tests marked cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-out/gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python}"
script=tests/scripts/tiny_train.py
args=(--width 4096 --steps 3)

$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== record (cuda)"
$py -m vramtrace record -o "$out/gpu.pkl" --force --backend cuda -- $py "$script" --device cuda "${args[@]}"
echo "== record (cpu shadow of the same script)"
$py -m vramtrace record -o "$out/cpu.pkl" --force --backend cpu -- $py "$script" --device cpu "${args[@]}"

echo "== report (cuda)"
$py -m vramtrace report "$out/gpu.pkl" -q | tee "$out/gpu_report.txt"
$py -m vramtrace report "$out/gpu.pkl" -q --format json > "$out/gpu_report.json"
$py -m vramtrace report "$out/cpu.pkl" -q --format json > "$out/cpu_report.json"

echo "== validate"
validator=""
for v in "${VRAMTRACE_SHARED:-}/tools/validate_memviz.py" ../shared/tools/validate_memviz.py shared/tools/validate_memviz.py; do
  [ -f "$v" ] && validator="$v" && break
done
if [ -n "$validator" ]; then $py "$validator" "$out/gpu.pkl" "$out/cpu.pkl"; else echo "validate_memviz.py not found: skipped"; fi
$py - "$out/gpu.pkl" <<'PY'
import pickle, sys
from torch.cuda import _memory_viz as mv
snap = pickle.load(open(sys.argv[1], "rb"))
mv.segsum(snap); mv.trace(snap); mv.trace_plot(snap); mv.segment_plot(snap)
events = [e for t in snap["device_traces"] for e in t]
cats = sorted({e.get("category") for e in events})
nvml = snap.get("vramtrace_nvml", [])
print(f"_memory_viz segsum/trace/trace_plot/segment_plot: ok; {len(events)} events; categories {cats}")
print(f"nvml samples: {len(nvml)}" + (f", last used {nvml[-1]['used'] / 2**20:.1f} MiB of {nvml[-1]['total'] / 2**30:.1f} GiB" if nvml else ""))
assert "unknown" in cats and len(cats) <= 10 and nvml, "categories or NVML samples missing"
PY

echo "== figures (cuda vs cpu shadow)"
$py - "$out/gpu_report.json" "$out/cpu_report.json" <<'PY'
import json, sys
mib = lambda b: f"{b / 2**20:10.2f} MiB"
reports = [json.load(open(p)) for p in sys.argv[1:3]]
assert [r["recorded_by"] for r in reports] == ["cuda", "cpu"], [r["recorded_by"] for r in reports]
g, c = (r["devices"][0] for r in reports)
for key in ("peak_allocated", "peak_reserved"):
    print(f"{key:16s} cuda {mib(g[key]['bytes'])}   cpu {mib(c[key]['bytes'])}")
owners = {r["name"] for r in g["by_owner"] + c["by_owner"]}
get = lambda d, n: next((r["bytes"] for r in d["by_owner"] if r["name"] == n), 0)
for n in sorted(owners, key=lambda n: -get(g, n)):
    print(f"  at peak {n:12s} cuda {mib(get(g, n))}   cpu {mib(get(c, n))}")
PY

echo "== tests marked cuda"
$py -m pytest -q -m cuda tests/test_record_cli.py
