#!/usr/bin/env bash
# Why does DRT (small preset) learn more slowly than the sliding-window baseline on the corpus?
# (results/repro-small: validation loss 5.20 vs 4.70 at step 250, 2.44 vs 2.28 at step 2600, while the
# tiny preset in fp32 on a CPU stays within 0.02 nats of it.) Eight short runs side by side on one GPU,
# the setting of scripts/reproduce.sh's pre-training (seq 4032, batch 8, lr 2e-3, seed 1), each
# changing one thing; the validation losses at steps 250, 500 and STEPS are compared.
#
#   OUT=results-folder STEPS=600 bash benchmarks/drt_ablation.sh
# Knobs: RUNS (runs/ablation), DATA, STEPS, PRESET (small), SEQ (4032), BATCH (8), MIN (4.5: a run still
# going after MIN minutes stops there, e.g. the fp32 one); writes OUT/drt_ablation.json.
set -uo pipefail
OUT=${OUT:?set OUT}
RUNS=${RUNS:-runs/ablation}
DATA=${DATA:-data/debian-docs}
STEPS=${STEPS:-600}
PRESET=${PRESET:-small} SEQ=${SEQ:-4032} BATCH=${BATCH:-8}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
common=(--preset "$PRESET" --data "$DATA" --seq-len "$SEQ" --batch-size "$BATCH" --lr 2e-3 --seed 1 --max-steps "$STEPS"
        --eval-every 250 --eval-batches 8 --log-every 25 --save-every 100000 --time-limit "${MIN:-4.5}" --no-progress)
declare -A variants=(
  [swa]="--arch swa"
  [drt]="--arch drt"
  [drt-gca-torch]="--arch drt --set gca_impl=torch"
  [drt-fp32]="--arch drt --no-bf16"
  [drt-attn-blocked]="--arch drt --set attn_impl=blocked"
  [drt-softmax-one]="--arch drt --set gca_softmax_one=true"
  [drt-published-residual]="--arch drt --set residual=published"
  [drt-no-gumbel]="--arch drt --set gumbel=false"
)
for name in "${!variants[@]}"; do
  # shellcheck disable=SC2086  # the variant's words are separate arguments
  python -m gca.cli train "${common[@]}" ${variants[$name]} --out "$RUNS/$name" > "$RUNS/$name.log" 2>&1 &
done
wait
python - "$RUNS" "$OUT/drt_ablation.json" "${!variants[@]}" <<'PY'
import json, sys
runs, out, names = sys.argv[1], sys.argv[2], sorted(sys.argv[3:])
rows = []
for n in names:
    try:
        log = [json.loads(l) for l in open(f"{runs}/{n}/log.jsonl")]
    except OSError as e:
        rows.append(dict(variant=n, error=str(e)))
        continue
    val = {r["step"]: round(r["val_loss"], 4) for r in log if "val_loss" in r}
    train = [r for r in log if "loss" in r]
    rows.append(dict(variant=n, val_loss=val, skipped_steps=max((r.get("skipped_steps", 0) for r in log), default=0),
                     tok_per_s=train[-1]["tok_per_s"] if train else None))
import datetime, torch  # noqa: E401
meta = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
            date=datetime.date.today().isoformat())
rows = [dict(r, **meta) for r in rows]
json.dump(rows, open(out, "w"), indent=1)
for r in rows:
    print(f"{r['variant']:24s} {r.get('val_loss')}  skipped {r.get('skipped_steps')}  {r.get('error', '')}")
PY
for name in "${!variants[@]}"; do grep -h "non-finite\|Error\|error" "$RUNS/$name.log" | head -n 3 | sed "s/^/$name: /"; done
