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
#   STAGE=eval-long bash scripts/reproduce.sh   # DRT alone at LENGTHS_LONG (TRIALS_LONG per depth)
#   STAGE=export   bash scripts/reproduce.sh    # bf16 weights of every run in OUT/export/ (36 MB each
#                                               # for the small preset): the later stages start from
#                                               # them when a run folder is not there
#
# Knobs (environment): OUT (runs/repro), DATA (data/debian-docs), PRESET (small), SEQ (4032 = 64
# chunks of 63), BATCH (8), STEPS (3000 = 97M tokens each, or "auto"), FT_STEPS (1000, or "auto"),
# MIN (8.5 minutes of training per call and run), LENGTHS_PPL (1x,4x,16x,64x), TASKS_drt /
# TASKS_swa / TASKS_full (the context lengths each model is tested at: full attention keeps every key
# and costs n^2, so it stops earlier), LENGTHS_LONG and TRIALS_LONG (eval-long), TRIALS (4 per depth
# x 5 depths = 20 per length), ARCHS (drt swa full), DEVICE (auto), DTYPE (bfloat16, for
# evaluation), RESULTS (results: where ppl.json and passkey.json are merged).
#
# STEPS=auto (and FT_STEPS=auto) first trains every model side by side for 40 steps, times steps 20
# to 40, and sets the step count that the slowest model finishes in MIN minutes less 8%: equal steps
# (so equal tokens) for every model, and a cosine schedule that ends where training ends.
#
# On a machine that keeps nothing between calls, OUT must travel back and forth: a run folder holds
# the fp32 weights and the AdamW state (12 bytes a parameter), 220 MB for the small preset. Where
# transfers are limited, size STEPS so that pre-training ends within one sitting, then STAGE=export
# and carry only OUT/export to the next sitting (fine-tuning starts a fresh optimizer anyway).
set -euo pipefail
shopt -s inherit_errexit
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
TASKS_drt=${TASKS_drt:-4K,16K,64K,256K,1M}
TASKS_swa=${TASKS_swa:-4K,16K,64K,256K}
TASKS_full=${TASKS_full:-4K,16K,64K}
LENGTHS_LONG=${LENGTHS_LONG:-4M,16M}
TRIALS_LONG=${TRIALS_LONG:-1}
TRIALS=${TRIALS:-4}
DTYPE=${DTYPE:-bfloat16}
RESULTS=${RESULTS:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=${TQDM_DISABLE:-1}
gca() { python -m gca.cli "$@"; }
common=(--preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --time-limit "$MIN" --save-every 250
        --log-every 25 --eval-every 250 --eval-batches 8 --no-progress --device "$DEVICE")
# needle mixture: half corpus text (keeps the language model), half tasks over corpus filler
needles="$DATA@0.5+synthetic:mix;filler=$DATA;loss=answer@0.5"

# a run folder, or its exported bf16 weights when only those travelled
src() { if [ -d "$OUT/$1/ckpt" ]; then echo "$OUT/$1"; else echo "$OUT/export/$1"; fi; }

# run_args STAGE ARCH: the arguments of ARCH's run in STAGE (pretrain from scratch; needles from its
# pre-trained run, with softmax-off-by-one off as the paper fine-tunes)
run_args() {
  case $1 in
    pretrain) echo --arch "$2" --data "$DATA" --lr 2e-3 --seed 1 ;;
    needles) echo --init-from "$(src "$2")" --data "$needles" --lr 5e-4 --seed 2 --set gca_softmax_one=false ;;
  esac
}

