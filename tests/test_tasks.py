"""Synthetic tasks: needles, answers, chunk alignment, determinism, rank disjointness, label masks."""

import numpy as np
import pytest
import torch

from gca.data import TaskSource, aligned_prompt_len, build_source, load_tokenizer, make_task_sample
from gca.data.tasks import KINDS

P = 63


def count(seq, pat):
    seq, pat = list(seq), list(pat)
    return sum(seq[i:i + len(pat)] == pat for i in range(len(seq) - len(pat) + 1))


def check_sample(s, P=P, aligned=True):
    ids = s.input_ids
    assert len(ids) == s.prompt_len + len(s.answer) and ids[s.prompt_len:] == s.answer
    prompt = ids[:s.prompt_len]
    # the value asked for is in the prompt exactly once, inside the target needle (2hop: the Y -> Z
    # needle; the chain's answer "Y , Z" names Y, which ends the X -> Y needle and opens Y -> Z)
    tgt = s.needle_spans[1] if s.kind == "2hop" else s.needle_spans[0]
    value = s.answer[-5:]
    assert count(prompt, value) == 1 and count(ids[tgt[0]:tgt[1]], value) == 1
    if s.first_hop_len:
        y = s.answer[: s.first_hop_len]
        x_y = ids[s.needle_spans[0][0]:s.needle_spans[0][1]]
        assert count(x_y, y) == 1 and count(ids[tgt[0]:tgt[1]], y) == 1
    else:
        assert s.answer == value
    for (a, b) in s.needle_spans:
        assert count(prompt, ids[a:b]) == 1  # each needle appears exactly once
        assert a // P == (b - 1) // P  # never split across a chunk boundary
    spans = sorted(s.needle_spans)
    assert all(e <= s2 for (_, e), (s2, _) in zip(spans, spans[1:]))  # no overlaps
    n_t = 2 if s.kind == "2hop" else 1
    assert s.target_chunks == [s.needle_spans[i][0] // P for i in range(n_t)]
    if aligned:
        assert s.prompt_len % P == 1
        assert s.query_chunk == s.prompt_len // P - 1
        assert s.answer_chunk == s.query_chunk + 1
        # every answer token is predicted from a position of the chunk after the query chunk
        for t in range(s.prompt_len - 1, s.prompt_len + len(s.answer) - 1):
            assert t // P == s.query_chunk + 1
        # the needles sit in chunks that the query chunk's landmark may retrieve (j < query_chunk)
        assert all(c < s.query_chunk for c in s.target_chunks)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ctx", [189, 500, 2048])
def test_task_structure(kind, ctx):
    for seed in range(5):
        s = make_task_sample(kind, context_len=ctx, seed=seed)
        assert s.kind == kind
        assert s.prompt_len == aligned_prompt_len(ctx) <= ctx
        check_sample(s)


def test_passkey_text():
    tok = load_tokenizer("embedded")
    s = make_task_sample("passkey", context_len=1000, seed=0, depth=0.5)
    a, b = s.needle_spans[0]
    assert tok.decode(s.input_ids[a:b]) == " |The passkey is:" + tok.decode(s.answer) + "|"
    assert tok.decode(s.prompt).endswith("|What is the passkey? The passkey is")
    assert len(s.answer) == 5 and all(len(tok.decode([t]).strip()) == 1 for t in s.answer)
    # the question's last token opens the answer chunk
    assert tok.decode(s.input_ids[s.prompt_len - 1:s.prompt_len]) == " is"


def test_depth_sweep():
    ctx = 63 * 20 + 1
    chunks = [make_task_sample("passkey", context_len=ctx, seed=0, depth=d).target_chunk for d in np.linspace(0, 1, 11)]
    assert chunks[0] == 0 and chunks == sorted(chunks) and chunks[-1] == make_task_sample(
        "passkey", context_len=ctx, seed=0).query_chunk - 1


def test_unaligned_and_other_chunk_size():
    s = make_task_sample("passkey", context_len=1000, seed=3, align_question=False)
    assert s.prompt_len == 1000 and not s.aligned
    check_sample(s, aligned=False)
    s = make_task_sample("multikey", context_len=600, seed=1, text_per_chunk=31, n_keys=3)
    assert s.prompt_len % 31 == 1
    check_sample(s, P=31)


def test_determinism():
    for kind in KINDS:
        a = make_task_sample(kind, context_len=700, seed=11)
        b = make_task_sample(kind, context_len=700, seed=11)
        c = make_task_sample(kind, context_len=700, seed=12)
        assert a == b and a.input_ids != c.input_ids


def test_source_warns_when_distractors_do_not_fit():
    # 189 tokens leave one chunk before the question: one 2hop chain of the two asked for
    with pytest.warns(UserWarning, match=r"2hop samples of 189 tokens hold only 1-1 of the 2 chains"):
        TaskSource("2hop", seq_len=189)
    s, _ = TaskSource("2hop", seq_len=189).sample_task(0)
    assert s.distractor_answers == []
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = TaskSource("2hop", seq_len=504)  # 7 chunks: both chains fit
    assert len(src.sample_task(0)[0].distractor_answers) == 1


def test_too_short():
    with pytest.raises(ValueError):
        make_task_sample("passkey", context_len=60)
    with pytest.raises(ValueError, match="too short"):
        TaskSource("passkey", seq_len=100)


@pytest.mark.parametrize("kind, kw", [("passkey", {}), ("2hop", {"hop_lead": 1})])
def test_too_short_names_the_length_that_works(kind, kw):
    """The error's "use at least N" works, and N - 1 does not (2hop with a lead was told 127, which
    also failed: its question is longer than a chunk)."""
    with pytest.raises(ValueError, match="use at least") as e:
        make_task_sample(kind, context_len=64, seed=0, **kw)
    need = int(str(e.value).split()[-1])
    assert make_task_sample(kind, context_len=need, seed=0, **kw).prompt_len == need
    with pytest.raises(ValueError, match=f"use at least {need}"):
        make_task_sample(kind, context_len=need - 1, seed=0, **kw)


@pytest.mark.parametrize("kind, kw, says", [
    ("multikey", {"n_keys": 11, "value_len": 1}, "11 distinct values of value_len=1 digits are asked for, and only 10"),
    ("2hop", {"n_chains": 11, "value_len": 1}, "fewer chains"),
    ("multikey", {"key_len": 0}, "key_len must be a positive integer"),
    ("passkey", {"value_len": 0}, "value_len must be a positive integer"),
    ("passkey", {"text_per_chunk": 0}, "text_per_chunk must be a positive integer"),
], ids=["11-one-digit-keys", "11-one-digit-chains", "empty-keys", "empty-value", "no-chunk"])
def test_keys_and_values_that_cannot_be_distinct_are_refused(kind, kw, says):
    # every key and value is drawn distinct: asking for more than exist drew forever (empty keys too),
    # an empty value ended in "could not build ... without accidental repeats", P = 0 in ZeroDivisionError
    import signal

    def hung(*_):
        raise TimeoutError("make_task_sample did not return")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match=says):
            make_task_sample(kind, context_len=2000, seed=0, **kw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    s = make_task_sample("multikey", context_len=4000, seed=int(np.random.default_rng(torch.initial_seed()).integers(1 << 30)), n_keys=10,
                         value_len=1)  # all ten one-digit values: still drawn
    assert len({a[0] for a in s.distractor_answers + [s.answer]}) == 10


@pytest.mark.parametrize("depth", [-0.1, 1.5])
def test_depth_outside_zero_one_is_refused(depth):
    # -0.1 failed in numpy's broadcasting and 1.5 was accepted silently
    with pytest.raises(ValueError, match=r"depth is a relative position in \[0, 1\]"):
        make_task_sample("passkey", context_len=500, seed=0, depth=depth)
    for d in (0.0, 1.0):
        make_task_sample("passkey", context_len=500, seed=0, depth=d)


def test_stream_filler(tmp_path):
    from gca.data import prepare

    text = "Some ordinary English text about chunks, numbers 3 and 7, and retrieval. " * 200
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text.upper())
    prepare([str(tmp_path)], tmp_path / "ds", tokenizer="embedded", val_fraction=0.5, progress=False)
    s = make_task_sample("passkey", context_len=800, seed=0, filler=str(tmp_path / "ds"))
    check_sample(s)
    src = build_source(f"synthetic:multikey;filler={tmp_path / 'ds'}", seq_len=400, split="val")
    assert src.get_batch(0, 2)["input_ids"].shape == (2, 400)
    # digit runs over corpus filler (training): about the asked fraction, in runs, same window otherwise
    from gca.data.tasks import digit_ids, make_filler

    digits = list(digit_ids("embedded"))
    plain, dig = make_filler(str(tmp_path / "ds")), make_filler(str(tmp_path / "ds"), digit_frac=0.1)
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 30))
    x0, x1 = plain.tokens(4000, np.random.default_rng(seed)), dig.tokens(4000, np.random.default_rng(seed))
    base_digits = np.isin(x0, digits).mean()  # the text's own "3" and "7"
    changed = x0 != x1
    assert 0.05 < changed.mean() < 0.15 and np.isin(x1[changed], digits).all()
    assert np.isin(x1, digits).mean() > base_digits + 0.05
    s = build_source(f"synthetic:passkey;filler={tmp_path / 'ds'};repeat=1.0;repeat_gap=150;digits=0.1;"
                     "loss=answer_repeats", seq_len=800, seed=seed)
    assert "digits 0.1" in s.filler.describe()
    for gid in range(4):
        check_sample(s.sample_task(gid)[0])


