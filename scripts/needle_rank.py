"""Where does the needle's chunk rank in the question's retrieval, and by what margin?

    python scripts/needle_rank.py --ckpt EXPORT --filler data/debian-docs --tasks multikey,2hop --lengths 64K \
        --depths 5 --trials 4 --seed 9470 --out needle_rank.json

`gca eval tasks` says whether the needle's chunk was among the top-k chunks the question retrieved; this says by
how much it was, or was not. It builds the same prompts (the same --tasks, --lengths, --depths, --trials and
--seed give `gca eval tasks`'s samples: each cell rebuilds from [seed, task index, length index, depth index]),
streams each prompt up to the question's last landmark as `gca eval tasks` does (no answer), and reads that
retrieval's noise-free scores over every earlier chunk (`DRT.new_cache(keep_scores=True)`). Per trial and
retrieval group:

- ``rank``: the needle chunk's place among those chunks (1: the best; retrieved when <= top_k); the needle chunk
  is the one `gca eval tasks`'s retrieval hit looks for (the first target needle's);
- ``gap``: its score minus the best score of the other chunks that would fill the top_k without it (> 0:
  retrieved), and ``gap_sd``: that gap in standard deviations of the other chunks' scores;
- ``z``: its score above the other chunks' mean, in the same standard deviations;
- ``first_window``: how many of the top_k best other chunks lie in the prompt's first window, where the lower
  layers saw less than a window (the retrievers' sink when nothing matches);
- ``needle_in_chunk``: the first and last token of the (first target) needle within its chunk (0 to
  text_per_chunk - 1): a needle that ends at its chunk's last token sits just before the landmark.

With more chunks the best of the others rises (for Gaussian scores by about sqrt(2 ln C) standard deviations:
3.7 at 1K chunks, 4.7 at 65K), so a gap measured at one length says how much room is left at longer ones.
Prints one line per (task, length, depth, group) and writes every trial to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from gca.data.tasks import make_filler
from gca.eval.cli import check_data_tokenizer, depths_arg, load_for_eval, parse_lengths
from gca.eval.tasks import _depth_list, cell_samples, default_prefill_chunk


def question_scores(model, samples: list) -> list[torch.Tensor]:
    """Per retrieval group, the ``(B, q)`` scores of the retrieval that predicts the answer's first token (the
    question's last landmark, chunk q = ``query_chunk``) over chunks 0 to q - 1, for samples of one shape."""
    cfg = model.config
    dev = model.embed.weight.device
    prompts = torch.tensor([s.prompt for s in samples], dtype=torch.long, device=dev)
    L = prompts.shape[1]
    head = L - 1 if L % cfg.text_per_chunk == 0 else L  # as gca.eval.tasks.score_samples streams it
    cache = model.new_cache(len(samples), max_tokens=L, prefill_chunk=default_prefill_chunk(dev), keep_scores=True)
    with torch.no_grad():
        model(prompts[:, :head], cache=cache, logits_to_keep=1)
    q = samples[0].query_chunk
    out = []
    for g, scores in enumerate(cache.last_scores):
        if scores.shape[1] != q:
            raise RuntimeError(f"the last retrieval read chunk {scores.shape[1]}'s landmark, the question's is {q}")
        picked = cache.last_rows[g][0]  # the top-k the model used: the scores give the same chunks, but for ties
        top = scores.topk(min(cfg.top_k, q), dim=1).indices
        same = [set(top[b].tolist()) == {int(i) for i in picked[b] if i >= 0} for b in range(len(samples))]
        out.append((scores.cpu(), same))
    return out


