#!/usr/bin/env bash
# The fifth corpus run (results/README.md, "Copy first"): a small DRT learns to copy from retrieved
# chunks before it learns the language, then learns the language with the needle mixture beside it.
# One GPU; each stage resumes where it stopped (rerun the same STAGE until it reports "done").
#
#   make corpus && make data                    # data/debian-docs
#   STAGE=copy      bash scripts/copy_first.sh  # three copy-stage runs side by side (6000 steps each)
#   STAGE=copy-eval bash scripts/copy_first.sh  # passkey of the chosen copy run, 4K-1M, 4M, 16M
#   STAGE=lm        bash scripts/copy_first.sh  # text + needle stage from the chosen copy run
#   STAGE=lm-eval   bash scripts/copy_first.sh  # its perplexity and needle tasks
#   STAGE=needles   bash scripts/copy_first.sh  # needle-only stage from the text stage, and its evaluation
#
# The sliding-window baseline at equal tokens runs the same two stages on the same data:
#   STAGE=copy-swa bash scripts/copy_first.sh                                  # copy stage, one swa run (swa1k)
#   STAGE=lm COPY_RUN=swa1k LM=lm-swa bash scripts/copy_first.sh               # its text stage
#   STAGE=lm-eval LM=lm-swa NAME=swa-copy-lm-small LM_TASKS= bash scripts/copy_first.sh  # its perplexity
#
# The text and needle data together from the start (no copy stage), and its sliding window:
#   STAGE=lm COPY_RUN=scratch LM=lm-scratch bash scripts/copy_first.sh
#   STAGE=lm COPY_RUN=scratch LM=lm-scratch-swa LM_ARGS='--arch swa' bash scripts/copy_first.sh
#
# 2hop asking for the chain (the task's default since 2026-12-01), in one device call of 10 minutes:
#   STAGE=chain COPY_MIN=3 MIN=2.7 EVAL_END=550 bash scripts/copy_first.sh   # c4ka and ch4ka side by side
#   STAGE=chain CHAIN_RUNS=ch4ka COPY_MIN=2.4 MIN=4.6 EVAL_END=555 bash scripts/copy_first.sh   # ch4ka alone, longer
#
# Its baselines at equal tokens (sliding window and full attention through the same two stages, fixed steps):
#   STAGE=chain-base END=$(( $(date +%s) + 560 )) bash scripts/copy_first.sh   # swa and full side by side; rerun to resume
#   BASE_ARCHS=drt STAGE=chain-base ... # the DRT through the same command (thirty-third run)
#   CHAIN_SCHEDULE=cut STAGE=chain-base ...   # the baselines with the DRT's schedule (cosine over 6000, stopped)
#   BASE_ARCHS=swa CHAIN_SCHEDULE=cut STAGE=chain-base ...   # that sliding window alone (thirty-eighth run, read to 16M)
#   BASE_ARCHS=drt CHAIN_SCHEDULE=cut STAGE=chain-base ...   # drt-copy-ch4kb-small's schedule by steps (thirty-fourth run)
#   STAGE=edge-ft FT_FROM=runs/cb/export/copy-drt-ch4ka ...    # 1200 more steps, 10% of needles at token 0, and a control
#
# Single passkey to 16M from a needle stage at 16128 tokens (one device call; it flattened retrieval):
#   STAGE=long16k COPY_MIN=3 MIN=4.5 EVAL_END=560 bash scripts/copy_first.sh   # pk16ka and ch16ka side by side
#
# Toward 2hop (the paper reads it with two retrieval groups): the copy stage on the needle mixture,
#   STAGE=copy-2hop bash scripts/copy_first.sh     # upper_groups [2,2] (mix2g) and [4] (mix1g), side by side
#   STAGE=copy-eval COPY_RUN=mix2g COPY_NAME=drt-copy-mix2g-small COPY_TASKS=passkey,multikey,2hop bash scripts/copy_first.sh
#   STAGE=copy-2hop HOP_RUNS='mix2g4k mix1g4k' bash scripts/copy_first.sh   # 4032-token samples: ranking trained
#   STAGE=copy-2hop HOP_RUNS='p2g4k p1g4k' bash scripts/copy_first.sh       # the same, from plain1k's retrieval
#   STAGE=copy-2hop HOP_RUNS=p2g4kf bash scripts/copy_first.sh              # ... with its first group's retrieval frozen
#   STAGE=copy-2hop HOP_RUNS=p2g4ka bash scripts/copy_first.sh              # ... or with the loss on the answers only
#   STAGE=copy-2hop HOP_RUNS=pk4ka bash scripts/copy_first.sh; STAGE=copy-2hop HOP_RUNS=c2g4ka bash scripts/copy_first.sh  # passkey first
#   STAGE=copy-2hop HOP_RUNS='h2g4k h2g16k' bash scripts/copy_first.sh      # p2g4ka on 2hop-weighted data, 4032 / 16128 tokens
#   STAGE=copy-2hop HOP_RUNS=h2g4kl bash scripts/copy_first.sh              # ... with the 2hop question a chunk ahead (lead=1)
#   STAGE=copy-2hop HOP_RUNS=hw504 bash scripts/copy_first.sh; STAGE=copy-2hop HOP_RUNS=hw4kl bash scripts/copy_first.sh  # the hop in the window first
#   STAGE=copy-eval COPY_RUN=h2g4kl COPY_NAME=drt-copy-h2g4kl-small COPY_TASKS=passkey,multikey,2hop COPY_LONG=0 \
#     EVAL_ARGS='--hop-lead 1' bash scripts/copy_first.sh
#
# Knobs (environment): RUNS (runs/copy-first), DATA (data/debian-docs), MIN (minutes of training per
# call and run; 0 = no limit), COPY_RUN (plain1k: the copy run the later stages start from), LM (lm:
# the text stage's run name; COPY_RUN=scratch starts it from a fresh model: the text and needle data
# together from the start), LM_LR (1e-3) and LM_FREEZE (none: a `gca train --freeze` pattern for the
# text stage, e.g. LM=lm-frozen LM_FREEZE='^(embed|lower|encoder|retr_norms)\.' keeps retrieval as the
# copy stage left it), LM_LR_SCALE (none: a `gca train --lr-scale REGEX=FACTOR` for the text stage),
# LM_ARGS (none: more `gca train` arguments for the text stage, e.g. '--set tie_embeddings=false'),
# NAME (drt-copy-LM-small: the model's name in the evaluation rows), LM_TASKS
# (passkey,multikey,2hop: lm-eval's needle tasks; empty = perplexity only), COPY_NAME (drt-copy-small)
# and COPY_TASKS (passkey): copy-eval's model name and tasks, COPY_LONG (1; 0 = copy-eval stops after
# 4K-1M), LM_STEPS (2600) and COPY_STEPS (6000): the text and copy stages' lengths in steps, HOP_RUNS
# (mix2g mix1g: copy-2hop's runs; mix2g4k, mix1g4k: the same at 4032 tokens; p2g4k, p1g4k: those from plain1k; p2g4kf: p2g4k with plain1k's retrieval frozen; p2g4ka: p2g4k with the loss on answers only; pk4ka then c2g4ka: passkey answers first, then the mixture; h2g4k, h2g16k: p2g4ka on 2hop-weighted data; h2g4kl: with lead=1; hw504 then hw4kl: 2hop in the window first, then lead=1 at 4032 from HOP_FROM (hw504); hw504h, hw252: hw504 at lr 1e-3, 2hop 0.8, at 504 / 252 tokens; hwc, hw126: HOP_FROM (hw504h) continued at 504 / 189 tokens), EVAL_ARGS (none: more `gca eval tasks` arguments for copy-eval, e.g. '--hop-lead 1'; '--hop-answer end' for the 2hop form the runs before STAGE=chain were evaluated with) and EVAL_TAG (none: a suffix for copy-eval's output folder), DEVICE (auto), DTYPE (bfloat16, evaluation).
#
# Timing on one H200 (torch 2.11, Triton 3.6, --compile): the three copy runs side by side ~395K
# tokens/s each (6000 steps in 10 minutes); the text stage ~8 steps/s alone (2600 steps of 16 x 4032
# tokens in ~5.6 minutes); evaluation of 4K-1M at 20 trials ~1 minute, 20 trials at 4M ~4 minutes,
# ~75 s per 16M-token trial (the chunk memory of 16M tokens, ~100 GB, on the GPU; 17.8-20.8 s a trial, one process
# alone, in the thirty-sixth run: results/repro-copy-first/chain-base/eval/drt-ch4ke-r36-edge-*-16m*_tasks.json).
set -euo pipefail
STAGE=${STAGE:?set STAGE=copy, copy-swa, copy-eval, lm, lm-eval, needles, chain, chain-base, edge-ft or long16k}
RUNS=${RUNS:-runs/copy-first}
DATA=${DATA:-data/debian-docs}
MIN=${MIN:-0}
COPY_RUN=${COPY_RUN:-plain1k}
LM=${LM:-lm}
LM_STEPS=${LM_STEPS:-2600}
COPY_STEPS=${COPY_STEPS:-6000}
COPY_LONG=${COPY_LONG:-1}
HOP_RUNS=${HOP_RUNS:-mix2g mix1g}
LM_LR=${LM_LR:-1e-3}
LM_FREEZE=${LM_FREEZE:-}
LM_LR_SCALE=${LM_LR_SCALE:-}
LM_ARGS=${LM_ARGS:-}
NAME=${NAME:-drt-copy-$LM-small}
COPY_NAME=${COPY_NAME:-drt-copy-small}
COPY_TASKS=${COPY_TASKS:-passkey}
LM_TASKS=${LM_TASKS-passkey,multikey,2hop}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-bfloat16}
EVAL_ARGS=${EVAL_ARGS:-}
gca() { python -m gca.cli "$@"; }
mkdir -p "$RUNS"

