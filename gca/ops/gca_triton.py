"""Fused Triton kernels for grouped cross attention (GCA), forward, backward and decode.

Dimension letters (as in :mod:`gca.ops.gca_ref`):
    B   batch                          Cq  query chunks       Cm  memory chunks
    S   query positions per chunk      Sm  positions per memory chunk
    H   query heads                    Hk  memory heads (Hk divides H)
    G   = H // Hk, query heads sharing one memory head
    D   head size                      K   retrieval slots per query chunk
    R   = G * S, the rows of one head group: the G query heads of a memory head stacked, row
        r = g * S + s is position s of query head hk * G + g
    T   query tokens of the decode path (1..S)
    BLOCK_M rows of R per tile; BLOCK_N memory positions per tile (forward and dQ: one tile holds
    a whole memory chunk, Sm <= 128; dK/dV: at most 64 per program); BLOCK_D = D.

What the kernels compute (see :func:`gca.ops.grouped_cross_attention` for the contract):
    O_i = softmax(scale * Q K_i^T) V_i for each slot i (K_i, V_i = memory chunk indices[b, c, i]),
    out = sum_i w_i O_i. With ``softmax_one`` each denominator gets +1 (a zero logit).

The memory is read *through the indices inside the kernels*: nothing is gathered or copied.

Kernels
    ``_gca_fwd_kernel``   one program per (row block of R, query chunk (b, c), memory head hk[, slot]):
                          loads its Q rows once, loops over the K slots, loads that slot's K/V tile
                          (Sm x D) through the index, softmax(QK^T)V in fp32 and accumulates w_i O_i.
                          Saves the per-slot logsumexp, LSE (B, Cq, H, K, S) fp32, for the backward.
                          With NSPLIT = K (decode) each program does one slot and writes w_i O_i to
                          a (K, ...) fp32 buffer that is summed afterwards.
    ``_gca_bwd_dq_kernel``  same grid as the forward: recomputes P_i per slot (from LSE) and gives
                          dQ and DELTA_i = rowsum(dO * O_i) = rowsum(P_i * dO V_i^T) (B, Cq, H, K, S);
                          dw_i = sum_{s,h} <dO, O_i> = sum_{s,h} DELTA_i is summed from DELTA after it.
    ``_gca_bwd_dkdv_kernel``  one program per (memory chunk (b, m), memory head hk, block of <= 64
                          memory positions): loops over the (query chunk, slot) pairs that retrieved
                          chunk m, found through an inverted index (stable sort of the flattened
                          indices + CSR offsets, built with torch ops on the device, no host sync),
                          recomputes P_i^T from LSE and accumulates dK, dV in registers.
The memory head is the slowest grid axis, so programs running together share one (b, hk) slice of
the memory (and of q / dO in the backward), a few MB that stay in L2 however often they are retrieved.
Gradient formulas, per slot i (P_i includes the +1 denominator when softmax_one):
    dV_i = w_i P_i^T dO,  dS_i = w_i P_i * (dO V_i^T - DELTA_i),  dQ = scale sum_i dS_i K_i,
    dK_i = scale dS_i^T Q,  dw_i = sum DELTA_i  (zero for empty slots).
The backward is deterministic: no atomics; every sum has a fixed order.

Empty slots (index -1) load zero tiles (chunk 0's address with every element masked: no branch,
so the slot loop stays pipelined) with weight 0; they add nothing to the output, whatever chunk 0
holds (NaN included), take no dK/dV and get dw = 0.

Supported: q, mem_k, mem_v in fp16 / bf16 / fp32 (fp32 accumulation; fp32 dots in IEEE precision,
not TF32); weights of any float dtype; D a power of two in [16, 128]; Sm in [1, 128]; any S; K >= 0.
Other inputs fall back to :func:`gca.ops.gca_ref.gca_reference` with a warning.

Layers: kernels -> launchers (``gca_fwd`` / ``gca_bwd``: allocation, grid, configs by shape in
``_config``) -> ``torch.library`` custom ops ``gca::fwd`` / ``gca::bwd`` / ``gca::decode`` with fake
(meta) kernels, and ``register_autograd`` on ``gca::fwd`` as the autograd layer (``torch.compile``
sees opaque ops) -> public ``gca_triton`` and ``gca_decode``. Eager calls skip the ops' Python
dispatch (~0.6 ms of host time per forward + backward): a thin ``autograd.Function`` (``_GCAFunction``)
calls the same launchers, and eager decode calls its launcher directly.
On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module
is imported), which is how CI tests them; two interpreter gaps are worked around there (loops over
loaded bounds become ``while`` loops; bf16 dot operands are upcast after rounding).
"""

import warnings

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from gca.ops.gca_ref import check_scale, gca_reference

__all__ = ["gca_triton", "gca_decode", "gca_fwd", "gca_bwd", "supports", "gluon_reason", "flops", "bytes_moved"]

# Tests set this to fill every buffer the launchers allocate with NaN, so an element a kernel
# forgets to write shows up as NaN instead of a plausible stale value.
POISON_OUTPUTS = False

# Benchmarks may override launch configs here, e.g. {"fwd": dict(BLOCK_M=64, num_warps=4, num_stages=3)}.
CONFIG_OVERRIDES: dict = {}

_LOG2E = 1.4426950408889634


@triton.jit
def _probe():
    pass


