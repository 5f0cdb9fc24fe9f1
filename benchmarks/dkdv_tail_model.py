"""How much the dK/dV kernel's uneven programs can cost, from a list-scheduling model (no GPU).

Under causal retrieval an early memory chunk is retrieved by many more (query chunk, slot) pairs than
a late one, and the dK/dV kernel's program for a chunk loops once per pair, so its programs differ in
length by ~20x. This script draws the benchmark's random causal indices (as ``bench_gca.py`` does: K
distinct earlier chunks per query chunk, shared by the heads), gives each program ``overhead + pairs``
time units, hands programs in launch order to the first free of ``slots`` program slots (programs an SM
x SMs), and prints the makespan over the ideal (total work / slots) for the launch order the kernel
uses (memory chunk fastest, then batch, then memory head), for longest-first over the whole grid (the
``LPT`` order timed on 2026-12-02) and for a two-phase order (every (batch, head)'s first T chunks,
then the rest). It models the tail only: not L2 locality, which the measured LPT order lost.

    python benchmarks/dkdv_tail_model.py [--shape B,C,K,H] [--slots 264,396]
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np


def pair_counts(B: int, C: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """(B, C): how many (query chunk, slot) pairs retrieve each memory chunk."""
    n = np.zeros((B, C))
    for b in range(B):
        for c in range(1, C):
            n[b, rng.choice(c, min(K, c), replace=False)] += 1
    return n


def makespan_over_ideal(durations: list[float], slots: int) -> float:
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        t = heapq.heappop(free) + d
        heapq.heappush(free, t)
        end = max(end, t)
    return end / (sum(durations) / slots)


def orders(B: int, C: int, H: int) -> dict[str, list[tuple[int, int, int]]]:
    launch = [(h, b, m) for h in range(H) for b in range(B) for m in range(C)]
    out = {"launch order": launch}
    for T in (16, 64):
        out[f"two-phase, T = {T}"] = ([(h, b, m) for h in range(H) for b in range(B) for m in range(T)]
                                      + [(h, b, m) for h in range(H) for b in range(B) for m in range(T, C)])
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4,256,8,12", help="B,C,K,H (default: the SPEC shape)")
    ap.add_argument("--slots", default="264,396", help="programs in flight: 2 or 3 an SM x 132 SMs")
    ap.add_argument("--overhead", default="0.5,1,2", help="a program's fixed cost, in pair-steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    B, C, K, H = (int(x) for x in args.shape.split(","))
    n = pair_counts(B, C, K, np.random.default_rng(args.seed))
    print(f"pairs a memory chunk: max {n.max():.0f}, mean {n.mean():.2f} (B={B}, C={C}, K={K}, H={H})")
    rows = []
    for slots in (int(s) for s in args.slots.split(",")):
        for ov in (float(o) for o in args.overhead.split(",")):
            res = {}
            for name, order in orders(B, C, H).items():
                res[name] = makespan_over_ideal([ov + n[b, m] for h, b, m in order], slots)
            res["longest first"] = makespan_over_ideal(sorted((ov + n[b, m] for b in range(B) for m in range(C)
                                                               for _ in range(H)), reverse=True), slots)
            rows.append(dict(slots=slots, overhead=ov, **res))
            print(f"slots {slots:4d} overhead {ov:3.1f}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return rows


if __name__ == "__main__":
    main()
