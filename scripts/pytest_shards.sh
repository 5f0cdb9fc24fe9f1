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
# one session seed for every shard (each test's seed is drawn from it and the test's id, so any failure
# replays with it whichever shard ran the test); printed here since pytest -q hides its header
export GCA_TEST_SEED=${GCA_TEST_SEED:-$(( (RANDOM << 16 | RANDOM) % 2147483648 ))}
[ $# -gt 0 ] || set -- tests
# the id lists go to a scratch folder, so that $OUT holds only the N logs (a remote machine may return
# few files)
ID=$(mktemp -d)
trap 'rm -rf "$ID"' EXIT
python -m pytest --collect-only -q -p no:cacheprovider "$@" | grep '::' > "$ID/ids.txt" || { echo "collection failed"; exit 2; }
echo "$(wc -l < "$ID/ids.txt") tests in $N shards, GCA_TEST_SEED=$GCA_TEST_SEED"
pids=()
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' "$ID/ids.txt" > "$ID/shard$i.txt"
  # one id per argument (ids may hold spaces inside their [parameters])
  mapfile -t ids < "$ID/shard$i.txt"
  timeout "$LIMIT" python -m pytest -q -rfEs -p no:cacheprovider "${ids[@]}" > "$OUT/shard$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || rc=1
  echo "shard $i: $(tail -n 1 "$OUT/shard$i.log")"
done
grep -h "^FAILED\|^ERROR" "$OUT"/shard*.log
# each failure's assertion lines and place, so that this summary alone (the logs may not come back from a
# remote machine) says what failed and with which seed to replay it
for i in "${!pids[@]}"; do
  grep -q "^FAILED\|^ERROR" "$OUT/shard$i.log" || continue
  echo "--- shard $i failures (replay: GCA_TEST_SEED=$GCA_TEST_SEED python -m pytest <test id>)"
  grep -E "^(E  |_{3,} |[^ ]+\.py:[0-9]+: )" "$OUT/shard$i.log" | head -n 60
done
exit $rc
