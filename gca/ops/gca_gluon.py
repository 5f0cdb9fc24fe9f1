"""Hopper (sm_90) GCA kernels in Gluon, Triton's lower-level dialect: the path `gca.ops.gca_triton`
takes for S = Sm = 64, D = 128, bf16 / fp16 contiguous inputs on an H100 / H200 (`supports`).

Triton 3.6 waits for every `tl.dot` whose result is not its own loop-carried accumulator at once, and
its Hopper warp specialisation does not take our loops (`benchmarks/KERNEL_NOTES.md`, "What Triton 3.6
will not do"); Gluon lets a kernel issue wgmma asynchronously and wait where it chooses. One program
per (query chunk, query head):

- the query tile (and dO's) and the retrieved key / value tiles arrive by TMA (one 64 x D box of the
  memory viewed as a (B * Cm * Sm, Hk * D) matrix per retrieved chunk) into rings of buffers, each with
  its mbarrier, issued ahead of use;
- forward: slot i + 1's scores Q K^T are issued (async) before slot i's softmax, and slot i's P V
  accumulates into the output asynchronously (P scaled by w_i / l_i first, so every slot adds into one
  accumulator), FlashAttention-3's intra-warpgroup overlap; per-slot log-sum-exps stored as `gca_fwd`
  stores them, so either backward can follow either forward;
- the forward the package launches (`gca_fwd_ws`) runs that loop in a math warpgroup fed by a loader
  warp that issues its TMA copies into "ready" / "empty" mbarrier rings (`gl.warp_specialize`,
  FlashAttention-3's layout), P handed to P V from registers, two persistent CTAs an SM looping over
  the (query chunk, head) items; `gca_fwd_gluon` is the single-warpgroup form, which issues its own
  copies and passes P through shared memory;
- dq: slot i + 1's S = Q K^T and dP = dO V^T are issued before slot i's dS = P (dP - DELTA) w, and
  dq += dS K runs asynchronously; DELTA is stored and dweights summed from it, as the Triton dq kernel
  does;
- dK / dV (one program per memory chunk and memory head, over the (query chunk, slot) pairs that
  retrieved it, from the same sorted inverted index as the Triton kernel): the next step's S^T = K Q^T
  and dP^T = V dO^T issued before this step's P^T w and dS^T, then dV += (P^T w) dO and dK += dS^T Q
  asynchronously; 4 warps (one warpgroup, 255 registers) or 8 (two warpgroups splitting the columns,
  140 registers);
- in the single-warpgroup kernels P and dS reach their wgmma through shared memory: from registers
  ptxas serialises every wgmma of the kernel (C7513); the warp-specialised forward, with one math
  warpgroup at 128 registers, takes P from registers without it.

Measured on an H200 (`benchmarks/gluon_kernels.py`, results in
`benchmarks/results/gluon_kernels_nvidia-h200_2026-12-01.txt`): at D = 128 the forward takes 0.33 ms
where the Triton kernel takes 0.45 (the warp-specialised form the package launches: 0.28, `benchmarks/gluon_ws_fwd.py`), and the backward (dK/dV at 8 warps) 1.56 ms where Triton takes
1.74; at D = 64 the Triton kernels are faster (forward 0.34 vs 0.38 ms, backward 1.10 vs 1.46), so
`supports` sends only D = 128 here. Gluon cannot run in Triton's interpreter: the CPU tests check the
dispatch rule, the CUDA tests the kernels.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from gca.ops.gca_triton import _alloc  # NaN-filled while the tests set gca_triton.POISON_OUTPUTS

__all__ = ["supports", "gca_fwd_ws", "gca_fwd_gluon", "gca_bwd_gluon", "gca_bwd_dq_gluon", "gca_bwd_dkdv_gluon"]

# head sizes this path takes (the Triton kernels are faster at D = 64, see above)
HEAD_DIMS = (128,)


# Gluon is experimental and its API moves between Triton releases: the path runs by default only on the
# releases it was tested with (GCA_GLUON=1 tries it on any other)
TESTED_TRITON = ("3.6",)


def supports(q, mem_k, mem_v, indices, weights, capability=None):
    """None if the Gluon kernels take these inputs on this device, else the reason they do not.
    ``capability`` (major, minor) defaults to q's device's. ``GCA_GLUON`` in the environment: unset,
    the path runs where it applies on the Triton releases in ``TESTED_TRITON``; ``0`` turns it off
    (the benchmarks compare both); ``1`` allows any Triton release."""
    # the shape and dtype checks first: they are what turns most calls away (D = 64), and they cost
    # no device query (this runs on every forward and backward)
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    if S != 64 or Sm != 64:
        return f"chunk lengths S={S}, Sm={Sm} (needs 64)"
    if D not in HEAD_DIMS:
        return f"head size D={D} (this path takes {HEAD_DIMS})"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (needs bfloat16 or float16)"
    if indices.dtype != torch.int64:
        return f"indices dtype {indices.dtype} (needs int64)"
    flag = os.environ.get("GCA_GLUON", "")
    if flag == "0":
        return "GCA_GLUON=0"
    version = ".".join(triton.__version__.split(".")[:2])
    if flag != "1" and version not in TESTED_TRITON:
        return f"Triton {triton.__version__} (the Gluon kernels are tested with {', '.join(TESTED_TRITON)}; GCA_GLUON=1 tries them)"
    if capability is None:
        if not q.is_cuda:
            return "not a CUDA tensor"
        capability = torch.cuda.get_device_capability(q.device)
    if tuple(capability) != (9, 0):
        return f"compute capability {tuple(capability)} (needs 9.0: wgmma and TMA as written for Hopper)"
    if K < 1 or Cm < 1 or q.numel() == 0:
        return "nothing to attend to"
    if not all(t.is_contiguous() for t in (q, mem_k, mem_v, indices, weights)):
        return "non-contiguous input"
    if any(t.data_ptr() % 16 for t in (q, mem_k, mem_v)):
        return "input not 16-byte aligned (TMA)"
    if max(q.numel(), mem_k.numel(), B * Cq * H * K * S) >= 2**31:
        return "more than 2^31 elements (the kernels index in int32)"
    return None


@triton.constexpr_function
def _mma_layout(num_warps, n):
    """wgmma accumulator layout of an (S, n) tile: 4 warps (one warpgroup) own whole rows; 8 (two
    warpgroups) split the columns."""
    wn = num_warps // 4
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, wn], instr_shape=[16, n // wn, 16])


@gluon.jit
def _barriers(N: gl.constexpr):
    """N initialised mbarriers (one per ring buffer), each completed by one arrival with its bytes."""
    bars = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(N):
        mbarrier.init(bars.index(j), count=1)
    return bars


@gluon.jit
def _invalidate(bars, N: gl.constexpr):
    for j in gl.static_range(N):
        mbarrier.invalidate(bars.index(j))


@gluon.jit
def _tile_offsets(row0, heads, head, S: gl.constexpr, D: gl.constexpr, layout: gl.constexpr):
    """Element offsets of rows row0 .. row0 + S - 1 of head ``head`` in a contiguous (rows, heads, D)
    tensor, in ``layout``."""
    r = gl.arange(0, S, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    return ((row0 + gl.expand_dims(r, 1)) * heads + head) * D + gl.expand_dims(c, 0)


@gluon.jit
def _load_slot(desc, IDX, i, b, hk, Cm, bars, smem, S: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr):
    """Start the TMA copy of slot i's tile (key or value) of retrieved chunk IDX[i] into buffer i % NBUF.
    An empty slot (-1) copies the box at row -S, wholly out of bounds, which TMA fills with zeros: the
    slot (weighted 0) then adds exactly nothing, whatever the memory holds (NaN included)."""
    idx = gl.load(IDX + i)
    row = gl.where(idx >= 0, (b * Cm + idx) * S, -S)
    buf = i % NBUF
    mbarrier.expect(bars.index(buf), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [row.to(gl.int32), hk * D], bars.index(buf), smem.index(buf))


@gluon.jit
def _slot_weight(IDX, W, i):
    """Slot i's retrieval weight in fp32, 0 for an empty slot (index -1)."""
    return gl.where(gl.load(IDX + i) >= 0, gl.load(W + i).to(gl.float32), 0.0)


