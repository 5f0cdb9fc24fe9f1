"""The fused Triton GCA kernels against the PyTorch reference in float64: the output and all four
gradients (q, mem_k, mem_v, weights), awkward shapes, repeated and empty slots, whole rows empty,
softmax_one, grouped heads, strided (non-contiguous) inputs, NaN-poisoned buffers, the decode path
and torch.compile.

Without CUDA the kernels run in the Triton interpreter on CPU tensors. ``@triton.jit`` decides
whether a kernel is interpreted when it is *decorated*, i.e. when ``gca.ops.gca_triton`` is first
imported (setting the variable after ``import triton`` but before that import is enough; setting it
after is not). So this file sets ``TRITON_INTERPRET=1`` (only when there is no CUDA) before it
imports the kernels, and ``test_interpreter_is_active`` checks that it took effect. ``conftest.py``
sets it too, before any test module is collected: triton's own ``@jit`` helpers are decided when
triton is first imported, and modules that import ``transformers`` (``test_hf``) import it at
collection.

Tolerances follow flash-attention practice: with ``ref64`` the reference in float64,
``err(kernel) <= 2 * err(torch in the same dtype) + floor`` for the output and ``3 *`` for
gradients, where the same-dtype torch computation does every matmul and softmax in that dtype
(``_reference_lowp``; for float32 it is the reference itself). Errors are max-abs, relative to the
largest entry of the float64 result. Floors: 1e-5 for float32, 2e-3 for bfloat16.
"""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: E402,F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

if not HAS_TRITON or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs Triton and CUDA, or TRITON_INTERPRET=1", allow_module_level=True)

from gca.ops import grouped_cross_attention  # noqa: E402
from gca.ops import gca_triton as gt  # noqa: E402
from gca.ops.gca_ref import gca_reference  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="CUDA only (too slow for the interpreter)")

# Error allowed on top of a multiple of the low-precision reference's, relative to the largest
# element. bf16: one rounding of the largest element (2^-8). The kernels round P and dS to bf16
# before their matmuls, which the reference does not, and their gradient error reaches 1.1-1.2% of the
# largest element where the reference's is 0.3%: with a floor of 2e-3 three of ~4800 fresh bf16
# checks of test_dkdv_retrieval_counts exceeded "3 x reference + floor" (one in CI, dq 1.16e-2 vs
# 1.06e-2); with 2^-8 the worst of them is at 0.92 of the bound.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 5e-4}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # every buffer the launchers allocate starts as NaN: an element a kernel forgets shows up
    monkeypatch.setattr(gt, "POISON_OUTPUTS", True)


def _reference_lowp(q, mem_k, mem_v, indices, weights, softmax_one=False, scale=None):
    """The reference's math with every op in the inputs' dtype (no float32 upcast)."""
    B, Cq, S, H, D = q.shape
    Hk = mem_k.shape[3]
    G = H // Hk
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, Cq, S, Hk, G, D)
    valid = indices >= 0
    safe = indices.clamp(min=0).long()
    w = weights.to(q.dtype) * valid.to(q.dtype)
    b_idx = torch.arange(B, device=q.device)[:, None]
    out = torch.zeros_like(qg)
    for i in range(indices.shape[-1]):
        k_i, v_i = mem_k[b_idx, safe[:, :, i]], mem_v[b_idx, safe[:, :, i]]
        s = torch.einsum("bcshgd,bcthd->bchgst", qg, k_i) * scale
        if softmax_one:
            m = s.amax(dim=-1, keepdim=True).clamp(min=0.0)
            p = torch.exp(s - m)
            p = p / (p.sum(dim=-1, keepdim=True) + torch.exp(-m))
        else:
            p = torch.softmax(s, dim=-1)
        out = out + w[:, :, i, None, None, None, None] * torch.einsum("bchgst,bcthd->bcshgd", p, v_i)
    return out.reshape(B, Cq, S, H, D)


def _indices(B, Cq, Cm, K, pattern):
    """(B, Cq, K) int64. patterns: "random" (with ~25% empty slots), "repeated" (one chunk twice in
    a row and shared by several query chunks, one query chunk with all slots empty), "causal"
    (j < c, first chunks empty, as the model produces)."""
    idx = torch.randint(0, Cm, (B, Cq, K))
    if pattern == "random":
        idx[torch.rand(B, Cq, K) < 0.25] = -1
    elif pattern == "repeated":
        idx[:, :, 0] = Cm - 1  # every query chunk retrieves chunk Cm-1 ...
        if K > 1:
            idx[:, 0, 1] = Cm - 1  # ... and query chunk 0 retrieves it twice
        idx[:, -1, :] = -1  # a whole row empty
    elif pattern == "causal":
        for c in range(Cq):
            n = min(c, K)
            idx[:, c] = -1
            if n:
                idx[:, c, :n] = torch.stack([torch.randperm(c)[:n] for _ in range(B)])
    return idx


def _inputs(B, Cq, Cm, S, Sm, H, Hk, D, K, dtype, pattern="random", device=DEVICE, contiguous=False):
    # q and the memory are strided views, like q = linear(x).view(...) and a packed k/v projection
    # (contiguous=True: separate tensors, as the DRT model has them, which the Gluon path needs)
    q = torch.randn(B, Cq, S, H, D + 8, dtype=dtype, device=device)[..., :D]
    kv = torch.randn(B, Cm, Sm, 2, Hk, D, dtype=dtype, device=device)
    mem_k, mem_v = kv[:, :, :, 0], kv[:, :, :, 1]
    if contiguous:
        q, mem_k, mem_v = q.contiguous(), mem_k.contiguous(), mem_v.contiguous()
    idx = _indices(B, Cq, Cm, K, pattern).to(device)
    w = torch.softmax(torch.randn(B, Cq, K, device=device), -1)  # weights stay fp32 for bf16 q
    if dtype == torch.float32:
        w = w.to(dtype)
    return q, mem_k, mem_v, idx, w


def _run(fn, q, k, v, idx, w, g, softmax_one):
    q, k, v, w = (t.detach().requires_grad_(True) for t in (q, k, v, w))
    out = fn(q, k, v, idx, w, softmax_one=softmax_one)
    grads = torch.autograd.grad(out, (q, k, v, w), g)
    return (out,) + grads


