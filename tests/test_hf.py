"""Hugging Face integration (gca.hf): config round trip, save/load, Auto classes, generate() equal
to gca.DRT.generate and to the greedy chain of full forward passes, loss, and the padding error."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import gca.hf  # noqa: E402
from gca import DRT, DRTConfig  # noqa: E402
from gca.hf import DRTForCausalLM, DRTHFCache, DRTHFConfig, from_drt  # noqa: E402

V = 97
P = 63  # user tokens per chunk


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: threads only add overhead (and contention on shared CPUs)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> DRTConfig:
    base = dict(vocab_size=V, hidden_size=32, num_heads=4, intermediate_size=64, window=80, top_k=3)
    return DRTConfig.from_preset("tiny", **{**base, **kw})


def hf_model(dtype=torch.float32, **kw) -> DRTForCausalLM:
    return from_drt(DRT(tiny(**kw)).to(dtype).eval())


def greedy_chain(drt: DRT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by a full forward pass over the whole sequence at every step."""
    x = prompt
    for _ in range(n):
        nxt = drt(x).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
    return x


# ---- config ----
def test_config_round_trip(tmp_path):
    cfg = tiny(num_kv_heads=2, upper_groups=[1, 2], residual="published", tie_embeddings=False, top_k=5)
    hfc = DRTHFConfig.from_drt_config(cfg)
    assert hfc.model_type == "drt"
    assert hfc.retrieval_top_k == 5 and hfc.to_drt_config() == cfg
    assert hfc.num_attention_heads == cfg.num_heads and hfc.num_hidden_layers == cfg.num_layers
    hfc.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DRTHFConfig)
    assert loaded.to_drt_config() == cfg
    assert DRTHFConfig().to_drt_config() == DRTConfig()  # unset fields: DRTConfig defaults
    with pytest.raises(ValueError, match="retrieval_top_k"):
        DRTHFConfig(top_k=3)
    with pytest.raises(ValueError, match="num_heads"):
        DRTHFConfig(hidden_size=30, num_heads=4)


# ---- weights ----
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_load_round_trip(tmp_path, tie):
    hf = hf_model(tie_embeddings=tie)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for cls in (DRTForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is DRTForCausalLM
        a, b = hf.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert (loaded.model.lm_head is None) == tie
        x = torch.randint(0, V, (2, 100))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, hf(x).logits, rtol=0, atol=0)
            torch.testing.assert_close(loaded.to_drt()(x).logits, hf.to_drt()(x).logits, rtol=0, atol=0)