@gluon.jit
def _lg2_approx(x):
    """log2 of positive fp32 by the MUFU (lg2.approx, relative error < 2^-22): `gl.log2` is libdevice's
    accurate routine, ~30 instructions for each of a thread's rows (as in `gca_triton._log2`)."""
    return gl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _exp_scores(s, qk_scale, SOFTMAX_ONE: gl.constexpr):
    """Raw scores s (fp32, S x S) to ``(p, l, m)``: the rows' maxima m in base-2 units (qk_scale = scale *
    log2 e; at least 0 with SOFTMAX_ONE), p = exp2(s * qk_scale - m) and the rows' sums l (with the
    off-by-one's exp2(-m))."""
    m = gl.max(s, axis=1) * qk_scale
    if SOFTMAX_ONE:
        m = gl.maximum(m, 0.0)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m, 1))
    l = gl.sum(p, axis=1)
    if SOFTMAX_ONE:
        l += gl.exp2(-m)
    return p, l, m


@gluon.jit
def _softmax_slot(s, IDX, W, LSE, i, rows, qk_scale, S: gl.constexpr, SOFTMAX_ONE: gl.constexpr, dtype: gl.constexpr,
                  FAST_MATH: gl.constexpr):
    """Slot i's softmax of the raw scores s (fp32, S x S): stores its log-sum-exp and returns
    P * w_i / l_i in the inputs' dtype."""
    p, l, m = _exp_scores(s, qk_scale, SOFTMAX_ONE)
    w = _slot_weight(IDX, W, i)
    if FAST_MATH:  # MUFU log2 and approximate division (l lies in [1, S + 1]), as the Triton forward does
        gl.store(LSE + i * S + rows, (m + _lg2_approx(l)) * 0.6931471805599453)
        p = p * gl.expand_dims(gl.fdiv(w, l), 1)
    else:
        gl.store(LSE + i * S + rows, (m + gl.log2(l)) * 0.6931471805599453)
        p = p * gl.expand_dims(w / l, 1)
    return p.to(dtype)