def _check_against_reference(shape, dtype, softmax_one, pattern, indices=None, contiguous=False, zero_weight=False):
    q, k, v, idx, w = _inputs(**shape, dtype=dtype, pattern=pattern, contiguous=contiguous)
    if indices is not None:
        idx = indices.to(idx.device)
    if zero_weight:  # every query chunk's first slot weighted exactly 0
        w = w.clone()
        w[:, :, 0] = 0
    g = torch.randn(q.shape, dtype=dtype, device=q.device)
    ours = _run(lambda *a, **kw: grouped_cross_attention(*a, **kw, impl="triton"), q, k, v, idx, w, g, softmax_one)
    ref = _run(gca_reference, q.double(), k.double(), v.double(), idx, w.double(), g.double(), softmax_one)
    low_fn = gca_reference if dtype == torch.float32 else _reference_lowp
    low = _run(low_fn, q, k, v, idx, w, g, softmax_one)
    names = ("out", "dq", "dmem_k", "dmem_v", "dweights")
    for name, a, r, lo, t in zip(names, ours, ref, low, (q, k, v, q, w)):
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype}, expected {t.dtype}"
        assert not a.isnan().any(), f"{name}: NaN (an element was never written)"
        mag = r.abs().max().item() + 1e-12
        err = (a.double() - r).abs().max().item() / mag
        err_low = (lo.double() - r).abs().max().item() / mag
        factor = 2 if name == "out" else 3
        assert err <= factor * err_low + FLOOR[dtype], f"{name}: rel err {err:.2e} > {factor} x {err_low:.2e} + {FLOOR[dtype]}"
    # empty slots get exactly zero weight gradient
    assert (ours[4][idx < 0] == 0).all()


# small shapes: the interpreter runs these on two slow CPU cores
SMALL = {
    "S16-D32-H4-Hk2-K3": dict(B=1, Cq=3, Cm=4, S=16, Sm=16, H=4, Hk=2, D=32, K=3),
    "S48-Sm24-D64-H4-Hk1-K3": dict(B=1, Cq=2, Cm=3, S=48, Sm=24, H=4, Hk=1, D=64, K=3),
    "S64-Sm80-D32-H2-Hk2-K1": dict(B=2, Cq=2, Cm=3, S=64, Sm=80, H=2, Hk=2, D=32, K=1),
}
# larger shapes, CUDA only
LARGE = {
    "spec-like-S64-H12-D64-K8": dict(B=2, Cq=32, Cm=32, S=64, Sm=64, H=12, Hk=12, D=64, K=8),
    "S128-D128-H6-Hk2-K16": dict(B=1, Cq=24, Cm=24, S=128, Sm=128, H=6, Hk=2, D=128, K=16),
    "S63-Sm65-D64-H8-Hk1-K32": dict(B=2, Cq=40, Cm=40, S=63, Sm=65, H=8, Hk=1, D=64, K=32),
    "S48-D32-H4-Hk4-K5": dict(B=3, Cq=17, Cm=20, S=48, Sm=48, H=4, Hk=4, D=32, K=5),
}


@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("pattern", ["random", "repeated"])
@pytest.mark.parametrize("shape", list(SMALL))
def test_fp32(shape, pattern, softmax_one):
    _check_against_reference(SMALL[shape], torch.float32, softmax_one, pattern)


@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("shape", list(SMALL)[:2])
def test_bf16(shape, softmax_one):
    _check_against_reference(SMALL[shape], torch.bfloat16, softmax_one, "repeated")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("shape", list(LARGE))
def test_large_cuda(shape, softmax_one, dtype):
    _check_against_reference(LARGE[shape], dtype, softmax_one, "causal")


@cuda_only
@pytest.mark.parametrize("shape", list(LARGE)[:2])
def test_fp16_cuda(shape):
    _check_against_reference(LARGE[shape], torch.float16, True, "causal")


# launch-config variants the default configs do not reach at these shapes
VARIANTS = {
    "dkdv-transposed": {"dkdv": {"TRANSPOSED": True}},
    "dkdv-plain": {"dkdv": {"TRANSPOSED": False}},
    "16-row-blocks": {"fwd": {"BLOCK_M": 16}, "dq": {"BLOCK_M": 16}, "dkdv": {"BLOCK_M": 16, "BLOCK_N": 16}},
}


def test_zero_weights():
    """A slot weighted exactly 0: its dmem_k / dmem_v contributions vanish, its dweights do not (the
    reference's)."""
    _check_against_reference(SMALL["S16-D32-H4-Hk2-K3"], torch.float32, False, "random", zero_weight=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SMALL)[1:])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants(variant, shape, dtype, monkeypatch):
    monkeypatch.setattr(gt, "CONFIG_OVERRIDES", VARIANTS[variant])
    _check_against_reference(SMALL[shape], dtype, True, "repeated")


# Fixed retrieval patterns for the dK/dV kernel's inverted index: memory chunks retrieved 0, 1, 2, 3
# and 4 times, a chunk twice by one query chunk, empty slots and a query chunk with every slot empty;
# head groups of R = G * S = 24, 32 and 64 rows, Sm != S
COUNT_SHAPES = {
    "S16-Sm24-D32-H4-Hk2": dict(B=2, Cq=3, Cm=4, S=16, Sm=24, H=4, Hk=2, D=32, K=3),
    "S12-Sm20-D16-H4-Hk2": dict(B=2, Cq=3, Cm=4, S=12, Sm=20, H=4, Hk=2, D=16, K=3),
    "S32-Sm48-D64-H2-Hk1": dict(B=2, Cq=3, Cm=4, S=32, Sm=48, H=2, Hk=1, D=64, K=3),
}
COUNT_INDICES = torch.tensor([
    [[2, -1, 2], [0, 2, 1], [-1, 0, -1]],  # batch 0: counts 2, 1, 3, 0
    [[3, 3, 3], [3, 1, -1], [-1, -1, -1]],  # batch 1: counts 0, 1, 0, 4
])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transposed", [True, False], ids=["transposed", "plain"])
@pytest.mark.parametrize("shape", list(COUNT_SHAPES))
def test_dkdv_retrieval_counts(shape, transposed, dtype, monkeypatch):
    counts = torch.stack([torch.bincount(row[row >= 0], minlength=4) for row in COUNT_INDICES.flatten(1)])
    assert {0, 1, 2, 3, 4} <= set(counts.flatten().tolist())
    monkeypatch.setattr(gt, "CONFIG_OVERRIDES", {"dkdv": {"TRANSPOSED": transposed, "BLOCK_M": 16}})  # several row blocks
    _check_against_reference(COUNT_SHAPES[shape], dtype, dtype == torch.float32, "random", indices=COUNT_INDICES)


