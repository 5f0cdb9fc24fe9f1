#!/usr/bin/env bash
# The exact recipe of the shipped checkpoint (checkpoints/passkey-tiny): three `gca train` stages of the
# `tiny` preset on the synthetic passkey task, then a bf16 export and a test on fresh trials. The first
# two stages' runs were stopped by a time limit (scripts/train_demo_checkpoint.sh, five runs side by
# side on one H200); --stop-at ends them at the same steps with the same schedules. The third starts
# from the second's bf16 export, as the shipped one did. About 13 minutes on one H200; the stages are
# resumable (rerun the script).
#
#   OUT=runs/passkey-tiny bash scripts/rebuild_passkey_tiny.sh
set -euo pipefail
OUT=${OUT:-runs/passkey-tiny}
mkdir -p "$OUT"
task="synthetic:passkey;min_len=189;loss=answer_repeats;repeat=1.0;repeat_gap=130"
common=(--preset tiny --seq-len 504 --batch-size 32 --lr 1e-3 --save-every 500 --log-every 100 --eval-every 1000
        --eval-batches 4 --no-progress)
# stage 1 (run b of the script above): 3-8 chunk samples; loss on the answer and on filler pieces that
# repeat from beyond the 128-position window, so copying them needs retrieval and GCA
python -m gca.cli train "${common[@]}" --seed 12 --data "$task" --max-steps 18000 --stop-at 9341 --out "$OUT/stage1"
# stage 2 (run i): from stage 1, with runs of random digits in the filler (the copy circuit practises
# digit strings, which is what the passkey is made of)
python -m gca.cli train "${common[@]}" --seed 23 --data "$task;digits=0.08" --init-from "$OUT/stage1" \
  --max-steps 9000 --stop-at 7680 --out "$OUT/stage2"
python -c "from gca.train import export_model; export_model('$OUT/stage2', '$OUT/stage2-export')"
# stage 3 (run j): the stage-2 export trained 3000 steps more at a lower peak lr on the same data
python -m gca.cli train "${common[@]}" --lr 3e-4 --seed 31 --data "$task;digits=0.08" --init-from "$OUT/stage2-export" \
  --max-steps 3000 --out "$OUT/stage3"
python -c "from gca.train import export_model; export_model('$OUT/stage3', '$OUT/passkey-tiny')"
python -m gca.cli eval tasks --ckpt "$OUT/passkey-tiny" --lengths 1x,4x,16x,64x,128x --depths 5 --trials 20 \
  --seed 3031 --out "$OUT/passkey-tiny/eval" --name passkey-tiny
