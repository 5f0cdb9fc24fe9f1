"""Graph decoding with and without ``torch.compile`` of the static step (``GraphDecoder(compile=True)``).

For each architecture and prompt length: a random prompt is prefilled into a fresh cache, then
``--tokens`` greedy steps are timed through a plain ``GraphDecoder`` and as many more, on the same
cache, through a compiled one (each after one capturing step, timed on its own: for the first
architecture and length the compiled one includes a cold compile; CUDA events around the loop,
median of ``--repeats`` loops). Then the two static steps are run eagerly side by side on two
caches of the same prompt and their logits compared (max abs difference, and whether the greedy
tokens agree), so a speed-up is only reported with the difference it costs.

    PYTHONPATH=. python benchmarks/decode_compile.py --out benchmarks/results/decode_compile_<gpu>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import triton

from gca import DRT, DRTConfig
from gca.inference.graph import GraphDecoder


def _prefill(model, ids, L):
    cache = model.new_cache(1, max_tokens=L + 4096, prefill_chunk=16384 if model.config.arch != "full" else L + L // 63 + 64)
    logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits.argmax(-1)


def _timed(dec, nxt, n, repeats):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    nxt = dec.step(nxt).argmax(-1)  # capture (and compile)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            nxt = dec.step(nxt).argmax(-1)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / n)
    return statistics.median(times), nxt, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--archs", default="drt,full")
    ap.add_argument("--lengths", default="4096,65536")
    ap.add_argument("--tokens", type=int, default=126)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), preset=a.preset)
    rows = []
    for arch in a.archs.split(","):
        torch.manual_seed(0)
        model = DRT(DRTConfig.from_preset(a.preset, arch=arch)).cuda().to(torch.bfloat16).eval()
        for L in [int(x) for x in a.lengths.split(",")]:
            ids = torch.randint(0, model.config.vocab_size, (1, L), device="cuda")
            with torch.no_grad():
                cache, nxt = _prefill(model, ids, L)
                ms_plain, nxt, first_plain = _timed(GraphDecoder(model, cache, graph=True), nxt, a.tokens, a.repeats)
                ms_comp, nxt, first_comp = _timed(GraphDecoder(model, cache, graph=True, compile=True), nxt, a.tokens, a.repeats)
                del cache
                torch.cuda.empty_cache()
                # the two static steps, eagerly, on two caches of the same prompt
                c1, t1 = _prefill(model, ids, L)
                c2, t2 = _prefill(model, ids, L)
                d1, d2 = GraphDecoder(model, c1, graph=False), GraphDecoder(model, c2, graph=False, compile=True)
                diff, agree, nxt = 0.0, 0, t1
                for _ in range(70):  # crosses a chunk boundary
                    l1, l2 = d1.step(nxt).float(), d2.step(nxt).float()
                    diff = max(diff, (l1 - l2).abs().max().item())
                    agree += int(torch.equal(l1.argmax(-1), l2.argmax(-1)))
                    nxt = l1.argmax(-1)
                scale = l1.abs().max().item()
                del c1, c2, d1, d2
                torch.cuda.empty_cache()
            row = dict(model=f"{arch}-{a.preset}", context_length=L, graph_ms_per_token=round(ms_plain, 4),
                       graph_compiled_ms_per_token=round(ms_comp, 4), tokens_per_s=round(1e3 / ms_plain, 1),
                       compiled_tokens_per_s=round(1e3 / ms_comp, 1), first_step_s=round(first_plain, 2),
                       compiled_first_step_s=round(first_comp, 2), logits_max_abs_diff=round(diff, 4),
                       logits_max_abs=round(scale, 3), greedy_agree=f"{agree}/70", **meta)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