def test_inverted_index_and_config(monkeypatch):
    """The inverted index lists, for each memory chunk (b, m), exactly the flattened slots
    (b * Cq + c) * K + i that retrieved it, in increasing order, on fresh random indices of several
    shapes; empty slots come last. The launch config is a fresh dict that follows CONFIG_OVERRIDES."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for B, Cq, K, Cm in [(2, 5, 3, 7), (1, 1, 1, 1), (3, 4, 2, 4), (2, 9, 4, 3)]:
        for _ in range(2):
            idx = torch.randint(-1, Cm, (B, Cq, K), generator=gen).to(DEVICE)  # a CPU generator, so drawn on the CPU
            order, offsets = gt._inverted_index(idx, Cm)
            flat = idx.reshape(-1).tolist()
            assert offsets.tolist()[0] == 0 and offsets.tolist()[-1] == sum(x >= 0 for x in flat)
            for b in range(B):
                for m in range(Cm):
                    got = order[offsets[b * Cm + m] : offsets[b * Cm + m + 1]].tolist()
                    want = [j for j, x in enumerate(flat) if x == m and j // (Cq * K) == b]
                    assert got == want, (B, Cq, K, Cm, b, m)
            assert sorted(order.tolist()) == list(range(len(flat)))  # a permutation, empty slots at the end
    base = gt._config("dkdv", 64, 64, 64, True)
    base.pop("BLOCK_M")  # the caller's pops do not reach the next call
    assert "BLOCK_M" in gt._config("dkdv", 64, 64, 64, True)
    monkeypatch.setattr(gt, "CONFIG_OVERRIDES", {"dkdv": {"num_stages": 2}})
    assert gt._config("dkdv", 64, 64, 64, True)["num_stages"] == 2
    monkeypatch.setattr(gt, "CONFIG_OVERRIDES", {})
    assert gt._config("dkdv", 64, 64, 64, True)["num_stages"] == 3


@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_decode(T, softmax_one):
    B, Cm, Sm, H, Hk, D, K = 2, 5, 16, 4, 2, 32, 3
    q = torch.randn(B, T, H, D, device=DEVICE)
    mem_k, mem_v = torch.randn(2, B, Cm, Sm, Hk, D, device=DEVICE)
    idx = torch.tensor([[4, -1, 4], [0, 2, 3]], device=DEVICE)  # repeated and empty slots
    w = torch.rand(B, K, device=DEVICE)
    out = gt.gca_decode(q, mem_k, mem_v, idx, w, softmax_one=softmax_one)
    ref = gca_reference(q[:, None].double(), mem_k.double(), mem_v.double(), idx[:, None], w[:, None].double(), softmax_one=softmax_one)[:, 0]
    assert out.shape == (B, T, H, D) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_decode_gives_gradients_when_they_are_wanted():
    """The split decode kernel is forward-only; a call whose inputs require grad (grad mode on) used to
    return a tensor with no grad_fn, silently. It now runs the differentiable path: the same values and
    the reference's gradients. Under no_grad the split kernel still runs (no graph kept)."""
    B, T, Cm, Sm, H, Hk, D, K = 2, 5, 5, 16, 4, 2, 32, 3
    q = torch.randn(B, T, H, D, device=DEVICE, requires_grad=True)
    mem_k, mem_v = (torch.randn(B, Cm, Sm, Hk, D, device=DEVICE, requires_grad=True) for _ in range(2))
    idx = torch.tensor([[4, -1, 4], [0, 2, 3]], device=DEVICE)
    w = torch.rand(B, K, device=DEVICE, requires_grad=True)
    out = gt.gca_decode(q, mem_k, mem_v, idx, w)
    assert out.grad_fn is not None
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, mem_k, mem_v, w), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, mem_k, mem_v, w)]
    ref = gca_reference(leaves[0][:, None], leaves[1], leaves[2], idx[:, None], leaves[3][:, None])[:, 0]
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, a, r in zip(("dq", "dmem_k", "dmem_v", "dweights"), grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        fast = gt.gca_decode(q, mem_k, mem_v, idx, w)
    assert fast.grad_fn is None
    torch.testing.assert_close(fast, out.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", [0.5]], ids=["nan", "inf", "str", "list"])
def test_entry_points_refuse_a_scale_that_is_not_a_finite_number(scale):
    # a NaN scale fell back to the reference with a warning and returned NaN; the public op refuses it
    q, k, v, idx, w = _inputs(**SMALL["S16-D32-H4-Hk2-K3"], dtype=torch.float32, pattern="random")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        gt.gca_triton(q, k, v, idx, w, scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        gt.gca_decode(q[:, 1, :5], k, v, idx[:, 1], w[:, 1], scale=scale)


@pytest.mark.parametrize("pattern", ["random", "repeated"])
def test_no_grad_path_equals_the_custom_op(pattern):
    """Under no_grad the forward is launched directly (no custom-op dispatch, no LSE): same output."""
    q, k, v, idx, w = _inputs(**SMALL["S16-D32-H4-Hk2-K3"], dtype=torch.float32, pattern=pattern)
    with torch.no_grad():
        fast = gt.gca_triton(q, k, v, idx, w)
    slow, _ = torch.ops.gca.fwd(q, k, v, idx.long(), w, False, q.shape[-1] ** -0.5)
    assert not fast.isnan().any()
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_eager_autograd_path_equals_the_custom_op():
    """With grad enabled, eager calls run a plain autograd.Function (no custom-op dispatch), while
    torch.compile traces the custom op: both give the same output and the same four gradients."""
    q, k, v, idx, w = _inputs(**SMALL["S16-D32-H4-Hk2-K3"], dtype=torch.float32, pattern="random")
    g = torch.randn_like(q)
    results = []
    for path in ("eager", "op"):
        ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v, w)]
        if path == "eager":
            out = gt.gca_triton(ins[0], ins[1], ins[2], idx, ins[3])
            assert out.grad_fn is not None and "GCAFunction" in type(out.grad_fn).__name__
        else:
            out, _ = torch.ops.gca.fwd(ins[0], ins[1], ins[2], idx.long(), ins[3], False, q.shape[-1] ** -0.5)
        out.backward(g)
        results.append([out] + [t.grad for t in ins])
    for a, b in zip(*results):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@cuda_only
def test_decode_bf16_batch1_cuda():
    B, T, Cm, Sm, H, Hk, D, K = 1, 1, 300, 64, 12, 12, 64, 8
    q = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16)
    mem_k, mem_v = torch.randn(2, B, Cm, Sm, Hk, D, device=DEVICE, dtype=torch.bfloat16)
    idx = torch.randperm(Cm, device=DEVICE)[:K][None]
    w = torch.softmax(torch.randn(B, K, device=DEVICE), -1)
    out = gt.gca_decode(q, mem_k, mem_v, idx, w)
    ref = gca_reference(q[:, None].double(), mem_k.double(), mem_v.double(), idx[:, None], w[:, None].double())[:, 0]
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_interpreter_is_active():
    kind = type(gt._gca_fwd_kernel).__name__
    if HAS_CUDA:
        assert kind == "JITFunction" and not gt.INTERPRET
    else:
        assert kind == "InterpretedFunction" and gt.INTERPRET, "TRITON_INTERPRET was set too late"


