"""The GCA reference op against the definition, in float64: values, all four gradients,
awkward shapes, repeated and empty slots, softmax_one, grouped heads, and argument errors."""

import sys

import pytest
import torch

from gca.ops import grouped_cross_attention
from gca.ops.gca_ref import gca_bruteforce, gca_reference


def make_inputs(B=2, Cq=3, S=5, H=4, Hk=2, D=8, Cm=4, Sm=6, K=3, dtype=torch.float64, empty=0.25, requires_grad=True):
    q = torch.randn(B, Cq, S, H, D, dtype=dtype)
    mem_k = torch.randn(B, Cm, Sm, Hk, D, dtype=dtype)
    mem_v = torch.randn(B, Cm, Sm, Hk, D, dtype=dtype)
    idx = torch.randint(0, Cm, (B, Cq, K))
    idx[torch.rand(B, Cq, K) < empty] = -1
    w = torch.rand(B, Cq, K, dtype=dtype)
    if requires_grad:
        for t in (q, mem_k, mem_v, w):
            t.requires_grad_(True)
    return q, mem_k, mem_v, idx, w


SHAPES = {
    "basic": dict(),
    "one-token": dict(S=1, Sm=1, D=4),
    "grouped-H4-Hk1": dict(H=4, Hk=1),
    "no-grouping": dict(H=3, Hk=3),
    "K-larger-than-memory": dict(Cm=2, K=5),
    "single-slot": dict(K=1),
    "chunk63-like": dict(S=7, Sm=9, D=6, Cq=2),
}


@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_reference_matches_definition(shape, softmax_one):
    q, k, v, idx, w = make_inputs(**SHAPES[shape], requires_grad=False)
    out = gca_reference(q, k, v, idx, w, softmax_one=softmax_one)
    ref = gca_bruteforce(q, k, v, idx, w, softmax_one=softmax_one)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("shape", ["basic", "grouped-H4-Hk1", "K-larger-than-memory"])
def test_reference_gradcheck(shape, softmax_one):
    q, k, v, idx, w = make_inputs(**{**SHAPES[shape], "B": 1, "Cq": 2, "S": 3, "Sm": 4, "D": 4})
    fn = lambda q, k, v, w: gca_reference(q, k, v, idx, w, softmax_one=softmax_one)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-7)


def test_repeated_chunk_accumulates_gradient():
    # the same memory chunk retrieved twice by one query chunk and once by another
    q, k, v, _, w = make_inputs(B=1, Cq=2, Cm=3, K=2, empty=0.0)
    idx = torch.tensor([[[1, 1], [1, -1]]])
    out = gca_reference(q, k, v, idx, w)
    ref = gca_bruteforce(q, k, v, idx, w)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, w), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v, w), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    # only chunk 1 was read: the others get exactly zero gradient
    assert grads[1][:, [0, 2]].abs().max() == 0 and grads[1][:, 1].abs().max() > 0
    # the empty slot gets no weight gradient
    assert grads[3][0, 1, 1] == 0


def test_empty_slots_and_rows():
    q, k, v, idx, w = make_inputs(empty=0.0)
    idx[0, 0] = -1  # a whole row empty
    idx[1, 1, 0] = -1
    out = grouped_cross_attention(q, k, v, idx, w)
    assert out[0, 0].abs().max() == 0
    # an empty slot is the same as a zero weight on any chunk
    w2 = w.detach().clone()
    w2[1, 1, 0] = 0.0
    idx2 = idx.clone()
    idx2[1, 1, 0] = 0
    out2 = grouped_cross_attention(q, k, v, idx2, w2)
    torch.testing.assert_close(out[1, 1], out2[1, 1])