# @triton.jit picks the interpreter when TRITON_INTERPRET=1 at decoration time, i.e. when this
# module is imported (setting it later has no effect on these kernels).
INTERPRET = type(_probe).__name__ == "InterpretedFunction"
# The interpreter's tl.dot gives garbage for bfloat16 operands (Triton 3.6, numpy 2.4): there, dot
# operands are upcast to float32 after the same rounding (so results match the GPU's bf16 dots).
_UPCAST_DOTS = tl.constexpr(INTERPRET)


@triton.jit
def _log2(x):
    """log2 of positive fp32. On the GPU the MUFU's lg2.approx (relative error < 2^-22) instead of
    tl.log2's accurate libdevice routine, a ~30-instruction polynomial per call that made the
    forward's per-slot LSE about 13% of its loop's instructions (sm_90a SASS, SPEC shape); the
    interpreter has no libdevice, so it keeps tl.log2."""
    if _UPCAST_DOTS:
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def _fdiv(a, b):
    """a / b in fp32; on the GPU the approximate division (MUFU reciprocal and a multiply, within 2
    ulp) instead of the full-range sequence; the interpreter divides exactly."""
    if _UPCAST_DOTS:
        return a / b
    else:
        return libdevice.fast_dividef(a, b)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if _UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gca_fwd_kernel(
    Q, MK, MV, IDX, W, O, LSE,
    sq_b, sq_c, sq_s, sq_h, sq_d,
    sk_b, sk_c, sk_s, sk_h, sk_d,
    sv_b, sv_c, sv_s, sv_h, sv_d,
    si_b, si_c, si_k,
    sw_b, sw_c, sw_k,
    so_p, so_b, so_c, so_s, so_h, so_d,
    Cq, qk_scale,
    S: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
    NSPLIT: tl.constexpr, N_LOOP: tl.constexpr, SOFTMAX_ONE: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bc = tl.program_id(1).to(tl.int64)
    pid_hs = tl.program_id(2)
    hk = pid_hs // NSPLIT
    b = pid_bc // Cq
    c = pid_bc % Cq
    split = pid_hs % NSPLIT  # decode (NSPLIT = K, N_LOOP = 1): this program does slot `split` only

    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the head group
    row_ok = r < G * S
    s = r % S
    h = hk * G + r // S
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    col_ok = n < Sm

    q = tl.load(
        Q + b * sq_b + c * sq_c + s[:, None] * sq_s + h[:, None] * sq_h + d[None, :] * sq_d,
        mask=row_ok[:, None], other=0.0,
    )
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # (hoisting the tile addresses' loop-invariant part, as the dQ kernel does, saves 33 of 344
    # instructions an iteration at the SPEC shape but raises the registers from 125 to 158-166 where
    # K = 4 unrolls the loop, one program fewer an SM; timed at K = 8 and 16 on an H200: no gain
    # (benchmarks/KERNEL_NOTES.md); code at commit 69bdda9 as HOIST)
    for ii in range(N_LOOP):
        i = split + ii
        idx = tl.load(IDX + b * si_b + c * si_c + i * si_k)
        w = tl.load(W + b * sw_b + c * sw_c + i * sw_k).to(tl.float32)
        valid = idx >= 0
        w = tl.where(valid, w, 0.0)
        idx = tl.maximum(idx, 0)
        # an empty slot's tiles load as zeros (chunk 0's address, every element masked): whatever chunk 0
        # holds, NaN included, the slot adds exactly nothing, as in the reference
        k = tl.load(
            MK + b * sk_b + idx * sk_c + n[:, None] * sk_s + hk * sk_h + d[None, :] * sk_d,
            mask=col_ok[:, None] & valid, other=0.0,
        )
        v = tl.load(
            MV + b * sv_b + idx * sv_c + n[:, None] * sv_s + hk * sv_h + d[None, :] * sv_d,
            mask=col_ok[:, None] & valid, other=0.0,
        )
        qk = _dot(q, tl.trans(k), None, DOT_PREC)  # (M, N), unscaled
        if Sm % BLOCK_N != 0:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m = tl.max(qk, 1) * qk_scale  # log2 units (qk_scale = scale * log2(e) > 0)
        if SOFTMAX_ONE:
            m = tl.maximum(m, 0.0)
        p = tl.exp2(qk * qk_scale - m[:, None])  # one FMA + exp2 per element
        l = tl.sum(p, 1)
        if SOFTMAX_ONE:
            l += tl.exp2(-m)
        o = _dot(p.to(v.dtype), v, None, DOT_PREC)
        acc += o * _fdiv(w, l)[:, None]
        if STORE_LSE:
            lse = (m + _log2(l)) * 0.6931471805599453  # natural-log logsumexp
            tl.store(LSE + pid_bc * (H * K * S) + i * S + (h * (K * S) + s), lse, mask=row_ok)
    tl.store(
        O + split * so_p + b * so_b + c * so_c + s[:, None] * so_s + h[:, None] * so_h + d[None, :] * so_d,
        acc.to(O.dtype.element_ty), mask=row_ok[:, None],
    )


@triton.jit
def _gca_bwd_dq_kernel(
    Q, MK, MV, IDX, W, DO, LSE, DQ, DELTA,
    sq_b, sq_c, sq_s, sq_h, sq_d,
    sk_b, sk_c, sk_s, sk_h, sk_d,
    sv_b, sv_c, sv_s, sv_h, sv_d,
    si_b, si_c, si_k,
    sw_b, sw_c, sw_k,
    sdo_b, sdo_c, sdo_s, sdo_h, sdo_d,
    Cq, qk_scale, scale,
    S: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bc = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    b = pid_bc // Cq
    c = pid_bc % Cq

    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < G * S
    s = r % S
    h = hk * G + r // S
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    col_ok = n < Sm

    q = tl.load(
        Q + b * sq_b + c * sq_c + s[:, None] * sq_s + h[:, None] * sq_h + d[None, :] * sq_d,
        mask=row_ok[:, None], other=0.0,
    )
    do = tl.load(
        DO + b * sdo_b + c * sdo_c + s[:, None] * sdo_s + h[:, None] * sdo_h + d[None, :] * sdo_d,
        mask=row_ok[:, None], other=0.0,
    )
    do = do.to(q.dtype)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # slot i + 1's index and weight are loaded during slot i: with no load inside an iteration
    # feeding that iteration's tile addresses, Triton's pipeliner issues the next slot's tile loads
    # before this slot's matmuls (with num_stages >= 3); loaded in the iteration itself, the tiles
    # were fetched at its end and waited for at once (backward 1.33 -> 1.29 ms at the SPEC shape, H200)
    idx_n = tl.load(IDX + b * si_b + c * si_c)
    w_n = tl.load(W + b * sw_b + c * sw_c).to(tl.float32)
    # the tile addresses' loop-invariant parts: a slot adds one scalar offset per tile
    k_base = MK + b * sk_b + hk * sk_h
    v_base = MV + b * sv_b + hk * sv_h
    k_off = n[:, None] * sk_s + d[None, :] * sk_d
    v_off = n[:, None] * sv_s + d[None, :] * sv_d
    for i in range(K):
        idx = idx_n
        w = w_n
        i_n = tl.minimum(i + 1, K - 1)
        idx_n = tl.load(IDX + b * si_b + c * si_c + i_n * si_k)
        w_n = tl.load(W + b * sw_b + c * sw_c + i_n * sw_k).to(tl.float32)
        valid = idx >= 0
        w = tl.where(valid, w, 0.0)
        idx = tl.maximum(idx, 0)
        k = tl.load((k_base + idx * sk_c) + k_off, mask=col_ok[:, None] & valid, other=0.0)  # zeros if empty
        v = tl.load((v_base + idx * sv_c) + v_off, mask=col_ok[:, None] & valid, other=0.0)
        stat = pid_bc * (H * K * S) + i * S + (h * (K * S) + s)  # (B, Cq, H, K, S) contiguous
        lse = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
        qk = _dot(q, tl.trans(k), None, DOT_PREC)
        if Sm % BLOCK_N != 0:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        p = tl.exp2(qk * qk_scale - lse[:, None])  # normalised P_i, (M, N)
        dp = _dot(do, tl.trans(v), None, DOT_PREC)  # dO V_i^T
        # <dO, O_i> = <dO, P_i V_i> = rowsum(P_i * dO V_i^T): no need to recompute O_i
        pdp = p * dp
        delta = tl.sum(pdp, 1)  # 0 on masked rows (dO = 0)
        tl.store(DELTA + stat, delta, mask=row_ok)  # dw_i = sum of DELTA_i over heads and rows, after the kernel
        ds = (pdp - p * delta[:, None]) * w  # = p (dP - delta) w: one FFMA and one FMUL an element
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC)
    dq = dq * scale
    tl.store(
        DQ + pid_bc * (S * H * BLOCK_D) + ((s[:, None] * H + h[:, None]) * BLOCK_D + d[None, :]),  # contiguous
        dq.to(DQ.dtype.element_ty), mask=row_ok[:, None],
    )


@triton.jit
def _dkdv_step(
    t, pair, dk, dv, k, v, col_ok, b, hk, Q, W, DO, LSE, DELTA,
    sq_b, sq_c, sq_s, sq_h, sq_d, sw_b, sw_c, sw_k, sdo_b, sdo_c, sdo_s, sdo_h, sdo_d,
    Cq, qk_scale,
    S: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """dK, dV contributions of step t: row block t % NRB of the (t // NRB)-th (query chunk, slot)
    pair that retrieved this memory chunk (pairs x row blocks flattened into one pipelined loop);
    ``pair`` is that pair's ORDER entry, flattened (b * Cq + c) * K + i."""
    NRB: tl.constexpr = (G * S + BLOCK_M - 1) // BLOCK_M
    d = tl.arange(0, BLOCK_D)
    bc = pair // K
    i = pair % K
    c = bc - b * Cq  # the inverted index of chunk (b, m) holds batch b's pairs only (a modulo by the
    # runtime Cq cost a 64-bit division, ~25 instructions a step)
    w = tl.load(W + b * sw_b + c * sw_c + i * sw_k).to(tl.float32)
    r = (t % NRB) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < G * S
    s = r % S
    h = hk * G + r // S
    q = tl.load(
        Q + b * sq_b + c * sq_c + s[:, None] * sq_s + h[:, None] * sq_h + d[None, :] * sq_d,
        mask=row_ok[:, None], other=0.0,
    )
    do = tl.load(
        DO + b * sdo_b + c * sdo_c + s[:, None] * sdo_s + h[:, None] * sdo_h + d[None, :] * sdo_d,
        mask=row_ok[:, None], other=0.0,
    ).to(q.dtype)
    stat = bc * (H * K * S) + i * S + (h * (K * S) + s)
    lse = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    if TRANSPOSED:
        # (memory position x query row) tiles: P^T and dS^T come straight out of the dots as the
        # A operands of the dV and dK products
        qkT = _dot(k, tl.trans(q), None, DOT_PREC)  # (N, M)
        if Sm % BLOCK_N != 0:
            qkT = tl.where(col_ok[:, None], qkT, float("-inf"))
        pT = tl.exp2(qkT * qk_scale - lse[None, :])  # masked rows give p = 1 but dO = delta = 0 there
        pwT = pT * w  # formed once for both products
        dv = _dot(pwT.to(do.dtype), do, dv, DOT_PREC)
        dpT = _dot(v, tl.trans(do), None, DOT_PREC)  # V dO^T
        dsT = pwT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_PREC)
    else:
        qk = _dot(q, tl.trans(k), None, DOT_PREC)  # (M, N)
        if Sm % BLOCK_N != 0:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        p = tl.exp2(qk * qk_scale - lse[:, None])
        pw = p * w
        dv = _dot(tl.trans(pw.to(do.dtype)), do, dv, DOT_PREC)
        dp = _dot(do, tl.trans(v), None, DOT_PREC)
        ds = pw * (dp - delta[:, None])
        dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, DOT_PREC)
    return dk, dv


