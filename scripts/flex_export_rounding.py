"""Why an exported DRT with its window on FlexAttention can differ from the compiled eager model (CPU).

The exported program runs FlexAttention's traced op unfused; the eager model runs it compiled. For each seed
this builds the export test's untrained model (tests/test_model.py::test_export_with_a_dynamic_length_and_batch,
``drt-flex``), exports it and, at the test's lengths, prints the largest logit difference of the program against
the compiled eager model and against the eager model with the op uncompiled, and the (row, chunk) places where the
compiled and uncompiled eager runs retrieved different chunks.

    PYTHONPATH=. python scripts/flex_export_rounding.py --seeds 0-137 > benchmarks/results/flex_export_rounding_cpu.txt
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

import gca.model as gm
import gca.ops.sliding_window as sw
from gca import DRT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_model import tiny  # noqa: E402  (the test's model config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0-9", help="first-last (inclusive)")
    a = ap.parse_args()
    lo, hi = (int(x) for x in a.seeds.split("-"))
    picked = []
    real = gm.causal_topk

    def spy(scores, k, **kw):
        r = real(scores, k, **kw)
        picked.append(r.indices.clone())
        return r

    gm.causal_topk = spy
    compiled = sw._compiled_flex
    n_off = 0
    print(f"torch {torch.__version__}; seed: B x L: |program - compiled eager| / |program - uncompiled eager| "
          "/ (row, chunk) where their retrieval differs", flush=True)
    for seed in range(lo, hi + 1):
        torch.manual_seed(seed)
        m = DRT(tiny(arch="drt", attn_impl="flex", num_heads=2)).eval()
        step, shortest = m.export_lengths()
        cells, off = [], False
        with torch.no_grad():
            program = m.export(torch.randint(0, 97, (2, shortest + step)), max_length=shortest + 130 * step).module()
            for B, L in ((1, shortest), (3, shortest + step), (2, shortest + 9 * step), (1, shortest + 2 * step)):
                x = torch.randint(0, 97, (B, L))
                got = program(x).logits
                picked.clear()
                sw._compiled_flex = compiled
                d_c = (got - m(x).logits).abs().max().item()
                sw._compiled_flex = lambda: flex_attention
                d_u = (got - m(x).logits).abs().max().item()
                sw._compiled_flex = compiled
                i_c, i_u = picked
                swaps = [(b, c) for b in range(B) for c in range(i_c.shape[1])
                         if set(i_c[b, c].tolist()) != set(i_u[b, c].tolist())]
                off |= d_c > 1e-5 * (1 + got.abs().max().item())
                cells.append(f"{B}x{L}: {d_c:.1e} / {d_u:.1e} / {swaps}")
        n_off += off
        print(f"{seed}: " + "; ".join(cells), flush=True)
    print(f"seeds with a program logit off the compiled eager one by more than 1e-5 x (1 + largest logit): {n_off} of "
          f"{hi - lo + 1}")


if __name__ == "__main__":
    main()
