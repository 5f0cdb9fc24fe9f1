"""Building blocks of the DRT: rotary embeddings, sliding-window self-attention, the SwiGLU MLP,
the GCA layer and the bidirectional chunk encoder.

Shape letters: B batch, T positions (text and landmarks), C chunks, S positions per chunk,
H heads, Hk memory heads, D head size, d model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gca.config import DRTConfig
from gca.ops import grouped_cross_attention, sliding_window_attention
from gca.ops.sliding_window import sdpa


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _rope_tables_eager(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    ang = torch.remainder(ang, 2 * math.pi)
    return ang.cos(), ang.sin()


@torch.library.custom_op("gca::rope_tables", mutates_args=())
def _rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_tables_eager(positions, head_dim, theta)


@_rope_tables.register_fake
def _rope_tables_fake(positions, head_dim, theta):
    shape = (positions.shape[0], head_dim // 2)
    return positions.new_empty(shape, dtype=torch.float64), positions.new_empty(shape, dtype=torch.float64)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``(T, D/2)`` (float64; cast where used) for integer ``positions`` ``(T,)``.

    Angles are formed in float64: at 16M positions a float32 product ``pos * freq`` would be off
    by up to a radian, which would scramble the relative rotations inside the window.
    A custom op (``gca::rope_tables``), so that ``torch.compile`` materialises the two small tables
    instead of inlining the float64 power and cosine into every rotary kernel of the forward and
    backward (24 of the 103 ms of a compiled 64K-token training step of the ``small`` preset on an
    H200), and without a graph break. Eager calls (e.g. every decoding step) skip the op's dispatch.
    """
    if torch.compiler.is_compiling():
        return _rope_tables(positions, head_dim, float(theta))
    return _rope_tables_eager(positions, head_dim, float(theta))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``(..., T, D)`` rotated pairwise (first half, second half); cos/sin ``(T, D/2)``."""
    dt = torch.promote_types(x.dtype, torch.float32)  # half precision is rotated in float32
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    cos, sin = cos.to(dt), sin.to(dt)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions.

    ``window=None`` attends over all earlier positions (full baseline); ``causal=False`` attends
    both ways (chunk encoder, which runs on one chunk at a time).
    """

    def __init__(self, cfg: DRTConfig, window: int | None, causal: bool = True):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.window, self.causal, self.impl = window, causal, cfg.attn_impl
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.h, self.d).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        (q, k), v = apply_rope(qkv[:2], cos, sin), qkv[2]  # q and k rotated in one pass
        if not self.causal:
            y = sdpa(q, k, v)  # the chunk encoder: both ways, one chunk (no cuDNN: gca.ops.sliding_window.NO_CUDNN)
        else:
            y = sliding_window_attention(q, k, v, self.window, impl=self.impl)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ring, pos: torch.Tensor):
        """Streaming: x ``(B, n, d)`` at absolute positions ``pos`` ``(n,)`` attends to itself and to
        the ring buffer ``ring`` (the previous positions of the window), then is written into it."""
        B, n, _ = x.shape
        qkv = self.qkv(x).view(B, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        (q, k), v = apply_rope(qkv[:2], cos, sin), qkv[2]
        if self.window is None:  # full attention: append, then attend to every position held
            first = ring.length == 0
            keys, vals = ring.append(k, v)
            if first:  # the first piece of a prefill: plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # the key length changes every step: keep cuDNN out, it re-plans each new length (ms of host time)
                if n == 1:  # decoding: the new position sees everything held
                    y = sdpa(q, keys, vals)
                else:  # queries are the last n positions: causal, aligned to the bottom right
                    kp = torch.arange(keys.shape[2], device=q.device)
                    y = sdpa(q, keys, vals, attn_mask=kp[None, :] <= pos[:, None])
            return self.o(y.transpose(1, 2).reshape(B, n, -1))
        if n > 2 * self.window:
            y = _ring_blocked_attention(q, k, v, ring, self.window)  # long pieces: O(n * W)
        elif n == 1:
            # decoding: once written, the ring holds exactly the new position's window (the last W
            # positions, itself included), in slot order; attention does not care about the order, so
            # attend to the ring as it is: no copy of it, and no mask once it is full
            ring.write(k, v, pos)
            mask = None if ring.full else (ring.pos >= 0)[None, :]
            y = sdpa(q, ring.k.to(q.dtype), ring.v.to(q.dtype), attn_mask=mask)
        else:
            keys, vals, kpos = ring.keys_with(k, v, pos)
            qp, kp = pos[:, None], kpos[None, :]
            mask = (kp >= 0) & (kp <= qp)
            if self.window is not None:
                mask = mask & (qp - kp < self.window)
            # decoding (a few queries): cuDNN's per-call host cost dwarfs the GPU work, so leave it out
            attend = sdpa if n <= 16 else F.scaled_dot_product_attention
            y = attend(q, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask)
        if n != 1:  # (a decoded token was written before it attended)
            ring.write(k, v, pos)
        return self.o(y.transpose(1, 2).reshape(B, n, -1))


def _ring_blocked_attention(q, k, v, ring, W: int) -> torch.Tensor:
    """Sliding-window attention of n new positions (q, k, v ``(B, H, n, D)``) that directly follow
    the W positions held in ``ring``: blocks of W queries each see a span of 2W keys."""
    B, H, n, D = q.shape
    order = ring.pos.argsort()  # unwritten slots (-1) first, then the last W positions in order
    k_all = torch.cat([ring.k[:, :, order].to(k.dtype), k], 2)  # (B, H, W + n, D)
    v_all = torch.cat([ring.v[:, :, order].to(v.dtype), v], 2)
    valid = torch.cat([ring.pos[order] >= 0, torch.ones(n, dtype=torch.bool, device=q.device)])
    nb = -(-n // W)
    pad = nb * W - n
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        k_all, v_all = F.pad(k_all, (0, 0, 0, pad)), F.pad(v_all, (0, 0, 0, pad))
        valid = F.pad(valid, (0, pad))
    kb = k_all.unfold(2, 2 * W, W).transpose(-1, -2)  # (B, H, nb, 2W, D); block b spans [bW, bW + 2W)
    vb = v_all.unfold(2, 2 * W, W).transpose(-1, -2)
    r = torch.arange(W, device=q.device)[:, None]  # query r of block b sits at index W + bW + r
    a = torch.arange(2 * W, device=q.device)[None, :]
    mask = ((a > r) & (a <= r + W))[None] & valid.unfold(0, 2 * W, W)[:, None, :]  # (nb, W, 2W)
    y = F.scaled_dot_product_attention(q.view(B, H, nb, W, D), kb, vb, attn_mask=mask)
    return y.reshape(B, H, nb * W, D)[:, :, :n]


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: sliding-window (or full) attention, then the MLP."""

    def __init__(self, cfg: DRTConfig, window: int | None):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = SelfAttention(cfg, window)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), cos, sin)
        return h + self.mlp(self.norm2(h))

    def step(self, h, cos, sin, ring, pos):
        h = h + self.attn.forward_cached(self.norm1(h), cos, sin, ring, pos)
        return h + self.mlp(self.norm2(h))


class GCA(nn.Module):
    """Queries from the residual stream, keys and values from the shared chunk memory."""

    def __init__(self, cfg: DRTConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, h, mem_k, mem_v, indices, weights, offset: int = 0):
        """h ``(B, T, d)``; mem_k/v ``(B, Cm, Sm, Hk, D)``; indices/weights ``(B, C, K)``, one row per
        *query* chunk touched by h. ``offset``: position of h[:, 0] inside its chunk (streaming);
        with ``offset=0`` and ``T = C * S`` this is the whole-sequence case."""
        B, T, d = h.shape
        C = indices.shape[1]
        H, D, S = self.cfg.num_heads, self.cfg.head_dim, self.cfg.chunk_size
        q = self.q(self.norm(h))
        if C == 1:
            q = q.view(B, 1, T, H, D)  # all of h in one chunk: no padding (decoding)
            back = 0
        else:
            back = C * S - offset - T
            q = F.pad(q, (0, 0, offset, back)).view(B, C, S, H, D)
        o = grouped_cross_attention(
            q, mem_k, mem_v, indices, weights.to(q.dtype),
            softmax_one=self.cfg.gca_softmax_one, impl=self.cfg.gca_impl,
            validate=False,  # indices come from causal_topk: in range by construction, no device sync
        )  # (B, C, S, H, D)
        o = o.reshape(B, -1, d)
        if C > 1:
            o = o[:, offset : offset + T]
        return self.o(o)


class UpperLayer(nn.Module):
    """Sliding-window attention, GCA, MLP. ``residual="plain"`` adds GCA to the stream;
    ``"published"`` lets it reach the stream only through the MLP's input."""

    def __init__(self, cfg: DRTConfig):
        super().__init__()
        self.residual = cfg.residual
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = SelfAttention(cfg, cfg.window)
        self.gca = GCA(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.gca_enabled = True  # False: GCA adds nothing (DRT.gca_disabled), as if every weight were 0

    def forward(self, h, cos, sin, mem_k, mem_v, indices, weights):
        h = h + self.attn(self.norm1(h), cos, sin)
        return self.gca_mlp(h, (mem_k, mem_v, indices, weights))

    def gca_mlp(self, h, gca_args):
        """What follows self-attention: GCA with ``gca_args`` (:class:`GCA`'s arguments after ``h``;
        None when the memory is still empty, which, like ``gca_enabled=False``, adds nothing), then the MLP."""
        if gca_args is None or not self.gca_enabled:
            return h + self.mlp(self.norm2(h))
        if self.residual == "plain":
            h = h + self.gca(h, *gca_args)
            return h + self.mlp(self.norm2(h))
        x = h + self.gca(h, *gca_args)
        return h + self.mlp(self.norm2(x))

    def step(self, h, cos, sin, ring, pos, gca_args, wait=None):
        """Streaming: ``gca_args`` = (mem_k, mem_v, indices, weights, offset), or None when the memory
        is still empty; ``wait`` is called between self-attention and GCA (joins an offloaded fetch)."""
        h = h + self.attn.forward_cached(self.norm1(h), cos, sin, ring, pos)
        if wait is not None and gca_args is not None and self.gca_enabled:
            wait()
        return self.gca_mlp(h, gca_args)


class ChunkEncoder(nn.Module):
    """Bidirectional transformer over each chunk alone. Returns the landmark keys used by
    retrieval and the memory keys/values shared by every upper layer."""

    def __init__(self, cfg: DRTConfig):
        super().__init__()
        self.cfg = cfg
        self.norm_in = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.layers = nn.ModuleList()
        for _ in range(cfg.encoder_layers):
            layer = DecoderLayer(cfg, None)
            layer.attn.causal = False
            self.layers.append(layer)
        self.norm_out = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.retrieval_key == "centered":
            self.key_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.memory_key_shift:  # per-feature weight of the previous position in each memory key
            self.key_shift = nn.Parameter(torch.full((cfg.hidden_size,), 0.5))
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.k = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v = nn.Linear(cfg.hidden_size, kv_dim, bias=False)

    def forward(self, h: torch.Tensor):
        # h (B, C, S, d): the lower layers' output at every position of every chunk
        B, C, S, d = h.shape
        x = self.norm_in(h).reshape(B * C, S, d)
        cos, sin = rope_cos_sin(torch.arange(S, device=h.device), self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = x.view(B, C, S, d)
        if self.cfg.retrieval_key == "centered" or self.cfg.center_memory:
            # each position's deviation from its chunk's mean: a component shared by every position
            # (a massive activation) cancels before the norm instead of drowning the chunk's content
            centred = x - x.mean(dim=2, keepdim=True)
        if self.cfg.retrieval_key == "centered":
            lmk = self.key_norm(centred[:, :, -1])  # (B, C, d) retrieval key of each chunk
        else:
            lmk = self.norm_out(x[:, :, -1])
        x = self.norm_out(centred if self.cfg.center_memory else x)
        xk = x
        if self.cfg.memory_key_shift:  # position j's key also sees position j - 1 (zeros before the first)
            prev = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)
            xk = x + self.key_shift * (prev - x)
        if self.cfg.landmark_memory == "zero":
            # the landmark's memory key and value are 0 (k and v have no bias): a slot every GCA
            # query may attend to for nothing, and the landmark serves retrieval alone
            keep = torch.ones(S, 1, dtype=x.dtype, device=x.device)
            keep[-1] = 0
            x, xk = x * keep, xk * keep
        mem_k = self.k(xk).view(B, C, S, self.cfg.kv_heads, self.cfg.head_dim)
        mem_v = self.v(x).view(B, C, S, self.cfg.kv_heads, self.cfg.head_dim)
        return lmk, mem_k, mem_v