def test_garbage_in_unread_chunks_does_not_leak():
    q, k, v, idx, w = make_inputs(empty=0.5)
    idx[0, 0] = -1
    k2, v2 = k.detach().clone(), v.detach().clone()
    unread = torch.ones(k.shape[1], dtype=torch.bool)
    unread[idx[idx >= 0].unique()] = False
    k2[:, unread] = float("nan")
    v2[:, unread] = float("inf")
    k2.requires_grad_(True)
    out = grouped_cross_attention(q, k2, v2, idx, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, gca_reference(q, k, v, idx, w))
    (gq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(gq).all()


def test_grouped_heads_equal_repeated_memory_heads():
    q, k, v, idx, w = make_inputs(H=6, Hk=2, requires_grad=False)
    out = gca_reference(q, k, v, idx, w)
    rep = lambda t: t.repeat_interleave(3, dim=3)  # noqa: E731  head h reads memory head h // 3
    torch.testing.assert_close(out, gca_reference(q, rep(k), rep(v), idx, w))


def test_scale_and_half_precision():
    q, k, v, idx, w = make_inputs(requires_grad=False)
    torch.testing.assert_close(
        gca_reference(q, k, v, idx, w, scale=0.3), gca_bruteforce(q, k, v, idx, w, scale=0.3)
    )
    out16 = grouped_cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, w.float(), impl="torch")
    assert out16.dtype == torch.bfloat16
    ref = gca_reference(q, k, v, idx, w)
    err = (out16.double() - ref).norm() / ref.norm()
    assert err < 2e-2


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(mem_v=a["mem_v"][:, :, :-1]), "same shape"),
        (lambda a: a.update(indices=a["indices"] + 10), r"\[-1, Cm\)"),
        (lambda a: a.update(indices=a["indices"] - 5), r"\[-1, Cm\)"),
        (lambda a: a.update(indices=a["indices"].float()), "int64"),
        (lambda a: a.update(weights=a["weights"][..., :-1]), "weights"),
        (lambda a: a.update(mem_k=a["mem_k"].float()), "share a dtype"),
        (lambda a: a.update(q=torch.randn(2, 3, 5, 3, 8, dtype=torch.float64)), "must divide"),
        (lambda a: a.update(q=a["q"][..., :4]), "head size"),
        (lambda a: a.update(mem_v=a["mem_v"].tolist()), "mem_v must be a torch.Tensor"),
        (lambda a: a.update(scale=float("nan")), "scale must be a finite number"),
        (lambda a: a.update(scale=float("inf")), "scale must be a finite number"),
        (lambda a: a.update(scale="0.5"), "scale must be a finite number"),
        # a tensor scale that needs grad was cut from the graph by float() (a learned temperature never trained)
        (lambda a: a.update(scale=torch.tensor(0.3, requires_grad=True)), "multiply q by it"),
        (lambda a: a.update(softmax_one="no"), "softmax_one must be True or False"),  # was truthy: on
    ],
    ids=["rank", "kv-mismatch", "idx-high", "idx-low", "idx-dtype", "weights-shape", "dtype", "hk-divides", "head-size",
         "not-a-tensor", "scale-nan", "scale-inf", "scale-str", "scale-grad", "softmax-one-str"],
)
def test_argument_errors(change, match):
    # a NaN scale used to give NaN outputs from the reference (the kernels refuse it), a string scale or a
    # list for a tensor an unrelated TypeError or AttributeError
    q, k, v, idx, w = make_inputs(requires_grad=False, empty=0.0)
    args = dict(q=q, mem_k=k, mem_v=v, indices=idx, weights=w)
    change(args)
    for impl in ("auto", "torch"):
        with pytest.raises(ValueError, match=match):
            grouped_cross_attention(**args, impl=impl)


def test_validate_false_skips_only_the_index_range_check():
    q, k, v, idx, w = make_inputs(requires_grad=False)
    torch.testing.assert_close(grouped_cross_attention(q, k, v, idx, w, validate=False), grouped_cross_attention(q, k, v, idx, w))
    with pytest.raises(ValueError, match="must divide|head size|same shape"):  # shapes are still checked
        grouped_cross_attention(q, k, v[:, :, :-1], idx, w, validate=False)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_index_range_is_checked_under_torch_compile(dynamic):
    """Under torch.compile the host-side range check cannot read the indices; an out-of-range index read past
    the memory (Inductor's CPU code aborted the whole process). The compiled op now checks on the device:
    a RuntimeError here, in-range indices unchanged."""
    q, k, v, idx, w = make_inputs(requires_grad=False)
    f = torch.compile(lambda q, k, v, i, w: grouped_cross_attention(q, k, v, i, w, impl="torch"),
                      backend="aot_eager", fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(f(q, k, v, idx, w), grouped_cross_attention(q, k, v, idx, w, impl="torch"))
    Cm = k.shape[1]
    for bad in (Cm, -2):
        wrong = idx.clone()
        wrong[0, -1, 0] = bad
        with pytest.raises(RuntimeError, match=r"indices must lie in \[-1, "):
            f(q, k, v, wrong, w)


def test_bad_impl():
    q, k, v, idx, w = make_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="impl"):
        grouped_cross_attention(q, k, v, idx, w, impl="cuda")


