#!/usr/bin/env bash
# Does a pre-training stream whose far repeats carry the loss alone let DRT learn to read a retrieved copy?
#
# scripts/reproduce.sh pre-trains on half corpus text, half corpus text with pieces repeated from >= 600
# tokens back, the loss on every token (its PRE_DATA). On that stream the read of a retrieved copy never
# formed (results/README.md, twenty-fifth to twenty-seventh runs: an oracle handing the model the source
# chunks moves far-copyable tokens by 0.0-3.4%), while the fifth run's copy-first stage, with the loss on the
# answers and the repeats alone, formed it at the text's expense. This pilot trains DRT and the sliding window
# on both streams side by side, the second with the repeat rows' loss on the repeats (and the passkey answer)
# alone and twice the repeats (repeat_frac 0.6), at equal steps from one seed; then scores all four on the
# same held-out text (gca eval ppl --targets 1x) and each DRT's read of far copies with and without the oracle
# (scripts/retrieval_copy_hits.py --oracle). Runs go to RUNS_ROOT/mixall and RUNS_ROOT/mixrep.
#
#   bash scripts/repeat_loss_pilot.sh                                   # one H200: ~4.5 min training, ~2 min scoring
#   PRESET=tiny SEQ=504 BATCH=2 STEPS=3 DEVICE=cpu WINDOWS=1 LENGTHS=1x bash scripts/repeat_loss_pilot.sh  # smoke test
set -euo pipefail
D=${DATA:-data/debian-docs-folders}
S=${SEED:-6}
ROOT=${RUNS_ROOT:-runs}
DEVICE=${DEVICE:-auto}
LENGTHS=${LENGTHS:-1x,16x}
WINDOWS=${WINDOWS:-16}
dtype=bfloat16; [ "$DEVICE" = cpu ] && dtype=float32
REP="$D@0.5+synthetic:passkey;filler=$D;loss=answer_repeats;repeat=1.0;repeat_gap=600;repeat_frac=0.6@0.5"
train=(DATA="$D" SEEDS="$S" ARCHS="drt swa" LR=5e-4 STEPS="${STEPS:-1200}" MIN="${MIN:-4.5}" STAGE=pretrain
       PRESET="${PRESET:-small}" SEQ="${SEQ:-4032}" BATCH="${BATCH:-8}" DEVICE="$DEVICE")
mkdir -p "$ROOT/mixall" "$ROOT/mixrep"
env "${train[@]}" RUNS="$ROOT/mixall" bash scripts/reproduce.sh > "$ROOT/mixall/pretrain.out" 2>&1 &
env "${train[@]}" RUNS="$ROOT/mixrep" PRE_DATA="$REP" bash scripts/reproduce.sh > "$ROOT/mixrep/pretrain.out" 2>&1 &
wait
for r in mixall mixrep; do
  mkdir -p "$ROOT/$r/eval"
  env DATA="$D" RUNS="$ROOT/$r" STAGE=ppl-fixed RUN_NAMES="drt-s$S swa-s$S" NAME_TAG="-$r" LENGTHS_PPL="$LENGTHS" \
    PPL_WINDOWS="$WINDOWS" PPL_JOBS=2 PRESET="${PRESET:-small}" DEVICE="$DEVICE" DTYPE="$dtype" \
    bash scripts/reproduce.sh > "$ROOT/$r/eval/ppl.out" 2>&1 &
  python scripts/retrieval_copy_hits.py --ckpt "$ROOT/$r/drt-s$S" --name "drt-s$S-$r" --data "$D" --lengths "$LENGTHS" \
    --windows "$WINDOWS" --device "$DEVICE" --dtype "$dtype" --oracle --out "$ROOT/$r/eval/hits-drt-s$S.json" \
    > "$ROOT/$r/eval/hits-drt-s$S.log" 2>&1 &
done
wait
for r in mixall mixrep; do
  tail -n 2 "$ROOT/$r/pretrain.out"
  grep -h "ppl" "$ROOT/$r"/eval/*-ppl-fixed.log | tail -n 4 || true
  grep -h " all back" "$ROOT/$r/eval/hits-drt-s$S.log" || true
done
