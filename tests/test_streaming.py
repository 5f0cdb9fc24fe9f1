"""Streaming inference: any split of a sequence through a cache gives the logits of one full
forward pass (offload on and off, batch > 1, every architecture), and greedy ``generate`` equals
the greedy chain of full forward passes."""

import random

import pytest
import torch

from gca import DRT, DRTConfig


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_heads=4, intermediate_size=64, window=80, top_k=3, upper_groups=[1, 1])
    return DRTConfig.from_preset("tiny", **{**base, **kw})


def random_splits(L, rng):
    out, i = [], 0
    while i < L:
        n = rng.choice([1, 1, 2, 5, 62, 63, 64, 65, 130, 300])
        out.append(min(n, L - i))
        i += out[-1]
    return out


def record_step_flags(m):
    """A list that gets, per piece the model's streaming ``_step`` processes, whether it was computed in full
    (``upper``: False for a piece no kept logit can reach)."""
    flags = []
    real_step = m._step
    m._step = lambda *a, **k: flags.append(k.get("upper", True)) or real_step(*a, **k)
    return flags


@pytest.mark.parametrize("prefill_chunk", [128, 4096], ids=["short-pieces", "long-pieces"])
@pytest.mark.parametrize("offload", [False, True], ids=["gpu-mem", "offload"])
@pytest.mark.parametrize("arch", ["drt", "swa", "full"])
def test_streaming_equals_one_shot(arch, offload, prefill_chunk):
    # long pieces (> 2 x window) take the blocked ring-buffer attention path
    torch.manual_seed(0)
    m = DRT(tiny(arch=arch, num_kv_heads=2)).double().eval()
    x = torch.randint(0, 97, (2, 63 * 9 + 17))
    ref = m(x).logits
    rng = random.Random(torch.initial_seed())
    # one token at a time: into a ring not yet full (masked), then into a full one (no mask, across chunk ends)
    decode = [100] + [1] * 140 + [x.shape[1] - 240]
    for splits in ([x.shape[1]], [1] * 70 + [x.shape[1] - 70], decode, random_splits(x.shape[1], rng)):
        cache = m.new_cache(2, offload=offload, prefill_chunk=prefill_chunk)
        outs, i = [], 0
        for n in splits:
            outs.append(m(x[:, i : i + n], cache=cache).logits)
            i += n
        got = torch.cat(outs, 1)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=f"splits {splits}")