def test_explicit_triton_on_cpu_says_what_to_do(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = sys.modules.get("gca.ops.gca_triton")  # imported already (under the interpreter, in a full run)?
    if kernels is not None:
        monkeypatch.setattr(kernels, "INTERPRET", False)
    q, k, v, idx, w = make_inputs(dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        grouped_cross_attention(q, k, v, idx, w, impl="triton")


@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
@pytest.mark.parametrize("what", ["K=0", "Cm=0", "Sm=0"])
def test_nothing_to_read_gives_zeros_and_zero_gradients(what, softmax_one):
    # K = 0 slots, an empty memory (every index -1) or memory chunks of no position: the result is 0 and
    # a backward through it works and gives zero gradients (the reference used to fail at Cm = 0, to cut
    # the graph at K = 0, and to raise an IndexError at Sm = 0 with softmax_one)
    q, k, v, idx, w = make_inputs(K=0 if what == "K=0" else 3, empty=0.0)
    if what == "Cm=0":
        k, v = (t.detach()[:, :0].requires_grad_(True) for t in (k, v))
        idx = torch.full_like(idx, -1)
    if what == "Sm=0":
        k, v = (t.detach()[:, :, :0].requires_grad_(True) for t in (k, v))
    out = grouped_cross_attention(q, k, v, idx, w, softmax_one=softmax_one)
    assert out.shape == q.shape and out.abs().max() == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v, w))
    assert all(g.shape == t.shape and g.abs().sum() == 0 for g, t in zip(grads, (q, k, v, w)))
    out = grouped_cross_attention(q, k.detach(), v.detach(), idx, w.detach(), softmax_one=softmax_one)
    (gq,) = torch.autograd.grad(out.sum(), (q,))
    assert gq.abs().sum() == 0


def test_an_empty_slot_ignores_its_weight_even_nan():
    q, k, v, idx, w = make_inputs(empty=0.0)
    idx[0, 1, 2] = -1
    w2 = w.detach().clone()
    w2[0, 1, 2] = float("nan")  # an empty slot's weight is never read (the fused kernels skip it too)
    w2.requires_grad_(True)
    out = grouped_cross_attention(q, k, v, idx, w2)
    w0 = w.detach().clone()
    w0[0, 1, 2] = 0.0
    torch.testing.assert_close(out, gca_bruteforce(q, k, v, idx, w0))
    (gw,) = torch.autograd.grad(out.sum(), (w2,))
    assert torch.isfinite(gw).all() and gw[0, 1, 2] == 0


@pytest.mark.parametrize("softmax_one", [False, True], ids=["softmax", "softmax1"])
def test_gradcheck_odd_inputs(softmax_one):
    # S != Sm, a negative scale, int32 indices, a non-contiguous q and an expanded (stride-0) memory
    q, k, v, idx, w = make_inputs(B=1, Cq=2, S=2, Sm=3, H=2, Hk=1, D=3, Cm=3, K=2, empty=0.3)
    qt = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    k1 = k.detach()[:, :1].clone().requires_grad_(True)
    fn = lambda q, k1, v, w: grouped_cross_attention(  # noqa: E731
        q, k1.expand(-1, 3, -1, -1, -1), v, idx.int(), w, softmax_one=softmax_one, scale=-0.7)
    assert torch.autograd.gradcheck(fn, (qt, k1, v, w), eps=1e-6, atol=1e-7)
    torch.testing.assert_close(
        fn(qt, k1, v, w), gca_bruteforce(q, k1.expand(-1, 3, -1, -1, -1), v, idx, w, softmax_one=softmax_one, scale=-0.7)
    )


