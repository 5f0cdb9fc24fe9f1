"""Sliding-window attention: the blocked O(T*W) path against a dense masked softmax."""

import pytest
import torch

from gca.ops.sliding_window import sliding_window_attention


def dense_window(q, k, v, window):
    T = q.shape[2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    mask = (j <= i) & (i - j < window)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("T, window", [(1, 4), (7, 3), (64, 16), (65, 16), (100, 64), (30, 100)])
def test_blocked_matches_dense(T, window):
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = sliding_window_attention(q, k, v, window, impl="blocked")
    ref = dense_window(q, k, v, window)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_full_window_none_is_causal():
    q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(sliding_window_attention(q, k, v, None), dense_window(q, k, v, 10**9))


@pytest.mark.parametrize("T", [1, 100, 128, 129, 700, 2048])
@pytest.mark.parametrize("window", [1, 64, 127, 128, 129, 200, 512, 3000])
def test_block_mask_matches_create_block_mask(T, window):
    """The block mask built from the block geometry equals FlexAttention's own, partial and full
    blocks, both orientations (blocks past T stay partial)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from gca.ops.sliding_window import sliding_window_block_mask

    ref = create_block_mask(lambda b, h, q, kv: (kv <= q) & (q - kv < window), None, None, T, T, device="cpu")
    got = sliding_window_block_mask(T, window, "cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert torch.equal(got.to_dense(), ref.to_dense())
    assert got.seq_lengths == (T, T)
