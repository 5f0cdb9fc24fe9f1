"""A warp-specialised, persistent GCA forward in Gluon for Hopper (FlashAttention-3's layout): NC math
warpgroups a CTA, each running its own (query chunk, query head) items with the intra-warpgroup overlap of
`gca_gluon._gca_fwd_gluon` (slot i + 1's Q K^T issued before slot i's softmax, P V asynchronous), each fed
by its own loader warp that issues the TMA copies (queries, and each retrieved chunk's key and value tiles)
into the warpgroup's rings guarded by "ready" / "empty" mbarriers. One CTA an SM (two with ``ctas=2``),
looping over the items head-major (the query chunk fastest, so the CTAs running together share a head's
memory in L2), so a loader fetches the next item's tiles while its warpgroup finishes this one. ``pair``:
two slots a step (one wait and one release of each buffer per two slots); ``p_regs``: P handed to P V
from registers instead of through shared memory (compiles without serialised wgmma only with one math
warpgroup a CTA at up to three CTAs an SM; timed: the closest to Triton at D = 64, still 2-3% behind).

Why: the Triton forward runs 4 single-warpgroup programs an SM, each waiting on its own chain (load,
Q K^T, softmax, P V), latency-bound ("Where the kernels wait" in `KERNEL_NOTES.md`); the single-warpgroup
Gluon forward overlaps inside a warpgroup but issues its own copies, paying barriers for them.

    python benchmarks/gluon_ws_fwd.py --aot     # compile for sm_90a here (no GPU): registers, shared memory
    python benchmarks/gluon_ws_fwd.py           # on a Hopper GPU: check against the float64 reference and the
                                                # Triton forward, then time both at the SPEC shape and others
    python benchmarks/gluon_ws_fwd.py --quick   # one small check per config (a wrong mbarrier phase hangs:
                                                # put a `timeout` around any run)

Measured on an H200 on 2026-12-03 (`benchmarks/results/gluon_ws_fwd_nvidia-h200_2026-12-03.txt`; the
section "A warp-specialised, persistent Gluon forward" of `KERNEL_NOTES.md`): right everywhere checked,
and slower than the Triton forward at D = 64 in every configuration (SPEC shape: 0.373 ms at best against
0.334-0.352); at D = 128, 4% faster than the package's Gluon forward in two runs (0.312-0.314 against
0.326-0.327 ms).
Kept as the record of the attempt; the package does not use it.
"""

import argparse
import os
import sys
import time

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gca.ops.gca_gluon import _barriers, _lg2_approx, _mma_layout, _tile_offsets  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_kernels import inputs  # noqa: E402  (the same random inputs as the Gluon kernels' checks)


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
    m = gl.max(s, axis=1) * qk_scale
    if SOFTMAX_ONE:
        m = gl.maximum(m, 0.0)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m, 1))
    l = gl.sum(p, axis=1)
    if SOFTMAX_ONE:
        l += gl.exp2(-m)
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