def trial_stats(row: torch.Tensor, needle: int, k: int, first_chunks: int) -> dict:
    """Rank, gap and z of chunk ``needle`` in one row of scores (over chunks 0..q-1)."""
    row = row.double()
    others = torch.cat([row[:needle], row[needle + 1 :]])
    order = torch.argsort(others, descending=True)
    ids = torch.cat([torch.arange(needle), torch.arange(needle + 1, row.numel())])[order]
    kth = others[order[min(k, others.numel()) - 1]]  # the k-th best other: the needle is in the top-k iff above it
    sd = float(others.std()) if others.numel() > 1 else float("nan")
    s = float(row[needle])
    rank = 1 + int((others > row[needle]).sum())
    return dict(needle_chunk=needle, chunks=row.numel(), rank=rank, retrieved=rank <= k, score=s,
                gap=s - float(kth), gap_sd=(s - float(kth)) / sd if sd > 0 else None,
                z=(s - float(others.mean())) / sd if sd > 0 else None,
                first_window=int((ids[:k] < first_chunks).sum()), top_others=ids[:k].tolist())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a DRT run, checkpoint or export folder")
    ap.add_argument("--filler", default=None, help="a prepared data folder (its val split; default: the embedded words)")
    ap.add_argument("--tasks", default="passkey", help="comma-separated: passkey, multikey, 2hop")
    ap.add_argument("--lengths", default="4x", help="tokens (64K) or multiples of the training length (16x)")
    ap.add_argument("--depths", type=depths_arg, default=5, help="a count (evenly spaced) or a list (0,0.5,1)")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    bad = [t for t in tasks if t not in ("passkey", "multikey", "2hop")]
    if bad:
        ap.error(f"--tasks: unknown task {bad[0]!r} (passkey, multikey, 2hop)")
    if args.trials < 1 or args.batch_size < 1:
        ap.error("--trials and --batch-size must be >= 1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    model, train_length, tok = load_for_eval(args.ckpt, device, dtype)
    model.eval()
    cfg = model.config
    if cfg.arch != "drt":
        ap.error(f"{args.ckpt} is a {cfg.arch} model: it has no retrieval to rank")
    if args.filler is not None:
        check_data_tokenizer(tok, args.filler, "--filler")
    filler = make_filler(args.filler, tok, split="val") if args.filler else None  # (as evaluate_tasks opens it)
    lengths = parse_lengths(args.lengths, train_length)
    depths = _depth_list(args.depths)
    first_chunks = math.ceil(cfg.window / cfg.chunk_size)
    P = cfg.text_per_chunk
    rows = []
    for li, L in enumerate(lengths):  # the order of evaluate_tasks, whose cells these are
        for ti, task in enumerate(tasks):
            for di, d in enumerate(depths):
                t0 = time.time()
                samples = cell_samples(task, L, d, args.trials, args.seed, [ti, li, di], tokenizer=tok, filler=filler,
                                       text_per_chunk=cfg.text_per_chunk, hop_answer="chain")
                cell = []
                for i in range(0, len(samples), args.batch_size):
                    batch = samples[i : i + args.batch_size]
                    for g, (scores, same) in enumerate(question_scores(model, batch)):
                        for b, s in enumerate(batch):
                            cell.append(dict(task=task, context_length=L, depth=round(d, 4), trial=i + b, group=g,
                                             **trial_stats(scores[b], s.target_chunk, cfg.top_k, first_chunks),
                                             needle_in_chunk=[s.needle_spans[0][0] % P, (s.needle_spans[0][1] - 1) % P],
                                             picks_agree=same[b]))
                rows += cell
                if not all(r["picks_agree"] for r in cell):
                    print(f"warning: {sum(not r['picks_agree'] for r in cell)} trial(s) of this cell: the scores' top-k "
                          f"is not the retrieval the model made (tied scores)", flush=True)
                for g in sorted({r["group"] for r in cell}):
                    rs = [r for r in cell if r["group"] == g]
                    sd = [r["gap_sd"] for r in rs if r["gap_sd"] is not None]
                    print(f"{task:8} {L:>9} depth {d:4.2f} group {g}: retrieved {sum(r['retrieved'] for r in rs)}/{len(rs)}, "
                          f"rank median {int(np.median([r['rank'] for r in rs]))} (worst {max(r['rank'] for r in rs)}) "
                          f"of {rs[0]['chunks']}, gap {np.mean(sd):+.2f} sd (min {min(sd):+.2f}), z {np.mean([r['z'] for r in rs]):.2f}, "
                          f"first-window chunks in the others' top {cfg.top_k}: {np.mean([r['first_window'] for r in rs]):.1f} "
                          f"({time.time() - t0:.0f} s)", flush=True)
                with open(args.out, "w") as f:
                    json.dump(dict(ckpt=str(args.ckpt), seed=args.seed, trials=args.trials, dtype=dtype, tasks=tasks,
                                   lengths=lengths, depths=[round(x, 4) for x in depths], top_k=cfg.top_k,
                                   first_window_chunks=first_chunks, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
