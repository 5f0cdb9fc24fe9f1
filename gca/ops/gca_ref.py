"""Readable PyTorch reference for grouped cross attention (GCA).

Dimension letters used in shape comments:
    B batch, Cq query chunks, Cm memory chunks, S query positions per chunk,
    Sm positions per memory chunk, H query heads, Hk memory heads (Hk divides H),
    G = H // Hk query heads per memory head, D head size, K retrieved slots.

The reference loops over the K retrieval slots and gathers one slot's chunks at a time,
so it never holds all K retrieved chunks at once (the published code copies all of them
before its kernel runs). Every step is a plain autograd op: gradients reach q, mem_k,
mem_v and weights, and a memory chunk retrieved several times accumulates its gradient
through the gather's backward.
"""

from __future__ import annotations

import math

import torch

try:  # (private APIs: a torch without them reads every tensor's values)
    from torch._C._functorch import is_batchedtensor as _is_batched
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover
    _is_batched = _is_fake = lambda t: False


def values_readable(t: torch.Tensor) -> bool:
    """Whether a tensor's values can be read back for a range check: not a meta or fake tensor (shape
    inference, FLOP counting) nor one batched by ``torch.func.vmap``, which have shapes but no values."""
    return not (t.device.type == "meta" or _is_fake(t) or _is_batched(t))


def check_scale(scale) -> float | None:
    """``scale`` as a float (None stays None); anything but a finite number is a ValueError. The public op
    and the kernels' entry points check it alike (a NaN scale gave the reference's NaN output)."""
    if scale is None:
        return None
    if (torch.compiler.is_compiling() and isinstance(scale, (int, float, torch.SymInt, torch.SymFloat))
            and not isinstance(scale, bool)):
        value = scale  # (1/sqrt(D) of a dynamic head size is symbolic there: float() would break the graph)
    elif isinstance(scale, torch.Tensor) and scale.requires_grad:
        raise ValueError(
            "scale is taken as a number, so a tensor that requires grad would be cut from the graph (a learned "
            "temperature would never train): multiply q by it instead and pass scale=1.0 (the default scale is "
            "1/sqrt(D))"
        )
    else:
        try:
            value = None if isinstance(scale, (bool, str, bytes)) else float(scale)
        except (TypeError, ValueError, RuntimeError):  # a list, a tensor of several elements, ...
            value = None
    # (comparisons, not math.isfinite, which a symbolic value cannot take; NaN fails value == value)
    if value is None or not (value == value and -math.inf < value < math.inf):
        raise ValueError(f"scale must be a finite number (or None for 1/sqrt(D)), got {scale!r}")
    return value


def gca_reference(
    q: torch.Tensor,  # (B, Cq, S, H, D)
    mem_k: torch.Tensor,  # (B, Cm, Sm, Hk, D)
    mem_v: torch.Tensor,  # (B, Cm, Sm, Hk, D)
    indices: torch.Tensor,  # (B, Cq, K) integer, -1 = empty slot
    weights: torch.Tensor,  # (B, Cq, K)
    softmax_one: bool = False,
    scale: float | None = None,
) -> torch.Tensor:  # (B, Cq, S, H, D)
    """Plain PyTorch GCA; arguments as in :func:`gca.ops.grouped_cross_attention` (unchecked). Half-precision
    inputs are computed in float32 (as the kernels accumulate), also inside an autocast region, which would
    otherwise run the einsums in its lower precision (1e-2 off in bf16 where the kernels are 1e-6)."""
    if autocasting(q.device):
        with torch.autocast(q.device.type, enabled=False):
            return _reference(q, mem_k, mem_v, indices, weights, softmax_one, scale)
    return _reference(q, mem_k, mem_v, indices, weights, softmax_one, scale)


def autocasting(device: torch.device) -> bool:
    """Whether an autocast region is active for ``device``'s type (False for types autocast does not know)."""
    return device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device.type)


