#!/usr/bin/env bash
# Data-parallel scaling of `gca train` on one host: the same run on 1 GPU and, through torchrun, on 2
# (per-GPU batch fixed, so the global batch doubles). Throughput = median tok_per_s of log.jsonl rows
# after the first 20 steps. Needs 2 GPUs.
#   OUT=out/ddp bash benchmarks/ddp_scaling.sh
set -u
OUT=${OUT:-out/ddp}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd) PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name --format=csv,noheader
args=(--preset small --data "synthetic:passkey;loss=all" --seq-len 4032 --batch-size 8 --max-steps 80 --log-every 10
      --eval-every 0 --save-every 1000 --no-progress --lr 1e-3)
CUDA_VISIBLE_DEVICES=0 python -m gca.cli train "${args[@]}" --out "$OUT/gpu1" > "$OUT/gpu1.log" 2>&1
torchrun --standalone --nproc-per-node 2 -m gca.cli train "${args[@]}" --out "$OUT/gpu2" > "$OUT/gpu2.log" 2>&1
tail -n 3 "$OUT/gpu1.log" "$OUT/gpu2.log"
python - "$OUT" <<'PY'
import json, statistics, sys, torch
out = sys.argv[1]
res = {}
for n in (1, 2):
    rows = [json.loads(l) for l in open(f"{out}/gpu{n}/log.jsonl")]
    tps = [r["tok_per_s"] for r in rows if "tok_per_s" in r and r["step"] > 20]
    res[n] = statistics.median(tps)
row = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "preset": "small", "seq_len": 4032,
       "batch_per_gpu": 8, "tokens_per_s_1gpu": round(res[1]), "tokens_per_s_2gpu": round(res[2]),
       "scaling": round(res[2] / res[1], 3)}
print(json.dumps(row))
json.dump(row, open(f"{out}/ddp_scaling.json", "w"), indent=1)
PY
