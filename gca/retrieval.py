"""Causal chunk retrieval: landmark scores, the strictly-causal mask, (Gumbel) top-k and the
softmax weights that GCA mixes its per-chunk results with.

Row c of the result is the retrieval made at chunk c's landmark; it may pick only chunks
j < c (chunk c itself and the next one are inside the sliding window), and it serves the
tokens of chunk c + 1. Rows with fewer than k earlier chunks are padded with index -1 and
weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gca.config import check_counts

_NEG = -1e30  # finite "minus infinity": keeps softmax gradients NaN-free


@dataclass
class Retrieval:
    """One group's retrieval. ``indices`` ``(B, C, K)`` (-1 = empty; K = min(top_k, C): a short input has
    fewer chunks to pick than top_k), ``weights`` ``(B, C, K)``,
    ``scores`` ``(B, C, K)`` noise-free scores of the picked chunks."""

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


def retrieval_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """query ``(B, C, d)``, keys ``(B, Cm, d)`` -> scores ``(B, C, Cm)`` (at least float32), scaled by 1/sqrt(d)."""
    d = query.shape[-1]
    dt = torch.promote_types(query.dtype, torch.float32)
    return torch.einsum("bcd,bmd->bcm", query.to(dt), keys.to(dt)) * d**-0.5


def gumbel_noise(shape, device, generator: torch.Generator | None = None) -> torch.Tensor:
    # no generator argument unless one is given: torch.compile with dynamic shapes rejects it
    u = torch.rand(shape, device=device, generator=generator) if generator is not None else torch.rand(shape, device=device)
    u = u.clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _allowed(C: int, Cm: int, row_offset: int, valid_rows: torch.Tensor | None, device) -> torch.Tensor:
    """``(C, Cm)`` bool: row c (chunk ``row_offset + c``) may pick column j when j < row_offset + c and the
    row is valid."""
    # an integer 0/1 mask would be and-ed bitwise into an integer mask that masked_fill refuses
    if valid_rows is not None and (valid_rows.shape != (C,) or valid_rows.dtype != torch.bool):
        raise ValueError(f"valid_rows must be a bool tensor of shape ({C},) (one entry per row), got "
                         f"{valid_rows.dtype} of shape {tuple(valid_rows.shape)}")
    rows = torch.arange(C, device=device)[:, None] + row_offset
    allowed = torch.arange(Cm, device=device)[None, :] < rows  # strictly causal
    return allowed & valid_rows[:, None] if valid_rows is not None else allowed


def causal_topk(
    scores: torch.Tensor,
    k: int,
    *,
    row_offset: int = 0,
    valid_rows: torch.Tensor | None = None,
    gumbel: bool = False,
    generator: torch.Generator | None = None,
    force: torch.Tensor | None = None,
) -> Retrieval:
    """Pick up to ``k`` strictly earlier chunks per row.

    Args:
        scores: ``(B, C, Cm)`` noise-free scores; row c is chunk ``row_offset + c``, column j is chunk j.
            A chunk scored ``-inf`` is never picked (its slot stays empty), which masks it out.
        k: chunks to pick; the result has ``min(k, Cm)`` slots (at least 1).
        row_offset: absolute chunk index of row 0 (streaming uses it; 0 for a whole sequence).
        valid_rows: optional ``(C,)`` bool tensor (an integer 0/1 one is refused); rows marked False (no
            landmark yet) get only empty slots.
        gumbel: add Gumbel(0, 1) noise before the top-k (training-time exploration).
        force: optional ``(B, C, Cm)`` bool: chunks a row picks before any other (those it may pick;
            with more than k, the k best by score and noise); its other slots are filled as usual.
            Only the choice changes: the weights are still the softmax of the noise-free scores.
    Returns:
        :class:`Retrieval` whose weights are the softmax of the picked chunks' noise-free scores.
    """
    check_counts("causal_topk", k=k)
    if scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"causal_topk: scores must be a floating-point (B, C, Cm) tensor, got "
                         f"{scores.dtype} of shape {tuple(scores.shape)}")
    if force is not None and (force.shape != scores.shape or force.dtype != torch.bool):
        raise ValueError(f"force must be a bool tensor of the scores' shape {tuple(scores.shape)}, got "
                         f"{force.dtype} of shape {tuple(force.shape)}")
    B, C, Cm = scores.shape
    kk = max(1, min(k, Cm))
    allowed = _allowed(C, Cm, row_offset, valid_rows, scores.device).expand(B, C, Cm)  # checks valid_rows
    if Cm == 0:  # no chunk to pick: one empty slot per row
        idx = torch.full((B, C, kk), -1, dtype=torch.long, device=scores.device)
        z = scores.new_zeros((B, C, kk))
        return Retrieval(indices=idx, weights=z, scores=z)
    # a chunk scored -inf is never picked (weight 0 anyway); every other allowed chunk, however low its
    # score, ranks above every chunk that may not be picked (those sit at -inf for the top-k)
    pickable = allowed & (scores != float("-inf"))
    select = scores.detach().masked_fill(~pickable, float("-inf"))
    if gumbel:
        noise = gumbel_noise(scores.shape, scores.device, generator)
        select = torch.where(pickable, select + noise, select)
    if force is None:
        top = select.topk(kk, dim=-1).indices  # (B, C, kk)
        valid = pickable.gather(-1, top)
    else:
        f = force & pickable
        # the forced chunks by score, then the others by score: two exact top-ks, spliced per row
        first = select.masked_fill(~f, float("-inf")).topk(kk, dim=-1).indices
        rest = select.masked_fill(f, float("-inf")).topk(kk, dim=-1).indices
        n_f = f.sum(-1, keepdim=True).clamp(max=kk)  # (B, C, 1)
        slot = torch.arange(kk, device=scores.device)
        at = torch.where(slot < n_f, slot, kk + slot - n_f)
        top = torch.cat([first, rest], dim=-1).gather(-1, at)
        # a row with fewer than k chunks to pick fills its last slots from `rest`'s -inf ties, which may
        # repeat a forced chunk: those slots stay empty
        valid = pickable.gather(-1, top) & ~((slot >= n_f) & f.gather(-1, top))
    picked = scores.gather(-1, top)  # noise-free, differentiable
    # the softmax over the filled slots alone (empty ones at -inf, exactly 0); a row with none is all 0
    # (its logits are set to 0 first, so nothing is NaN, forward or backward)
    logits = picked.masked_fill(~valid, float("-inf")).masked_fill(~valid.any(-1, keepdim=True), 0.0)
    w = torch.softmax(logits, dim=-1) * valid
    idx = torch.where(valid, top, torch.full_like(top, -1))
    return Retrieval(indices=idx, weights=w, scores=picked.masked_fill(~valid, 0.0))


def shift_to_queries(r: Retrieval) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn per-landmark rows into per-query-chunk rows: query chunk c uses row c - 1, chunk 0 nothing."""
    idx = torch.cat([torch.full_like(r.indices[:, :1], -1), r.indices[:, :-1]], dim=1)
    w = torch.cat([torch.zeros_like(r.weights[:, :1]), r.weights[:, :-1]], dim=1)
    return idx, w


