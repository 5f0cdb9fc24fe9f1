"""Where a DRT's retrieval goes on held-out text as the context grows, by document: how much of its
weight lands on chunks of the document being read and how much on other documents, and the
perplexity when retrieval may pick only chunks of the current document.

    python scripts/retrieval_documents.py --ckpt runs/seeds/drt-s7 --name drt-s7 \
        --data data/debian-docs --lengths 1x,4x,16x,64x --windows 16 --device cuda --out docs_s7.json
    python scripts/retrieval_documents.py --plot docs_s7.json docs_s8.json --out ppl_documents.png

The text scored is that of ``gca eval ppl --windows W --targets 1x`` with the same ``--seed`` (default
1234, its default): W fixed end points in the validation split, the last training length of tokens
before each scored, only the context before them growing. The validation split is packed documents
separated by the end-of-text id; a chunk belongs to the document its last token is in, and a
retrieval row (the landmark of chunk c, serving chunk c + 1) to the document of chunk c.

Modes (``--modes``): ``all`` is the model as it is (the numbers reproduce ``gca eval ppl``'s);
``doc`` lets each row pick only chunks of its own document (the rest scored -inf; a row with fewer
than k such chunks keeps fewer, weight 0 on the rest). With no document of the split longer than
the context, ``doc`` cannot change with the context; what it measures is what the other documents'
chunks cost or give.

Statistics over the retrieval rows that serve a scored token, every group: ``same_doc_weight`` (the
share of the retrieval weight on chunks of the row's own document), ``rows_with_same_doc`` (rows
that had at least one earlier chunk of their document to pick), ``same_doc_uniform`` (the share
picks blind to documents would get: each row's fraction of candidates in its document),
``far_weight`` (the share on chunks more than ``--far`` training lengths back; default 16).
``--plot`` draws the perplexity of both modes and the shares against the context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import gca.model as gca_model
from gca.eval.cli import check_data_tokenizer, load_for_eval, parse_lengths
from gca.eval.perplexity import document_lengths, fixed_end_points, stream_nll
from gca.retrieval import Retrieval, causal_topk

_NEG = -1e30


class DocumentRetrieval:
    """Replaces :func:`gca.retrieval.causal_topk` in :mod:`gca.model` while active: records the
    weights' split by document for the rows at or after ``first_row``, and with ``restrict`` keeps
    every row to its own document's chunks."""

    def __init__(self, chunk_doc: torch.Tensor, first_row: int, far: int, restrict: bool):
        self.chunk_doc = chunk_doc  # (B, chunks) document id of each chunk (of its last token)
        self.first_row, self.far, self.restrict = first_row, far, restrict
        self.same = self.total = self.far_w = 0.0
        self.rows = self.rows_same = 0

    def __call__(self, scores: torch.Tensor, k: int, *, row_offset: int = 0, **kw) -> Retrieval:
        B, C, Cm = scores.shape
        rows = torch.arange(C, device=scores.device) + row_offset
        doc = self.chunk_doc.to(scores.device)
        same = doc[:, :Cm][:, None, :] == doc[:, rows][:, :, None]  # (B, C, Cm)
        causal = torch.arange(Cm, device=scores.device)[None, :] < rows[:, None]
        if self.restrict:
            scores = scores.masked_fill(~same, _NEG)
        r = causal_topk(scores, k, row_offset=row_offset, **kw)
        idx, w = r.indices, r.weights
        if self.restrict:  # rows short of k same-document chunks picked others at -inf: no weight, empty
            dead = r.scores <= _NEG / 2
            idx = idx.masked_fill(dead, -1)
            w = w.masked_fill(dead, 0.0)
            r = Retrieval(indices=idx, weights=w, scores=r.scores.masked_fill(dead, 0.0))
        keep = rows >= self.first_row
        if keep.any():
            picked_same = same.gather(-1, idx.clamp(min=0)) & (idx >= 0)
            far = (rows[None, :, None] - idx > self.far) & (idx >= 0)
            wk = w[:, keep].float()
            self.total += wk.sum().item()
            self.same += (wk * picked_same[:, keep]).sum().item()
            self.far_w += (wk * far[:, keep]).sum().item()
            self.rows += int(keep.sum()) * B
            self.rows_same += int((same & causal)[:, keep].any(-1).sum())
        return r