@gluon.jit
def _gca_fwd_gluon(
    q_desc, k_desc, v_desc, IDX, W, O, LSE, Cq, Cm, qk_scale,
    H: gl.constexpr, G: gl.constexpr, K: gl.constexpr, S: gl.constexpr, D: gl.constexpr,
    SOFTMAX_ONE: gl.constexpr, NBUF: gl.constexpr, FAST_MATH: gl.constexpr, num_warps: gl.constexpr,
):
    pid_bc = gl.program_id(0)  # b * Cq + c
    h = gl.program_id(1)  # query head
    hk = h // G
    b = pid_bc // Cq
    dtype: gl.constexpr = q_desc.dtype
    IDX += pid_bc * K
    W += pid_bc * K
    LSE += (pid_bc * H + h) * (K * S)  # (B, Cq, H, K, S) contiguous

    s_layout: gl.constexpr = _mma_layout(num_warps, S)
    o_layout: gl.constexpr = _mma_layout(num_warps, D)
    rows = gl.arange(0, S, layout=gl.SliceLayout(1, s_layout))

    q_smem = gl.allocate_shared_memory(dtype, [S, D], q_desc.layout)
    # P goes to the P V matmul through shared memory: from registers (wgmma's A operand) ptxas
    # serialises every wgmma of the kernel (C7513: the softmax defines the operand's registers
    # inside an open wgmma pipeline stage)
    p_smem = gl.allocate_shared_memory(dtype, [S, S], gl.NVMMASharedLayout.get_default_for([S, S], dtype))
    k_smem = gl.allocate_shared_memory(dtype, [NBUF, S, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NBUF, S, D], v_desc.layout)
    q_bar = _barriers(1).index(0)
    k_bar = _barriers(NBUF)
    v_bar = _barriers(NBUF)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [pid_bc * S, h * D], q_bar, q_smem)
    for j in gl.static_range(NBUF):
        if j < K:
            _load_slot(k_desc, IDX, j, b, hk, Cm, k_bar, k_smem, S, D, NBUF)
            _load_slot(v_desc, IDX, j, b, hk, Cm, v_bar, v_smem, S, D, NBUF)

    # slot 0's scores, issued before the loop
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([S, S], gl.float32, s_layout),
                          use_acc=False, is_async=True)
    acc = warpgroup_mma_init(gl.zeros([S, D], gl.float32, o_layout))

    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))

    # At the top of iteration i slot i's scores s are ready, and what read the key buffer of slot i and
    # the value buffer of slot i - 2 has finished (the waits of the iteration before).
    for i in range(K - 1):
        if i + NBUF < K:  # the key NBUF slots ahead, into the buffer slot i's scores have finished reading
            _load_slot(k_desc, IDX, i + NBUF, b, hk, Cm, k_bar, k_smem, S, D, NBUF)
        if (i >= 2) & (i + NBUF - 2 < K):  # the value NBUF - 2 slots ahead, into slot i - 2's buffer
            _load_slot(v_desc, IDX, i + NBUF - 2, b, hk, Cm, v_bar, v_smem, S, D, NBUF)
        # slot i + 1's scores, computed while this slot's softmax runs
        nb = (i + 1) % NBUF
        mbarrier.wait(k_bar.index(nb), ((i + 1) // NBUF) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(nb).permute((1, 0)), gl.zeros([S, S], gl.float32, s_layout),
                              use_acc=False, is_async=True)
        p = _softmax_slot(s, IDX, W, LSE, i, rows, qk_scale, S, SOFTMAX_ONE, dtype, FAST_MATH)
        # in flight: [P V of slot i - 1], Q K^T of slot i + 1; one left means the first, which reads p_smem, is done
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        p_smem.store(p)
        fence_async_shared()
        cb = i % NBUF
        mbarrier.wait(v_bar.index(cb), (i // NBUF) & 1)
        acc = warpgroup_mma(p_smem, v_smem.index(cb), acc, is_async=True)
        # in flight: Q K^T of slot i + 1, P V of slot i; one left means slot i + 1's scores are ready
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))

    # the last slot (with NBUF = 2 its value is loaded only now: the loop's rule, at i = K - 1)
    if (K - 1 >= 2) & (K - 1 + NBUF - 2 < K):
        _load_slot(v_desc, IDX, K - 1 + NBUF - 2, b, hk, Cm, v_bar, v_smem, S, D, NBUF)
    p = _softmax_slot(s, IDX, W, LSE, K - 1, rows, qk_scale, S, SOFTMAX_ONE, dtype, FAST_MATH)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    p_smem.store(p)
    fence_async_shared()
    lb = (K - 1) % NBUF
    mbarrier.wait(v_bar.index(lb), ((K - 1) // NBUF) & 1)
    acc = warpgroup_mma(p_smem, v_smem.index(lb), acc, is_async=True)
    out = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    _invalidate(k_bar, NBUF)
    _invalidate(v_bar, NBUF)
    offs = _tile_offsets(pid_bc * S, H, h, S, D, o_layout)  # (B, Cq, S, H, D)
    gl.store(O + offs, out.to(dtype))


@gluon.jit
def _ds_slot(s, dp, IDX, W, LSE, DELTA, i, rows, qk_scale, S: gl.constexpr, dtype: gl.constexpr):
    """Slot i's dS = P (dP - DELTA) w from the raw scores s and dP = dO V^T (fp32, S x S); stores DELTA."""
    lse = gl.load(LSE + i * S + rows) * 1.4426950408889634  # base 2
    p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))  # normalised P
    pdp = p * dp
    delta = gl.sum(pdp, axis=1)
    gl.store(DELTA + i * S + rows, delta)  # dw_i = its sum over heads and rows, after the kernel
    w = _slot_weight(IDX, W, i)
    return ((pdp - p * gl.expand_dims(delta, 1)) * w).to(dtype)


@gluon.jit
def _gca_bwd_dq_gluon(
    q_desc, do_desc, k_desc, v_desc, IDX, W, LSE, DELTA, DQ, Cq, Cm, qk_scale, scale,
    H: gl.constexpr, G: gl.constexpr, K: gl.constexpr, S: gl.constexpr, D: gl.constexpr,
    NK: gl.constexpr, NV: gl.constexpr, num_warps: gl.constexpr,
):
    """dq (and DELTA, from which dweights follow) of one (query chunk, query head), as the Triton dq
    kernel computes them: per slot S = Q K^T and dP = dO V^T (both issued before the previous slot's
    elementwise work), dS = P (dP - DELTA) w, dq += dS K (async, dS through shared memory). Keys in a
    ring of NK buffers (a key is read by its slot's Q K^T and dS K), values in a ring of NV."""
    pid_bc = gl.program_id(0)
    h = gl.program_id(1)
    hk = h // G
    b = pid_bc // Cq
    dtype: gl.constexpr = q_desc.dtype
    IDX += pid_bc * K
    W += pid_bc * K
    LSE += (pid_bc * H + h) * (K * S)
    DELTA += (pid_bc * H + h) * (K * S)

    s_layout: gl.constexpr = _mma_layout(num_warps, S)
    o_layout: gl.constexpr = _mma_layout(num_warps, D)
    rows = gl.arange(0, S, layout=gl.SliceLayout(1, s_layout))

    q_smem = gl.allocate_shared_memory(dtype, [S, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [S, D], do_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [S, S], gl.NVMMASharedLayout.get_default_for([S, S], dtype))
    k_smem = gl.allocate_shared_memory(dtype, [NK, S, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NV, S, D], v_desc.layout)
    q_bar = _barriers(1).index(0)
    k_bar = _barriers(NK)
    v_bar = _barriers(NV)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [pid_bc * S, h * D], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [pid_bc * S, h * D], q_bar, do_smem)
    for j in gl.static_range(NK):
        if j < K:
            _load_slot(k_desc, IDX, j, b, hk, Cm, k_bar, k_smem, S, D, NK)
    for j in gl.static_range(NV):
        if j < K:
            _load_slot(v_desc, IDX, j, b, hk, Cm, v_bar, v_smem, S, D, NV)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    mbarrier.wait(v_bar.index(0), 0)
    zeros = gl.zeros([S, S], gl.float32, s_layout)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zeros, use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(do_smem, v_smem.index(0).permute((1, 0)), zeros, use_acc=False, is_async=True)
    dq = warpgroup_mma_init(gl.zeros([S, D], gl.float32, o_layout))
    s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, dp_tok))

    # At the top of iteration i slot i's S and dP are ready (so its value buffer is free), and dq of
    # slot i - 1 may be in flight.
    for i in range(K - 1):
        if i + NV < K:
            _load_slot(v_desc, IDX, i + NV, b, hk, Cm, v_bar, v_smem, S, D, NV)
        kb = (i + 1) % NK
        vb = (i + 1) % NV
        mbarrier.wait(k_bar.index(kb), ((i + 1) // NK) & 1)
        mbarrier.wait(v_bar.index(vb), ((i + 1) // NV) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(kb).permute((1, 0)), zeros, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do_smem, v_smem.index(vb).permute((1, 0)), zeros, use_acc=False, is_async=True)
        ds = _ds_slot(s, dp, IDX, W, LSE, DELTA, i, rows, qk_scale, S, dtype)
        # in flight: [dS K of slot i - 1], S and dP of slot i + 1; two left means the first is done:
        # ds_smem and slot i - 1's key buffer are free
        dq = warpgroup_mma_wait(num_outstanding=2, deps=(dq,))
        if (i >= 1) & (i - 1 + NK < K):
            _load_slot(k_desc, IDX, i - 1 + NK, b, hk, Cm, k_bar, k_smem, S, D, NK)
        ds_smem.store(ds)
        fence_async_shared()
        dq = warpgroup_mma(ds_smem, k_smem.index(i % NK), dq, is_async=True)
        # in flight: S and dP of slot i + 1, dS K of slot i; one left means slot i + 1's S and dP are ready
        s, dp = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, dp_tok))

    ds = _ds_slot(s, dp, IDX, W, LSE, DELTA, K - 1, rows, qk_scale, S, dtype)
    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
    ds_smem.store(ds)
    fence_async_shared()
    dq = warpgroup_mma(ds_smem, k_smem.index((K - 1) % NK), dq, is_async=True)
    out = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))

    mbarrier.invalidate(q_bar)
    _invalidate(k_bar, NK)
    _invalidate(v_bar, NV)
    offs = _tile_offsets(pid_bc * S, H, h, S, D, o_layout)  # (B, Cq, S, H, D)
    gl.store(DQ + offs, (out * scale).to(dtype))