def _reference(q, mem_k, mem_v, indices, weights, softmax_one, scale):
    B, Cq, S, H, D = q.shape
    Hk = mem_k.shape[3]
    G = H // Hk
    K = indices.shape[-1]
    if scale is None:
        scale = D**-0.5
    out_dtype = q.dtype
    # Half-precision inputs are computed in float32, like the fused kernels accumulate.
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if K == 0 or mem_k.shape[1] == 0 or mem_k.shape[2] == 0:
        # nothing to read (with Cm = 0 every index is -1; Sm = 0 chunks hold no position, where the
        # softmax_one max below would fail on an empty axis): zeros, still joined to the graph so that a
        # backward gives the inputs zero gradients instead of failing, as the fused kernels do
        out = q.new_zeros((B, Cq, S, H, D), dtype=cdt)
        never = torch.zeros((), dtype=torch.bool, device=q.device)
        for t in (q, mem_k, mem_v, weights):
            if t.requires_grad:
                out = out + torch.where(never, t.sum().to(cdt), 0.0)  # NaN-free zero gradient
        return out.to(out_dtype)
    qg = q.to(cdt).reshape(B, Cq, S, Hk, G, D)
    valid = indices >= 0
    safe = indices.clamp(min=0).long()
    # empty slots contribute nothing, not even gradient, whatever their weight holds (NaN included)
    w = torch.where(valid, weights.to(cdt), 0.0)
    b_idx = torch.arange(B, device=q.device)[:, None]  # (B, 1) broadcast against (B, Cq)
    out = q.new_zeros((B, Cq, S, Hk, G, D), dtype=cdt)
    for i in range(K):
        ok = valid[:, :, i, None, None, None]
        # empty slots read chunk 0 and are zeroed, so even NaN or garbage there contributes nothing
        k_i = torch.where(ok, mem_k[b_idx, safe[:, :, i]].to(cdt), 0.0)  # (B, Cq, Sm, Hk, D)
        v_i = torch.where(ok, mem_v[b_idx, safe[:, :, i]].to(cdt), 0.0)
        s = torch.einsum("bcshgd,bcthd->bchgst", qg, k_i) * scale  # (B, Cq, Hk, G, S, Sm)
        if softmax_one:
            # softmax with an extra logit fixed at 0: exp(s) / (1 + sum exp(s)), computed stably
            m = s.amax(dim=-1, keepdim=True).clamp(min=0.0)
            p = torch.exp(s - m)
            p = p / (p.sum(dim=-1, keepdim=True) + torch.exp(-m))
        else:
            p = torch.softmax(s, dim=-1)
        o_i = torch.einsum("bchgst,bcthd->bcshgd", p, v_i)  # (B, Cq, S, Hk, G, D)
        out = out + w[:, :, i, None, None, None, None] * o_i
    return out.reshape(B, Cq, S, H, D).to(out_dtype)


def gca_bruteforce(q, mem_k, mem_v, indices, weights, softmax_one=False, scale=None):
    """Element-by-element loop of the definition, for tests on tiny shapes only."""
    B, Cq, S, H, D = q.shape
    Hk = mem_k.shape[3]
    G = H // Hk
    if scale is None:
        scale = D**-0.5
    out = torch.zeros_like(q)
    for b in range(B):
        for c in range(Cq):
            for i in range(indices.shape[-1]):
                idx = int(indices[b, c, i])
                if idx < 0:
                    continue
                for h in range(H):
                    kh = mem_k[b, idx, :, h // G]  # (Sm, D)
                    vh = mem_v[b, idx, :, h // G]
                    for s in range(S):
                        logits = (kh @ q[b, c, s, h]) * scale  # (Sm,)
                        e = torch.exp(logits - logits.max())
                        denom = e.sum() + (torch.exp(-logits.max()) if softmax_one else 0.0)
                        out[b, c, s, h] = out[b, c, s, h] + weights[b, c, i] * (e / denom) @ vh
    return out