# steps_for STAGE REQUESTED: REQUESTED, or for "auto" the steps that every run, trained side by side,
# finishes in MIN minutes less 8%: 40 steps of each are timed (steps 20 to 40) and the slowest counts.
# The answer is kept in OUT/steps-STAGE, so that a resumed stage keeps its schedule.
steps_for() {
  local stage=$1 want=$2 dir="$OUT/calibrate-$1"
  if [ "$want" != auto ]; then echo "$want"; return; fi
  if [ -f "$OUT/steps-$stage" ]; then cat "$OUT/steps-$stage"; return; fi
  rm -rf "$dir"; mkdir -p "$dir"
  for a in $ARCHS; do
    # shellcheck disable=SC2046  # run_args prints separate words
    gca train "${common[@]}" $(run_args "$stage" "$a") --max-steps 40 --log-every 20 --eval-every 0 --time-limit 0 \
      --save-every 1000 --out "$dir/$a" > "$dir/$a.log" 2>&1 &
  done
  wait
  python - "$dir" "$MIN" $ARCHS > "$OUT/steps-$stage.tmp" <<'PY'
import json, sys
folder, minutes, archs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
slowest = 0.0
for a in archs:
    rows = {r["step"]: r for r in map(json.loads, open(f"{folder}/{a}/log.jsonl"))}
    per_step = (rows[40]["elapsed_s"] - rows[20]["elapsed_s"]) / 20
    print(f"calibration: {a} {per_step * 1000:.0f} ms per step side by side", file=sys.stderr)
    slowest = max(slowest, per_step)
print(int(0.92 * minutes * 60 / slowest))
PY
  mv "$OUT/steps-$stage.tmp" "$OUT/steps-$stage"
  rm -rf "$dir"/*/ckpt
  cat "$OUT/steps-$stage"
}

case $STAGE in
  pretrain)  # the three models side by side (one GPU is mostly idle with one small model)
    STEPS=$(steps_for pretrain "$STEPS"); echo "pre-training: $STEPS steps each"
    for a in $ARCHS; do
      # shellcheck disable=SC2046
      gca train "${common[@]}" $(run_args pretrain "$a") --max-steps "$STEPS" --out "$OUT/$a" >> "$OUT/$a.log" 2>&1 &
    done
    wait
    for a in $ARCHS; do tail -n 1 "$OUT/$a.log"; done ;;
  needles)
    FT_STEPS=$(steps_for needles "$FT_STEPS"); echo "needle fine-tuning: $FT_STEPS steps each"
    for a in $ARCHS; do
      # shellcheck disable=SC2046
      gca train "${common[@]}" $(run_args needles "$a") --max-steps "$FT_STEPS" --out "$OUT/$a-needles" \
        >> "$OUT/$a-needles.log" 2>&1 &
    done
    wait
    for a in $ARCHS; do tail -n 1 "$OUT/$a-needles.log"; done ;;
  eval)  # the three models side by side; a test stopped early keeps the rows it finished
    mkdir -p "$OUT/eval"
    for a in $ARCHS; do
      lengths=TASKS_$a
      {
        gca eval ppl --ckpt "$(src "$a")" --data "$DATA" --lengths "$LENGTHS_PPL" --windows 4 --device "$DEVICE" \
          --dtype "$DTYPE" --name "$a-$PRESET" --out "$OUT/eval/$a-ppl" || echo "$a: ppl failed"
        gca eval tasks --ckpt "$(src "$a-needles")" --tasks passkey,multikey,2hop --lengths "${!lengths}" --depths 5 \
          --trials "$TRIALS" --filler "$DATA" --device "$DEVICE" --dtype "$DTYPE" --name "$a-$PRESET" \
          --out "$OUT/eval/$a-tasks-main" || echo "$a: tasks failed"
      } > "$OUT/eval/$a.log" 2>&1 &
    done
    wait
    for a in $ARCHS; do grep -v "^eval" "$OUT/eval/$a.log" | tail -n 30; done
    python scripts/collect_results.py --runs "$OUT" --data "$DATA" --out "$RESULTS" ;;
  eval-long)  # DRT alone at LENGTHS_LONG; the chunk memory in CPU memory, one length per process
    mkdir -p "$OUT/eval"
    for L in ${LENGTHS_LONG//,/ }; do
      gca eval tasks --ckpt "$(src drt-needles)" --tasks passkey --lengths "$L" --depths 5 --trials "$TRIALS_LONG" \
        --batch-size "${BATCH_LONG:-1}" --filler "$DATA" --offload --device "$DEVICE" --dtype "$DTYPE" \
        --name "drt-$PRESET" --seed 4321 --out "$OUT/eval/drt-tasks-$L" 2>&1 | grep -v "^eval" || echo "drt: stopped at $L"
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