# The copy stage's data: passkey samples over corpus text, loss only on the answer and on filler pieces
# (8-24 tokens, 60% of the filler) repeated from >= 600 tokens back (beyond the 512-position window),
# with runs of digits in the filler so that copying digit strings is practised on every sample.
COPY_DATA="synthetic:passkey;filler=$DATA;loss=answer_repeats;repeat=1.0;repeat_gap=600;repeat_frac=0.6;digits=0.08"
# centred retrieval key and memory (keep retrieval selective), softmax-off-by-one
FORM="--set gca_softmax_one=true --set retrieval_key=centered --set center_memory=true"
# the text stage: the baselines' pre-training stream (corpus text; corpus text with repeats from
# >= 600 back, loss on every token; results/README.md's second run) as 8 of 16 rows a step, and the
# needle mixture (passkey / multikey / 2hop over corpus text, loss on answers and far repeats) as the other 8
# (hop=end: these stages' 2hop asked for the end point Z alone, the task's form before 2026-12-01)
LM_DATA="$DATA@0.25+synthetic:passkey;filler=$DATA;loss=all;repeat=1.0;repeat_gap=600@0.25+synthetic:mix;filler=$DATA;loss=answer_repeats;repeat=1.0;repeat_gap=600;repeat_frac=0.6;digits=0.08;hop=end@0.5"
NEEDLE_DATA="synthetic:mix;filler=$DATA;loss=answer_repeats;repeat=1.0;repeat_gap=600;repeat_frac=0.6;digits=0.08;hop=end"
# the needle tasks weighted to 2hop, loss on the answers only (h2g4k, h2g16k)
HOP_DATA="synthetic:passkey=0.2,multikey=0.2,2hop=0.6;filler=$DATA;loss=answer;repeat=1.0;repeat_gap=600;repeat_frac=0.6;digits=0.08;hop=end"
HOP_DATA_HI="synthetic:passkey=0.1,multikey=0.1,2hop=0.8;filler=$DATA;loss=answer;repeat=1.0;repeat_gap=600;repeat_frac=0.6;digits=0.08;hop=end"
# 2hop asking for the chain "Y , Z" (SPEC.md, the published task; the default since 2026-12-01): the needle
# mixture and its 2hop-weighted form, loss on the answers only (STAGE=chain)
CHAIN_DATA="synthetic:mix;filler=$DATA;loss=answer;repeat=1.0;repeat_gap=600;repeat_frac=0.6;digits=0.08;hop=chain"
CHAIN_HOP_DATA="synthetic:passkey=0.2,multikey=0.2,2hop=0.6;filler=$DATA;loss=answer;repeat=1.0;repeat_gap=600;repeat_frac=0.6;digits=0.08;hop=chain"
common=(--preset small --save-every 250 --log-every 25 --eval-every 200 --eval-batches 4 --no-progress
        --compile --device "$DEVICE" --time-limit "$MIN")

