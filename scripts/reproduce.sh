#!/usr/bin/env bash
# Reproduce the paper's comparison on one GPU, in calls of about 10 minutes: DRT and the two baselines
# of the same width and depth (sliding window only, full attention) pre-trained at equal tokens on the
# offline Debian-docs corpus, then fine-tuned on a needle mixture, then evaluated. Every stage resumes
# where it stopped: rerun the same STAGE until it reports "done", then go to the next.
#
#   make corpus && make data                    # data/debian-docs: 21.9M train / 2.5M val tokens
#   STAGE=pretrain bash scripts/reproduce.sh    # repeat until all three runs reach STEPS
#   STAGE=needles  bash scripts/reproduce.sh    # repeat until all three reach FT_STEPS
#   STAGE=eval     bash scripts/reproduce.sh    # perplexity and needle tasks -> results/*.json
#   STAGE=export   bash scripts/reproduce.sh    # bf16 weights of every run in OUT/export/ (36 MB each
#                                               # for the small preset): the later stages start from
#                                               # them when a run folder is not there
#
# Knobs (environment): OUT (runs/repro), DATA (data/debian-docs), PRESET (small), SEQ (4032 = 64
# chunks of 63), BATCH (8), STEPS (3000 = 97M tokens each), FT_STEPS (1000), MIN (8.5 minutes of
# training per call and run), LENGTHS_PPL (1x,4x,16x,64x), LENGTHS_TASKS, TRIALS (4 per depth x 5
# depths = 20 per length), ARCHS (drt swa full), DEVICE (auto), DTYPE (bfloat16, for evaluation),
# RESULTS (results: where ppl.json and passkey.json are merged).
#
# On a machine that keeps nothing between calls, OUT must travel back and forth: a run folder holds
# the fp32 weights and the AdamW state (12 bytes a parameter), 220 MB for the small preset. Where
# transfers are limited, size STEPS so that pre-training ends within one sitting, then STAGE=export
# and carry only OUT/export to the next sitting (fine-tuning starts a fresh optimizer anyway).
set -euo pipefail
STAGE=${STAGE:?set STAGE=pretrain, needles or eval}
OUT=${OUT:-runs/repro}
DATA=${DATA:-data/debian-docs}
PRESET=${PRESET:-small}
SEQ=${SEQ:-4032}
BATCH=${BATCH:-8}
STEPS=${STEPS:-3000}
FT_STEPS=${FT_STEPS:-1000}
MIN=${MIN:-8.5}
ARCHS=${ARCHS:-drt swa full}
DEVICE=${DEVICE:-auto}
LENGTHS_PPL=${LENGTHS_PPL:-1x,4x,16x,64x}
LENGTHS_TASKS=${LENGTHS_TASKS:-4K,16K,64K,256K,1M,16M}
TRIALS=${TRIALS:-4}
DTYPE=${DTYPE:-bfloat16}
RESULTS=${RESULTS:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
gca() { python -m gca.cli "$@"; }
common=(--preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --time-limit "$MIN" --save-every 250
        --log-every 25 --eval-every 250 --eval-batches 8 --no-progress --device "$DEVICE")
# needle mixture: half corpus text (keeps the language model), half tasks over corpus filler
needles="$DATA@0.5+synthetic:mix;filler=$DATA;loss=answer@0.5"

# a run folder, or its exported bf16 weights when only those travelled
src() { if [ -d "$OUT/$1/ckpt" ]; then echo "$OUT/$1"; else echo "$OUT/export/$1"; fi; }

case $STAGE in
  pretrain)  # the three models side by side (one GPU is mostly idle with one small model)
    for a in $ARCHS; do
      gca train "${common[@]}" --arch "$a" --data "$DATA" --max-steps "$STEPS" --lr 2e-3 --seed 1 \
        --out "$OUT/$a" >> "$OUT/$a.log" 2>&1 &
    done
    wait
    for a in $ARCHS; do tail -n 1 "$OUT/$a.log"; done ;;
  needles)  # the paper fine-tunes on the tasks with softmax-off-by-one off
    for a in $ARCHS; do
      gca train "${common[@]}" --init-from "$(src "$a")" --data "$needles" --max-steps "$FT_STEPS" --lr 5e-4 --seed 2 \
        --set gca_softmax_one=false --out "$OUT/$a-needles" >> "$OUT/$a-needles.log" 2>&1 &
    done
    wait
    for a in $ARCHS; do tail -n 1 "$OUT/$a-needles.log"; done ;;
  eval)
    for a in $ARCHS; do
      gca eval ppl --ckpt "$(src "$a")" --data "$DATA" --lengths "$LENGTHS_PPL" --windows 4 --device "$DEVICE" \
        --dtype "$DTYPE" --name "$a-$PRESET" --out "$OUT/eval/$a-ppl" || echo "$a: ppl stopped (memory?)"
      # lengths a model cannot hold (full attention keeps every key) fail on their own; the rest still run
      for L in ${LENGTHS_TASKS//,/ }; do
        gca eval tasks --ckpt "$(src "$a-needles")" --tasks passkey,multikey,2hop --lengths "$L" --depths 5 \
          --trials "$TRIALS" --filler "$DATA" --offload --device "$DEVICE" --dtype "$DTYPE" --name "$a-$PRESET" \
          --out "$OUT/eval/$a-tasks-$L" || { echo "$a: stopped at $L"; break; }
      done
    done
    python scripts/collect_results.py --runs "$OUT" --data "$DATA" --out "$RESULTS" ;;
  export)
    for r in $ARCHS; do
      for n in "$r" "$r-needles"; do
        if [ -d "$OUT/$n/ckpt" ]; then
          python -c "from gca.train import export_model; export_model('$OUT/$n', '$OUT/export/$n')" && echo "exported $n"
        fi
      done
    done ;;
  *) echo "unknown STAGE $STAGE" >&2; exit 2 ;;
esac
