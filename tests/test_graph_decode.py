"""The static decode step (gca.inference.GraphDecoder): on the CPU it runs eagerly and must give
the logits of one full forward pass token for token (float64; up to 1.5e-9 apart over 150 seeds,
so 1e-8 is the tolerance), across chunk ends, a filling ring, an empty
memory, offloading and a growing memory, mixed freely with plain streaming calls; on CUDA the same
step replayed as a CUDA graph must match the streaming path and ``generate`` must give the same
tokens with and without graphs."""

import pytest
import torch

from gca import DRT, DRTConfig
from gca.inference import GraphDecoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_heads=4, intermediate_size=64, window=80, top_k=3, upper_groups=[1, 1])
    return DRTConfig.from_preset("tiny", **{**base, **kw})


def decode_through(m, x, prompt, *, offload=False, max_tokens=None, plain_steps=(), graph=False, compile=False):
    """Prefill x[:, :prompt], then feed the rest one token at a time through a GraphDecoder
    (steps listed in plain_steps go through the plain streaming call instead); the logits of every
    position from prompt - 1 on."""
    cache = m.new_cache(x.shape[0], offload=offload, max_tokens=max_tokens)
    outs = [m(x[:, :prompt], cache=cache, logits_to_keep=1).logits[:, -1]]
    dec = GraphDecoder(m, cache, graph=graph, compile=compile)
    for i in range(prompt, x.shape[1]):
        if i - prompt in plain_steps:
            outs.append(m(x[:, i : i + 1], cache=cache).logits[:, -1])
        else:
            outs.append(dec.step(x[:, i]))
    return torch.stack(outs, 1), dec, cache


@pytest.mark.parametrize("offload", [False, True], ids=["device-mem", "offload"])
@pytest.mark.parametrize("arch, kw", [
    ("drt", dict(num_kv_heads=2)),
    ("drt", dict(residual="published", gca_softmax_one=True, upper_groups=[2])),
    ("swa", {}),
    ("full", {}),
])
def test_static_step_equals_one_forward_pass(arch, kw, offload, monkeypatch):
    if offload and arch != "drt":
        pytest.skip(f"{arch} has no chunk memory")
    m = DRT(tiny(arch=arch, **kw)).double().eval()
    x = torch.randint(0, 97, (2, 63 * 5 + 11))
    ref = m(x).logits
    # the decoder's masked attention reads whole buffers (full attention: the key buffer's capacity): fill
    # torch.empty with NaN (what uninitialised memory may hold) so that any such buffer read unwritten shows
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype", torch.get_default_dtype()).is_floating_point else real_empty(*a, **k))
    # a prompt inside the second chunk: the window (80) fills while decoding, and decoding crosses 3 chunk ends;
    # a few plain streaming steps in between, one of them closing a chunk
    prompt = 70
    plain = (10, 11, 55, 56, 57)
    got, dec, cache = decode_through(m, x, prompt, offload=offload, plain_steps=plain)
    # float64 throughout (the retrieval weights' buffer and the full-attention scores were fp32: errors ~1e-9)
    torch.testing.assert_close(got, ref[:, prompt - 1 :], rtol=1e-12, atol=1e-12)
    assert cache.tokens == x.shape[1]
    n_closing = sum(1 for i in range(prompt, x.shape[1]) if i % 63 == 62 and i - prompt not in plain)
    assert dec.eager_steps == (n_closing if arch == "drt" else 0)
    assert dec.replays == x.shape[1] - prompt - len(plain) - dec.eager_steps


@pytest.mark.parametrize("offload", [False, True], ids=["device-mem", "offload"])
def test_static_step_from_an_empty_memory_and_through_memory_growth(offload):
    m = DRT(tiny(num_kv_heads=2)).double().eval()
    x = torch.randint(0, 97, (1, 63 * 5 + 2))
    ref = m(x).logits
    # 5 prompt tokens: no chunk in memory yet (GCA adds nothing); a capacity of 1 chunk makes the memory grow
    got, dec, cache = decode_through(m, x, 5, offload=offload, max_tokens=1)
    torch.testing.assert_close(got, ref[:, 4:], rtol=1e-8, atol=1e-8)
    assert cache.memory.n == 5 and cache.memory._cap >= 5


