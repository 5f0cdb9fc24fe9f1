#!/usr/bin/env bash
# Reproduce the paper's comparison on one GPU, in calls of about 10 minutes: DRT and the two baselines
# of the same width and depth (sliding window only, full attention) pre-trained at equal tokens on the
# offline Debian-docs corpus, then fine-tuned on a needle mixture, then evaluated. Every stage resumes
# where it stopped: rerun the same STAGE until it reports "done", then go to the next.
#
#   make corpus && make data                    # data/debian-docs: 21.9M train / 2.5M val tokens
#   STAGE=pretrain bash scripts/reproduce.sh    # repeat until all three runs reach STEPS
#   STAGE=pretrain SEEDS='1 2' bash scripts/reproduce.sh   # ARCHS x SEEDS side by side, as RUNS/ARCH-sSEED
#   STAGE=needles  bash scripts/reproduce.sh    # repeat until all three reach FT_STEPS
#   STAGE=eval     bash scripts/reproduce.sh    # perplexity and needle tasks -> results/*.json
#   STAGE=eval-long bash scripts/reproduce.sh   # DRT alone at LENGTHS_LONG (TRIALS_LONG per depth)
#   STAGE=ppl-fixed bash scripts/reproduce.sh   # perplexity of the pre-trained models on the same text at
#                                               # every length (--targets 1x, PPL_WINDOWS end points)
#   STAGE=distract bash scripts/reproduce.sh    # RUN_NAMES (pre-trained DRTs) continued DIS_STEPS steps with
#                                               # retrieval distractors (NAME-dis) and without (NAME-ctl);
#                                               # a swa*/full* run: NAME-ctl alone (equal tokens)
#   STAGE=seeds-stage SEEDS='9 10' bash scripts/reproduce.sh  # pretrain, distract, ppl-fixed, copy-stats for
#                                               # ARCHS x SEEDS (each step skipped once done; rerun after a time limit)
#   STAGE=copy-stats SEEDS='9 10' bash scripts/reproduce.sh   # after the stage: loss by copy distance and
#                                               # retrieval hits on far copies (COPY_STATS=0: seeds-stage skips it)
#   DRT_EXTRA='--set retrieval_copy_loss=0.1' ARCHS=drt NAME_TAG=-aux STAGE=seeds-stage SEEDS='5 6' bash ...
#                                               # DRTs with the auxiliary retrieval copy loss (the stage's runs
#                                               # keep it: --init-from carries the config)
#   STAGE=diagnose bash scripts/reproduce.sh    # DRT: needle retrieved? read? (scripts/needle_attention.py)
#   STAGE=export   bash scripts/reproduce.sh    # bf16 weights of every run in RUNS/export/ (36 MB each
#                                               # for the small preset): the later stages start from
#                                               # them when a run folder is not there
#
# Knobs (environment): RUNS (runs/repro), DATA (data/debian-docs), PRE_DATA (the pre-training data of
# all three, below), PRESET (small), SEQ (4032 = 64 chunks of 63), BATCH (8), STEPS (2600 = 84M tokens
# each), FT_STEPS (3400), LR (2e-3, pre-training) and DRT_LR (DRT's pre-training lr, default LR),
# MIN (8.5 minutes of training per call and run), LENGTHS_PPL (1x,4x,16x,64x), TASKS_drt /
# TASKS_swa / TASKS_full (the context lengths each model is tested at: full attention keeps every key
# and costs n^2, so it stops earlier), LENGTHS_LONG and TRIALS_LONG (eval-long), TRIALS (4 per depth
# x 5 depths = 20 per length), BATCH_LONG (1: trials streamed together in eval-long), ARCHS (drt swa
# full), NEEDLE_TASKS / REPEAT_GAP / DIGITS (the task half of the needle mixture, below), DRT_SET
# (DRT's --set options in pre-training), DRT_EXTRA (more of them, after DRT_SET), DEVICE (auto), DTYPE (bfloat16, for
# evaluation), RESULTS (results: where ppl.json and passkey.json are merged), SEEDS (pretrain: seeds, each
# arch once per seed; default one run per arch, seed 1), PPL_WINDOWS (16), PPL_LIMIT (600 s), PPL_JOBS (8), RUN_NAMES (the runs
# ppl-fixed scores, default ARCHS; the pre-trained DRTs distract continues, default drt), NAME_TAG (ppl-fixed; none:
# inserted before -PRESET in the model names); DIS_STEPS (400), DIS_LR (1e-4, constant) and DIS_SEED (17: the data
# order, the same for both arms) for distract; LENGTHS_COPY (1x,64x), COPY_STATS (1) and COPY_ORACLE (1) for copy-stats.
#
# Timing on one H200 with the three models side by side: pre-training ~122 ms a step (2600 steps in
# 5.3 minutes; ~169 ms with a fourth, DRT, run beside them), needle fine-tuning ~126 ms (3400 in 7.1
# minutes); evaluation ~4.3 minutes, plus eval-long (~18 s per 4M-token trial, ~80 s per 16M-token
# trial with the memory offloaded).
#
# Each training stage copies its runs' log.jsonl to RUNS/NAME.jsonl, so `tar czf logs.tgz RUNS/*.log
# RUNS/*.jsonl RUNS/eval` holds every small result of a sitting. On a machine that keeps nothing between
# calls, RUNS must travel back and forth: a run folder holds the fp32 weights and the AdamW state (12
# bytes a parameter), 220 MB for the small preset. Where
# transfers are limited, size STEPS so that pre-training ends within one sitting, then STAGE=export
# and carry only RUNS/export to the next sitting (fine-tuning starts a fresh optimizer anyway).
set -euo pipefail
shopt -s inherit_errexit
STAGE=${STAGE:?set STAGE=pretrain, needles, eval, ppl-fixed, distract, seeds-stage, eval-long, diagnose or export}
RUNS=${RUNS:-runs/repro}
DATA=${DATA:-data/debian-docs}
PRESET=${PRESET:-small}
SEQ=${SEQ:-4032}
BATCH=${BATCH:-8}
STEPS=${STEPS:-2600}
FT_STEPS=${FT_STEPS:-3400}
MIN=${MIN:-8.5}
# DRT's pre-training form, as results/ppl.json's drt-small was trained: the published residual (GCA
# reaches the stream through the MLP), softmax-off-by-one on, and the landmark's memory slot zeroed, as
# the published code has them (benchmarks/drt_ablation.sh measured the first two ahead of the plain
# form on this corpus). results/README.md's drt-keep-small is the same with landmark_memory=keep.
DRT_SET=${DRT_SET---set residual=published --set gca_softmax_one=true --set landmark_memory=zero}
LR=${LR:-2e-3}
DRT_LR=${DRT_LR:-$LR}
ARCHS=${ARCHS:-drt swa full}
# pre-training data of all three models: half corpus text, half corpus text with pieces repeated from
# >= 600 tokens back (beyond the window; loss on every token). PRE_DATA=$DATA pre-trains on the corpus
# alone, as the first corpus run did (results/README.md).
PRE_DATA=${PRE_DATA:-$DATA@0.5+synthetic:passkey;filler=$DATA;loss=all;repeat=1.0;repeat_gap=600@0.5}
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
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=${TQDM_DISABLE:-1}
gca() { python -m gca.cli "$@"; }
common=(--preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --time-limit "$MIN" --save-every 250
        --log-every 25 --eval-every 250 --eval-batches 8 --no-progress --device "$DEVICE")