def test_save_pretrained_saves_the_config_the_model_runs(tmp_path):
    """The DRT reads its own config: a field changed there (top_k for an evaluation) used to be lost by
    save_pretrained, which wrote the transformers config of the model's creation, so the reloaded model
    computed other logits; a field changed only on hf.config was saved though the model never saw it."""
    hf = hf_model()
    x = torch.randint(0, V, (1, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unchanged model saves without a warning
        hf.save_pretrained(tmp_path / "plain")
    hf.model.config.top_k = 1
    hf.config.window = 40  # not read by the model
    with torch.no_grad():
        ref = hf(x).logits
    with pytest.warns(UserWarning, match=r"window=40 \(the model has 80\), retrieval_top_k=3 \(the model has 1\)"):
        hf.save_pretrained(tmp_path / "changed")
    for cls in (DRTForCausalLM, AutoModelForCausalLM):
        back = cls.from_pretrained(tmp_path / "changed").eval()
        assert back.config.retrieval_top_k == 1 and back.model.config.top_k == 1 and back.model.config.window == 80
        with torch.no_grad():
            torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="retrieval_top_k"):  # was a TypeError from inside transformers
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain", top_k=2)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "plain", retrieval_top_k=2).model.config.top_k == 2


def test_weights_missing_from_a_checkpoint_get_the_drt_init(tmp_path):
    # was: _init_weights was a no-op, so a weight the checkpoint lacked (a config with more layers than
    # the file, a dropped tensor) kept uninitialised memory: NaN or 1e38 entries, NaN logits
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging

    torch.manual_seed(0)
    hf = hf_model(memory_key_shift=True)
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    dropped = ["model.lower.0.attn.o.weight", "model.lower.1.attn.qkv.weight", "model.lower.0.norm1.weight",
               "model.encoder.key_shift"]
    save_file({k: v for k, v in sd.items() if k not in dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report lists the missing keys, as it should
    try:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    finally:
        logging.set_verbosity(verbosity)
    params = dict(loaded.named_parameters())
    for k, v in sd.items():
        if k not in dropped:
            assert torch.equal(params[k], v), k  # loaded weights are not re-initialised
    std = 0.02 / (2 * hf.model.config.num_layers) ** 0.5  # a residual output projection: depth-scaled
    assert abs(float(params[dropped[0]].std()) / std - 1) < 0.15
    assert abs(float(params[dropped[1]].std()) / 0.02 - 1) < 0.15
    assert torch.equal(params[dropped[2]], torch.ones_like(params[dropped[2]]))
    assert torch.equal(params[dropped[3]], torch.full_like(params[dropped[3]], 0.5))
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randint(0, V, (2, 130))).logits).all()


def test_each_format_loaded_as_the_other_says_which_it_is(tmp_path):
    """A save_pretrained folder given to gca's loader was called a corrupt checkpoint to delete; a gca folder
    given to from_pretrained named only retrieval_top_k. Each now says what the folder is and how to load it."""
    from gca.train import CheckpointError, load_model, save_model

    m = hf_model()
    m.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"holds a transformers checkpoint .*DRTForCausalLM.from_pretrained") as e:
        load_model(tmp_path / "hf")
    assert "corrupt" not in str(e.value) and "delete" not in str(e.value)
    save_model(m.to_drt(), tmp_path / "native")
    with pytest.raises(ValueError, match=r"a gca checkpoint's .*gca.train.load_model\(DIR\).*gca.hf.from_drt") as e:
        DRTForCausalLM.from_pretrained(tmp_path / "native")
    assert "retrieval_top_k" not in str(e.value)  # the top_k naming advice led, though the user passed no top_k
    save_model(m.to_drt(), tmp_path / "run" / "ckpt")  # a run folder: its model in ckpt/ ("no model.safetensors")
    with pytest.raises(ValueError, match=r"run is a gca training run, not a transformers checkpoint: .*load_model"):
        DRTForCausalLM.from_pretrained(tmp_path / "run")
    # and the conversion the message gives works
    back = load_model(save_model(DRTForCausalLM.from_pretrained(tmp_path / "hf").to_drt(), tmp_path / "conv"))
    x = torch.randint(0, V, (1, 150))
    torch.testing.assert_close(back(x).logits, m.to_drt()(x).logits, rtol=0, atol=0)


def test_from_drt_shares_parameters():
    drt = DRT(tiny())
    hf = from_drt(drt)
    assert hf.to_drt() is drt and hf.model is drt
    assert hf.get_input_embeddings() is drt.embed
    assert hf.num_parameters() == drt.num_parameters()
    assert hf.config.to_drt_config() == drt.config


