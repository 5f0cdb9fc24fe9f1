"""Checks, compile reports and timings of the warp-specialised, persistent GCA forward in Gluon for Hopper
(FlashAttention-3's layout; `gca.ops.gca_gluon.gca_fwd_ws`, the package's forward at D = 128) over its
options: NC math warpgroups a CTA, each running its own (query chunk, query head) items with the
intra-warpgroup overlap of `gca_gluon._gca_fwd_gluon` (slot i + 1's Q K^T issued before slot i's softmax,
P V asynchronous), each fed by its own loader warp that issues the TMA copies (queries, and each retrieved
chunk's key and value tiles) into the warpgroup's rings guarded by "ready" / "empty" mbarriers. One CTA an
SM (``ctas`` more), looping over the items head-major (the query chunk fastest, so the CTAs running
together share a head's memory in L2), so a loader fetches the next item's tiles while its warpgroup
finishes this one. ``pair``: two slots a step (one wait and one release of each buffer per two slots);
``p_regs``: P handed to P V from registers instead of through shared memory (compiles without serialised
wgmma only with one math warpgroup a CTA at up to three CTAs an SM; timed: the closest to Triton at
D = 64, still 2-3% behind).

Why: the Triton forward runs 4 single-warpgroup programs an SM, each waiting on its own chain (load,
Q K^T, softmax, P V), latency-bound ("Where the kernels wait" in `KERNEL_NOTES.md`); the single-warpgroup
Gluon forward overlaps inside a warpgroup but issues its own copies, paying barriers for them.

    python benchmarks/gluon_ws_fwd.py --aot     # compile for sm_90a here (no GPU): registers, shared memory
    python benchmarks/gluon_ws_fwd.py           # on a Hopper GPU: check against the float64 reference and the
                                                # Triton forward, then time both at the SPEC shape and others
    python benchmarks/gluon_ws_fwd.py --quick   # one small check per config (a wrong mbarrier phase hangs:
                                                # put a `timeout` around any run)

Measured on an H200 on 2026-12-03 (`benchmarks/results/gluon_ws_fwd_nvidia-h200_2026-12-03.txt`; the
section "A warp-specialised, persistent Gluon forward" of `KERNEL_NOTES.md`): right everywhere checked,
and slower than the Triton forward at D = 64 in every configuration (SPEC shape: 0.373 ms at best against
0.334-0.352; P passed from registers, 0.359 against 0.350 in its run). At D = 128 one math warpgroup a
CTA at two CTAs an SM with P from registers takes 0.282-0.289 ms against 0.324-0.335 for the
single-warpgroup Gluon forward (runs 8-9), so `gca_triton.gca_fwd` launches that form there (the
launcher's defaults); at D = 64 it keeps Triton's.
"""

import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gca.ops import gca_gluon  # noqa: E402
from gca.ops.gca_gluon import gca_fwd_ws  # noqa: E402  (the kernel and its launcher live in the package)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_kernels import inputs  # noqa: E402  (the same random inputs as the Gluon kernels' checks)


