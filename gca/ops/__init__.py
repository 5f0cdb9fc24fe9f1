"""Public ops of the package: grouped cross attention and sliding-window attention.

`grouped_cross_attention` checks its arguments and dispatches: the fused Triton kernel on CUDA
when it is available (``impl="auto"`` or ``"triton"``), the readable PyTorch reference
(``impl="torch"``) everywhere else.
"""

from __future__ import annotations

import torch

from gca.ops.gca_ref import autocasting, check_scale, gca_reference, values_readable
from gca.ops.sliding_window import sliding_window_attention

__all__ = ["grouped_cross_attention", "gca_reference", "kernel_for", "sliding_window_attention", "triton_available"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available(device: torch.device | None = None) -> bool:
    """True when the fused Triton GCA kernel can run on ``device`` (a CUDA device with Triton)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    try:
        from gca.ops import gca_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _in_torch_func(impl: str) -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is running: the fused kernels have no batching
    or forward-mode rule, so ``impl="auto"`` uses the reference there and ``impl="triton"`` is refused."""
    try:
        inside = torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # (a private API: a torch without it)
        return False
    if inside and impl == "triton":
        raise ValueError("impl='triton' cannot run inside a torch.func transform (vmap, grad, jvp, functional_call "
                         "with grad): the fused kernels have no batching or forward-mode rule; use impl='torch' "
                         "(impl='auto' does so there)")
    return inside


def kernel_for(q, mem_k, mem_v, indices, weights, *, scale: float | None = None, impl: str = "auto") -> tuple[str, str]:
    """Which implementation :func:`grouped_cross_attention` runs on these inputs, and why:
    ``("gluon" | "triton" | "torch", reason)``. Launches nothing and reads no index back from the
    device; arguments that call would refuse (ranks, shapes, dtypes, devices, and with
    ``impl="triton"`` inputs the kernels do not take) raise the ``ValueError`` it would.

    Example:
        >>> q = torch.randn(1, 2, 64, 4, 32)
        >>> kernel_for(q, q, q, torch.zeros(1, 2, 1, dtype=torch.long), torch.ones(1, 2, 1))[0]
        'torch'
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    _check(q, mem_k, mem_v, indices, weights, check_indices=False)  # a call with bad arguments runs nothing
    scale = check_scale(scale)
    if impl == "torch":
        return "torch", "impl='torch'"
    if not torch.compiler.is_compiling() and _in_torch_func(impl):
        return "torch", "inside a torch.func transform (vmap, grad, jvp), which the fused kernels do not support"
    if impl == "auto" and not triton_available(q.device):
        return "torch", "the fused kernels need a CUDA device and Triton (impl='auto' uses the reference here)"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "triton":
        _check_triton_usable(q, mem_k, scale)  # raises as grouped_cross_attention would
    from gca.ops import gca_triton

    reason = gca_triton.supports(q, mem_k, scale)
    if reason is not None:
        return "torch", f"the Triton kernels do not take {reason}"
    why_not = gca_triton.gluon_reason(q, mem_k, mem_v, indices.long(), weights)
    if why_not is None:
        return "gluon", "Hopper, chunks of 64, heads of 128, bf16/fp16, contiguous inputs (GCA_GLUON=0 turns it off)"
    return "triton", f"the Gluon kernels do not take these inputs: {why_not}"


def _check_triton_usable(q, mem_k, scale) -> None:
    """Clear errors for an explicit ``impl="triton"`` that cannot run."""
    import os

    try:
        from gca.ops import gca_triton
    except ImportError as e:
        raise ValueError(f"impl='triton' needs Triton ({e}); pip install -e '.[triton]' in the gca checkout, "
                         f"or use impl='torch'") from None
    if not q.is_cuda and not gca_triton.INTERPRET:
        if os.environ.get("TRITON_INTERPRET") == "1":  # set, but after the kernels were compiled for a GPU
            raise ValueError("impl='triton' on CPU tensors: TRITON_INTERPRET=1 was set after gca.ops.gca_triton "
                             "was imported, so the kernels are not interpreted; set it before the first import of "
                             "gca (e.g. in the shell), or use impl='auto' or 'torch'")
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU); "
                         "use impl='auto' or 'torch' here")
    reason = gca_triton.supports(q, mem_k, scale)
    if reason is not None:
        raise ValueError(f"impl='triton' does not support these inputs: {reason}; use impl='auto' or 'torch'")


def _check(q, mem_k, mem_v, indices, weights, check_indices: bool) -> None:
    for name, t in (("q", q), ("mem_k", mem_k), ("mem_v", mem_v), ("indices", indices), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 5:
        raise ValueError(f"q must be (B, Cq, S, H, D), got {q.dim()} dims with shape {tuple(q.shape)}")
    if mem_k.dim() != 5 or mem_v.dim() != 5:
        raise ValueError(
            f"mem_k and mem_v must be (B, Cm, Sm, Hk, D), got shapes {tuple(mem_k.shape)} and {tuple(mem_v.shape)}"
        )
    if mem_k.shape != mem_v.shape:
        raise ValueError(f"mem_k {tuple(mem_k.shape)} and mem_v {tuple(mem_v.shape)} must have the same shape")
    if indices.dim() != 3 or weights.dim() != 3:
        raise ValueError(
            f"indices and weights must be (B, Cq, K), got shapes {tuple(indices.shape)} and {tuple(weights.shape)}"
        )
    B, Cq, S, H, D = q.shape
    Bm, Cm, Sm, Hk, Dm = mem_k.shape
    if Bm != B:
        raise ValueError(f"batch mismatch: q has B={B}, mem_k has B={Bm}")
    if Dm != D:
        raise ValueError(f"head size mismatch: q has D={D}, mem_k has D={Dm}")
    if D == 0:
        raise ValueError(f"head size D must be at least 1, got q of shape {tuple(q.shape)}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"memory heads Hk={Hk} must divide query heads H={H}")
    if tuple(indices.shape[:2]) != (B, Cq):
        raise ValueError(f"indices must be (B, Cq, K) = ({B}, {Cq}, K), got {tuple(indices.shape)}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the shape of indices {tuple(indices.shape)}")
    for name, t in (("q", q), ("mem_k", mem_k), ("mem_v", mem_v), ("weights", weights)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == mem_k.dtype == mem_v.dtype):
        raise ValueError(f"q, mem_k and mem_v must share a dtype, got {q.dtype}, {mem_k.dtype}, {mem_v.dtype}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be int64 (or int32), got {indices.dtype}")
    devs = {t.device for t in (q, mem_k, mem_v, indices, weights)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")
    if check_indices and indices.numel() > 0 and torch.compiler.is_compiling():
        # torch.compile: the host cannot read the values (a graph break), and an index out of range would read
        # past the memory (garbage on a GPU, an abort of the whole process in Inductor's CPU code), so the graph
        # checks on the device: a RuntimeError on a CPU, a device-side assert on CUDA
        bound = f"[-1, {Cm})" if isinstance(Cm, int) else "[-1, Cm), Cm = mem_k.shape[1]"  # (a SymInt has no value)
        torch._assert_async(((indices >= -1) & (indices < Cm)).all(),
                            f"indices must lie in {bound} (-1 = empty slot)")
    elif check_indices and indices.numel() > 0 and values_readable(indices):
        lo, hi = (int(v) for v in torch.aminmax(indices))  # one device sync for both
        if lo < -1 or hi >= Cm:
            raise ValueError(
                f"indices must lie in [-1, Cm) = [-1, {Cm}) (-1 = empty slot), got values in [{lo}, {hi}]"
            )


def grouped_cross_attention(
    q: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    softmax_one: bool = False,
    scale: float | None = None,
    impl: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Grouped cross attention: each query chunk attends to each of its retrieved chunks
    separately, and the K results are mixed by the retrieval weights.

    ``out[b,c,s,h] = sum_i weights[b,c,i] * softmax_j(scale * q[b,c,s,h] . mem_k[b,idx,j,h']) @ mem_v[b,idx,:,h']``
    with ``idx = indices[b,c,i]`` and ``h' = h // (H // Hk)``. Empty slots (index -1) contribute
    nothing. With ``softmax_one`` every softmax denominator gets an extra ``+1`` (a zero logit),
    so a head may attend to nothing in a chunk.

    Args:
        q: queries ``(B, Cq, S, H, D)``.
        mem_k: memory keys ``(B, Cm, Sm, Hk, D)``; Hk must divide H.
        mem_v: memory values, same shape as ``mem_k``.
        indices: ``(B, Cq, K)`` int64 chunk indices into ``mem_k``'s Cm axis; -1 marks an empty slot.
        weights: ``(B, Cq, K)`` mixing weights, shared by all heads (usually a softmax of retrieval scores).
        softmax_one: add 1 to each softmax denominator. Default False.
        scale: logit scale, default ``1 / sqrt(D)``.
        impl: ``"auto"`` (Triton kernel on CUDA when available, else the reference), ``"torch"`` or ``"triton"``.
        validate: check that every index lies in ``[-1, Cm)`` (one device synchronisation; under
            ``torch.compile`` an on-device assert instead, which raises on a CPU and is a device-side
            assert on CUDA). Callers whose indices are correct by construction (the DRT model's own
            retrieval) pass False.

    Returns:
        ``(B, Cq, S, H, D)`` in q's dtype. Differentiable in q, mem_k, mem_v and weights.

    Example:
        >>> q = torch.randn(2, 5, 64, 4, 32)
        >>> mem = torch.randn(2, 5, 64, 4, 32)
        >>> idx = torch.tensor([[[-1, -1]] + [[0, -1]] * 4] * 2)  # (2, 5, 2)
        >>> out = grouped_cross_attention(q, mem, mem, idx, torch.ones(2, 5, 2))
        >>> out.shape
        torch.Size([2, 5, 64, 4, 32])
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if isinstance(softmax_one, (str, bytes)) or softmax_one not in (0, 1):  # "no" would have been truthy
        raise ValueError(f"softmax_one must be True or False, got {softmax_one!r}")
    compiling = torch.compiler.is_compiling()
    if autocasting(q.device) and not q.dtype == mem_k.dtype == mem_v.dtype:
        # an autocast region reconciles mixed dtypes (a q from a Linear in bf16 with a float32 memory) as it
        # does for matmul and scaled_dot_product_attention: all three in its dtype
        q, mem_k, mem_v = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, mem_k, mem_v))
    _check(q, mem_k, mem_v, indices, weights, check_indices=validate)
    scale = check_scale(scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    in_func = not compiling and _in_torch_func(impl)  # (raises for impl="triton" inside a transform)
    use_triton = impl == "triton" or (impl == "auto" and not in_func and triton_available(q.device))
    if use_triton:
        if impl == "triton":
            _check_triton_usable(q, mem_k, scale)
        from gca.ops.gca_triton import gca_triton

        return gca_triton(q, mem_k, mem_v, indices.long(), weights, softmax_one=softmax_one, scale=scale, validate=False)
    return gca_reference(q, mem_k, mem_v, indices, weights, softmax_one=softmax_one, scale=scale)