# needle mixture: half corpus text (keeps the language model), half tasks over corpus filler. The loss is
# on the answer and on filler pieces repeated from >= REPEAT_GAP tokens back (beyond the 512-token
# window: only retrieval can copy them; ~1100 supervised tokens a sample instead of the answer's 5),
# with digit runs in the filler (DIGITS) so that copying digit strings is practised: the signal the
# shipped tiny passkey model needed (results/demo-checkpoint/README.md). NEEDLE_TASKS="...;loss=answer"
# gives the answer-only mixture of the first corpus run. 2hop asks for the chain "Y , Z" (the default since
# 2026-12-01); the runs before that asked for the end point: NEEDLE_TASKS="...;hop=end" and
# `gca eval tasks ... --hop-answer end` give their form.
REPEAT_GAP=${REPEAT_GAP:-600}
DIGITS=${DIGITS:-0.05}
NEEDLE_TASKS=${NEEDLE_TASKS:-synthetic:mix;filler=$DATA;loss=answer_repeats;repeat=1.0;repeat_gap=$REPEAT_GAP;digits=$DIGITS}
needles="$DATA@0.5+$NEEDLE_TASKS@0.5"

# keep_logs NAME...: each run's training log (RUNS/NAME/log.jsonl: loss, validation, val_gca_gain) copied
# beside its console log as RUNS/NAME.jsonl, so that `tar RUNS/*.log RUNS/*.jsonl RUNS/eval` carries every
# small result off a machine that keeps nothing, without the 220 MB run folders
keep_logs() { local n; for n in "$@"; do [ -f "$RUNS/$n/log.jsonl" ] && cp "$RUNS/$n/log.jsonl" "$RUNS/$n.jsonl"; done; true; }