def test_a_packed_dataset_is_a_filler(tmp_path):
    # a PackedDataset (a documented filler) has a `tokens` array, which was taken for a filler's
    # tokens(n, rng) method: every sample failed with "'memmap' object is not callable"
    from gca import DRT, DRTConfig
    from gca.data import PackedDataset, prepare
    from gca.data.tasks import StreamFiller
    from gca.eval.tasks import evaluate_tasks

    rng = np.random.default_rng(torch.initial_seed())
    words = [f"w{i}" for i in range(40)]
    for d in range(4):
        (tmp_path / f"d{d}.txt").write_text(" ".join(rng.choice(words, 600)))
    prepare([str(tmp_path)], tmp_path / "ds", tokenizer="embedded", val_fraction=0.5, progress=False)
    ds = PackedDataset(tmp_path / "ds", "val")
    seed = int(rng.integers(1 << 30))
    for kind in KINDS:
        s = make_task_sample(kind, context_len=600, seed=seed, filler=ds)
        check_sample(s)
        assert s == make_task_sample(kind, context_len=600, seed=seed, filler=StreamFiller(ds))
    src = TaskSource("mix", seq_len=400, filler=ds, seed=seed)
    assert src.get_batch(0, 2)["input_ids"].shape == (2, 400)
    model = DRT(DRTConfig.from_preset("tiny", hidden_size=32, num_heads=2, intermediate_size=64))
    rows = evaluate_tasks(model, ["passkey"], [300], depths=1, trials=2, filler=ds, seed=seed, progress=False)
    assert rows[0]["trials"] == 2


