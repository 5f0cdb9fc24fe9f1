"""Which passkeys does a model miss, and is it the length? Two probes of a passkey checkpoint.

    python scripts/passkey_digit_runs.py runs --ckpt checkpoints/passkey-tiny --length 2016 --samples 40 --depth 0
    python scripts/passkey_digit_runs.py trial --ckpt checkpoints/passkey-tiny --length 1M --seed 3032 --depth-index 0 \
        --depths 5 --trials 4 --keep 8,40,400

``runs``: draws passkey samples (embedded filler, random depth unless ``--depth``), keeps those whose
5-digit key has ``--min-run`` or more equal digits in a row (about 2.5% of keys for 3), and scores each
one teacher-forced: whether every answer digit is the argmax, and the probability of the weakest digit.

``trial``: rebuilds the trials ``gca eval tasks --seed S --lengths L --depths D --trials T`` scored at one
depth (the same samples: :func:`gca.eval.tasks.evaluate_tasks` seeds each (task, length, depth) with
``[S, 0, length index, depth index]``; ``--length-index`` when L was not the first length), and decodes
each greedily from shortened prompts: the first ``--head`` chunks (the needle at depth 0) followed by the
prompt's last ``K`` whole chunks, for each K of ``--keep``. The chunk grid is kept, so the question sits
where it did and what changes is only how much filler lies between. A miss that stays at every K is the
key, not the length. Neither probe's numbers are evaluation results: they use the evaluation's samples
(``trial``) or fresh draws (``runs``) to look at a failure, after the fact.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from gca.data.tasks import make_task_sample
from gca.eval.cli import _device, parse_lengths
from gca.train.checkpoint import load_model


def longest_run(key) -> int:
    """Length of the longest run of equal tokens in ``key``."""
    return max(len(list(g)) for _, g in itertools.groupby(list(key)))


@torch.no_grad()
def answer_probs(model, prompt, answer, greedy: bool = False) -> tuple[list[int], list[float]]:
    """Stream ``prompt`` then the answer's tokens: the argmax at each answer position and the probability
    of the right token there. Teacher-forced (the right token is fed back) unless ``greedy``."""
    dev = model.embed.weight.device
    cache = model.new_cache(1, prefill_chunk=4096, max_tokens=len(prompt) + len(answer) + 1)
    logits = model(torch.tensor([list(prompt)], device=dev), cache=cache, logits_to_keep=1).logits[:, -1]
    pred, probs = [], []
    for a in answer:
        p = logits.float().softmax(-1)[0]
        pred.append(int(p.argmax()))
        probs.append(float(p[a]))
        nxt = pred[-1] if greedy else int(a)
        logits = model(torch.tensor([[nxt]], device=dev), cache=cache).logits[:, -1]
    return pred, probs


def digit_runs(model, length: int, samples: int, min_run: int = 3, depth: float | None = None, seed: int = 9902,
               max_draws: int = 100_000) -> dict:
    """Teacher-forced scores of ``samples`` passkeys with a run of ``min_run`` equal digits or more."""
    P = model.config.text_per_chunk
    rng = np.random.default_rng([seed, length])
    rows, drawn = [], 0
    while len(rows) < samples and drawn < max_draws:
        d = float(rng.uniform()) if depth is None else depth
        s = make_task_sample("passkey", context_len=length, seed=rng, depth=d, text_per_chunk=P)
        drawn += 1
        if longest_run(s.answer) < min_run:
            continue
        pred, probs = answer_probs(model, s.prompt, s.answer)
        rows.append(dict(answer=list(s.answer), depth=round(d, 3), correct=pred == list(s.answer),
                         weakest=round(min(probs), 4)))
    weak = np.array([r["weakest"] for r in rows]) if rows else np.zeros(0)
    return dict(length=length, depth=depth, min_run=min_run, drawn=drawn, samples=len(rows),
                correct=float(np.mean([r["correct"] for r in rows])) if rows else None,
                weakest_median=float(np.median(weak)) if rows else None,
                weakest_below_half=float(np.mean(weak < 0.5)) if rows else None, rows=rows)


def eval_trials(model, length: int, seed: int, depth_index: int, depths: int, trials: int, length_index: int = 0):
    """The passkey samples ``gca eval tasks`` scored at this (length, depth) (task index 0)."""
    from gca.eval.tasks import _depth_list

    d = _depth_list(depths)[depth_index]
    rng = np.random.default_rng([seed, 0, length_index, depth_index])
    P = model.config.text_per_chunk
    return [make_task_sample("passkey", context_len=length, seed=rng, depth=d, text_per_chunk=P) for _ in range(trials)]


def shortened(prompt, P: int, head: int, keep: int) -> list[int]:
    """The first ``head`` chunks of ``prompt`` and its last ``keep`` whole chunks plus the partial one
    (the chunk grid unchanged); the whole prompt when that is not shorter."""
    prompt = list(prompt)
    tail = P * max(len(prompt) // P - keep, head)
    return prompt[: P * head] + prompt[tail:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["runs", "trial"])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--length", required=True, help="tokens (2016, 64K, 1M)")
    ap.add_argument("--samples", type=int, default=40, help="runs: keys with a digit run to score")
    ap.add_argument("--min-run", type=int, default=3, help="runs: equal digits in a row, at least")
    ap.add_argument("--depth", type=float, default=None, help="runs: needle depth (default: uniform per sample)")
    ap.add_argument("--seed", type=int, default=9902, help="runs: sample seed; trial: the evaluation's --seed")
    ap.add_argument("--depth-index", type=int, default=0, help="trial: which of the evaluation's depths")
    ap.add_argument("--depths", type=int, default=5, help="trial: the evaluation's --depths")
    ap.add_argument("--trials", type=int, default=4, help="trial: the evaluation's --trials")
    ap.add_argument("--length-index", type=int, default=0, help="trial: the length's place in the evaluation's --lengths")
    ap.add_argument("--head", type=int, default=2, help="trial: leading chunks kept")
    ap.add_argument("--keep", default="8,40,400", help="trial: trailing chunks kept, comma-separated (0: the whole prompt)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args()
    model = load_model(a.ckpt).float().to(_device(a.device)).eval()
    (length,) = parse_lengths(a.length, None)
    if a.probe == "runs":
        res = digit_runs(model, length, a.samples, a.min_run, a.depth, a.seed)
        print(f"{a.ckpt} length {length} depth {a.depth}: {res['samples']} keys with {a.min_run}+ equal digits in a "
              f"row (of {res['drawn']} drawn): all digits right {res['correct']}, weakest digit's probability: "
              f"median {res['weakest_median']}, below 0.5 in {res['weakest_below_half']}")
    else:
        P = model.config.text_per_chunk
        res = []
        for i, s in enumerate(eval_trials(model, length, a.seed, a.depth_index, a.depths, a.trials, a.length_index)):
            for keep in [int(k) for k in a.keep.split(",")]:
                prompt = list(s.prompt) if keep == 0 else shortened(s.prompt, P, a.head, keep)
                pred, probs = answer_probs(model, prompt, s.answer, greedy=True)
                res.append(dict(trial=i, keep=keep, prompt_length=len(prompt), answer=list(s.answer), pred=pred,
                                correct=pred == list(s.answer), probs=[round(p, 3) for p in probs]))
                print(f"trial {i} prompt {len(prompt):>8} answer {list(s.answer)} greedy {pred} "
                      f"{'right' if pred == list(s.answer) else 'WRONG'}; p(right digit) {res[-1]['probs']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "passkey_digit_runs.py")