def test_empty_and_edge_cases():
    # K = 0, and every slot empty: zero output and zero gradients, nothing NaN
    for K, fill in ((0, None), (2, -1)):
        q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=2, S=16, Sm=16, H=2, Hk=1, D=16, K=K, dtype=torch.float32)
        if fill is not None:
            idx.fill_(fill)
        out, dq, dk, dv, dw = _run(gt.gca_triton, q, k, v, idx, w, torch.randn(q.shape, device=q.device), False)
        for t in (out, dq, dk, dv, dw):
            assert not t.isnan().any() and (t == 0).all()



def _nonfinite_chunk0_check(shape, dtype, contiguous, bad):
    """Chunk 0 of the memory holds ``bad`` (NaN or inf) and is retrieved only through empty slots
    (-1): the output and all four gradients equal the float64 reference's, which never reads it."""
    q, k, v, _, w = _inputs(**shape, dtype=dtype, contiguous=contiguous)
    B, Cq, K, Cm = shape["B"], shape["Cq"], shape["K"], shape["Cm"]
    idx = torch.randint(1, Cm, (B, Cq, K))
    idx[torch.rand(B, Cq, K) < 0.4] = -1
    idx[:, 0] = -1  # a whole row empty
    idx[:, 1, 0], idx[:, 1, 1] = -1, 1  # and an empty slot beside a full one
    idx = idx.to(q.device)
    k, v = k.clone(), v.clone()
    k[:, 0], v[:, 0] = bad, bad
    g = torch.randn(q.shape, dtype=dtype, device=q.device)
    ours = _run(gt.gca_triton, q, k, v, idx, w, g, False)
    ref = _run(gca_reference, q.double(), k.double(), v.double(), idx, w.double(), g.double(), False)
    for name, a, r in zip(("out", "dq", "dmem_k", "dmem_v", "dweights"), ours, ref):
        assert torch.isfinite(a).all(), f"{name}: the empty slots read chunk 0's {bad}"
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        err = (a.double() - r).abs().max().item() / (r.abs().max().item() + 1e-12)
        assert err <= tol, f"{name}: rel err {err:.2e}"
    assert (ours[2][:, 0] == 0).all() and (ours[3][:, 0] == 0).all()  # nothing flows back to chunk 0
    # the decode path: the first 5 tokens of query chunk 1, whose slot 0 is empty
    dec = gt.gca_decode(q[:, 1, :5], k, v, idx[:, 1], w[:, 1])
    dec_ref = gca_reference(q[:, 1:2, :5].double(), k.double(), v.double(), idx[:, 1:2], w[:, 1:2].double())[:, 0]
    assert torch.isfinite(dec).all(), f"decode: the empty slots read chunk 0's {bad}"
    err = (dec.double() - dec_ref).abs().max().item() / (dec_ref.abs().max().item() + 1e-12)
    assert err <= (1e-4 if dtype == torch.float32 else 3e-2), f"decode: rel err {err:.2e}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_empty_slots_add_nothing_whatever_chunk_0_holds(bad):
    """An empty slot's tiles load as zeros (the kernels used to read chunk 0 and weight it by 0, and
    0 x NaN is NaN): NaN or inf in chunk 0 changes nothing, as in the reference."""
    _nonfinite_chunk0_check(SMALL["S16-D32-H4-Hk2-K3"], torch.float32, False, bad)


def test_public_entry_points_check_their_inputs(monkeypatch):
    """gca_triton and gca_decode check what grouped_cross_attention checks (an index out of range
    used to read out of bounds in gca_decode: NaN or 1e30 back, no error); validate=False skips it."""
    q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=3, S=16, Sm=16, H=2, Hk=1, D=16, K=2, dtype=torch.float32)
    bad = idx.clone()
    bad[0, 1, 0] = 3
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, Cm\) = \[-1, 3\)"):
        gt.gca_triton(q, k, v, bad, w)
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, Cm\) = \[-1, 3\)"):
        gt.gca_decode(q[:, 0], k, v, bad[:, 1], w[:, 1])
    with pytest.raises(ValueError, match=r"gca_decode takes q \(B, T, H, D\)"):
        gt.gca_decode(q, k, v, idx[:, 1], w[:, 1])
    with pytest.raises(ValueError, match="share a dtype"):
        gt.gca_decode(q[:, 0].double(), k, v, idx[:, 1], w[:, 1])
    ok = gt.gca_decode(q[:, 0], k, v, idx[:, 1], w[:, 1], validate=False)
    torch.testing.assert_close(ok, gt.gca_decode(q[:, 0], k, v, idx[:, 1], w[:, 1]), rtol=0, atol=0)
    if not HAS_CUDA:  # TRITON_INTERPRET=1 set only after the kernels were compiled for a GPU
        monkeypatch.setattr(gt, "INTERPRET", False)
        with pytest.raises(ValueError, match="set after gca.ops.gca_triton was imported"):
            grouped_cross_attention(q, k, v, idx, w, impl="triton")


