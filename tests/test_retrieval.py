"""Causal top-k retrieval: only strictly earlier chunks, padding when the past is short,
weights = softmax of noise-free scores, Gumbel noise changes the pick but not the weights' form."""

import torch

from gca.retrieval import causal_topk, retrieval_health, shift_to_queries


def test_strictly_causal_and_padded():
    B, C, k = 2, 6, 3
    scores = torch.randn(B, C, C)
    r = causal_topk(scores, k)
    assert r.indices.shape == (B, C, 3)
    for c in range(C):
        row = r.indices[:, c]
        assert ((row < c) | (row == -1)).all()
        assert ((row >= 0).sum(-1) == min(c, k)).all()  # row c has c earlier chunks
    # the picks are the top-k allowed scores, weights their softmax
    c = 5
    allowed = scores[:, c, :c]
    top = allowed.topk(k).indices.sort(-1).values
    assert torch.equal(r.indices[:, c].sort(-1).values, top)
    w_ref = torch.softmax(allowed.gather(-1, r.indices[:, c]), -1)
    torch.testing.assert_close(r.weights[:, c], w_ref)
    assert (r.weights[:, 0] == 0).all() and (r.weights[:, 1, 1:] == 0).all()


def test_gumbel_explores_and_weights_use_clean_scores():
    C = 40
    scores = torch.zeros(1, C, C)  # all ties: noise decides
    picks = {tuple(causal_topk(scores, 2, gumbel=True).indices[0, -1].tolist()) for _ in range(20)}
    assert len(picks) > 1
    r = causal_topk(scores, 2, gumbel=True)
    torch.testing.assert_close(r.weights[0, -1], torch.full((2,), 0.5))
    # without noise the same input always gives the same pick
    assert len({tuple(causal_topk(scores, 2).indices[0, -1].tolist()) for _ in range(5)}) == 1


def test_weights_carry_gradient():
    scores = torch.randn(1, 5, 5, requires_grad=True)
    r = causal_topk(scores, 2)
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    assert scores.grad.abs().sum() > 0
    assert torch.isfinite(scores.grad).all()
    # no gradient to disallowed (non-causal) entries
    assert (scores.grad[0].triu() == 0).all()


def test_valid_rows_and_shift():
    scores = torch.randn(1, 4, 4)
    r = causal_topk(scores, 2, valid_rows=torch.tensor([True, True, True, False]))
    assert (r.indices[0, 3] == -1).all()
    idx, w = shift_to_queries(r)
    assert (idx[0, 0] == -1).all() and torch.equal(idx[0, 1:], r.indices[0, :-1])
    assert torch.equal(w[0, 1:], r.weights[0, :-1])


def test_retrieval_health_tells_collapsed_from_selective():
    C, k = 10, 4
    flat = causal_topk(torch.zeros(2, C, C), k)  # every chunk scores the same: a collapsed retriever
    spread, top = retrieval_health([flat])
    assert spread.item() == 0 and abs(top.item() - 1 / k) < 1e-6
    sharp = torch.full((2, C, C), 0.0)
    sharp[:, :, 0] = 20.0  # chunk 0 stands out for every row
    spread, top = retrieval_health([causal_topk(sharp, k), flat])  # averaged over groups
    assert spread.item() > 4 and abs(top.item() - (1.0 + 1 / k) / 2) < 1e-6
    # rows with empty slots (the first k chunks) are left out: they would read as selective
    r = causal_topk(torch.randn(1, C, C), k)
    full = (r.indices >= 0).all(-1)
    ref = r.scores[full].std(-1).mean()
    torch.testing.assert_close(retrieval_health([r])[0], ref)
    # no row with every slot filled (top_k >= the chunks before any row): undefined, not "collapsed";
    # a group without such rows is left out of the mean over groups
    short = causal_topk(torch.randn(1, 4, 4), 4)
    assert not (short.indices >= 0).all(-1).any()
    spread, top = retrieval_health([short])
    assert spread.isnan() and top.isnan()
    torch.testing.assert_close(retrieval_health([short, r])[0], ref)