# ---------------------------------------------------------------- TaskSource batches
def test_batches_deterministic_and_rank_disjoint():
    src = TaskSource("mix", seq_len=504, min_len=189, seed=3)
    b1, b2 = src.get_batch(5, 4), TaskSource("mix", seq_len=504, min_len=189, seed=3).get_batch(5, 4)
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["labels"], b2["labels"])
    r0, r1 = (src.get_batch(5, 2, rank=r, world_size=2) for r in range(2))
    assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), b1["input_ids"])
    rows = {tuple(x.tolist()) for r in (r0, r1) for x in r["input_ids"]}
    assert len(rows) == 4
    other = TaskSource("mix", seq_len=504, min_len=189, seed=4).get_batch(5, 4)
    assert not torch.equal(other["input_ids"], b1["input_ids"])
    val = TaskSource("mix", seq_len=504, min_len=189, seed=3, split="val").get_batch(5, 4)
    assert not torch.equal(val["input_ids"], b1["input_ids"])


def test_labels_answer_only():
    src = TaskSource("passkey", seq_len=504, seed=0)
    for gid in range(6):
        s, T = src.sample_task(gid)
        ids, labels = src.sample(gid)
        assert T == 504 and (ids[:len(s.input_ids)] == s.input_ids).all()
        keep = labels != -100
        assert keep.sum() == 5 and (labels[keep] == s.answer).all()
        assert np.flatnonzero(keep).tolist() == list(range(s.prompt_len, s.prompt_len + 5))
        check_sample(s)


