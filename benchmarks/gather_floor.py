"""The gather floor of the GCA kernels: how fast the GPU can move their retrieved tiles, with no math.

Every GCA kernel reads one (Sm x D) key tile and one value tile per (query chunk, slot, memory head)
through the retrieval indices (the dK/dV kernel reads a query and a dO tile per retrieval instead).
A memory chunk is re-read by every query chunk that retrieved it, so at the SPEC shape the kernels
move B * Cq * Hk * K * 2 * Sm * D bf16 = 1.6 GB between L2 and the SMs per pass, although the memory
itself (50 MB) stays in L2. The FLOP floor and the HBM floor of ``bench_gca.py`` do not count this
traffic. Here a Triton kernel with the forward's grid and access pattern (same indices, same tiles,
same program order) only loads the tiles and adds them, so its time is the floor that traffic sets
for each of the three kernels.

    PYTHONPATH=. python benchmarks/gather_floor.py --out benchmarks/results/gather_floor_<gpu>.json

Prints, per launch config, the gather time and the rate in TB/s, and the forward's own time beside it.
"""

import argparse
import datetime
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from bench_gca import bench, make_inputs  # noqa: E402

from gca.ops import gca_triton as gt  # noqa: E402


@triton.jit
def _gather_kernel(
    MK, MV, IDX, O,
    sk_b, sk_c, sk_s, sk_h, sv_b, sv_c, sv_s, sv_h, si_b, si_c, si_k,
    Cq, K: tl.constexpr, Sm: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (query chunk (b, c), memory head hk): load the K slots' key and value tiles through the
    indices (empty slots read chunk 0, as the GCA kernels do) and store their sum, (BLOCK_N, D)."""
    pid_bc = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    b = pid_bc // Cq
    c = pid_bc % Cq
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for i in range(K):
        idx = tl.maximum(tl.load(IDX + b * si_b + c * si_c + i * si_k), 0)
        k = tl.load(MK + b * sk_b + idx * sk_c + n[:, None] * sk_s + hk * sk_h + d[None, :], mask=(n < Sm)[:, None], other=0.0)
        v = tl.load(MV + b * sv_b + idx * sv_c + n[:, None] * sv_s + hk * sv_h + d[None, :], mask=(n < Sm)[:, None], other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(O + (pid_bc * tl.num_programs(2) + hk) * (BLOCK_N * BLOCK_D) + n[:, None] * BLOCK_D + d[None, :], acc.to(O.dtype.element_ty))


def gather(mem_k, mem_v, indices, num_warps=4, num_stages=2):
    """Sum of the retrieved tiles per (b, c, hk): (B, Cq, Hk, BLOCK_N, D) in mem_k's dtype."""
    B, Cm, Sm, Hk, D = mem_k.shape
    Cq, K = indices.shape[1:]
    assert mem_k.stride(-1) == 1 and mem_v.stride(-1) == 1
    bn = gt._block_n(Sm)
    out = torch.empty(B, Cq, Hk, bn, D, dtype=mem_k.dtype, device=mem_k.device)
    kw = {} if gt.INTERPRET else dict(num_warps=num_warps, num_stages=num_stages)
    _gather_kernel[(1, B * Cq, Hk)](
        mem_k, mem_v, indices, out, *mem_k.stride()[:4], *mem_v.stride()[:4], *indices.stride(),
        Cq, K=K, Sm=Sm, BLOCK_N=bn, BLOCK_D=D, **kw,
    )
    return out


def gathered_bytes(B, Cq, Hk, K, Sm, D, itemsize=2):
    """Bytes of key and value tiles the forward (or the dQ kernel) reads from L2: one pair per slot."""
    return B * Cq * Hk * K * 2 * Sm * D * itemsize


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gather_floor.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    rows = []
    cases = [("spec", 4, 256, 64, 12, 12, 64, 8), ("K4", 4, 256, 64, 12, 12, 64, 4), ("K16", 4, 256, 64, 12, 12, 64, 16),
             ("D128-H6", 4, 256, 64, 6, 6, 128, 8)]
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"{'case':8s} {'GB':>6} | {'gather ms':>9} {'TB/s':>6} {'config':>22} | {'GCA fwd ms':>10} {'fwd / gather':>12}")
    for name, B, C, S, H, Hk, D, K in cases:
        q, k, v, idx, w = make_inputs(B, C, S, H, Hk, D, K)
        ref = (k.float() + v.float())[torch.arange(B)[:, None, None], idx.clamp(min=0)].sum(2).permute(0, 1, 3, 2, 4)
        assert torch.allclose(gather(k, v, idx).float(), ref, rtol=2e-2, atol=2e-1), "gather kernel disagrees with torch indexing"
        best = None
        for nw in (4, 8):
            for ns in (1, 2, 3, 4):
                ms = bench(lambda: gather(k, v, idx, nw, ns))
                if best is None or ms < best[0]:
                    best = (ms, nw, ns)
        nbytes = gathered_bytes(B, C, Hk, K, S, D)
        fwd_ms = bench(lambda: gt.gca_fwd(q, k, v, idx, w))
        row = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
               "case": name, "shape": {"B": B, "C": C, "S": S, "H": H, "D": D, "K": K}, "Hk": Hk,
               "gathered_gb": round(nbytes / 1e9, 3), "gather_ms": round(best[0], 4), "gather_tb_s": round(nbytes / best[0] / 1e9, 2),
               "gather_config": {"num_warps": best[1], "num_stages": best[2]}, "fwd_ms": round(fwd_ms, 4)}
        rows.append(row)
        print(f"{name:8s} {nbytes / 1e9:6.2f} | {best[0]:9.3f} {row['gather_tb_s']:6.2f} {str(row['gather_config']):>22} | {fwd_ms:10.3f} {fwd_ms / best[0]:12.2f}", flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
