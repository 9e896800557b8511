#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored through .git/info/exclude) for a run of tools/gpu_check.sh on a lent
# GPU machine that cannot reach ../shared or a package registry:
#   .gpu/shared/tools/validate_memviz.py   the viewer-rule checker from ../shared
#   .gpu/site/bitsandbytes (+ dist-info)   this machine's bitsandbytes, with the CUDA 13.0
#                                          library only (the machine's torch is a cu130 build)
# Then, through the device tool, carrying ".gpu":
#   export PYTHONPATH=$PWD/.gpu/site VRAMTRACE_SHARED=$PWD/.gpu/shared PYTHON=python3 PYTHONUNBUFFERED=1;
#   tools/gpu_check.sh 2>&1 | tee $OUT/log.txt
set -euo pipefail
cd "$(dirname "$0")/.."
cuda="${BNB_CUDA:-130}"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/shared/tools .gpu/site
cp ../shared/tools/validate_memviz.py .gpu/shared/tools/
site="$(python -c 'import bitsandbytes, os; print(os.path.dirname(os.path.dirname(bitsandbytes.__file__)))')"
cp -r "$site/bitsandbytes" "$site"/bitsandbytes-*.dist-info .gpu/site/
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
find .gpu/site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cpu.so' \
  ! -name "libbitsandbytes_cuda${cuda}.so" -delete
rm -f .gpu/site/bitsandbytes-*.dist-info/RECORD
du -sh .gpu
