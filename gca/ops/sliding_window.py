"""Causal sliding-window self-attention in O(T * W) time and memory.

Position i attends to positions j with ``i - W < j <= i`` (W positions, itself included):

    W = 3, T = 6       j: 0 1 2 3 4 5
                 i = 0    x . . . . .
                 i = 1    x x . . . .
                 i = 2    x x x . . .
                 i = 3    . x x x . .
                 i = 4    . . x x x .
                 i = 5    . . . x x x

Backends: ``"flex"`` (FlexAttention with a block mask, compiled; CUDA), ``"blocked"`` (cut the
sequence into blocks of W, each attends to itself and the block before; any device) and
``"full"`` (plain causal SDPA, O(T^2); for the full-attention baseline). ``"auto"`` takes flex on
CUDA and blocked elsewhere.
"""

from __future__ import annotations

import functools
import numbers

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every SDPA backend but cuDNN's. Its bf16 backward returns NaN gradients at some shapes on Hopper
# with torch 2.11-2.13 (pytorch/pytorch#196678 and cudnn-frontend#1072: rows whose logsumexp is
# very negative): a 109M-parameter DRT's chunk encoder (64 positions, no mask) hit it at step 893
# on an H200 with a finite loss (`gca replay-nonfinite` named ScaledDotProductCudnnAttentionBackward0;
# results/README.md, twenty-seventh run). Flash and memory-efficient attention take its place.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kw)`` with the cuDNN backend kept out (``NO_CUDNN``)."""
    with sdpa_kernel(NO_CUDNN):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def sliding_window_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """q, k, v ``(B, H, T, D)`` -> ``(B, H, T, D)``; each block of W queries sees 2W keys."""
    B, H, T, D = q.shape
    W = min(window, T)
    nb = -(-T // W)
    pad = nb * W - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb = q.view(B, H, nb, W, D)
    kb = k.view(B, H, nb, W, D)
    vb = v.view(B, H, nb, W, D)
    # keys of block n are [block n-1, block n]; block -1 is zeros, masked out below
    k2 = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb], dim=3)  # (B, H, nb, 2W, D)
    v2 = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb], dim=3)
    qi = torch.arange(W, device=q.device)[:, None] + W  # query offset within the 2W span
    kj = torch.arange(2 * W, device=q.device)[None, :]
    band = (kj <= qi) & (kj > qi - window)  # (W, 2W)
    first = band & (kj >= W)  # block 0 has no previous block
    mask = band.expand(nb, W, 2 * W).clone()
    mask[0] = first
    out = sdpa(qb, k2, v2, attn_mask=mask)  # (B, H, nb, W, D)
    return out.reshape(B, H, nb * W, D)[:, :, :T]


FLEX_BLOCK = 128  # FlexAttention's block size here (query and key blocks alike)


def sliding_window_block_mask(T: int, window: int, device: str | torch.device, block: int = FLEX_BLOCK):
    """FlexAttention ``BlockMask`` of causal attention over the last ``window`` positions, built from
    the block geometry: query block i and key block j hold some allowed pair when
    ``max(q - kv) >= 0`` and ``min(q - kv) < window``, and only allowed pairs ("full", no mask
    evaluated) when ``min(q - kv) >= 0``, ``max(q - kv) < window`` and neither block reaches past T.
    O((T / block)^2) small integer work instead of ``create_block_mask``'s pass over all T x T
    positions, so it is cheap enough to rebuild inside a ``torch.compile`` graph (where a cache is
    bypassed) at any length."""
    from torch.nn.attention.flex_attention import BlockMask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    n = -(-T // block)
    blocks = torch.arange(n, device=device)
    diff = (blocks[:, None] - blocks[None, :]) * block  # (query block, key block)
    lo, hi = diff - (block - 1), diff + (block - 1)  # min and max of q - kv over the two blocks
    # blocks that reach past T stay partial (masked), as create_block_mask leaves them; a tensor test, not
    # `if T % block`, so a traced graph (torch.export with a dynamic length) holds every length, not only
    # those that fill (or do not fill) the last block as the example did
    inside = (blocks + 1) * block <= T
    full = (lo >= 0) & (hi < window) & inside[:, None] & inside[None, :]
    partial = (hi >= 0) & (lo < window) & ~full

    def ordered(sel):  # selected key blocks first, ascending; int32 as FlexAttention expects
        num = sel.sum(-1).to(torch.int32)[None, None]
        idx = torch.argsort(torch.where(sel, blocks[None, :], n + blocks[None, :]), dim=-1).to(torch.int32)[None, None]
        return num, idx

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T))


@functools.lru_cache(maxsize=32)
def _flex_block_mask(T: int, window: int, device: str):
    # (built as normal tensors even when the first call comes under torch.inference_mode: a cached mask of
    # inference tensors would fail a later training step at the same length)
    with torch.inference_mode(False):
        return sliding_window_block_mask(T, window, device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def sliding_window_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """FlexAttention path (CUDA). q, k, v ``(B, H, T, D)``."""
    T = q.shape[2]
    if torch.compiler.is_compiling():
        # inside the caller's graph: the mask is built in the graph (sliding_window_block_mask keeps
        # that cheap) and flex_attention is traced there; going through the lru_caches would make
        # Dynamo warn that it ignores them
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=sliding_window_block_mask(T, window, str(q.device)))
    # eager: one mask per length (cached) and one compiled flex_attention
    block_mask = _flex_block_mask(T, window, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=block_mask)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, impl: str = "auto"
) -> torch.Tensor:
    """Causal attention over the last ``window`` positions (``None``: full causal attention).

    Args:
        q, k, v: ``(B, H, T, D)``, same dtype and device.
        window: positions each query sees, itself included; ``None`` means unlimited.
        impl: ``"auto"``, ``"flex"``, ``"blocked"`` or ``"full"``.
    Returns:
        ``(B, H, T, D)``.
    """
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k and v must all be (B, H, T, D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if impl not in ("auto", "flex", "blocked", "full"):  # checked first: short inputs take a shortcut below
        raise ValueError(f"impl must be 'auto', 'flex', 'blocked' or 'full', got {impl!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
    T = q.shape[2]
    if window is None or impl == "full":
        if window is not None and window < T:
            raise ValueError("impl='full' ignores the window; pass window=None for full attention")
        return sdpa(q, k, v, is_causal=True)
    if window >= T and impl != "flex":
        return sdpa(q, k, v, is_causal=True)
    if impl == "auto":  # FlexAttention's kernels need a head size of at least 16
        impl = "flex" if q.is_cuda and q.shape[-1] >= 16 else "blocked"
    if impl == "flex":
        return sliding_window_flex(q, k, v, window)
    return sliding_window_blocked(q, k, v, window)
