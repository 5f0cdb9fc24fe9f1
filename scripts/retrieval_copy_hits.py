"""Does a DRT's retrieval find the chunk a token could be copied from? For every scored held-out token
whose nearest earlier exact (n + 1)-gram match lies beyond the sliding window but inside the context,
whether the retrieval that serves it picked the chunk holding that match, and with what weight,
against what picks blind to the text would get.

    python scripts/retrieval_copy_hits.py --ckpt runs/fold/drt-s1-dis --data data/debian-docs-folders \
        --lengths 1x,64x --windows 16 --device cuda --dtype bfloat16 --out copy_hits_s1.json
    python scripts/retrieval_copy_hits.py --summary copy_hits_s1.json copy_hits_s2.json   # saved files, one table

The text scored is that of ``gca eval ppl --windows W --targets 1x`` (and ``scripts/loss_by_copy_distance.py``)
with the same ``--seed``: W fixed end points in the validation split, the last training length of
tokens before each. A token at window position t (predicted from position t - 1) whose nearest match
is d tokens back (``scripts/far_context.py``) can be copied from the token at t - d, in chunk
``(t - d) // P`` (P text tokens a chunk). The query position t - 1 lies in chunk q = (t - 1) // P, which
reads the retrieval made at the landmark of chunk q - 1: the top-k among chunks 0 .. q - 2.

For each context length, retrieval group and distance bin (``--bins``, tokens back): ``tokens``,
``hit`` (the share of tokens whose source chunk was picked), ``near_hit`` (it or a neighbour, whose
end or start may hold the n tokens of context), ``weight`` (mean retrieval weight on the source chunk,
0 when not picked), ``chance`` (the mean of k / candidates: picks blind to the text). A hit rate far
above chance says retrieval finds what is copyable; near chance, the model cannot be reading far
copies through retrieval, whatever it does with what it reads.

``--oracle`` asks the other half: can the model read a copy once its chunk is retrieved? A second pass
over the same text in which every retrieval row serving a far-copyable token picks that token's
source chunk alone (the row's distinct source chunks, most tokens first, up to k, at equal weights
summing to 1, as a softmax over the picks does) in every retrieval group; other rows keep what the
model picked. Saved under ``oracle``, per context length and distance bin: the far-copyable tokens'
perplexity as retrieved (``ppl``) and with the oracle's picks (``ppl_oracle``); the row ``other`` is
the remaining scored tokens of those rows (what the oracle took from them), and ``in window`` the
tokens whose match lies inside the sliding window, as retrieved: how well the model copies when its
own attention sees the source. A far-copyable perplexity that falls to near the in-window one says
the reading works and retrieval's picks are what fail; one that barely moves says the model cannot
use a retrieved copy, whatever retrieval picks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from far_context import match_distance, nearest_previous, ngram_hashes  # noqa: E402

import gca.model as gca_model  # noqa: E402
from gca.eval.cli import check_data_tokenizer, load_for_eval, parse_lengths  # noqa: E402
from gca.eval.perplexity import fixed_end_points, stream_token_nll  # noqa: E402
from gca.retrieval import Retrieval, causal_topk  # noqa: E402


def far_copy_targets(dist: np.ndarray, n: int, ends: np.ndarray, N: int, T: int, window: int, P: int) -> dict:
    """The scored tokens (the last T before each end point, with N tokens of context) whose nearest
    earlier (n + 1)-gram match is more than ``window`` tokens back and inside the context, and that a
    retrieval row can reach. Returns arrays over those tokens: ``w`` (which end point), ``t`` (position
    in the N-token window), ``d`` (tokens back), ``source`` (the chunk of the token to copy), ``row``
    (the retrieval row serving it: query chunk - 1)."""
    t = np.arange(N - T, N)[None, :].repeat(len(ends), 0)  # positions in each window
    d = match_distance(dist, n, ends[:, None] - N + t)
    keep = (d > window) & (d <= t)
    w, t, d = np.nonzero(keep)[0], t[keep], d[keep]
    source = (t - d) // P
    row = (t - 1) // P - 1
    ok = (row >= 1) & (source <= row - 1)  # row r picks among chunks 0 .. r - 1
    return dict(w=w[ok], t=t[ok], d=d[ok], source=source[ok], row=row[ok])


class RecordRetrieval:
    """Replaces :func:`gca.retrieval.causal_topk` in :mod:`gca.model` while active and keeps every pick:
    ``picks[g]`` holds ``(row_offset, indices (B, rows, k), weights)`` per call of retrieval group g
    (the streaming forward calls each group once per piece, in order)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.calls = 0
        self.picks: list[list] = [[] for _ in range(groups)]

    def pick(self, scores, k, row_offset, **kw) -> Retrieval:
        """The retrieval this hook hands the model: the model's own here."""
        return causal_topk(scores, k, row_offset=row_offset, **kw)

    def __call__(self, scores, k, *, row_offset=0, **kw):
        r = self.pick(scores, k, row_offset, **kw)
        self.picks[self.calls % self.groups].append((int(row_offset), r.indices.cpu(), r.weights.float().cpu()))
        self.calls += 1
        return r

    def table(self, g: int, B: int, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Group g's picks as ``(B, rows, k)`` indices (-1 where no row was made) and weights."""
        idx = np.full((B, rows, k), -1, dtype=np.int64)
        wt = np.zeros((B, rows, k), dtype=np.float64)
        for off, i, w in self.picks[g]:
            n = min(i.shape[1], rows - off)
            idx[:, off : off + n, : i.shape[2]] = i[:, :n].numpy()
            wt[:, off : off + n, : w.shape[2]] = w[:, :n].numpy()
        return idx, wt


def distance_spans(bins: list[int]) -> list[tuple[str, float, float]]:
    """``(label, lo, hi)`` of every distance bin ``[bins[i], bins[i + 1])`` (the last open-ended), after
    ``("all", 0, inf)``."""
    edges = list(bins) + [np.inf]
    return [("all", 0, np.inf)] + [(f"{lo}+" if hi == np.inf else f"{lo}-{int(hi)}", lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


def oracle_table(tg: dict, B: int, rows: int, k: int) -> np.ndarray:
    """``(B, rows, k)`` chunk indices (-1 = empty) of the oracle's picks: each row serving far-copyable
    tokens (:func:`far_copy_targets`) gets its distinct source chunks, those of the most tokens first
    (ties: the nearer chunk), up to k; every other row is -1 throughout."""
    table = np.full((B, rows, k), -1, dtype=np.int64)
    keys = np.stack([tg["w"], tg["row"], tg["source"]], 1)
    if not len(keys):
        return table
    uniq, counts = np.unique(keys, axis=0, return_counts=True)
    w, row, src = uniq.T
    order = np.lexsort((-src, -counts, row, w))  # per (w, row): most tokens first, then the later chunk
    w, row, src = w[order], row[order], src[order]
    first = np.r_[True, (w[1:] != w[:-1]) | (row[1:] != row[:-1])]
    start = np.maximum.accumulate(np.where(first, np.arange(len(w)), 0))
    slot = np.arange(len(w)) - start
    keep = slot < k
    table[w[keep], row[keep], slot[keep]] = src[keep]
    return table


class OracleRetrieval(RecordRetrieval):
    """:class:`RecordRetrieval` that replaces the picks of the rows :func:`oracle_table` fills by its
    chunks at equal weights (summing to 1); the other rows keep the model's picks."""

    def __init__(self, groups: int, table: np.ndarray):
        super().__init__(groups)
        self.oracle = torch.from_numpy(table)

    def pick(self, scores, k, row_offset, **kw) -> Retrieval:
        r = causal_topk(scores, k, row_offset=row_offset, **kw)
        B, n, kk = r.indices.shape
        part = self.oracle[:, row_offset : row_offset + n, :kk].to(r.indices.device)
        if part.shape[1] < n:  # rows past the table's end (none when it covers the context)
            part = torch.cat([part, part.new_full((B, n - part.shape[1], kk), -1)], 1)
        valid = part >= 0
        use = valid.any(-1, keepdim=True)
        w = valid.to(r.weights.dtype) / valid.sum(-1, keepdim=True).clamp(min=1).to(r.weights.dtype)
        return Retrieval(indices=torch.where(use, part, r.indices), weights=torch.where(use, w, r.weights),
                         scores=torch.where(use, torch.zeros_like(r.scores), r.scores))


def oracle_rows(tg: dict, nll: np.ndarray, nll_oracle: np.ndarray, table: np.ndarray, dist: np.ndarray, n: int,
                ends: np.ndarray, N: int, T: int, window: int, P: int, bins: list[int]) -> list[dict]:
    """Per distance bin (and ``all``) of the far-copyable tokens, their perplexity as retrieved and with
    the oracle's picks; ``other``: the other scored tokens of the rows the oracle filled; ``in window``:
    the scored tokens whose nearest match lies inside the window (and the context), as retrieved. ``nll`` / ``nll_oracle``:
    ``(B, T)`` per-token NLLs of the scored tokens (window positions N - T .. N - 1)."""
    ppl = lambda x: float(np.exp(x.mean())) if x.size else None  # noqa: E731
    out = []
    j = tg["t"] - (N - T)
    spans = distance_spans(bins)
    for label, lo, hi in spans:
        sel = (tg["d"] >= lo) & (tg["d"] < hi)
        a, b = nll[tg["w"][sel], j[sel]], nll_oracle[tg["w"][sel], j[sel]]
        out.append(dict(bin=label, tokens=int(sel.sum()), ppl=ppl(a), ppl_oracle=ppl(b)))
    t = np.arange(N - T, N)
    row = np.clip((t - 1) // P - 1, 0, None)
    filled = (table[:, row] >= 0).any(-1)  # (B, T): the token's row was filled by the oracle
    far = np.zeros_like(filled)
    far[tg["w"], j] = True
    other = filled & ~far & ((t - 1) // P - 1 >= 0)[None]
    out.append(dict(bin="other", tokens=int(other.sum()), ppl=ppl(nll[other]), ppl_oracle=ppl(nll_oracle[other])))
    d = match_distance(dist, n, ends[:, None] - N + t[None])
    near = (d > 0) & (d <= window) & (d <= t[None])  # inside the context too
    out.append(dict(bin="in window", tokens=int(near.sum()), ppl=ppl(nll[near]), ppl_oracle=ppl(nll_oracle[near])))
    return out


def score_hits(tg: dict, idx: np.ndarray, wt: np.ndarray, bins: list[int]) -> list[dict]:
    """Hit statistics of one group's picks ``idx``/``wt`` ``(B, rows, k)`` on the targets ``tg``
    (:func:`far_copy_targets`), per distance bin ``[bins[i], bins[i + 1])`` and over all."""
    picked = idx[tg["w"], tg["row"]]  # (tokens, k)
    weights = wt[tg["w"], tg["row"]]
    src = tg["source"][:, None]
    exact = picked == src
    near = (np.abs(picked - src) <= 1) & (picked >= 0)
    k = idx.shape[2]
    chance = np.minimum(k, tg["row"]) / np.maximum(tg["row"], 1)
    out = []
    spans = distance_spans(bins)
    for label, lo, hi in spans:
        sel = (tg["d"] >= lo) & (tg["d"] < hi)
        m = int(sel.sum())
        out.append(dict(
            bin=label,
            tokens=m,
            hit=float(exact[sel].any(1).mean()) if m else None,  # None (JSON null): no such tokens
            near_hit=float(near[sel].any(1).mean()) if m else None,
            weight=float((weights[sel] * exact[sel]).sum(1).mean()) if m else None,
            chance=float(chance[sel].mean()) if m else None,
        ))
    return out


def _folder_labels(files: list[str]) -> list[str]:
    """Each file's folder name, or as many folders above it as it takes for files in different folders
    to get different labels (``a/eval``, ``b/eval``); the same folder twice keeps one label."""
    parents = [Path(f).resolve().parent for f in files]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in parents]
        if len(set(labels)) == len(set(parents)) or depth >= max(len(p.parts) for p in parents):
            return labels
        depth += 1


def summarize(files: list[str]) -> list[str]:
    """One markdown table of saved files (``--summary``): per model, context length and group, the
    far-copyable tokens, hit / near hit / weight / chance over all of them, and the hit rate per
    distance bin; the first column is each file's folder (runs of the same name in other folders),
    with as many of the folders above it as tell apart files whose folders share a name.
    Returns the lines it printed."""
    lines, bins = [], None
    labels = _folder_labels(files)
    saved = [json.loads(Path(path).read_text()) for path in files]
    for path, label, data in zip(files, labels, saved):
        rows = data["rows"]
        these = [r["bin"] for r in rows if r["bin"] != "all"]
        these = list(dict.fromkeys(these))
        if bins is None:
            bins = these
            lines += [f"| folder | model | context | group | tokens | hit | near hit | weight | chance | hit by distance ({' / '.join(bins)}) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
        elif these != bins:
            raise SystemExit(f"{path}: distance bins {these}, the first file's {bins}: summarise them apart")
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        for r in rows:
            if r["bin"] != "all":
                continue
            per = [q for q in rows if (q["model"], q["context_length"], q["group"]) == (r["model"], r["context_length"], r["group"])
                   and q["bin"] != "all"]
            weight = "-" if r["weight"] is None else f"{r['weight']:.3f}"
            lines.append(f"| {label} | {r['model']} | {r['context_length']} | {r['group']} | {r['tokens']} | {pct(r['hit'])} | "
                         f"{pct(r['near_hit'])} | {weight} | {pct(r['chance'])} | {' / '.join(pct(q['hit']) for q in per)} |")
    oracle = [(j, r) for j, data in enumerate(saved) for r in data.get("oracle", [])]
    if oracle:  # files made with --oracle: a second table, one line per model and length
        lines += ["", "| folder | model | context | far-copyable tokens | their ppl as retrieved | reading their source chunks "
                  "| other tokens of those rows: as retrieved / oracle | in-window copies |", "|---|---|---|---|---|---|---|---|"]
        num = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        for j, r in oracle:  # grouped by file, so files whose folders share a name stay apart
            if r["bin"] != "all":
                continue
            key = (j, r["model"], r["context_length"])
            same = {q["bin"]: q for f, q in oracle if (f, q["model"], q["context_length"]) == key}
            o, w = same["other"], same["in window"]
            lines.append(f"| {labels[j]} | {r['model']} | {r['context_length']} | {r['tokens']} | {num(r['ppl'])} | {num(r['ppl_oracle'])} | "
                         f"{num(o['ppl'])} / {num(o['ppl_oracle'])} | {num(w['ppl'])} |")
    print("\n".join(lines))
    return lines


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summary"]:  # reprint saved files as one table, without the models
        if len(argv) < 2:
            raise SystemExit("usage: retrieval_copy_hits.py --summary FILE.json [FILE.json ...]")
        return summarize(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a DRT run or export folder")
    ap.add_argument("--name", default=None)
    ap.add_argument("--data", required=True, help="a prepared dataset folder (its val split)")
    ap.add_argument("--lengths", default="1x,64x", help="context lengths (tokens, or multiples of the training length)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234, help="the end points' seed (gca eval ppl's default)")
    ap.add_argument("--n", type=int, default=8, help="context tokens a match must share (default 8)")
    ap.add_argument("--bins", default="512,4096,65536", help="distance bin edges, tokens back")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--oracle", action="store_true",
                    help="also score the text again with the far-copyable tokens' rows reading their source chunks (above)")
    ap.add_argument("--out", required=True, help="JSON file, rewritten after every length")
    a = ap.parse_args(argv)
    bins = sorted(int(x) for x in a.bins.split(","))
    if a.n < 1 or a.windows < 1 or not bins:
        ap.error("--n and --windows must be >= 1, --bins non-empty")

    from gca.data import PackedDataset

    model, train_length, tok = load_for_eval(a.ckpt, a.device, a.dtype)
    try:
        check_data_tokenizer(tok, a.data, "--data")
    except ValueError as e:
        ap.error(str(e))
    cfg = model.config
    if cfg.arch != "drt":
        ap.error(f"{a.ckpt} is a {cfg.arch!r} model; retrieval hits need a DRT")
    lengths = parse_lengths(a.lengths, train_length)
    T = min(lengths) - 1  # as perplexity_vs_length(targets=min(lengths))
    tokens = np.asarray(PackedDataset(a.data, "val").tokens, dtype=np.int64)
    if max(lengths) > len(tokens):
        ap.error(f"the validation split has {len(tokens)} tokens, fewer than the context length {max(lengths)}")
    dist = nearest_previous(ngram_hashes(tokens, a.n))
    ends = fixed_end_points(len(tokens), lengths, a.windows, np.random.default_rng(a.seed))
    P, window, groups = cfg.text_per_chunk, cfg.window or 0, len(model.groups)
    rows_out, oracle_out, ppl = [], [], {}
    real = gca_model.causal_topk
    try:
        for N in lengths:
            ids = torch.from_numpy(np.stack([tokens[e - N : e] for e in ends]))
            hook = RecordRetrieval(groups)
            gca_model.causal_topk = hook
            nll = stream_token_nll(model, ids, last=T).double().numpy()
            gca_model.causal_topk = real
            ppl[str(N)] = float(np.exp(nll.mean()))
            tg = far_copy_targets(dist, a.n, ends, N, T, window, P)
            if a.oracle:
                table = oracle_table(tg, len(ends), N // P, cfg.top_k)
                gca_model.causal_topk = OracleRetrieval(groups, table)
                nll_oracle = stream_token_nll(model, ids, last=T).double().numpy()
                gca_model.causal_topk = real
                for r in oracle_rows(tg, nll, nll_oracle, table, dist, a.n, ends, N, T, window, P, bins):
                    oracle_out.append(dict(model=a.name or a.ckpt, context_length=N, **r))
                    if r["tokens"]:
                        print(f"{N:>8} tokens, oracle, {r['bin']:>12}: {r['tokens']:>6} tokens, ppl {r['ppl']:.3f} as retrieved, "
                              f"{r['ppl_oracle']:.3f} reading their source chunks", flush=True)
            for g in range(groups):
                idx, wt = hook.table(g, len(ends), N // P, cfg.top_k)
                for r in score_hits(tg, idx, wt, bins):
                    rows_out.append(dict(model=a.name or a.ckpt, context_length=N, group=g, **r))
                    if not r["tokens"]:
                        print(f"{N:>8} tokens, group {g}, {r['bin']:>12} back: no tokens", flush=True)
                        continue
                    print(f"{N:>8} tokens, group {g}, {r['bin']:>12} back: {r['tokens']:>6} tokens, hit {100 * r['hit']:.1f}% "
                          f"(neighbour too {100 * r['near_hit']:.1f}%), weight {r['weight']:.3f}, chance {100 * r['chance']:.1f}%",
                          flush=True)
            tmp = a.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(rows=rows_out, n=a.n, seed=a.seed, windows=a.windows, targets=T, data=a.data,
                               window=window, text_per_chunk=P, top_k=cfg.top_k, ppl=ppl, ends=[int(e) for e in ends],
                               **({"oracle": oracle_out} if a.oracle else {})),
                          f, indent=1)
            os.replace(tmp, a.out)
    finally:
        gca_model.causal_topk = real
    print(f"wrote {a.out}")
    return rows_out


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "retrieval_copy_hits.py")
