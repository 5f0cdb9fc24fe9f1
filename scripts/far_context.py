"""How much of a token stream only a model that reads beyond its attention window could copy.

For every token: the distance back to the nearest earlier place where the same n tokens were followed
by the same token (an exact (n + 1)-gram match), counted over the whole stream ("any": what a context
that runs across documents holds, as `gca eval ppl` scores it) and within the token's own document
("same document"). A token whose nearest match lies beyond the sliding window (512 tokens) but within
the context can be copied by retrieval and not by the window; one with no match within the context by
neither. The shares bound what retrieval can add on that text: if few tokens repeat from far back, a
perfect retriever changes little of the perplexity.

    python scripts/far_context.py --data data/debian-docs --split val --n 8,16 --out far_context.json
    python scripts/far_context.py --data data/debian-docs --data data/other --split val --plot far.png  # compare corpora

Windows that hold a document separator are skipped (their tokens are not counted). Matches are found
by a 64-bit polynomial hash of each (n + 1)-gram (collisions are negligible at these sizes). Also
reports how the split's tokens are spread over document lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gca.data.prepare import PackedDataset  # noqa: E402

# distance bins (tokens): the window, then 1x / 4x / 16x / 64x / 256x of the 4032-token training length
EDGES = (512, 4032, 16128, 64512, 258048, 1032192)
_P = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """``h[t]`` = hash of ``tokens[t - n : t + 1]`` for t >= n (uint64, wrapping arithmetic)."""
    t = tokens.astype(np.uint64)
    m = len(t) - n
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n + 1):
            h = h * _P + t[j : j + m] + np.uint64(1)
    return h  # h[i] covers tokens[i : i + n + 1], i.e. the window ending at t = i + n


def nearest_previous(keys: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """For each position i, ``i - j`` for the largest j < i with ``keys[j] == keys[i]`` (and the same
    group, when given), else 0."""
    pos = np.arange(len(keys))
    order = np.lexsort((pos, keys) if groups is None else (pos, keys, groups))
    k = keys[order]
    same = k[1:] == k[:-1]
    if groups is not None:
        g = groups[order]
        same &= g[1:] == g[:-1]
    dist = np.zeros(len(keys), dtype=np.int64)
    dist[order[1:][same]] = order[1:][same] - order[:-1][same]
    return dist


def match_distance(dist: np.ndarray, n: int, pos: np.ndarray) -> np.ndarray:
    """Tokens back to the nearest earlier match of the (n + 1)-gram ending at each position ``pos``
    (any shape), from :func:`nearest_previous` of :func:`ngram_hashes`; 0 where none (or pos < n)."""
    idx = pos - n
    return np.where(idx >= 0, dist[np.clip(idx, 0, None)], 0)


def shares(dist: np.ndarray) -> dict[str, float]:
    """The share of tokens whose nearest match lies in each distance bin, and with none."""
    total = max(len(dist), 1)
    out, lo = {}, 0
    for hi in EDGES:
        out[f"({lo}, {hi}]"] = float(((dist > lo) & (dist <= hi)).sum() / total)
        lo = hi
    out[f"> {lo}"] = float((dist > lo).sum() / total)
    out["none"] = float((dist == 0).sum() / total)
    return out


def analyse(path: str, split: str, ns: list[int]) -> dict:
    ds = PackedDataset(path, split)
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    sep = ds.separator_id
    doc = np.cumsum(tokens == sep)  # a token's document: separators seen before it (the separator ends a document)
    doc[tokens == sep] -= 1
    lengths = np.diff(np.append(ds.doc_offsets, len(tokens)))
    doc_spread = {f"> {e}": float(lengths[lengths > e].sum() / len(tokens)) for e in (4032, 16128, 64512, 258048)}
    result = {"data": path, "split": split, "tokens": int(len(tokens)), "documents": int(len(lengths)),
              "longest_document": int(lengths.max()), "token_share_in_documents_longer_than": doc_spread, "n": {}}
    for n in ns:
        if n >= len(tokens):
            raise ValueError(f"--n {n}: the {split} split of {path} has only {len(tokens)} tokens; give a smaller --n")
        h = ngram_hashes(tokens, n)
        seps = np.convolve((tokens == sep).astype(np.int64), np.ones(n + 1, dtype=np.int64), mode="valid") > 0
        keep = ~seps  # windows inside one document
        d_any = nearest_previous(h)[keep]
        d_doc = nearest_previous(h, doc[n:])[keep]
        beyond = {f"(512, {e}]": float(((d_any > 512) & (d_any <= e)).sum() / max(keep.sum(), 1)) for e in EDGES[1:]}
        beyond_doc = {f"(512, {e}]": float(((d_doc > 512) & (d_doc <= e)).sum() / max(keep.sum(), 1)) for e in EDGES[1:]}
        result["n"][str(n)] = {"tokens_counted": int(keep.sum()), "any": shares(d_any), "same_document": shares(d_doc),
                               "beyond_window_any": beyond, "beyond_window_same_document": beyond_doc}
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="a prepared dataset folder (repeat to compare)")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--n", default="8,16", help="context tokens a match must share, comma-separated")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="draw the shares by distance, one bar group per corpus")
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.n.split(",")]
    if any(n < 1 for n in ns):
        ap.error("--n: each must be >= 1")
    results = [analyse(p, args.split, ns) for p in args.data]
    for r in results:
        print(f"{r['data']} [{r['split']}]: {r['tokens']:,} tokens, {r['documents']:,} documents, longest {r['longest_document']:,}")
        print("  tokens in documents longer than " + ", ".join(f"{k[2:]}: {v:.1%}" for k, v in r["token_share_in_documents_longer_than"].items()))
        for n, s in r["n"].items():
            print(f"  n = {n}: nearest earlier ({n}+1)-gram match, share of tokens by distance (any document / same document)")
            for b in s["any"]:
                print(f"    {b:>22}: {s['any'][b]:6.1%} / {s['same_document'][b]:6.1%}")
            print("    beyond the 512-token window, within the context:")
            for b in s["beyond_window_any"]:
                print(f"    {b:>22}: {s['beyond_window_any'][b]:6.1%} / {s['beyond_window_same_document'][b]:6.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return results


def plot(results: list[dict], path: str) -> None:
    """Bars: the share of tokens whose nearest match lies in each distance bin beyond the window, per
    corpus and n (solid: any document, hatched: the same document)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = list(results[0]["n"])
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        bins = [b for b in results[0]["n"][n]["any"] if b not in ("none", "(0, 512]")]
        width = 0.8 / len(results)
        for i, r in enumerate(results):
            x = np.arange(len(bins)) + i * width
            any_ = [100 * r["n"][n]["any"][b] for b in bins]
            doc = [100 * r["n"][n]["same_document"][b] for b in bins]
            ax.bar(x, any_, width, alpha=0.8, label=f"{Path(r['data']).name}: any document")
            ax.bar(x, doc, width, color="none", edgecolor="black", hatch="//", linewidth=0.5,
                   label="same document" if i == len(results) - 1 else None)
        ax.set_xticks(np.arange(len(bins)) + 0.4 - width / 2)
        ax.set_xticklabels([b.replace("(", "").replace("]", "") for b in bins], rotation=20, fontsize=8)
        ax.set_xlabel("tokens back to the nearest earlier match (beyond the 512-token window)")
        ax.set_ylabel("share of held-out tokens (%)")
        ax.set_title(f"exact ({n}+1)-gram matches [{results[0]['split']}]")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "far_context.py")