def gca_bwd_dq_gluon(do, q, mem_k, mem_v, indices, weights, lse, scale=None, nk=3, nv=2, num_warps=4, maxnreg=None):
    """dq and dweights of `gca.ops.gca_triton.gca_bwd` (S = Sm = 64, contiguous inputs); the memory's
    gradients are the Triton dK/dV kernel's. Returns ``(dq, dweights)``."""
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    assert S == Sm == 64 and D in (64, 128) and q.dtype in (torch.bfloat16, torch.float16) and K >= 1
    assert all(t.is_contiguous() for t in (do, q, mem_k, mem_v, indices, weights, lse))
    scale = D**-0.5 if scale is None else float(scale)
    q_desc, k_desc, v_desc = _descs(q, mem_k, mem_v)
    do_desc = _descs(do, mem_k, mem_v)[0]
    dq = _alloc(q.shape, q.dtype, q.device)
    delta = _alloc((B, Cq, H, K, S), torch.float32, q.device)
    _gca_bwd_dq_gluon[(B * Cq, H)](
        q_desc, do_desc, k_desc, v_desc, indices, weights, lse, delta, dq, Cq, Cm, scale * 1.4426950408889634, scale,
        H=H, G=H // Hk, K=K, S=S, D=D, NK=nk, NV=nv, num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    dw = torch.where(indices >= 0, delta.sum((2, 4)), 0.0).to(weights.dtype)
    return dq, dw, delta


@gluon.jit
def _load_pair(q_desc, do_desc, ORDER, t, G: gl.constexpr, K: gl.constexpr, hk, bars, q_smem, do_smem,
               S: gl.constexpr, D: gl.constexpr, NQ: gl.constexpr, j):
    """Start the TMA copies of step t's query and dO tiles (the pair ORDER[t // G], query head
    hk * G + t % G) into buffer j % NQ, one mbarrier for both."""
    bc = gl.load(ORDER + t // G) // K  # b * Cq + c
    h = (hk * G + t % G).to(gl.int32)
    buf = j % NQ
    mbarrier.expect(bars.index(buf), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [(bc * S).to(gl.int32), h * D], bars.index(buf), q_smem.index(buf))
    tma.async_copy_global_to_shared(do_desc, [(bc * S).to(gl.int32), h * D], bars.index(buf), do_smem.index(buf))


@gluon.jit
def _dkdv_elementwise(sT, dpT, ORDER, W, LSE, DELTA, t, hk, cols, qk_scale,
                      H: gl.constexpr, G: gl.constexpr, K: gl.constexpr, S: gl.constexpr, dtype: gl.constexpr):
    """Step t's P^T w and dS^T = P^T w (dP^T - DELTA) (memory positions x query rows)."""
    pair = gl.load(ORDER + t // G)
    bc = pair // K
    i = pair % K
    h = hk * G + t % G
    stat = bc * (H * K * S) + h * (K * S) + i * S + cols  # (B, Cq, H, K, S) contiguous
    lse = gl.load(LSE + stat) * 1.4426950408889634
    delta = gl.load(DELTA + stat)
    w = gl.load(W + pair).to(gl.float32)  # weights (B, Cq, K) contiguous: pair = (b * Cq + c) * K + i
    pwT = gl.exp2(sT * qk_scale - gl.expand_dims(lse, 0)) * w
    dsT = pwT * (dpT - gl.expand_dims(delta, 0))
    return pwT.to(dtype), dsT.to(dtype)


@gluon.jit
def _gca_bwd_dkdv_gluon(
    q_desc, do_desc, k_desc, v_desc, W, LSE, DELTA, ORDER, OFFS, DK, DV, Cm, qk_scale, scale,
    H: gl.constexpr, Hk: gl.constexpr, G: gl.constexpr, K: gl.constexpr, S: gl.constexpr, D: gl.constexpr,
    NQ: gl.constexpr, num_warps: gl.constexpr,
):
    """dK, dV of one (memory chunk, memory head), as the Triton dK/dV kernel's transposed form computes
    them: for every step (a pair (query chunk, slot) that retrieved the chunk, times the G query heads of
    the group) S^T = K Q^T and dP^T = V dO^T (issued before the previous step's elementwise work), then
    dV += (P^T w) dO and dK += dS^T Q (async, both operands through shared memory). The query and dO
    tiles arrive by TMA into a ring of NQ >= 3 buffers (a step's tiles are read by all four matmuls)."""
    pid_bm = gl.program_id(0)  # b * Cm + memory chunk
    hk = gl.program_id(1)
    dtype: gl.constexpr = q_desc.dtype
    # 4 warps: one warpgroup owns every tile; 8: two warpgroups split the columns (no row reductions here)
    s_layout: gl.constexpr = _mma_layout(num_warps, S)
    o_layout: gl.constexpr = _mma_layout(num_warps, D)
    cols = gl.arange(0, S, layout=gl.SliceLayout(0, s_layout))  # query rows, along the tiles' columns
    offs = _tile_offsets(pid_bm * S, Hk, hk, S, D, o_layout)  # (B, Cm, Sm, Hk, D)
    t0 = (gl.load(OFFS + pid_bm) * G).to(gl.int32)
    n = (gl.load(OFFS + pid_bm + 1) * G).to(gl.int32) - t0
    if n == 0:  # never retrieved
        zero = gl.zeros([S, D], gl.float32, o_layout).to(dtype)
        gl.store(DK + offs, zero)
        gl.store(DV + offs, zero)
    else:
        kv_smem = gl.allocate_shared_memory(dtype, [2, S, D], k_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NQ, S, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NQ, S, D], do_desc.layout)
        pw_smem = gl.allocate_shared_memory(dtype, [S, S], gl.NVMMASharedLayout.get_default_for([S, S], dtype))
        ds_smem = gl.allocate_shared_memory(dtype, [S, S], gl.NVMMASharedLayout.get_default_for([S, S], dtype))
        kv_bar = _barriers(1).index(0)
        q_bar = _barriers(NQ)
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [pid_bm * S, hk * D], kv_bar, kv_smem.index(0))
        tma.async_copy_global_to_shared(v_desc, [pid_bm * S, hk * D], kv_bar, kv_smem.index(1))
        for j in gl.static_range(NQ):
            if j < n:
                _load_pair(q_desc, do_desc, ORDER, t0 + j, G, K, hk, q_bar, q_smem, do_smem, S, D, NQ, j)

        mbarrier.wait(kv_bar, 0)
        mbarrier.wait(q_bar.index(0), 0)
        zeros = gl.zeros([S, S], gl.float32, s_layout)
        s_tok = warpgroup_mma(kv_smem.index(0), q_smem.index(0).permute((1, 0)), zeros, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(kv_smem.index(1), do_smem.index(0).permute((1, 0)), zeros, use_acc=False, is_async=True)
        dk = warpgroup_mma_init(gl.zeros([S, D], gl.float32, o_layout))
        dv = warpgroup_mma_init(gl.zeros([S, D], gl.float32, o_layout))
        sT, dpT = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, dp_tok))
        # at the top of step j: its S^T and dP^T are ready; dV and dK of step j - 1 may be in flight
        for j in range(n - 1):
            nb = (j + 1) % NQ
            mbarrier.wait(q_bar.index(nb), ((j + 1) // NQ) & 1)
            s_tok = warpgroup_mma(kv_smem.index(0), q_smem.index(nb).permute((1, 0)), zeros, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(kv_smem.index(1), do_smem.index(nb).permute((1, 0)), zeros, use_acc=False, is_async=True)
            pwT, dsT = _dkdv_elementwise(sT, dpT, ORDER, W, LSE, DELTA, t0 + j, hk, cols, qk_scale, H, G, K, S, dtype)
            # in flight: [dV, dK of step j - 1], S^T, dP^T of step j + 1; two left: step j - 1's are done, so
            # pw_smem, ds_smem and step j - 1's tile buffer are free
            dk, dv = warpgroup_mma_wait(num_outstanding=2, deps=(dk, dv))
            if (j >= 1) & (j - 1 + NQ < n):
                _load_pair(q_desc, do_desc, ORDER, t0 + j - 1 + NQ, G, K, hk, q_bar, q_smem, do_smem, S, D, NQ, j - 1 + NQ)
            pw_smem.store(pwT)
            ds_smem.store(dsT)
            fence_async_shared()
            cb = j % NQ
            dv = warpgroup_mma(pw_smem, do_smem.index(cb), dv, is_async=True)
            dk = warpgroup_mma(ds_smem, q_smem.index(cb), dk, is_async=True)
            # in flight: S^T, dP^T of step j + 1, dV, dK of step j; two left: step j + 1's scores are ready
            sT, dpT = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok, dp_tok))
        pwT, dsT = _dkdv_elementwise(sT, dpT, ORDER, W, LSE, DELTA, t0 + n - 1, hk, cols, qk_scale, H, G, K, S, dtype)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        pw_smem.store(pwT)
        ds_smem.store(dsT)
        fence_async_shared()
        cb = (n - 1) % NQ
        dv = warpgroup_mma(pw_smem, do_smem.index(cb), dv, is_async=True)
        dk = warpgroup_mma(ds_smem, q_smem.index(cb), dk, is_async=True)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        mbarrier.invalidate(kv_bar)
        _invalidate(q_bar, NQ)
        gl.store(DK + offs, (dk * scale).to(dtype))
        gl.store(DV + offs, dv.to(dtype))


def gca_bwd_dkdv_gluon(do, q, mem_k, mem_v, indices, weights, lse, delta, scale=None, nq=3, num_warps=4, maxnreg=None):
    """dmem_k, dmem_v of `gca.ops.gca_triton.gca_bwd` (S = Sm = 64, contiguous inputs), given the
    forward's ``lse`` and the dq kernel's ``delta`` (B, Cq, H, K, S)."""
    from gca.ops.gca_triton import _inverted_index

    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    assert S == Sm == 64 and D in (64, 128) and q.dtype in (torch.bfloat16, torch.float16) and K >= 1 and nq >= 3
    assert all(t.is_contiguous() for t in (do, q, mem_k, mem_v, indices, weights, lse, delta))
    scale = D**-0.5 if scale is None else float(scale)
    q_desc, k_desc, v_desc = _descs(q, mem_k, mem_v)
    do_desc = _descs(do, mem_k, mem_v)[0]
    order, offsets = _inverted_index(indices, Cm)
    dk, dv = _alloc(mem_k.shape, mem_k.dtype, q.device), _alloc(mem_v.shape, mem_v.dtype, q.device)
    _gca_bwd_dkdv_gluon[(B * Cm, Hk)](
        q_desc, do_desc, k_desc, v_desc, weights, lse, delta, order, offsets, dk, dv, Cm, scale * 1.4426950408889634, scale,
        H=H, Hk=Hk, G=H // Hk, K=K, S=S, D=D, NQ=nq, num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return dk, dv


def _descs(q, mem_k, mem_v):
    """TMA descriptors of q (rows: tokens, columns: heads x D) and of the memory's keys and values
    (rows: the chunks' positions), one 64 x D box each."""
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay = gl.NVMMASharedLayout.get_default_for([S, D], gdt)
    mats = (q.view(B * Cq * S, H * D), mem_k.view(B * Cm * Sm, Hk * D), mem_v.view(B * Cm * Sm, Hk * D))
    return [TensorDescriptor(m, list(m.shape), list(m.stride()), [S, D], lay) for m in mats]


def gca_fwd_gluon(q, mem_k, mem_v, indices, weights, softmax_one=False, scale=None, nbuf=2, num_warps=4, fast_math=False):
    """The forward of `gca.ops.gca_triton.gca_fwd` for S = Sm = 64 and contiguous inputs:
    ``(out (B, Cq, S, H, D), lse (B, Cq, H, K, S) fp32)``. ``fast_math``: the per-slot log-sum-exp's
    log2 by the MUFU and w / l by approximate division, as the Triton forward has them (422 -> 369 SASS
    instructions a slot at the SPEC shape). Right on an H200 but no faster at D = 128 (0.322 against
    0.325 ms; `benchmarks/gluon_kernels.py --fast-math`), so off in the package."""
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    assert S == Sm == 64 and D in (64, 128) and q.dtype in (torch.bfloat16, torch.float16) and K >= 1
    assert all(t.is_contiguous() for t in (q, mem_k, mem_v, indices, weights))
    scale = D**-0.5 if scale is None else float(scale)
    q_desc, k_desc, v_desc = _descs(q, mem_k, mem_v)
    out = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc((B, Cq, H, K, S), torch.float32, q.device)
    _gca_fwd_gluon[(B * Cq, H)](
        q_desc, k_desc, v_desc, indices, weights, out, lse, Cq, Cm, scale * 1.4426950408889634,
        H=H, G=H // Hk, K=K, S=S, D=D, SOFTMAX_ONE=bool(softmax_one), NBUF=nbuf, FAST_MATH=bool(fast_math), num_warps=num_warps,
    )
    return out, lse


# The warp-specialised, persistent forward (FlashAttention-3's layout): the package's forward at D = 128.
# Written and timed in `benchmarks/gluon_ws_fwd.py` (which drives every option below). At D = 128 on an H200
# (`benchmarks/results/gluon_ws_fwd_nvidia-h200_2026-12-03.txt`, runs 7-9), SPEC-sized, ms: the default (one
# math warpgroup a CTA, two CTAs an SM, P from registers) 0.282; P through shared memory 0.297-0.304; two
# math warpgroups a CTA 0.317-0.321; `gca_fwd_gluon` 0.324-0.335; the Triton forward 0.446-0.451. At D = 64
# every form is slower than the Triton forward (0.359 at best against 0.350).


@functools.cache
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


@gluon.jit
def _item(t, n_items, H: gl.constexpr):
    """Item t's (query chunk pc = b * Cq + c, query head h), numbered head-major: the query chunk fastest,
    so the CTAs running together share a head (its slice of the memory stays in L2)."""
    n_pc = n_items // H
    return t % n_pc, t // n_pc


@gluon.jit
def _fill(desc, IDX, pc, K: gl.constexpr, slot, base, hk, D: gl.constexpr, S: gl.constexpr, bar, dst):
    """Start the TMA copy of the tile (key or value) of retrieved chunk IDX[pc, slot] into dst; an empty
    slot (-1), or one past K, copies the wholly out-of-bounds box at row -S, which TMA fills with zeros."""
    idx = gl.load(IDX + pc * K + slot, mask=slot < K, other=-1)
    row = gl.where(idx >= 0, (base + idx) * S, -S).to(gl.int32)
    tma.async_copy_global_to_shared(desc, [row, hk * D], bar, dst)


@gluon.jit
def _loader(j: gl.constexpr, descs, bufs, H: gl.constexpr, G: gl.constexpr, K: gl.constexpr, S: gl.constexpr,
            D: gl.constexpr, NC: gl.constexpr, NBUF: gl.constexpr, QBUF: gl.constexpr, TILES: gl.constexpr):
    """One warp: the TMA copies of math warpgroup j, whose n-th item in this CTA is t = task * NC + j. Its
    rings: queries in buffers j * QBUF + (n % QBUF), keys and values in ring buffers j * NBUF + (g % NBUF)
    (g: the step's number in the warpgroup's stream; a step is TILES slots, buffer b holding tiles
    b * TILES ..); a buffer's fill f waits for its "empty" barrier's phase f - 1. Each step's keys are
    issued before the previous step's values, which are released last (after their P V)."""
    q_desc, k_desc, v_desc, IDX, Cq, Cm, n_items = descs
    q_smem, k_smem, v_smem, p_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bufs
    KP: gl.constexpr = (K + TILES - 1) // TILES
    n = 0
    for task in range(gl.program_id(0), gl.cdiv(n_items, NC), gl.num_programs(0)):
        t = task * NC + j
        if t < n_items:
            pc, h = _item(t, n_items, H)
            hk = h // G
            base = (pc // Cq) * Cm
            qb = j * QBUF + n % QBUF
            mbarrier.wait(q_empty.index(qb), ((n // QBUF) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [pc * S, h * D], q_ready.index(qb), q_smem.index(qb))
            for st in range(KP + 1):
                if st < KP:  # this step's keys
                    g = n * KP + st
                    kb = j * NBUF + g % NBUF
                    mbarrier.wait(k_empty.index(kb), ((g // NBUF) & 1) ^ 1)
                    mbarrier.expect(k_ready.index(kb), TILES * k_desc.block_type.nbytes)
                    for u in gl.static_range(TILES):
                        _fill(k_desc, IDX, pc, K, st * TILES + u, base, hk, D, S, k_ready.index(kb),
                              k_smem.index(kb * TILES + u))
                if st > 0:  # the step before's values
                    g = n * KP + st - 1
                    vb = j * NBUF + g % NBUF
                    mbarrier.wait(v_empty.index(vb), ((g // NBUF) & 1) ^ 1)
                    mbarrier.expect(v_ready.index(vb), TILES * v_desc.block_type.nbytes)
                    for u in gl.static_range(TILES):
                        _fill(v_desc, IDX, pc, K, (st - 1) * TILES + u, base, hk, D, S, v_ready.index(vb),
                              v_smem.index(vb * TILES + u))
            n += 1


@gluon.jit
def _softmax(s, IDX, W, i, qk_scale, K: gl.constexpr, SOFTMAX_ONE: gl.constexpr, dtype: gl.constexpr):
    """Slot i's softmax of the raw scores (fp32): ``(P * w_i / l_i, its log-sum-exp)``; a slot past K (odd
    K's last pair) weighs 0."""
    p, l, m = _exp_scores(s, qk_scale, SOFTMAX_ONE)
    inside = i < K
    w = gl.where(gl.load(IDX + i, mask=inside, other=-1) >= 0, gl.load(W + i, mask=inside, other=0.0).to(gl.float32), 0.0)
    return (p * gl.expand_dims(gl.fdiv(w, l), 1)).to(dtype), (m + _lg2_approx(l)) * 0.6931471805599453


@gluon.jit
def _store_lse(LSE, i, rows, lse, S: gl.constexpr, K: gl.constexpr):
    gl.store(LSE + i * S + rows, lse, mask=(rows >= 0) & (i < K))


@gluon.jit
def _pv(acc, p_bufs, ps, v_smem, v_ready, v_empty, j: gl.constexpr, g, has_prev, NBUF: gl.constexpr, TILES: gl.constexpr,
        P_REGS: gl.constexpr, o_layout: gl.constexpr):
    """Step g's P V (its TILES slots), once the step before's P V is known done (acc waited for): release
    that step's value buffer (has_prev: there is one), store P, fence, wait for this step's values, issue.
    P_REGS: P goes to the wgmma from registers (its A operand), with no store, fence or barrier.
    Returns the accumulator."""
    mbarrier.arrive(v_empty.index(j * NBUF + (g - 1) % NBUF), pred=has_prev)
    if not P_REGS:
        for u in gl.static_range(TILES):
            p_bufs.index(j * TILES + u).store(ps[u])
        fence_async_shared()
    cb = j * NBUF + g % NBUF
    mbarrier.wait(v_ready.index(cb), (g // NBUF) & 1)
    for u in gl.static_range(TILES):
        if P_REGS:
            a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
            acc = warpgroup_mma(gl.convert_layout(ps[u], a_layout), v_smem.index(cb * TILES + u), acc, is_async=True)
        else:
            acc = warpgroup_mma(p_bufs.index(j * TILES + u), v_smem.index(cb * TILES + u), acc, is_async=True)
    return acc


@gluon.jit
def _scores(q_buf, k_smem, kb, TILES: gl.constexpr, S: gl.constexpr, s_layout: gl.constexpr):
    """Issue the Q K^T of ring buffer kb's TILES tiles (asynchronously): their tokens."""
    toks = ()
    for u in gl.static_range(TILES):
        toks = toks + (warpgroup_mma(q_buf, k_smem.index(kb * TILES + u).permute((1, 0)),
                                     gl.zeros([S, S], gl.float32, s_layout), use_acc=False, is_async=True),)
    return toks


@gluon.jit
def _consumer(j: gl.constexpr, ptrs, bufs, H: gl.constexpr, K: gl.constexpr, S: gl.constexpr, D: gl.constexpr,
              NC: gl.constexpr, NBUF: gl.constexpr, QBUF: gl.constexpr, SOFTMAX_ONE: gl.constexpr,
              TILES: gl.constexpr, OVERLAP: gl.constexpr, P_REGS: gl.constexpr):
    """Math warpgroup j: its items, TILES slots a step. OVERLAP: step st + 1's Q K^T is issued before step
    st's softmaxes (one more set of score tiles live); else each step waits for its own scores, as the
    Triton kernel does. Each buffer is released as soon as the wgmma reading it is known complete; the
    LSEs are stored after the step's P V is issued, so the P store's fence does not wait for them."""
    IDX, W, O, LSE, n_items, qk_scale = ptrs
    q_smem, k_smem, v_smem, p_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bufs
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = _mma_layout(4, S)
    o_layout: gl.constexpr = _mma_layout(4, D)
    rows = gl.arange(0, S, layout=gl.SliceLayout(1, s_layout))
    KP: gl.constexpr = (K + TILES - 1) // TILES
    n = 0
    for task in range(gl.program_id(0), gl.cdiv(n_items, NC), gl.num_programs(0)):
        t = task * NC + j
        if t < n_items:
            pc, h = _item(t, n_items, H)
            idx_i = IDX + pc * K
            w_i = W + pc * K
            lse_i = LSE + (pc * H + h) * (K * S)  # (B, Cq, H, K, S) contiguous
            qb = j * QBUF + n % QBUF
            q_buf = q_smem.index(qb)
            g0 = n * KP
            mbarrier.wait(q_ready.index(qb), (n // QBUF) & 1)
            acc = warpgroup_mma_init(gl.zeros([S, D], gl.float32, o_layout))
            if OVERLAP:
                kb = j * NBUF + g0 % NBUF
                mbarrier.wait(k_ready.index(kb), (g0 // NBUF) & 1)
                ss = warpgroup_mma_wait(num_outstanding=0, deps=_scores(q_buf, k_smem, kb, TILES, S, s_layout))
                if TILES == 1:
                    ss = (ss,)
                mbarrier.arrive(k_empty.index(kb))
                for st in range(KP - 1):
                    g = g0 + st
                    nb = j * NBUF + (g + 1) % NBUF
                    mbarrier.wait(k_ready.index(nb), ((g + 1) // NBUF) & 1)
                    toks = _scores(q_buf, k_smem, nb, TILES, S, s_layout)  # step st + 1's, during these softmaxes
                    ps = ()
                    lses = ()
                    for u in gl.static_range(TILES):
                        p, lse = _softmax(ss[u], idx_i, w_i, st * TILES + u, qk_scale, K, SOFTMAX_ONE, dtype)
                        ps = ps + (p,)
                        lses = lses + (lse,)
                    # in flight: [step st - 1's P V], step st + 1's Q K^T: leave the newer TILES
                    acc = warpgroup_mma_wait(num_outstanding=TILES, deps=(acc,))
                    acc = _pv(acc, p_smem, ps, v_smem, v_ready, v_empty, j, g, st > 0, NBUF, TILES, P_REGS, o_layout)
                    for u in gl.static_range(TILES):
                        _store_lse(lse_i, st * TILES + u, rows, lses[u], S, K)
                    ss = warpgroup_mma_wait(num_outstanding=TILES, deps=toks)
                    if TILES == 1:
                        ss = (ss,)
                    mbarrier.arrive(k_empty.index(nb))
                mbarrier.arrive(q_empty.index(qb))  # every Q K^T of the item is done
                g = g0 + KP - 1
                ps = ()
                lses = ()
                for u in gl.static_range(TILES):
                    p, lse = _softmax(ss[u], idx_i, w_i, (KP - 1) * TILES + u, qk_scale, K, SOFTMAX_ONE, dtype)
                    ps = ps + (p,)
                    lses = lses + (lse,)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                acc = _pv(acc, p_smem, ps, v_smem, v_ready, v_empty, j, g, KP > 1, NBUF, TILES, P_REGS, o_layout)
                for u in gl.static_range(TILES):
                    _store_lse(lse_i, (KP - 1) * TILES + u, rows, lses[u], S, K)
            else:
                for st in range(KP):
                    g = g0 + st
                    kb = j * NBUF + g % NBUF
                    mbarrier.wait(k_ready.index(kb), (g // NBUF) & 1)
                    toks = _scores(q_buf, k_smem, kb, TILES, S, s_layout)
                    ss = warpgroup_mma_wait(num_outstanding=0, deps=toks)  # and step st - 1's P V
                    if TILES == 1:
                        ss = (ss,)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    mbarrier.arrive(k_empty.index(kb))
                    mbarrier.arrive(q_empty.index(qb), pred=st == KP - 1)
                    ps = ()
                    lses = ()
                    for u in gl.static_range(TILES):
                        p, lse = _softmax(ss[u], idx_i, w_i, st * TILES + u, qk_scale, K, SOFTMAX_ONE, dtype)
                        ps = ps + (p,)
                        lses = lses + (lse,)
                    acc = _pv(acc, p_smem, ps, v_smem, v_ready, v_empty, j, g, st > 0, NBUF, TILES, P_REGS, o_layout)
                    for u in gl.static_range(TILES):
                        _store_lse(lse_i, st * TILES + u, rows, lses[u], S, K)
            out = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(v_empty.index(j * NBUF + (g0 + KP - 1) % NBUF))
            gl.store(O + _tile_offsets(pc * S, H, h, S, D, o_layout), out.to(dtype))
            n += 1


@gluon.jit
def _gca_fwd_ws(q_desc, k_desc, v_desc, IDX, W, O, LSE, Cq, Cm, n_items, qk_scale,
                H: gl.constexpr, G: gl.constexpr, K: gl.constexpr, S: gl.constexpr, D: gl.constexpr,
                NC: gl.constexpr, NBUF: gl.constexpr, QBUF: gl.constexpr, TILES: gl.constexpr,
                OVERLAP: gl.constexpr, P_REGS: gl.constexpr, SOFTMAX_ONE: gl.constexpr,
                CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NC * QBUF, S, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NC * NBUF * TILES, S, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NC * NBUF * TILES, S, D], v_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [NC * TILES, S, S], gl.NVMMASharedLayout.get_default_for([S, S], dtype))
    bufs = (q_smem, k_smem, v_smem, p_smem, _barriers(NC * QBUF), _barriers(NC * QBUF), _barriers(NC * NBUF),
            _barriers(NC * NBUF), _barriers(NC * NBUF), _barriers(NC * NBUF))
    ptrs = (IDX, W, O, LSE, n_items, qk_scale)
    descs = (q_desc, k_desc, v_desc, IDX, Cq, Cm, n_items)
    # The constexprs go in each partition's argument tuple as written here: a tuple assigned to a name
    # first turns its constexprs into int32 scalars (which is why ptrs, bufs and descs hold none).
    if NC == 1:
        gl.warp_specialize([
            (_consumer, (0, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_loader, (0, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
        ], [1], [LOADER_REGS])
    elif NC == 2:
        gl.warp_specialize([
            (_consumer, (0, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_consumer, (1, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_loader, (0, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
            (_loader, (1, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
        ], [4, 1, 1], [CONSUMER_REGS, LOADER_REGS, LOADER_REGS])
    elif NC == 3:
        gl.warp_specialize([
            (_consumer, (0, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_consumer, (1, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_consumer, (2, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_loader, (0, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
            (_loader, (1, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
            (_loader, (2, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
        ], [4, 4, 1, 1, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS, LOADER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (0, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_consumer, (1, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_consumer, (2, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_consumer, (3, ptrs, bufs, H, K, S, D, NC, NBUF, QBUF, SOFTMAX_ONE, TILES, OVERLAP, P_REGS)),
            (_loader, (0, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
            (_loader, (1, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
            (_loader, (2, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
            (_loader, (3, descs, bufs, H, G, K, S, D, NC, NBUF, QBUF, TILES)),
        ], [4, 4, 4, 1, 1, 1, 1], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS, LOADER_REGS,
                                   LOADER_REGS, LOADER_REGS])


def gca_fwd_ws(q, mem_k, mem_v, indices, weights, softmax_one=False, scale=None, nc=1, nbuf=2, qbuf=2, pair=False,
               overlap=True, p_regs=True, ctas=2, consumer_regs=None, loader_regs=24, maxnreg=None, grid=None):
    """`gca_triton.gca_fwd` for S = Sm = 64, D in {64, 128}, contiguous bf16 / fp16 inputs: ``(out, lse)``.
    nc math warpgroups a CTA (1-4), each with its loader warp; nbuf key / value buffers a warpgroup (of two
    tiles each with ``pair``), qbuf query buffers; ``overlap``: the next slot's Q K^T before this slot's
    softmax (``pair`` always overlaps); ``p_regs``: P to P V from registers; ctas CTAs an SM, the grid
    (``grid`` CTAs, default all the SMs' worth) looping over the items. The defaults are the form the
    package launches at D = 128; `benchmarks/gluon_ws_fwd.py` times the others. The per-slot LSEs use the
    MUFU's log2 and w / l an approximate division, as the Triton forward's do."""
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    assert S == Sm == 64 and D in (64, 128) and K >= 1 and nc in (1, 2, 3, 4) and qbuf in (1, 2)
    assert q.dtype in (torch.bfloat16, torch.float16) and all(t.is_contiguous() for t in (q, mem_k, mem_v, indices, weights))
    scale = D**-0.5 if scale is None else float(scale)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay = gl.NVMMASharedLayout.get_default_for([S, D], gdt)
    mats = (q.view(B * Cq * S, H * D), mem_k.view(B * Cm * Sm, Hk * D), mem_v.view(B * Cm * Sm, Hk * D))
    q_desc, k_desc, v_desc = [TensorDescriptor(m, list(m.shape), list(m.stride()), [S, D], lay) for m in mats]
    out = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc((B, Cq, H, K, S), torch.float32, q.device)
    n_items = B * Cq * H
    groups = nc + 1  # warpgroups: nc math, and the nc one-warp loaders padded to one
    if maxnreg is None:
        maxnreg = min(256, (65536 // (groups * 128 * ctas)) // 8 * 8)
    if consumer_regs is None:  # what the loaders leave, shared evenly (registers a thread, by warpgroup)
        consumer_regs = min(240, ((maxnreg * groups - loader_regs) // nc) // 8 * 8)
    if grid is None:
        sms = _sm_count(q.device) if q.is_cuda else 132
        grid = min(sms * ctas, triton.cdiv(n_items, nc))
    _gca_fwd_ws[(grid,)](
        q_desc, k_desc, v_desc, indices, weights, out, lse, Cq, Cm, n_items, scale * 1.4426950408889634,
        H=H, G=H // Hk, K=K, S=S, D=D, NC=nc, NBUF=nbuf, QBUF=qbuf, TILES=2 if pair else 1, OVERLAP=bool(overlap), P_REGS=bool(p_regs),
        SOFTMAX_ONE=bool(softmax_one), CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs, num_warps=4,
        maxnreg=maxnreg,
    )
    return out, lse



def gca_bwd_gluon(do, q, mem_k, mem_v, indices, weights, lse, scale=None):
    """`gca.ops.gca_triton.gca_bwd` on this path: ``(dq, dmem_k, dmem_v, dweights)``."""
    dq, dw, delta = gca_bwd_dq_gluon(do, q, mem_k, mem_v, indices, weights, lse, scale=scale)
    dk, dv = gca_bwd_dkdv_gluon(do, q, mem_k, mem_v, indices, weights, lse, delta, scale=scale, num_warps=8)
    return dq, dk, dv, dw
