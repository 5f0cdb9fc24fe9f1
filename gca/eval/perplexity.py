"""Perplexity against context length on held-out long text, streamed so only memory limits length.

    rows = perplexity_vs_length(model, "data/debian", lengths=[4096, 16384, 65536], windows=4)

For each length N, ``windows`` contiguous N-token windows of the validation split are streamed
through a cache piece by piece; the perplexity is exp(mean next-token cross-entropy) over every
predicted token of the windows. A length-generalising model does not get worse as N grows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from gca.model import DRT


@torch.no_grad()
def stream_nll(model: DRT, ids: torch.Tensor, piece: int = 4096, offload: bool = False) -> tuple[float, int]:
    """Summed next-token NLL and token count of ``ids`` ``(B, N)``, streamed ``piece`` tokens at a time."""
    device = model.embed.weight.device
    cache = model.new_cache(ids.shape[0], offload=offload, max_tokens=ids.shape[1])
    total, count = 0.0, 0
    prev = None
    for i in range(0, ids.shape[1], piece):
        x = ids[:, i : i + piece].to(device)
        logits = model(x, cache=cache).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if prev is not None:  # the last logit of the previous piece predicts this piece's first token
            total += F.cross_entropy(prev, x[:, 0], reduction="sum").item()
            count += x.shape[0]
        if x.shape[1] > 1:
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += x.shape[0] * (x.shape[1] - 1)
        prev = logits[:, -1]
    return total, count


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
) -> list[dict]:
    """Args:
        data: a prepared folder (its ``val`` split is used) or a :class:`gca.data.PackedDataset`.
        lengths: context lengths N in tokens.
        windows: windows per length (each one streamed as a batch row).
    Returns:
        ``[{context_length, ppl, tokens, windows}]``.
    """
    from tqdm.auto import tqdm

    from gca.data import PackedDataset

    ds = data if isinstance(data, PackedDataset) else PackedDataset(data, "val")
    if ds.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's vocabulary ({ds.vocab_size}) is larger than the model's ({model.config.vocab_size})")
    tokens = ds.tokens
    rng = np.random.default_rng(seed)
    model.eval()
    rows = []
    for N in tqdm([int(n) for n in lengths], desc="ppl", disable=not progress):
        if N > len(tokens):
            raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than the context length {N}")
        starts = rng.integers(0, len(tokens) - N + 1, size=windows)
        ids = torch.from_numpy(np.stack([np.asarray(tokens[s : s + N], dtype=np.int64) for s in starts]))
        nll, n = stream_nll(model, ids, piece=piece, offload=offload)
        rows.append(dict(context_length=N, ppl=math.exp(nll / n), tokens=n, windows=windows))
    return rows
