"""How much of the forward's time the retrieved tiles' traffic costs: the forward and the gather-only
kernel (`gather_floor.py`) timed under three index patterns at the SPEC shape, in turn.

- ``random``: the benchmark's indices (query chunk c retrieves K random chunks j < c);
- ``recent``: slot i of query chunk c retrieves chunk c - 1 - i, so neighbouring programs read
  mostly the same tiles (what local retrieval looks like);
- ``zero``: every valid slot retrieves chunk 0, so every program of a (sequence, head) reads the same
  two tiles (as few distinct bytes as the kernel can read).

Same empty slots (-1) and weights in all three; same math. If the forward's time fell with the number
of distinct tiles, the traffic from L2 would be what bounds it.

    PYTHONPATH=. python benchmarks/fwd_index_patterns.py [--repeat 5] [--out rows.json]
    PYTHONPATH=. python benchmarks/fwd_index_patterns.py --ncu   # only runs forward + backward 6 times, for ncu
"""

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from bench_gca import bench, make_inputs  # noqa: E402
from gather_floor import gather  # noqa: E402

from gca.ops import gca_triton as gt  # noqa: E402


def patterns(idx):
    """The three index tensors of the docstring, with ``idx``'s empty slots."""
    B, C, K = idx.shape
    c = torch.arange(C, device=idx.device)[:, None]
    i = torch.arange(K, device=idx.device)[None, :]
    recent = (c - 1 - i).expand(B, C, K)
    recent = torch.where((recent >= 0) & (idx >= 0), recent, -1)
    zero = torch.where(idx >= 0, 0, -1)
    return {"random": idx, "recent": recent.contiguous(), "zero": zero.contiguous()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="rounds of timing, the patterns in turn")
    ap.add_argument("--ncu", action="store_true", help="only run forward + backward a few times (for ncu)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    shape = (4, 256, 64, 12, 12, 64, 8)
    q, k, v, idx, w = make_inputs(*shape)
    if args.ncu:
        g = torch.randn_like(q)
        for _ in range(6):
            o, lse = gt.gca_fwd(q, k, v, idx, w)
            gt.gca_bwd(g, q, k, v, idx, w, lse)
        torch.cuda.synchronize()
        return
    pats = patterns(idx)
    times = {(p, kind): [] for p in pats for kind in ("fwd", "gather")}
    for _ in range(args.repeat):
        for p, ix in pats.items():
            times[(p, "fwd")].append(bench(lambda ix=ix: gt.gca_fwd(q, k, v, ix, w)))
            times[(p, "gather")].append(bench(lambda ix=ix: gather(k, v, ix)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, "
          f"{datetime.date.today().isoformat()}; B,C,S,H,Hk,D,K = {shape}; ms, median of {args.repeat} rounds in turn")
    print(f"{'pattern':8s} {'distinct tiles':>14s} {'forward':>8s} {'gather':>8s}")
    rows = []
    for p, ix in pats.items():
        distinct = sum(int(torch.unique(ix[b][ix[b] >= 0]).numel()) for b in range(ix.shape[0])) * shape[4]
        med = {kind: sorted(times[(p, kind)])[args.repeat // 2] for kind in ("fwd", "gather")}
        print(f"{p:8s} {distinct:14d} {med['fwd']:8.3f} {med['gather']:8.3f}")
        rows.append({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "date": datetime.date.today().isoformat(), "shape": dict(zip("B C S H Hk D K".split(), shape)),
                     "pattern": p, "distinct_tiles": distinct, "fwd_ms": med["fwd"], "gather_ms": med["gather"],
                     "fwd_all": times[(p, "fwd")], "gather_all": times[(p, "gather")]})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
