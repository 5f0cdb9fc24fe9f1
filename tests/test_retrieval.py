"""Causal top-k retrieval: only strictly earlier chunks, padding when the past is short,
weights = softmax of noise-free scores, Gumbel noise changes the pick but not the weights' form."""

import pytest
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


# ---- the auxiliary copy-retrieval loss (DRTConfig.retrieval_copy_loss) ----
def _brute_copy_targets(ids, n, P, min_distance):
    B, L = ids.shape
    C = -(-L // P)
    out = torch.zeros(B, C, C, dtype=torch.bool)
    for b in range(B):
        x = ids[b].tolist()
        for t in range(max(n, 1), L):
            row = (t - 1) // P - 1
            if row < 0:
                continue
            for p in range(n, t - min_distance):
                if x[t - n : t + 1] == x[p - n : p + 1]:
                    out[b, row, p // P] = True
    return out


def test_copy_targets_equal_a_brute_force_search():
    from gca.retrieval import copy_targets

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for n, P, min_d, L in [(2, 7, 10, 150), (1, 5, 0, 61), (3, 9, 20, 200)]:
        ids = torch.randint(0, 4, (2, L), generator=g)
        ids[1, L - 30 : L - 10] = ids[1, 10:30]  # a long repeat far back
        got = copy_targets(ids, n, P, min_d, block_elems=2 * 37 * 9 * 23)  # several blocks of query positions
        ref = _brute_copy_targets(ids, n, P, min_d)
        assert got.shape == ref.shape and torch.equal(got, ref), (n, P, min_d)
        assert ref.any() and not ref.all()
        assert not got[:, -1].any()  # the last row serves no chunk


def test_copy_retrieval_loss_is_the_cross_entropy_towards_the_target_set():
    from gca.retrieval import copy_retrieval_loss

    B, C, other = 2, 9, 2
    Cm = (other + 1) * C  # two other sequences' chunks first, as with retrieval_distractors=2
    scores = torch.randn(B, C, Cm, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(B, C, C) < 0.3
    valid = torch.arange(C) < C - 1
    loss, share = copy_retrieval_loss(scores, targets, row_offset=other * C, valid_rows=valid)
    terms = []
    for b in range(B):
        for r in range(C):
            allowed = torch.arange(Cm) < r + other * C
            if not valid[r]:
                continue
            tgt = torch.zeros(Cm, dtype=torch.bool)
            tgt[other * C :] = targets[b, r]
            tgt &= allowed
            if tgt.any():
                p = torch.softmax(scores[b, r][allowed], -1)
                terms.append(-torch.log(p[tgt[allowed]].sum()))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert abs(share.item() - len(terms) / (B * C)) < 1e-6 and 0 < len(terms) < B * C
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    for r in range(C):  # nothing reaches the chunks a row may not pick
        assert (scores.grad[:, r, r + other * C :] == 0).all()
    # no targets: zero, with a (zero) gradient path
    s2 = torch.randn(1, 4, 4, requires_grad=True)
    z, share = copy_retrieval_loss(s2, torch.zeros(1, 4, 4, dtype=torch.bool))
    z.backward()
    assert z.item() == 0 and share.item() == 0 and (s2.grad == 0).all()


def test_forced_chunks_come_first_and_weights_stay_the_scores_softmax():
    """causal_topk(force=...): a row's forced chunks it may pick fill its first slots (the best-scored
    of them when there are more than k), the other slots are its usual top picks among the rest; forced
    chunks it may not pick are not picked; the weights are the softmax of the noise-free scores."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    B, C, k = 3, 12, 4
    scores = torch.randn(B, C, C, dtype=torch.float64, requires_grad=True)
    force = torch.rand(B, C, C) < 0.3
    for gumbel in (False, True):
        r = causal_topk(scores, k, force=force, gumbel=gumbel)
        plain = causal_topk(scores, k)
        for b in range(B):
            for c in range(C):
                may = list(range(c))
                forced = [j for j in may if force[b, c, j]]
                got = [j for j in r.indices[b, c].tolist() if j >= 0]
                assert len(got) == len(set(got)) == min(c, k)  # no chunk twice, every slot it can fill
                assert all(j < c for j in got)
                if len(forced) <= k:
                    assert set(forced) <= set(got)
                    if not gumbel:  # the rest: the best-scored unforced chunks
                        rest = sorted((j for j in may if j not in forced), key=lambda j: -scores[b, c, j].item())
                        assert set(got) == set(forced) | set(rest[: min(c, k) - len(forced)])
                else:
                    assert set(got) <= set(forced)
                    if not gumbel:
                        best = sorted(forced, key=lambda j: -scores[b, c, j].item())[:k]
                        assert set(got) == set(best)
                if got:
                    want = torch.softmax(scores[b, c, got], -1)
                    torch.testing.assert_close(r.weights[b, c, : len(got)], want)
    # no forcing changes nothing; forcing nothing either
    assert torch.equal(causal_topk(scores, k, force=torch.zeros_like(force)).indices, plain.indices)
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="force"):
        causal_topk(scores, k, force=force[:, :-1])


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_k_below_one_is_refused(k):
    # k = 0 used to give one slot silently
    with pytest.raises(ValueError, match="k must be a positive integer"):
        causal_topk(torch.randn(1, 5, 5), k)


def test_very_low_finite_scores_still_rank_above_forbidden_chunks():
    # scores below the old -1e30 mask used to lose to chunks a row may not pick: row 1 got nothing
    scores = torch.full((1, 4, 4), -1e31, dtype=torch.float64)
    r = causal_topk(scores, 3)
    for c in range(4):
        assert ((r.indices[0, c] >= 0).sum() == min(c, 3)).item()
        assert (r.indices[0, c, : min(c, 3)] < c).all()
        torch.testing.assert_close(r.weights[0, c].sum(), torch.tensor(float(c > 0), dtype=torch.float64))


def test_minus_inf_scores_are_never_picked_and_empty_slots_come_last():
    scores = torch.randn(1, 5, 5)
    scores[0, 3, 0] = float("-inf")
    scores[0, 2] = float("-inf")  # a row whose chunks are all -inf: nothing to pick
    for force in (None, torch.ones(1, 5, 5, dtype=torch.bool)):
        for gumbel in (False, True):
            r = causal_topk(scores, 3, gumbel=gumbel, force=force)
            assert (r.indices[0, 2] == -1).all() and (r.weights[0, 2] == 0).all()
            assert sorted(r.indices[0, 3, :2].tolist()) == [1, 2] and r.indices[0, 3, 2] == -1
            torch.testing.assert_close(r.weights[0, 3, :2], torch.softmax(scores[0, 3, r.indices[0, 3, :2]], -1))
            filled = r.indices >= 0  # filled slots first in every row
            assert (filled[..., :-1] >= filled[..., 1:]).all()
    s = scores.clone().requires_grad_(True)
    (causal_topk(s, 3).weights * torch.randn(1, 5, 3)).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[0, 2] == 0).all()


def test_half_precision_scores_and_an_empty_memory():
    scores = torch.randn(2, 4, 4)
    r32 = causal_topk(scores, 2)
    r16 = causal_topk(scores.half(), 2)  # used to overflow filling -1e30 into float16
    assert torch.equal(r16.indices, r32.indices) and r16.weights.dtype == torch.float16
    torch.testing.assert_close(r16.weights.float(), r32.weights, atol=2e-3, rtol=0)
    r = causal_topk(torch.zeros(2, 3, 0), 4)  # no chunk yet: one empty slot per row (topk used to fail)
    assert r.indices.shape == (2, 3, 1) and (r.indices == -1).all() and (r.weights == 0).all()


def test_bad_scores_and_force_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"\(B, C, Cm\)"):
        causal_topk(torch.randn(3, 3), 2)
    with pytest.raises(ValueError, match="force must be a bool tensor"):
        causal_topk(torch.randn(1, 3, 3), 2, force=torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="force must be a bool tensor"):
        causal_topk(torch.randn(1, 3, 3), 2, force=torch.ones(3, 3, dtype=torch.bool))


def test_valid_rows_that_are_not_a_bool_row_mask_say_what_is_wrong():
    # an integer 0/1 mask used to fail deep inside with torch's "masked_fill_ only supports boolean masks"
    from gca.retrieval import copy_retrieval_loss

    scores = torch.randn(1, 4, 4)
    for bad in (torch.tensor([1, 1, 1, 0]), torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.ones(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"valid_rows must be a bool tensor of shape \(4,\)"):
            causal_topk(scores, 2, valid_rows=bad)
        with pytest.raises(ValueError, match="valid_rows must be a bool tensor"):
            copy_retrieval_loss(scores, torch.zeros(1, 4, 4, dtype=torch.bool), valid_rows=bad)
    with pytest.raises(ValueError, match=r"got torch.int64 of shape \(4,\)"):
        causal_topk(torch.zeros(1, 4, 0), 2, valid_rows=torch.tensor([1, 1, 1, 0]))  # an empty memory too
    ok = torch.tensor([1, 1, 1, 0]).bool()
    assert (causal_topk(scores, 2, valid_rows=ok).indices[0, 3] == -1).all()
