"""Held-out perplexity of DRT checkpoints with GCA as trained and with every GCA switched off
(``DRT.gca_disabled``): what reading retrieved chunks is worth on plain text.

    python scripts/gca_off_ppl.py --ckpt .cache/cf-keep/lm --name drt-copy-lm-small \
        --data data/debian-docs --lengths 4032,16128 --out gca_off_ppl.json

The windows are those of ``gca eval ppl`` with the same ``--seed`` (default 1234, its default), so
the "on" numbers reproduce that command's. Switching GCA off is an ablation outside the training
distribution: the rest of the model was trained with GCA present.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from gca.eval.cli import check_data_tokenizer, load_for_eval, parse_lengths
from gca.eval.perplexity import perplexity_vs_length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", required=True, help="a run or export folder (repeatable)")
    ap.add_argument("--name", action="append", help="a name per --ckpt (default: the folder)")
    ap.add_argument("--data", default="data/debian-docs")
    ap.add_argument("--lengths", default="4032,16128",
                    help="context lengths, comma-separated: tokens (4032, 64K) or multiples of the training length (4x)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    names = a.name or a.ckpt
    if len(names) != len(a.ckpt):
        ap.error("give one --name per --ckpt")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):  # (said before the work, not after it)
        ap.error(f"--out {a.out}: no folder {out_dir}")
    rows = []
    for name, path in zip(names, a.ckpt):
        m, train_length, tok = load_for_eval(path, a.device, "float32")
        lengths = parse_lengths(a.lengths, train_length)
        if m.config.arch != "drt":
            ap.error(f"{path} is a {m.config.arch!r} model: it has no GCA to switch off")
        try:
            check_data_tokenizer(tok, a.data, "--data")
        except ValueError as e:
            ap.error(str(e))
        on = perplexity_vs_length(m, a.data, lengths, windows=a.windows, seed=a.seed, progress=False)
        with m.gca_disabled():
            off = perplexity_vs_length(m, a.data, lengths, windows=a.windows, seed=a.seed, progress=False)
        for r_on, r_off in zip(on, off):
            rows.append(dict(model=name, context_length=r_on["context_length"], ppl=round(r_on["ppl"], 4),
                             ppl_gca_off=round(r_off["ppl"], 4), tokens=r_on["tokens"], windows=a.windows, seed=a.seed))
            print(f"{name:>28} {r_on['context_length']:>8}: ppl {r_on['ppl']:.3f}, GCA off {r_off['ppl']:.3f}", flush=True)
        del m
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "gca_off_ppl.py")
