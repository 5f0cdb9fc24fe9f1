#!/usr/bin/env bash
# Does skipping the upper layers in a long prefill (DRT.new_cache(skip_upper=True), the default with
# logits_to_keep) pay on the GPU? One passkey trial at 1M and 16M tokens, twice each in one process
# (the first pair is the warm-up), in four processes alternating --full-prefill and the default, so
# that neither mode gets the warm kernel caches of the other. CKPT: a trained DRT with the 2048-token
# embedded vocabulary (results/README.md used drt-copy-lm-frozen-small, bf16, memory on the GPU).
#   CKPT=runs/copy-first/lm-frozen OUT=out/prefill_skip bash benchmarks/prefill_skip.sh
CKPT=${CKPT:?set CKPT to a trained DRT run or export}
OUT=${OUT:-out/prefill_skip}
mkdir -p "$OUT"
i=0
for mode in full skip full skip; do
  extra=(); [ $mode = full ] && extra=(--full-prefill)
  i=$((i + 1))
  timeout 120 python -m gca.cli bench --ckpt "$CKPT" --lengths 64K --offload off --dtype bfloat16 --decode-tokens 8 \
    --passkey-trial 1M,16M,1M,16M "${extra[@]}" --out "$OUT/bench_${i}_$mode.json" 2>&1 | grep "passkey trial" | sed "s/^/$mode: /"
done
