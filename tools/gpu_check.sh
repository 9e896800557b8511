#!/usr/bin/env bash
# The real CUDA path of vramtrace, end to end; run only where a GPU is lent:
#   PYTHON=python3 tools/gpu_check.sh      (writes into $OUT, else out/gpu_check)
# Stages (each runs even if an earlier one failed; the exit status says whether all passed):
#  env      torch, the GPU, which recording calls this torch has, NVML, bitsandbytes
#  record   a small training run with --backend cuda, and the same script on the CPU shadow
#  report   both files; diff of the two; flame graph of the CUDA file
#  validate both files for PyTorch's viewer, and through torch.cuda._memory_viz
#  figures  CUDA vs CPU-shadow figures side by side
#  tests    the tests marked cuda (CUDA recording, OOM dump, owner bytes vs analytic truth)
#  simulate vramtrace's fake-tensor prediction vs a real CUDA step of the same recipes
#  bench    the CUDA path's tagging overhead on a real step
# ../shared (the viewer-rule checker) is found beside the checkout or at $VRAMTRACE_SHARED;
# tools/gpu_carry.sh prepares what to carry to a machine that has neither it nor bitsandbytes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-out/gpu_check}"
work="$(mktemp -d)"
mkdir -p "$out"
py="${PYTHON:-python}"
script=tests/scripts/tiny_train.py
args="--width 4096 --steps 3"
export out work py script args
failed=()

stage() {   # stage NAME SECONDS COMMAND...: run one stage, stopped after SECONDS (a lent GPU's
  local name=$1 limit=$2 t0=$SECONDS   # minutes are few: one stage that hangs must not take them all)
  shift 2
  echo "== $name"
  if timeout "$limit" bash -c '"$@"' stage "$@"; then echo "-- $name: ok ($((SECONDS - t0)) s)"
  else echo "-- $name: FAILED ($((SECONDS - t0)) s; limit $limit s)"; failed+=("$name"); fi
}

env_check() {
  $py - <<'PY'
import importlib, torch
assert torch.cuda.is_available(), "no CUDA device"
mem = torch.cuda.memory
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("_record_memory_history", "_snapshot", "_set_memory_metadata", "_annotate_tensor",
             "_allocation_traceback"):
    print(f"  torch.cuda.memory.{name}: {'yes' if hasattr(mem, name) else 'no'}")
for mod in ("pynvml", "bitsandbytes", "transformers", "peft"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod}: {getattr(m, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001 - print why, the stages that need it will say too
        print(f"  {mod}: cannot import ({type(exc).__name__}: {str(exc)[:120]})")
PY
}

record_both() {
  $py -m vramtrace record -o "$out/gpu.pkl" --force --backend cuda -- $py "$script" --device cuda $args &&
  $py -m vramtrace record -o "$out/cpu.pkl" --force --backend cpu -- $py "$script" --device cpu $args
}

report_both() {
  $py -m vramtrace report "$out/gpu.pkl" -q &&
  $py -m vramtrace report "$out/gpu.pkl" -q --format json > "$work/gpu_report.json" &&
  $py -m vramtrace report "$out/cpu.pkl" -q --format json > "$work/cpu_report.json" &&
  $py -m vramtrace diff "$out/cpu.pkl" "$out/gpu.pkl" &&
  $py -m vramtrace flame "$out/gpu.pkl" -o "$work/gpu.html" && ls -l "$work/gpu.html"
}

validate_both() {
  local validator=""
  for v in "${VRAMTRACE_SHARED:-}/tools/validate_memviz.py" ../shared/tools/validate_memviz.py; do
    [ -f "$v" ] && validator="$v" && break
  done
  if [ -n "$validator" ]; then $py "$validator" "$out/gpu.pkl" "$out/cpu.pkl" || return 1
  else echo "validate_memviz.py not found: skipped"; fi
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
}

figures() {
  $py - "$work/gpu_report.json" "$work/cpu_report.json" <<'PY'
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
  # What the CUDA run left allocated at the end, largest first: the cuBLAS workspaces (never
  # freed, made inside a forward or backward op) should show here as temporaries marked
  # "workspace" (attribution/workspaces.py), not as activations.
  $py - "$out/gpu.pkl" <<'PY'
import json, pickle, sys
live = {}
for e in pickle.load(open(sys.argv[1], "rb"))["device_traces"][0]:
    if e["action"] == "alloc":
        live[e["addr"]] = e
    elif e["action"] == "free_completed":
        live.pop(e["addr"], None)
print("largest allocations alive at the end of the CUDA run:")
for e in sorted(live.values(), key=lambda e: -e["size"])[:6]:
    meta = json.loads(e["user_metadata"]) if str(e.get("user_metadata", "")).startswith("{") else {}
    frames = " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in e["frames"][:3])
    print(f"  {e['size'] / 2**20:9.3f} MiB {e['category']:11s} {meta.get('workspace', ''):7s} {meta.get('phase', '?'):9s} "
          f"{meta.get('module', '')[:40]:40s} {frames[:160]}")
PY
}

cuda_tests() {
  $py -m pytest -q -rfs -s -p no:cacheprovider --basetemp="$work/pytest" -m cuda \
    tests/test_record_cli.py tests/test_owner_truth.py > "$out/pytest_log.txt" 2>&1
  local rc=$?
  [ -d "$work/pytest" ] && (cd "$work/pytest" && find . -name '*.pkl' | tar czf "$out/cuda_test_files.tgz" -T -)   # for a look afterwards
  grep -E "^(fp32_full|fp16_lora|int8_lora|qlora)|passed|failed|FAILED|SKIPPED|Error" "$out/pytest_log.txt" | cut -c1-600
  return $rc
}

export -f env_check record_both report_both validate_both figures cuda_tests
stage env 60 env_check
stage record 120 record_both
stage report 60 report_both
stage validate 60 validate_both
stage figures 30 figures
stage tests 180 cuda_tests
stage simulate 120 $py tools/gpu_simulate_vs_real.py --device cuda --json "$out/sim_vs_real.json"
stage bench 90 $py benchmarks/bench_cuda.py --device cuda --json "$out/bench_cuda.json"
stage bench-small-step 60 $py benchmarks/bench_cuda.py --device cuda --seq 128 --batch 1   # hooks' worst case: a short step
rm -rf "$work"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED stages: ${failed[*]}"; exit 1; fi
echo "all stages passed"