# a run folder, or its exported bf16 weights when only those travelled
src() { if [ -d "$RUNS/$1/ckpt" ]; then echo "$RUNS/$1"; else echo "$RUNS/export/$1"; fi; }

# run_args STAGE ARCH: the arguments of ARCH's run in STAGE (pretrain from scratch; needles from its
# pre-trained run, with softmax-off-by-one off as the paper fine-tunes)
run_args() {
  case $1 in
    pretrain) echo --arch "$2" --data "$PRE_DATA" --lr "$( [ "$2" = drt ] && echo "$DRT_LR" || echo "$LR" )" --seed "${SEED:-1}" \
                $( [ "$2" = drt ] && echo "$DRT_SET ${DRT_EXTRA:-}" ) ;;
    # (retrieval distractors off: another sample's needle would answer the question as well as its own)
    needles) echo --init-from "$(src "$2")" --data "$needles" --lr 5e-4 --seed 2 --set gca_softmax_one=false \
                  --set retrieval_distractors=0 ;;
  esac
}

case $STAGE in
  pretrain)  # the three models side by side (one GPU is mostly idle with one small model); with SEEDS, every
    # arch from every seed, as RUNS/ARCH-sSEED: how far one pre-training is from another that differs only in
    # its seed (results/README.md, fourteenth run: two DRT runs apart by rounding alone ended 0.15 nats
    # apart); then, e.g., STAGE=ppl-fixed RUN_NAMES='drt-s1 drt-s2 swa-s1 swa-s2'
    names=()
    for a in $ARCHS; do
      for s in ${SEEDS:-1}; do
        n=$a${SEEDS:+-s$s}
        names+=("$n")
        # shellcheck disable=SC2046
        gca train "${common[@]}" $(SEED=$s run_args pretrain "$a") --max-steps "$STEPS" --out "$RUNS/$n" >> "$RUNS/$n.log" 2>&1 &
      done
    done
    wait
    keep_logs "${names[@]}"
    for n in "${names[@]}"; do tail -n 1 "$RUNS/$n.log"; done ;;
  needles)
    for a in $ARCHS; do
      # shellcheck disable=SC2046
      gca train "${common[@]}" $(run_args needles "$a") --max-steps "$FT_STEPS" --out "$RUNS/$a-needles" \
        >> "$RUNS/$a-needles.log" 2>&1 &
    done
    wait
    for a in $ARCHS; do keep_logs "$a-needles"; tail -n 1 "$RUNS/$a-needles.log"; done ;;
  eval)  # the three models side by side; a test stopped early keeps the rows it finished
    mkdir -p "$RUNS/eval"
    for a in $ARCHS; do
      lengths=TASKS_$a
      {
        gca eval ppl --ckpt "$(src "$a")" --data "$DATA" --lengths "$LENGTHS_PPL" --windows 4 --device "$DEVICE" \
          --dtype "$DTYPE" --name "$a-$PRESET" --out "$RUNS/eval/$a-ppl" || echo "$a: ppl failed"
        gca eval tasks --ckpt "$(src "$a-needles")" --tasks passkey,multikey,2hop --lengths "${!lengths}" --depths 5 \
          --trials "$TRIALS" --filler "$DATA" --device "$DEVICE" --dtype "$DTYPE" --name "$a-$PRESET" \
          --out "$RUNS/eval/$a-tasks-main" || echo "$a: tasks failed"
      } > "$RUNS/eval/$a.log" 2>&1 &
    done
    wait
    for a in $ARCHS; do tail -n 30 "$RUNS/eval/$a.log"; done
    python scripts/collect_results.py --runs "$RUNS" --data "$DATA" --out "$RESULTS" ;;
  ppl-fixed)  # the pre-trained models' (RUN_NAMES, default ARCHS) perplexity on the same text at every length: PPL_WINDOWS fixed end
    # points, the last training length of tokens before each scored, only the context before them growing
    # (gca eval ppl --targets 1x); side by side, PPL_JOBS (8) at a time (twelve small DRTs at once ran out of an H200's
    # memory at 64x), each stopped PPL_LIMIT seconds after it starts
    mkdir -p "$RUNS/eval"
    for a in ${RUN_NAMES:-$ARCHS}; do
      while [ "$(jobs -rp | wc -l)" -ge "${PPL_JOBS:-8}" ]; do wait -n || true; done
      timeout "${PPL_LIMIT:-600}" python -m gca.cli eval ppl --ckpt "$(src "$a")" --data "$DATA" --lengths "$LENGTHS_PPL" \
        --windows "${PPL_WINDOWS:-16}" --targets 1x --device "$DEVICE" --dtype "$DTYPE" --name "$a${NAME_TAG:-}-$PRESET" \
        --out "$RUNS/eval/$a-ppl-fixed" > "$RUNS/eval/$a-ppl-fixed.log" 2>&1 || echo "$a: ppl stopped or failed" &
    done
    wait
    for a in ${RUN_NAMES:-$ARCHS}; do tail -n 8 "$RUNS/eval/$a-ppl-fixed.log"; done ;;
  distract)  # a short second stage after plain pre-training (results/README.md, "Retrieval distractors over ten
    # seeds", the pilot): each pre-trained DRT of RUN_NAMES (default drt) continued DIS_STEPS steps on PRE_DATA at a
    # constant DIS_LR with retrieval_distractors=1 (RUNS/NAME-dis) and, as its control, the same steps on the same
    # batches without (RUNS/NAME-ctl), all side by side; then e.g. STAGE=ppl-fixed RUN_NAMES='drt-s1-dis drt-s1-ctl'
    # NAME_TAG=-stage and collect_results.py --paired drt-dis-stage-small=drt-ctl-stage-small
    # A run that is not a DRT (named swa* or full*) gets the control arm alone: the baseline at the same tokens.
    names=()
    for a in ${RUN_NAMES:-drt}; do
      case $a in swa*|full*) arms=ctl ;; *) arms="dis ctl" ;; esac
      for arm in $arms; do
        o=$a-$arm
        names+=("$o")
        case $a:$arm in swa*|full*) opt=() ;; *:dis) opt=(--set retrieval_distractors=1) ;; *) opt=(--set retrieval_distractors=0) ;; esac
        gca train "${common[@]}" --init-from "$(src "$a")" --data "$PRE_DATA" --lr "${DIS_LR:-1e-4}" --min-lr "${DIS_LR:-1e-4}" \
          --warmup 0 --seed "${DIS_SEED:-17}" "${opt[@]}" --max-steps "${DIS_STEPS:-400}" --out "$RUNS/$o" >> "$RUNS/$o.log" 2>&1 &
      done
    done
    wait
    keep_logs "${names[@]}"
    for n in "${names[@]}"; do tail -n 1 "$RUNS/$n.log"; done ;;
  seeds-stage)  # ARCHS x SEEDS through the whole distractor-stage comparison in one command (the seventeenth and
    # eighteenth runs): pretrain (MIN), distract (DIS_MIN, 3), then ppl-fixed of what the stage made (NAME_TAG -stage).
    # A run that stopped short (its time limit) stops the chain: rerun the same command, it resumes.
    : "${SEEDS:?seeds-stage needs SEEDS, e.g. SEEDS='9 10'}"
    finished() {  # finished STEPS NAME...: every run's checkpoint (its manifest, RUNS/NAME/ckpt/checkpoint.json) is at step STEPS
      local n steps=$1; shift
      for n in "$@"; do
        if ! python -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["step"] < int(sys.argv[2]))' \
            "$RUNS/$n/ckpt/checkpoint.json" "$steps" 2>/dev/null; then
          echo "$n has not reached step $steps (its log: $RUNS/$n.log); rerun the same command to resume" >&2; return 1
        fi
      done
    }
    names=() made=()
    for a in $ARCHS; do
      for s in $SEEDS; do
        names+=("$a-s$s")
        case $a in swa*|full*) made+=("$a-s$s-ctl") ;; *) made+=("$a-s$s-dis" "$a-s$s-ctl") ;; esac
      done
    done
    finished "$STEPS" "${names[@]}" 2>/dev/null || STAGE=pretrain bash "$0"
    finished "$STEPS" "${names[@]}"
    finished "${DIS_STEPS:-400}" "${made[@]}" 2>/dev/null || STAGE=distract RUN_NAMES="${names[*]}" MIN="${DIS_MIN:-3}" bash "$0"
    finished "${DIS_STEPS:-400}" "${made[@]}"
    STAGE=ppl-fixed RUN_NAMES="${made[*]}" NAME_TAG="${NAME_TAG:--stage}" bash "$0"
    [ "${COPY_STATS:-1}" = 0 ] || STAGE=copy-stats bash "$0" ;;
  copy-stats)  # per seed of SEEDS (default 1), after the distractor stage: DRT's and the window's losses by how far
    # back each held-out token could be copied from (scripts/loss_by_copy_distance.py: drt-sS-dis against swa-sS-ctl
    # and drt-sS-ctl, those that exist) and whether each DRT's retrieval picks the chunks far-copyable tokens could be
    # copied from, and how well it reads them when an oracle picks them (scripts/retrieval_copy_hits.py --oracle;
    # COPY_ORACLE=0: without); at LENGTHS_COPY (1x,64x), PPL_JOBS at a time, into RUNS/eval/
    # (copy-sS.json, hits-NAME.json, each with its .log); a file already there is not made again
    mkdir -p "$RUNS/eval"
    copy_lengths=${LENGTHS_COPY:-1x,64x}
    for s in ${SEEDS:-1}; do
      ck=()
      for pair in drt=drt-s$s-dis swa=swa-s$s-ctl drtctl=drt-s$s-ctl; do
        [ -e "$(src "${pair#*=}")" ] && ck+=(--ckpt "${pair%%=*}=$(src "${pair#*=}")")
      done
      out=$RUNS/eval/copy-s$s.json
      if [ -e "$(src drt-s$s-dis)" ] && [ ${#ck[@]} -ge 4 ] && [ ! -e "$out" ]; then
        while [ "$(jobs -rp | wc -l)" -ge "${PPL_JOBS:-8}" ]; do wait -n || true; done
        python scripts/loss_by_copy_distance.py "${ck[@]}" --data "$DATA" --lengths "$copy_lengths" \
          --windows "${PPL_WINDOWS:-16}" --device "$DEVICE" --dtype "$DTYPE" --out "$out" > "${out%.json}.log" 2>&1 \
          || echo "copy-s$s: stopped or failed (${out%.json}.log)" &
      fi
      for n in drt-s$s-dis drt-s$s-ctl; do
        out=$RUNS/eval/hits-$n.json
        if [ -e "$(src "$n")" ] && [ ! -e "$out" ]; then
          while [ "$(jobs -rp | wc -l)" -ge "${PPL_JOBS:-8}" ]; do wait -n || true; done
          python scripts/retrieval_copy_hits.py --ckpt "$(src "$n")" --name "$n" --data "$DATA" --lengths "$copy_lengths" \
            --windows "${PPL_WINDOWS:-16}" --device "$DEVICE" --dtype "$DTYPE" $( [ "${COPY_ORACLE:-1}" = 0 ] || echo --oracle ) \
            --out "$out" > "${out%.json}.log" 2>&1 || echo "hits-$n: stopped or failed (${out%.json}.log)" &
        fi
      done
    done
    wait
    for f in "$RUNS"/eval/copy-s*.log; do [ -e "$f" ] && tail -n 8 "$f"; done
    for f in "$RUNS"/eval/hits-*.log; do [ -e "$f" ] && grep " all back" "$f"; done
    true ;;
  eval-long)  # DRT alone at LENGTHS_LONG, the chunk memory in CPU memory; one process per length (each
    # length's trials are then the same whichever other lengths are asked for)
    for L in ${LENGTHS_LONG//,/ }; do
      gca eval tasks --ckpt "$(src drt-needles)" --tasks passkey --lengths "$L" --depths 5 --trials "$TRIALS_LONG" \
        --batch-size "${BATCH_LONG:-1}" --filler "$DATA" --offload --device "$DEVICE" --dtype "$DTYPE" \
        --name "drt-$PRESET" --seed 4321 --out "$RUNS/eval/drt-tasks-$L" || echo "drt: stopped at $L"
    done
    python scripts/collect_results.py --runs "$RUNS" --data "$DATA" --out "$RESULTS" ;;
  diagnose)  # why DRT's needles fail: retrieval or reading (scripts/needle_attention.py, 8 held-out trials each)
    mkdir -p "$RUNS/eval"
    ck=$(src drt-needles)
    for mode in "" --oracle; do
      python scripts/needle_attention.py --ckpt "$ck" --data "$DATA" --task passkey --length 4096 --depth 0.5 --trials 8 \
        --device "$DEVICE" $mode --out "$RUNS/eval/diagnose_passkey${mode:+_oracle}.json"
    done
    python scripts/needle_attention.py --ckpt "$(src drt)" --data "$DATA" --repeats --repeat-gap "$REPEAT_GAP" --length 4096 \
      --trials 8 --device "$DEVICE" --out "$RUNS/eval/diagnose_repeats_pretrained.json" ;;
  export)
    for r in $ARCHS; do
      for n in "$r" "$r-needles"; do
        if [ -d "$RUNS/$n/ckpt" ]; then
          python -c "from gca.train import export_model; export_model('$RUNS/$n', '$RUNS/export/$n')" && echo "exported $n"
        fi
      done
    done ;;
  *) echo "unknown STAGE $STAGE" >&2; exit 2 ;;
esac