def test_variable_length_padding():
    src = TaskSource("passkey", seq_len=504, min_len=189, seed=0, loss_on="all")
    lengths = set()
    for gid in range(40):
        s, T = src.sample_task(gid)
        ids, labels = src.sample(gid)
        lengths.add(T)
        assert T % P == 0 and 189 <= T <= 504
        assert (labels[T:] == -100).all() and (ids[T:] == src.pad_id).all()
        assert (labels[:T] == ids[:T]).all()
        assert s.prompt_len + 5 <= T and s.prompt_len % P == 1
    assert lengths == {189, 252, 315, 378, 441, 504}


def test_repeats_labels():
    src = TaskSource("passkey", seq_len=504, seed=0, repeat_prob=1.0, loss_on="answer_repeats")
    s, _ = src.sample_task(0)
    ids, labels = src.sample(0)
    rep = np.asarray(s.repeat_mask)
    assert rep.sum() > 20
    n = len(s.input_ids)
    assert ((labels[:n] != -100) == (rep | (np.arange(n) >= s.prompt_len))).all()
    # every masked token continues a copy of an earlier piece: its predecessor context appears earlier
    for t in np.flatnonzero(rep)[:10]:
        assert count(ids[:t - 1].tolist(), ids[t - 1:t + 1].tolist()) >= 1
    check_sample(s)


def test_tokenizer_override_gpt2_like(tmp_path):
    from gca.data import train_bpe

    vocab = [a + b + c for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in "aeiou" for c in "lmnrst"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(vocab, 200)) + " " + " ".join(str(d) for d in rng.integers(0, 10, 50)) + "."
            for _ in range(100)]
    tok = train_bpe(docs, vocab_size=800, show_progress=False)
    src = build_source("synthetic:2hop", seq_len=400, tokenizer=tok)
    assert src.vocab_size == tok.vocab_size
    s, _ = src.sample_task(0)
    check_sample(s)


def test_batch_feeds_tiny_model():
    from gca import DRT, DRTConfig

    cfg = DRTConfig.from_preset("tiny")
    src = build_source("synthetic:mix;min_len=189", seq_len=252, seed=0)
    assert src.vocab_size <= cfg.vocab_size
    torch.manual_seed(0)
    model = DRT(cfg).eval()
    b = src.get_batch(0, 2)
    with torch.no_grad():
        out = model(b["input_ids"], labels=b["labels"], output_retrieval=True)
    assert torch.isfinite(out.loss)
    s, _ = src.sample_task(0)
    idx = out.retrieval[0].indices  # (B, C, K): row q = retrieval made at landmark q
    assert idx.shape[1] > s.query_chunk >= 1
    assert (idx[0, s.query_chunk] < s.query_chunk).all()  # the target chunk is a legal pick


def test_repeats_come_from_beyond_the_gap():
    import numpy as np

    from gca.data.tasks import _with_repeats

    base = np.arange(600)  # every token distinct: a copy reveals its source
    x, mask = _with_repeats(base, np.random.default_rng(torch.initial_seed()), frac=0.4, min_dist=130)
    copied = np.nonzero(x != base)[0]
    assert len(copied) > 50
    assert ((copied - x[copied]) >= 130).all()
    assert mask[copied].mean() > 0.8  # all but each piece's first token carry the loss