@pytest.mark.parametrize("arch", ["drt", "swa"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_resize_token_embeddings_changes_the_vocabulary_everywhere(tmp_path, tie, arch):
    # was: the DRTConfig kept the old vocab_size (ids of the new range rejected, the landmark's row
    # taken as a token's, from_pretrained failing on a size mismatch); untied: AttributeError
    torch.manual_seed(0)
    hf = hf_model(tie_embeddings=tie, arch=arch)
    x = torch.randint(0, V, (2, 150))
    with torch.no_grad():
        before = hf(x).logits
    emb = hf.resize_token_embeddings(V + 13)
    assert emb is hf.get_input_embeddings() and emb.weight.shape[0] % 64 == 0
    assert hf.config.vocab_size == hf.model.config.vocab_size == V + 13
    with torch.no_grad():
        after = hf(x).logits
        torch.testing.assert_close(after[..., :V], before, rtol=0, atol=1e-6)  # the old ids' logits are kept
        assert after.shape[-1] == V + 13 and (hf.model.lm_head is None) == tie
        y = torch.randint(V, V + 13, (2, 80))  # the new ids are accepted
        ref = hf(y).logits
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == loaded.model.config.vocab_size == V + 13
    with torch.no_grad():
        torch.testing.assert_close(loaded(y).logits, ref, rtol=0, atol=0)
    assert hf.generate(y[:, :70], max_new_tokens=3, do_sample=False).shape == (2, 73)
    hf.resize_token_embeddings(V, pad_to_multiple_of=64)  # rounded up: 128
    assert hf.config.vocab_size == hf.model.config.vocab_size == 128
    hf.resize_token_embeddings(50, mean_resizing=False)  # shrinking keeps the first ids
    with torch.no_grad():
        assert hf(x.clamp(max=49)).logits.shape == (2, 150, 50)
    assert hf.resize_token_embeddings() is hf.get_input_embeddings()  # nothing asked: nothing changes
    assert hf.config.vocab_size == 50


# ---- forward ----
def test_loss_and_logits_equal_drt():
    hf = hf_model()
    x = torch.randint(0, V, (2, 140))
    labels = x.clone()
    labels[:, :7] = -100
    ref = hf.model(x, labels=labels)
    out = hf(input_ids=x, labels=labels, attention_mask=torch.ones_like(x))
    assert out.past_key_values is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    loss, logits = hf(input_ids=x, labels=labels, return_dict=False)
    assert logits.shape == (2, 140, V)
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=0)
    out.loss.backward()  # trainable through the HF wrapper
    assert hf.model.embed.weight.grad is not None


def test_streaming_forward_through_cache():
    hf = hf_model(torch.float64)
    x = torch.randint(0, V, (2, 2 * P + 10))
    ref = hf(x).logits
    out = hf(x[:, :70], use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DRTHFCache) and cache.get_seq_length() == 70
    rest = hf(x[:, 70:], past_key_values=cache)
    assert rest.past_key_values is cache and cache.get_seq_length() == x.shape[1]
    torch.testing.assert_close(torch.cat([out.logits, rest.logits], 1), ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="labels"):
        hf(x[:, :3], labels=x[:, :3], past_key_values=cache)


# ---- generate ----
def test_greedy_generate_equals_drt_generate_and_forward_chain():
    torch.manual_seed(0)
    hf = hf_model(torch.float64)
    # 176 prompt tokens: the 13th new token closes chunk 2 (tokens 126..188), so a landmark is
    # inserted, encoded and retrieved from in the middle of generation
    prompt = torch.randint(0, V, (2, 2 * P + 50))
    out = hf.generate(prompt, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    seq = out.sequences
    assert seq.shape == (2, prompt.shape[1] + 20)
    cache = out.past_key_values
    assert isinstance(cache, DRTHFCache)  # the streaming cache was used, one token per step
    assert cache.get_seq_length() == seq.shape[1] - 1
    torch.testing.assert_close(seq, hf.model.generate(prompt, max_new_tokens=20), rtol=0, atol=0)
    torch.testing.assert_close(seq, greedy_chain(hf.model, prompt, 20), rtol=0, atol=0)
    # without a cache every step recomputes the full forward: same tokens
    no_cache = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    torch.testing.assert_close(no_cache, seq, rtol=0, atol=0)
    # a cache made by the user (e.g. with offload=True) is accepted and filled
    # under either name, with no deprecation warning from the installed transformers
    for name in ("cache", "past_key_values"):
        mine = hf.new_cache(2, offload=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            seq2 = hf.generate(prompt, max_new_tokens=20, do_sample=False, **{name: mine})
        torch.testing.assert_close(seq2, seq, rtol=0, atol=0)
        assert mine.get_seq_length() == seq.shape[1] - 1
    with pytest.raises(ValueError, match="twice"):
        hf.generate(prompt, max_new_tokens=2, cache=hf.new_cache(2), past_key_values=hf.new_cache(2))


def test_generate_in_training_mode_runs_in_eval_and_restores_the_mode():
    """A model left in train() generated Gumbel-noised, cache-dependent text; generate() now runs in eval
    mode, as gca.DRT.generate does, and gives the mode back."""
    torch.manual_seed(1)
    hf = hf_model(torch.float64, retrieval_distractors=1)
    prompt = torch.randint(0, V, (1, 2 * P + 50))
    hf.eval()
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    hf.train()
    for use_cache in (True, False):
        torch.manual_seed(2 + use_cache)  # another noise draw each time, were it used
        got = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert hf.training and hf.model.training
    hf.eval()
    hf.generate(prompt, max_new_tokens=2, do_sample=False)
    assert not hf.training


def test_generate_prefill_computes_the_last_logit_only(monkeypatch):
    # generate() asks for logits_to_keep=1, which forward() did not take: the prefill made every prompt
    # token's logits (1M tokens x a 50K vocabulary: 200 GB) and ran the upper layers everywhere
    torch.manual_seed(0)
    hf = hf_model()
    shapes = []
    forward = DRT.forward

    def record(self, *a, **k):
        out = forward(self, *a, **k)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(DRT, "forward", record)
    prompt = torch.randint(0, V, (2, 600))
    cache = hf.new_cache(2, prefill_chunk=128)
    out = hf.generate(prompt, max_new_tokens=4, do_sample=False, cache=cache)
    assert shapes[0] == (2, 1, V) and cache.drt_cache.skipped_tokens > 0
    torch.testing.assert_close(out, hf.model.generate(prompt, max_new_tokens=4), rtol=0, atol=0)
    shapes.clear()
    no_cache = hf.generate(prompt, max_new_tokens=2, do_sample=False, use_cache=False)
    assert shapes == [(2, 1, V), (2, 1, V)] and torch.equal(no_cache, out[:, :602])
    with torch.no_grad():  # 0 means every logit, as in transformers
        assert hf(prompt[:, :10], logits_to_keep=0).logits.shape == (2, 10, V)
        assert hf(prompt[:, :10], logits_to_keep=3).logits.shape == (2, 3, V)


def test_one_token_steps_through_the_graph_decoder_give_the_same_tokens():
    # cuda_graph=True on a CPU: the GraphDecoder's static step without a graph (on CUDA the same step is replayed)
    torch.manual_seed(0)
    hf = hf_model(torch.float64)
    prompt = torch.randint(0, V, (2, 2 * P + 50))
    hf.cuda_graph = False
    plain = hf.generate(prompt, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    hf.cuda_graph = True
    out = hf.generate(prompt, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    torch.testing.assert_close(out.sequences, plain.sequences, rtol=0, atol=0)
    dec = out.past_key_values.decoder
    assert dec is not None and dec.replays > 0 and dec.eager_steps == 1  # one new token closed a chunk
    assert plain.past_key_values.decoder is None
    # an id past the vocabulary is refused before the decoder (which checks only CPU ids, to spare CUDA a sync)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 97\)"):
        hf(input_ids=torch.tensor([[V], [0]]), past_key_values=out.past_key_values)


def test_sampling_with_seed():
    hf = hf_model()
    prompt = torch.randint(0, V, (2, 150))
    kw = dict(max_new_tokens=20, do_sample=True, top_k=10, top_p=0.9, temperature=0.8)
    torch.manual_seed(123)
    a = hf.generate(prompt, **kw)
    torch.manual_seed(123)
    b = hf.generate(prompt, **kw)
    assert a.shape == (2, 170)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :150], prompt)
    assert int(a.min()) >= 0 and int(a.max()) < V


def test_padding_attention_mask_rejected():
    hf = hf_model()
    x = torch.randint(0, V, (2, 30))
    mask = torch.ones_like(x)
    hf(x, attention_mask=mask)  # all ones is fine
    mask[0, :5] = 0  # left padding
    with pytest.raises(ValueError, match="padding"):
        hf(x, attention_mask=mask)
    with pytest.raises(ValueError, match="padding"):
        hf.generate(x, attention_mask=mask, max_new_tokens=3)
    # a mask generate() inferred from pad ids in the prompt: the error says how to pass ones
    x[0, 3] = 0
    with pytest.raises(ValueError, match=r"ones_like\(input_ids\)"):
        hf.generate(x, max_new_tokens=3, pad_token_id=0, eos_token_id=1)
    assert hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, pad_token_id=0, eos_token_id=1).shape[1] <= 33


def test_attention_mask_of_another_shape_and_1d_prompts_rejected():
    # was: a mask of another batch or length was taken silently (a ones mask meant for another input),
    # and generate() on a 1-D prompt ended in an IndexError inside transformers
    torch.manual_seed(0)
    hf = hf_model()
    x = torch.randint(0, V, (2, 40))
    for bad in ((2, 10), (3, 40), (1, 40)):
        with pytest.raises(ValueError, match=r"attention_mask has shape"):
            hf(x, attention_mask=torch.ones(bad, dtype=torch.long))
    # with a cache the mask covers the new tokens, or the cached ones and the new (what generate() passes)
    out = hf(x[:, :30], use_cache=True, attention_mask=torch.ones(2, 30))
    cache = out.past_key_values
    with torch.no_grad():
        ref = hf(x).logits[:, 30:]
    a = hf(x[:, 30:35], past_key_values=cache, attention_mask=torch.ones(2, 35)).logits
    b = hf(x[:, 35:], past_key_values=cache, attention_mask=torch.ones(2, 5)).logits
    torch.testing.assert_close(torch.cat([a, b], 1), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(2, 1 or 41\)"):
        hf(x[:, :1], past_key_values=cache, attention_mask=torch.ones(2, 30))
    assert cache.get_seq_length() == 40  # refused before the cache moved
    full = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(full, hf.model.generate(x, max_new_tokens=3), rtol=0, atol=0)
    for kw in ({"inputs": x[0]}, {"input_ids": x[0]}):
        with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
            hf.generate(max_new_tokens=2, do_sample=False, **kw)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        hf.generate(x[0], max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("offload", [False, True], ids=["device-mem", "offload"])
def test_cache_continued_across_generate_and_plain_calls(offload):
    # a cache reused: generate, plain streaming calls, generate again (the graph decoder's static step,
    # eagerly on the CPU) gives what one native generate over the whole sequence gives
    torch.manual_seed(0)
    hf = hf_model(torch.float64)
    hf.cuda_graph = True
    x = torch.randint(0, V, (2, 150))
    cache = hf.new_cache(2, offload=offload)
    a = hf.generate(x, max_new_tokens=20, do_sample=False, cache=cache)
    seq = torch.cat([a, torch.randint(0, V, (2, 30))], 1)
    with torch.no_grad():
        hf(seq[:, cache.get_seq_length() : -1], past_key_values=cache)
    b = hf.generate(seq, max_new_tokens=70, do_sample=False, cache=cache)
    torch.testing.assert_close(b, hf.model.generate(seq, max_new_tokens=70), rtol=0, atol=0)
    assert cache.decoder.replays > 0 and cache.get_seq_length() == b.shape[1] - 1
    # a cache that has seen every token of input_ids: was "consumed 200 tokens but input_ids has only 200"
    with torch.no_grad():
        hf(b[:, -1:], past_key_values=cache)
    with pytest.raises(ValueError, match="at least one token the cache has not seen"):
        hf.generate(b, max_new_tokens=2, do_sample=False, cache=cache)


def test_beam_search_rejected():
    hf = hf_model()
    with pytest.raises((ValueError, NotImplementedError)):
        hf.generate(torch.randint(0, V, (1, 20)), max_new_tokens=3, num_beams=2)


# ---- packaging ----
def test_import_guard_and_core_does_not_import_transformers():
    code = textwrap.dedent(
        """
        import importlib, sys
        import gca, gca.model, gca.config, gca.inference.cache
        assert "transformers" not in sys.modules, "the core package imported transformers"
        import gca.hf
        gca.hf.register(); importlib.reload(gca.hf)  # registering again is fine
        for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
            del sys.modules[name]
        del sys.modules["gca.hf"]
        sys.modules["transformers"] = None  # as if not installed
        try:
            import gca.hf
        except ImportError as e:
            assert "pip install -e '.[hf]'" in str(e), str(e)
        else:
            raise AssertionError("no ImportError without transformers")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr



def test_readme_generate_logs_no_deprecation():
    """The README's hf.generate example (no cache given, then a cache given) logs nothing: transformers 5.24
    warned that `past_key_values` is deprecated though nothing in the call was the user's to change (our
    outputs and generation inputs used that name). In a fresh process: the warning is logged once."""
    code = textwrap.dedent(
        """
        import torch, gca, gca.hf
        from transformers.utils import logging
        logging.set_verbosity_warning()
        hf = gca.hf.from_drt(gca.DRT(gca.DRTConfig.from_preset("tiny")).eval())
        out = hf.generate(torch.randint(0, 2048, (1, 70)), max_new_tokens=3, do_sample=False)
        out = hf.generate(torch.randint(0, 2048, (1, 70)), max_new_tokens=3, cache=hf.new_cache(1))
        print("ok", tuple(out.shape))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok (1, 73)", r.stderr
    assert "deprecated" not in r.stderr, r.stderr

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_replays_a_graph_and_matches_plain_calls():
    torch.manual_seed(0)
    hf = hf_model().cuda()
    prompt = torch.randint(0, V, (2, 2 * P + 50), device="cuda")
    hf.cuda_graph = False
    plain = hf.generate(prompt, max_new_tokens=40, do_sample=False)
    hf.cuda_graph = None  # the default: graphs on CUDA
    out = hf.generate(prompt, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.past_key_values.decoder._graph is not None
