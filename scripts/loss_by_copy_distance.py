"""Where models' losses differ on held-out text, by how far back each token could be copied from.

    python scripts/loss_by_copy_distance.py --ckpt drt=runs/fold/drt-s1-dis --ckpt swa=runs/fold/swa-s1-ctl \
        --data data/debian-docs-folders --lengths 1x,64x --windows 16 --device cuda --dtype bfloat16 \
        --out loss_by_copy_distance.json
    python scripts/loss_by_copy_distance.py --summary loss_by_copy_distance.json   # reprint a saved file
    python scripts/loss_by_copy_distance.py --summary a.json b.json   # files of the same text as one (names clashing: FOLDER/NAME)

The text scored is that of ``gca eval ppl --windows W --targets 1x`` with the same ``--seed`` (default
1234, its default): W fixed end points in the validation split, the last training length of tokens
before each scored, only the context before them growing. Every scored token is put in one of three
groups by its nearest earlier exact (n + 1)-gram match (``scripts/far_context.py``: the n tokens before
it followed by it, anywhere earlier in the split):

- ``window``: the match is at most the model's attention window back (512 tokens for the presets)
  and inside the context, so a sliding window can copy it;
- ``beyond window``: further back than the window but inside the context the model was given, so only
  retrieval (or full attention) can copy it;
- ``not in context``: no match, or one before the context began.

For each model and context length: the tokens, mean loss and perplexity of each group. If DRT's lead
over a sliding window comes from retrieval copying, it sits in ``beyond window``; if it is spread over
every group, the two models learned the text differently, whatever retrieval does.

Those groups change with the context length (a token copyable from 100K tokens back is ``not in
context`` at 4K and ``beyond window`` at 258K). The JSON's ``by_reach`` rows hold a second split that
does not: each token by the shortest context length whose context holds its match (``window``,
``in 4032``, ..., ``in 258048``, ``in none``), scored at every length. On the tokens ``in 258048``
(reachable only at the longest context) a model's loss from the shortest to the longest context is
what reading further is worth; the printout gives that change per model and the first model's minus
each other's (a sliding window's change there is only the scored tokens' fuller window).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from far_context import match_distance, nearest_previous, ngram_hashes  # noqa: E402

from gca.eval.cli import check_data_tokenizer, load_for_eval, parse_lengths  # noqa: E402
from gca.eval.perplexity import fixed_end_points, stream_token_nll  # noqa: E402

GROUPS = ("window", "beyond window", "not in context")


def _exp(x: float) -> float:
    """``math.exp``, inf past the float range (a broken or diverged model's mean loss above ~709.78 nats)
    instead of an OverflowError."""
    return math.inf if x > 709.78 else math.exp(x)


def copy_groups(dist: np.ndarray, n: int, ends: np.ndarray, N: int, T: int, window: int) -> np.ndarray:
    """``(len(ends), T)`` group index (into :data:`GROUPS`) of the tokens at positions ``e - T .. e - 1``
    scored with a context of N tokens before each end point ``e``; ``dist[i]``: the nearest earlier
    match of the (n + 1)-gram ending at position ``i + n`` (0: none)."""
    pos = ends[:, None] - T + np.arange(T)[None, :]
    d = match_distance(dist, n, pos)
    seen = pos - (ends[:, None] - N)  # tokens of context before each scored token
    inside = (d > 0) & (d <= seen)  # a match before the context began is no match for the model
    return np.where(inside & (d <= window), 0, np.where(inside & (d > window), 1, 2))


def reach_groups(dist: np.ndarray, n: int, ends: np.ndarray, lengths: list[int], T: int, window: int) -> np.ndarray:
    """``(len(ends), T)`` group of each scored token that does not depend on the context length: 0 if its
    nearest match is within the window and inside the shortest context, ``k + 1`` if the ``k``-th
    shortest of ``lengths`` is the first whose context holds it (beyond the window), ``len(lengths) + 1``
    if none does (or it has no match)."""
    lengths = sorted(lengths)
    pos = ends[:, None] - T + np.arange(T)[None, :]
    d = match_distance(dist, n, pos)
    out = np.full(d.shape, len(lengths) + 1)
    for k in range(len(lengths) - 1, -1, -1):  # longest first, so the shortest that holds it is kept
        seen = pos - (ends[:, None] - lengths[k])
        out = np.where((d > 0) & (d <= seen), k + 1, out)
    return np.where((out == 1) & (d <= window), 0, out)


def reach_labels(lengths: list[int]) -> list[str]:
    return ["window"] + [f"in {N}" for N in sorted(lengths)] + ["in none"]


def _change(rows: list[dict], model: str, key: str, label, lo: int, hi: int) -> float:
    """A group's mean loss at the longest context minus at the shortest (``label`` None: every token)."""
    def mean(N):
        sel = [r for r in rows if r["model"] == model and r["context_length"] == N and r["tokens"]
               and (label is None or r[key] == label)]
        k = sum(r["tokens"] for r in sel)
        return sum(r["tokens"] * r["nll"] for r in sel) / k if k else float("nan")

    return mean(hi) - mean(lo)


def merge(paths: list[str]) -> dict:
    """Several saved files as one (``--summary`` of more than one): they must have scored the same text
    (the same data, n, seed, windows and targets); a model name seen in an earlier file gets its
    file's folder as a prefix (``FOLDER/NAME``)."""
    out, seen = None, set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        if out is None:
            out = dict(data, rows=[], by_reach=[])
        for key in ("data", "n", "seed", "windows", "targets"):
            if data.get(key) != out.get(key):
                raise SystemExit(f"{path}: {key} {data.get(key)!r}, the first file's {out.get(key)!r}: other text, "
                                 "not comparable token for token")
        names = list(dict.fromkeys(r["model"] for r in data["rows"]))
        rename = {n: f"{Path(path).parent.name}/{n}" if n in seen else n for n in names}
        if len(set(rename.values()) | seen) < len(seen) + len(names):
            raise SystemExit(f"{path}: model names {names} clash with an earlier file's even with the folder prefix")
        seen |= set(rename.values())
        out["rows"] += [dict(r, model=rename[r["model"]]) for r in data["rows"]]
        out["by_reach"] += [dict(r, model=rename[r["model"]]) for r in data.get("by_reach", [])]
    return out


def summarize(data: dict) -> list[str]:
    """Print (and return) the comparisons: the first model against each other one, by group at every
    length; then each model's change from the shortest context to the longest, over every token and
    (``by_reach``, when the file has it) over the tokens each context length first makes copyable."""
    rows, reach_rows = data["rows"], data.get("by_reach", [])
    names = list(dict.fromkeys(r["model"] for r in rows))
    lengths = sorted({r["context_length"] for r in rows})
    first, lines = names[0], []
    for name in names[1:]:
        for N in lengths:
            cells = []
            for label in GROUPS:
                x = next(r for r in rows if r["model"] == first and r["context_length"] == N and r["group"] == label)
                y = next(r for r in rows if r["model"] == name and r["context_length"] == N and r["group"] == label)
                cells.append(f"{label} {100 * (_exp(x['nll'] - y['nll']) - 1):+.1f}%" if x["tokens"] else f"{label} -")
            lines.append(f"{first} vs {name} at {N}, perplexity by group: " + ", ".join(cells))
    lo, hi = lengths[0], lengths[-1]
    for label in dict.fromkeys(r["reach"] for r in reach_rows):  # each model's level on the same tokens
        cells = []
        for name in names:
            at = {r["context_length"]: r for r in reach_rows if r["model"] == name and r["reach"] == label}
            cells.append(f"{name} " + " / ".join("-" if not at[N]["tokens"] else f"{_exp(at[N]['nll']):.2f}"
                                                 for N in (lo, hi) if N in at))
        k = next(r["tokens"] for r in reach_rows if r["reach"] == label)
        lines.append(f"perplexity at {lo} / {hi}, tokens {label} ({k}): " + ", ".join(cells))
    if lo != hi:
        pct = lambda x: f"{100 * (_exp(x) - 1):+.2f}%"  # noqa: E731
        groups = [("every token", rows, "group", None)]
        groups += [(f"tokens {r['reach']}", reach_rows, "reach", r["reach"]) for r in reach_rows
                   if r["model"] == first and r["context_length"] == lo]
        for title, src, key, label in groups:
            ch = {name: _change(src, name, key, label, lo, hi) for name in names}
            k = sum(r["tokens"] for r in src if r["model"] == first and r["context_length"] == lo
                    and (label is None or r[key] == label))
            cells = [f"{name} {pct(ch[name])}" for name in names]
            cells += [f"{first} - {name} {pct(ch[first] - ch[name])}" for name in names[1:]]
            lines.append(f"{title} ({k}): perplexity {lo} -> {hi}: " + ", ".join(cells))
    for line in lines:
        print(line)
    return lines


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summary"]:  # reprint saved files' comparisons without the models
        if len(argv) < 2:
            raise SystemExit("usage: loss_by_copy_distance.py --summary FILE.json [FILE.json ...] (files of the same text)")
        summarize(merge(argv[1:]))
        return None
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", required=True, metavar="NAME=PATH",
                    help="a run or export folder, named (repeat; the first is compared with the others)")
    ap.add_argument("--data", required=True, help="a prepared dataset folder (its val split)")
    ap.add_argument("--lengths", default="1x,64x", help="context lengths (tokens, or multiples of the training length)")
    ap.add_argument("--targets", default="1x", help="tokens scored before each end point, as gca eval ppl --targets")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234, help="the end points' seed (gca eval ppl's default)")
    ap.add_argument("--n", type=int, default=8, help="context tokens a match must share (default 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", required=True, help="JSON file, rewritten after every model and length")
    a = ap.parse_args(argv)
    named = []
    for spec in a.ckpt:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--ckpt {spec!r}: use NAME=PATH")
        named.append((name, path))
    if a.n < 1 or a.windows < 1:
        ap.error("--n and --windows must be >= 1")

    from gca.data import PackedDataset

    ds = PackedDataset(a.data, "val")
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    dist = nearest_previous(ngram_hashes(tokens, a.n))
    rows, reach_rows, lengths, ends = [], [], None, None
    for name, path in named:
        model, train_length, tok = load_for_eval(path, a.device, a.dtype)
        try:
            check_data_tokenizer(tok, a.data, "--data")
        except ValueError as e:
            ap.error(f"{name}: {e}")
        these = parse_lengths(a.lengths, train_length)
        target = parse_lengths(a.targets, train_length)[0]
        if lengths is None:  # the first model fixes the text: every other model must read the same
            if not 1 <= target <= min(these):
                ap.error(f"--targets {a.targets} = {target} tokens must lie in [1, the shortest length {min(these)}]")
            lengths, T = these, min(target, min(these) - 1)  # as perplexity_vs_length(targets=...)
            if max(lengths) > len(tokens):
                ap.error(f"the validation split has {len(tokens)} tokens, fewer than the context length {max(lengths)}")
            ends = fixed_end_points(len(tokens), lengths, a.windows, np.random.default_rng(a.seed))
        elif these != lengths:
            ap.error(f"{name}: --lengths resolve to {these} tokens, the first model's to {lengths} (different training lengths)")
        window = model.config.window or 0
        reach = reach_groups(dist, a.n, ends, lengths, T, window)
        for N in lengths:
            ids = torch.from_numpy(np.stack([tokens[e - N : e] for e in ends]))
            nll = stream_token_nll(model, ids, last=T).double().numpy()
            group = copy_groups(dist, a.n, ends, N, T, window)
            for g, label in enumerate(GROUPS):
                sel = group == g
                k = int(sel.sum())
                mean = float(nll[sel].mean()) if k else float("nan")
                rows.append(dict(model=name, context_length=N, group=label, tokens=k, share=k / group.size,
                                 nll=mean, ppl=_exp(mean) if k else float("nan"), window=window))
            for g, label in enumerate(reach_labels(lengths)):
                sel = reach == g
                k = int(sel.sum())
                reach_rows.append(dict(model=name, context_length=N, reach=label, tokens=k, share=k / reach.size,
                                       nll=float(nll[sel].mean()) if k else float("nan"), window=window))
            ppl = _exp(float(nll.mean()))
            print(f"{name} at {N}: ppl {ppl:.3f}; " + "; ".join(
                f"{r['group']} {100 * r['share']:.1f}% of tokens, ppl {r['ppl']:.3f}" for r in rows[-3:]), flush=True)
            tmp = a.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(rows=rows, by_reach=reach_rows, n=a.n, seed=a.seed, windows=a.windows, targets=T, data=a.data,
                               ends=[int(e) for e in ends]), f, indent=1)
            os.replace(tmp, a.out)
        del model
    summarize(dict(rows=rows, by_reach=reach_rows))
    print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "loss_by_copy_distance.py")