def test_graph_decoder_errors():
    m = DRT(tiny())
    with pytest.raises(ValueError, match="eval mode"):
        GraphDecoder(m, m.new_cache(1))
    m.eval()
    with pytest.raises(ValueError, match="needs a CUDA model"):
        GraphDecoder(m, m.new_cache(1), graph=True)
    dec = GraphDecoder(m, m.new_cache(2), graph=False)
    with pytest.raises(ValueError, match="batch 3"):
        dec.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, "):
        dec.step(torch.tensor([1, m.config.vocab_size]))
    # was: float / bool ids truncated into the token buffer, a (1, 2) row taken as two sequences
    for bad in (torch.tensor([1.7, 0.0]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="integer tensor"):
            dec.step(bad)
    with pytest.raises(ValueError, match=r"shape \(batch,\) or \(batch, 1\)"):
        dec.step(torch.tensor([[1, 2]]))
    assert dec.cache.tokens == 0 and dec.replays == 0  # refused before touching the cache
    assert dec.step(torch.tensor([[1], [2]], dtype=torch.int32)).shape == (2, m.config.vocab_size)
    other = DRT(tiny(hidden_size=m.config.hidden_size // 2)).eval()
    with pytest.raises(ValueError, match="another shape: head_dim"):
        GraphDecoder(other, m.new_cache(1), graph=False)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        DRT(tiny()).generate(torch.zeros(1, 4, dtype=torch.long), 3, cuda_graph=True)


@cuda
@pytest.mark.parametrize("offload", [False, True], ids=["device-mem", "offload"])
@pytest.mark.parametrize("arch", ["drt", "swa", "full"])
def test_cuda_graph_replay_equals_streaming(arch, offload):
    if offload and arch != "drt":
        pytest.skip(f"{arch} has no chunk memory")
    m = DRT(tiny(arch=arch, num_kv_heads=2)).cuda().eval()  # float32, the Triton GCA kernel
    x = torch.randint(0, 97, (2, 63 * 6 + 5), device="cuda")
    prompt = 70
    want, _, _ = decode_through(m, x, prompt, offload=offload, plain_steps=range(10**9))  # every step plain
    got, dec, _ = decode_through(m, x, prompt, offload=offload, graph=True, max_tokens=1)  # the memory grows
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert dec.replays > 300 and dec._graph is not None


@cuda
def test_generate_with_and_without_cuda_graphs_gives_the_same_tokens():
    torch.manual_seed(0)
    m = DRT(tiny(num_kv_heads=2)).cuda().eval()
    prompt = torch.randint(0, 97, (2, 150), device="cuda")
    a = m.generate(prompt, 200, cuda_graph=True)
    b = m.generate(prompt, 200, cuda_graph=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["drt", "full"])
def test_compiled_static_step_equals_one_forward_pass(arch):
    # compile=True runs the same static step through torch.compile (Inductor's CPU code here, in float64)
    m = DRT(tiny(arch=arch, num_kv_heads=2)).double().eval()
    x = torch.randint(0, 97, (2, 63 * 2 + 20))
    ref = m(x).logits
    prompt = 100
    try:
        got, dec, _ = decode_through(m, x, prompt, compile=True)
    except Exception as e:  # torch 2.11's Inductor writes C++ for AVX-512 hosts that g++ rejects (an undeclared tmp)
        if "CppCompileError" not in type(e).__name__ + str(e)[:200]:
            raise
        pytest.skip(f"Inductor's CPU code does not compile on this host (torch {torch.__version__})")
    torch.testing.assert_close(got, ref[:, prompt - 1 :], rtol=0, atol=1e-8)
    assert dec.replays > 40


@cuda
@pytest.mark.parametrize("arch", ["drt", "full"])
def test_compiled_cuda_graph_equals_streaming(arch):
    m = DRT(tiny(arch=arch, num_kv_heads=2)).cuda().eval()
    x = torch.randint(0, 97, (2, 63 * 3 + 5), device="cuda")
    prompt = 70
    want, _, _ = decode_through(m, x, prompt, plain_steps=range(10**9))
    got, dec, _ = decode_through(m, x, prompt, graph=True, compile=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert dec.replays > 100 and dec._graph is not None


def test_graph_decoder_made_under_inference_mode_steps_outside_it():
    # the decoder's buffers and the cache it advances used to be inference tensors when made under
    # torch.inference_mode(): a step outside it (e.g. under no_grad) raised RuntimeError
    torch.manual_seed(0)
    m = DRT(tiny()).double().eval()
    x = torch.randint(0, 97, (2, 63 * 2 + 20))
    ref = m(x).logits
    with torch.inference_mode():
        cache = m.new_cache(2)
        outs = [m(x[:, :100], cache=cache, logits_to_keep=1).logits[:, -1]]
        dec = GraphDecoder(m, cache, graph=False)
        outs.append(dec.step(x[:, 100]))
    with torch.no_grad():
        for i in range(101, x.shape[1]):
            outs.append(dec.step(x[:, i]))
    torch.testing.assert_close(torch.stack(outs, 1), ref[:, 99:], rtol=1e-8, atol=1e-8)
