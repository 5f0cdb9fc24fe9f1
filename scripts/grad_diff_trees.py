"""Compare one training step's loss and gradients between two checkouts of this package.

Each tree is imported in its own process (the same model config, seed, and token batch), its loss and
per-parameter gradients saved, then compared. A difference in float64 is a difference in the math; in
bf16 autocast alone, a difference in rounding.

    git archive 8fce054 gca | tar -x -C /tmp/old      # any commit's package
    python scripts/grad_diff_trees.py /tmp/old . --dtype float64
    python scripts/grad_diff_trees.py /tmp/old . --dtype bf16-autocast

Uses the CPU paths (the PyTorch GCA reference, blocked sliding window).
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch

_ONE = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import os, gca
assert os.path.samefile(os.path.dirname(gca.__file__), os.path.join(sys.argv[1], "gca")), gca.__file__
from gca.config import DRTConfig
from gca.model import DRT
sets = dict(kv.split("=", 1) for kv in sys.argv[4].split(",") if kv)
sets = {k: (v == "true") if v in ("true", "false") else v for k, v in sets.items()}
cfg = DRTConfig.from_preset("small", vocab_size=2048, **sets)
torch.manual_seed(1)
m = DRT(cfg)
if sys.argv[3] == "float64":
    m = m.double()
ids = torch.randint(0, 2048, (1, 1008), generator=torch.Generator().manual_seed(5))
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sys.argv[3] == "bf16-autocast"):
    loss = m(ids, labels=ids).loss
loss.backward()
torch.save({"loss": loss.item(), "grads": {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}},
           sys.argv[2])
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="a folder holding the old tree's gca package")
    ap.add_argument("new", help="a folder holding the new tree's gca package")
    ap.add_argument("--dtype", choices=["float64", "bf16-autocast"], default="float64")
    ap.add_argument("--set", default="residual=published,gca_softmax_one=true,landmark_memory=keep",
                    help="config overrides of the small preset, comma-separated k=v")
    ap.add_argument("--rel", type=float, default=1e-9, help="report parameters whose gradients differ by more (relative)")
    a = ap.parse_args(argv)
    for tree in (a.old, a.new):  # else the import below finds the installed gca and compares it with itself
        if not os.path.isfile(os.path.join(tree, "gca", "__init__.py")):
            ap.error(f"{tree} holds no gca package (no {os.path.join(tree, 'gca', '__init__.py')}): give the folder "
                     "above it")
    res = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, tree in enumerate((a.old, a.new)):
            out = os.path.join(tmp, f"{i}.pt")
            subprocess.run([sys.executable, "-c", _ONE, os.path.abspath(tree), out, a.dtype, a.set], check=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=tmp)
            res.append(torch.load(out))
    old, new = res
    print(f"loss: old {old['loss']!r} new {new['loss']!r}")
    only = set(old["grads"]) ^ set(new["grads"])
    if only:
        print("parameters in one tree only:", ", ".join(sorted(only)))
    n = 0
    for k in sorted(set(old["grads"]) & set(new["grads"])):
        g0, g1 = old["grads"][k], new["grads"][k]
        if g0.shape != g1.shape:
            print(f"{k}: shapes {tuple(g0.shape)} vs {tuple(g1.shape)}")
            continue
        rel = (g0 - g1).abs().max().item() / max(g0.abs().max().item(), 1e-30)
        if rel > a.rel:
            n += 1
            print(f"{k:50s} max relative difference {rel:.2e}")
    print(f"{n} of {len(set(old['grads']) & set(new['grads']))} gradients differ by more than {a.rel:g}")


if __name__ == "__main__":
    main()
