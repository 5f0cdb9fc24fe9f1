#!/usr/bin/env bash
# GPU check for the fused GCA kernels, run from the repository root on a CUDA machine:
#   1. the kernel tests on CUDA (including the larger shapes and torch.compile),
#   2. the benchmark (correctness at the SPEC shape, timings, results JSON + markdown),
#   3. a launch-config sweep at the SPEC shape (to pick the default configs),
#   4. the gather floor (what moving the retrieved tiles alone costs, beside the forward's time).
#   5. with VERSUS=FILE (a copy of gca/ops/gca_triton.py from another commit), this tree's forward and
#      backward timed in turn against it at the SPEC shape and at K = 4 (`bench_gca.py --versus`).
# Logs and results go under "$OUT" (default benchmarks/results/gpu_check). Budget: about 9.5 minutes
# on a fresh machine (the kernel tests take ~4 of them with a cold compile cache, the Gluon kernels'
# included); VERSUS adds about 1.5 and GATHER=0 skips step 4 (~45 s): both together need a warm cache
# to fit one 10-minute call.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
#   git show 6b3d1bd:gca/ops/gca_triton.py > .cache/old_gca_triton.py   # then, with .cache carried:
#   OUT=/tmp/out VERSUS=.cache/old_gca_triton.py bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT/results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

start=$(date +%s)
timeout 300 python -m pytest -q -rs --durations=15 tests/test_gca_triton.py 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "pytest rc=$test_rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/pytest.log"

start=$(date +%s)
timeout 170 python benchmarks/bench_gca.py --out-dir "$OUT/results" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench rc=$bench_rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/bench.log"

start=$(date +%s)
timeout 80 python benchmarks/bench_gca.py --sweep-only --out-dir "$OUT/results" 2>&1 | tee "$OUT/sweep.log"
echo "sweep rc=${PIPESTATUS[0]} in $(( $(date +%s) - start ))s" | tee -a "$OUT/sweep.log"

if [ "${GATHER:-1}" != 0 ]; then
  start=$(date +%s)
  timeout 45 python benchmarks/gather_floor.py --out "$OUT/results/gather_floor.json" 2>&1 | tee "$OUT/gather_floor.log"
  echo "gather floor rc=${PIPESTATUS[0]} in $(( $(date +%s) - start ))s" | tee -a "$OUT/gather_floor.log"
fi

if [ -n "${VERSUS:-}" ]; then
  start=$(date +%s)
  for shape in 4,256,64,12,12,64,8 4,256,64,12,12,64,4; do
    timeout 60 python benchmarks/bench_gca.py --versus "$VERSUS" --shape "$shape" --out-dir "$OUT/results/versus_${shape//,/-}" 2>&1
  done | tee "$OUT/versus.log"
  echo "versus in $(( $(date +%s) - start ))s" | tee -a "$OUT/versus.log"
fi

echo "pytest rc=$test_rc bench rc=$bench_rc" | tee "$OUT/summary.txt"
exit $(( test_rc != 0 || bench_rc != 0 ))
