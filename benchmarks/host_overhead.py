"""Host (Python) time of one GCA forward + backward against its GPU time, on one CUDA GPU.

    PYTHONPATH=. python benchmarks/host_overhead.py [--k 4,8] [--batch 4 --chunks 256]

For the SPEC shape with K retrieved chunks (B=4, C=256, S=64, H=Hk=12, D=64), times 50 eager calls of
``gca_triton(...).backward(g)``: "host enqueue" is the wall time until the last call returns (the GPU
still busy), "wall" the time until the GPU is done. When host enqueue comes near wall, a timing of
the op measures Python, not the kernels. Also prints ``triton.testing.do_bench`` of the same call and
of the launchers alone (``gca_fwd`` + ``gca_bwd``, no autograd). ``--cprofile N`` also prints the N
functions with the most host time (cProfile, own time) over 50 eager calls: where the host's time goes.
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gca import make_inputs  # noqa: E402

from gca.ops import gca_triton as gt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", default="4,8", help="retrieved chunks per query chunk, comma-separated")
    ap.add_argument("--batch", type=int, default=4, help="sequences (default 4, the SPEC shape)")
    ap.add_argument("--chunks", type=int, default=256,
                    help="chunks of 64 per sequence (default 256); a small shape (--batch 1 --chunks 16) leaves "
                         "the GPU idle, so host enqueue is the host's time alone")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also print the N functions with the most host time over 50 eager calls (cProfile)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for K in (int(k) for k in args.k.split(",")):
        q, k, v, idx, w = make_inputs(args.batch, args.chunks, 64, 12, 12, 64, K)
        qg, kg, vg, wg = (t.detach().requires_grad_(True) for t in (q, k, v, w))
        g = torch.randn_like(q)

        def fb():
            gt.gca_triton(qg, kg, vg, idx, wg, validate=False).backward(g)
            for t in (qg, kg, vg, wg):
                t.grad = None

        for _ in range(5):
            fb()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fb()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        ms = triton.testing.do_bench(fb, warmup=25, rep=100, return_mode="median")
        def launch():
            gt.gca_bwd(g, q, k, v, idx, w, gt.gca_fwd(q, k, v, idx, w)[1])

        launchers = triton.testing.do_bench(launch, warmup=25, rep=100, return_mode="median")
        print(f"B={args.batch} C={args.chunks} K={K}: host enqueue {1e3 * (t1 - t0) / 50:.3f} ms/call, wall {1e3 * (t2 - t0) / 50:.3f} ms/call, "
              f"do_bench fwd+bwd {ms:.3f} ms, launchers fwd+bwd (no autograd) {launchers:.3f} ms", flush=True)
        if args.cprofile:
            # the autograd call, then the launchers alone (the engine runs a CUDA backward on its own
            # thread, which cProfile does not see: the second profile shows gca_bwd's host time)
            for what, fn in (("autograd forward + backward", fb), ("launchers gca_fwd + gca_bwd", launch)):
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(50):
                    fn()
                prof.disable()
                torch.cuda.synchronize()
                print(f"K={K}, {what}, 50 calls:")
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