copy_run() {  # name seq_len batch residual [arch [data [more gca train args]]]
  local name=$1 seq=$2 batch=$3 residual=$4 arch=${5:-drt} data=${6:-$COPY_DATA} archarg=(); shift $(( $# < 6 ? $# : 6 ))
  [ "$arch" = drt ] || archarg=(--arch "$arch")  # (the fifth run's copy runs were started without --arch)
  gca train "${common[@]}" --seq-len "$seq" --batch-size "$batch" --data "$data" --lr 1e-3 --seed 11 $FORM \
    --set residual="$residual" "${archarg[@]}" --max-steps "$COPY_STEPS" --out "$RUNS/copy-$name" "$@" >> "$RUNS/copy-$name.log" 2>&1
  tail -n 1 "$RUNS/copy-$name.log"
}
export_once() {  # run -> its bf16 export (what the later stages start from and the evaluation reads, as in the run)
  [ -f "$RUNS/export/$1/model.safetensors" ] || python -c "from gca.train import export_model; export_model('$RUNS/$1', '$RUNS/export/$1')" >&2
  echo "$RUNS/export/$1"
}
tasks() {  # ckpt name out seed lengths [more eval args]
  local ckpt=$1 name=$2 out=$3 seed=$4 lengths=$5; shift 5
  gca eval tasks --ckpt "$ckpt" --lengths "$lengths" --depths 5 --filler "$DATA" --dtype "$DTYPE" --device "$DEVICE" \
    --seed "$seed" --name "$name" --out "$out" "$@"
}

tasks_until() {  # END (seconds since the epoch), then tasks's arguments: tasks, stopped at END (skipped once it has passed)
  local end=$1 left; shift
  left=$(( end - $(date +%s) ))
  if [ "$left" -le 0 ]; then echo "no time left for $3" >&2; return 0; fi
  timeout "$left" bash -c "$(declare -f tasks gca); $(declare -p DATA DTYPE DEVICE); tasks \"\$@\"" tasks "$@" || true
}

from_plain1k() {  # RUNS KNOWN LAUNCH EVALUATE: the passkey copy stage (plain1k, COPY_MIN minutes); then
  # `LAUNCH run plain1k-export` for every run side by side; then, until EVAL_END seconds after the start,
  # `EVALUATE run export END` for every run side by side, each from a fresh export (a rerun resumes a run,
  # and an earlier export would be stale: the twelfth run's second call evaluated its first call's that way)
  local runs=$1 known=$2 launch=$3 evaluate=$4 t0 p1 end r
  for r in $runs; do
    [[ " $known " == *" $r "* ]] || { echo "unknown run $r (known: $known)" >&2; exit 2; }
  done
  t0=$(date +%s)
  copy_run plain1k 1008 32 plain drt "$COPY_DATA" --time-limit "${COPY_MIN:-3}"
  p1=$(export_once copy-plain1k)
  for r in $runs; do "$launch" "$r" "$p1" & done
  wait
  end=$(( t0 + ${EVAL_END:-580} ))
  echo "evaluation: $(( end - $(date +%s) ))s left"
  for r in $runs; do
    rm -rf "$RUNS/export/copy-$r"
    ( "$evaluate" "$r" "$(export_once "copy-$r")" "$end" ) &
  done
  wait
}

lm_init() {  # the text stage's start: the copy run's export, or (COPY_RUN=scratch) a fresh model of the copy stage's form
  if [ "$COPY_RUN" = scratch ]; then echo "$FORM --set residual=plain"; else echo "--init-from $(export_once "copy-$COPY_RUN")"; fi
}

case "$STAGE" in
  copy)
    copy_run plain1k 1008 32 plain &
    copy_run plain2k 2016 16 plain &
    copy_run pub1k 1008 32 published &
    wait ;;
  copy-swa)
    copy_run swa1k 1008 32 plain swa ;;
  copy-2hop)  # the copy stage on the needle mixture (passkey / multikey / 2hop): two retrieval groups, and one
    # mix2g / mix1g: 1008-token samples (about 8 chunks beyond the window: top_k 8 retrieves them all,
    # so ranking is never trained; results/README.md, seventh run); the 4k forms: 4032 tokens, 8 rows
    for r in $HOP_RUNS; do
      case $r in
        mix2g) copy_run mix2g 1008 32 plain drt "$NEEDLE_DATA" --set "upper_groups=[2,2]" & ;;
        mix1g) copy_run mix1g 1008 32 plain drt "$NEEDLE_DATA" & ;;
        mix2g4k) copy_run mix2g4k 4032 8 plain drt "$NEEDLE_DATA" --set "upper_groups=[2,2]" & ;;
        mix1g4k) copy_run mix1g4k 4032 8 plain drt "$NEEDLE_DATA" & ;;
        # p2g4k / p1g4k: from the passkey copy run (plain1k, whose retrieval ranks a passkey needle first), its
        # four upper layers regrouped as [2,2] (each keeps its weights) or kept as [4]; 4032 tokens, lr 5e-4
        p2g4k) copy_run p2g4k 4032 8 plain drt "$NEEDLE_DATA" --init-from "$(export_once copy-plain1k)" --lr 5e-4 --set "upper_groups=[2,2]" & ;;
        p1g4k) copy_run p1g4k 4032 8 plain drt "$NEEDLE_DATA" --init-from "$(export_once copy-plain1k)" --lr 5e-4 & ;;
        # p2g4kf: p2g4k with the first group's retrieval path frozen as plain1k left it (p2g4k's and p1g4k's
        # retrieval scores went flat within 200 steps); the second group's query norm and the upper layers train
        p2g4kf) copy_run p2g4kf 4032 8 plain drt "$NEEDLE_DATA" --init-from "$(export_once copy-plain1k)" --lr 5e-4 \
                  --set "upper_groups=[2,2]" --freeze '^(embed|lower|encoder|retr_norms\.0)\.' & ;;
        # p2g4ka: p2g4k with the loss on the answers only: at 4032 tokens the far repeats' loss is what flattens
        # retrieval (results/README.md, eighth run, CPU check)
        p2g4ka) copy_run p2g4ka 4032 8 plain drt "${NEEDLE_DATA/loss=answer_repeats/loss=answer}" --init-from "$(export_once copy-plain1k)" \
                  --lr 5e-4 --set "upper_groups=[2,2]" & ;;
        # pk4ka then c2g4ka (run one after the other): plain1k on its passkey data at 4032 tokens with the loss on
        # the answers only, which sharpens the needle's ranking (CPU check); then the mixture, answers only, as [2,2]
        pk4ka) copy_run pk4ka 4032 8 plain drt "${COPY_DATA/loss=answer_repeats/loss=answer}" --init-from "$(export_once copy-plain1k)" \
                 --lr 5e-4 & ;;
        c2g4ka) copy_run c2g4ka 4032 8 plain drt "${NEEDLE_DATA/loss=answer_repeats/loss=answer}" --init-from "$(export_once copy-pk4ka)" \
                  --lr 5e-4 --set "upper_groups=[2,2]" & ;;
        # h2g4k / h2g16k: p2g4ka continued on a mixture weighted to 2hop (0.6; passkey and multikey 0.2 each),
        # loss on the answers only, lr 3e-4: at 4032 tokens (64 chunks, 8 rows) or at 16128 (256 chunks, 2 rows),
        # where the chain's first needle must be ranked into the top 8 among 4x as many chunks (ninth run: the
        # retrieval hit of 2hop fell from 80% at 4K to 0-20% from 64K on)
        h2g4k) copy_run h2g4k 4032 8 plain drt "$HOP_DATA" --init-from "$(export_once copy-p2g4ka)" --lr 3e-4 --set "upper_groups=[2,2]" & ;;
        h2g16k) copy_run h2g16k 16128 2 plain drt "$HOP_DATA" --init-from "$(export_once copy-p2g4ka)" --lr 3e-4 --set "upper_groups=[2,2]" & ;;
        # h2g4kl: h2g4k with the 2hop question asked so that its X ends a whole chunk before the answer's
        # retrieval (lead=1): the first group can fetch X -> Y one landmark before the second group needs Y
        h2g4kl) copy_run h2g4kl 4032 8 plain drt "$HOP_DATA;lead=1" --init-from "$(export_once copy-p2g4ka)" --lr 3e-4 --set "upper_groups=[2,2]" & ;;
        # hw504 then hw4kl (one after the other; not run yet): a curriculum for the hop itself. p2g4ka answers 2hop
        # at chance even with every needle inside the window (results/README.md, tenth run, CPU check), so first
        # the 2hop-weighted data at 504 tokens, where the hop is made by attention alone (batch 64), then at
        # 4032 tokens with the question a chunk ahead (lead=1), from hw504
        hw504) copy_run hw504 504 64 plain drt "$HOP_DATA" --init-from "$(export_once copy-p2g4ka)" --lr 3e-4 --set "upper_groups=[2,2]" & ;;
        # hw504h: hw504 at lr 1e-3 with 2hop at 0.8 of the samples; hw252: the same at 252 tokens (4 chunks), batch 128
        hw504h) copy_run hw504h 504 64 plain drt "$HOP_DATA_HI" --init-from "$(export_once copy-p2g4ka)" --lr 1e-3 --set "upper_groups=[2,2]" & ;;
        hw252) copy_run hw252 252 128 plain drt "$HOP_DATA_HI" --init-from "$(export_once copy-p2g4ka)" --lr 1e-3 --set "upper_groups=[2,2]" & ;;
        # hwc, hw189: HOP_FROM (hw504h) continued at 504 tokens (batch 64), and at 189 tokens (3 chunks, batch 176)
        hwc) copy_run hwc 504 64 plain drt "$HOP_DATA_HI" --init-from "$(export_once "copy-${HOP_FROM:-hw504h}")" --lr 1e-3 --set "upper_groups=[2,2]" & ;;
        hw189) copy_run hw189 189 176 plain drt "$HOP_DATA_HI" --init-from "$(export_once "copy-${HOP_FROM:-hw504h}")" --lr 1e-3 --set "upper_groups=[2,2]" & ;;
        hw4kl) copy_run hw4kl 4032 8 plain drt "$HOP_DATA;lead=1" --init-from "$(export_once "copy-${HOP_FROM:-hw504}")" --lr 3e-4 --set "upper_groups=[2,2]" & ;;
        *) echo "unknown HOP_RUNS entry $r (mix2g, mix1g, mix2g4k, mix1g4k, p2g4k, p1g4k, p2g4kf, p2g4ka, pk4ka, c2g4ka, h2g4k, h2g16k, h2g4kl, hw504, hw504h, hw252, hwc, hw126, hw4kl)" >&2; exit 2 ;;
      esac
    done
    wait ;;
  chain)  # one device call: the passkey copy stage (plain1k, COPY_MIN minutes), then from its export the
    # two-group copy stage on the needle mixture with 2hop asking for the chain (c4ka: the mixture, p2g4ka's
    # recipe; ch4ka: weighted to 2hop) side by side for MIN minutes, then both evaluated (2hop 4K-1M first,
    # then passkey and multikey at 4K and 1M) until EVAL_END seconds after the stage started. A rerun resumes
    # every run; the needle stages start from plain1k's first export (a resumed plain1k is not re-exported)
    chain_run() {  # run plain1k's export
      case $1 in
        c4ka) copy_run c4ka 4032 8 plain drt "$CHAIN_DATA" --init-from "$2" --lr 5e-4 --set "upper_groups=[2,2]" ;;
        ch4ka) copy_run ch4ka 4032 8 plain drt "$CHAIN_HOP_DATA" --init-from "$2" --lr 5e-4 --set "upper_groups=[2,2]" ;;
      esac
    }
    chain_eval() {  # run export END
      tasks_until "$3" "$2" "drt-copy-$1-small" "$RUNS/eval/copy-$1" 9301 4K,16K,64K,256K,1M --tasks 2hop --trials 4
      tasks_until "$3" "$2" "drt-copy-$1-small" "$RUNS/eval/copy-$1-pm" 9302 4K,1M --tasks passkey,multikey --trials 4
    }
    from_plain1k "${CHAIN_RUNS:-c4ka ch4ka}" "c4ka ch4ka" chain_run chain_eval ;;
  chain-base)  # the baselines of the thirtieth run's drt-copy-ch4kb-small at equal tokens: each arch of BASE_ARCHS
    # (swa full; drt: that DRT's recipe again, by this command) through the same two stages, side by side: the
    # passkey copy stage (1008 tokens, 32 rows) for PLAIN_STEPS (1483, plain1k's steps in that run), then from its
    # export the 2hop-weighted chain mixture (4032 tokens, 8 rows, loss on the answers only, lr 5e-4) for
    # CHAIN_STEPS (3724, ch4ka's); fixed step counts, not minutes, so the tokens equal the DRT's. MIN bounds each
    # training process, END (seconds since the epoch, optional) the whole call; a rerun resumes, and the second
    # stage waits until the first has reached its steps
    PLAIN_STEPS=${PLAIN_STEPS:-1483}
    CHAIN_STEPS=${CHAIN_STEPS:-3724}
    limit() {  # --time-limit for a process started now: MIN, cut to what is left before END
      if [ -n "${END:-}" ]; then python -c "import time; print(max(0.5, round(min(${MIN} or 1e9, ($END - time.time()) / 60), 2)))"
      else echo "$MIN"; fi
    }
    reached() {  # log steps: the run's last "done: step N" line says N >= steps
      local n; n=$(grep -o 'done: step [0-9]*' "$1" 2>/dev/null | tail -n 1 | grep -o '[0-9]*$' || true)
      [ -n "$n" ] && [ "$n" -ge "$2" ]
    }
    # CHAIN_SCHEDULE=cut: each stage's cosine laid out over 6000 steps and stopped at its step count (--stop-at), the
    # schedule the thirtieth run's DRT had (its stages were stopped there by their time limits); the default (end)
    # runs each stage's cosine to its end at its step count
    plain_steps=$PLAIN_STEPS chain_steps=$CHAIN_STEPS cut1=() cut2=()
    if [ "${CHAIN_SCHEDULE:-end}" = cut ]; then
      plain_steps=6000 chain_steps=6000 cut1=(--stop-at "$PLAIN_STEPS") cut2=(--stop-at "$CHAIN_STEPS")
    fi
    base_run() {  # arch
      local a=$1
      reached "$RUNS/copy-${a}1kc.log" "$PLAIN_STEPS" || COPY_STEPS=$plain_steps copy_run "${a}1kc" 1008 32 plain "$a" "$COPY_DATA" \
        "${cut1[@]}" --time-limit "$(limit)"
      reached "$RUNS/copy-${a}1kc.log" "$PLAIN_STEPS" || { echo "${a}1kc stopped before step $PLAIN_STEPS: rerun to resume"; return 0; }
      local groups=(); [ "$a" = drt ] && groups=(--set "upper_groups=[2,2]")  # as ch4ka's DRT (chain_run)
      reached "$RUNS/copy-${a}-ch4ka.log" "$CHAIN_STEPS" || COPY_STEPS=$chain_steps copy_run "${a}-ch4ka" 4032 8 plain "$a" \
        "$CHAIN_HOP_DATA" --init-from "$(export_once "copy-${a}1kc")" --lr 5e-4 "${groups[@]}" "${cut2[@]}" --time-limit "$(limit)"
      reached "$RUNS/copy-${a}-ch4ka.log" "$CHAIN_STEPS" && export_once "copy-${a}-ch4ka" >/dev/null
    }
    for a in ${BASE_ARCHS:-swa full}; do
      case $a in swa|full|drt) base_run "$a" & ;; *) echo "unknown BASE_ARCHS entry $a (swa, full, drt)" >&2; exit 2 ;; esac
    done
    wait ;;
  edge-ft)  # the thirty-sixth run: a trained chain-recipe DRT (FT_FROM, an export; the thirty-fifth run's
    # drt-copy-ch4ke-small) fine-tuned FT_STEPS (1200) more steps on its own 2hop-weighted chain mixture at lr 2e-4
    # (its stage ended near 2.3e-4), side by side: `edge` with a share EDGE (0.1) of the samples starting with
    # their first target needle (at token 0, which the uniform depths give once in ~4000 samples) and `ctl`
    # without, the same seed (FT_SEED, 12) and so the same batches otherwise: runs edge-sSEED and ctl-sSEED, each
    # exported to RUNS/export/
    FT_FROM=${FT_FROM:?set FT_FROM to the export to fine-tune, e.g. runs/cb/export/copy-drt-ch4ka}
    ft_run() {  # name data
      [ -f "$RUNS/export/$1/model.safetensors" ] && return 0
      gca train --init-from "$FT_FROM" --data "$2" --seq-len 4032 --batch-size 8 --lr 2e-4 --max-steps "${FT_STEPS:-1200}" \
        --seed "${FT_SEED:-12}" --save-every 300 --log-every 25 --eval-every 300 --eval-batches 4 --no-progress --compile \
        --device "$DEVICE" --time-limit "$MIN" --out "$RUNS/$1" >> "$RUNS/$1.log" 2>&1
      tail -n 1 "$RUNS/$1.log"
      grep -q "done: step ${FT_STEPS:-1200}," "$RUNS/$1.log" && export_once "$1" >/dev/null
    }
    ft_run "edge-s${FT_SEED:-12}" "$CHAIN_HOP_DATA;edge=${EDGE:-0.1}" &
    ft_run "ctl-s${FT_SEED:-12}" "$CHAIN_HOP_DATA" &
    wait ;;
  long16k)  # one device call: the passkey copy stage (plain1k, COPY_MIN minutes), then from its export two
    # needle stages at 16128 tokens (252 chunks a sample to rank the needle among, 4x the 4032 of every
    # earlier needle stage; 2 rows a step), loss on the answers only, lr 5e-4, side by side for MIN minutes:
    # pk16ka (passkey data, plain1k's one retrieval group) and ch16ka (ch4ka's 2hop-weighted chain mixture,
    # groups [2,2]); then each read on a selection seed (9401: passkey at 4K, 64K and 1M, 10 trials each;
    # 2hop at 4K and 64K for ch16ka) until EVAL_END seconds after the stage started (neither run was
    # better than ch4ka there, so neither was read on fresh seeds; results/README.md, thirteenth run)
    long_run() {  # run plain1k's export
      case $1 in
        pk16ka) copy_run pk16ka 16128 2 plain drt "${COPY_DATA/loss=answer_repeats/loss=answer}" --init-from "$2" --lr 5e-4 ;;
        ch16ka) copy_run ch16ka 16128 2 plain drt "$CHAIN_HOP_DATA" --init-from "$2" --lr 5e-4 --set "upper_groups=[2,2]" ;;
      esac
    }
    long_eval() {  # run export END
      tasks_until "$3" "$2" "drt-copy-$1-small" "$RUNS/eval/select-$1" 9401 4K,64K,1M --tasks passkey --trials 2
      if [ "$1" = ch16ka ]; then
        tasks_until "$3" "$2" "drt-copy-$1-small" "$RUNS/eval/select-$1-2hop" 9401 4K,64K --tasks 2hop --trials 2
      fi
    }
    from_plain1k "${LONG_RUNS:-pk16ka ch16ka}" "pk16ka ch16ka" long_run long_eval ;;
  copy-eval)
    C=$(export_once "copy-$COPY_RUN")
    tasks "$C" "$COPY_NAME" "$RUNS/eval/copy-$COPY_RUN${EVAL_TAG:-}" 9001 4K,16K,64K,256K,1M --tasks "$COPY_TASKS" --trials 4 $EVAL_ARGS
    [ "$COPY_LONG" = 1 ] || { echo "done: STAGE=$STAGE (4K-1M; COPY_LONG=0)"; exit 0; }
    tasks "$C" "$COPY_NAME" "$RUNS/eval/copy-$COPY_RUN-4M" 9002 4M --tasks passkey --trials 4 --batch-size 4
    gca eval tasks --ckpt "$C" --tasks passkey --lengths 16M --depths 2 --trials 1 --batch-size 1 --filler "$DATA" \
      --dtype "$DTYPE" --device "$DEVICE" --seed 9003 --name "$COPY_NAME" --out "$RUNS/eval/copy-$COPY_RUN-16M"
    python scripts/needle_attention.py --ckpt "$C" --data "$DATA" --task passkey --length 4096 --depth 0.5 --trials 8 \
      --out "$RUNS/eval/copy_needle_attention.json" ;;
  lm)
    gca train "${common[@]}" --seq-len 4032 --batch-size 16 --data "$LM_DATA" --lr "$LM_LR" --seed 12 \
      $(lm_init) --max-steps "$LM_STEPS" --out "$RUNS/$LM" ${LM_FREEZE:+--freeze "$LM_FREEZE"} \
      ${LM_LR_SCALE:+--lr-scale "$LM_LR_SCALE"} $LM_ARGS >> "$RUNS/$LM.log" 2>&1
    tail -n 1 "$RUNS/$LM.log" ;;
  lm-eval)
    gca eval ppl --ckpt "$RUNS/$LM" --data "$DATA" --lengths 1x,4x,16x,64x --windows 4 --dtype "$DTYPE" \
      --device "$DEVICE" --name "$NAME" --out "$RUNS/eval/$LM-ppl"
    [ -z "$LM_TASKS" ] || tasks "$RUNS/$LM" "$NAME" "$RUNS/eval/$LM-tasks" 9101 4K,16K,64K,256K,1M --tasks "$LM_TASKS" --trials 4 ;;
  needles)
    gca train "${common[@]}" --seq-len 4032 --batch-size 16 --data "$NEEDLE_DATA" --lr 5e-4 --seed 13 \
      --init-from "$(export_once "$LM")" --max-steps 1500 --eval-every 100 --out "$RUNS/lmneedle" >> "$RUNS/lmneedle.log" 2>&1
    tail -n 1 "$RUNS/lmneedle.log"
    gca eval ppl --ckpt "$RUNS/lmneedle" --data "$DATA" --lengths 1x,4x,16x,64x --windows 4 --dtype "$DTYPE" \
      --device "$DEVICE" --name drt-copy-lm-needles-small --out "$RUNS/eval/lmneedle-ppl"
    tasks "$RUNS/lmneedle" drt-copy-lm-needles-small "$RUNS/eval/lmneedle-tasks" 9201 4K,16K,64K \
      --tasks passkey,multikey,2hop --trials 2 ;;
  *) echo "unknown STAGE=$STAGE" >&2; exit 2 ;;
esac
echo "done: STAGE=$STAGE"