def gca_fwd_ws(q, mem_k, mem_v, indices, weights, softmax_one=False, scale=None, nc=3, nbuf=3, qbuf=2, pair=False,
               overlap=True, p_regs=False, ctas=1, consumer_regs=None, loader_regs=24, maxnreg=None, grid=None):
    """`gca_triton.gca_fwd` for S = Sm = 64, D in {64, 128}, contiguous bf16 / fp16 inputs: ``(out, lse)``.
    nc math warpgroups a CTA (1-4), each with its loader warp; nbuf key / value buffers a warpgroup (of two
    tiles each with ``pair``), qbuf query buffers; ``overlap``: the next slot's Q K^T before this slot's
    softmax (``pair`` always overlaps); ctas CTAs an SM, the grid looping over the items."""
    B, Cq, S, H, D = q.shape
    _, Cm, Sm, Hk, _ = mem_k.shape
    K = indices.shape[-1]
    assert S == Sm == 64 and D in (64, 128) and K >= 1 and nc in (1, 2, 3, 4) and qbuf in (1, 2)
    scale = D**-0.5 if scale is None else float(scale)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay = gl.NVMMASharedLayout.get_default_for([S, D], gdt)
    mats = (q.view(B * Cq * S, H * D), mem_k.view(B * Cm * Sm, Hk * D), mem_v.view(B * Cm * Sm, Hk * D))
    q_desc, k_desc, v_desc = [TensorDescriptor(m, list(m.shape), list(m.stride()), [S, D], lay) for m in mats]
    out = torch.empty_like(q)
    lse = torch.empty((B, Cq, H, K, S), dtype=torch.float32, device=q.device)
    n_items = B * Cq * H
    groups = nc + 1  # warpgroups: nc math, and the nc one-warp loaders padded to one
    if maxnreg is None:
        maxnreg = min(256, (65536 // (groups * 128 * ctas)) // 8 * 8)
    if consumer_regs is None:  # what the loaders leave, shared evenly (registers a thread, by warpgroup)
        consumer_regs = min(240, ((maxnreg * groups - loader_regs) // nc) // 8 * 8)
    if grid is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        grid = min(sms * ctas, triton.cdiv(n_items, nc))
    _gca_fwd_ws[(grid,)](
        q_desc, k_desc, v_desc, indices, weights, out, lse, Cq, Cm, n_items, scale * 1.4426950408889634,
        H=H, G=H // Hk, K=K, S=S, D=D, NC=nc, NBUF=nbuf, QBUF=qbuf, TILES=2 if pair else 1, OVERLAP=bool(overlap), P_REGS=bool(p_regs),
        SOFTMAX_ONE=bool(softmax_one), CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs, num_warps=4,
        maxnreg=maxnreg,
    )
    return out, lse


def _aot(configs, dump):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import aot_sm90

    mod = sys.modules[__name__]
    real = mod._gca_fwd_ws
    mod._gca_fwd_ws = aot_sm90._Stub(real, "ws", dump)
    try:
        for cfg in configs:
            B, C, H, D, K = 4, 256, (12 if cfg.get("D", 64) == 64 else 6), cfg.get("D", 64), 8
            print(cfg)
            q = torch.randn(B, C, 64, H, D, dtype=torch.bfloat16)
            kv = torch.randn(B, C, 64, H, D, dtype=torch.bfloat16)
            idx = torch.zeros(B, C, K, dtype=torch.long)
            w = torch.rand(B, C, K)
            kw = {k: v for k, v in cfg.items() if k != "D"}
            gca_fwd_ws(q, kv, kv, idx, w, grid=132, **kw)
    finally:
        mod._gca_fwd_ws = real


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aot", action="store_true")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one small check per config, then stop")
    ap.add_argument("--ncu", action="store_true", help="only run the nc=3 forward 3 times at the SPEC shape (for ncu)")
    ap.add_argument("--configs", default=None, help="a JSON list of gca_fwd_ws keyword dicts, instead of the built-in list")
    ap.add_argument("--spec-only", action="store_true", help="time the SPEC shape only, with no small-shape checks (--quick checks one)")
    args = ap.parse_args()
    configs = [dict(nc=3, nbuf=3), dict(nc=4, nbuf=2, qbuf=1, overlap=False),
               dict(nc=4, nbuf=2, qbuf=1, overlap=False, p_regs=True), dict(nc=3, nbuf=3, p_regs=True),
               dict(nc=3, nbuf=3, overlap=False, p_regs=True), dict(nc=2, nbuf=2, D=128)]
    if args.configs:
        import json

        configs = json.loads(args.configs)
    if args.aot:
        _aot(configs, args.dump)
        return

    os.environ["GCA_GLUON"] = "0"
    from gca.ops import gca_triton as gt
    from gca.ops.gca_gluon import gca_fwd_gluon
    from gca.ops.gca_ref import gca_reference

    dev = "cuda"
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
          "|", time.strftime("%Y-%m-%d"), flush=True)

    bad = 0
    if args.ncu:
        q, mk, mv, idx, w = inputs(4, 256, 12, 12, 64, 8, seed=7)
        for _ in range(3):
            gca_fwd_ws(q, mk, mv, idx, w, nc=3, nbuf=3)
        torch.cuda.synchronize()
        return
    if args.quick:
        q, mk, mv, idx, w = inputs(1, 8, 3, 3, 64, 3, seed=1)
        ref = gca_reference(q.double(), mk.double(), mv.double(), idx, w.double())
        for cfg in configs:
            if cfg.get("D", 64) != 64:
                continue
            o, _ = gca_fwd_ws(q, mk, mv, idx, w, grid=2, **cfg)
            torch.cuda.synchronize()
            print(cfg, ((o.double() - ref).abs().max() / ref.abs().max()).item(), flush=True)
        return
    # small shapes against the float64 reference: K 1 / 3 / 5 / 16, grouped heads, items not a multiple of
    # NC or of the grid, D = 128, and a grid of 2 CTAs so each loops over many items
    for B, C, H, Hk, D, K in [] if args.spec_only else [(1, 16, 4, 2, 64, 5), (2, 8, 2, 2, 128, 3), (1, 16, 4, 4, 64, 1), (1, 32, 2, 1, 64, 16),
                              (1, 7, 5, 5, 64, 3)]:
        q, mk, mv, idx, w = inputs(B, C, H, Hk, D, K, seed=B * 1000 + C + K)
        for cfg in configs:
            if cfg.get("D", 64) != D:
                continue
            kw = {k: v for k, v in cfg.items() if k != "D"}
            for so in (False, True):
                for grid in (None, 2):
                    o, lse = gca_fwd_ws(q, mk, mv, idx, w, softmax_one=so, grid=grid, **kw)
                    torch.cuda.synchronize()
                    ref = gca_reference(q.double(), mk.double(), mv.double(), idx, w.double(), softmax_one=so)
                    err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
                    _, lse_t = gt.gca_fwd(q, mk, mv, idx, w, softmax_one=so)
                    ok = (idx >= 0)[:, :, None, :, None]
                    lse_err = ((lse - lse_t).abs() * ok).max().item()
                    good = err < 1e-2 and lse_err < 1e-3 and torch.isfinite(o).all().item()
                    bad += not good
                    print(f"check B={B} C={C} H={H} Hk={Hk} D={D} K={K} so={so} grid={grid} {kw}: "
                          f"out rel {err:.2e} lse {lse_err:.2e} {'ok' if good else 'FAIL'}", flush=True)
    print("checks:", "all passed" if not bad else f"{bad} FAILED", flush=True)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    shapes = [(4, 256, 12, 12, 64, 8), (4, 256, 12, 12, 64, 4), (4, 256, 12, 12, 64, 16), (4, 256, 6, 6, 128, 8),
              (4, 256, 12, 4, 64, 8)]
    if args.spec_only:
        shapes = shapes[:1]
    for B, C, H, Hk, D, K in shapes:
        q, mk, mv, idx, w = inputs(B, C, H, Hk, D, K, seed=7)
        o_t, _ = gt.gca_fwd(q, mk, mv, idx, w)
        flops = 4 * B * C * H * K * 64 * 64 * D
        cands = {"triton": lambda: gt.gca_fwd(q, mk, mv, idx, w), "gluon1wg": lambda: gca_fwd_gluon(q, mk, mv, idx, w)}
        for cfg in configs:
            if cfg.get("D", 64) != D:
                continue
            kw = {k: v for k, v in cfg.items() if k != "D"}
            o_w, _ = gca_fwd_ws(q, mk, mv, idx, w, **kw)
            torch.cuda.synchronize()
            diff = ((o_w.float() - o_t.float()).abs().max() / o_t.float().abs().max()).item()
            print(f"  B={B} C={C} H={H} Hk={Hk} D={D} K={K} ws {kw}: vs triton rel {diff:.2e}", flush=True)
            bad += diff > 1e-2
            cands[f"ws{kw}"] = (lambda kw=kw: gca_fwd_ws(q, mk, mv, idx, w, **kw))
        times = {name: [] for name in cands}
        for _ in range(args.rounds):  # in turn, so drift hits every candidate alike
            for name, fn in cands.items():
                times[name].append(bench(fn))
        for name, ts in times.items():
            med = sorted(ts)[len(ts) // 2]
            print(f"B={B} C={C} H={H} Hk={Hk} D={D} K={K} {name:40s} {med:.4f} ms  {flops / med / 1e9:.0f} TFLOP/s  "
                  f"(rounds: {' '.join(f'{t:.4f}' for t in ts)})", flush=True)
    print("done;", "all checks passed" if not bad else f"{bad} checks FAILED")


if __name__ == "__main__":
    main()
