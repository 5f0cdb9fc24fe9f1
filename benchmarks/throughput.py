"""DRT against the full-attention baseline of the same width and depth: training, prefill and decode
throughput and peak GPU memory at several context lengths (results/throughput.json).

    python benchmarks/throughput.py --preset small --lengths 4096,16384,65536 --out results/throughput.json

- train: one optimizer step (forward + backward + AdamW, bf16 autocast) on a batch of one sequence of
  the context length; tokens/s = length / median step time (CUDA events, after warm-up). With
  ``--compile`` both models run under ``torch.compile`` (rows marked ``compiled``).
- prefill: a streaming prefill of the whole context through the model's cache (bf16 weights), one
  logit row kept, every layer over every position (``skip_upper=False``: the committed rows predate
  the skip, and a sliding-window model would otherwise compute only its last layers x window
  positions); tokens/s = length / time.
  The full-attention baseline prefills in one piece (causal SDPA, flash kernels), DRT in pieces of
  16K positions.
- decode: ``--decode-tokens`` greedy decode steps after that prefill (and one untimed step), batch 1;
  tokens/s = steps / time. Plain streaming calls (``cuda_graph: false``) and as many steps more
  through the CUDA-graph decoder (``cuda_graph: true``, ``gca.inference.GraphDecoder``, what
  ``generate`` uses on CUDA).
Peak memory is ``torch.cuda.max_memory_allocated`` over each measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from gca import DRT, DRTConfig  # noqa: E402
from gca.inference.bench import bench_streaming  # noqa: E402
from train_step import time_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--archs", default="drt,full")
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true",
                    help="train rows: both models under torch.compile (compiled during the warm-up)")
    ap.add_argument("--modes", default="train,prefill,decode",
                    help="what to time: train and/or prefill,decode (prefill and decode are timed together)")
    ap.add_argument("--out", default="results/throughput.json")
    a = ap.parse_args()
    modes = set(a.modes.split(","))
    if not modes or not modes <= {"train", "prefill", "decode"}:
        sys.exit(f"--modes: expected a comma-separated subset of train,prefill,decode, got {a.modes!r}")
    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, date=datetime.date.today().isoformat(), preset=a.preset)
    rows = []
    for arch in a.archs.split(","):
        cfg = DRTConfig.from_preset(a.preset, arch=arch)
        name = f"{arch}-{a.preset}"
        for L in [int(x) for x in a.lengths.split(",")] if "train" in modes else []:
            torch.cuda.empty_cache()
            ms, peak, n, _ = time_steps(cfg, L, 1, a.steps, 3, False, False, compile=a.compile)
            rows.append(dict(model=name, context_length=L, mode="train", tokens_per_s=round(L / ms * 1e3),
                             peak_mem_gb=round(peak, 2), step_ms=round(ms, 2), params=n, compiled=a.compile, **meta))
            print(json.dumps(rows[-1]), flush=True)
        if not modes & {"prefill", "decode"}:
            continue
        model = DRT(cfg).cuda().to(torch.bfloat16).eval()
        torch.cuda.empty_cache()
        rows_b = []
        for L in [int(x) for x in a.lengths.split(",")]:
            rows_b += bench_streaming(model, [L], offload_modes=(False,), decode_tokens=a.decode_tokens, progress=False,
                                      prefill_chunk=L + L // 63 + 64 if arch == "full" else 16384, cuda_graph=True,
                                      skip_upper=False)
        for r in rows_b:
            L = r["context_length"]
            for mode in ("prefill", "decode"):
                if mode in modes:
                    extra = dict(cuda_graph=False) if mode == "decode" else {}
                    rows.append(dict(model=name, context_length=L, mode=mode, tokens_per_s=r[f"{mode}_tokens_per_s"],
                                     peak_mem_gb=r["peak_mem_gb"], **extra, **meta))
                    print(json.dumps(rows[-1]), flush=True)
            if "decode" in modes and "decode_graph_tokens_per_s" in r:
                rows.append(dict(model=name, context_length=L, mode="decode", tokens_per_s=r["decode_graph_tokens_per_s"],
                                 peak_mem_gb=r["peak_mem_gb"], cuda_graph=True,
                                 first_step_ms=r["decode_graph_first_step_ms"], **meta))
                print(json.dumps(rows[-1]), flush=True)
        del model
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'model':<12} {'length':>7} {'mode':>14} {'tokens/s':>10} {'peak GB':>8}")
    for r in rows:
        mode = r["mode"] + (" (graph)" if r.get("cuda_graph") else "")
        print(f"{r['model']:<12} {r['context_length']:>7} {mode:>14} {r['tokens_per_s']:>10} {r['peak_mem_gb']:>8}")


if __name__ == "__main__":
    main()
