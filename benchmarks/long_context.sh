#!/usr/bin/env bash
# GPU measurements for long-context inference and throughput (one call, about 8 minutes on an H200).
# Writes JSON under $OUT (default ./out/long_context); each step has its own time limit so that a slow
# one does not take the others with it.
#   OUT=out/long_context bash benchmarks/long_context.sh
OUT=${OUT:-out/long_context}
source "$(dirname "$0")/gpu_env.sh"
# 1. DRT vs full attention (small preset): train / prefill / decode at 4K, 16K, 64K
timeout 120 python benchmarks/throughput.py --preset small --out "$OUT/throughput.json" 2>&1 | tail -n 20
# 2. the 16M-token passkey trial with offload (the target: <= 60 s, <= 10 GB)
timeout 130 python -m gca.cli bench --preset small --vocab-size 2048 --dtype bfloat16 --lengths 64K --offload on \
  --decode-tokens 32 --passkey-trial 16M --out "$OUT/passkey_trial_16M.json" 2>&1 | tail -n 4
# 3. 64K and 1M, offload off / on / on without overlapping the fetches
timeout 100 python -m gca.cli bench --preset small --vocab-size 2048 --dtype bfloat16 --lengths 64K,1M --offload both \
  --no-overlap-too --decode-tokens 32 --out "$OUT/bench_1M.json" 2>&1 | tail -n 8
# 4. 16M prefill and decode, offload off and on
timeout 200 python -m gca.cli bench --preset small --vocab-size 2048 --dtype bfloat16 --lengths 16M --offload both \
  --decode-tokens 32 --out "$OUT/bench_16M.json" 2>&1 | tail -n 4
# 5. where a 1M offloaded prefill spends its time
timeout 45 python benchmarks/profile_prefill.py --preset small --length 1048576 --offload > "$OUT/profile_1M_offload.txt" 2>&1
head -n 30 "$OUT/profile_1M_offload.txt"