def test_second_order_gradients_raise_instead_of_vanishing():
    """The kernels' backward has no backward: create_graph=True used to give a first-order gradient
    without a graph, so a gradient penalty silently lost GCA's part; now differentiating it raises."""
    q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=3, S=16, Sm=16, H=2, Hk=1, D=16, K=2, dtype=torch.float32)
    q = q.detach().requires_grad_(True)
    out = gt.gca_triton(q, k, v, idx, w)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        gq.square().sum().backward()
    # a constant output gradient (out.sum()): torch's once_differentiable let this dq come back without a
    # graph, so a penalty on it silently counted as a constant; it must raise the same way
    out = gt.gca_triton(q, k, v, idx, w)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    assert gq.requires_grad
    torch.testing.assert_close(gq, torch.autograd.grad(gca_reference(q, k, v, idx, w).sum(), q)[0])  # first order intact
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        (out.sum() + gq.square().sum()).backward()
    # a gradient penalty taken by the other autograd APIs: the error node hung on detached copies of the
    # gradients was off the path to the inputs, so grad(total, params) dropped the penalty's second-order
    # term silently (dL/dW 42 against the reference's 4056 in the audit's case), backward(inputs=) too, and
    # allow_unused=True gave None; each must raise
    lin = torch.nn.Linear(16, 16, device=q.device)  # (on the inputs' device: CUDA when the suite has it)
    x = torch.randn(1, 2, 16, 2, 16, device=q.device)
    for take in (lambda total: torch.autograd.grad(total, lin.weight),
                 lambda total: total.backward(inputs=[lin.weight]),
                 lambda total: torch.autograd.grad(total, [lin.weight, lin.bias], allow_unused=True)):
        qq = lin(x)
        out = gt.gca_triton(qq, k, v, idx, w)
        (gq,) = torch.autograd.grad(out.square().sum(), qq, create_graph=True)
        with pytest.raises(RuntimeError, match="no second-order gradient"):
            take(out.square().sum() + 10 * gq.square().sum())
    # first order through a Linear, with and without create_graph, as the reference gives it
    for create_graph in (False, True):
        lin.zero_grad()
        gt.gca_triton(lin(x), k, v, idx, w).square().sum().backward(create_graph=create_graph)
        got = lin.weight.grad.detach().clone()
        ref = torch.autograd.grad(gca_reference(lin(x), k, v, idx, w).square().sum(), lin.weight)[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_unsupported_falls_back_with_warning():
    q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=2, S=4, Sm=4, H=2, Hk=1, D=12, K=2, dtype=torch.float32)
    with pytest.warns(UserWarning, match="head size D=12"):
        out = gt.gca_triton(q, k, v, idx, w)
    torch.testing.assert_close(out, gca_reference(q, k, v, idx, w))