def test_digit_repeat_makes_runs_of_equal_digits():
    """digit_repeat = q: each digit after a run's first equals the one before it with probability q
    (plus 1/10 by chance), so runs of three equal digits go from ~2% of runs to common; q = 0 keeps the
    old random stream exactly; bad values and digit_repeat without digits are refused."""
    from gca.data.tasks import WordFiller, _digit_runs, digit_ids

    digits = np.asarray(digit_ids("embedded"))
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 30))
    base = WordFiller().tokens(20000, np.random.default_rng(seed))

    def equal_next(q, frac=0.2):
        out = _digit_runs(base.copy(), digits, frac, np.random.default_rng(seed), repeat=q)
        is_d = np.isin(out, digits)
        pairs = is_d[:-1] & is_d[1:]  # neighbours inside a run (two runs may touch: a little noise)
        return (out[:-1][pairs] == out[1:][pairs]).mean()

    assert 0.06 < equal_next(0.0) < 0.14
    assert 0.45 < equal_next(0.5) < 0.6  # 0.55 inside runs; overlapping runs pull it a little lower
    # repeat = 0 is the stream it always was: the same calls on the generator as before the option
    rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
    a = _digit_runs(base.copy(), digits, 0.1, rng_a)
    n = len(base)
    runs = rng_b.binomial(n, 0.1 / 4.0)
    b = base.copy()
    for start, ln in zip(rng_b.integers(0, n - 6, size=runs), rng_b.integers(2, 7, size=runs)):
        b[start:start + ln] = digits[rng_b.integers(0, 10, size=ln)]
    assert np.array_equal(a, b)
    src = build_source("synthetic:passkey;min_len=189;digits=0.1;digit_repeat=0.5", seq_len=504, seed=seed)
    assert src.filler.digit_repeat == 0.5 and "repeat 0.5" in src.filler.describe()
    with pytest.raises(ValueError, match="digit_repeat"):
        WordFiller(digit_frac=0.1, digit_repeat=1.0)
    with pytest.raises(ValueError, match="digits"):
        build_source("synthetic:passkey;digit_repeat=0.3", seq_len=504, seed=0)


def test_digit_runs_in_filler_only_when_asked():
    from gca.data.tasks import WordFiller, digit_ids

    tok = load_tokenizer("embedded")
    digits = set(digit_ids(tok))
    plain = WordFiller().tokens(5000, np.random.default_rng(torch.initial_seed()))
    assert not digits & set(plain.tolist())  # evaluation filler: never a digit
    x = WordFiller(digit_frac=0.1).tokens(5000, np.random.default_rng(torch.initial_seed()))
    is_digit = np.isin(x, list(digits))
    assert 0.05 < is_digit.mean() < 0.15
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], is_digit.astype(int), [0]]))))[::2]
    assert runs.min() >= 2  # digits come in runs (two runs may touch)
    with pytest.raises(ValueError, match="digit_frac"):
        WordFiller(digit_frac=1.5)
    # through the spec grammar; the answer still occurs exactly once in each prompt
    src = build_source("synthetic:passkey;min_len=189;loss=answer_repeats;repeat=1.0;digits=0.1", seq_len=504,
                       seed=int(np.random.default_rng(torch.initial_seed()).integers(1 << 30)))
    assert src.filler.digit_frac == 0.1
    for gid in range(6):
        s, _ = src.sample_task(gid)
        check_sample(s)
    from gca.data.tasks import make_filler

    with pytest.raises(ValueError, match="custom filler"):
        make_filler(WordFiller(), digit_frac=0.1)


@pytest.mark.parametrize("lead", [0, 1, 2])
def test_2hop_lead_puts_the_question_key_whole_chunks_before_the_answer(lead):
    from gca.data.tasks import _enc

    tok = load_tokenizer("embedded")
    opening = list(_enc(tok, " |Where does the path from"))
    for seed in range(5):
        s = make_task_sample("2hop", context_len=1500, seed=seed, hop_lead=lead)
        q0 = s.prompt_len - s.question_len
        assert s.input_ids[q0 : q0 + len(opening)] == opening
        x_end = q0 + len(opening) + 2  # key_len 2: the question's first X ends here
        x_chunk = (x_end - 1) // s.text_per_chunk
        # retrieval for the answer's chunk is made at query_chunk's landmark; lead chunks before it
        assert x_chunk == s.query_chunk if lead == 0 else x_chunk <= s.query_chunk - lead
        assert s.answer not in s.distractor_answers and len(s.distractor_answers) == 1
    # other kinds ignore it; the data spec takes it as lead=N
    assert make_task_sample("passkey", context_len=600, seed=0, hop_lead=2).prompt == \
        make_task_sample("passkey", context_len=600, seed=0).prompt
    src = build_source("synthetic:2hop;lead=1", seq_len=1008, seed=0)
    assert src.task_kwargs["hop_lead"] == 1


