"""Perplexity against context length on held-out long text, streamed so only memory limits length.

    rows = perplexity_vs_length(model, "data/debian", lengths=[4096, 16384, 65536], windows=4)

For each length N, ``windows`` contiguous N-token windows of the validation split are streamed
through a cache piece by piece; the perplexity is exp(mean next-token cross-entropy) over every
predicted token of the windows. A length-generalising model does not get worse as N grows.

Those windows are drawn afresh for every N, so the text scored changes with N as well as the
context, and a few windows of a varied corpus differ by more than the context does. With
``targets=T`` the text scored is held fixed: ``windows`` end points are drawn once, and for every N
the window is the N tokens before its end point, scored only on its last T tokens (the same
``windows * T`` tokens at every N), so only the context before them grows::

    rows = perplexity_vs_length(model, "data/debian", lengths=[4096, 16384, 65536], windows=8, targets=4096)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from gca.config import check_counts
from gca.eval import keeps_mode
from gca.model import DRT


@torch.no_grad()
def _scored_logits(model: DRT, ids: torch.Tensor, piece: int, offload: bool, last: int | None):
    """Stream ``ids`` ``(B, N)`` through a cache ``piece`` tokens at a time and yield ``(logits, targets)``
    for every scored stretch in order: ``logits (B, L, V)`` (at least fp32) predicting ``targets (B, L)``.
    ``last``: only the last ``last`` tokens of each row are scored (pieces that hold no scored prediction
    skip the LM head's full output)."""
    device = model.embed.weight.device
    N = ids.shape[1]
    first = 1 if last is None else max(1, N - int(last))  # the first scored token's position
    cache = model.new_cache(ids.shape[0], offload=offload, max_tokens=N)
    prev = None
    for i in range(0, N, piece):
        x = ids[:, i : i + piece].to(device)
        L = x.shape[1]
        # this piece's logits predict tokens i + 1 .. i + L (the last one scored in the next piece); before
        # the scored region only the last logit can matter
        keep = 1 if i + L <= first else None
        logits = model(x, cache=cache, logits_to_keep=keep).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if prev is not None and i >= first:  # the last logit of the previous piece predicts this piece's first token
            yield prev[:, None], x[:, :1]
        lo = max(1, first - i)  # this piece's first scored target, by index into x
        if not keep and L > lo:
            yield logits[:, lo - 1 : -1], x[:, lo:]
        prev = logits[:, -1]


@torch.no_grad()
def stream_nll(model: DRT, ids: torch.Tensor, piece: int = 4096, offload: bool = False,
               last: int | None = None) -> tuple[float, int]:
    """Summed next-token NLL and token count of ``ids`` ``(B, N)``, streamed ``piece`` tokens at a time.
    ``last``: score only the last ``last`` tokens of each row (the rest is context; pieces that hold
    no scored prediction skip the LM head's full output)."""
    total, count = 0.0, 0
    for logits, targets in _scored_logits(model, ids, piece, offload, last):
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total, count


@torch.no_grad()
def stream_token_nll(model: DRT, ids: torch.Tensor, piece: int = 4096, offload: bool = False,
                     last: int | None = None) -> torch.Tensor:
    """Per-token next-token NLL of ``ids`` ``(B, N)`` as :func:`stream_nll` streams it: ``(B, S)`` on the CPU
    (fp32, or the model's dtype if wider), S = N - 1 scored tokens (``last`` of them when given), in order."""
    parts = [F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").cpu()
             for logits, targets in _scored_logits(model, ids, piece, offload, last)]
    if not parts:
        return torch.zeros(ids.shape[0], 0)
    return torch.cat(parts, dim=1)


def open_val_split(data, *, use: str = "gca eval ppl scores that split", alternative: str | None = None):
    """A prepared folder's ``val`` split (:class:`gca.data.PackedDataset`), what evaluation reads, with its ids
    checked (:meth:`~gca.data.PackedDataset.check_all_ids`). An empty split is said in evaluation's terms (``use``: what reads
    it; ``alternative``: another way out than preparing the folder again), not training's."""
    import json
    from pathlib import Path

    from gca.data import PackedDataset

    try:
        ds = PackedDataset(data, "val")
    except ValueError:
        try:  # (PackedDataset's message for an empty split advises gca train --eval-every 0: no use here)
            meta = json.loads((Path(data) / "meta.json").read_text())
            empty, docs = int(meta["tokens"]["val"]) == 0, int(sum(meta.get("documents", {}).values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            empty = False
        if not empty:
            raise
        raise ValueError(f"{data}: split 'val' is empty (0 tokens; all {docs} document(s) went to 'train', documents "
                         f"are not cut), and {use}: prepare it again with more documents or a larger --val-fraction "
                         f"(gca prepare ... --val-fraction F --out {data} --overwrite)"
                         + (f", or {alternative}" if alternative else "")) from None
    ds.check_all_ids()
    return ds


def document_lengths(data) -> np.ndarray:
    """Tokens in each document of a prepared folder's (or :class:`gca.data.PackedDataset`'s) ``val``
    split, separators included; empty when the split has no document index."""
    from gca.data import PackedDataset

    ds = data if isinstance(data, PackedDataset) else PackedDataset(data, "val")
    if not (ds.path / f"{ds.split}.idx.npy").exists():
        return np.zeros(0, dtype=np.int64)
    return np.diff(np.append(np.asarray(ds.doc_offsets, dtype=np.int64), len(ds)))


def longest_document(data) -> int:
    """Tokens in the longest held-out document (:func:`document_lengths`); 0 without a document index."""
    lengths = document_lengths(data)
    return int(lengths.max()) if len(lengths) else 0


def fixed_end_points(n_tokens: int, lengths, windows: int, rng: np.random.Generator) -> np.ndarray:
    """The ``windows`` end points that ``perplexity_vs_length(targets=...)`` scores before, drawn from
    ``rng`` (``np.random.default_rng(seed)`` fresh): each leaves room for the longest context."""
    return rng.integers(max(lengths), n_tokens + 1, size=windows)


@keeps_mode
def perplexity_vs_length(
    model: DRT,
    data,
    lengths,
    windows: int = 4,
    *,
    seed: int = 0,
    piece: int = 4096,
    offload: bool = False,
    progress: bool = True,
    targets: int | None = None,
    on_row=None,
) -> list[dict]:
    """Args:
        data: a prepared folder (its ``val`` split is used) or a :class:`gca.data.PackedDataset`.
        lengths: context lengths N in tokens.
        windows: windows per length (each one streamed as a batch row).
        targets: None (every window drawn afresh per N, every token scored) or T <= min(lengths):
            the same ``windows`` end points for every N, only the last T tokens before each scored
            (see the module docstring; T = the shortest length scores one token fewer, as its window's
            first token has no prediction).
        on_row: called with the list of rows so far after each length, e.g. to save partial results.
    Returns:
        ``[{context_length, ppl, tokens, windows}]`` (+ ``targets`` when given).
    """
    from tqdm.auto import tqdm

    from gca.data import PackedDataset

    if isinstance(data, PackedDataset):
        ds = data
        ds.check_all_ids()
    else:
        ds = open_val_split(data)
    if ds.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's vocabulary ({ds.vocab_size}) is larger than the model's ({model.config.vocab_size})")
    tokens = ds.tokens
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths must be context lengths >= 2 tokens, got {lengths}")
    check_counts("perplexity_vs_length", windows=windows, piece=piece)
    if max(lengths) > len(tokens):
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than the context length {max(lengths)}")
    if targets is not None:
        targets = int(targets)
        if not 1 <= targets <= min(lengths):
            raise ValueError(f"targets must lie in [1, the shortest length {min(lengths)}], got {targets}")
        targets = min(targets, min(lengths) - 1)  # a window's first token has no prediction: T = N scores N - 1
        ends = fixed_end_points(len(tokens), lengths, windows, rng)  # the same text scored at every N
    rows = []
    for N in tqdm(lengths, desc="ppl", disable=not progress):
        starts = rng.integers(0, len(tokens) - N + 1, size=windows) if targets is None else ends - N
        ids = torch.from_numpy(np.stack([np.asarray(tokens[s : s + N], dtype=np.int64) for s in starts]))
        nll, n = stream_nll(model, ids, piece=piece, offload=offload, last=targets)
        mean = nll / n  # past ~709.78 nats (a broken or diverged model) math.exp overflows: inf, not a crash
        rows.append(dict(context_length=N, ppl=math.inf if mean > 709.78 else math.exp(mean), tokens=n, windows=windows,
                         **({"targets": targets} if targets is not None else {})))
        if on_row is not None:
            on_row(rows)
    return rows
