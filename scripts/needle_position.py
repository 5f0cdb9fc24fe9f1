"""Is the needle-at-depth-0 miss about the first chunk, or about the first token?

    python scripts/needle_position.py --ckpt EXPORT --filler data/debian-docs --lengths 1M,4M \
        --positions 0,1,8,32,63,630 --trials 8 --seed 9420 --out needle_position.json

`gca eval tasks` places a needle at relative depths; depth 0 puts the first target needle at the
prompt's first token, in chunk 0. This script places it at given token positions instead (0, 1, 8 and
32 inside chunk 0; 63 is chunk 1's first token, 630 chunk 10's), on the same kind of prompt (held-out
filler text, fresh seeds), and reports for each (length, position) the accuracy and how often the
needle's chunk was retrieved at the question. Each row records where the needles actually began
(a needle is shifted back to fit inside its chunk). Writes a JSON list of rows to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gca.data.tasks import make_filler, make_task_sample
from gca.eval.cli import load_for_eval, parse_lengths
from gca.eval.tasks import score_samples


def depth_for(task: str, L: int, t: int, P: int, filler, tok) -> float:
    """The relative depth that starts the first target needle at token ``t`` of an ``L``-token prompt."""
    probe = make_task_sample(task, context_len=L, seed=np.random.default_rng(0), tokenizer=tok, filler=filler,
                             depth=0.0, text_per_chunk=P)
    n = probe.needle_spans[0][1] - probe.needle_spans[0][0]
    A = (probe.prompt_len - probe.question_len) // P * P  # the tokens of the whole chunks before the question
    if t > A - n:
        raise ValueError(f"position {t} leaves no room for the {task} needle ({n} tokens) before the question of an "
                         f"{L}-token prompt (the chunks before it hold {A} tokens): use a position <= {A - n}")
    return t / max(1, A - n)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--filler", help="a prepared data folder (its val split is read; default: the embedded words)")
    ap.add_argument("--task", default="passkey", choices=["passkey", "multikey", "2hop"])
    ap.add_argument("--lengths", default="4K")
    ap.add_argument("--positions", default="0,1,8,32,63,630", help="token positions of the first target needle")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=9420)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    model, train_length, _ = load_for_eval(args.ckpt, args.device, args.dtype)
    model.eval()
    filler = make_filler(args.filler, None, split="val")
    tok = getattr(filler, "tokenizer", None)
    P = model.config.text_per_chunk
    lengths = parse_lengths(args.lengths, train_length)
    positions = [int(x) for x in args.positions.split(",")]
    if min(positions) < 0:
        ap.error(f"--positions are token indices (>= 0), got {args.positions}")
    rows = []
    for li, L in enumerate(lengths):
        for pi, t in enumerate(positions):
            t0 = time.time()
            d = depth_for(args.task, L, t, P, filler, tok)
            rng = np.random.default_rng([args.seed, li, pi])
            samples = [make_task_sample(args.task, context_len=L, seed=rng, tokenizer=tok, filler=filler, depth=d,
                                        text_per_chunk=P) for _ in range(args.trials)]
            correct, hits = [], []
            for i in range(0, len(samples), 8):
                c, h, _ = score_samples(model, samples[i : i + 8])
                correct += c
                hits += h
            starts = sorted({s.needle_spans[0][0] for s in samples})
            row = dict(task=args.task, context_length=L, position=t, needle_starts=starts,
                       needle_chunks=sorted({s.target_chunks[0] for s in samples}), trials=len(samples),
                       accuracy=float(np.mean(correct)), retrieval_hit=float(np.mean(hits)), seed=args.seed,
                       cell=[li, pi], seconds=round(time.time() - t0, 1))
            rows.append(row)
            print(f"{args.task} {L:>9} position {t:>5} (starts {starts}, chunk {row['needle_chunks']}): "
                  f"accuracy {row['accuracy']:.0%}, needle retrieved {row['retrieval_hit']:.0%} "
                  f"of {len(samples)} ({row['seconds']} s)", flush=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
