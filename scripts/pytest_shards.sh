#!/usr/bin/env bash
# The whole test suite in N concurrent pytest processes on one machine (default 6), each given every
# N-th test of the collection so that the slow files are spread over all of them. On a GPU this runs the
# CUDA tests too; on one H200 with 16 CPU cores the 506 tests took 2.5 minutes in 6 shards, against
# more than ten in one process (the Triton compiles are CPU work and run side by side).
#   bash scripts/pytest_shards.sh            # N=6, logs in $OUT or /tmp/pytest_shards
#   N=4 OUT=/tmp/x bash scripts/pytest_shards.sh tests/test_gca_triton.py tests/test_ops.py
# Exit status: 0 when every shard passed. Prints each shard's summary and every failure's name.
set -uo pipefail
N=${N:-6}
OUT=${OUT:-/tmp/pytest_shards}
LIMIT=${LIMIT:-540}  # seconds each shard may run (the device's commands are limited to 10 minutes)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
[ $# -gt 0 ] || set -- tests
python -m pytest --collect-only -q -p no:cacheprovider "$@" | grep '::' > "$OUT/ids.txt" || { echo "collection failed"; exit 2; }
echo "$(wc -l < "$OUT/ids.txt") tests in $N shards"
pids=()
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' "$OUT/ids.txt" > "$OUT/shard$i.txt"
  # one id per argument (ids may hold spaces inside their [parameters])
  mapfile -t ids < "$OUT/shard$i.txt"
  timeout "$LIMIT" python -m pytest -q -rfEs -p no:cacheprovider "${ids[@]}" > "$OUT/shard$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || rc=1
  echo "shard $i: $(tail -n 1 "$OUT/shard$i.log")"
done
grep -h "^FAILED\|^ERROR" "$OUT"/shard*.log
exit $rc