@pytest.mark.parametrize(
    "landmark_memory, retrieval_key, center_memory, key_shift",
    [("keep", "landmark", False, False), ("zero", "centered", True, False), ("keep", "centered", True, True),
     ("zero", "landmark", False, True)],
)
def test_streaming_published_residual_and_softmax_one(landmark_memory, retrieval_key, center_memory, key_shift):
    cfg = tiny(residual="published", gca_softmax_one=True, landmark_memory=landmark_memory, retrieval_key=retrieval_key,
               center_memory=center_memory, memory_key_shift=key_shift)
    m = DRT(cfg).double().eval()
    x = torch.randint(0, 97, (1, 63 * 6 + 3))
    cache = m.new_cache(1)
    got = torch.cat([m(x[:, :100], cache=cache).logits, m(x[:, 100:], cache=cache).logits], 1)
    torch.testing.assert_close(got, m(x).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("offload", [False, True], ids=["gpu-mem", "offload"])
@pytest.mark.parametrize("groups, residual", [([1, 1], "plain"), ([2], "published")])
def test_long_prefill_with_few_logits_skips_the_upper_layers_exactly(groups, residual, offload):
    # only the last logits are wanted: pieces out of the upper layers' reach run the lower layers and the
    # encoder alone; the kept logits and every later step equal the full computation's
    torch.manual_seed(2)
    m = DRT(tiny(upper_groups=groups, residual=residual, num_kv_heads=2)).double().eval()
    x = torch.randint(0, 97, (2, 63 * 24 + 11))
    tail = torch.randint(0, 97, (2, 9))
    ref = m(torch.cat([x, tail], 1)).logits
    flags = record_step_flags(m)
    for keep in (1, 4):
        flags.clear()
        cache = m.new_cache(2, offload=offload, prefill_chunk=128)
        got = m(x, cache=cache, logits_to_keep=keep).logits
        assert got.shape == (2, keep, 97)
        torch.testing.assert_close(got, ref[:, x.shape[1] - keep : x.shape[1]], rtol=1e-9, atol=1e-9)
        # reach: 2 upper layers x window 80 + 2 chunks = 288 tokens; pieces of 126 tokens
        skipped = flags.count(False)
        assert skipped == (x.shape[1] - keep - 288) // 126 and skipped >= 8 and all(flags[skipped:])
        assert cache.skipped_tokens == 126 * skipped
        steps = [m(tail[:, j : j + 1], cache=cache).logits for j in range(tail.shape[1])]  # decoding on
        torch.testing.assert_close(torch.cat(steps, 1), ref[:, x.shape[1] :], rtol=1e-9, atol=1e-9)
    flags.clear()
    m(x, cache=m.new_cache(2, prefill_chunk=128))  # every logit wanted: nothing skipped
    assert flags and all(flags)
    flags.clear()
    got = m(x, cache=m.new_cache(2, prefill_chunk=128, skip_upper=False), logits_to_keep=1).logits  # asked not to
    assert flags and all(flags)
    torch.testing.assert_close(got, ref[:, x.shape[1] - 1 : x.shape[1]], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prefill_chunk", [128, 512], ids=["short-pieces", "blocked-pieces"])
def test_sliding_window_prefill_skips_what_no_kept_logit_can_reach_exactly(prefill_chunk):
    # the baseline without memory: pieces ending more than layers x window positions before the first kept
    # token are not computed at all; the kept logits and every decoded step after them equal one full forward
    m = DRT(tiny(arch="swa", num_kv_heads=2)).double().eval()
    layers = len(m.lower)
    piece = prefill_chunk * m.config.text_per_chunk // m.config.chunk_size  # user tokens a piece
    x = torch.randint(0, 97, (2, 2500))
    tail = torch.randint(0, 97, (2, 7))
    ref = m(torch.cat([x, tail], 1)).logits
    flags = record_step_flags(m)
    for keep in (1, 3):
        flags.clear()
        cache = m.new_cache(2, prefill_chunk=prefill_chunk)
        got = m(x, cache=cache, logits_to_keep=keep).logits
        assert got.shape == (2, keep, 97) and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref[:, x.shape[1] - keep : x.shape[1]], rtol=1e-9, atol=1e-9)
        skipped = flags.count(False)
        assert skipped == (x.shape[1] - keep - layers * 80) // piece and skipped >= 2 and all(flags[skipped:])
        assert cache.skipped_tokens == piece * skipped and cache.tokens == x.shape[1]
        steps = [m(tail[:, j : j + 1], cache=cache).logits for j in range(tail.shape[1])]  # decoding on
        torch.testing.assert_close(torch.cat(steps, 1), ref[:, x.shape[1] :], rtol=1e-9, atol=1e-9)
    flags.clear()
    got = m(x, cache=m.new_cache(2, prefill_chunk=prefill_chunk, skip_upper=False), logits_to_keep=1).logits
    assert flags and all(flags)  # asked not to skip
    torch.testing.assert_close(got, ref[:, x.shape[1] - 1 : x.shape[1]], rtol=1e-9, atol=1e-9)
    # a cache already holding positions: the skipped stretch sits between two computed ones
    cache = m.new_cache(2, prefill_chunk=prefill_chunk)
    m(x[:, :300], cache=cache)
    got = m(x[:, 300:], cache=cache, logits_to_keep=1).logits
    assert cache.skipped_tokens > 0
    torch.testing.assert_close(got, ref[:, x.shape[1] - 1 : x.shape[1]], rtol=1e-9, atol=1e-9)
    step = m(tail[:, :1], cache=cache).logits
    torch.testing.assert_close(step, ref[:, x.shape[1] : x.shape[1] + 1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("offload", [False, True], ids=["gpu-mem", "offload"])
def test_keep_scores_gives_the_last_retrievals_scores_whatever_the_pieces(offload):
    """new_cache(keep_scores=True) keeps each group's scores of the last landmark over the chunks before it: the
    same however the prompt is cut into pieces (skipped pieces included), and their top-k is the retrieval made."""
    torch.manual_seed(3)
    m = DRT(tiny(num_kv_heads=2)).double().eval()
    P = m.config.text_per_chunk
    x = torch.randint(0, 97, (2, P * 20 + 5))
    assert m.new_cache(2).last_scores == [] and not m.new_cache(2).keep_scores
    got = []
    for chunk, keep in ((128, 1), (4096, 1), (128, None)):
        cache = m.new_cache(2, offload=offload, prefill_chunk=chunk, keep_scores=True)
        m(x, cache=cache, logits_to_keep=keep)
        assert len(cache.last_scores) == len(m.groups) == 2
        for g, sc in enumerate(cache.last_scores):
            assert sc.shape == (2, 19) and sc.dtype == torch.float32  # chunk 19's landmark, over chunks 0-18
            top = sc.topk(m.config.top_k, dim=1).indices.sort(1).values
            torch.testing.assert_close(top, cache.last_rows[g][0].sort(1).values)
        got.append(torch.stack(cache.last_scores))
    splits = random_splits(x.shape[1], random.Random(5))
    cache = m.new_cache(2, keep_scores=True)
    i = 0
    for n in splits:
        m(x[:, i : i + n], cache=cache)
        i += n
    got.append(torch.stack(cache.last_scores))
    for other in got[1:]:
        torch.testing.assert_close(other, got[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["drt", "full"])
def test_greedy_generate_equals_forward_chain(arch):
    torch.manual_seed(1)
    m = DRT(tiny(arch=arch)).double().eval()
    prompt = torch.randint(0, 97, (2, 63 * 3 - 5))
    out = m.generate(prompt, max_new_tokens=12)
    assert out.shape == (2, prompt.shape[1] + 12)
    seq = prompt
    for _ in range(12):
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_sampling_and_errors():
    m = DRT(tiny()).eval()
    prompt = torch.randint(0, 97, (1, 10))
    g = torch.Generator().manual_seed(0)
    a = m.generate(prompt, 8, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, generator=g)
    g = torch.Generator().manual_seed(0)
    b = m.generate(prompt, 8, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, generator=g)
    assert torch.equal(a, b) and a.shape == (1, 18)
    stop = m.generate(prompt, 8, eos_token_id=int(a[0, 10]), do_sample=True, top_k=5, top_p=0.9,
                      temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert stop.shape[1] == 11
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(prompt, 2, top_p=1.5)
    with pytest.raises(ValueError, match="batch"):
        m(prompt, cache=m.new_cache(2))
    # a cache of a model of another shape, or of another architecture, names what differs
    narrow = DRT(m.config.replace(hidden_size=m.config.hidden_size // 2)).eval()
    with pytest.raises(ValueError, match="another shape: head_dim .*hidden_size"):
        narrow(prompt, cache=m.new_cache(1))
    if m.config.arch == "drt":
        swa = DRT(m.config.replace(arch="swa")).eval()
        with pytest.raises(ValueError, match="arch 'swa'"):
            m(prompt, cache=swa.new_cache(1))
        # another top_k: the cache holds each group's last picks (was a RuntimeError on their sizes)
        other_k = DRT(m.config.replace(top_k=m.config.top_k + 1)).eval()
        with pytest.raises(ValueError, match=f"top_k {m.config.top_k} \\(this model: {m.config.top_k + 1}\\)"):
            other_k(prompt, cache=m.new_cache(1))


def test_offload_keeps_memory_off_device_and_fetches_only_picked_chunks():
    m = DRT(tiny()).eval()
    x = torch.randint(0, 97, (1, 63 * 12))
    cache = m.new_cache(1, offload=True)
    m(x, cache=cache)
    mem = cache.memory
    assert mem.n == 12 and mem.k.device.type == "cpu"
    assert mem.nbytes_device() == mem.lmk.numel() * mem.lmk.element_size()
    # each fetch copies at most top_k distinct chunks per query chunk
    assert 0 < mem.bytes_fetched <= 12 * 3 * 2 * mem.k[0, 0].numel() * mem.k.element_size() * len(m.groups)


def test_logits_to_keep():
    m = DRT(tiny()).double().eval()
    x = torch.randint(0, 97, (2, 63 * 5 + 4))
    ref = m(x).logits
    for keep in (1, 7, 63, 64, 400):
        cache = m.new_cache(2, prefill_chunk=128)
        got = m(x, cache=cache, logits_to_keep=keep).logits
        torch.testing.assert_close(got, ref[:, -keep:], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="logits_to_keep"):
        m(x, cache=m.new_cache(2), logits_to_keep=0)


def test_capacity_hint_allocates_the_memory_once():
    torch.manual_seed(0)
    cfg = DRTConfig.from_preset("tiny", vocab_size=97, hidden_size=32, num_heads=2, intermediate_size=64, window=64, top_k=2)
    m = DRT(cfg).eval()
    x = torch.randint(0, 97, (1, 63 * 9 + 5))
    full = m(x).logits
    cache = m.new_cache(1, max_tokens=x.shape[1], prefill_chunk=128)
    assert cache.memory._cap == 10
    first = cache.memory
    out = torch.cat([m(x[:, :300], cache=cache).logits, m(x[:, 300:], cache=cache).logits], 1)
    assert cache.memory is first and cache.memory._cap == 10 and cache.memory.n == 9
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, offload", [("drt", False), ("drt", True), ("swa", False), ("full", False)])
def test_cache_mixes_inference_mode_and_no_grad(arch, offload):
    # a cache filled under torch.inference_mode() used to hold inference tensors, which cannot be
    # updated in place outside it: continuing it under no_grad (or with generate) raised RuntimeError
    torch.manual_seed(0)
    m = DRT(tiny(arch=arch)).double().eval()
    x = torch.randint(0, 97, (2, 63 * 3 + 10))
    ref = m(x).logits
    modes = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
    for first, then in [("inference", "no_grad"), ("inference", "grad"), ("no_grad", "inference"), ("grad", "inference")]:
        with modes[first]():
            cache = m.new_cache(2, offload=offload)
            a = m(x[:, :100], cache=cache).logits
        with modes[then]():
            b = m(x[:, 100:150], cache=cache).logits
        c = m(x[:, 150:], cache=cache).logits
        got = torch.cat([a, b, c], 1)
        assert not got.is_inference() and not got.requires_grad
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=f"{first} -> {then}")
    with torch.inference_mode():
        cache = m.new_cache(2, offload=offload)
        m(x[:, :100], cache=cache)
    assert torch.equal(m.generate(x[:, 100:110], 5, cache=cache)[:, -5:], m.generate(x[:, :110], 5)[:, -5:])
    with torch.inference_mode():
        out = m.generate(x[:, :110], 5)
    assert torch.equal(out, m.generate(x[:, :110], 5)) and not out.is_inference()


def test_generate_eos_list_and_training_mode_kept_on_error():
    torch.manual_seed(0)
    m = DRT(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 70))
    free = m.generate(prompt, 6)
    first = int(free[0, 70])
    # a list of end ids (as transformers' generation configs hold them): the first is the padding
    other = (first + 1) % 97
    out = m.generate(prompt, 6, eos_token_id=[other, first])  # was a TypeError from full_like
    assert out[0, 70] == first and bool((out[0, 71:] == other).all())  # done rows continue with the first id
    assert torch.equal(m.generate(prompt, 6, eos_token_id=[first]), m.generate(prompt, 6, eos_token_id=first))
    with pytest.raises(ValueError, match="empty"):
        m.generate(prompt, 2, eos_token_id=[])
    # ids the model cannot produce (they never stopped anything) and non-integers (1.5 was taken as 1)
    for bad in (97, -1, [first, 200], 1.5, [first, 2.0], True):
        with pytest.raises(ValueError, match=r"eos_token_id must be integer token ids in \[0, 97\)"):
            m.generate(prompt, 2, eos_token_id=bad)
    as_tensor = m.generate(prompt, 6, eos_token_id=torch.tensor([first]))
    assert torch.equal(as_tensor, m.generate(prompt, 6, eos_token_id=first))
    m.train()
    with pytest.raises(ValueError, match="batch"):
        m.generate(prompt, 2, cache=m.new_cache(3))
    assert m.training  # restored although generate raised


def test_generate_refuses_bad_lengths_and_a_graph_on_cpu_before_any_work():
    m = DRT(tiny()).eval()
    prompt = torch.randint(0, 97, (1, 10))
    for bad in (3.0, -1, True):  # 3.0 was a TypeError from range()
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
            m.generate(prompt, bad)
    calls = []
    m.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        m.generate(prompt, 4, cuda_graph=True)
    assert not calls  # refused before the prompt was prefilled


def test_cache_on_another_device_is_named():
    m = DRT(tiny()).eval()
    with pytest.raises(ValueError, match="the cache is on meta, the model on cpu"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=m.new_cache(1, device="meta"))


@pytest.mark.parametrize("switch", ["cast", "autocast"])
def test_cache_refuses_a_switch_of_compute_dtype(switch):
    """Casting the model (or switching autocast) half way through a cache failed deep in the chunk encoder
    ("expected m1 and m2 to have the same dtype"), or later in the GCA op, or not at all before a chunk had
    closed; now it is a ValueError naming both dtypes as soon as the cache is used again."""
    m = DRT(tiny()).double().eval()
    x = torch.randint(0, 97, (1, 30))  # less than a chunk: nothing in the chunk memory yet
    cache = m.new_cache(1)
    m(x, cache=cache)
    if switch == "cast":
        m.float()
        ctx = torch.autocast("cpu", enabled=False)
    else:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    with ctx, pytest.raises(ValueError, match="the cache was filled in torch.float64, the model now computes in"):
        m(x, cache=cache)
    with ctx:  # a new cache in the new dtype goes on as usual
        fresh = m.new_cache(1)
        m(x, cache=fresh)
        m(x, cache=fresh)


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True], ids=["negative", "2.5", "str", "True"])
def test_new_cache_refuses_a_max_tokens_that_is_not_a_count(bad):
    # 2.5 was taken as 2 and "64" as 64; "a" failed inside int() without naming the argument
    m = DRT(tiny()).eval()
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 0 or None"):
        m.new_cache(1, max_tokens=bad)
    x = torch.randint(0, 97, (1, 70))
    assert torch.equal(m(x, cache=m.new_cache(1, max_tokens=0)).logits, m(x, cache=m.new_cache(1)).logits)


def test_offloaded_memory_falls_back_to_pageable_cpu_memory_when_pinning_fails(monkeypatch):
    # page-locking a large offloaded chunk memory can fail at the system's locked-memory limit (on one H200
    # machine a 64M-token memory of 35 GB a tensor did, raised as a CUDA "out of memory"): the memory is then
    # kept in ordinary CPU memory with one warning, and every chunk written stays readable
    from gca.inference.cache import ChunkMemory

    mem = ChunkMemory(2, 8, 4, 2, 3, "cpu", offload=True, capacity=2)
    mem.pin = mem.store_pinned = True  # as on CUDA (this CPU cannot pin)
    real_empty = torch.empty
    tries = []

    def empty(*a, pin_memory=False, **k):
        if pin_memory:
            tries.append(a)
            raise RuntimeError("CUDA error: out of memory\nmore lines")
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", empty)
    chunks = [torch.randn(2, 1, 4, 2, 3) for _ in range(5)]
    with pytest.warns(UserWarning, match=r"could not page-lock .* GB .*CUDA error: out of memory\); keeping it in ordinary"):
        for c in chunks[:2]:
            mem.append(torch.randn(2, 1, 8), c, -c)
    assert len(tries) == 1 and not mem.store_pinned  # tried once, then not again
    for c in chunks[2:]:  # growing past the first capacity (2) does not try again, nor warn
        mem.append(torch.randn(2, 1, 8), c, -c)
    assert len(tries) == 1 and mem.n == 5 and mem.k.shape[1] > 2
    torch.testing.assert_close(mem.k[:, :5], torch.cat(chunks, 1))
    torch.testing.assert_close(mem.v[:, :5], -torch.cat(chunks, 1))
