"""Is the needle-at-depth-0 miss about the first chunk, or about the first token?

    python scripts/needle_position.py --ckpt EXPORT --filler data/debian-docs --lengths 1M,4M \
        --positions 0,1,8,32,63,630 --trials 8 --seed 9420 --out needle_position.json

`gca eval tasks` places a needle at relative depths; depth 0 puts the first target needle at the
prompt's first token, in chunk 0. This script places it at given token positions instead (0, 1, 8 and
32 inside chunk 0; 63 is chunk 1's first token, 630 chunk 10's), on the same kind of prompt (held-out
filler text, fresh seeds), and reports for each (length, position) the accuracy and how often the
needle's chunk was retrieved at the question. Each row records where the needles actually began
(a needle is shifted back to fit inside its chunk). Writes a JSON list of rows to ``--out``.

``--memory N`` measures instead what the first token does to the chunk memory: for N passkey prompts
of the model's training length with the needle at token t (0 and 1), the needle's memory keys and values
and its chunk's landmark are compared with the same needle one chunk later (one chunk of other text
before it, the same place in its chunk), as relative differences ``|a - b| / |b|``; the reference is
that later placement with another chunk of text before it. Writes ``{"memory": rows, "mean": ...}``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

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


def memory_states(model, prompt: list[int]):
    """(landmarks ``(C, d)``, memory keys, memory values ``(C, S, Hk, D)``) the encoder makes of ``prompt``
    in the model's own forward pass (a hook keeps its output)."""
    seen = []
    hook = model.encoder.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model(torch.tensor([prompt], device=model.embed.weight.device))
    finally:
        hook.remove()
    lmk, mk, mv = seen[0]
    return lmk[0].float(), mk[0].float(), mv[0].float()


def memory_shift(model, filler, tok, L: int, t: int, rng) -> dict:
    """How far the needle's memory at token ``t`` (chunk 0) lies from the same needle one chunk later."""
    P = model.config.text_per_chunk
    s = make_task_sample("passkey", context_len=L, seed=rng, tokenizer=tok, filler=filler,
                         depth=depth_for("passkey", L, t, P, filler, tok), text_per_chunk=P)
    a0, a1 = s.needle_spans[0]
    assert a0 == t, (a0, t)
    first = s.prompt
    # the needle at token P + t, in chunk 1, after P tokens of other text; the prompt's end (the question) is cut to
    # keep its length, which the first two chunks' memory (causal) does not see
    later = [list(filler.tokens(P, rng)) + first[:-P] for _ in range(2)]
    (la, ka, va), (lb, kb, vb), (lc, kc, vc) = (memory_states(model, p) for p in [first] + later)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    span = slice(a0, a1)
    return dict(position=t, values_first=rel(va[0, span], vb[1, span]), values_ref=rel(vc[1, span], vb[1, span]),
                keys_first=rel(ka[0, span], kb[1, span]), keys_ref=rel(kc[1, span], kb[1, span]),
                landmark_first=rel(la[0], lb[1]), landmark_ref=rel(lc[1], lb[1]))


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
    ap.add_argument("--memory", type=int, default=0, metavar="N",
                    help="measure the first token's effect on the chunk memory over N prompts instead (see above)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    model, train_length, _ = load_for_eval(args.ckpt, args.device, args.dtype)
    model.eval()
    filler = make_filler(args.filler, None, split="val")
    tok = getattr(filler, "tokenizer", None)
    P = model.config.text_per_chunk
    if args.memory:
        rng = np.random.default_rng(args.seed)
        L = train_length or 1008
        rows = [memory_shift(model, filler, tok, L, t, rng) for _ in range(args.memory) for t in (0, 1)]
        mean = {t: {k: round(float(np.mean([r[k] for r in rows if r["position"] == t])), 4) for k in rows[0] if k != "position"}
                for t in (0, 1)}
        for t, v in mean.items():
            print(f"needle at token {t} against one chunk later (mean of {args.memory}; reference: other text before): "
                  + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
        with open(args.out, "w") as f:
            json.dump(dict(length=L, memory=rows, mean=mean), f, indent=1)
        return
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