# two (multiplier, prime) pairs of the n-gram keys: each step's product stays below 2**62 (no int64
# overflow on any device), and the pair makes a 62-bit key
_HASH = ((1_000_003, 2_147_483_647), (998_244_353, 1_073_741_789))


def _ngram_keys(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, L)`` ids -> ``(B, L)`` int64 keys of the (n + 1)-gram ending at each position; positions
    t < n (no full n-gram) get distinct negative keys that match nothing."""
    B, L = ids.shape
    x = ids.long() + 1
    keys = []
    for mult, prime in _HASH:
        h = torch.zeros_like(x)
        for i in range(n, -1, -1):  # oldest token first
            h = (h * mult + F.pad(x, (i, 0))[:, :L]) % prime
        keys.append(h)
    key = keys[0] * _HASH[1][1] + keys[1]
    t = torch.arange(L, device=ids.device)
    return torch.where(t < n, -1 - t, key)


@torch.no_grad()
def copy_targets(ids: torch.Tensor, n: int, chunk_text: int, min_distance: int, block_elems: int = 1 << 26) -> torch.Tensor:
    """Which chunks hold a copy source for the tokens each retrieval row serves.

    A token at position t (predicted from t - 1) can be copied from an earlier position p when the
    (n + 1)-grams ending at t and at p are equal (t >= n, p >= n) and it lies more than ``min_distance``
    tokens back (t - p > min_distance). The query position t - 1 lies in chunk q = (t - 1) // chunk_text
    and reads retrieval row q - 1 (:func:`shift_to_queries`); p lies in chunk p // chunk_text.

    Args:
        ids: ``(B, L)`` token ids (text only, no landmarks).
        n: context tokens a match must share besides the copied token.
        chunk_text: text tokens a chunk (the model's ``text_per_chunk``).
        min_distance: matches this close or closer are left out (the sliding window sees them).
        block_elems: the comparisons held at once (memory, in bytes of booleans).
    Returns:
        ``(B, C, C)`` bool, C = ceil(L / chunk_text): ``[b, r, j]`` is True when some token that row r
        serves has a copy source in chunk j. Row r may pick only chunks j < r; this does not mask that.
    """
    B, L = ids.shape
    P = chunk_text
    C = -(-L // P)
    key = _ngram_keys(ids, n)
    pos = torch.arange(L, device=ids.device)
    src = torch.zeros(B, L, C, dtype=torch.bool, device=ids.device)  # [b, t, j]: token t copyable from chunk j
    step = max(1, block_elems // max(1, B * C * P))
    for t0 in range(0, L, step):
        t1 = min(L, t0 + step)
        eq = key[:, t0:t1, None] == key[:, None, :]  # (B, tb, L)
        eq &= pos[None, :] < (pos[t0:t1, None] - min_distance)
        src[:, t0:t1] = F.pad(eq, (0, C * P - L)).view(B, t1 - t0, C, P).any(-1)
    # token t is served by row (t - 1) // P - 1: rows gather the tokens t = (r + 1) P + 1 .. (r + 2) P
    by_query = F.pad(src[:, 1:L], (0, 0, 0, C * P - (L - 1))).view(B, C, P, C).any(2)  # [b, q, j], q = (t - 1) // P
    return torch.cat([by_query[:, 1:], torch.zeros_like(by_query[:, :1])], dim=1)


def copy_retrieval_loss(
    scores: torch.Tensor, targets: torch.Tensor, *, row_offset: int = 0, valid_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each retrieval row's softmax over every chunk it may pick (noise-free
    ``scores`` ``(B, C, Cm)``, masked as :func:`causal_topk` masks them) towards the set of its
    ``targets`` (``(B, C, C)`` from :func:`copy_targets`, over the row's own chunks, the last C
    columns when other sequences' chunks come first): ``-log sum_{j in targets} p_j``, averaged over
    the rows with at least one target they may pick. Returns the loss (0 with a gradient path when
    no row has one) and the share of rows that had one."""
    B, C, Cm = scores.shape
    allowed = _allowed(C, Cm, row_offset, valid_rows, scores.device)
    tgt = F.pad(targets, (Cm - targets.shape[-1], 0)) & allowed
    used = tgt.any(-1)  # (B, C)
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    everything = s.masked_fill(~allowed, _NEG).logsumexp(-1)
    sources = s.masked_fill(~tgt, _NEG).logsumexp(-1)
    per_row = torch.where(used, everything - sources, torch.zeros_like(everything))
    count = used.sum()
    return per_row.sum() / count.clamp(min=1), count / used.numel()


# Below this spread of a row's picked scores (:func:`retrieval_health`) the weights are uniform to
# 1%: retrieval has collapsed (the corpus runs in results/README.md fell below it within 500 steps at
# lr 2e-3); a selective retriever scores far above it (checkpoints/passkey-tiny: 3.5, top weight 0.87,
# on its 504-token validation batches at the end of training, results/demo-checkpoint/stage3_train_log_j.jsonl).
COLLAPSED_SPREAD = 0.01


def retrieval_health(retrieval: list[Retrieval]) -> tuple[torch.Tensor, torch.Tensor]:
    """How selective a DRT's retrieval is, averaged over groups and over rows with every slot filled:
    the spread (standard deviation) of the picked chunks' scores, and the largest weight. A spread
    near 0 and a top weight of 1/top_k mean every retrieved chunk gets the same weight: retrieval
    has stopped telling chunks apart (the landmark keys collapsed), and GCA adds an average. Both are
    0-d tensors on the scores' device (no host synchronisation); NaN when no row has every slot filled
    (top_k at least the number of chunks before every row: nothing to measure), zero with one slot."""
    spreads, tops = [], []
    for r in retrieval:
        if r.indices.shape[-1] < 2:  # one slot: nothing to spread
            continue
        full = (r.indices >= 0).all(-1)  # (B, C) rows with every slot filled
        rows = full.sum()  # 0 rows: 0 / 0 = NaN, left out of the mean over groups below
        spreads.append(torch.where(full, r.scores.float().std(-1), 0.0).sum() / rows)
        tops.append((r.weights.float().amax(-1) * full).sum() / rows)
    if not spreads:
        z = torch.zeros((), device=retrieval[0].scores.device if retrieval else None)
        return z, z
    return torch.stack(spreads).nanmean(), torch.stack(tops).nanmean()
