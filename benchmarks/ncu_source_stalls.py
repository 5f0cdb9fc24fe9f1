"""Summarise Nsight Compute's per-instruction warp-stall samples of one kernel.

Make the CSV on the GPU machine (``--set full`` collects the PC samples):

    ncu --set full --import-source yes -k regex:_gca_fwd_kernel --launch-skip 2 --launch-count 1 \\
        -o fwd python benchmarks/fwd_index_patterns.py --ncu
    ncu --import fwd.ncu-rep --page source --csv --print-source sass > src_fwd.csv

then, anywhere: ``python benchmarks/ncu_source_stalls.py src_fwd.csv [--top 25]``. Prints the share of
the samples by stall reason over the whole kernel, and the instructions with the most samples, each
with the previous instructions in program order (what a stalled instruction usually waits for is the
result of one of them) and its own three largest reasons.
"""

import argparse
import csv
from collections import Counter


def load(path):
    rows = list(csv.reader(open(path, newline="")))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr, body = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    col = {h: i for i, h in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and not h.endswith("(Not Issued)")]

    def num(r, h):
        try:
            return float(r[col[h]].replace(",", "") or 0)
        except ValueError:
            return 0.0

    out = []
    for r in body:
        out.append({
            "addr": r[col["Address"]], "sass": r[col["Source"]].strip(),
            "samples": num(r, "Warp Stall Sampling (All Samples)"),
            "reasons": {h[len("stall_"):]: num(r, h) for h in reasons},
        })
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=20, help="instructions to list (default 20)")
    ap.add_argument("--context", type=int, default=2, help="previous instructions shown with each (default 2)")
    args = ap.parse_args()
    ins = load(args.csv)
    total = sum(i["samples"] for i in ins)
    if not total:
        raise SystemExit(f"{args.csv}: no stall samples (was the report made with --set full?)")
    by_reason = Counter()
    for i in ins:
        by_reason.update(i["reasons"])
    print(f"{args.csv}: {len(ins)} instructions, {total:.0f} samples")
    print("by reason: " + ", ".join(f"{k} {v / total:.1%}" for k, v in by_reason.most_common() if v / total >= 0.005))
    print(f"\ntop {args.top} instructions by samples (share of all; its three largest reasons):")
    order = sorted(range(len(ins)), key=lambda j: -ins[j]["samples"])[:args.top]
    for j in order:
        i = ins[j]
        top3 = ", ".join(f"{k} {v / i['samples']:.0%}" for k, v in Counter(i["reasons"]).most_common(3) if v)
        for p in range(max(0, j - args.context), j):
            print(f"        {ins[p]['addr']:>8s}  {ins[p]['sass'][:70]}")
        print(f"  {i['samples'] / total:5.1%} {i['addr']:>8s}  {i['sass'][:70]:70s}  [{top3}]")


if __name__ == "__main__":
    main()
