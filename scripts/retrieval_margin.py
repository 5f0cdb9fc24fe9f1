"""Does retrieval rank a passkey needle first on the training data's own samples, by how much, and
how often does training's Gumbel top-k pick it?

    python scripts/retrieval_margin.py --ckpt EXPORT --data data/debian-docs --length 4032 --samples 8

Draws passkey samples as the copy stages train on them (``gca.data.tasks.TaskSource`` over the
folder's held-out split, filler repeating pieces of itself, runs of digits), and for each sample:

- the needle chunk's rank among the chunks the question's retrieval may pick (noise-free scores of
  the first retrieval group), its score minus the best other chunk's (the margin), and the spread
  (standard deviation) of that row of scores: near 0 means retrieval no longer tells chunks apart;
- the share of ``--draws`` Gumbel(0, 1) top-k draws (what training picks) that include the needle;
- with ``--accuracy``, whether the model predicts every answer token (teacher-forced argmax).

Prints the means and writes them, with the per-sample values, to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from gca.data.tasks import TaskSource
from gca.eval.cli import _device, check_data_tokenizer, load_for_eval
from gca.retrieval import causal_topk, retrieval_scores


def question_scores(model, prompt: torch.Tensor) -> torch.Tensor:
    """First retrieval group's noise-free scores ``(C, C)`` of a ``(1, L)`` prompt (rows: landmarks)."""
    cfg = model.config
    ids, _ = model.insert_landmarks(prompt)
    S = cfg.chunk_size
    C = ids.shape[1] // S
    h = model.embed(ids)
    cos, sin = model._rope(h.shape[1], h.device)
    for layer in model.lower:
        h = model._layer(layer, h, cos, sin)
    lmk, _, _ = model._layer(model.encoder, h.view(1, C, S, -1))
    query = model.retr_norms[0](h.view(1, C, S, -1)[:, :, -1])
    return retrieval_scores(query, lmk)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a DRT run, checkpoint or export folder")
    ap.add_argument("--data", required=True, help="prepared corpus folder (its val split is the filler)")
    ap.add_argument("--length", type=int, default=4032, help="sample length in tokens (the training length)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--draws", type=int, default=200, help="Gumbel top-k draws per sample")
    ap.add_argument("--repeat-frac", type=float, default=0.6)
    ap.add_argument("--digits", type=float, default=0.08)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--accuracy", action="store_true", help="also score the answer (one more full pass a sample)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    device = _device(a.device)
    model, _, tok = load_for_eval(a.ckpt, device, "float32")
    if model.config.arch != "drt":
        raise SystemExit(f"{a.ckpt} is a {model.config.arch} model: it has no retrieval to measure")
    try:
        check_data_tokenizer(tok, a.data, "--data")
    except ValueError as e:
        ap.error(str(e))
    if a.samples < 1 or a.draws < 1:
        ap.error("--samples and --draws must be >= 1")
    src = TaskSource("passkey", a.length, filler=a.data, split="val", seed=a.seed, loss_on="answer",
                     repeat_prob=1.0, repeat_frac=a.repeat_frac, digit_frac=a.digits,
                     text_per_chunk=model.config.text_per_chunk)  # needle and question chunks on the model's grid
    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    with torch.no_grad():
        for gid in range(a.samples):
            s, _ = src.sample_task(gid)
            sc = question_scores(model, torch.tensor(s.input_ids[: s.prompt_len], device=device)[None]).cpu()
            r, t = s.query_chunk, s.target_chunk
            row = sc[r, :r]
            others = torch.cat([row[:t], row[t + 1 :]])
            picked = sum(
                bool((causal_topk(sc[None], model.config.top_k, gumbel=True, generator=gen).indices[0, r] == t).any())
                for _ in range(a.draws)
            )
            out = dict(rank=int((row > row[t]).sum()), margin=round(float(row[t] - others.max()), 4),
                       spread=round(float(row.std()), 4), p_gumbel_pick=picked / a.draws, candidates=int(r))
            if a.accuracy:
                ids, labels = src.sample(gid)
                logits = model(torch.tensor(ids, device=device)[None])
                logits = getattr(logits, "logits", logits)
                pos = np.nonzero(labels != -100)[0]
                out["correct"] = bool((logits[0, pos - 1].argmax(-1).cpu().numpy() == labels[pos]).all())
            rows.append(out)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    print(f"{a.ckpt}, {a.length} tokens, {a.samples} samples: needle rank {mean['rank']:.2f} (0 = first), "
          f"margin {mean['margin']:+.2f}, score spread {mean['spread']:.2f}, picked by Gumbel top-"
          f"{model.config.top_k} {mean['p_gumbel_pick']:.2f}" + (f", accuracy {mean['correct']:.2f}" if a.accuracy else ""))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(ckpt=a.ckpt, length=a.length, samples=a.samples, seed=a.seed, mean=mean, rows=rows), f, indent=1)


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "retrieval_margin.py")