@triton.jit
def _gca_bwd_dkdv_kernel(
    Q, MK, MV, W, DO, LSE, DELTA, ORDER, OFFS, DK, DV,
    sq_b, sq_c, sq_s, sq_h, sq_d,
    sk_b, sk_c, sk_s, sk_h, sk_d,
    sv_b, sv_c, sv_s, sv_h, sv_d,
    sw_b, sw_c, sw_k,
    sdo_b, sdo_c, sdo_s, sdo_h, sdo_d,
    Cq, Cm, qk_scale, scale,
    S: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr, Hk: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
    USE_WHILE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    pid_bm = tl.program_id(0).to(tl.int64)  # b * Cm + memory chunk
    hk = tl.program_id(1)
    b = pid_bm // Cm
    mc = pid_bm % Cm
    d = tl.arange(0, BLOCK_D)
    # memory positions are split over programs: with P_i = exp(QK^T - LSE) and DELTA known, the
    # columns of dK, dV are independent (halves the accumulators for Sm = 128)
    if Sm <= BLOCK_N:
        n = tl.arange(0, BLOCK_N)
    else:
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = n < Sm

    k = tl.load(
        MK + b * sk_b + mc * sk_c + n[:, None] * sk_s + hk * sk_h + d[None, :] * sk_d,
        mask=col_ok[:, None], other=0.0,
    )
    v = tl.load(
        MV + b * sv_b + mc * sv_c + n[:, None] * sv_s + hk * sv_h + d[None, :] * sv_d,
        mask=col_ok[:, None], other=0.0,
    )
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    NRB: tl.constexpr = (G * S + BLOCK_M - 1) // BLOCK_M
    start = tl.load(OFFS + pid_bm) * NRB
    end = tl.load(OFFS + pid_bm + 1) * NRB
    # the ORDER entry of step t + 1 is loaded during step t: with no load inside a step feeding that
    # step's tile addresses, Triton's pipeliner issues the next step's query / dO tile loads before
    # this step's matmuls (num_stages >= 3); loaded in the step itself, the tiles were fetched at its
    # end and waited for at once (backward 1.33 -> 1.22 ms at the SPEC shape, H200)
    last = tl.maximum(end - 1, start)
    pair = tl.load(ORDER + start // NRB, mask=start < end, other=0)
    if USE_WHILE:
        # the Triton interpreter (numpy >= 2.3) cannot run `range` over loaded scalars
        t = start
        while t < end:
            nxt = tl.load(ORDER + tl.minimum(t + 1, last) // NRB)
            dk, dv = _dkdv_step(
                t, pair, dk, dv, k, v, col_ok, b, hk, Q, W, DO, LSE, DELTA,
                sq_b, sq_c, sq_s, sq_h, sq_d, sw_b, sw_c, sw_k, sdo_b, sdo_c, sdo_s, sdo_h, sdo_d,
                Cq, qk_scale, S, Sm, H, G, K, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, TRANSPOSED,
            )
            pair = nxt
            t += 1
    else:
        for t in range(start, end):
            nxt = tl.load(ORDER + tl.minimum(t + 1, last) // NRB)
            dk, dv = _dkdv_step(
                t, pair, dk, dv, k, v, col_ok, b, hk, Q, W, DO, LSE, DELTA,
                sq_b, sq_c, sq_s, sq_h, sq_d, sw_b, sw_c, sw_k, sdo_b, sdo_c, sdo_s, sdo_h, sdo_d,
                Cq, qk_scale, S, Sm, H, G, K, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, TRANSPOSED,
            )
            pair = nxt
    dk = dk * scale
    base = pid_bm * (Sm * Hk * BLOCK_D)  # contiguous (B, Cm, Sm, Hk, D)
    out = (n[:, None] * Hk + hk) * BLOCK_D + d[None, :]
    tl.store(DK + base + out, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + base + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------



def _alloc(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _dot_prec(dtype):
    # fp32 inputs: exact fp32 products (Hopper would otherwise use TF32, ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_n(Sm):
    return max(16, triton.next_power_of_2(Sm))


def _block_m(R, cap):
    """Rows per tile: the power of two in [16, cap] that pads R = G * S least (larger on ties),
    e.g. R = 192 -> 64 (3 full tiles) rather than 128 (2 tiles, a quarter masked)."""
    sizes = [bm for bm in (128, 64, 32, 16) if bm <= cap]
    return min(sizes, key=lambda bm: (triton.cdiv(R, bm) * bm, -bm))


def _config(kind, R, Sm, D, on_cuda):
    """Tile and launch config by shape. R = G * S rows per head group."""
    big = D * _block_n(Sm) >= 128 * 128
    if kind == "fwd":
        bm = _block_m(R, 64 if big else 128)
        # num_stages=2: 0.345 ms against 0.368 ms for 3 at the SPEC shape (H200 sweep, benchmarks/results)
        cfg = dict(BLOCK_M=bm, num_warps=8 if bm * D >= 128 * 64 else 4, num_stages=2)
    elif kind == "dq":
        cfg = dict(BLOCK_M=_block_m(R, 64), num_warps=8 if D >= 128 else 4, num_stages=2)
        if D <= 64:
            # 3 stages (the next slot's tiles load during this one) with registers capped at 168, so
            # three programs fit an SM: backward 1.33 -> 1.29 ms at the SPEC shape (H200 sweep;
            # uncapped, 173 registers and two programs, 1.36 ms)
            cfg.update(num_stages=3, maxnreg=168)
        elif _block_n(Sm) <= 64:
            # D = 128: backward 2.24 -> 2.14 ms at B=4, C=256, H=6 (H200 sweep); with Sm = 128 the
            # third stage would need ~230 KB of shared memory
            cfg.update(num_stages=3)
    else:  # dkdv; BLOCK_N: memory positions per program
        # the transposed form took the backward from 1.55 to 1.34 ms at the SPEC shape (D = 64, H200
        # sweep), 3 stages from 1.33 to 1.22 ms; at D = 128 (H = 6) the two together 2.23 -> 2.04 ms
        cfg = dict(BLOCK_M=_block_m(R, 64), BLOCK_N=64, TRANSPOSED=True, num_warps=4 if D <= 64 else 8, num_stages=3)
        # the index sort and the dweights sum on a second stream (gca_bwd): backward 1.095 -> 1.047 ms at
        # the SPEC shape (H200, median of 5 taken in turn, 2026-12-01; benchmarks/results)
        cfg.update(SIDE_STREAM=True)
    cfg.update(CONFIG_OVERRIDES.get(kind, {}))
    if not on_cuda:  # the interpreter ignores warps/stages
        cfg.update(num_warps=1, num_stages=1)
        cfg.pop("maxnreg", None)
    return cfg


def supports(q, mem_k, scale=1.0):
    """None if the Triton kernels handle these inputs, else the reason they do not."""
    D = q.shape[-1]
    Sm = mem_k.shape[2]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (needs float16, bfloat16 or float32)"
    if D < 16 or D > 128 or D & (D - 1):
        return f"head size D={D} (needs a power of two in [16, 128])"
    if Sm > 128:
        return f"memory chunk length Sm={Sm} (needs Sm <= 128)"
    if not scale > 0:
        return f"scale={scale} (needs scale > 0: the kernels fold it into a base-2 softmax)"
    return None


def gluon_reason(q, mem_k, mem_v, indices, weights):
    """None when `gca_fwd` / `gca_bwd` launch the Gluon kernels (`gca.ops.gca_gluon`: Hopper, S = Sm = 64,
    D = 128, ...) on these inputs, else why they do not."""
    if INTERPRET:
        return "the Triton interpreter (it does not run Gluon)"
    if not q.is_cuda:
        return "not a CUDA tensor"
    try:
        from gca.ops import gca_gluon
    except ImportError:
        return "this Triton has no Gluon"
    return gca_gluon.supports(q, mem_k, mem_v, indices, weights)


def _gluon(q, mem_k, mem_v, indices, weights):
    """`gca.ops.gca_gluon` when it takes these inputs, else None."""
    if gluon_reason(q, mem_k, mem_v, indices, weights) is not None:
        return None
    from gca.ops import gca_gluon

    return gca_gluon


def gca_fwd(q, mem_k, mem_v, indices, weights, softmax_one=False, scale=None, nsplit=1, store_lse=True):
    """Launch the forward. Returns ``(out (B, Cq, S, H, D) in q's dtype, lse (B, Cq, H, K, S) fp32)``.
    On Hopper at S = Sm = 64, D = 128 the warp-specialised Gluon kernel runs instead
    (`gca.ops.gca_gluon.gca_fwd_ws`).

    With ``nsplit = K`` each program does one slot (decode): the slots' ``w_i O_i`` land in an fp32
    buffer (K, B, Cq, S, H, D) that is summed here; ``lse`` is then not stored (empty tensor)."""
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    G = H // Hk
    scale = D**-0.5 if scale is None else float(scale)
    dev = q.device
    lse = _alloc((B, Cq, H, K, S) if store_lse else (0,), torch.float32, dev)
    if nsplit > 1:
        assert nsplit == K and not store_lse
        o = _alloc((K, B, Cq, S, H, D), torch.float32, dev)
    else:
        o = _alloc((B, Cq, S, H, D), q.dtype, dev)
    if q.numel() == 0 or K == 0 or Cm == 0:
        # nothing to attend to (with Cm == 0 every index must be -1)
        out = torch.zeros((B, Cq, S, H, D), dtype=q.dtype, device=dev)
        if store_lse:
            lse.zero_()
        return out, lse
    if nsplit == 1 and (gg := _gluon(q, mem_k, mem_v, indices, weights)) is not None:
        out, lse = gg.gca_fwd_ws(q, mem_k, mem_v, indices, weights, softmax_one=softmax_one, scale=scale)
        return out, (lse if store_lse else lse.new_empty(0))
    cfg = _config("fwd", G * S, Sm, D, q.is_cuda)
    bm = cfg.pop("BLOCK_M")
    grid = (triton.cdiv(G * S, bm), B * Cq, Hk * nsplit)
    so = o.stride()
    so = so if nsplit > 1 else (0,) + so
    _gca_fwd_kernel[grid](
        q, mem_k, mem_v, indices, weights, o, lse,
        *q.stride(), *mem_k.stride(), *mem_v.stride(), *indices.stride(), *weights.stride(), *so,
        Cq, scale * _LOG2E,
        S=S, Sm=Sm, H=H, G=G, K=K, NSPLIT=nsplit, N_LOOP=K if nsplit == 1 else 1, SOFTMAX_ONE=bool(softmax_one), STORE_LSE=store_lse,
        DOT_PREC=_dot_prec(q.dtype), BLOCK_M=bm, BLOCK_N=_block_n(Sm), BLOCK_D=D, **cfg,
    )
    if nsplit > 1:
        o = o.sum(0).to(q.dtype)
    return o, lse


def _inverted_index(indices, Cm):
    """For each memory chunk (b, m), the flattened slots (b * Cq + c) * K + i that retrieved it.

    Returns ``order`` (B * Cq * K,) int64, slots sorted by (b, m) with empty slots last, and CSR
    ``offsets`` (B * Cm + 1,): chunk (b, m) owns ``order[offsets[b*Cm+m] : offsets[b*Cm+m+1]]``.
    A stable sort keeps the (c, i) order within a chunk, so the backward sums in a fixed order."""
    B, Cq, K = indices.shape
    flat = indices.reshape(-1)
    batch = torch.arange(flat.numel(), device=flat.device) // (Cq * K)
    key = torch.where(flat >= 0, batch * Cm + flat, B * Cm)
    if B * Cm < 2**31:  # 32-bit keys: a radix sort over half the bits on CUDA
        key = key.to(torch.int32)
    sorted_key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(B * Cm + 1, device=flat.device, dtype=key.dtype))
    return order, offsets


_SIDE_STREAMS: dict = {}


def _side_stream(device):
    """A second CUDA stream per device, high priority so its few small kernels are scheduled as soon
    as the main stream's kernel frees an SM."""
    device = torch.device(device)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device, priority=-1)
    return _SIDE_STREAMS[device]


def gca_bwd(do, q, mem_k, mem_v, indices, weights, lse, softmax_one=False, scale=None):
    """Launch the backward. Returns ``(dq, dmem_k, dmem_v, dweights)`` in the inputs' dtypes (the Gluon
    kernels on Hopper at S = Sm = 64, D = 128, as for the forward)."""
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    G = H // Hk
    scale = D**-0.5 if scale is None else float(scale)
    dev = q.device
    lse = lse.contiguous()  # indexed as (B, Cq, H, K, S) contiguous
    if do.is_contiguous() and (gg := _gluon(q, mem_k, mem_v, indices, weights)) is not None:
        return gg.gca_bwd_gluon(do, q, mem_k, mem_v, indices, weights, lse, scale=scale)
    dq = _alloc((B, Cq, S, H, D), q.dtype, dev)
    dk = _alloc((B, Cm, Sm, Hk, D), mem_k.dtype, dev)
    dv = _alloc((B, Cm, Sm, Hk, D), mem_v.dtype, dev)
    if q.numel() == 0 or K == 0 or Cm == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, torch.zeros_like(weights)
    prec = _dot_prec(q.dtype)
    bn = _block_n(Sm)

    cfg_kv = _config("dkdv", G * S, Sm, D, q.is_cuda)
    # SIDE_STREAM (default on CUDA; CONFIG_OVERRIDES["dkdv"] = {"SIDE_STREAM": False} turns it off): the
    # inverted index's sort, which depends on the indices alone, runs on a second stream while the dQ
    # kernel runs, and the dweights sum while the dK/dV kernel runs; the main stream waits for each
    # before it needs the result. Same results. Not inside a CUDA graph capture (one stream there).
    side = None
    if cfg_kv.pop("SIDE_STREAM", False) and q.is_cuda and not torch.cuda.is_current_stream_capturing():
        side = _side_stream(dev)
    if side is not None:
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            order, offsets = _inverted_index(indices, Cm)
            sorted_ev = side.record_event()

    cfg = _config("dq", G * S, Sm, D, q.is_cuda)
    bm = cfg.pop("BLOCK_M")
    n_rb = triton.cdiv(G * S, bm)
    delta = _alloc((B, Cq, H, K, S), torch.float32, dev)
    _gca_bwd_dq_kernel[(n_rb, B * Cq, Hk)](
        q, mem_k, mem_v, indices, weights, do, lse, dq, delta,
        *q.stride(), *mem_k.stride(), *mem_v.stride(), *indices.stride(), *weights.stride(), *do.stride(),
        Cq, scale * _LOG2E, scale,
        S=S, Sm=Sm, H=H, G=G, K=K, DOT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, **cfg,
    )
    # dw_i = sum_{h, s} DELTA_i (zero for empty slots): summed here rather than across the dQ kernel's
    # warps in every step, a shared-memory reduction with two barriers an iteration
    if side is None:
        dw = torch.where(indices >= 0, delta.sum((2, 4)), 0.0).to(weights.dtype)
        order, offsets = _inverted_index(indices, Cm)
    else:
        side.wait_stream(main)  # DELTA written
        with torch.cuda.stream(side):
            dw = torch.where(indices >= 0, delta.sum((2, 4)), 0.0).to(weights.dtype)
        main.wait_event(sorted_ev)
        for t in (order, offsets, dw):
            t.record_stream(main)
    cfg = cfg_kv
    bm = cfg.pop("BLOCK_M")
    bn_kv = min(bn, cfg.pop("BLOCK_N"))
    _gca_bwd_dkdv_kernel[(B * Cm, Hk, triton.cdiv(Sm, bn_kv))](
        q, mem_k, mem_v, weights, do, lse, delta, order, offsets, dk, dv,
        *q.stride(), *mem_k.stride(), *mem_v.stride(), *weights.stride(), *do.stride(),
        Cq, Cm, scale * _LOG2E, scale,
        S=S, Sm=Sm, H=H, Hk=Hk, G=G, K=K, USE_WHILE=INTERPRET, DOT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn_kv, BLOCK_D=D, **cfg,
    )
    if side is not None:
        main.wait_stream(side)  # dw summed
    return dq, dk, dv, dw


# --------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile) and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("gca::fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
    softmax_one: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gca_fwd(q, mem_k, mem_v, indices, weights, softmax_one, scale)


@_fwd_op.register_fake
def _fwd_fake(q, mem_k, mem_v, indices, weights, softmax_one, scale):
    B, Cq, S, H, D = q.shape
    K = indices.shape[-1]
    return q.new_empty((B, Cq, S, H, D)), q.new_empty((B, Cq, H, K, S), dtype=torch.float32)


@torch.library.custom_op("gca::bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, indices: torch.Tensor,
    weights: torch.Tensor, lse: torch.Tensor, softmax_one: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gca_bwd(do, q, mem_k, mem_v, indices, weights, lse, softmax_one, scale)


@_bwd_op.register_fake
def _bwd_fake(do, q, mem_k, mem_v, indices, weights, lse, softmax_one, scale):
    return q.new_empty(q.shape), mem_k.new_empty(mem_k.shape), mem_v.new_empty(mem_v.shape), weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output):
    q, mem_k, mem_v, indices, weights, softmax_one, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, mem_k, mem_v, indices, weights, lse)
    ctx.softmax_one = softmax_one
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, mem_k, mem_v, indices, weights, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(q)
    dq, dk, dv, dw = torch.ops.gca.bwd(do, q, mem_k, mem_v, indices, weights, lse, ctx.softmax_one, ctx.scale)
    return dq, dk, dv, None, dw, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_NO_SECOND_ORDER = ("grouped_cross_attention(impl='triton'): the fused kernels have no second-order gradient "
                    "(their backward is not differentiable); use impl='torch' for a double backward")


class _GCABackward(torch.autograd.Function):
    """The kernels' backward as an autograd node of its own, used when a gradient is taken with
    ``create_graph=True``. Its inputs are the real tensors (the output gradient, q, the memory, the weights),
    so the node lies on every path from the gradients it returns to whatever they depend on, and reaching
    it raises, by any autograd API: ``torch.autograd.grad(penalty, params)``, ``backward(inputs=...)``,
    ``allow_unused=True``. (Torch's ``once_differentiable`` misses a constant output gradient, and an error
    node hung on detached copies was off the path to the inputs: ``grad(total, params)`` silently dropped
    a gradient penalty's second-order term.)"""

    @staticmethod
    def forward(ctx, do, q, mem_k, mem_v, indices, weights, lse, softmax_one, scale):
        return gca_bwd(do, q, mem_k, mem_v, indices, weights, lse, softmax_one, scale)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_SECOND_ORDER)


class _GCAFunction(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager calls: the custom op's Python
    dispatch cost ~0.6 ms of host time per forward + backward (H200 host, torch 2.11), more than the
    kernels' GPU time at small shapes. torch.compile traces the custom op instead."""

    @staticmethod
    def forward(ctx, q, mem_k, mem_v, indices, weights, softmax_one, scale):
        out, lse = gca_fwd(q, mem_k, mem_v, indices, weights, softmax_one, scale)
        ctx.save_for_backward(q, mem_k, mem_v, indices, weights, lse)
        ctx.softmax_one = softmax_one
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, mem_k, mem_v, indices, weights, lse = ctx.saved_tensors
        args = (do, q, mem_k, mem_v, indices, weights, lse, ctx.softmax_one, ctx.scale)
        # create_graph=True runs this with grad mode on: the kernels' backward then becomes a node whose own
        # backward raises (_GCABackward); otherwise the plain call, without an autograd node's host cost
        dq, dk, dv, dw = _GCABackward.apply(*args) if torch.is_grad_enabled() else gca_bwd(*args)
        return dq, dk, dv, None, dw, None, None


def _validate(q, mem_k, mem_v, indices, weights):
    """``grouped_cross_attention``'s checks (shapes, dtypes, devices; the index range, on the device under
    ``torch.compile``)."""
    from gca.ops import _check  # (gca.ops imports this module lazily: no cycle at import time)

    _check(q, mem_k, mem_v, indices, weights, check_indices=True)


def _decode(q, mem_k, mem_v, indices, weights, softmax_one, scale):
    q5, idx5, w5 = q.unsqueeze(1), indices.unsqueeze(1), weights.unsqueeze(1)
    K = indices.shape[-1]
    out, _ = gca_fwd(q5, mem_k, mem_v, idx5, w5, softmax_one, scale, nsplit=max(K, 1), store_lse=False)
    return out[:, 0]


@torch.library.custom_op("gca::decode", mutates_args=())
def _decode_op(
    q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
    softmax_one: bool, scale: float,
) -> torch.Tensor:
    return _decode(q, mem_k, mem_v, indices, weights, softmax_one, scale)


@_decode_op.register_fake
def _decode_fake(q, mem_k, mem_v, indices, weights, softmax_one, scale):
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def gca_triton(q, mem_k, mem_v, indices, weights, *, softmax_one=False, scale=None, validate=True):
    """Fused GCA; arguments, shapes and result as in :func:`gca.ops.grouped_cross_attention`
    (q ``(B, Cq, S, H, D)``, mem_k/mem_v ``(B, Cm, Sm, Hk, D)``, indices/weights ``(B, Cq, K)``).

    Differentiable in q, mem_k, mem_v and weights (once: a second-order gradient raises); works under
    ``torch.compile``. Inputs the kernels do not support (see :func:`supports`) are computed by the
    reference, with a warning. ``validate``: check shapes, dtypes and that every index lies in
    ``[-1, Cm)`` (one device synchronisation) as ``grouped_cross_attention`` does; with False an index
    out of range reads memory out of bounds."""
    if validate:
        _validate(q, mem_k, mem_v, indices, weights)
    scale = check_scale(scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    reason = supports(q, mem_k, scale)
    if reason is not None:
        warnings.warn(f"gca_triton: unsupported {reason}; using the PyTorch reference", stacklevel=2)
        return gca_reference(q, mem_k, mem_v, indices, weights, softmax_one=softmax_one, scale=scale)
    if torch.compiler.is_compiling():
        out, _ = torch.ops.gca.fwd(q, mem_k, mem_v, indices.long(), weights, bool(softmax_one), scale)
        return out
    if not torch.is_grad_enabled():
        # inference: launch the forward directly, without the LSE a backward needs
        return gca_fwd(q, mem_k, mem_v, indices.long(), weights, bool(softmax_one), scale, store_lse=False)[0]
    return _GCAFunction.apply(q, mem_k, mem_v, indices.long(), weights, bool(softmax_one), scale)


def gca_decode(q, mem_k, mem_v, indices, weights, *, softmax_one=False, scale=None, validate=True):
    """GCA for the tokens of ONE current chunk during generation.

    Args:
        q: ``(B, T, H, D)``, 1 <= T, the query tokens of the current chunk.
        mem_k, mem_v: ``(B, Cm, Sm, Hk, D)``.
        indices: ``(B, K)`` retrieved chunks of the current chunk, -1 = empty slot.
        weights: ``(B, K)``.
        validate: check shapes, dtypes and that every index lies in ``[-1, Cm)`` (one device
            synchronisation); with False an index out of range reads memory out of bounds.
    Returns ``(B, T, H, D)`` in q's dtype, equal to the main op with Cq = 1. The grid is split over
    slots x memory heads (x batch), so batch 1 still fills the GPU; slot results are summed in fp32.
    The split kernel is forward-only: when a gradient is wanted (grad mode on and q, mem_k, mem_v or
    weights requiring grad) the call runs :func:`gca_triton` with Cq = 1 instead, which has one.
    """
    if validate:
        if q.dim() != 4 or indices.dim() != 2 or weights.dim() != 2:
            raise ValueError(f"gca_decode takes q (B, T, H, D) and indices, weights (B, K); got shapes "
                             f"{tuple(q.shape)}, {tuple(indices.shape)}, {tuple(weights.shape)}")
        _validate(q.unsqueeze(1), mem_k, mem_v, indices.unsqueeze(1), weights.unsqueeze(1))
    D = q.shape[-1]
    scale = check_scale(scale)
    scale = D**-0.5 if scale is None else scale
    reason = supports(q, mem_k, scale)
    if reason is not None:
        warnings.warn(f"gca_decode: unsupported {reason}; using the PyTorch reference", stacklevel=2)
        q5, idx5, w5 = q.unsqueeze(1), indices.unsqueeze(1), weights.unsqueeze(1)
        return gca_reference(q5, mem_k, mem_v, idx5, w5, softmax_one=softmax_one, scale=scale)[:, 0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, mem_k, mem_v, weights)):
        q5, idx5, w5 = q.unsqueeze(1), indices.unsqueeze(1), weights.unsqueeze(1)
        return gca_triton(q5, mem_k, mem_v, idx5, w5, softmax_one=softmax_one, scale=scale, validate=False)[:, 0]
    if torch.compiler.is_compiling():
        return torch.ops.gca.decode(q, mem_k, mem_v, indices.long(), weights, bool(softmax_one), scale)
    return _decode(q, mem_k, mem_v, indices.long(), weights, bool(softmax_one), scale)  # eager: no op dispatch


# --------------------------------------------------------------------------------------------
# Cost model for benchmarks
# --------------------------------------------------------------------------------------------


def flops(B, Cq, S, Sm, H, D, K, backward=False):
    """Matmul FLOPs: per (query chunk, slot, head) two S x Sm x D products (QK^T and PV) in the
    forward, 2 FLOPs per multiply-add. The backward is counted as its algorithmic 5 products (QK^T
    recompute, dV, dP, dQ, dK); the kernels do 7 (QK^T and dP are computed in both kernels)."""
    f = 4 * B * Cq * K * S * Sm * H * D
    return f * 5 / 2 if backward else f


def bytes_moved(B, Cq, Cm_read, S, Sm, H, Hk, D, K, itemsize=2, backward=False):
    """Minimum bytes of the forward: q and out once, each *distinct* retrieved memory chunk's K and V
    once (Cm_read = number of distinct (b, chunk) pairs), indices (int64) and weights (fp32).
    The backward floor reads q, out-grad, the chunks and lse, writes dq, dk, dv."""
    qo = 2 * B * Cq * S * H * D * itemsize
    mem = 2 * Cm_read * Sm * Hk * D * itemsize
    meta = B * Cq * K * (8 + 4)
    if not backward:
        return qo + mem + meta
    lse = B * Cq * H * K * S * 4
    return 2 * qo + 2 * mem + meta + 2 * lse
