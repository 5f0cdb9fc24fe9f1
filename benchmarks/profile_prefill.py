"""Where the time of a streaming prefill goes: torch.profiler over a prefill of ``--length`` random
tokens through a random DRT of ``--preset`` (bf16, CUDA), with or without offload.

    python benchmarks/profile_prefill.py --preset small --length 1048576 --offload
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gca import DRT, DRTConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--length", type=int, default=1 << 20)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--prefill-chunk", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--decode", type=int, default=0, help="profile this many decode steps after the prefill instead")
    ap.add_argument("--arch", default="drt", choices=["drt", "swa", "full"])
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    model = DRT(DRTConfig.from_preset(a.preset, arch=a.arch)).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, a.length))
    warm = model.new_cache(1, offload=a.offload, prefill_chunk=a.prefill_chunk)
    model(ids[:, : 4 * a.prefill_chunk], cache=warm, logits_to_keep=1)
    torch.cuda.synchronize()
    cache = model.new_cache(1, offload=a.offload, prefill_chunk=a.prefill_chunk, max_tokens=a.length)
    if a.decode:
        nxt = model(ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(4):
            nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        import time

        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(a.decode):
                nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        print(f"{a.decode} decode steps (profiled): {(time.perf_counter() - t0) / a.decode * 1e3:.2f} ms per step")
    else:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids, cache=cache, logits_to_keep=1)
            torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=50))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