def test_zero_head_size_is_a_value_error():
    q, k, v, idx, w = make_inputs(D=0, requires_grad=False)
    with pytest.raises(ValueError, match="head size D must be at least 1"):
        grouped_cross_attention(q, k, v, idx, w)


def test_kernel_for_refuses_what_the_call_refuses():
    from gca.ops import kernel_for

    q, k, v, idx, w = make_inputs(requires_grad=False)
    assert kernel_for(q, k, v, idx, w, impl="torch")[0] == "torch"
    for bad in ((q[0], k, v, idx, w), (q, k, v[:, :, :-1], idx, w), (q, k, v, idx, w[..., :-1])):
        with pytest.raises(ValueError):
            grouped_cross_attention(*bad)
        with pytest.raises(ValueError):  # it used to answer "torch" for a call that raises
            kernel_for(*bad)


def test_autocast_keeps_the_reference_in_float32_and_reconciles_dtypes():
    """Inside torch.autocast the reference's einsums ran in the autocast dtype, so float32 inputs came back
    float32 but bf16-accurate (1e-2 off, the kernels 1e-6), and a q from a Linear (bf16 there) beside a
    float32 memory was refused for its dtype; now the reference keeps float32 and autocast's dtype is used
    for mixed inputs, as matmul and scaled_dot_product_attention do."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v = (torch.randn(2, 3, 16, 4, 32, generator=g), torch.randn(2, 3, 16, 2, 32, generator=g),
               torch.randn(2, 3, 16, 2, 32, generator=g))
    idx = torch.randint(-1, 3, (2, 3, 2), generator=g)
    w = torch.softmax(torch.randn(2, 3, 2, generator=g), -1)
    q.requires_grad_(True)
    ref = gca_reference(q.double(), k.double(), v.double(), idx, w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_cross_attention(q, k, v, idx, w, impl="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    (dq,) = torch.autograd.grad(out.square().sum(), q)
    (dq_ref,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(dq.double(), dq_ref.double(), rtol=1e-5, atol=1e-5)
    lin = torch.nn.Linear(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lq = lin(q)
        assert lq.dtype == torch.bfloat16
        mixed = grouped_cross_attention(lq, k, v, idx, w, impl="torch")
    assert mixed.dtype == torch.bfloat16
    expect = grouped_cross_attention(lq, k.bfloat16(), v.bfloat16(), idx, w, impl="torch")
    torch.testing.assert_close(mixed, expect, rtol=0, atol=0)
    with pytest.raises(ValueError, match="share a dtype"):  # outside autocast mixed dtypes are still refused
        grouped_cross_attention(lin(q).bfloat16(), k, v, idx, w)


def test_torch_func_transforms_use_the_reference_and_refuse_triton_by_name():
    """vmap / grad over the op: the reference runs (with batched indices its range check, which reads values
    back, is skipped); impl='triton' said only PyTorch's generic 'must override setup_context', and now names
    impl='torch'."""
    q, k, v, idx, w = make_inputs(requires_grad=False)
    qs = torch.stack([q, 2 * q, -q])
    out = torch.func.vmap(lambda x: grouped_cross_attention(x, k, v, idx, w))(qs)
    torch.testing.assert_close(out, torch.stack([gca_reference(x, k, v, idx, w) for x in qs]), rtol=0, atol=0)
    idxs = torch.stack([idx, idx.flip(-1)])
    out = torch.func.vmap(lambda i: grouped_cross_attention(q, k, v, i, w))(idxs)
    torch.testing.assert_close(out[1], gca_reference(q, k, v, idxs[1], w), rtol=0, atol=0)
    dq = torch.func.grad(lambda x: grouped_cross_attention(x, k, v, idx, w).square().sum())(q)
    qq = q.clone().requires_grad_(True)
    torch.testing.assert_close(dq, torch.autograd.grad(gca_reference(qq, k, v, idx, w).square().sum(), qq)[0])
    with pytest.raises(ValueError, match="torch.func transform.*impl='torch'"):
        torch.func.vmap(lambda x: grouped_cross_attention(x, k, v, idx, w, impl="triton"))(qs)
