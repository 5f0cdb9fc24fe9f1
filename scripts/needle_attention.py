"""Why a DRT misses a needle: does retrieval pick the needle's chunk, and does GCA then read the answer?

    python scripts/needle_attention.py --ckpt runs/repro/drt-needles --data data/debian-docs \
        --task passkey --length 4096 --depth 0.5 --trials 8 --out needle_attention.json

Builds task samples over the folder's held-out (val) text, runs each prompt with its answer
(teacher-forced, one pass) and prints, averaged over the trials:

- accuracy (greedy exact match) and the probability the model gives each answer token;
- retrieval: how often the chunk holding the answer is among the chunks picked for the answer's
  query chunk, the weight it gets there, the largest weight given to any other chunk, and
  ``w(first)``: the weight on the other chunks that lie in the sequence's first ``window``
  positions. Those chunks' lower-layer states saw less than a full window, which sets them apart
  whatever their text, and retrievers use them as a sink (``--first-window``); a retriever that finds
  needles pulls the weight from there to the needle's chunk;
- reading, per upper layer and head, at the answer's positions and inside the answer's chunk:
  ``answer_mass``, the attention on the answer's tokens in that chunk, and ``next_mass``, the
  attention on the one token the position should copy (answer token i's occurrence in the needle,
  when predicting answer token i). A head that found the needle but cannot tell the answer's tokens
  apart has ``next_mass`` near ``answer_mass / len(answer)`` (printed as ``even``); a head that
  copies has ``next_mass`` near ``answer_mass``.

The chunk holding the answer is where the answer's tokens occur in the prompt: the target needle for
passkey and multikey, the second needle for 2hop (asked here for its end point Z, ``hop_answer="end"``:
the chain's answer ``Y , Z`` is not one piece of any needle). GCA's attention is recomputed from the memory and
queries the model used (``chunk_attention``); tests check that it reproduces the layer's output.

``--oracle`` replaces retrieval at the answer's positions by the answer's chunk alone at weight 1 (in
every GCA layer): if the accuracy then rises, the model can read the needle and retrieval's choice or
weighting is what failed; if not, it cannot read it.

``--first-window`` measures that sink on plain held-out text (no needle): for every query chunk, the
share of its retrieval weight on the chunks of the sequence's first window, against the share those
chunks have of the chunks it could retrieve. The models of results/README.md (the shipped tiny one
too) give it nearly all their weight when nothing matches.

``--repeats`` asks the same of plain text: samples whose filler repeats pieces of itself from at least
``--repeat-gap`` tokens back (beyond the window), and the loss on the repeated tokens (digits and
words apart) and on first occurrences, with GCA as trained and with every GCA reading nothing. What
GCA lowers the repeated tokens' loss by is what the model's reading of retrieved chunks is worth.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import torch

from gca.data.tasks import canonical_kind, digit_ids, make_filler, make_task_sample
from gca.eval.cli import check_data_tokenizer, load_for_eval
from gca.model import DRT


def _find(seq: list[int], pat: list[int]) -> int:
    """Start of the only occurrence of pat in seq."""
    hits = [i for i in range(len(seq) - len(pat) + 1) if seq[i : i + len(pat)] == pat]
    if len(hits) != 1:
        raise ValueError(f"the answer occurs {len(hits)} times in the prompt, expected once")
    return hits[0]


def chunk_attention(gca, h: torch.Tensor, mem_k: torch.Tensor, positions: list[int], chunk: int, softmax_one: bool) -> torch.Tensor:
    """GCA attention probabilities of ``positions`` (internal positions, batch row 0) over the S
    positions of memory chunk ``chunk``: ``(len(positions), H, S)``, as the op computes them for a
    retrieved chunk (before the retrieval weight; with ``softmax_one`` the row sums to < 1)."""
    cfg = gca.cfg
    H, D = cfg.num_heads, cfg.head_dim
    q = gca.q(gca.norm(h[0, positions])).view(len(positions), H, D)
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # as the op computes
    q, k = q.to(cdt), mem_k[0, chunk].to(cdt)  # k: (S, Hk, D)
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # head h reads kv head h // (H // Hk)
    s = torch.einsum("thd,shd->ths", q, k) * D**-0.5
    if not softmax_one:
        return s.softmax(-1)
    e = torch.exp(s - s.amax(-1, keepdim=True).clamp(min=0))
    return e / (e.sum(-1, keepdim=True) + torch.exp(-s.amax(-1, keepdim=True).clamp(min=0)))


def _oracle_args(args: tuple, row: int, chunk: int) -> tuple:
    """GCA arguments with query row ``row`` reading memory chunk ``chunk`` alone, at weight 1."""
    h, mem_k, mem_v, indices, weights, *rest = args
    indices, weights = indices.clone(), weights.clone()
    indices[:, row] = -1
    weights[:, row] = 0
    indices[:, row, 0] = chunk
    weights[:, row, 0] = 1
    return (h, mem_k, mem_v, indices, weights, *rest)


def capture_gca(model: DRT, input_ids: torch.Tensor, oracle: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[tuple]]:
    """Logits of one full forward and, for every upper layer in order, the arguments its GCA saw:
    ``(h, mem_k, mem_v, indices, weights)``. ``oracle=(row, chunk)``: query row ``row`` reads chunk
    ``chunk`` alone at weight 1 in every GCA layer instead of what retrieval picked."""
    layers = [layer.gca for group in model.groups for layer in group]
    seen: list[tuple] = []
    hooks = []
    if oracle is not None:
        hooks += [g.register_forward_pre_hook(lambda mod, args: _oracle_args(args, *oracle)) for g in layers]
    hooks += [g.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[:5]))) for g in layers]
    try:
        logits = model(input_ids).logits
    finally:
        for hk in hooks:
            hk.remove()
    return logits, seen


def first_window_weight(ridx: list[int], rw: list[float], slot: int | None, first: int) -> float:
    """Summed weight of the retrieved chunks (``ridx`` / ``rw``, empty slots -1) that lie in the
    sequence's first ``first`` chunks, the answer's slot ``slot`` left out."""
    return float(sum(x for j, x in enumerate(rw) if j != slot and 0 <= ridx[j] < first))


@torch.no_grad()
def inspect_sample(model: DRT, s, oracle: bool = False) -> dict:
    """The numbers of one task sample (see the module docstring); ``oracle``: the answer's query row
    reads the answer's chunk alone at weight 1 (retrieval taken out of the question)."""
    cfg = model.config
    P, S = cfg.text_per_chunk, cfg.chunk_size
    dev = model.embed.weight.device
    A, pl = len(s.answer), s.prompt_len
    row = (pl - 1) // P  # the answer is predicted from positions of this chunk (pl % P == 1)
    start = _find(list(s.prompt), list(s.answer))
    chunk = start // P
    logits, seen = capture_gca(model, torch.tensor([s.input_ids], device=dev), oracle=(row, chunk) if oracle else None)
    lp = logits[0, pl - 1 : pl - 1 + A].float().log_softmax(-1)
    pred = lp.argmax(-1).tolist()
    offs = [(start + i) % P for i in range(A)]
    if offs[-1] < offs[0]:
        raise ValueError("the answer straddles a chunk boundary")
    pos = [((p // P) * S + p % P) for p in range(pl - 1, pl - 1 + A)]  # internal positions of the predictions
    assert all(x // S == row for x in pos), "the answer's predictions span two chunks"
    out = dict(answer=list(s.answer), pred=pred, correct=pred == list(s.answer),
               p_answer=[round(lp[i, a].exp().item(), 4) for i, a in enumerate(s.answer)],
               answer_chunk=chunk, query_row=row, layers=[])
    gcas = [layer.gca for group in model.groups for layer in group]
    first = cfg.window // S  # chunks wholly inside the sequence's first window
    for gca, (h, mk, _mv, idx, w) in zip(gcas, seen):
        ridx, rw = idx[0, row].tolist(), w[0, row].float().tolist()
        slot = ridx.index(chunk) if chunk in ridx else None
        layer = dict(hit=slot is not None, weight=round(rw[slot], 4) if slot is not None else 0.0,
                     max_other=round(max((x for j, x in enumerate(rw) if j != slot and ridx[j] >= 0), default=0.0), 4),
                     first_window=round(first_window_weight(ridx, rw, slot, first), 4))
        att = chunk_attention(gca, h, mk, pos, chunk, cfg.gca_softmax_one)  # (A, H, S)
        layer["answer_mass"] = [round(x, 4) for x in att[:, :, offs].sum(-1).mean(0).tolist()]
        layer["next_mass"] = [round(x, 4) for x in torch.stack([att[i, :, offs[i]] for i in range(A)]).mean(0).tolist()]
        out["layers"].append(layer)
    return out


@torch.no_grad()
def repeat_nll(model: DRT, s, digits: set[int], gca_off: bool = False) -> dict[str, list[float]]:
    """Per-token losses of one sample whose filler repeats pieces of itself from beyond the window,
    split into ``repeat_digit`` / ``repeat_word`` (second token on of a repeated piece, a digit or
    not) and ``other`` (text seen for the first time). ``gca_off``: every GCA reads nothing (weights
    0), so the difference to the model as trained is what retrieval and GCA contribute."""
    ids = torch.tensor([s.prompt], device=model.embed.weight.device)
    with model.gca_disabled() if gca_off else contextlib.nullcontext():
        logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").tolist()
    out: dict[str, list[float]] = {"repeat_digit": [], "repeat_word": [], "other": []}
    for t in range(1, len(s.prompt)):
        kind = ("repeat_digit" if s.prompt[t] in digits else "repeat_word") if s.repeat_mask[t] else "other"
        out[kind].append(nll[t - 1])
    return out


def summarise(rows: list[dict]) -> dict:
    n_layers = len(rows[0]["layers"])
    A = len(rows[0]["answer"])
    layers = []
    for li in range(n_layers):
        ls = [r["layers"][li] for r in rows]
        hit = [x for x in ls if x["hit"]]
        am = np.mean([x["answer_mass"] for x in ls], 0)
        nm = np.mean([x["next_mass"] for x in ls], 0)
        layers.append(dict(
            hit=round(float(np.mean([x["hit"] for x in ls])), 4),
            weight_when_hit=round(float(np.mean([x["weight"] for x in hit])), 4) if hit else None,
            max_other=round(float(np.mean([x["max_other"] for x in ls])), 4),
            first_window=round(float(np.mean([x["first_window"] for x in ls])), 4),
            answer_mass=[round(float(x), 4) for x in am], next_mass=[round(float(x), 4) for x in nm],
            next_mass_if_even=[round(float(x) / A, 4) for x in am],
        ))
    return dict(accuracy=round(float(np.mean([r["correct"] for r in rows])), 4),
                p_answer=[round(float(x), 4) for x in np.mean([r["p_answer"] for r in rows], 0)], layers=layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default=None, help="a prepared folder: filler from its val split (default: word filler)")
    p.add_argument("--task", default="passkey", help="passkey, multikey or 2hop")
    p.add_argument("--length", type=int, default=4096, help="prompt length in tokens (a full forward: keep it moderate on a CPU)")
    p.add_argument("--depth", type=float, default=0.5, help="relative depth of the target needle in [0, 1]")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, ...")
    p.add_argument("--oracle", action="store_true",
                   help="the answer's positions read the answer's chunk alone at weight 1 instead of what retrieval "
                        "picked: the accuracy then measures reading alone")
    p.add_argument("--repeats", action="store_true",
                   help="instead of the task: the loss on filler pieces repeated from beyond the window (digit "
                        "runs in the filler with --digits), with GCA as trained and with GCA reading nothing")
    p.add_argument("--first-window", action="store_true",
                   help="instead of the task: on plain text, the retrieval weight on the sequence's first window "
                        "by query chunk, against those chunks' share of the candidates (a position bias)")
    p.add_argument("--repeat-gap", type=int, default=600, help="--repeats: a piece repeats from >= this many tokens back")
    p.add_argument("--digits", type=float, default=0.05, help="--repeats: share of the filler in digit runs")
    p.add_argument("--top-k", type=int, default=None,
                   help="retrieve this many chunks instead of the model's top_k (does the needle rank among the first few?)")
    p.add_argument("--out", default=None, help="write the summary and every trial here as JSON")
    a = p.parse_args()
    if not 0.0 <= a.depth <= 1.0:
        raise SystemExit(f"--depth must be in [0, 1], got {a.depth}")
    if a.trials < 1:
        raise SystemExit(f"--trials must be >= 1, got {a.trials}")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    m, _, tok = load_for_eval(a.ckpt, a.device, "float32")
    if m.config.arch != "drt":
        raise SystemExit(f"{a.ckpt} is a {m.config.arch!r} model: no retrieval to inspect")
    if a.data:
        try:
            check_data_tokenizer(tok, a.data, "--data")
        except ValueError as e:
            p.error(str(e))
    if a.top_k is not None:
        if a.top_k < 1:
            raise SystemExit(f"--top-k must be >= 1, got {a.top_k}")
        m.config.top_k = a.top_k
    task = canonical_kind(a.task)
    rng = np.random.default_rng(a.seed)
    if a.repeats:
        return _main_repeats(m, a, task, rng)
    if a.first_window:
        return _main_first_window(m, a, rng)
    filler = make_filler(a.data, split="val") if a.data else None
    rows = [inspect_sample(m, make_task_sample(task, context_len=a.length, seed=rng, filler=filler, depth=a.depth,
                                               text_per_chunk=m.config.text_per_chunk, hop_answer="end"), oracle=a.oracle)
            for _ in range(a.trials)]
    summ = summarise(rows)
    print(f"{task} at {a.length} tokens, depth {a.depth}, {a.trials} trials{' (oracle retrieval)' if a.oracle else ''}: accuracy {summ['accuracy']:.0%}, "
          f"p(answer token) {summ['p_answer']}")
    print(f"{'layer':>5} {'hit':>5} {'w(hit)':>7} {'w(other)':>8} {'w(first)':>8}  best head: {'answer':>6} {'next':>6} {'even':>6}")
    for li, x in enumerate(summ["layers"]):
        hd = int(np.argmax(x["answer_mass"]))
        w = f"{x['weight_when_hit']:.3f}" if x["weight_when_hit"] is not None else "-"
        print(f"{li:5d} {x['hit']:5.0%} {w:>7} {x['max_other']:8.3f} {x['first_window']:8.3f}  head {hd}:     "
              f"{x['answer_mass'][hd]:6.3f} {x['next_mass'][hd]:6.3f} {x['next_mass_if_even'][hd]:6.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(ckpt=a.ckpt, task=task, length=a.length, depth=a.depth, trials=a.trials, seed=a.seed, oracle=a.oracle,
                           top_k=m.config.top_k,
                           summary=summ, rows=rows), f, indent=1)


@torch.no_grad()
def first_window_share(model: DRT, ids: list[int]) -> list[dict]:
    """For each query chunk of one sequence (past the first two windows) and each upper layer: the
    retrieval weight on chunks inside the first ``window`` positions (``share``) and those chunks'
    fraction of the chunks before the query chunk (``expected``, what position-blind picks would give
    on average)."""
    cfg = model.config
    first = cfg.window // cfg.chunk_size
    _, seen = capture_gca(model, torch.tensor([ids], device=model.embed.weight.device))
    out = []
    for li, (_h, _mk, _mv, idx, w) in enumerate(seen):
        for row in range(2 * first, idx.shape[1]):
            ridx, rw = idx[0, row].tolist(), w[0, row].float().tolist()
            out.append(dict(layer=li, row=row, share=round(first_window_weight(ridx, rw, None, first), 4),
                            expected=round(first / row, 4)))
    return out


def _main_first_window(m: DRT, a, rng: np.random.Generator) -> None:
    filler = make_filler(a.data, split="val")  # None: the embedded word filler
    rows = []
    for _ in range(a.trials):
        rows += first_window_share(m, [int(t) for t in filler.tokens(a.length, rng)])
    bands: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        lo = 16 * (r["row"] // 16)
        bands.setdefault((r["layer"], lo), []).append(r)
    print(f"plain text, {a.trials} sequences of {a.length} tokens: retrieval weight on the first "
          f"{m.config.window // m.config.chunk_size} chunks (the first window) against their share of the candidates")
    print(f"{'layer':>5} {'query chunks':>13} {'weight':>7} {'their share':>11}")
    summary = []
    for (li, lo), rs in sorted(bands.items()):
        wgt, exp = float(np.mean([r["share"] for r in rs])), float(np.mean([r["expected"] for r in rs]))
        summary.append(dict(layer=li, rows=[lo, lo + 15], weight=round(wgt, 4), expected=round(exp, 4)))
        print(f"{li:5d} {f'{lo}-{lo + 15}':>13} {wgt:7.3f} {exp:11.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(ckpt=a.ckpt, mode="first_window", length=a.length, trials=a.trials, seed=a.seed,
                           summary=summary, rows=rows), f, indent=1)


def _main_repeats(m: DRT, a, task: str, rng: np.random.Generator) -> None:
    filler = make_filler(a.data, split="val", digit_frac=a.digits)
    digits = set(digit_ids(filler.tokenizer))
    samples = [make_task_sample(task, context_len=a.length, seed=rng, filler=filler, depth=a.depth, repeat_prob=1.0,
                                repeat_gap=a.repeat_gap, text_per_chunk=m.config.text_per_chunk, hop_answer="end")
               for _ in range(a.trials)]
    res = {}
    for name, off in (("gca", False), ("gca_off", True)):
        pooled: dict[str, list[float]] = {"repeat_digit": [], "repeat_word": [], "other": []}
        for smp in samples:
            for k, v in repeat_nll(m, smp, digits, gca_off=off).items():
                pooled[k] += v
        res[name] = {k: dict(nll=round(float(np.mean(v)), 4), tokens=len(v)) for k, v in pooled.items() if v}
    print(f"loss (nats a token) on {a.trials} samples of {a.length} tokens, pieces repeated from >= {a.repeat_gap} back:")
    print(f"{'tokens':>14} {'count':>7} {'with GCA':>9} {'GCA off':>8}")
    for k in res["gca"]:
        print(f"{k:>14} {res['gca'][k]['tokens']:7d} {res['gca'][k]['nll']:9.3f} {res['gca_off'][k]['nll']:8.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(ckpt=a.ckpt, mode="repeats", length=a.length, trials=a.trials, seed=a.seed,
                           repeat_gap=a.repeat_gap, digits=a.digits, result=res), f, indent=1)


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "needle_attention.py")