def test_opcheck():
    # schema, fake (meta) kernel and autograd registration of the custom ops
    q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=2, S=16, Sm=16, H=2, Hk=1, D=16, K=2, dtype=torch.float32)
    q, k, v, w = (t.requires_grad_(True) for t in (q, k, v, w))
    torch.library.opcheck(
        torch.ops.gca.fwd.default, (q, k, v, idx, w, True, 0.25),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.gca.decode.default, (q[:, 0], k, v, idx[:, 0], w[:, 0], False, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


@cuda_only
def test_auto_dispatch_uses_triton_on_cuda():
    q, k, v, idx, w = _inputs(B=1, Cq=4, Cm=4, S=64, Sm=64, H=4, Hk=2, D=64, K=2, dtype=torch.bfloat16)
    assert torch.equal(grouped_cross_attention(q, k, v, idx, w), gt.gca_triton(q, k, v, idx, w))


# the Gluon kernels (gca.ops.gca_gluon), which gca_fwd / gca_bwd launch on Hopper for S = Sm = 64,
# D = 128; Gluon does not run in the interpreter, so on the CPU only the dispatch rule is tested
try:
    from gca.ops import gca_gluon
except ImportError:  # a Triton without Gluon
    gca_gluon = None
HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
needs_gluon = pytest.mark.skipif(gca_gluon is None, reason="Triton without Gluon")
hopper_only = pytest.mark.skipif(gca_gluon is None or not HOPPER, reason="Gluon kernels need an sm_90 GPU")


def test_kernel_for_reports_the_dispatch():
    from gca.ops import kernel_for

    q, k, v, idx, w = _inputs(**SMALL["S16-D32-H4-Hk2-K3"], dtype=torch.float32)
    assert kernel_for(q, k, v, idx, w, impl="torch") == ("torch", "impl='torch'")
    name, why = kernel_for(q, k, v, idx, w, impl="triton")
    assert name == "triton" and ("Gluon" in why)  # fp32, D = 32: never the Gluon kernels
    q12 = torch.randn(1, 2, 4, 2, 12, device=DEVICE)
    args12 = (q12, q12, q12, torch.zeros(1, 2, 1, dtype=torch.long, device=DEVICE), torch.ones(1, 2, 1, device=DEVICE))
    with pytest.raises(ValueError, match="head size D=12"):  # as grouped_cross_attention(impl="triton") raises
        kernel_for(*args12, impl="triton")
    if HAS_CUDA:  # "auto" falls back to the reference, as gca_triton does with a warning
        name, why = kernel_for(*args12)
        assert name == "torch" and "head size D=12" in why
    else:
        assert kernel_for(*args12)[0] == "torch"  # no CUDA: "auto" is the reference
    with pytest.raises(ValueError, match="impl must be"):
        kernel_for(q, k, v, idx, w, impl="cuda")
    if HOPPER and gca_gluon is not None:
        qc, kc, vc, ic, wc = _inputs(**GLUON_SHAPES["H4-Hk2-K5"], dtype=torch.bfloat16, contiguous=True)
        assert kernel_for(qc, kc, vc, ic, wc)[0] == "gluon"


def _benchmark_module(name):
    """Import benchmarks/NAME.py (with benchmarks/ on the path while it loads, for its own imports)."""
    import importlib.util
    import pathlib
    import sys

    bench_dir = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location(name, bench_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench_dir))
    return module


@needs_gluon
def test_gluon_schedule_model():
    """benchmarks/gluon_kernels.py's model of the Gluon kernels' buffer / wgmma order finds no hazard at
    the ring sizes they use, and does find one where a ring is too small."""
    gk = _benchmark_module("gluon_kernels")
    for K in range(1, 13):
        gk._schedule_fwd(K, 2)
        gk._schedule_dq(K, 3, 2)
        gk._schedule_dkdv(K, 3)
    with pytest.raises(AssertionError, match="holds slot"):
        gk._schedule_fwd(3, 1)  # one buffer: the load rule never brings slot 1's value, which the model sees
    with pytest.raises(AssertionError, match="holds slot"):
        gk._schedule_dq(5, 1, 2)


@needs_gluon
def test_gluon_dispatch_rule(monkeypatch):
    def why(S=64, Sm=64, D=128, H=4, Hk=2, K=3, dtype=torch.bfloat16, cap=(9, 0), idx_dtype=torch.int64, strided=False):
        q = torch.empty(1, 2, S, H, D + 8 * strided, dtype=dtype)[..., :D]
        k = torch.empty(1, 3, Sm, Hk, D, dtype=dtype)
        idx = torch.zeros(1, 2, K, dtype=idx_dtype)
        return gca_gluon.supports(q, k, k, idx, torch.ones(1, 2, K), capability=cap)

    assert why() is None and why(dtype=torch.float16) is None and why(K=1, H=8, Hk=1) is None
    assert "head size D=64" in why(D=64)  # the Triton kernels are faster there
    assert "capability (8, 0)" in why(cap=(8, 0)) and "capability (10, 0)" in why(cap=(10, 0))
    assert "S=48" in why(S=48) and "Sm=32" in why(Sm=32)
    assert "float32" in why(dtype=torch.float32)
    assert "int32" in why(idx_dtype=torch.int32)
    assert "non-contiguous" in why(strided=True)
    assert "nothing to attend to" in why(K=0)
    monkeypatch.setenv("GCA_GLUON", "0")
    assert why() == "GCA_GLUON=0"
    # an untested Triton release: off unless GCA_GLUON=1
    monkeypatch.setattr(gca_gluon.triton, "__version__", "9.1.0")
    monkeypatch.delenv("GCA_GLUON")
    assert "Triton 9.1.0" in why()
    monkeypatch.setenv("GCA_GLUON", "1")
    assert why() is None


GLUON_SHAPES = {
    "H4-Hk2-K5": dict(B=2, Cq=12, Cm=12, S=64, Sm=64, H=4, Hk=2, D=128, K=5),
    "H2-Hk2-K1": dict(B=1, Cq=9, Cm=9, S=64, Sm=64, H=2, Hk=2, D=128, K=1),
    "H8-Hk1-K16": dict(B=1, Cq=40, Cm=40, S=64, Sm=64, H=8, Hk=1, D=128, K=16),
}


@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern", ["random", "repeated", "causal"])
@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("shape", list(GLUON_SHAPES))
def test_gluon_path_cuda(shape, softmax_one, pattern, dtype, monkeypatch):
    calls = []
    for name in ("gca_fwd_ws", "gca_bwd_gluon"):  # the warp-specialised forward is the one launched
        real = getattr(gca_gluon, name)
        monkeypatch.setattr(gca_gluon, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    _check_against_reference(GLUON_SHAPES[shape], dtype, softmax_one, pattern, contiguous=True)
    assert calls == ["gca_fwd_ws", "gca_bwd_gluon"], calls


WS_FORMS = {  # (head size, gca_fwd_ws options): the package's forms at D = 128, and the benchmark's others
    "d128-default": (128, dict()), "d128-grid2": (128, dict(grid=2)), "d128-smem-p": (128, dict(p_regs=False)),
    "d128-nc2": (128, dict(nc=2, ctas=1, p_regs=False)),
    "nc3": (64, dict(nc=3, nbuf=3, ctas=1, p_regs=False)),
    "nc4-no-overlap": (64, dict(nc=4, qbuf=1, overlap=False, ctas=1, p_regs=False)),
    "pair": (64, dict(nc=2, pair=True, ctas=1, p_regs=False)), "p-regs": (64, dict(nbuf=3, ctas=3)), "smem-p": (64, dict(p_regs=False)),
    "p-regs-no-overlap-grid2": (64, dict(nbuf=3, overlap=False, ctas=3, grid=2)),
}


@hopper_only
@pytest.mark.parametrize("form", list(WS_FORMS))
@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
def test_gluon_ws_forward_forms_cuda(form, softmax_one, monkeypatch):
    """The warp-specialised forward's forms against the float64 reference: a grid of 2 CTAs looping over
    many items, item counts not a multiple of NC, odd K with two slots a step, an empty slot. Values and
    LSEs (the backward reads them)."""
    D, kw = WS_FORMS[form]
    shape = dict(GLUON_SHAPES["H4-Hk2-K5"], Cq=7, Cm=7, D=D)  # 2 x 7 x 4 = 56 items: not a multiple of 3
    q, k, v, idx, w = _inputs(**shape, dtype=torch.bfloat16, pattern="random", contiguous=True)
    idx[0, 3, 1] = -1  # an empty slot
    out, lse = gca_gluon.gca_fwd_ws(q, k, v, idx, w, softmax_one=softmax_one, **kw)
    ref = gca_reference(q.double(), k.double(), v.double(), idx, w.double(), softmax_one=softmax_one)
    err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    assert torch.isfinite(out).all() and err < 1e-2, f"out rel err {err:.2e}"
    monkeypatch.setenv("GCA_GLUON", "0")  # the Triton forward's LSEs on the same bf16 inputs
    _, lse_t = gt.gca_fwd(q, k, v, idx, w, softmax_one=softmax_one)
    full = (idx >= 0)[:, :, None, :, None]
    assert ((lse - lse_t).abs() * full).max().item() < 1e-3



@hopper_only
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_gluon_empty_slots_add_nothing_whatever_chunk_0_holds(bad, monkeypatch):
    """The Gluon kernels' empty slots copy a box wholly out of bounds, which TMA fills with zeros."""
    calls = []
    for name in ("gca_fwd_ws", "gca_bwd_gluon"):
        real = getattr(gca_gluon, name)
        monkeypatch.setattr(gca_gluon, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    _nonfinite_chunk0_check(GLUON_SHAPES["H4-Hk2-K5"], torch.bfloat16, True, bad)
    assert calls[:2] == ["gca_fwd_ws", "gca_bwd_gluon"], calls

@hopper_only
def test_gluon_matches_triton_cuda(monkeypatch):
    """The Gluon and Triton kernels on one input: same output, same four gradients to bf16 rounding."""
    q, k, v, idx, w = _inputs(**GLUON_SHAPES["H4-Hk2-K5"], dtype=torch.bfloat16, pattern="causal", contiguous=True)
    g = torch.randn_like(q)
    res = {}
    for flag in ("", "0"):  # default, then off
        monkeypatch.setenv("GCA_GLUON", flag)
        res[flag] = _run(gt.gca_triton, q, k, v, idx, w, g, True)
    for name, a, b in zip(("out", "dq", "dmem_k", "dmem_v", "dweights"), res[""], res["0"]):
        err = (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
        assert err < 1.5e-2, f"{name}: Gluon vs Triton rel err {err:.2e}"


def test_torch_compile_aot_eager():
    # traces through the custom ops' fake kernels and autograd; runs on CPU under the interpreter
    q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=3, S=16, Sm=16, H=2, Hk=1, D=16, K=2, dtype=torch.float32)
    q, k, v, w = (t.contiguous().requires_grad_(True) for t in (q, k, v, w))

    def f(q, k, v, w):
        return (grouped_cross_attention(q * 2, k, v, idx, w, impl="triton", softmax_one=True) ** 2).sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, w)
    grads = torch.autograd.grad(loss, (q, k, v, w))
    ref_loss = f(q, k, v, w)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, w))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA the check is a device-side assert, which ends the process's CUDA context")
