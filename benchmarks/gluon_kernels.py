"""Checks, compile reports and timings of the Gluon kernels (`gca/ops/gca_gluon.py`, the Hopper path
for S = Sm = 64, D = 128) at D 64 and 128, against the float64 reference and the Triton kernels.

    python benchmarks/gluon_kernels.py --aot    # compile for sm_90a here (no GPU): registers, spills, serialisation
    python benchmarks/gluon_kernels.py --schedule   # check the model of the buffer / wgmma order (no GPU)
    python benchmarks/gluon_kernels.py          # on a Hopper GPU: check against the float64 reference and the
                                                # Triton kernels, time both (one to two minutes)

First run on an H200 on 2026-12-01 (`benchmarks/results/gluon_kernels_nvidia-h200_2026-12-01.txt`):
every check passes; faster than Triton at D = 128 only, which is where the package uses them.
"""

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gca.ops import gca_gluon  # noqa: E402
from gca.ops.gca_gluon import gca_bwd_dkdv_gluon, gca_bwd_dq_gluon, gca_fwd_gluon  # noqa: E402


class _Schedule:
    """A model of the kernels' buffer and wgmma order, kept in step with them by hand: TMA fills of
    ring buffers, mbarrier waits (which fill, which phase), wgmma issue (FIFO) and
    `warpgroup_mma_wait(n)` (all but the last n complete), stores to the P / dS buffer. It raises
    where a buffer is refilled or stored to while an issued wgmma may still read it, or a wgmma would
    read a buffer that does not hold its slot. `python benchmarks/gluon_kernels.py --schedule` runs it
    for K = 1..19 and the ring sizes used (it found the NBUF = 2 forward missing its last value)."""

    def __init__(self):
        self.inflight, self.fills, self.holds = [], {}, {}

    def tma(self, ring, slot, n):
        buf = (ring, slot % n)
        for name, reads in self.inflight:
            assert buf not in reads, f"TMA of slot {slot} into {buf} while {name} may read it"
        self.fills.setdefault(buf, []).append(slot)
        self.holds[buf] = slot

    def bar_wait(self, ring, slot, n):
        buf = (ring, slot % n)
        assert self.holds.get(buf) == slot, f"{buf} holds slot {self.holds.get(buf)}, wanted {slot}"
        assert self.fills[buf].index(slot) % 2 == (slot // n) & 1, f"wrong phase for slot {slot} in {buf}"

    def mma(self, name, *reads):
        self.inflight.append((name, set(reads)))

    def wait(self, n):
        del self.inflight[: max(len(self.inflight) - n, 0)]

    def store(self, buf):
        for name, reads in self.inflight:
            assert buf not in reads, f"store to {buf} while {name} may read it"


def _schedule_fwd(K, NB):
    s = _Schedule()
    for j in range(min(NB, K)):
        s.tma("k", j, NB), s.tma("v", j, NB)
    s.bar_wait("k", 0, NB), s.mma("S0", ("k", 0)), s.wait(0)
    for i in range(K):
        if i < K - 1:
            if i + NB < K:
                s.tma("k", i + NB, NB)
        if i >= 2 and i + NB - 2 < K:
            s.tma("v", i + NB - 2, NB)
        if i < K - 1:
            s.bar_wait("k", i + 1, NB), s.mma(f"S{i + 1}", ("k", (i + 1) % NB))
        s.wait(1 if i < K - 1 else 0)
        s.store("p")
        s.bar_wait("v", i, NB), s.mma(f"PV{i}", ("v", i % NB), "p")
        s.wait(1 if i < K - 1 else 0)


def _schedule_dq(K, NK, NV):
    s = _Schedule()
    for j in range(min(NK, K)):
        s.tma("k", j, NK)
    for j in range(min(NV, K)):
        s.tma("v", j, NV)
    s.bar_wait("k", 0, NK), s.bar_wait("v", 0, NV)
    s.mma("S0", ("k", 0)), s.mma("dP0", ("v", 0)), s.wait(0)
    for i in range(K - 1):
        if i + NV < K:
            s.tma("v", i + NV, NV)
        s.bar_wait("k", i + 1, NK), s.bar_wait("v", i + 1, NV)
        s.mma(f"S{i + 1}", ("k", (i + 1) % NK)), s.mma(f"dP{i + 1}", ("v", (i + 1) % NV))
        s.wait(2)
        if i >= 1 and i - 1 + NK < K:
            s.tma("k", i - 1 + NK, NK)
        s.store("ds")
        s.mma(f"dq{i}", ("k", i % NK), "ds")
        s.wait(1)
    s.wait(0), s.store("ds"), s.mma(f"dq{K - 1}", ("k", (K - 1) % NK), "ds"), s.wait(0)


def _schedule_dkdv(n, NQ):
    s = _Schedule()
    for j in range(min(NQ, n)):
        s.tma("q", j, NQ)
    s.bar_wait("q", 0, NQ), s.mma("S0", ("q", 0)), s.mma("dP0", ("q", 0)), s.wait(0)
    for j in range(n - 1):
        s.bar_wait("q", j + 1, NQ)
        s.mma(f"S{j + 1}", ("q", (j + 1) % NQ)), s.mma(f"dP{j + 1}", ("q", (j + 1) % NQ))
        s.wait(2)
        if j >= 1 and j - 1 + NQ < n:
            s.tma("q", j - 1 + NQ, NQ)
        s.store("pw"), s.store("ds")
        s.mma(f"dV{j}", ("q", j % NQ), "pw"), s.mma(f"dK{j}", ("q", j % NQ), "ds")
        s.wait(2)
    s.wait(0), s.store("pw"), s.store("ds")
    s.mma(f"dV{n - 1}", ("q", (n - 1) % NQ), "pw"), s.mma(f"dK{n - 1}", ("q", (n - 1) % NQ), "ds"), s.wait(0)


def _aot(shapes, nbuf, dump, fast_math=False):
    """Compile for sm_90a without a GPU and print shared memory, registers, spills, wgmma waits, loop SASS
    (`aot_sm90._Stub`)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from aot_sm90 import _Stub

    names = ("_gca_fwd_gluon", "_gca_bwd_dq_gluon", "_gca_bwd_dkdv_gluon")
    real = [getattr(gca_gluon, n) for n in names]
    for n, f, short in zip(names, real, ("fwd", "dq", "dkdv")):
        setattr(gca_gluon, n, _Stub(f, short, dump))  # the wrappers look their kernels up in the module
    try:
        for B, C, H, Hk, D, K in shapes:
            print(f"B={B} C={C} H={H} Hk={Hk} D={D} K={K} bf16 nbuf={nbuf} fast_math={fast_math}")
            q = torch.randn(B, C, 64, H, D, dtype=torch.bfloat16)
            kv = torch.randn(B, C, 64, Hk, D, dtype=torch.bfloat16)
            idx = torch.zeros(B, C, K, dtype=torch.long)
            w = torch.rand(B, C, K)
            gca_fwd_gluon(q, kv, kv, idx, w, nbuf=nbuf, fast_math=fast_math)
            gca_bwd_dq_gluon(q, q, kv, kv, idx, w, torch.zeros(B, C, H, K, 64))
            if D == 64:
                gca_bwd_dq_gluon(q, q, kv, kv, idx, w, torch.zeros(B, C, H, K, 64), maxnreg=168)
            gca_bwd_dkdv_gluon(q, q, kv, kv, idx, w, torch.zeros(B, C, H, K, 64), torch.zeros(B, C, H, K, 64))
            gca_bwd_dkdv_gluon(q, q, kv, kv, idx, w, torch.zeros(B, C, H, K, 64), torch.zeros(B, C, H, K, 64), num_warps=8)
    finally:
        for n, f in zip(names, real):
            setattr(gca_gluon, n, f)


def inputs(B, C, H, Hk, D, K, seed, dev="cuda"):
    """Random bf16 inputs of chunk length 64 (S = Sm), softmax weights, every third query chunk's last slot
    empty (when K > 1)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, C, 64, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    mk = torch.randn(B, C, 64, Hk, D, device=dev, dtype=torch.bfloat16, generator=g)
    mv = torch.randn(B, C, 64, Hk, D, device=dev, dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, C, (B, C, K), device=dev, generator=g)
    if K > 1:
        idx[:, ::3, -1] = -1  # empty slots
    w = torch.softmax(torch.randn(B, C, K, device=dev, generator=g), -1)
    return q, mk, mv, idx, w


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aot", action="store_true", help="compile for sm_90a only (no GPU needed)")
    ap.add_argument("--dump", default=None, help="with --aot: folder for the PTX")
    ap.add_argument("--schedule", action="store_true", help="check the model of the kernels' buffer / wgmma order (no GPU)")
    ap.add_argument("--fast-math", action="store_true",
                    help="the forward with the MUFU log2 and approximate division (gca_fwd_gluon(fast_math=True))")
    ap.add_argument("--nbuf", type=int, default=2, help="key / value buffers (2: 49 KB of shared memory, 4 programs an SM; 3: 66 KB, 3)")
    args = ap.parse_args()
    shapes = [(4, 256, 12, 12, 64, 8), (4, 256, 12, 12, 64, 4), (4, 256, 6, 6, 128, 8), (4, 256, 12, 4, 64, 8)]
    if args.schedule:
        for K in range(1, 20):
            for nb in (2, 3, 4):
                _schedule_fwd(K, nb)
            for nk, nv in ((3, 2), (3, 3), (4, 2)):
                _schedule_dq(K, nk, nv)
            for nq in (3, 4):
                _schedule_dkdv(K, nq)
        print("schedules: no buffer hazard for K (dK/dV: steps) = 1..19 (forward NBUF 2-4; dq key / value rings "
              "3/2, 3/3, 4/2; dK/dV query / dO ring 3, 4)")
        return
    if args.aot:
        _aot(shapes, args.nbuf, args.dump, args.fast_math)
        return

    os.environ["GCA_GLUON"] = "0"  # gt.gca_fwd / gca_bwd below are the Triton kernels, whatever the shape
    from gca.ops import gca_triton as gt
    from gca.ops.gca_ref import gca_reference

    dev = "cuda"
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, "| nbuf", args.nbuf, "| fast_math", args.fast_math)

    bad = 0
    # small shapes against the float64 reference (K not a multiple of the ring, K = 1, grouped heads, D = 128)
    for B, C, H, Hk, D, K in [(1, 16, 4, 2, 64, 5), (2, 8, 2, 2, 128, 3), (1, 16, 4, 4, 64, 1), (1, 32, 2, 1, 64, 16)]:
        q, mk, mv, idx, w = inputs(B, C, H, Hk, D, K, seed=B * 1000 + C + K)
        for so in (False, True):
            o, lse = gca_fwd_gluon(q, mk, mv, idx, w, softmax_one=so, nbuf=args.nbuf, fast_math=args.fast_math)
            ref = gca_reference(q.double(), mk.double(), mv.double(), idx, w.double(), softmax_one=so)
            err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
            _, lse_t = gt.gca_fwd(q, mk, mv, idx, w, softmax_one=so)
            ok = (idx >= 0)[:, :, None, :, None]
            lse_err = ((lse - lse_t).abs() * ok).max().item()
            flag = "" if err < 1e-2 and lse_err < 1e-3 else "  MISMATCH"
            bad += bool(flag)
            print(f"  check B={B} C={C} H={H} Hk={Hk} D={D} K={K} softmax_one={so}: out rel err {err:.1e} "
                  f"(float64 reference), lse err {lse_err:.1e} (gca_fwd){flag}")
    # dq / dweights at small shapes against the float64 reference's autograd
    for B, C, H, Hk, D, K in [(1, 16, 4, 2, 64, 5), (2, 8, 2, 2, 128, 3), (1, 16, 4, 4, 64, 1), (1, 32, 2, 1, 64, 16)]:
        q, mk, mv, idx, w = inputs(B, C, H, Hk, D, K, seed=B * 1000 + C + K + 1)
        for so in (False, True):
            _, lse = gt.gca_fwd(q, mk, mv, idx, w, softmax_one=so)
            do = torch.randn_like(q)
            dq, dw, delta = gca_bwd_dq_gluon(do, q, mk, mv, idx, w, lse)
            qd, wd = q.double().requires_grad_(), w.double().requires_grad_()
            gca_reference(qd, mk.double(), mv.double(), idx, wd, softmax_one=so).backward(do.double())
            e_q = ((dq.double() - qd.grad).abs().max() / qd.grad.abs().max()).item()
            e_w = ((dw.double() - wd.grad).abs().max() / wd.grad.abs().max()).item()
            flag = "" if e_q < 2e-2 and e_w < 2e-2 else "  MISMATCH"
            bad += bool(flag)
            print(f"  check dq B={B} C={C} H={H} Hk={Hk} D={D} K={K} softmax_one={so}: dq rel err {e_q:.1e}, "
                  f"dweights rel err {e_w:.1e} (float64 reference){flag}")
            for nw in (4, 8):
                mkd, mvd = mk.double().requires_grad_(), mv.double().requires_grad_()
                gca_reference(q.double(), mkd, mvd, idx, w.double(), softmax_one=so).backward(do.double())
                dk, dv = gca_bwd_dkdv_gluon(do, q, mk, mv, idx, w, lse, delta, num_warps=nw)
                e_k = ((dk.double() - mkd.grad).abs().max() / mkd.grad.abs().max()).item()
                e_v = ((dv.double() - mvd.grad).abs().max() / mvd.grad.abs().max()).item()
                flag = "" if e_k < 2e-2 and e_v < 2e-2 else "  MISMATCH"
                bad += bool(flag)
                print(f"    dK/dV ({nw} warps): dmem_k rel err {e_k:.1e}, dmem_v rel err {e_v:.1e}{flag}")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gca import kernel_times

    def kernel_ms(fn, name):
        """GPU time per call of fn of the kernels whose names contain `name` (mean of 20, torch.profiler)."""
        return sum(ms for ms, _, key in kernel_times(fn, 20, warmup=1) if name in key)

    # the benchmark's shapes: against gca_fwd / gca_bwd, then timed
    for B, C, H, Hk, D, K in shapes:
        q, mk, mv, idx, w = inputs(B, C, H, Hk, D, K, seed=7)
        o, lse = gca_fwd_gluon(q, mk, mv, idx, w, nbuf=args.nbuf, fast_math=args.fast_math)
        o_t, lse_t = gt.gca_fwd(q, mk, mv, idx, w)
        err = ((o.float() - o_t.float()).abs().max() / o_t.float().abs().max()).item()
        do = torch.randn_like(q)
        dq, dw, delta = gca_bwd_dq_gluon(do, q, mk, mv, idx, w, lse_t)
        dq_t, _, _, dw_t = gt.gca_bwd(do, q, mk, mv, idx, w, lse_t)
        e_q = ((dq.float() - dq_t.float()).abs().max() / dq_t.float().abs().max()).item()
        e_w = ((dw.float() - dw_t.float()).abs().max() / dw_t.float().abs().max()).item()
        flag = "" if err < 1e-2 and e_q < 2e-2 and e_w < 2e-2 else "  MISMATCH"
        bad += bool(flag)
        tg = triton.testing.do_bench(lambda: gca_fwd_gluon(q, mk, mv, idx, w, nbuf=args.nbuf, fast_math=args.fast_math), warmup=50, rep=400)
        tt = triton.testing.do_bench(lambda: gt.gca_fwd(q, mk, mv, idx, w), warmup=50, rep=400)
        tg2 = triton.testing.do_bench(lambda: gca_fwd_gluon(q, mk, mv, idx, w, nbuf=args.nbuf, fast_math=args.fast_math), warmup=50, rep=400)
        print(f"  B={B} C={C} H={H} Hk={Hk} D={D} K={K}: forward gluon {tg:.3f} / {tg2:.3f} ms, triton gca_fwd {tt:.3f} ms "
              f"(median of do_bench); errors vs triton: out {err:.1e}, dq {e_q:.1e}, dweights {e_w:.1e}{flag}")
        kq_t = kernel_ms(lambda: gt.gca_bwd(do, q, mk, mv, idx, w, lse_t), "_gca_bwd_dq_kernel")
        kq_g = kernel_ms(lambda: gca_bwd_dq_gluon(do, q, mk, mv, idx, w, lse_t), "_gca_bwd_dq_gluon")
        extra = ""
        if D == 64:
            kq_g2 = kernel_ms(lambda: gca_bwd_dq_gluon(do, q, mk, mv, idx, w, lse_t, maxnreg=168), "_gca_bwd_dq_gluon")
            extra = f", gluon capped at 168 registers {kq_g2:.3f} ms"
        print(f"    dq kernel (torch.profiler, mean of 20): gluon {kq_g:.3f} ms, triton {kq_t:.3f} ms{extra}")
        _, dk_t, dv_t, _ = gt.gca_bwd(do, q, mk, mv, idx, w, lse_t)
        kk_t = kernel_ms(lambda: gt.gca_bwd(do, q, mk, mv, idx, w, lse_t), "_gca_bwd_dkdv_kernel")
        for nw in (4, 8):
            dk, dv = gca_bwd_dkdv_gluon(do, q, mk, mv, idx, w, lse_t, delta, num_warps=nw)
            e_k = ((dk.float() - dk_t.float()).abs().max() / dk_t.float().abs().max()).item()
            e_v = ((dv.float() - dv_t.float()).abs().max() / dv_t.float().abs().max()).item()
            flag = "" if e_k < 2e-2 and e_v < 2e-2 else "  MISMATCH"
            bad += bool(flag)
            kk_g = kernel_ms(lambda: gca_bwd_dkdv_gluon(do, q, mk, mv, idx, w, lse_t, delta, num_warps=nw), "_gca_bwd_dkdv_gluon")
            print(f"    dK/dV kernel ({nw} warps): gluon {kk_g:.3f} ms, triton {kk_t:.3f} ms; errors vs triton "
                  f"dmem_k {e_k:.1e}, dmem_v {e_v:.1e}{flag}")

        def bwd_gluon(nw=8):
            dq_, dw_, delta_ = gca_bwd_dq_gluon(do, q, mk, mv, idx, w, lse_t)
            return dq_, *gca_bwd_dkdv_gluon(do, q, mk, mv, idx, w, lse_t, delta_, num_warps=nw), dw_

        for nw in (4, 8):
            tb_g = triton.testing.do_bench(lambda: bwd_gluon(nw), warmup=50, rep=400)
            tb_t = triton.testing.do_bench(lambda: gt.gca_bwd(do, q, mk, mv, idx, w, lse_t), warmup=50, rep=400)
            print(f"    whole backward (do_bench): gluon dq + dK/dV ({nw} warps) {tb_g:.3f} ms, triton gca_bwd {tb_t:.3f} ms; "
                  f"forward + backward: gluon {tg + tb_g:.3f} ms, triton {tt + tb_t:.3f} ms")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