def _aot(configs, dump):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import aot_sm90

    mod = gca_gluon
    real = mod._gca_fwd_ws
    mod._gca_fwd_ws = aot_sm90._Stub(real, "ws", dump)
    try:
        for cfg in configs:
            B, C, H, D, K = 4, 256, (12 if cfg.get("D", 64) == 64 else 6), cfg.get("D", 64), 8
            print(cfg)
            q = torch.randn(B, C, 64, H, D, dtype=torch.bfloat16)
            kv = torch.randn(B, C, 64, H, D, dtype=torch.bfloat16)
            idx = torch.zeros(B, C, K, dtype=torch.long)
            w = torch.rand(B, C, K)
            kw = {k: v for k, v in cfg.items() if k != "D"}
            gca_fwd_ws(q, kv, kv, idx, w, grid=132, **kw)
    finally:
        mod._gca_fwd_ws = real


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aot", action="store_true")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one small check per config, then stop")
    ap.add_argument("--ncu", action="store_true", help="only run the nc=3 forward 3 times at the SPEC shape (for ncu)")
    ap.add_argument("--configs", default=None, help="a JSON list of gca_fwd_ws keyword dicts, instead of the built-in list")
    ap.add_argument("--spec-only", action="store_true", help="time the SPEC shape only, with no small-shape checks (--quick checks one)")
    args = ap.parse_args()
    configs = [dict(nc=3, nbuf=3), dict(nc=4, nbuf=2, qbuf=1, overlap=False),
               dict(nc=4, nbuf=2, qbuf=1, overlap=False, p_regs=True), dict(nc=3, nbuf=3, p_regs=True),
               dict(nc=3, nbuf=3, overlap=False, p_regs=True), dict(nc=2, nbuf=2, D=128)]
    if args.configs:
        import json

        configs = json.loads(args.configs)
    if args.aot:
        _aot(configs, args.dump)
        return

    os.environ["GCA_GLUON"] = "0"
    from gca.ops import gca_triton as gt
    from gca.ops.gca_gluon import gca_fwd_gluon
    from gca.ops.gca_ref import gca_reference

    dev = "cuda"
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
          "|", time.strftime("%Y-%m-%d"), flush=True)

    bad = 0
    if args.ncu:
        q, mk, mv, idx, w = inputs(4, 256, 12, 12, 64, 8, seed=7)
        for _ in range(3):
            gca_fwd_ws(q, mk, mv, idx, w, nc=3, nbuf=3)
        torch.cuda.synchronize()
        return
    if args.quick:
        q, mk, mv, idx, w = inputs(1, 8, 3, 3, 64, 3, seed=1)
        ref = gca_reference(q.double(), mk.double(), mv.double(), idx, w.double())
        for cfg in configs:
            if cfg.get("D", 64) != 64:
                continue
            o, _ = gca_fwd_ws(q, mk, mv, idx, w, grid=2, **cfg)
            torch.cuda.synchronize()
            print(cfg, ((o.double() - ref).abs().max() / ref.abs().max()).item(), flush=True)
        return
    # small shapes against the float64 reference: K 1 / 3 / 5 / 16, grouped heads, items not a multiple of
    # NC or of the grid, D = 128, and a grid of 2 CTAs so each loops over many items
    for B, C, H, Hk, D, K in [] if args.spec_only else [(1, 16, 4, 2, 64, 5), (2, 8, 2, 2, 128, 3), (1, 16, 4, 4, 64, 1), (1, 32, 2, 1, 64, 16),
                              (1, 7, 5, 5, 64, 3)]:
        q, mk, mv, idx, w = inputs(B, C, H, Hk, D, K, seed=B * 1000 + C + K)
        for cfg in configs:
            if cfg.get("D", 64) != D:
                continue
            kw = {k: v for k, v in cfg.items() if k != "D"}
            for so in (False, True):
                for grid in (None, 2):
                    o, lse = gca_fwd_ws(q, mk, mv, idx, w, softmax_one=so, grid=grid, **kw)
                    torch.cuda.synchronize()
                    ref = gca_reference(q.double(), mk.double(), mv.double(), idx, w.double(), softmax_one=so)
                    err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
                    _, lse_t = gt.gca_fwd(q, mk, mv, idx, w, softmax_one=so)
                    ok = (idx >= 0)[:, :, None, :, None]
                    lse_err = ((lse - lse_t).abs() * ok).max().item()
                    good = err < 1e-2 and lse_err < 1e-3 and torch.isfinite(o).all().item()
                    bad += not good
                    print(f"check B={B} C={C} H={H} Hk={Hk} D={D} K={K} so={so} grid={grid} {kw}: "
                          f"out rel {err:.2e} lse {lse_err:.2e} {'ok' if good else 'FAIL'}", flush=True)
    print("checks:", "all passed" if not bad else f"{bad} FAILED", flush=True)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    shapes = [(4, 256, 12, 12, 64, 8), (4, 256, 12, 12, 64, 4), (4, 256, 12, 12, 64, 16), (4, 256, 6, 6, 128, 8),
              (4, 256, 12, 4, 64, 8)]
    if args.spec_only:
        shapes = shapes[:1]
    for B, C, H, Hk, D, K in shapes:
        q, mk, mv, idx, w = inputs(B, C, H, Hk, D, K, seed=7)
        o_t, _ = gt.gca_fwd(q, mk, mv, idx, w)
        flops = 4 * B * C * H * K * 64 * 64 * D
        cands = {"triton": lambda: gt.gca_fwd(q, mk, mv, idx, w), "gluon1wg": lambda: gca_fwd_gluon(q, mk, mv, idx, w)}
        for cfg in configs:
            if cfg.get("D", 64) != D:
                continue
            kw = {k: v for k, v in cfg.items() if k != "D"}
            o_w, _ = gca_fwd_ws(q, mk, mv, idx, w, **kw)
            torch.cuda.synchronize()
            diff = ((o_w.float() - o_t.float()).abs().max() / o_t.float().abs().max()).item()
            print(f"  B={B} C={C} H={H} Hk={Hk} D={D} K={K} ws {kw}: vs triton rel {diff:.2e}", flush=True)
            bad += diff > 1e-2
            cands[f"ws{kw}"] = (lambda kw=kw: gca_fwd_ws(q, mk, mv, idx, w, **kw))
        times = {name: [] for name in cands}
        for _ in range(args.rounds):  # in turn, so drift hits every candidate alike
            for name, fn in cands.items():
                times[name].append(bench(fn))
        for name, ts in times.items():
            med = sorted(ts)[len(ts) // 2]
            print(f"B={B} C={C} H={H} Hk={Hk} D={D} K={K} {name:40s} {med:.4f} ms  {flops / med / 1e9:.0f} TFLOP/s  "
                  f"(rounds: {' '.join(f'{t:.4f}' for t in ts)})", flush=True)
    print("done;", "all checks passed" if not bad else f"{bad} checks FAILED")


if __name__ == "__main__":
    main()