def chunk_documents(ids: np.ndarray, per_chunk: int, sep: int) -> torch.Tensor:
    """(B, N) token ids -> (B, ceil(N / per_chunk)) document index of each chunk's last token."""
    doc = np.cumsum(ids == sep, axis=1) - (ids == sep)  # a separator closes its document
    last = np.minimum(np.arange(per_chunk - 1, ids.shape[1] + per_chunk - 1, per_chunk), ids.shape[1] - 1)
    return torch.from_numpy(doc[:, last])


def plot(files: list[str], out: str, data: str | None = None, labels: list[str] | None = None) -> None:
    """Two panels from this script's JSON files: perplexity against context, as the model is and with
    retrieval kept to the row's document (relative to the first length's ``all``), and the share of
    the retrieval weight on the row's own document, beside the share a retriever blind to documents
    would get (the files' ``same_doc_uniform``, or computed from ``data`` for files without it).
    ``labels``: one legend name per file (default: the model names in the files)."""
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files: give one per file, in order")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, f in enumerate(files):
        rows = json.load(open(f))["rows"]
        if not rows:
            raise ValueError(f"{f} holds no rows")
        name = labels[i] if labels else rows[0]["model"]
        color = f"C{i}"
        # the model as it is (mode all), or, in a file made with --modes doc alone, the own-document rows
        ref = "all" if any(r["mode"] == "all" for r in rows) else rows[0]["mode"]
        base = next(r["ppl"] for r in rows if r["mode"] == ref)
        for mode, style in (("all", "-o"), ("doc", "--s")):
            rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["context_length"])
            if rs:
                a1.plot([r["context_length"] for r in rs], [100 * (r["ppl"] / base - 1) for r in rs], style, color=color,
                        label=f"{name}" + (" (own document only)" if mode == "doc" else ""))
        rs = sorted((r for r in rows if r["mode"] == ref), key=lambda r: r["context_length"])
        a2.plot([r["context_length"] for r in rs], [100 * r["same_doc_weight"] for r in rs], "-o", color=color, label=name)
    first = json.load(open(files[0]))
    ref = "all" if any(r["mode"] == "all" for r in first["rows"]) else first["rows"][0]["mode"]
    rs = sorted((r for r in first["rows"] if r["mode"] == ref), key=lambda r: r["context_length"])
    if "same_doc_uniform" not in rs[0] and data is not None:
        from gca.data import PackedDataset

        ds = PackedDataset(data, "val")
        tokens = ds.tokens
        for r in rs:
            N, T = r["context_length"], r["targets"]
            ids = np.stack([np.asarray(tokens[e - N : e], dtype=np.int64) for e in first["ends"]])
            P = first.get("text_per_chunk", 63)  # files written before the field: the presets' 64-position chunks
            r["same_doc_uniform"] = uniform_share(chunk_documents(ids, P, ds.separator_id), (N - T) // P - 1)
    if "same_doc_uniform" in rs[0]:
        print("picks blind to documents, share on the own document: " + ", ".join(
            f"{r['context_length']}: {100 * r['same_doc_uniform']:.1f}%" for r in rs))
        a2.plot([r["context_length"] for r in rs], [100 * r["same_doc_uniform"] for r in rs], ":", color="gray", lw=2,
                label="picks blind to documents")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    a1.set_ylabel("perplexity, % from the first length")
    a1.set_title("same text scored; retrieval as trained vs own document")
    a2.set_ylabel("retrieval weight on the own document (%)")
    a2.set_ylim(0, 100)
    a2.set_title("where retrieval goes")
    a1.legend(fontsize=6)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def uniform_share(chunk_doc: torch.Tensor, first_row: int) -> float:
    """The own-document share a retriever blind to documents would get: for each row from
    ``first_row`` on (a row c serves chunk c + 1 and may pick chunks 0 .. c - 1), the fraction of its
    candidates that lie in its document, averaged over the rows that have candidates."""
    doc = chunk_doc.numpy()
    fr = [(doc[b, :c] == doc[b, c]).mean() for b in range(doc.shape[0]) for c in range(max(first_row, 1), doc.shape[1])]
    return float(np.mean(fr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a DRT run or export folder")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="draw these JSON files of this script into --out (a .png) instead")
    ap.add_argument("--name", default=None)
    ap.add_argument("--data", default="data/debian-docs")
    ap.add_argument("--lengths", default="1x,4x,16x,64x", help="context lengths (tokens, or multiples of the training length)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--modes", default="all,doc")
    ap.add_argument("--far", type=float, default=16.0, help="'far' = more than this many training lengths back")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--labels", help="with --plot: the files' legend names, comma-separated, one per file")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.plot:
        labels = a.labels.split(",") if a.labels else None
        if labels is not None and len(labels) != len(a.plot):
            ap.error(f"--labels has {len(labels)} names for {len(a.plot)} files: give one per file, in order")
        return plot(a.plot, a.out, a.data if Path(a.data).exists() else None, labels)
    if not a.ckpt:
        ap.error("--ckpt is required (or --plot)")

    from gca.data import PackedDataset

    model, train_length, tok = load_for_eval(a.ckpt, a.device, a.dtype)
    try:
        check_data_tokenizer(tok, a.data, "--data")
    except ValueError as e:
        ap.error(str(e))
    cfg = model.config
    if cfg.arch != "drt":
        ap.error(f"{a.ckpt} is a {cfg.arch!r} model; this script studies DRT retrieval")
    lengths = parse_lengths(a.lengths, train_length)
    T = min(lengths) - 1  # as perplexity_vs_length(targets=min(lengths))
    ds = PackedDataset(a.data, "val")
    tokens = ds.tokens
    ends = fixed_end_points(len(tokens), lengths, a.windows, np.random.default_rng(a.seed))
    sep = ds.separator_id
    P = cfg.text_per_chunk
    far_chunks = int(a.far * (train_length or T + 1) / P)
    doc_len = document_lengths(ds)
    rows_out = []
    real = gca_model.causal_topk
    try:
        for N in lengths:
            ids = np.stack([np.asarray(tokens[e - N : e], dtype=np.int64) for e in ends])
            chunk_doc = chunk_documents(ids, P, sep)
            first_row = (N - T) // P - 1  # the row that serves the chunk of the first scored token
            blind = uniform_share(chunk_doc, first_row)
            for mode in a.modes.split(","):
                hook = DocumentRetrieval(chunk_doc, first_row, far_chunks, restrict=mode == "doc")
                gca_model.causal_topk = hook
                t0 = time.time()
                nll, n = stream_nll(model, torch.from_numpy(ids), last=T)
                ppl = math.inf if nll / n > 709.78 else math.exp(nll / n)  # (a diverged model: inf, not an OverflowError)
                row = dict(model=a.name or a.ckpt, context_length=N, mode=mode, ppl=ppl, tokens=n,
                           windows=a.windows, targets=T, same_doc_weight=hook.same / max(hook.total, 1e-9),
                           same_doc_uniform=blind,
                           far_weight=hook.far_w / max(hook.total, 1e-9), far_chunks=far_chunks,
                           rows=hook.rows, rows_with_same_doc=hook.rows_same, seconds=round(time.time() - t0, 1))
                rows_out.append(row)
                print(f"{N:>9} {mode:>4}: ppl {row['ppl']:.3f}  weight on own document {100 * row['same_doc_weight']:.1f}%"
                      f"  beyond {a.far:g}x {100 * row['far_weight']:.1f}%  rows with own-document chunks "
                      f"{hook.rows_same}/{hook.rows}", flush=True)
                with open(a.out + ".tmp", "w") as f:  # rewritten after every row; atomic, so a stop keeps the last
                    json.dump(dict(rows=rows_out, seed=a.seed, ends=[int(e) for e in ends], text_per_chunk=P,
                                   longest_document=int(doc_len.max()) if len(doc_len) else None,
                                   median_document=float(np.median(doc_len)) if len(doc_len) else None), f, indent=1)
                os.replace(a.out + ".tmp", a.out)
    finally:
        gca_model.causal_topk = real


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "retrieval_documents.py")