@pytest.mark.parametrize("entry", ["grouped_cross_attention", "gca_triton"])
def test_torch_compile_checks_the_index_range_on_the_device(entry):
    """Both entry points skip the host-side range check under torch.compile (it would break the graph); the graph
    asserts on the device instead, so an index past the memory raises rather than reading beyond it."""
    q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=3, S=16, Sm=16, H=2, Hk=1, D=16, K=2, dtype=torch.float32)
    op = (lambda *a: grouped_cross_attention(*a, impl="triton")) if entry == "grouped_cross_attention" else gt.gca_triton
    f = torch.compile(op, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(q, k, v, idx, w), gca_reference(q, k, v, idx, w), rtol=1e-4, atol=1e-5)
    wrong = idx.clone()
    wrong[0, 1, 1] = 3  # Cm
    with pytest.raises(RuntimeError, match=r"indices must lie in \[-1, 3\)"):
        f(q, k, v, wrong, w)


_BAD_INDEX_ON_CUDA = """
import torch
from gca.ops import grouped_cross_attention
from gca.ops import gca_triton as gt
from gca.ops.gca_ref import gca_reference
op = {op}
q = torch.randn(1, 3, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
i = torch.tensor([[[-1], [0], [1]]], device="cuda")
w = torch.ones(1, 3, 1, device="cuda")
f = torch.compile(op)
torch.testing.assert_close(f(q, k, v, i, w).float(), gca_reference(q, k, v, i, w).float(), rtol=2e-2, atol=2e-2)
print("IN RANGE OK", flush=True)
i[0, 2, 0] = 3  # Cm
print(float(f(q, k, v, i, w).float().sum()))  # the assert may surface here, at the sync
print("NO ERROR", flush=True)
"""


@cuda_only
@pytest.mark.parametrize("entry", ["grouped_cross_attention", "gca_triton"])
def test_torch_compile_checks_the_index_range_on_cuda(entry):
    """The CUDA form of the test above, with Inductor: the check is a device-side assert, which ends the
    process's CUDA context, so it runs in a child process. An index of Cm stops it with the message."""
    import subprocess
    import sys

    op = "lambda *a: grouped_cross_attention(*a, impl='triton')" if entry == "grouped_cross_attention" else "gt.gca_triton"
    r = subprocess.run([sys.executable, "-c", _BAD_INDEX_ON_CUDA.replace("{op}", op)],
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert "IN RANGE OK" in r.stdout, out[-3000:]
    assert "NO ERROR" not in r.stdout, out[-3000:]
    assert "indices must lie in [-1, 3)" in out, out[-3000:]


def test_torch_compile_fullgraph_with_a_dynamic_head_size():
    """The default scale 1/sqrt(D) of a dynamic head size is a SymFloat under torch.compile, and check_scale's
    math.isfinite on it broke the graph: an error with fullgraph=True (dynamic=True, or the default compile
    once a second head size arrived), a silent graph break without it."""
    for dynamic in (None, True):
        f = torch.compile(lambda q, k, v, i, w: grouped_cross_attention(q, k, v, i, w, impl="triton"),
                          backend="aot_eager", fullgraph=True, dynamic=dynamic)
        for D in (16, 32):
            q, k, v, idx, w = _inputs(B=1, Cq=2, Cm=2, S=16, Sm=16, H=2, Hk=1, D=D, K=2, dtype=torch.float32)
            q = q.contiguous().requires_grad_(True)
            out = f(q, k, v, idx, w)
            ref = gca_reference(q.double(), k.double(), v.double(), idx, w.double())
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
            dq, dq_ref = (torch.autograd.grad(o.square().sum(), q)[0] for o in (out, ref))
            torch.testing.assert_close(dq.double(), dq_ref.double(), rtol=1e-4, atol=1e-5)


@cuda_only
def test_torch_compile_inductor_cuda():
    q, k, v, idx, w = _inputs(B=2, Cq=8, Cm=8, S=64, Sm=64, H=4, Hk=2, D=64, K=4, dtype=torch.bfloat16, pattern="causal")
    q, k, v, w = (t.contiguous().requires_grad_(True) for t in (q, k, v, w))
    proj = torch.nn.Linear(64, 64, device=DEVICE, dtype=torch.bfloat16)

    def f(q, k, v, w):
        out = grouped_cross_attention(q, k, v, idx, w, impl="triton")
        return proj(out).float().square().mean()

    loss = torch.compile(f)(q, k, v, w)
    grads = torch.autograd.grad(loss, (q, k, v, w))
    ref_loss = f(q, k, v, w)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, w))
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