def test_2hop_asks_for_the_chain_by_default():
    """Multi-hop asks for the chain, as the published task does (its answer is "Y , Z")."""
    tok = load_tokenizer("embedded")
    for seed in range(4):
        s = make_task_sample("2hop", context_len=800, seed=seed)
        check_sample(s)
        (a0, b0), (a1, b1) = s.needle_spans[:2]
        x_y, y_z = tok.decode(s.input_ids[a0:b0]), tok.decode(s.input_ids[a1:b1])
        y, z = tok.decode(s.answer[:2]), tok.decode(s.answer[-5:])
        assert x_y.startswith(" |The path from") and x_y.endswith(" leads to" + y + "|")
        assert y_z == " |The path from" + y + " leads to" + z + "|"
        assert tok.decode(s.answer) == y + "," + z and s.first_hop_len == 2
        x = x_y[len(" |The path from"):-len(" leads to" + y + "|")]
        assert tok.decode(s.prompt).endswith("|Where does the path from" + x + " lead? It leads to")
        # the distractor is the other chain, answered the same way
        (d,) = s.distractor_answers
        assert len(d) == len(s.answer) and d != s.answer and tok.decode(d[2:3]) == ","


def test_2hop_end_point_form_is_the_earlier_task():
    tok = load_tokenizer("embedded")
    s = make_task_sample("2hop", context_len=800, seed=0, hop_answer="end")
    check_sample(s)
    assert len(s.answer) == 5 and s.first_hop_len == 0
    assert tok.decode(s.prompt).endswith(" lead after two steps? It leads to")
    a1, b1 = s.needle_spans[1]
    assert tok.decode(s.input_ids[a1:b1]).endswith(tok.decode(s.answer) + "|")
    assert all(len(d) == 5 for d in s.distractor_answers)
    with pytest.raises(ValueError, match="hop_answer"):
        make_task_sample("2hop", context_len=800, seed=0, hop_answer="both")


@pytest.mark.parametrize("hop", ["chain", "end"])
def test_task_source_fits_the_longer_chain_answer(hop):
    from gca.data.tasks import answer_length

    src = build_source(f"synthetic:2hop;hop={hop};min_len=300", seq_len=504, seed=1)
    n = answer_length(src.tokenizer, "2hop", hop_answer=hop)
    assert n == (8 if hop == "chain" else 5)
    for gid in range(12):
        s, T = src.sample_task(gid)
        assert len(s.answer) == n and len(s.input_ids) <= T <= 504
        check_sample(s)
        ids, labels = src.sample(gid)
        # labels only on the answer (loss=answer is the default), all of it
        assert (labels != -100).sum() == n
        assert labels[s.prompt_len:s.prompt_len + n].tolist() == s.answer


def test_edge_prob_starts_that_share_of_needles_at_the_first_token():
    """edge=p puts the first target needle at token 0 in about a share p of samples (with uniform depths
    about 1 in (L - needle) samples do), every sample still a valid task, the samples it leaves alone equal
    to those of edge=0 (its draw has a stream of its own), and bad values are refused."""
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 30))
    spec = "synthetic:passkey=0.4,multikey=0.3,2hop=0.3;min_len=189"
    plain = build_source(spec, seq_len=504, seed=seed)
    edge = build_source(spec + ";edge=0.3", seq_len=504, seed=seed)
    n, at0, same = 300, 0, 0
    for gid in range(n):
        a, ta = plain.sample_task(gid)
        b, tb = edge.sample_task(gid)
        check_sample(b)
        assert ta == tb and a.kind == b.kind
        if b.needle_spans[0][0] == 0:
            at0 += 1
            assert b.target_chunks[0] == 0
        else:
            same += a.input_ids == b.input_ids
            assert a.needle_spans == b.needle_spans
    assert 0.2 < at0 / n < 0.4  # binomial(300, 0.3): 0.2-0.4 is beyond 3.7 standard deviations
    assert same == n - at0
    # without edge about 1 sample in 250 starts with its needle (measured over 6000: 24), 1.2 expected in 300;
    # Poisson(1.2) reaches 10 with probability ~1e-6 (the bound was 3, passed at 3.4% odds of failing)
    assert sum(plain.sample_task(g)[0].needle_spans[0][0] == 0 for g in range(n)) <= 10
    assert edge.describe()["edge_prob"] == 0.3 and "edge_prob" not in plain.describe()
    for bad in ("edge=1.5", "edge=-0.1"):
        with pytest.raises(ValueError, match="edge_prob"):
            build_source(f"{spec};{bad}", seq_len=504, seed=0)
    with pytest.raises(ValueError, match="depth"):
        TaskSource("passkey", seq_len=504, edge_prob=0.1, depth=0.5)
