"""Check the skipped-upper prefill on a trained model: the logits of a task's answer with
``new_cache(skip_upper=True)`` (the default) and ``False``, and the time of each. For a DRT the skip runs
the lower layers alone far from the kept logit; for the sliding-window baseline it computes nothing there.

    python scripts/check_skip_upper.py --ckpt RUN --data data/debian-docs --length 65536

Prints, per needle depth, the largest logit difference, whether the greedy answers and the
retrieval rows agree, and the two times (prompt streamed + answer scored).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gca.data.tasks import make_filler, make_task_sample
from gca.eval.cli import check_data_tokenizer, load_for_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", default=None, help="a prepared folder: filler from its val split (default: embedded)")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--prefill-chunk", type=int, default=4096, help="positions processed at once (new_cache's default)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    model, _, tok = load_for_eval(a.ckpt, a.device, "float32")
    model.eval()
    if a.data:
        try:
            check_data_tokenizer(tok, a.data, "--data")
        except ValueError as e:
            ap.error(str(e))
    tok = tok or "embedded"
    filler = make_filler(a.data, tok, split="val") if a.data else None
    rng = np.random.default_rng(a.seed)
    where = "not computed" if model.config.arch == "swa" else "through the lower layers only"
    for d in (float(x) for x in a.depths.split(",")):
        s = make_task_sample(a.task, context_len=a.length, seed=rng, tokenizer=tok, filler=filler, depth=d,
                             text_per_chunk=model.config.text_per_chunk)
        x = torch.tensor([s.prompt], device=a.device)
        out = {}
        for skip in (True, False):
            cache = model.new_cache(1, max_tokens=len(s.prompt) + len(s.answer), skip_upper=skip,
                                    prefill_chunk=a.prefill_chunk)
            t0 = time.perf_counter()
            first = model(x, cache=cache, logits_to_keep=1).logits[0, -1:]
            rest = model(torch.tensor([s.answer[:-1]], device=a.device), cache=cache).logits[0]
            out[skip] = (torch.cat([first, rest]), time.perf_counter() - t0, [r[0].tolist() for r in cache.last_rows],
                         cache.skipped_tokens)
        (lg_s, t_s, rows_s, skipped), (lg_f, t_f, rows_f, _) = out[True], out[False]
        pred = lg_s.argmax(-1).tolist()
        print(f"depth {d}: max |logit diff| {float((lg_s - lg_f).abs().max()):.2e} (largest logit "
              f"{float(lg_f.abs().max()):.1f}); answers equal {pred == lg_f.argmax(-1).tolist()}, right "
              f"{pred == list(s.answer)}; retrieval rows equal {rows_s == rows_f}; "
              f"skip {t_s:.1f} s ({skipped} of {len(s.prompt)} tokens {where}), "
              f"full {t_f:.1f} s", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "check_skip_upper.py")