@cuda_only
@pytest.mark.parametrize("D", [64, 128])  # 128 on Hopper: the Gluon kernels
def test_backward_is_deterministic_cuda(D):
    q, k, v, idx, w = _inputs(B=2, Cq=32, Cm=32, S=64, Sm=64, H=4, Hk=2, D=D, K=8, dtype=torch.bfloat16, pattern="causal",
                              contiguous=D == 128)  # D = 64 keeps the strided views it always had
    g = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    first = _run(gt.gca_triton, q, k, v, idx, w, g, False)
    second = _run(gt.gca_triton, q, k, v, idx, w, g, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", ["S16-D32-H4-Hk2-K3"] + (["spec-like-S64-H12-D64-K8"] if HAS_CUDA else []))
def test_side_stream_backward_equals_default(shape, monkeypatch):
    """SIDE_STREAM (the index sort and the dweights sum on a second CUDA stream, the default on CUDA)
    changes when the small kernels run, not what they compute: the same bits as the backward on one
    stream. On the CPU the option is accepted and ignored."""
    dims = {**SMALL, **LARGE}[shape]
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    q, k, v, idx, w = _inputs(**dims, dtype=dtype, pattern="causal")
    _, lse = gt.gca_fwd(q, k, v, idx, w)
    g = torch.randn(q.shape, dtype=dtype, device=q.device)
    monkeypatch.setattr(gt, "CONFIG_OVERRIDES", {"dkdv": {"SIDE_STREAM": False}})
    default = gt.gca_bwd(g, q, k, v, idx, w, lse)
    monkeypatch.setattr(gt, "CONFIG_OVERRIDES", {"dkdv": {"SIDE_STREAM": True}})
    side = gt.gca_bwd(g, q, k, v, idx, w, lse)
    if HAS_CUDA:
        torch.cuda.synchronize()
    for name, a, b in zip(("dq", "dmem_k", "dmem_v", "dweights"), side, default):
        assert not a.isnan().any(), f"{name}: NaN"
        assert torch.equal(a, b), f"{name} differs between one stream and two"


def test_bench_table_rows_match_header(tmp_path):
    """benchmarks/bench_gca.py's markdown table: every row has the header's columns, with and without the
    CUDA-graph timings (a case whose capture failed shows "-" there) and the reference's."""
    mod = _benchmark_module("bench_gca")
    base = {"gpu": "GPU", "shape": {"B": 4, "C": 256, "S": 64, "H": 12, "D": 64, "K": 8}, "Hk": 12, "fwd_ms": 0.33,
            "fwdbwd_ms": 1.5, "floor_fwd_ms": 0.144, "tflops_fwd": 313.0}
    rows = [dict(base, name="graph", fwd_graph_ms=0.321, fwdbwd_graph_ms=1.302, ref_fwd_ms=21.6, ref_fwdbwd_ms=48.5),
            dict(base, name="no-graph", graph_note="CUDA graph timing failed: x")]
    mod.write_results(rows, str(tmp_path), "gpu", "GPU", "2026-12-02", 4.27e12, True)
    md = (tmp_path / "gca_gpu.md").read_text()
    assert "Floor = max(FLOPs / 714 TFLOP/s, bytes / 4.27 TB/s" in md and "do_bench_cudagraph" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert len(table) == 4 and "graph fwd+bwd ms" in header
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert all(len(c) == len(header) for c in cells)
    col = header.index("graph fwd+bwd ms")
    assert cells[0][col] == "1.302" and cells[1][col] == "-" and cells[1][header.index("ref fwd ms")] == "-"
    assert json.loads((tmp_path / "gca_gpu.json").read_text())[1]["graph_note"].startswith("CUDA graph")


def test_fwd_index_patterns_keep_empty_slots_and_causality():
    """benchmarks/fwd_index_patterns.py: the recent and single-chunk patterns keep the random pattern's
    empty slots and retrieve only earlier chunks."""
    mod = _benchmark_module("fwd_index_patterns")
    idx = torch.tensor([[[-1, -1], [0, -1], [1, 0], [0, 2], [3, -1]]])
    pats = mod.patterns(idx)
    assert pats["recent"].tolist() == [[[-1, -1], [0, -1], [1, 0], [2, 1], [3, -1]]]
    assert pats["zero"].tolist() == [[[-1, -1], [0, -1], [0, 0], [0, 0], [0, -1]]]
    c = torch.arange(5)[None, :, None]
    for p in pats.values():
        assert ((p < c) | (p == -1)).all()


def test_ncu_source_stalls_reads_the_source_page_csv(tmp_path, capsys):
    """benchmarks/ncu_source_stalls.py sums the per-instruction stall columns of ncu's source CSV."""
    mod = _benchmark_module("ncu_source_stalls")
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_wait", "stall_long_sb", "stall_wait (Not Issued)"]
    rows = [["0x10", "HGMMA.64x64x16 R24", "10", "2", "8", "1"], ["0x20", "WARPGROUP.DEPBAR.LE gsb0", "30", "27", "3", "9"],
            ["0x30", "FMUL R1, R2, 1.44", "0", "0", "0", "0"]]
    csv = tmp_path / "src.csv"
    csv.write_text('"Kernel Name","k",\n' + "\n".join(",".join(f'"{v}"' for v in r) for r in [head, *rows]) + "\n")
    ins = mod.load(str(csv))
    assert [i["samples"] for i in ins] == [10, 30, 0] and ins[1]["reasons"] == {"wait": 27, "long_sb": 3}
    import sys

    argv, sys.argv = sys.argv, ["ncu_source_stalls.py", str(csv), "--top", "1"]
    try:
        mod.main()
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "wait 72.5%" in out and "long_sb 27.5%" in out and "75.0%" in out and "DEPBAR" in out


def test_gather_floor_kernel():
    """benchmarks/gather_floor.py's gather (the traffic floor of the GCA kernels) reads the retrieved tiles."""
    mod = _benchmark_module("gather_floor")
    B, Cq, Cm, Sm, Hk, D, K = 2, 3, 4, 24, 2, 16, 3
    kv = torch.randn(B, Cm, Sm, 2, Hk, D, device=DEVICE)
    mem_k, mem_v = kv[:, :, :, 0], kv[:, :, :, 1]
    idx = torch.tensor([[[2, -1, 2], [0, 3, 1], [-1, -1, -1]], [[3, 3, 0], [1, 2, -1], [0, 1, 2]]], device=DEVICE)
    out = mod.gather(mem_k, mem_v, idx)
    ref = (mem_k + mem_v)[torch.arange(B)[:, None, None], idx.clamp(min=0)].sum(2).permute(0, 1, 3, 2, 4)
    assert out.shape == (B, Cq, Hk, 32, D) and (out[:, :, :, Sm:] == 0).all()
    torch.testing.assert_close(out[:, :, :, :Sm], ref, rtol=1e-5, atol=1e-5)
    assert mod.gathered_bytes(4, 256, 12, 8, 64, 64) == 4 * 256 * 12 * 8 * 2 * 64 * 64 * 2  # 1.6 GB at the SPEC shape
