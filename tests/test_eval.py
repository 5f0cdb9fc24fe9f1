"""Evaluation: streamed perplexity equals the full-forward loss, needle scoring matches greedy
generation, and the ppl command works on a prepared dataset."""

import functools
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gca import DRT, DRTConfig
from gca.cli import main
from gca.eval.perplexity import stream_nll, stream_token_nll
from gca.eval.tasks import score_samples


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prepare_words(tmp_path, docs, words_per_doc, vocab, seed):
    """``tmp_path/data``: a prepared folder (embedded tokenizer, half held out) of ``docs`` documents of
    random words ``w0`` .. ``w<vocab - 1>``, from ``tmp_path/txt``."""
    from gca.data.prepare import prepare

    src = tmp_path / "txt"
    src.mkdir()
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    for d in range(docs):
        (src / f"doc{d:02d}.txt").write_text(" ".join(rng.choice(words, words_per_doc)))
    prepare(str(src), str(tmp_path / "data"), tokenizer="embedded", val_fraction=0.5)


def tiny(**kw):
    return DRTConfig.from_preset("tiny", **{**dict(hidden_size=32, num_heads=4, intermediate_size=64, window=80), **kw})


def test_streamed_nll_equals_full_forward_loss():
    m = DRT(tiny(vocab_size=97)).double().eval()
    x = torch.randint(0, 97, (2, 63 * 6 + 11))
    nll, n = stream_nll(m, x, piece=100)
    assert n == 2 * (x.shape[1] - 1)
    torch.testing.assert_close(torch.tensor(nll / n, dtype=torch.float64), m(x, labels=x).loss, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("last,piece", [(50, 100), (100, 100), (163, 100), (7, 64), (389, 128)])
def test_streamed_nll_of_the_last_tokens(last, piece):
    """Only the last ``last`` tokens scored: equals the full forward's per-token losses there, for
    scored regions that start inside a piece, on a piece boundary, and cover all but the first token."""
    m = DRT(tiny(vocab_size=97)).double().eval()
    x = torch.randint(0, 97, (2, 63 * 6 + 11))
    N = x.shape[1]
    nll, n = stream_nll(m, x, piece=piece, last=last)
    per_token = torch.nn.functional.cross_entropy(m(x).logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    k = min(last, N - 1)
    assert n == 2 * k
    torch.testing.assert_close(torch.tensor(nll, dtype=torch.float64), per_token[:, -k:].sum(), rtol=1e-9, atol=1e-9)
    tokens = stream_token_nll(m, x, piece=piece, last=last)  # the same losses, token by token
    torch.testing.assert_close(tokens, per_token[:, -k:], rtol=1e-9, atol=1e-9)


def test_fixed_target_perplexity_scores_the_same_text_at_every_length(tmp_path, monkeypatch):
    from gca.eval import perplexity

    _prepare_words(tmp_path, docs=6, words_per_doc=900, vocab=50, seed=0)
    seen = {}
    real = perplexity.stream_nll

    def spy(model, ids, **kw):
        seen[ids.shape[1]] = (ids.clone(), kw["last"])
        return real(model, ids, **kw)

    monkeypatch.setattr(perplexity, "stream_nll", spy)
    m = DRT(tiny()).eval()
    partial = []
    rows = perplexity.perplexity_vs_length(m, str(tmp_path / "data"), [120, 300, 700], windows=3, targets=100,
                                           progress=False, on_row=lambda rs: partial.append([dict(r) for r in rs]))
    assert [r["tokens"] for r in rows] == [300, 300, 300] and all(r["targets"] == 100 for r in rows)
    # on_row sees the rows so far after each length
    assert [len(p) for p in partial] == [1, 2, 3] and partial[0] == rows[:1] and partial[-1] == rows
    tails = [seen[N][0][:, -100:] for N in (120, 300, 700)]
    assert all(torch.equal(tails[0], t) for t in tails[1:]) and all(seen[N][1] == 100 for N in seen)
    # the context before the targets is the text that precedes them
    assert torch.equal(seen[700][0][:, -300:], seen[300][0])
    with pytest.raises(ValueError, match="targets"):
        perplexity.perplexity_vs_length(m, str(tmp_path / "data"), [120, 300], targets=200, progress=False)
    for args, kw, says in [([120, 1], {}, "lengths"), ([], {}, "lengths"), ([120], {"windows": 0}, "windows"),
                           ([120], {"piece": 0}, "piece")]:
        with pytest.raises(ValueError, match=says):
            perplexity.perplexity_vs_length(m, str(tmp_path / "data"), args, progress=False, **kw)


def test_needle_score_is_greedy_exact_match():
    from gca.data.tasks import make_task_sample

    torch.manual_seed(0)
    m = DRT(tiny()).eval()
    samples = [make_task_sample("passkey", context_len=300, seed=i) for i in range(3)]
    # make the model's greedy answer right for sample 0 by construction: score against its own output
    s = samples[0]
    gen = m.generate(torch.tensor([s.prompt]), max_new_tokens=len(s.answer))[0, s.prompt_len:].tolist()
    own = type(s)(**{**s.__dict__, "answer": gen, "input_ids": s.prompt + gen})
    correct, hits, distracted = score_samples(m, [own, samples[1], samples[2]])
    assert correct[0] is True
    for c, smp in zip(correct[1:], samples[1:]):
        greedy = m.generate(torch.tensor([smp.prompt]), max_new_tokens=len(smp.answer))[0, smp.prompt_len:].tolist()
        assert c == (greedy == smp.answer)
    assert all(isinstance(h, bool) for h in hits)
    assert distracted == [False] * 3  # passkey samples have no distractors


@pytest.mark.parametrize("length, aligned", [(63 * 8, True), (63 * 8, False), (63 * 8 + 10, False)])
def test_retrieval_hit_reads_the_row_that_serves_the_answer(length, aligned):
    """retrieval_hit: the needle's chunk is in the row made at landmark query_chunk, as one forward pass
    retrieves it. An unaligned prompt whose last token closes a chunk was scored on the row made at that
    token's landmark (one chunk later)."""
    from gca.data.tasks import make_task_sample

    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 30))
    torch.manual_seed(seed)
    m = DRT(tiny(vocab_size=2048, window=128, top_k=1, upper_groups=[1, 1])).double().eval()
    rng = np.random.default_rng(seed)
    samples = [make_task_sample("passkey", context_len=length, seed=rng, align_question=aligned) for _ in range(8)]
    correct, hits, _ = score_samples(m, samples)
    x = torch.tensor([s.prompt for s in samples])
    retrieval = m(x, output_retrieval=True).retrieval
    q = samples[0].query_chunk
    assert hits == [any(bool((r.indices[b, q] == s.target_chunk).any()) for r in retrieval) for b, s in enumerate(samples)]
    greedy = m.generate(x, max_new_tokens=5)[:, x.shape[1]:].tolist()
    assert correct == [g == s.answer for g, s in zip(greedy, samples)]


def test_score_samples_refuses_samples_of_different_lengths():
    from gca.data.tasks import make_task_sample

    m = DRT(tiny()).eval()
    a, b = make_task_sample("passkey", context_len=300, seed=1), make_task_sample("passkey", context_len=400, seed=2)
    with pytest.raises(ValueError, match=r"share prompt and answer lengths; got \(prompt, answer\) lengths \[\("):
        score_samples(m, [a, b])  # a bare numpy shape error from np.stack before
    short = type(a)(**{**a.__dict__, "answer": a.answer[:-1], "input_ids": a.prompt + a.answer[:-1]})
    with pytest.raises(ValueError, match="group them by length"):
        score_samples(m, [a, short])


def test_score_samples_counts_a_distractor_answer():
    from gca.data.tasks import make_task_sample

    torch.manual_seed(0)
    m = DRT(tiny()).eval()
    s = make_task_sample("2hop", context_len=400, seed=3)
    assert len(s.distractor_answers) == 1 and len(s.distractor_answers[0]) == len(s.answer)
    assert s.distractor_answers[0] != s.answer
    gen = m.generate(torch.tensor([s.prompt]), max_new_tokens=len(s.answer))[0, s.prompt_len:].tolist()
    # the model's own greedy answer, declared once as a distractor's value and once as the answer
    as_distractor = type(s)(**{**s.__dict__, "distractor_answers": [gen]})
    as_answer = type(s)(**{**s.__dict__, "answer": gen, "input_ids": s.prompt + gen})
    correct, _, distracted = score_samples(m, [as_distractor])
    assert distracted == [True] and correct == [gen == s.answer]
    correct, _, distracted = score_samples(m, [as_answer])
    assert correct == [True] and distracted == [gen == s.distractor_answers[0]]


def test_2hop_rows_say_which_hop_failed():
    from gca.data.tasks import make_task_sample
    from gca.eval.tasks import evaluate_tasks

    torch.manual_seed(0)
    m = DRT(tiny()).eval()
    s = make_task_sample("2hop", context_len=400, seed=5)
    gen = m.generate(torch.tensor([s.prompt]), max_new_tokens=len(s.answer))[0, s.prompt_len:].tolist()
    # the model's own first two tokens declared as the chain's Y, the rest left as it was
    own_y = type(s)(**{**s.__dict__, "answer": gen[:2] + s.answer[2:], "input_ids": s.prompt + gen[:2] + s.answer[2:]})
    correct, _, _, hop1 = score_samples(m, [own_y, s], first_hop=True)
    assert hop1 == [True, gen[:2] == s.answer[:2]]
    assert correct == [gen == own_y.answer, gen == s.answer]
    rows = evaluate_tasks(m, ["2hop", "passkey"], [400], depths=1, trials=2, progress=False)
    hop = [r for r in rows if r["task"] == "2hop"][0]
    assert hop["hop_answer"] == "chain" and 0.0 <= hop["first_hop"] <= 1.0 and hop["first_hop"] >= hop["accuracy"]
    assert "first_hop" not in [r for r in rows if r["task"] == "passkey"][0]
    (end,) = evaluate_tasks(m, ["2hop"], [400], depths=1, trials=2, progress=False, hop_answer="end")
    assert end["hop_answer"] == "end" and "first_hop" not in end


def test_ppl_command(tmp_path, capsys):
    from gca.data.prepare import prepare

    src = tmp_path / "txt"
    src.mkdir()
    for i in range(6):
        (src / f"d{i}.txt").write_text(f"document {i}. " + "a quick brown fox jumps over the lazy dog; " * 60)
    prepare([str(src)], tmp_path / "data", tokenizer="embedded", val_fraction=0.5)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(run), "--seq-len", "128",
                 "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--device", "cpu", "--no-progress",
                 "--set", "hidden_size=32", "--set", "num_heads=2", "--set", "intermediate_size=64"]) == 0  # fmt: skip
    out = tmp_path / "eval"
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(tmp_path / "data"), "--lengths", "1x,2x",
                 "--windows", "2", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    rows = json.loads((out / "ppl.json").read_text())
    assert [r["context_length"] for r in rows] == [128, 256]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["tokens"] == 2 * (r["context_length"] - 1) for r in rows)
    assert (out / "ppl_vs_length.png").stat().st_size > 1000
    # the same text scored at both lengths: the last training length's worth of each window
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(tmp_path / "data"), "--lengths", "1x,2x",
                 "--windows", "2", "--targets", "1x", "--out", str(tmp_path / "eval_fixed"), "--device", "cpu"]) == 0  # fmt: skip
    fixed = json.loads((tmp_path / "eval_fixed" / "ppl.json").read_text())
    assert [(r["tokens"], r["targets"]) for r in fixed] == [(2 * 127, 127), (2 * 127, 127)]
    # a diverged model (logits of +-1e4): ppl inf in the file, and a warning that says so
    from gca.train import load_model, save_model

    div = load_model(run)
    with torch.no_grad():
        div.norm.weight.fill_(1e4)
    save_model(div, tmp_path / "div")
    capsys.readouterr()
    assert main(["eval", "ppl", "--ckpt", str(tmp_path / "div"), "--data", str(tmp_path / "data"), "--lengths", "128",
                 "--windows", "2", "--out", str(tmp_path / "eval_div"), "--device", "cpu"]) == 0  # fmt: skip
    # strict JSON (most readers refuse `Infinity`): null, and the value named in "nonfinite"
    text = (tmp_path / "eval_div" / "ppl.json").read_text()
    (row,) = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in ppl.json: not strict JSON"))
    assert row["ppl"] is None and row["nonfinite"] == {"ppl": "inf"}
    assert "warning: the perplexity is not finite at context 128" in capsys.readouterr().err
    # collect_results reads it back as inf and writes it strictly again
    cr = _script("collect_results")
    assert cr.read_rows(str(tmp_path / "eval_div" / "ppl.json"), cr.PPL_KEYS)[0]["ppl"] == math.inf
    cr.write_rows(str(tmp_path / "merged.json"), cr.read_rows(str(tmp_path / "eval_div" / "ppl.json")))
    assert (tmp_path / "merged.json").read_text() == text
    # and a rerun into the same folder keeps the row, unreadable as it was to strict readers before
    assert main(["eval", "ppl", "--ckpt", str(tmp_path / "div"), "--data", str(tmp_path / "data"), "--lengths", "64",
                 "--windows", "2", "--out", str(tmp_path / "eval_div"), "--name", "div2", "--device", "cpu"]) == 0  # fmt: skip
    both = json.loads((tmp_path / "eval_div" / "ppl.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert [(r["model"], r["ppl"]) for r in both] == [("div", None), ("div2", None)]

    # scripts/gca_off_ppl.py: its "on" numbers are the ppl command's (same windows), GCA off differs
    import sys

    argv = sys.argv
    try:
        sys.argv = ["gca_off_ppl", "--ckpt", str(run), "--name", "m", "--data", str(tmp_path / "data"),
                    "--lengths", "1x,256", "--windows", "2", "--out", str(tmp_path / "off.json")]  # fmt: skip
        _script("gca_off_ppl").main()
        off = json.loads((tmp_path / "off.json").read_text())
        assert [r["context_length"] for r in off] == [128, 256]
        for r, r_cmd in zip(off, rows):
            assert r["ppl"] == pytest.approx(r_cmd["ppl"], rel=1e-4) and math.isfinite(r["ppl_gca_off"])
            assert r["ppl_gca_off"] != r["ppl"]
        # scripts/check_skip_upper.py on the trained run: same answer logits with and without skipping
        sys.argv = ["check_skip_upper", "--ckpt", str(run), "--length", "2000", "--depths", "0,1", "--prefill-chunk", "256"]
        capsys.readouterr()
        _script("check_skip_upper").main()
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2 and all("answers equal True" in ln and "retrieval rows equal True" in ln for ln in lines)
        assert all(float(ln.split("max |logit diff| ")[1].split()[0]) < 1e-5 for ln in lines)
        assert all(int(ln.split("s (")[1].split()[0]) >= 1000 for ln in lines)  # most of the prompt was skipped
    finally:
        sys.argv = argv

    # needle tasks over the corpus as filler read its held-out split
    import gca.data.tasks as T
    from gca.eval.tasks import evaluate_tasks
    from gca.train import load_model

    fillers = []
    real = T.make_task_sample

    def spy(*a, **kw):
        fillers.append(kw["filler"])
        return real(*a, **kw)

    T.make_task_sample = spy
    try:
        rows = evaluate_tasks(load_model(run), ["passkey"], [300], depths=1, trials=2, filler=str(tmp_path / "data"),
                              progress=False)
    finally:
        T.make_task_sample = real
    # opened once: the two trials and the sample that checks the shortest length first share it
    assert rows[0]["trials"] == 2 and len(fillers) == 3 and all(f is fillers[0] for f in fillers)
    assert fillers[0].dataset.split == "val"

    # partial results: on_row sees the rows so far after every (length, task, depth), length-major
    seen = []
    rows = evaluate_tasks(load_model(run), ["passkey", "multikey"], [200, 300], depths=1, trials=1,
                          progress=False, on_row=lambda rs: seen.append([(r["context_length"], r["task"]) for r in rs]))
    assert [len(s) for s in seen] == [1, 2, 3, 4]
    assert seen[-1] == [(200, "passkey"), (200, "multikey"), (300, "passkey"), (300, "multikey")]
    assert seen[-1] == [(r["context_length"], r["task"]) for r in rows]


def test_collect_results_pools_depths_and_merges_by_model(tmp_path):
    cr = _script("collect_results")
    runs, out = tmp_path / "runs", tmp_path / "results"
    (runs / "eval" / "drt-ppl").mkdir(parents=True)
    (runs / "eval" / "drt-ppl" / "ppl.json").write_text(json.dumps(
        [{"model": "drt-s", "train_length": 100, "context_length": 100, "ppl": 9.87654, "tokens": 400, "windows": 4}]))
    (runs / "eval" / "drt-tasks-400").mkdir(parents=True)
    (runs / "eval" / "drt-tasks-400" / "tasks.json").write_text(json.dumps([
        {"model": "drt-s", "train_length": 100, "task": "passkey", "context_length": 400, "depth": d, "trials": 4,
         "accuracy": acc, "retrieval_hit": 1.0} for d, acc in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.25))]))
    out.mkdir()
    (out / "passkey.json").write_text(json.dumps([{"model": "other", "task": "single", "train_length": 1,
                                                    "context_length": 2, "accuracy": 1.0, "trials": 20}]))
    # a ppl-fixed folder (the same text at every length): its rows keep targets and windows
    (runs / "eval" / "swa-ppl-fixed").mkdir(parents=True)
    (runs / "eval" / "swa-ppl-fixed" / "ppl.json").write_text(json.dumps(
        [{"model": "swa-s", "train_length": 100, "context_length": 400, "ppl": 5.0, "tokens": 396, "windows": 4,
          "targets": 99, "corpus": "data/corpus-y/"}]))
    ppl, tasks = cr.collect(str(runs), "corpus-x")
    # a row that names its corpus (gca eval writes --data) keeps it, as a folder name; others take the default
    assert ppl == [{"model": "drt-s", "train_length": 100, "context_length": 100, "ppl": 9.8765, "tokens": 400, "corpus": "corpus-x"},
                   {"model": "swa-s", "train_length": 100, "context_length": 400, "ppl": 5.0, "tokens": 396, "corpus": "corpus-y",
                    "targets": 99, "windows": 4}]
    assert tasks == [{"model": "drt-s", "task": "single", "train_length": 100, "context_length": 400,
                      "accuracy": round(7 / 12, 4), "trials": 12}]
    merged = cr._merge(str(out / "passkey.json"), tasks)
    assert [r["model"] for r in merged] == ["other", "drt-s"]


def test_collect_results_groups_seeds_and_plots_them(tmp_path):
    """Models named ARCH-sSEED-TAG form seed groups (two seeds or more), drawn in ppl_seeds.png."""
    cr = _script("collect_results")
    rows = [{"model": f"{a}-s{s}-x-small", "train_length": 10, "context_length": n, "ppl": p * (1 + s / 10), "tokens": 5}
            for a, p in (("drt", 10.0), ("swa", 11.0)) for s in (1, 2, 3) for n in (10, 40)]
    rows.append({"model": "full-s1-x-small", "train_length": 10, "context_length": 10, "ppl": 9.0, "tokens": 5})  # one seed
    rows.append({"model": "drt-small", "train_length": 10, "context_length": 10, "ppl": 9.0, "tokens": 5})  # no seed
    groups = cr.seed_groups(rows)
    assert sorted(groups) == [("drt", "x-small"), ("swa", "x-small")]
    assert groups[("drt", "x-small")][2] == {10: 12.0, 40: 12.0}
    # DRT over the window: 10/11 - 1 at both lengths (each seed scales both archs alike), its standard error
    # that of two groups of log(1 + s/10)
    cmp = cr.seed_comparison(groups)
    se = math.sqrt(2 * statistics.variance([math.log(1 + s / 10) for s in (1, 2, 3)]) / 3)
    assert [r["context_length"] for r in cmp] == [10, 40] and all(r["seeds"] == (3, 3) for r in cmp)
    for r in cmp:
        assert r["diff"] == pytest.approx(10 / 11 - 1) and r["median_diff"] == pytest.approx(10 / 11 - 1)
        assert r["se"] == pytest.approx(se) and r["drt"] == pytest.approx(10 * math.exp(statistics.mean(
            [math.log(1 + s / 10) for s in (1, 2, 3)])))
    cr._plots(rows, [], str(tmp_path))
    assert (tmp_path / "ppl_seeds.png").stat().st_size > 0 and (tmp_path / "ppl_vs_length.png").exists()
    # DRTs of another tag against the window's seeds of this one (--versus y-small=x-small)
    rows += [{"model": f"drt-s{s}-y-small", "train_length": 10, "context_length": n, "ppl": 9.0 * (1 + s / 10), "tokens": 5}
             for s in (1, 2) for n in (10, 40)]
    groups = cr.seed_groups(rows)
    assert [r["tag"] for r in cr.seed_comparison(groups)] == ["x-small", "x-small"]  # no window seeds tagged y
    cmp = [r for r in cr.seed_comparison(groups, {"y-small": "x-small"}) if r["tag"] == "y-small"]
    assert [(r["swa_tag"], r["seeds"]) for r in cmp] == [("x-small", (2, 3))] * 2
    assert cmp[0]["diff"] == pytest.approx(math.exp(statistics.mean([math.log(9 * (1 + s / 10)) for s in (1, 2)])
                                                    - statistics.mean([math.log(11 * (1 + s / 10)) for s in (1, 2, 3)])) - 1)
    cr._plots(rows, [], str(tmp_path), {"y-small": "x-small"})


def test_perplexity_of_uniform_logits_is_the_vocabulary_and_past_float_range_inf(tmp_path):
    """ppl = exp(mean NLL) over the tokens scored: a model whose logits are all equal scores the vocabulary
    size, with windows x (N - 1) tokens (N shorter than a chunk, one chunk, one past it); a mean NLL past
    float range (a diverged model) is inf, where math.exp raised OverflowError after the whole evaluation."""
    from gca.eval.perplexity import perplexity_vs_length

    _prepare_words(tmp_path, docs=4, words_per_doc=200, vocab=30, seed=0)
    m = DRT(tiny()).double().eval()
    with torch.no_grad():
        m.norm.weight.zero_()  # logits all 0: uniform over the vocabulary
    rows = perplexity_vs_length(m, str(tmp_path / "data"), [10, 63, 64], windows=3, piece=32, progress=False)
    assert [r["tokens"] for r in rows] == [27, 186, 189]
    assert all(r["ppl"] == pytest.approx(m.config.vocab_size, rel=1e-12) for r in rows)
    with torch.no_grad():
        m.norm.weight.fill_(1e4)  # logits of +-1e4 and more: a mean NLL of thousands of nats
    (row,) = perplexity_vs_length(m, str(tmp_path / "data"), [100], windows=2, progress=False)
    assert row["ppl"] == math.inf and row["tokens"] == 198


def test_ppl_plot_takes_the_rows_perplexity_vs_length_returns(tmp_path, monkeypatch):
    """perplexity_vs_length's rows have no ``model`` (the command adds it): plot_ppl_vs_length drew them
    with a KeyError; now one unlabelled line, in length order."""
    import matplotlib.figure

    from gca.eval.plots import plot_ppl_vs_length

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    rows = [{"context_length": 200, "ppl": 6.0, "tokens": 398, "windows": 2},
            {"context_length": 100, "ppl": 5.0, "tokens": 198, "windows": 2}]
    plot_ppl_vs_length(rows, str(tmp_path / "p.png"), train_length=100)
    (line,) = [ln for ln in figs[0].axes[0].get_lines() if ln.get_label() != "training length"]
    assert list(line.get_xdata()) == [100, 200] and list(line.get_ydata()) == [5.0, 6.0]


def _collect_rows(model, ppls, lengths=(10, 20)):
    return [{"model": model, "train_length": 10, "context_length": n, "ppl": p, "tokens": 5, "windows": 1, "corpus": "c"}
            for n, p in zip(lengths, ppls)]


def test_collect_results_draws_a_model_that_rises_more_than_3x_and_nan_rows(tmp_path, monkeypatch):
    """ppl_vs_length.png's zoom kept the models whose worst value lies within 3x the lowest: a lone model
    rising more than that (an untrained one, 5e16 -> 6e17), or a NaN row, left it none and min() raised."""
    cr = _script("collect_results")
    for i, rows in enumerate([_collect_rows("drt-a", [5.6e16, 6.5e17]),
                              _collect_rows("drt-a", [float("nan"), 9.0]) + _collect_rows("swa-b", [8.0, 40.0])]):
        out = tmp_path / str(i)
        out.mkdir()
        (out / "ppl.json").write_text(json.dumps(rows))
        monkeypatch.setattr(sys, "argv", ["collect_results", "--plots-only", "--out", str(out)])
        cr.main()
        assert (out / "ppl_vs_length.png").stat().st_size > 1000


def test_collect_results_tasks_plot_draws_the_named_models_alone(tmp_path, monkeypatch, capsys):
    """--tasks-plot FILE=MODEL,...: a figure of these models' passkey.json rows; a model without rows is named,
    a figure with none is not drawn, and a malformed value is refused with the form it takes."""
    cr = _script("collect_results")
    out = tmp_path / "res"
    out.mkdir()
    (out / "passkey.json").write_text(json.dumps(
        [{"model": m, "task": t, "train_length": 100, "context_length": n, "accuracy": a, "trials": 20}
         for m, a in (("drt-a", 1.0), ("swa-a", 0.0), ("full-b", 0.5)) for t in ("single", "multikey")
         for n in (100, 400)]))
    drawn = []
    real = cr._tasks_figure
    monkeypatch.setattr(cr, "_tasks_figure", lambda rows, path, *a: drawn.append((Path(path).name, rows)) or real(rows, path, *a))

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["collect_results", "--plots-only", "--out", str(out), *args])
        cr.main()
        return capsys.readouterr()

    printed = run("--tasks-plot", "two.png=drt-a,swa-a,nope-x", "--tasks-plot", "none.png=nope-x").out
    assert [name for name, _ in drawn] == ["passkey_vs_length.png", "two.png"]
    assert {r["model"] for r in drawn[1][1]} == {"drt-a", "swa-a"} and len(drawn[1][1]) == 8
    assert (out / "two.png").stat().st_size > 1000 and not (out / "none.png").exists()
    assert "two.png: no passkey.json rows of nope-x\n" in printed and "none.png: no passkey.json rows of nope-x; not drawn" in printed
    for bad in ("two.png", "two.png=", "../a.png=drt-a", "a.txt=drt-a", "passkey_vs_length.png=drt-a"):
        monkeypatch.setattr(sys, "argv", ["collect_results", "--plots-only", "--out", str(out), "--tasks-plot", bad])
        with pytest.raises(SystemExit):
            cr.main()
        assert "--tasks-plot takes FILE.png=MODEL" in capsys.readouterr().err


def test_collect_results_names_a_bad_results_file_and_refuses_a_missing_runs_folder(tmp_path, monkeypatch, capsys):
    cr = _script("collect_results")
    runs, out = tmp_path / "runs", tmp_path / "out"
    f = runs / "eval" / "drt-ppl" / "ppl.json"
    f.parent.mkdir(parents=True)
    f.write_text("")  # an empty file holds no rows
    assert cr.collect(str(runs), "c") == ([], [])
    for text, says in (('[{"model": "drt-a", "ppl": 5', "is not JSON"), ('{"model": "drt-a"}', "does not hold a JSON list"),
                       ('[{"model": "drt-a", "context_length": 10, "ppl": 5.0}]', "row 0 (drt-a) has no train_length, tokens"),
                       (json.dumps([dict(_collect_rows("drt-a", [5.0])[0], targets=9)]).replace('"windows": 1, ', ""),
                        "has no windows")):
        f.write_text(text)
        with pytest.raises(cr.ResultsError, match=re.escape(str(f)) + ".*" + re.escape(says)):
            cr.collect(str(runs), "c")

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["collect_results", "--out", str(out), *args])
        cr.main()

    f.unlink()
    run("--runs", str(runs))  # nothing to collect: said, and nothing written
    assert "nothing to collect" in capsys.readouterr().err and not out.exists()
    for args, says in ((("--runs", str(tmp_path / "nowhere")), "no such folder"), (("--plots-only",), "holds neither"),
                       (("--runs", "NONE", "--tasks-files", str(tmp_path / "t.json")), "no such file")):
        with pytest.raises(SystemExit) as e:
            run(*args)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_collect_results_rewrites_its_files_atomically(tmp_path, monkeypatch):
    """OUT/ppl.json holds every model's rows: a stop mid-write (here a KeyboardInterrupt from inside
    json.dump) used to leave it cut short; it now keeps the previous file whole, with no temporary left."""
    cr = _script("collect_results")
    runs, out = tmp_path / "runs", tmp_path / "out"
    (runs / "eval" / "drt-ppl").mkdir(parents=True)
    (runs / "eval" / "drt-ppl" / "ppl.json").write_text(json.dumps(_collect_rows("drt-new", [5.0, 4.0])))
    out.mkdir()
    before = json.dumps(_collect_rows("drt-old", [7.0, 6.0]), indent=1)
    (out / "ppl.json").write_text(before)

    def stopped(obj, fp, **kw):
        fp.write('[\n {"model": "drt-o')
        raise KeyboardInterrupt

    monkeypatch.setattr(cr.json, "dump", stopped)
    monkeypatch.setattr(sys, "argv", ["collect_results", "--runs", str(runs), "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        cr.main()
    assert (out / "ppl.json").read_text() == before and sorted(p.name for p in out.iterdir()) == ["ppl.json"]


def test_collect_results_pairs_seeds_and_finds_the_last_rise(tmp_path, monkeypatch, capsys):
    """--paired compares two seed groups seed by seed; last_step_change gives each seed's change between
    the two longest lengths."""
    cr = _script("collect_results")
    ratio = {1: 1.02, 2: 1.06, 3: 0.98}  # group a over group b, per seed
    b = {s: {10: 10.0 + s, 40: 9.0 + s, 160: 9.0 + s} for s in (1, 2, 3, 4)}  # seed 4 only in b: left out
    a = {s: {n: v * ratio[s] * (1.01 if n == 160 else 1) for n, v in b[s].items()} for s in (1, 2, 3)}
    rows = cr.paired_comparison(a, b)
    d = [math.log(r) for r in ratio.values()]
    assert [(r["context_length"], r["seeds"]) for r in rows] == [(10, 3), (40, 3), (160, 3)]
    assert rows[0]["diff"] == pytest.approx(math.exp(statistics.mean(d)) - 1)
    assert rows[0]["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3))
    assert rows[0]["median_diff"] == pytest.approx(0.02)
    assert rows[2]["diff"] == pytest.approx(1.01 * math.exp(statistics.mean(d)) - 1)
    assert cr.paired_comparison(a, {1: b[1]}) == []  # one common seed: no spread to speak of
    sp = cr.paired_spread(a, b)  # at the shortest length, over the three common seeds
    la, lb = [math.log(a[s][10]) for s in (1, 2, 3)], [math.log(b[s][10]) for s in (1, 2, 3)]
    assert sp["context_length"] == 10 and sp["seeds"] == 3
    assert (sp["sd_a"], sp["sd_b"]) == pytest.approx((statistics.stdev(la), statistics.stdev(lb)))
    assert (sp["corr_a"], sp["corr_b"]) == pytest.approx((statistics.correlation(d, la), statistics.correlation(d, lb)))
    # a gap made by b's seeds alone (a the same in every seed) follows b's perplexity exactly
    flat = {s: {10: 10.0} for s in (1, 2, 3)}
    only_a = cr.paired_spread({s: {10: 10.0 + 0.1 * s} for s in (1, 2, 3)}, flat)
    assert only_a["corr_a"] == pytest.approx(1.0) and only_a["corr_b"] is None and only_a["sd_b"] == 0
    assert cr.paired_spread(flat, b)["corr_b"] == pytest.approx(-1.0)
    assert cr.paired_spread(flat, flat) is None  # the same ratio in every seed
    assert cr.paired_spread({1: a[1], 2: a[2]}, b) is None  # two seeds: no correlation to speak of
    lo, hi, change = cr.last_step_change(a)
    assert (lo, hi) == (40, 160) and change == pytest.approx([0.01] * 3)
    assert cr.last_step_change({1: {10: 1.0}, 2: {10: 2.0}}) == (0, 0, [])

    # the command line: a malformed --paired is refused with the form it takes; a group not in ppl.json is named
    out = tmp_path / "res"
    out.mkdir()
    (out / "ppl.json").write_text(json.dumps(
        [{"model": f"{g}-s{s}-x-small", "train_length": 10, "context_length": n, "ppl": v, "tokens": 5}
         for g, grp in (("drt", a), ("swa", b)) for s, vs in grp.items() for n, v in vs.items()]))

    def refused(flag, bads, message):
        for bad in bads:
            monkeypatch.setattr(sys, "argv", ["collect_results", "--plots-only", "--out", str(out), flag, bad])
            with pytest.raises(SystemExit):
                cr.main()
            assert message in capsys.readouterr().err

    def printed(*args):
        monkeypatch.setattr(sys, "argv", ["collect_results", "--plots-only", "--out", str(out), *args])
        cr.main()
        return capsys.readouterr().out

    refused("--paired", ("drt-x-small", "drt=swa-x-small"), "--paired takes ARCH-TAG=ARCH-TAG")
    text = printed("--paired", "drt-x-small=swa-x-small", "--paired", "drt-y-small=swa-x-small")
    assert "drt-x-small vs swa-x-small       10, seed by seed (3 seeds): +1.9%" in text
    assert (f"drt-x-small vs swa-x-small       10: seed spread (standard deviation of log ppl) {sp['sd_a']:.3f} / "
            f"{sp['sd_b']:.3f}; the per-seed log ratio correlates {sp['corr_a']:+.2f} with drt-x-small's") in text
    assert "no seed group drt-y-small" in text and "drt-x-small: 40 -> 160 tokens, per seed +1.00% to +1.00% (3 of 3 rise), mean +1.00%" in text

    # --seed-plot: one figure per set of tags, in OUT; a malformed one is refused with its form
    refused("--seed-plot", ("x-small", "a.png=", "../a.png=x-small"), "--seed-plot takes FILE.png=TAG")
    for f in out.glob("*.png"):  # drawn by the calls above
        f.unlink()
    assert "b.png: no seed group tagged z-small" in printed("--seed-plot", "a.png=x-small", "--seed-plot", "b.png=z-small")
    assert (out / "a.png").stat().st_size > 0 and not (out / "b.png").exists() and not (out / "ppl_seeds.png").exists()
    # the seed groups' models are left out of ppl_vs_length.png: with only those, it is not drawn
    assert not (out / "ppl_vs_length.png").exists()

    # --seed-table: one markdown row per common seed (seed 4 is b's alone), values as the groups hold them
    lines = cr.seed_table({("drt", "x"): a, ("swa", "x"): b}, [("drt", "x"), ("swa", "x")])
    assert lines[0] == ("| seed | drt-x: 10 / 160 | swa-x: 10 / 160 | drt-x: 40 -> 160 | swa-x: 40 -> 160 "
                        "| drt-x vs swa-x: 10 / 160 |")
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| 1", "| 2", "| 3"]
    assert lines[3] == (f"| 2 | {a[2][10]:.2f} / {a[2][160]:.2f} | 12.00 / 11.00 | +1.00% | +0.00% | +6.0% / +7.1% |")
    assert "no seed and two context lengths" in cr.seed_table({("drt", "x"): {1: {10: 1.0}}, ("swa", "x"): {1: {10: 2.0}}},
                                                              [("drt", "x"), ("swa", "x")])[0]
    refused("--seed-table", ("drt-x-small", "drt-x-small,swa"), "--seed-table takes two or more ARCH-TAG groups")
    text = printed("--seed-table", "drt-x-small,swa-x-small", "--seed-table", "drt-x-small,swa-q-small")
    assert "| 3 | " in text and "| 4 | " not in text and "--seed-table: no seed group swa-q-small" in text


def test_needle_attention_reproduces_the_gca_output():
    """The diagnostic's attention, weighted by retrieval and applied to the memory values, is what the
    layer's GCA op returned (plain and off-by-one softmax, grouped heads)."""
    na = _script("needle_attention")
    for softmax_one in (False, True):
        torch.manual_seed(1)
        m = DRT(tiny(vocab_size=101, num_kv_heads=2, gca_softmax_one=softmax_one, top_k=3)).double().eval()
        ids = torch.randint(0, 101, (1, 63 * 7 + 5))
        op_out = []
        hooks = [layer.gca.o.register_forward_hook(lambda mod, args, out: op_out.append(args[0]))
                 for group in m.groups for layer in group]
        _, seen = na.capture_gca(m, ids)
        for h in hooks:
            h.remove()
        assert len(seen) == len(op_out) == sum(len(g) for g in m.groups)
        S, H, D = m.config.chunk_size, m.config.num_heads, m.config.head_dim
        gcas = [layer.gca for group in m.groups for layer in group]
        for li, (h, mk, mv, idx, w) in enumerate(seen):
            row = 5
            pos = list(range(row * S, row * S + S))
            want = op_out[li][0, pos].view(S, H, D)
            got = torch.zeros_like(want)
            for slot in range(idx.shape[-1]):
                c = int(idx[0, row, slot])
                if c < 0:
                    continue
                att = na.chunk_attention(gcas[li], h, mk, pos, c, softmax_one)  # (S, H, S)
                v = mv[0, c].repeat_interleave(H // mv.shape[3], dim=1)  # (S, H, D)
                got += w[0, row, slot] * torch.einsum("ths,shd->thd", att, v)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_needle_attention_sees_the_shipped_checkpoint_copy():
    """On the shipped passkey model (100% at 1x-64x) the diagnostic must show what makes it work: the
    needle's chunk gets almost all the retrieval weight and one head reads the very token to copy."""
    from gca.data.tasks import make_task_sample
    from gca.train import load_model

    na = _script("needle_attention")
    m = load_model(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny").float().eval()
    rng = np.random.default_rng(99)
    rows = [na.inspect_sample(m, make_task_sample("passkey", context_len=1008, seed=rng, depth=0.5)) for _ in range(3)]
    summ = na.summarise(rows)
    assert summ["accuracy"] == 1.0
    last = summ["layers"][-1]
    assert last["hit"] == 1.0 and last["weight_when_hit"] > 0.9
    head = int(np.argmax(last["next_mass"]))
    assert last["next_mass"][head] > 0.8 > 0.3 > last["next_mass_if_even"][head]
    # a model that has not learned to copy spreads its reading over the answer (random weights)
    torch.manual_seed(0)
    fresh = DRT(m.config).eval()
    fresh_rows = [na.inspect_sample(fresh, make_task_sample("passkey", context_len=1008, seed=rng, depth=0.5)) for _ in range(2)]
    assert max(max(x["next_mass"]) for x in na.summarise(fresh_rows)["layers"]) < 0.3


def test_needle_attention_oracle_reads_only_the_answer_chunk():
    """--oracle: the answer's row reads the answer's chunk alone at weight 1 in every GCA layer, other
    rows keep what retrieval picked, and a model that copies still answers."""
    from gca.data.tasks import make_task_sample
    from gca.train import load_model

    na = _script("needle_attention")
    m = load_model(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny").float().eval()
    s = make_task_sample("passkey", context_len=1008, seed=np.random.default_rng(5), depth=0.0)
    row, chunk = (s.prompt_len - 1) // 63, s.target_chunk
    _, plain = na.capture_gca(m, torch.tensor([s.input_ids]))
    _, forced = na.capture_gca(m, torch.tensor([s.input_ids]), oracle=(row, chunk))
    for (_, _, _, i0, w0), (_, _, _, i1, w1) in zip(plain, forced):
        assert i1[0, row].tolist() == [chunk] + [-1] * (i1.shape[-1] - 1)
        assert w1[0, row].tolist() == [1.0] + [0.0] * (w1.shape[-1] - 1)
        keep = [c for c in range(i0.shape[1]) if c != row]
        assert torch.equal(i0[0, keep], i1[0, keep]) and torch.equal(w0[0, keep], w1[0, keep])
    out = na.inspect_sample(m, s, oracle=True)
    assert out["correct"] and all(x["hit"] and x["weight"] == 1.0 and x["first_window"] == 0.0 for x in out["layers"])
    # w(first): the other retrieved chunks inside the first window; the answer's slot and empty slots not
    assert na.first_window_weight([0, 5, 1, -1], [0.5, 0.25, 0.125, 0.0], slot=None, first=2) == 0.625
    assert na.first_window_weight([0, 5, 1, -1], [0.5, 0.25, 0.125, 0.0], slot=0, first=2) == 0.125
    assert na.first_window_weight([7, 5], [0.5, 0.5], slot=None, first=2) == 0.0


def test_needle_attention_repeats_split_and_gca_gain():
    """--repeats: every predicted token falls in one class, and on the shipped model (which copies far
    repeats through GCA) switching GCA off costs more than a nat a repeated token."""
    from gca.data.tasks import digit_ids, make_filler, make_task_sample
    from gca.train import load_model

    na = _script("needle_attention")
    m = load_model(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny").float().eval()
    filler = make_filler(None, digit_frac=0.08)
    digits = set(digit_ids(filler.tokenizer))
    rng = np.random.default_rng(8)
    on, off = {"repeat_digit": [], "repeat_word": [], "other": []}, {"repeat_digit": [], "repeat_word": [], "other": []}
    for _ in range(3):
        s = make_task_sample("passkey", context_len=1008, seed=rng, filler=filler, repeat_prob=1.0, repeat_gap=130)
        a, b = na.repeat_nll(m, s, digits), na.repeat_nll(m, s, digits, gca_off=True)
        assert sum(len(v) for v in a.values()) == len(s.prompt) - 1
        assert len(a["repeat_word"]) == sum(s.repeat_mask[1:len(s.prompt)]) - len(a["repeat_digit"]) > 50
        for k in on:
            on[k] += a[k]
            off[k] += b[k]
    assert np.mean(off["repeat_word"]) - np.mean(on["repeat_word"]) > 1.0
    assert abs(np.mean(off["other"]) - np.mean(on["other"])) < 0.5  # first occurrences: nothing to copy


def test_beyond_window_matches_the_attention_mask():
    """A needle is beyond the window exactly when no token of it is among the keys the answer's first
    prediction attends to (the sliding-window mask, landmarks counted for a DRT); full attention sees all.
    The prediction's position is the model's own (`DRT.insert_landmarks`): for a prompt whose last token
    closes a chunk (unaligned samples) that is the landmark after it, one position later."""
    from gca.data.tasks import make_task_sample
    from gca.eval.tasks import beyond_window

    rng = np.random.default_rng(17)
    seen = {True: 0, False: 0}
    closing = 0
    for arch in ("drt", "swa", "full"):
        cfg = tiny(arch=arch)
        model = DRT(cfg) if arch == "drt" else None
        for i in range(60):
            kind = ["passkey", "multikey", "2hop"][int(rng.integers(3))]
            aligned = i % 2 == 0
            n = int(rng.integers(5, 19)) * 63 if not aligned and i % 4 == 1 else int(rng.integers(300, 1200))
            s = make_task_sample(kind, context_len=n, seed=rng, depth=float(rng.random()), align_question=aligned)
            P, S, W = 63, cfg.chunk_size, cfg.window
            pos = (lambda p: (p // P) * S + p % P) if arch == "drt" else (lambda p: p)
            if model is not None:
                q = int(model.insert_landmarks(torch.zeros(1, s.prompt_len, dtype=torch.long))[1][-1])
                closing += s.prompt_len % P == 0
            else:
                q = s.prompt_len - 1
            visible = [any(q - pos(t) < W for t in range(a, b)) for a, b in s.needle_spans[: len(s.target_chunks)]]
            want = arch != "full" and not any(visible)
            assert beyond_window(s, cfg) == want
            seen[want] += 1
    assert seen[True] > 10 and seen[False] > 10 and closing >= 5  # every case was exercised
    # at the edge: the prompt's last token (629) closes chunk 9, so the answer is predicted at its
    # landmark (position 639); a needle ending at position 559 (user token 551) is exactly 80 = W back
    # from there, out of the window (it was counted as inside when the prediction was placed at 638)
    from types import SimpleNamespace

    cfg = tiny(arch="drt")
    edge = SimpleNamespace(text_per_chunk=63, prompt_len=630, needle_spans=[(540, 552)], target_chunks=[8])
    assert int(DRT(cfg).insert_landmarks(torch.zeros(1, 630, dtype=torch.long))[1][-1]) == 639
    assert beyond_window(edge, cfg)
    assert not beyond_window(SimpleNamespace(**{**vars(edge), "needle_spans": [(540, 553)]}), cfg)


def test_task_rows_count_trials_beyond_the_window():
    from gca.eval.tasks import evaluate_tasks, summarize_beyond_window

    torch.manual_seed(0)
    m = DRT(tiny()).eval()  # window 80: at 600 tokens a needle at depth 0 is far, one at depth 1 is near
    rows = evaluate_tasks(m, ["passkey"], [600], depths=[0.0, 1.0], trials=3, progress=False)
    far, near = rows
    assert far["trials_beyond_window"] == 3 and far["accuracy_beyond_window"] == far["accuracy"]
    assert near["trials_beyond_window"] == 0 and near["accuracy_beyond_window"] is None
    assert summarize_beyond_window(rows) == {("passkey", 600): (far["accuracy"], 3)}


def test_a_length_too_short_fails_before_any_trial(monkeypatch):
    from gca.eval import tasks as et

    m = DRT(tiny()).eval()
    scored = []
    monkeypatch.setattr(et, "score_samples", lambda *a, **k: scored.append(1) or ([], [], [], []))
    with pytest.raises(ValueError, match="too short|no whole chunk"):
        et.evaluate_tasks(m, ["passkey"], [600, 40], trials=2, progress=False)  # 600 ran first before
    assert not scored


def test_task_rows_list_every_miss_with_what_the_model_wrote(capsys):
    """An untrained model misses: each wrong trial is listed once, with the sample's answer and the
    greedy output decoded (the trial index rebuilds the sample), right trials never; the CLI table
    prints them under the rows."""
    from gca.data.tasks import make_task_sample
    from gca.data.tokenizer import load_tokenizer
    from gca.eval.cli import _print_table
    from gca.eval.tasks import evaluate_tasks, score_samples

    torch.manual_seed(0)
    m = DRT(tiny()).eval()
    tok = load_tokenizer("embedded")
    rows = evaluate_tasks(m, ["passkey"], [300, 400], depths=2, trials=3, seed=21, batch_size=2, progress=False)
    for li, L in enumerate((300, 400)):
        for di, r in enumerate(rows[2 * li : 2 * li + 2]):
            rng = np.random.default_rng([21, 0, li, di])
            samples = [make_task_sample("passkey", context_len=L, seed=rng, depth=r["depth"]) for _ in range(3)]
            preds = []
            correct, hits, _ = score_samples(m, samples, predictions=preds)
            assert len(preds) == 3 and all(len(p) == len(s.answer) for p, s in zip(preds, samples))
            want = [dict(trial=j, answer=tok.decode(s.answer), output=tok.decode(p), needle_retrieved=h)
                    for j, (s, p, ok, h) in enumerate(zip(samples, preds, correct, hits)) if not ok]
            assert r["misses"] == want and len(want) == round(3 * (1 - r["accuracy"]))
    assert sum(len(r["misses"]) for r in rows) > 0  # the untrained model does miss
    assert all(x["answer"] != x["output"] for r in rows for x in r["misses"])
    _print_table(rows, 100)
    out = capsys.readouterr().out
    first = next(x for r in rows for x in r["misses"])
    assert f"answer {first['answer']!r}, wrote {first['output']!r}" in out


def test_task_rows_do_not_depend_on_the_prefill_piece(monkeypatch):
    from gca.eval.tasks import evaluate_tasks

    torch.manual_seed(0)
    m = DRT(tiny()).double().eval()
    seen = []
    new_cache = DRT.new_cache
    monkeypatch.setattr(DRT, "new_cache", lambda self, *a, **kw: seen.append(kw["prefill_chunk"]) or new_cache(self, *a, **kw))
    keep = ("accuracy", "retrieval_hit", "trials_beyond_window")
    rows = {pc: [{k: r[k] for k in keep} for r in evaluate_tasks(m, ["passkey", "2hop"], [700], depths=[0.0, 0.6],
                                                                  trials=3, progress=False, prefill_chunk=pc)]
            for pc in (m.config.chunk_size, 16384)}
    assert set(seen) == {m.config.chunk_size, 16384}  # the piece reached the cache
    assert rows[m.config.chunk_size] == rows[16384]
    seen.clear()
    evaluate_tasks(m, ["passkey"], [700], depths=[0.5], trials=1, progress=False)
    assert seen == [4096]  # the default on a CPU; on a GPU 16K
    from gca.eval.tasks import default_prefill_chunk

    assert default_prefill_chunk("cuda:0") == 16384 and default_prefill_chunk("cpu") == 4096
    for kw, says in [({"trials": 0}, "trials"), ({"batch_size": 0}, "batch_size"), ({"depths": 0}, "depths"),
                     ({"depths": [0.5, 1.5]}, "depths"), ({"depths": []}, "depths")]:
        with pytest.raises(ValueError, match=says):
            evaluate_tasks(m, ["passkey"], [700], progress=False, **{"trials": 1, **kw})


def test_needle_attention_top_k_flag_retrieves_fewer_chunks(tmp_path, monkeypatch):
    import sys

    na = _script("needle_attention")
    out = tmp_path / "na.json"
    ckpt = str(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny")
    monkeypatch.setattr(sys, "argv", ["needle_attention.py", "--ckpt", ckpt, "--length", "504", "--depth", "0",
                                      "--trials", "2", "--device", "cpu", "--top-k", "1", "--out", str(out)])
    na.main()
    got = json.loads(out.read_text())
    assert got["top_k"] == 1
    for row in got["rows"]:  # one chunk retrieved: it holds all the weight, and w(first) counts only the others
        for x in row["layers"]:
            assert x["weight"] in (0.0, 1.0) and x["max_other"] in (0.0, 1.0) and x["weight"] + x["max_other"] == 1.0
    monkeypatch.setattr(sys, "argv", ["needle_attention.py", "--ckpt", ckpt, "--top-k", "0"])
    with pytest.raises(SystemExit, match="--top-k must be >= 1"):
        na.main()


def test_needle_attention_first_window_share_on_plain_text():
    """--first-window: per query chunk past the first two windows, the retrieval weight on the first
    window's chunks and their share of the candidates; the shipped model uses them as its sink."""
    from gca.data.tasks import make_filler
    from gca.train import load_model

    na = _script("needle_attention")
    m = load_model(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny").float().eval()
    ids = [int(t) for t in make_filler(None, split="val").tokens(1008, np.random.default_rng(3))]
    rows = na.first_window_share(m, ids)
    first = m.config.window // m.config.chunk_size
    with torch.no_grad():
        _, seen = na.capture_gca(m, torch.tensor([ids]))
    n_rows = seen[0][3].shape[1]
    assert len(rows) == len(seen) * (n_rows - 2 * first)
    for r in rows:
        idx, w = seen[r["layer"]][3][0, r["row"]], seen[r["layer"]][4][0, r["row"]]
        want = float(w[(idx >= 0) & (idx < first)].sum())
        assert r["share"] == pytest.approx(want, abs=1e-4) and r["expected"] == pytest.approx(first / r["row"], abs=1e-4)
    assert np.mean([r["share"] for r in rows]) > 2 * np.mean([r["expected"] for r in rows])


def test_retrieval_margin_scores_are_the_forward_pass_retrieval():
    """The script's question scores are the first group's retrieval scores of the model's own forward
    pass (the picked chunks and their scores match), and on the shipped passkey model the needle's
    chunk ranks first at the question with a positive margin."""
    from gca.data.tasks import make_task_sample
    from gca.train import load_model

    rm = _script("retrieval_margin")
    torch.manual_seed(3)
    m = DRT(tiny(vocab_size=101, upper_groups=[1, 1], top_k=3)).double().eval()
    ids = torch.randint(0, 101, (1, 63 * 9 + 4))
    sc = rm.question_scores(m, ids)
    _, retrieval, _ = m._forward_drt(ids)
    r = retrieval[0]
    for row in range(2, sc.shape[0] - 1):
        top = sc[row, :row].topk(min(3, row))
        assert sorted(top.indices.tolist()) == sorted(r.indices[0, row][r.indices[0, row] >= 0].tolist())
        torch.testing.assert_close(top.values.sort().values, r.scores[0, row, : len(top.values)].sort().values)
    m = load_model(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny").float().eval()
    for seed in (1, 2):
        s = make_task_sample("passkey", context_len=1008, seed=np.random.default_rng(seed), depth=0.5)
        row = rm.question_scores(m, torch.tensor([s.prompt]))[s.query_chunk, : s.query_chunk]
        t = s.target_chunk
        assert int(row.argmax()) == t and row[t] > torch.cat([row[:t], row[t + 1 :]]).max()


def test_passkey_digit_runs_probes(monkeypatch):
    """scripts/passkey_digit_runs.py: the run length and prompt shortening it relies on, that `trial`
    rebuilds exactly the samples `evaluate_tasks` scores, and that `runs` keeps only keys with a run
    and scores the shipped model's answers as the evaluation does."""
    from gca.data.tasks import make_task_sample
    from gca.eval.tasks import evaluate_tasks
    from gca.train import load_model

    pr = _script("passkey_digit_runs")
    assert [pr.longest_run(k) for k in ([1, 2, 3], [4, 4, 5, 4], [7, 7, 7, 1, 7], [9] * 5)] == [1, 2, 3, 5]
    P = 63
    prompt = list(range(P * 20 + 5))
    short = pr.shortened(prompt, P, head=2, keep=3)
    assert short[: 2 * P] == prompt[: 2 * P] and short[2 * P :] == prompt[P * 17 :]  # whole chunks, grid kept
    assert len(short) % P == len(prompt) % P
    assert pr.shortened(prompt, P, head=2, keep=30) == prompt  # nothing to cut
    m = load_model(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny").float().eval()
    # the samples of depth index 1 at the second length are those evaluate_tasks scored there
    import gca.eval.tasks as et

    real, seen = et.score_samples, []
    with monkeypatch.context() as mp:
        mp.setattr(et, "score_samples", lambda model, samples, **kw: (seen.extend(samples), ([True] * len(samples),) * 4)[1])
        evaluate_tasks(m, lengths=[504, 1008], depths=3, trials=2, seed=77, batch_size=2, progress=False)
    got = pr.eval_trials(m, 1008, seed=77, depth_index=1, depths=3, trials=2, length_index=1)
    want = seen[(1 * 3 + 1) * 2 : (1 * 3 + 1) * 2 + 2]
    assert [list(s.prompt) for s in got] == [list(s.prompt) for s in want] and [s.answer for s in got] == [s.answer for s in want]
    res = pr.digit_runs(m, 504, samples=2, min_run=2, seed=5)
    assert res["samples"] == 2 and all(pr.longest_run(r["answer"]) >= 2 for r in res["rows"])
    assert res["drawn"] >= 2 and 0.0 <= res["weakest_median"] <= 1.0
    s = make_task_sample("passkey", context_len=504, seed=np.random.default_rng(8), depth=0.5)
    pred, probs = pr.answer_probs(m, s.prompt, s.answer, greedy=True)
    correct, _, _ = real(m, [s])
    assert (pred == list(s.answer)) == correct[0] and len(probs) == len(s.answer)


def test_retrieval_documents_script(tmp_path, monkeypatch, capsys):
    """scripts/retrieval_documents.py: chunk documents from separators; in ``all`` mode its perplexity
    is the ppl command's and the hook changes nothing; in ``doc`` mode no retrieval weight leaves the
    row's own document and rows with none of it to pick get empty slots."""
    import sys

    from gca.data.prepare import prepare
    from gca.eval.perplexity import perplexity_vs_length
    from gca.retrieval import causal_topk
    from safetensors.torch import save_model

    rd = _script("retrieval_documents")
    ids = np.array([[5, 6, 0, 7, 8, 9, 0, 4, 4, 4]])
    assert rd.chunk_documents(ids, 3, 0).tolist() == [[0, 1, 2, 2]]  # chunks end at 2, 5, 8, 9; the separator at 2 closes doc 0
    # a retriever blind to documents: rows 1, 2, 3 have 1 / 1, 0 / 2 and 1 / 3 candidates of their document
    assert rd.uniform_share(torch.tensor([[0, 0, 1, 1]]), 0) == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert rd.uniform_share(torch.tensor([[0, 0, 1, 1]]), 3) == pytest.approx(1 / 3)
    # the hook against the plain top-k: same picks with restrict off; own document only with it on
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, 9, generator=g)
    doc = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
    plain = causal_topk(scores, 3, row_offset=3)
    same = rd.DocumentRetrieval(doc, first_row=0, far=4, restrict=False)(scores, 3, row_offset=3)
    assert torch.equal(plain.indices, same.indices) and torch.equal(plain.weights, same.weights)
    hook = rd.DocumentRetrieval(doc, first_row=0, far=4, restrict=True)
    r = hook(scores, 3, row_offset=3)
    rows = torch.arange(6) + 3
    for b in range(2):
        for c in range(6):
            picked = [int(j) for j, w in zip(r.indices[b, c], r.weights[b, c]) if j >= 0]
            own = [j for j in range(int(rows[c])) if doc[b, j] == doc[b, rows[c]]]
            best = sorted(own, key=lambda j: -float(scores[b, c, j]))[:3]  # the best-scoring chunks of its document
            assert sorted(picked) == sorted(best)
            if own:
                assert float(r.weights[b, c].sum()) == pytest.approx(1.0)
            else:
                assert float(r.weights[b, c].abs().sum()) == 0.0
    assert hook.same == pytest.approx(hook.total) and hook.rows == 12

    # end to end on a prepared corpus of short documents
    src = tmp_path / "txt"
    src.mkdir()
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(40)]
    for d in range(24):
        (src / f"doc{d:02d}.txt").write_text(" ".join(rng.choice(words, int(rng.integers(60, 250)))))
    prepare(str(src), str(tmp_path / "data"), tokenizer="embedded", val_fraction=0.6)
    torch.manual_seed(0)
    m = DRT(tiny(top_k=2)).eval()
    (tmp_path / "model").mkdir()
    save_model(m, str(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "config.json").write_text(m.config.to_json())
    out = tmp_path / "docs.json"
    monkeypatch.setattr(sys, "argv", ["retrieval_documents", "--ckpt", str(tmp_path / "model"), "--data",
                                      str(tmp_path / "data"), "--lengths", "200,600", "--windows", "2", "--far", "2",
                                      "--out", str(out)])  # fmt: skip
    rd.main()
    res = json.loads(out.read_text())
    ref = perplexity_vs_length(m, str(tmp_path / "data"), [200, 600], windows=2, targets=200, seed=1234, progress=False)
    got = {(r["context_length"], r["mode"]): r for r in res["rows"]}
    for r in ref:
        assert got[(r["context_length"], "all")]["ppl"] == pytest.approx(r["ppl"], rel=1e-6)
    assert all(got[(n, "doc")]["same_doc_weight"] == pytest.approx(1.0) for n in (200, 600))
    assert got[(600, "all")]["same_doc_weight"] < 1.0  # 600 tokens span several documents here
    assert got[(600, "doc")]["ppl"] != got[(600, "all")]["ppl"] and res["longest_document"] > 0
    assert all(0.0 < r["same_doc_uniform"] <= 1.0 for r in res["rows"]) and res["text_per_chunk"] == 63
    rd.plot([str(out)], str(tmp_path / "docs.png"))
    assert (tmp_path / "docs.png").stat().st_size > 1000
    rd.plot([str(out), str(out)], str(tmp_path / "docs2.png"), labels=["before", "after"])
    assert (tmp_path / "docs2.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="1 labels for 2 files"):
        rd.plot([str(out), str(out)], str(tmp_path / "docs3.png"), labels=["one"])
    # a file made with --modes doc alone (its rows are the own-document ones): drawn, not a StopIteration
    doc_only = tmp_path / "doc_only.json"
    doc_only.write_text(json.dumps({**res, "rows": [r for r in res["rows"] if r["mode"] == "doc"]}))
    rd.plot([str(doc_only)], str(tmp_path / "docs4.png"))
    assert (tmp_path / "docs4.png").stat().st_size > 1000
    monkeypatch.setattr(sys, "argv", ["retrieval_documents", "--plot", str(out), "--labels", "a,b", "--out", "x.png"])
    with pytest.raises(SystemExit):
        rd.main()
    assert "--labels has 2 names for 1 files" in capsys.readouterr().err

    # gca eval ppl says when the contexts outgrow the held-out documents (here: at most ~250 words)
    from gca.data import PackedDataset
    from gca.eval.perplexity import longest_document

    ds = PackedDataset(str(tmp_path / "data"), "val")
    longest = longest_document(ds)
    assert longest == max(len(ds.document(i)) + 1 for i in range(ds.num_documents)) == res["longest_document"]
    capsys.readouterr()
    for lengths, noted in (("600", True), (str(longest), False)):
        assert main(["eval", "ppl", "--ckpt", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--lengths",
                     lengths, "--windows", "1", "--out", str(tmp_path / "ppl"), "--device", "cpu"]) == 0  # fmt: skip
        assert (f"the longest held-out document has {longest} tokens" in capsys.readouterr().out) == noted


def test_retrieval_keys_script(tmp_path, monkeypatch, capsys):
    """scripts/retrieval_keys.py (README: "measures a checkpoint's keys") runs on the published key, the
    centred key and centred memory, and its encoder output is the one the encoder normalises: norm_out
    also sees the landmark slice alone, which must not be taken for it."""
    from safetensors.torch import save_model

    rk = _script("retrieval_keys")
    _prepare_words(tmp_path, docs=12, words_per_doc=400, vocab=40, seed=2)
    for i, kw in enumerate([{}, dict(retrieval_key="centered"), dict(center_memory=True)]):
        torch.manual_seed(0)
        m = DRT(tiny(top_k=2, **kw)).eval()
        ckpt = tmp_path / f"model{i}"
        ckpt.mkdir()
        save_model(m, str(ckpt / "model.safetensors"))
        (ckpt / "config.json").write_text(m.config.to_json())
        out = tmp_path / f"keys{i}.json"
        monkeypatch.setattr(sys, "argv", ["retrieval_keys", "--ckpt", str(ckpt), "--data", str(tmp_path / "data"),
                                          "--seq-len", "630", "--batch-size", "1", "--out", str(out)])  # fmt: skip
        rk.main()
        res = json.loads(out.read_text())
        assert all(math.isfinite(v) for k, v in res.items() if k not in ("ckpt", "retrieval_key"))
        if not kw:  # published key: the 4-d input of norm_out is the encoder output before its norm
            seen = []
            h = m.encoder.norm_out.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
            ids = rk.build_source(str(tmp_path / "data"), seq_len=630, seed=3, split="val").get_batch(0, 1, 0, 1)
            with torch.no_grad():
                m(ids["input_ids"])
            h.remove()
            (x,) = [t for t in seen if t.dim() == 4]
            assert res["encoder_out_rms"] == round(x.pow(2).mean().sqrt().item(), 3)
    capsys.readouterr()


def test_far_context_matches_brute_force(tmp_path):
    """scripts/far_context.py: the nearest earlier (n + 1)-gram match of every token, across the stream and
    within the token's document, equals a brute-force search; the shares of each split sum to one."""
    from gca.data.prepare import prepare

    fc = _script("far_context")
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    tokens = rng.integers(1, 4, size=400)  # three symbols: many matches
    groups = np.repeat(np.arange(4), 100)
    for n in (1, 2, 4):
        h = fc.ngram_hashes(tokens, n)
        got_any, got_doc = fc.nearest_previous(h), fc.nearest_previous(h, groups[n:])
        for i in range(len(h)):
            t = i + n
            want_any = want_doc = 0
            for j in range(t - 1, n - 1, -1):
                if np.array_equal(tokens[j - n : j + 1], tokens[t - n : t + 1]):
                    want_any = want_any or t - j
                    if groups[j] == groups[t] and not want_doc:
                        want_doc = t - j
                        break
            assert (got_any[i], got_doc[i]) == (want_any, want_doc), (n, t)
    src = tmp_path / "src"
    src.mkdir()
    words = " ".join(f"w{i}" for i in range(300))
    for i in range(6):  # each document says its first part again after ~1000 tokens of other text
        (src / f"d{i}.txt").write_text(f"doc {i} " + words + " " + " ".join(f"x{i}y{k}" for k in range(400)) + " " + words)
    prepare(str(src), str(tmp_path / "data"), tokenizer="embedded", val_fraction=0.5)
    (r,) = fc.main(["--data", str(tmp_path / "data"), "--split", "val", "--n", "8", "--out", str(tmp_path / "far.json"),
                    "--plot", str(tmp_path / "far.png")])
    assert (tmp_path / "far.png").stat().st_size > 10_000
    s = r["n"]["8"]
    for key in ("any", "same_document"):
        assert abs(sum(s[key].values()) - 1) < 1e-9
    assert s["beyond_window_same_document"]["(512, 4032]"] > 0.1  # the repeated part, ~1000+ tokens back
    assert json.loads((tmp_path / "far.json").read_text())[0]["tokens"] == r["tokens"]


def test_code_corpus_script(tmp_path):
    """scripts/code_corpus.py: one document per folder of .py files (not its subfolders'), files sorted and
    headed by their path, large files and other extensions skipped, --max-chars respected; `gca prepare`
    reads the output."""
    from gca.data.prepare import PackedDataset, prepare

    cc = _script("code_corpus")
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "b.py").write_text("def b():\n    return 2\n")
    (root / "a.py").write_text("def a():\n    return 1\n")
    (root / "notes.txt").write_text("not code")
    (root / "big.py").write_text("x = 1\n" * 200)
    (root / "sub" / "c.py").write_text("C = 3\n")
    out = tmp_path / "code.jsonl"
    cc.main(["--root", str(root), "--out", str(out), "--max-file-bytes", "600"])
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["folder"] for d in docs] == ["pkg", "pkg/sub"]
    assert docs[0]["text"] == "# file: pkg/a.py\ndef a():\n    return 1\n\n# file: pkg/b.py\ndef b():\n    return 2\n"
    assert "x = 1" not in docs[0]["text"] and "not code" not in docs[0]["text"]
    assert docs[1]["text"] == "# file: pkg/sub/c.py\nC = 3\n"
    limit = str(len(docs[0]["text"]) + 1)
    cc.main(["--root", str(root), "--out", str(out), "--max-file-bytes", "600", "--max-chars", limit])
    assert len(out.read_text().splitlines()) == 1  # the second folder would pass the limit
    prepare(str(out), str(tmp_path / "data"), tokenizer="embedded", val_fraction=0.0)
    assert len(PackedDataset(tmp_path / "data", "train")) > 10
    with pytest.raises(SystemExit, match="not a folder"):
        cc.main(["--root", str(tmp_path / "missing"), "--out", str(out)])


def test_loss_by_copy_distance_script(tmp_path):
    """scripts/loss_by_copy_distance.py: the groups' tokens add up to the scored text, their weighted
    perplexity is the ppl command's on the same end points, and each token's group follows its nearest
    match (brute force on the text)."""
    from gca.data.prepare import prepare
    from gca.eval.perplexity import fixed_end_points, perplexity_vs_length
    from safetensors.torch import save_model

    lc, fc = _script("loss_by_copy_distance"), _script("far_context")
    src = tmp_path / "txt"
    src.mkdir()
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    words = [f"w{i}" for i in range(12)]  # a small vocabulary: matches at every distance
    for d in range(8):
        (src / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 400)))
    prepare(str(src), str(tmp_path / "data"), tokenizer="embedded", val_fraction=0.6)
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        m = DRT(tiny(window=40)).eval()
        (tmp_path / name).mkdir()
        save_model(m, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(m.config.to_json())
        models[name] = m
    out = tmp_path / "copy.json"
    rows = lc.main(["--ckpt", f"a={tmp_path / 'a'}", "--ckpt", f"b={tmp_path / 'b'}", "--data", str(tmp_path / "data"),
                    "--lengths", "150,600", "--targets", "150", "--windows", "3", "--n", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    for name, m in models.items():
        ref = perplexity_vs_length(m, str(tmp_path / "data"), [150, 600], windows=3, targets=150, seed=1234, progress=False)
        for r in ref:
            mine = [x for x in rows if x["model"] == name and x["context_length"] == r["context_length"]]
            assert sum(x["tokens"] for x in mine) == r["tokens"] == 3 * 149
            mean = sum(x["tokens"] * x["nll"] for x in mine if x["tokens"]) / r["tokens"]
            # fp32 sums in another order (per token here, per piece there): ~1e-6 apart at ppl ~2000
            assert math.exp(mean) == pytest.approx(r["ppl"], rel=1e-5)
    # the groups, by brute force: window (<= 40 back), beyond it within the context, or neither
    from gca.data import PackedDataset

    tokens = np.asarray(PackedDataset(tmp_path / "data", "val").tokens, dtype=np.int64)
    ends = fixed_end_points(len(tokens), [150, 600], 3, np.random.default_rng(1234))
    dist = fc.nearest_previous(fc.ngram_hashes(tokens, 2))
    for N in (150, 600):
        groups = lc.copy_groups(dist, 2, ends, N, 149, 40)
        for w, e in enumerate(ends):
            for j, p in enumerate(range(e - 149, e)):
                back = next((p - q for q in range(p - 1, 1, -1) if np.array_equal(tokens[q - 2 : q + 1], tokens[p - 2 : p + 1])), 0)
                want = 2 if not 0 < back <= p - (e - N) else 0 if back <= 40 else 1  # (a match before the context: 2)
                assert groups[w, j] == want, (N, p, back)
        counts = [x["tokens"] for x in rows if x["model"] == "a" and x["context_length"] == N]
        assert counts == [int((groups == g).sum()) for g in range(3)]
    # the split that does not change with the length: the shortest context holding the match
    reach = lc.reach_groups(dist, 2, ends, [600, 150], 149, 40)
    for w, e in enumerate(ends):
        for j, p in enumerate(range(e - 149, e)):
            back = next((p - q for q in range(p - 1, 1, -1) if np.array_equal(tokens[q - 2 : q + 1], tokens[p - 2 : p + 1])), 0)
            first = next((k for k, N in enumerate((150, 600)) if 0 < back <= p - (e - N)), None)
            want = 3 if first is None else 0 if first == 0 and back <= 40 else first + 1
            assert reach[w, j] == want, (p, back)
    by_reach = json.loads(out.read_text())["by_reach"]
    assert [r["reach"] for r in by_reach[:4]] == ["window", "in 150", "in 600", "in none"]
    for name, m in models.items():
        for N in (150, 600):
            mine = [r for r in by_reach if r["model"] == name and r["context_length"] == N]
            assert [r["tokens"] for r in mine] == [int((reach == g).sum()) for g in range(4)]
            same = [x for x in rows if x["model"] == name and x["context_length"] == N]
            total = sum(r["tokens"] * r["nll"] for r in mine if r["tokens"])
            assert total == pytest.approx(sum(x["tokens"] * x["nll"] for x in same if x["tokens"]), rel=1e-9)
    assert (reach == 2).any() and (reach == 0).any()  # both far and near matches occur in this text
    # the summary, reprinted from the file: every token's change from 150 to 600 is the ppl command's
    lines = lc.summarize(json.loads(out.read_text()))
    assert lc.main(["--summary", str(out)]) is None
    ref = {r["context_length"]: r["ppl"] for r in perplexity_vs_length(
        models["a"], str(tmp_path / "data"), [150, 600], windows=3, targets=150, seed=1234, progress=False)}
    every = next(line for line in lines if line.startswith("every token (447)"))
    printed = float(every.split(": ")[-1].split(", ")[0].removeprefix("a ").rstrip("%"))
    assert printed == pytest.approx(100 * (ref[600] / ref[150] - 1), abs=0.006)  # printed to 0.01%
    assert [line.split(" (")[0] for line in lines[-4:]] == ["tokens window", "tokens in 150", "tokens in 600", "tokens in none"]
    # each model's level per reach group, and two files of the same text as one (a clashing name gets its folder)
    level = next(line for line in lines if line.startswith("perplexity at 150 / 600, tokens in 600"))
    far = [r for r in by_reach if r["model"] == "a" and r["reach"] == "in 600"]
    assert f"a {math.exp(far[0]['nll']):.2f} / {math.exp(far[1]['nll']):.2f}" in level
    other = tmp_path / "other"
    other.mkdir()
    (other / "copy.json").write_text(out.read_text())
    merged = lc.summarize(lc.merge([str(out), str(other / "copy.json")]))
    assert any(line.startswith("a vs other/a at 600, perplexity by group: window +0.0%") for line in merged)
    changed = json.loads(out.read_text())
    changed["seed"] += 1
    (other / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="seed"):  # other end points: not the same text
        lc.main(["--summary", str(out), str(other / "changed.json")])
    with pytest.raises(SystemExit):  # more targets than the shortest context holds
        lc.main(["--ckpt", f"a={tmp_path / 'a'}", "--data", str(tmp_path / "data"), "--lengths", "150,600",
                 "--targets", "300", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):  # a checkpoint without a name
        lc.main(["--ckpt", str(tmp_path / "a"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "x.json")])


def _copy_hits_setup(tmp_path):
    """A prepared folder of random 14-word text (fresh each run), a tiny two-group DRT in float64 and
    the retrieval_copy_hits inputs: ``(rc, fc, tokens, m, ends, dist, N, T, n, window, P)``."""
    from gca.data import PackedDataset
    from gca.data.prepare import prepare
    from gca.eval.perplexity import fixed_end_points

    rc, fc = _script("retrieval_copy_hits"), _script("far_context")
    src = tmp_path / "txt"
    src.mkdir()
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    words = [f"w{i}" for i in range(14)]
    for d in range(16):  # ~1000 tokens each, ~60% held out: the split holds the 1200-token windows
        (src / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 500)))
    prepare(str(src), str(tmp_path / "data"), tokenizer="embedded", val_fraction=0.6)
    tokens = np.asarray(PackedDataset(tmp_path / "data", "val").tokens, dtype=np.int64)
    N, T, n, window = 1200, 149, 2, 40
    torch.manual_seed(int(rng.integers(2**31)))
    m = DRT(tiny(window=window, top_k=3, upper_groups=[1, 1])).double().eval()
    ends = fixed_end_points(len(tokens), [150, N], 3, np.random.default_rng(1234))
    dist = fc.nearest_previous(fc.ngram_hashes(tokens, n))
    return rc, fc, tokens, m, ends, dist, N, T, n, window, m.config.text_per_chunk


def test_retrieval_copy_hits_script(tmp_path):
    """scripts/retrieval_copy_hits.py: the far-copy tokens and their retrieval rows follow a brute-force
    search; the recorded streaming picks are the full forward's retrieval at every row a scored token
    reads; the hit statistics match a per-token count; the script runs end to end."""
    from safetensors.torch import save_model

    rc, fc, tokens, m, ends, dist, N, T, n, window, P = _copy_hits_setup(tmp_path)

    # the targets, by brute force
    tg = rc.far_copy_targets(dist, n, ends, N, T, window, P)
    want = []
    for w, e in enumerate(ends):
        for t in range(N - T, N):
            p = e - N + t  # the predicted token, globally
            back = next((p - q for q in range(p - 1, n - 1, -1) if np.array_equal(tokens[q - n : q + 1], tokens[p - n : p + 1])), 0)
            row, source = (t - 1) // P - 1, (t - back) // P
            if window < back <= t and row >= 1 and source <= row - 1:
                want.append((w, t, back, source, row))
    got = sorted(zip(*(tg[k].tolist() for k in ("w", "t", "d", "source", "row"))))
    assert got == sorted(want) and len(want) > 20

    # the streaming picks are the full forward's retrieval at the rows the scored tokens read
    import gca.model as gca_model

    ids = torch.from_numpy(np.stack([tokens[e - N : e] for e in ends]))
    hook, real = rc.RecordRetrieval(len(m.groups)), gca_model.causal_topk
    gca_model.causal_topk = hook
    try:
        stream_nll(m, ids, last=T)
    finally:
        gca_model.causal_topk = real
    full = m(ids, output_retrieval=True).retrieval
    for g in range(len(m.groups)):
        idx, wt = hook.table(g, len(ends), N // P, 3)
        rows = sorted(set(tg["row"].tolist()))
        assert (idx[tg["w"], tg["row"]] >= 0).any(1).all()  # every scored token's row was recorded
        ref = full[g].indices[:, rows].numpy()
        np.testing.assert_array_equal(np.sort(idx[:, rows], -1), np.sort(ref, -1))
        # hit statistics against a per-token count
        stats = rc.score_hits(tg, idx, wt, [40, 300])
        hits = [tg["source"][j] in idx[tg["w"][j], tg["row"][j]] for j in range(len(tg["w"]))]
        assert stats[0]["bin"] == "all" and stats[0]["tokens"] == len(hits)
        assert stats[0]["hit"] == pytest.approx(np.mean(hits))
        chance = np.mean([min(3, r) / r for r in tg["row"]])
        assert stats[0]["chance"] == pytest.approx(chance)
        assert sum(s["tokens"] for s in stats[1:]) == stats[0]["tokens"]

    # end to end through a saved checkpoint
    (tmp_path / "ck").mkdir()
    save_model(m.float(), str(tmp_path / "ck" / "model.safetensors"))
    (tmp_path / "ck" / "config.json").write_text(m.config.to_json())
    out = tmp_path / "hits.json"
    rows = rc.main(["--ckpt", str(tmp_path / "ck"), "--data", str(tmp_path / "data"), "--lengths", f"150,{N}",
                    "--windows", "3", "--n", str(n), "--bins", "40,300", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and {r["context_length"] for r in rows} == {150, N}
    assert {r["group"] for r in rows} == {0, 1} and all(0 <= r["chance"] <= 1 for r in rows if r["tokens"])
    assert all(r["hit"] is None for r in rows if not r["tokens"])  # empty bins are null, not NaN
    # --summary: one table row per (model, length, group), its hit rates as saved
    lines = rc.main(["--summary", str(out), str(out)])
    assert len(lines) == 2 + 2 * 4 and "hit by distance (40-300 / 300+)" in lines[0]
    first = next(r for r in rows if r["bin"] == "all" and r["context_length"] == N and r["group"] == 1)
    want = f"| {tmp_path.name} | {first['model']} | {N} | 1 | {first['tokens']} | {100 * first['hit']:.1f}% |"
    assert sum(line.startswith(want) for line in lines) == 2


def test_retrieval_copy_hits_oracle(tmp_path):
    """retrieval_copy_hits --oracle: the oracle's table holds each row's distinct source chunks, most
    tokens first (a brute-force count); the streamed pass reads them at equal weights in the rows it
    fills and the model's own picks elsewhere (group 0); its per-token NLL is the full forward's with the same
    picks; the tokens it scores as retrieved are those of the plain pass; end to end, the saved rows
    and the summary's second table."""
    import gca.model as gca_model
    from safetensors.torch import save_model

    rc, fc, tokens, m, ends, dist, N, T, n, window, P = _copy_hits_setup(tmp_path)
    k, B, rows = 3, len(ends), N // P
    tg = rc.far_copy_targets(dist, n, ends, N, T, window, P)
    table = rc.oracle_table(tg, B, rows, k)
    want = np.full((B, rows, k), -1)
    for w in range(B):
        for r in range(rows):
            srcs = tg["source"][(tg["w"] == w) & (tg["row"] == r)].tolist()
            ranked = sorted(set(srcs), key=lambda c: (-srcs.count(c), -c))[:k]
            want[w, r, : len(ranked)] = ranked
    np.testing.assert_array_equal(table, want)
    assert (table >= 0).any(-1).sum() >= 10 and (table[..., 1] >= 0).any()  # rows with several sources too

    ids = torch.from_numpy(np.stack([tokens[e - N : e] for e in ends]))
    real = gca_model.causal_topk
    plain, oracle = rc.RecordRetrieval(len(m.groups)), rc.OracleRetrieval(len(m.groups), table)
    try:
        gca_model.causal_topk = plain
        nll = stream_token_nll(m, ids, last=T).numpy()
        gca_model.causal_topk = oracle
        nll_oracle = stream_token_nll(m, ids, last=T).numpy()
        gca_model.causal_topk = rc.OracleRetrieval(len(m.groups), table)
        logits = m(ids).logits  # the full forward, through the same oracle
    finally:
        gca_model.causal_topk = real
    full = torch.nn.functional.cross_entropy(logits[:, -T - 1 : -1].transpose(1, 2), ids[:, -T:], reduction="none")
    np.testing.assert_allclose(nll_oracle, full.detach().numpy(), rtol=1e-9, atol=1e-9)
    filled = (table >= 0).any(-1)
    for g in range(len(m.groups)):
        idx, wt = oracle.table(g, B, rows, k)
        pidx, pwt = plain.table(g, B, rows, k)
        seen = (pidx >= 0).any(-1)  # rows the streamed pass made (the last rows serve no scored token)
        np.testing.assert_array_equal(idx[filled], table[filled])
        count = (table[filled] >= 0).sum(-1, keepdims=True)
        np.testing.assert_allclose(wt[filled], np.where(table[filled] >= 0, 1 / count, 0))
        if g == 0:  # group 0 scores from the lower layers' states, which the oracle does not touch; later
            # groups score from states that earlier groups' oracle reads changed, so their own picks move
            np.testing.assert_array_equal(idx[~filled & seen], pidx[~filled & seen])
            np.testing.assert_allclose(wt[~filled & seen], pwt[~filled & seen])
    # the oracle moves the far-copyable tokens (its rows read other chunks)
    j = tg["t"] - (N - T)
    assert not np.allclose(nll[tg["w"], j], nll_oracle[tg["w"], j])
    stats = rc.oracle_rows(tg, nll, nll_oracle, table, dist, n, ends, N, T, window, P, [40, 300])
    assert [r["bin"] for r in stats] == ["all", "40-300", "300+", "other", "in window"]
    assert stats[0]["tokens"] == len(j) and stats[0]["ppl"] == pytest.approx(math.exp(nll[tg["w"], j].mean()))
    assert stats[0]["ppl_oracle"] == pytest.approx(math.exp(nll_oracle[tg["w"], j].mean()))
    d = fc.match_distance(dist, n, ends[:, None] - N + np.arange(N - T, N)[None])
    assert stats[-1]["tokens"] == int(((d > 0) & (d <= window)).sum()) > 0

    # end to end
    (tmp_path / "ck").mkdir()
    save_model(m.float(), str(tmp_path / "ck" / "model.safetensors"))
    (tmp_path / "ck" / "config.json").write_text(m.config.to_json())
    out = tmp_path / "hits.json"
    rc.main(["--ckpt", str(tmp_path / "ck"), "--data", str(tmp_path / "data"), "--lengths", f"150,{N}",
             "--windows", "3", "--n", str(n), "--bins", "40,300", "--oracle", "--out", str(out)])
    saved = json.loads(out.read_text())
    got = [r for r in saved["oracle"] if r["context_length"] == N]
    assert [r["bin"] for r in got] == ["all", "40-300", "300+", "other", "in window"]
    assert got[0]["tokens"] == stats[0]["tokens"]
    assert got[0]["ppl_oracle"] == pytest.approx(stats[0]["ppl_oracle"], rel=1e-3)  # float32 there
    lines = rc.main(["--summary", str(out)])
    line = next(x for x in lines if x.startswith(f"| {tmp_path.name} | ") and f"| {N} | {got[0]['tokens']} |" in x)
    assert f"| {got[0]['ppl']:.2f} | {got[0]['ppl_oracle']:.2f} |" in line
    # two runs' files in folders of the same name (a/eval, b/eval): labelled apart, each with its own figures
    other = json.loads(out.read_text())
    for r in other["oracle"]:
        r["ppl"] = None if r["ppl"] is None else r["ppl"] + 1.0
        r["ppl_oracle"] = None if r["ppl_oracle"] is None else r["ppl_oracle"] + 1.0
    paths = [tmp_path / "a" / "eval" / "hits.json", tmp_path / "b" / "eval" / "hits.json"]
    for path, text in zip(paths, [out.read_text(), json.dumps(other)]):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    lines = rc.main(["--summary", *map(str, paths)])
    for label, r in [("a/eval", got[0]), ("b/eval", next(q for q in other["oracle"] if q["context_length"] == N))]:
        line = next(x for x in lines if x.startswith(f"| {label} | ") and f"| {N} | {r['tokens']} |" in x)
        assert f"| {r['ppl']:.2f} | {r['ppl_oracle']:.2f} |" in line
        want = sum(q["bin"] == "all" for q in saved["rows"]) + sum(q["bin"] == "all" for q in saved["oracle"])
        assert sum(x.startswith(f"| {label} | ") for x in lines) == want  # both tables


# ---- the eval, plot, generate and bench commands: what users see ----
SHIPPED = str(Path(__file__).resolve().parents[1] / "checkpoints" / "passkey-tiny")


def _saved_run(tmp_path, name: str, seq_len: int = 400, **kw) -> Path:
    """A run folder as `gca train --out` leaves it: random weights in DIR/ckpt, trained at ``seq_len``."""
    from gca.train.checkpoint import save_model

    ck = save_model(DRT(tiny(**kw)), tmp_path / name / "ckpt")
    (ck / "train_config.json").write_text(json.dumps({"seq_len": seq_len}))
    return tmp_path / name


def test_eval_tasks_of_a_baseline_names_its_run_and_leaves_retrieval_empty(tmp_path, capsys):
    """--ckpt RUN/ckpt records the run's name (not "ckpt"); a model without retrieval stores
    retrieval_hit null (not 0), prints '-' and no "(needle not retrieved)", and draws no retrieval
    plot; 0.5x is shown as 0.5x (it was 0x)."""
    run = _saved_run(tmp_path, "swa-run", arch="swa")
    out = tmp_path / "eval"
    assert main(["eval", "tasks", "--ckpt", str(run / "ckpt"), "--lengths", "0.5x,1x", "--depths", "1", "--trials", "2",
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = json.loads((out / "tasks.json").read_text())
    assert [r["context_length"] for r in rows] == [200, 400] and {r["model"] for r in rows} == {"swa-run"}
    assert all(r["retrieval_hit"] is None for r in rows)
    misses = [m for r in rows for m in r["misses"]]
    assert misses and all(m["needle_retrieved"] is None for m in misses)  # the untrained model misses
    table = {ln.split()[1]: ln.split() for ln in printed.splitlines() if ln.startswith("passkey ")}
    assert table["200"][2] == "0.5x" and table["400"][2] == "1x"
    assert table["200"][4] == "-" and table["400"][4] == "-"  # retrieval hit
    assert "miss: " in printed and "needle" not in printed
    assert (out / "accuracy_vs_length.png").exists() and not (out / "retrieval_vs_length.png").exists()


def test_eval_ppl_prints_a_huge_perplexity_in_scientific_notation(tmp_path, capsys, monkeypatch):
    from gca.eval import perplexity

    run = _saved_run(tmp_path, "t1")

    def fake(model, data, lengths, windows, **kw):
        return [dict(context_length=n, ppl=1980169070461008128.0 / i, tokens=n - 1, windows=1)
                for i, n in enumerate(lengths, 1)]

    monkeypatch.setattr(perplexity, "perplexity_vs_length", fake)
    monkeypatch.setattr(perplexity, "longest_document", lambda data: 0)
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", "d", "--lengths", "1x,1.5x", "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "context        400 (1x): ppl 1.98e+18 over 399 tokens"
    assert lines[1] == "context        600 (1.5x): ppl 9.901e+17 over 599 tokens"
    from gca.eval.cli import _fmt_ppl

    assert _fmt_ppl(2164.82145) == "2164.821" and _fmt_ppl(float("inf")) == "inf"


def test_output_paths_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    """A file as `eval --out` (a folder), or a path through a file as `bench --out`, ends in one line
    before the model loads or the benchmark runs (before: after it, losing the results)."""
    import gca.eval.cli as ecli
    import gca.inference.bench as ib

    def never(*a, **k):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(ecli, "load_for_eval", never)
    monkeypatch.setattr(ib, "bench_streaming", never)
    f = tmp_path / "results.json"
    f.write_text("{}")
    for what, json_name in (("tasks", "tasks.json"), ("ppl", "ppl.json")):
        extra = ["--data", str(tmp_path)] if what == "ppl" else []
        assert main(["eval", what, "--ckpt", SHIPPED, *extra, "--out", str(f)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"gca eval: error: --out {f} is a file: give a folder (eval {what} writes {json_name} and its plots into it)"]
    assert main(["bench", "--preset", "tiny", "--lengths", "300", "--device", "cpu", "--out", str(f / "b.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gca bench: error: --out {f / 'b.json'}: a file stands where its folder should be; give another path"]
    assert f.read_text() == "{}"


def test_bench_prints_its_plan_first_and_writes_into_an_out_folder(tmp_path, capsys, monkeypatch):
    """`gca bench` with no --preset / --lengths on a CPU: the tiny preset at 4K-64K (the small one at
    64K-1M took minutes, silently); the plan is printed before the work; an existing folder as --out
    gets bench.json (before: IsADirectoryError after the whole benchmark)."""
    import gca.inference.bench as ib

    seen = {}

    def fake(model, lengths, **kw):
        seen.update(printed=capsys.readouterr().out, lengths=lengths, hidden=model.config.hidden_size)
        return [dict(context_length=n, offload=False, overlap=True, prefill_s=1.0, prefill_tokens_per_s=n,
                     decode_tokens_per_s=10.0, peak_mem_gb=0.1) for n in lengths]

    monkeypatch.setattr(ib, "bench_streaming", fake)
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["bench", "--device", "cpu", "--offload", "off", "--out", str(folder)]) == 0
    assert seen["lengths"] == [4096, 16384, 65536] and seen["hidden"] == DRTConfig.from_preset("tiny").hidden_size
    assert seen["printed"].startswith("bench: a random tiny model (") and seen["printed"].endswith(
        " parameters, float32) on cpu, lengths 4096,16384,65536, offload off, 64 decode tokens\n")
    assert [r["context_length"] for r in json.loads((folder / "bench.json").read_text())] == [4096, 16384, 65536]
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {folder / 'bench.json'}"


def test_bench_of_a_baseline_measures_without_offload(tmp_path, capsys):
    """`gca bench --ckpt` of a swa / full run: --offload on measured nothing (an empty table and "bench": []),
    silently, and a passkey trial said the needle's chunk was not retrieved; the default (both) runs it
    once, without offload, and a trial's retrieval_hit is null."""
    for arch in ("swa", "full"):
        run = _saved_run(tmp_path, arch, arch=arch, vocab_size=2048)
        bench = ["bench", "--ckpt", str(run), "--lengths", "300", "--decode-tokens", "2", "--device", "cpu"]
        assert main(bench + ["--offload", "on"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"gca bench: error: --offload on: a {arch} model has no chunk memory to offload; use --offload off"]
        out = tmp_path / f"{arch}.json"
        assert main(bench + ["--passkey-trial", "300", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"offload off (a {arch} model has no chunk memory)" in printed.splitlines()[0]
        assert "passkey trial 300 tokens, offload False" in printed and "needle" not in printed
        res = json.loads(out.read_text())
        assert [r["offload"] for r in res["bench"]] == [False] and res["bench"][0]["arch"] == arch
        (t,) = res["passkey_trials"]
        assert t["offload"] is False and t["retrieval_hit"] is None and isinstance(t["correct"], bool)


def test_plot_out_folder_or_name_without_suffix_says_what_it_wrote(tmp_path, capsys):
    run = tmp_path / "t1"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) for s in range(1, 5)) + "\n")
    folder = tmp_path / "out"
    folder.mkdir()
    for out, wrote in ((folder, folder / "curves.png"), (tmp_path / "c", tmp_path / "c.png")):
        assert main(["plot", str(run), "--out", str(out)]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"wrote {wrote}"
        assert wrote.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_plot_without_validation_rows_warns_nothing(tmp_path):
    """A run with no validation rows yet leaves panels empty: no matplotlib warning about an empty
    legend (`gca plot` printed one)."""
    import warnings

    from gca.eval.plots import plot_training_logs

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_training_logs({"t1": [{"step": s, "loss": 5.0} for s in range(1, 5)]}, str(tmp_path / "c.png"))


def test_generate_prompt_options_and_sampling_options_without_sampling(tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The passkey is")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt", SHIPPED, "--prompt", "hi", "--prompt-file", str(prompt), "--device", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "gca generate: error: argument --prompt-file: not allowed with argument --prompt")
    gen = ["generate", "--ckpt", SHIPPED, "--prompt-file", str(prompt), "--max-new-tokens", "2", "--device", "cpu"]
    assert main(gen + ["--temperature", "0.7", "--top-p", "0.9"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "gca generate: warning: --temperature, --top-p apply only with --do-sample; decoding is greedy"
    assert main(gen + ["--temperature", "0.7"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "gca generate: warning: --temperature applies only with --do-sample; decoding is greedy")
    assert main(gen + ["--temperature", "0.7", "--do-sample"]) == 0
    assert "warning" not in capsys.readouterr().err
    # a folder, or a file that is not UTF-8, as --prompt-file: said in words ("no such file" / a codec error)
    assert main(["generate", "--ckpt", SHIPPED, "--prompt-file", str(tmp_path), "--device", "cpu"]) == 2
    assert f"--prompt-file {tmp_path} is a folder: give a text file" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 \x98".encode("latin-1"))
    assert main(["generate", "--ckpt", SHIPPED, "--prompt-file", str(tmp_path / "latin1.txt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "iconv -f latin1 -t utf-8" in err
    # --tokenizer beside a checkpoint that has its own: ignored, and said so
    assert main(gen + ["--tokenizer", "gpt2"]) == 0
    assert "--tokenizer gpt2 is ignored: the checkpoint has its own tokenizer.json" in capsys.readouterr().err


def test_generate_names_a_tokenizer_the_model_cannot_read(tmp_path, capsys):
    """A checkpoint without tokenizer.json, of a vocabulary smaller than the (default embedded) tokenizer's,
    ended in the model's "input_ids must lie in [0, 97)"; now the line names the tokenizer and the fix."""
    run = _saved_run(tmp_path, "v97", vocab_size=97)
    gen = ["generate", "--ckpt", str(run), "--prompt", "The passkey is", "--max-new-tokens", "2", "--device", "cpu"]
    assert main(gen) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gca generate: error: the prompt's ids under the tokenizer embedded (2048 ids) ")
    assert err[0].endswith("beyond the model's vocabulary of 97: it has no tokenizer.json: pass the tokenizer of the "
                           "data it was trained on as --tokenizer")
    own = _saved_run(tmp_path, "v2048")
    assert main(["generate", "--ckpt", str(own), *gen[3:]]) == 0


def _parsers():
    """{"bench": parser, ..., "eval tasks": parser, "eval ppl": parser} of the gca command."""
    import argparse

    from gca.cli import build_parser

    def sub(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    top = sub(build_parser())
    return {**{c: top[c] for c in ("bench", "generate", "plot")}, **{f"eval {c}": p for c, p in sub(top["eval"]).items()}}


def test_every_option_that_takes_a_value_says_its_default():
    for name, p in _parsers().items():
        for a in p._actions:
            if a.option_strings and a.nargs != 0 and not a.required:
                assert "default" in (a.help or "") or "required" in (a.help or ""), (name, a.option_strings)


def test_eval_tasks_and_ppl_each_have_their_own_options(capsys):
    parsers = _parsers()
    opts = {w: {s for a in parsers[f"eval {w}"]._actions for s in a.option_strings} for w in ("tasks", "ppl")}
    shared = {"--ckpt", "--lengths", "--train-length", "--seed", "--offload", "--device", "--dtype", "--name", "--out"}
    assert opts["tasks"] - opts["ppl"] == {"--tasks", "--depths", "--hop-lead", "--hop-answer", "--trials", "--batch-size",
                                           "--filler", "--prefill-chunk", "--resume"}
    assert opts["ppl"] - opts["tasks"] == {"--data", "--windows", "--targets"}
    assert shared <= opts["tasks"] & opts["ppl"]
    for what, mine, other in (("tasks", "--trials", "--windows"), ("ppl", "--windows", "--trials")):
        with pytest.raises(SystemExit):
            main(["eval", what, "--help"])
        text = capsys.readouterr().out
        assert text.startswith(f"usage: gca eval {what} ") and mine in text and other not in text
    with pytest.raises(SystemExit) as e:  # an option of the other subcommand is refused, no longer ignored
        main(["eval", "tasks", "--ckpt", SHIPPED, "--windows", "2"])
    assert e.value.code == 2 and "unrecognized arguments: --windows 2" in capsys.readouterr().err


def test_lengths_must_come_to_whole_tokens(capsys):
    """`--lengths 100.7` ran at 100 tokens, 4.1K at 4198 and 0.3x of 504 at 151, silently cut down, and float
    arithmetic made 0.29x of 100 into 28: each is now exact, or refused in one line naming the length."""
    from gca.eval.cli import _times, parse_lengths

    assert parse_lengths("0.29x,0.5x,1.5K,64K,1M", 100) == [29, 50, 1536, 65536, 1 << 20]
    for text, says in [("100.7", "bad length '100.7': 100.7 tokens, not a whole number"),
                       ("4.1K", "bad length '4.1K': 4.1K is 4198.4 tokens, not a whole number"),
                       ("0.3x", "bad length '0.3x': 0.3x of the training length 504 is 151.2 tokens, not a whole")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_lengths(text, 504)
    for argv in (["eval", "tasks", "--ckpt", SHIPPED, "--lengths", "1x,100.7"],
                 ["eval", "ppl", "--ckpt", SHIPPED, "--data", "d", "--lengths", "0.3x"],
                 ["bench", "--preset", "tiny", "--lengths", "4.1K"]):
        assert main(argv + ["--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(f"gca {argv[0]}: error: bad length"), err
    assert _times(2, 504) == "0.004x" and _times(252, 504) == "0.5x"  # (2 tokens showed as 0x)


def _prepared(tmp_path, name, tokenizer="embedded"):
    from gca.data.prepare import prepare

    src = tmp_path / f"{name}-txt"
    src.mkdir()
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega the of and to in is".split()
    for i in range(6):
        (src / f"d{i}.txt").write_text(f"document {i}. " + " ".join(words[(j * j + i) % len(words)] for j in range(600)))
    if tokenizer == "bpe":  # (enough whole words for the needle tasks' keys)
        from gca.data import train_bpe

        tokenizer = train_bpe([str(src)], vocab_size=300, show_progress=False)
    prepare([str(src)], tmp_path / name, tokenizer=tokenizer, val_fraction=0.5, progress=False)
    return tmp_path / name


def test_eval_refuses_text_of_another_tokenizer(tmp_path, capsys):
    """`gca eval ppl` of the shipped model (the embedded tokenizer) on a folder tokenised by a 300-id BPE
    printed a perplexity of its ids read as other words; --filler was checked for the vocabulary's size
    only. Both are refused now; a folder of the checkpoint's own tokenizer is scored."""
    other, same = _prepared(tmp_path, "bpe", "bpe"), _prepared(tmp_path, "emb")
    for argv in (["eval", "ppl", "--data", str(other)], ["eval", "tasks", "--filler", str(other), "--trials", "1"]):
        assert main(argv + ["--ckpt", SHIPPED, "--lengths", "130", "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"{other} was prepared with another tokenizer (bpe-300, 300 ids)" in err, err
    assert not (tmp_path / "e" / "ppl.json").exists()
    assert main(["eval", "ppl", "--ckpt", SHIPPED, "--data", str(same), "--lengths", "130", "--windows", "1",
                 "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0  # fmt: skip


def test_eval_tasks_of_a_checkpoint_without_its_tokenizer(tmp_path, capsys):
    """A checkpoint without tokenizer.json was evaluated with the embedded tokenizer without a word: for a
    model of a smaller vocabulary that ended in "input_ids must lie in [0, 300)". Now a smaller vocabulary
    is refused naming the fix, a larger one warned of, and --filler's own tokenizer writes the needles."""
    small, full = _saved_run(tmp_path, "v300", vocab_size=300), _saved_run(tmp_path, "v2048")
    ev = ["eval", "tasks", "--lengths", "130", "--depths", "1", "--trials", "1", "--out", str(tmp_path / "e"),
          "--device", "cpu"]
    assert main(ev + ["--ckpt", str(small)]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json, and the embedded tokenizer's 2048 ids do not fit the model's vocabulary of 300" in err
    assert main(ev + ["--ckpt", str(small), "--filler", str(_prepared(tmp_path, "bpe", "bpe"))]) == 0
    assert main(ev + ["--ckpt", str(full)]) == 0
    assert "gca eval: warning: " in capsys.readouterr().err


def test_eval_names_a_corrupt_train_config(tmp_path, capsys):
    """A train_config.json that is not JSON ended in "gca eval: error: Expecting value: line 1 column 1"."""
    run = _saved_run(tmp_path, "t1")
    for text in ("{", "[1]", '{"seq_len": "504"}'):
        (run / "ckpt" / "train_config.json").write_text(text)
        assert main(["eval", "tasks", "--ckpt", str(run), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'ckpt' / 'train_config.json'}" in err and "Traceback" not in err, err


def test_ctrl_c_during_eval_says_what_was_kept(tmp_path, capsys, monkeypatch):
    """Ctrl-C in `gca eval` ended in a KeyboardInterrupt traceback; now one line says what the results file
    kept (it is written after each cell) and the status is the shell's for SIGINT."""
    from gca.eval import perplexity, tasks

    def stopped(rows):
        def fake(*a, on_row, **kw):
            if rows:
                on_row(rows)
            raise KeyboardInterrupt
        return fake

    run = _saved_run(tmp_path, "t1")
    row = dict(task="passkey", context_length=400, depth=0.5, accuracy=0.0, retrieval_hit=0.0)
    monkeypatch.setattr(tasks, "evaluate_tasks", stopped([row]))
    assert main(["eval", "tasks", "--ckpt", str(run), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"gca eval: interrupted: {tmp_path / 'e' / 'tasks.json'} keeps the 1 (task, "
                                            f"length, depth) cell(s) finished: rerun the same command with --resume to "
                                            f"measure the rest")
    assert len(json.loads((tmp_path / "e" / "tasks.json").read_text())) == 1
    monkeypatch.setattr(perplexity, "perplexity_vs_length", stopped([]))
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", "d", "--out", str(tmp_path / "p"), "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "gca eval: interrupted: nothing was finished"


def test_eval_tasks_resume_finishes_an_interrupted_run_as_an_uninterrupted_one(tmp_path, capsys, monkeypatch):
    """A long evaluation stopped part-way (Ctrl-C, a time limit) kept its finished cells in tasks.json, but the
    next run measured every cell again. `--resume` keeps the cells of the same seed, trials, filler, dtype and
    training length and measures only the rest; the rows equal an uninterrupted run's."""
    from gca.eval import tasks

    real = tasks.evaluate_tasks
    measured = []

    def counting(*a, on_row, stop_after=None, **kw):  # counts the cells measured now (on_row follows each)
        def row_done(rows):
            measured.append(rows[-1]["depth"])
            on_row(rows)
            if stop_after is not None and len(measured) == stop_after:
                raise KeyboardInterrupt
        return real(*a, on_row=row_done, **kw)

    run = _saved_run(tmp_path, "t1", seq_len=200)
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 20))  # fresh draws each run
    argv = ["eval", "tasks", "--ckpt", str(run), "--lengths", "1x,2x", "--depths", "2", "--trials", "2", "--tasks",
            "passkey,multikey", "--seed", str(seed), "--device", "cpu", "--prefill-chunk", "128"]
    monkeypatch.setattr(tasks, "evaluate_tasks", counting)
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "tasks.json").read_text())
    assert len(measured) == len(whole) == 8 and all(r["seed"] == seed and r["dtype"] == "float32" for r in whole)

    part = tmp_path / "part"
    measured.clear()
    monkeypatch.setattr(tasks, "evaluate_tasks", functools.partial(counting, stop_after=3))
    assert main(argv + ["--out", str(part)]) == 130
    assert len(json.loads((part / "tasks.json").read_text())) == 3 and "--resume" in capsys.readouterr().err
    measured.clear()
    monkeypatch.setattr(tasks, "evaluate_tasks", counting)
    assert main(argv + ["--out", str(part), "--resume"]) == 0
    assert len(measured) == 5 and "resume: 3 of the 8 (task, length, depth) cells" in capsys.readouterr().out
    untimed = [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((part / "tasks.json").read_text())]
    assert untimed == [{k: v for k, v in r.items() if k != "seconds"} for r in whole]

    # the lengths in another order give each cell another seed: nothing is kept
    measured.clear()
    swapped = [a if a != "1x,2x" else "2x,1x" for a in argv]
    assert main(swapped + ["--out", str(part), "--resume"]) == 0
    assert len(measured) == 8 and "resume: 0 of the 8" in capsys.readouterr().out
    # another seed keeps nothing and says why; done rows of another seed are refused by the function itself
    measured.clear()
    assert main(argv[:-6] + ["--seed", str(seed + 1), "--device", "cpu", "--prefill-chunk", "128", "--out", str(part),
                             "--resume"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert len(measured) == 8 and "resume: 0 of the 8" in out and "8 other row(s) of t1" in out
    with pytest.raises(ValueError, match="seed"):
        real(DRT(tiny()), ["passkey"], [200], 1, 2, seed=seed, done=[dict(whole[0], seed=seed + 1)], progress=False)


def test_evaluate_tasks_resumes_inside_a_cell_from_its_saved_trials():
    """A cell's trials were saved only when the whole cell ended, so a 16M-token read stopped after 3 of a
    cell's 4 trials (a minute each) lost all 3. `on_batch` hands out the cell's trials after each batch, and
    `partial=` goes on after them: only the rest are scored, and the rows equal an uninterrupted run's."""
    from gca.eval import tasks

    model = DRT(tiny()).eval()
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 20))  # fresh draws each run
    args = (model, ["passkey", "2hop"], [200], 2, 3)
    kw = dict(seed=seed, batch_size=1, progress=False)
    whole = tasks.evaluate_tasks(*args, **kw)
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731

    class Stop(Exception):
        pass

    rows, states = [], []

    def on_batch(state):
        states.append(state)
        if len(states) == 6:  # after the third cell's second trial (two states a cell): two trials of it saved
            raise Stop

    with pytest.raises(Stop):
        tasks.evaluate_tasks(*args, **kw, on_row=lambda r: rows.__setitem__(slice(None), list(r)), on_batch=on_batch)
    assert len(rows) == 2 and [s["done"] for s in states] == [1, 2, 1, 2, 1, 2]
    last = json.loads(json.dumps(states[-1]))  # as a file gives it back
    assert last["task"] == "2hop" and last["done"] == 2 and last["cell"] == [1, 0, 0]
    assert all(len(last[k]) == 2 for k in ("correct", "retrieval_hit", "distractor_answer", "first_hop", "predictions"))

    scored = []
    real_score = tasks.score_samples

    def counting(model, samples, **k):
        scored.append(len(samples))
        return real_score(model, samples, **k)

    tasks.score_samples, saved_fn = counting, tasks.score_samples
    try:
        resumed = tasks.evaluate_tasks(*args, **kw, done=rows, partial=[last])
    finally:
        tasks.score_samples = saved_fn
    assert sum(scored) == 4 * 3 - 2 * 3 - 2  # the last cell, and the third's one trial left
    assert untimed(resumed) == untimed(whole)

    # states that cannot stand for this evaluation are refused with what is wrong
    with pytest.raises(ValueError, match="seed"):
        tasks.evaluate_tasks(*args, **kw, partial=[dict(last, seed=seed + 1)])
    with pytest.raises(ValueError, match="trials done"):
        tasks.evaluate_tasks(*args, **kw, partial=[dict(last, correct=last["correct"][:1])])
    with pytest.raises(ValueError, match="trials done"):
        tasks.evaluate_tasks(*args, **kw, partial=[dict(last, done=3)])
    with pytest.raises(ValueError, match="done row"):
        tasks.evaluate_tasks(*args, **kw, done=whole, partial=[last])


def test_eval_tasks_resume_keeps_the_trials_of_a_stopped_cell(tmp_path, capsys, monkeypatch):
    """`gca eval tasks` saves an unfinished cell's trials in OUT/tasks.partial.json after each batch, says so when
    stopped, and `--resume` goes on after them; the file is gone once the cell ends, and the rows equal an
    uninterrupted run's. Another seed's entry is not kept, and says why."""
    from gca.eval import tasks

    real_score = tasks.score_samples
    calls = []

    def scoring(stop_at=None):
        def fake(model, samples, **k):
            calls.append(len(samples))
            if stop_at is not None and len(calls) == stop_at:
                raise KeyboardInterrupt
            return real_score(model, samples, **k)
        return fake

    run = _saved_run(tmp_path, "t1", seq_len=200)
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 20))
    argv = ["eval", "tasks", "--ckpt", str(run), "--lengths", "1x", "--depths", "2", "--trials", "3", "--tasks",
            "multikey", "--batch-size", "1", "--seed", str(seed), "--device", "cpu", "--prefill-chunk", "128"]
    monkeypatch.setattr(tasks, "score_samples", scoring())
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "tasks.json").read_text())
    assert not (tmp_path / "whole" / "tasks.partial.json").exists()

    part = tmp_path / "part"
    calls.clear()
    monkeypatch.setattr(tasks, "score_samples", scoring(stop_at=6))  # the second cell's third trial: 2 of it saved
    assert main(argv + ["--out", str(part)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"gca eval: interrupted: {part / 'tasks.json'} keeps the 1 (task, length, depth) cell(s) finished and "
                   f"2 trial(s) of the cell in progress in {part / 'tasks.partial.json'}: rerun the same command with "
                   f"--resume to measure the rest")
    entry, = json.loads((part / "tasks.partial.json").read_text())
    assert entry["model"] == "t1" and entry["depth"] == 1.0 and entry["done"] == 2 and entry["seed"] == seed
    calls.clear()
    monkeypatch.setattr(tasks, "score_samples", scoring(stop_at=2))  # no cell finished, one trial saved
    assert main(argv + ["--out", str(tmp_path / "early")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gca eval: interrupted: no (task, length, depth) cell(s) finished; kept: 1 trial(s) of the cell in progress "
        f"in {tmp_path / 'early' / 'tasks.partial.json'}; rerun the same command with --resume to measure the rest")

    # an unreadable file is said and measured again, not trusted (here a copy of the folder with it cut short)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "tasks.json").write_text((part / "tasks.json").read_text())
    (cut / "tasks.partial.json").write_text((part / "tasks.partial.json").read_text()[:50])
    calls.clear()
    monkeypatch.setattr(tasks, "score_samples", scoring())
    assert main(argv + ["--out", str(cut), "--resume"]) == 0
    assert "tasks.partial.json is not a list of saved cells" in capsys.readouterr().out and len(calls) == 3
    assert not (cut / "tasks.partial.json").exists()  # (the cell ended: its entry, and so the file, is gone)

    # another seed keeps neither the finished cell nor the saved trials, and says so
    calls.clear()
    other = [a if a != str(seed) else str(seed + 1) for a in argv]
    monkeypatch.setattr(tasks, "score_samples", scoring(stop_at=1))
    assert main(other + ["--out", str(part), "--resume"]) == 130
    assert "1 unfinished cell(s) of t1" in capsys.readouterr().out
    assert json.loads((part / "tasks.partial.json").read_text())[0]["seed"] == seed  # (stopped before a batch ended)

    calls.clear()
    monkeypatch.setattr(tasks, "score_samples", scoring())
    assert main(argv + ["--out", str(part), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: 2 trial(s) of 1 unfinished cell(s)" in out and len(calls) == 1
    assert not (part / "tasks.partial.json").exists()
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(json.loads((part / "tasks.json").read_text())) == untimed(whole)


def test_ppl_targets_takes_one_length(tmp_path, capsys, monkeypatch):
    """`--targets 1x,2x` used 1x and dropped 2x without a word."""
    from gca.eval import perplexity

    monkeypatch.setattr(perplexity, "perplexity_vs_length", lambda *a, **kw: pytest.fail("ran"))
    run = _saved_run(tmp_path, "t1")
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", "d", "--targets", "1x,2x", "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "--targets 1x,2x: give one length" in capsys.readouterr().err


# ---- scripts/: bad input is refused with what to fix ----
_OTHER_TOKENIZER_ARGV = {  # each script that reads --data, on the shipped model, at small sizes
    "needle_attention": ["--length", "300", "--trials", "1"],
    "retrieval_margin": ["--length", "300", "--samples", "1", "--draws", "2", "--device", "cpu"],
    "retrieval_keys": ["--seq-len", "600"],
    "gca_off_ppl": ["--lengths", "300", "--windows", "1", "--out", "{tmp}/x.json"],
    "check_skip_upper": ["--length", "300", "--depths", "0"],
    "loss_by_copy_distance": ["--lengths", "300", "--windows", "1", "--out", "{tmp}/x.json"],
    "retrieval_documents": ["--lengths", "300", "--windows", "1", "--out", "{tmp}/x.json"],
    "retrieval_copy_hits": ["--lengths", "300", "--windows", "1", "--out", "{tmp}/x.json"],
}


@pytest.mark.parametrize("name", sorted(_OTHER_TOKENIZER_ARGV))
def test_scripts_refuse_data_of_another_tokenizer(name, tmp_path, monkeypatch, capsys):
    """The scripts read --data's ids with the checkpoint's tokenizer: a folder prepared with another one
    (a 300-id BPE here) gave numbers of ids read as other words (check_skip_upper: a traceback). Each
    now stops before any work with the message of `gca eval`."""
    other = _prepared(tmp_path, "bpe", "bpe")
    ckpt = ["--ckpt", f"m={SHIPPED}" if name == "loss_by_copy_distance" else SHIPPED]
    argv = ckpt + ["--data", str(other)] + [x.replace("{tmp}", str(tmp_path)) for x in _OTHER_TOKENIZER_ARGV[name]]
    monkeypatch.setattr(sys, "argv", [name] + argv)
    with pytest.raises(SystemExit) as e:
        _script(name).main()
    assert e.value.code == 2
    assert f"{other} was prepared with another tokenizer (bpe-300, 300 ids)" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_grad_diff_trees_refuses_a_folder_without_the_package(tmp_path, monkeypatch):
    """grad_diff_trees.py: a tree without gca/ (a typo, or the gca folder itself) imported the installed
    package instead and reported "0 of N gradients differ": the current code compared with itself.
    Such a tree is refused before any process runs."""
    gd = _script("grad_diff_trees")
    monkeypatch.setattr(gd.subprocess, "run", lambda *a, **k: pytest.fail("ran a tree without its package"))
    for old in (tmp_path / "missing", Path(__file__).parents[1] / "gca"):
        with pytest.raises(SystemExit) as e:
            gd.main([str(old), str(Path(__file__).parents[1])])
        assert e.value.code == 2


def test_copy_groups_put_a_match_before_the_context_in_not_in_context():
    """loss_by_copy_distance's ``window`` group (and retrieval_copy_hits' ``in window`` row) took every
    token whose nearest match was at most the window back, also when the match lay before the context
    began (the first scored tokens of the shortest length): the model never saw it. Such a token is
    ``not in context``, as the docstring says."""
    lc, rc = _script("loss_by_copy_distance"), _script("retrieval_copy_hits")
    N, T, n, window, ends = 20, 19, 1, 8, np.array([100])  # scored: positions 81 .. 99, with 1 .. 19 tokens before
    dist = np.zeros(200, dtype=np.int64)
    for pos, back in ((81, 5), (85, 12), (90, 5), (95, 12)):  # (context before it: 1, 5, 10, 15)
        dist[pos - n] = back
    groups = lc.copy_groups(dist, n, ends, N, T, window)[0]
    assert {p: int(groups[p - 81]) for p in (81, 85, 90, 95)} == {81: 2, 85: 2, 90: 0, 95: 1}
    assert (groups == 2).sum() == T - 2
    tg = {k: np.zeros(0, dtype=np.int64) for k in ("w", "t", "d", "source", "row")}
    nll = np.ones((1, T))
    rows = rc.oracle_rows(tg, nll, nll, np.full((1, 1, 3), -1), dist, n, ends, N, T, window, 63, [512])
    assert next(r for r in rows if r["bin"] == "in window")["tokens"] == 1  # position 90 alone


def test_scripts_report_a_loss_past_the_float_range_as_inf(tmp_path, monkeypatch, capsys):
    """A diverged model's mean loss above ~709.78 nats made math.exp raise OverflowError in
    loss_by_copy_distance.py (the rows and the printed comparisons) and retrieval_documents.py, losing
    the run; the perplexity is inf now, as `gca eval ppl` reports it."""
    data, run = _prepared(tmp_path, "emb"), _saved_run(tmp_path, "r", seq_len=130)
    lc, rd = _script("loss_by_copy_distance"), _script("retrieval_documents")
    monkeypatch.setattr(lc, "stream_token_nll", lambda model, ids, last: torch.full((ids.shape[0], last), 800.0))
    out = tmp_path / "lc.json"
    rows = lc.main(["--ckpt", f"a={run}", "--ckpt", f"b={run}", "--data", str(data), "--lengths", "1x,2x",
                    "--windows", "1", "--out", str(out)])
    assert rows and all(r["ppl"] == math.inf for r in rows if r["tokens"])
    assert lc.main(["--summary", str(out)]) is None
    monkeypatch.setattr(rd, "stream_nll", lambda model, ids, last: (800.0 * last * ids.shape[0], last * ids.shape[0]))
    monkeypatch.setattr(sys, "argv", ["retrieval_documents", "--ckpt", str(run), "--data", str(data), "--lengths", "1x",
                                      "--windows", "1", "--out", str(tmp_path / "rd.json")])
    rd.main()
    assert [r["ppl"] for r in json.loads((tmp_path / "rd.json").read_text())["rows"]] == [math.inf, math.inf]


def test_retrieval_keys_names_a_sequence_of_too_few_chunks(tmp_path, monkeypatch, capsys):
    """retrieval_keys.py --seq-len 504 (the shipped model's training length: 8 chunks) ended in
    "RuntimeError: stack expects a non-empty TensorList" (the score spread reads rows past the first
    8 chunks); it says the shortest length that works now, and one token more runs."""
    rk, data = _script("retrieval_keys"), _prepared(tmp_path, "emb")
    monkeypatch.setattr(sys, "argv", ["retrieval_keys", "--ckpt", SHIPPED, "--data", str(data), "--seq-len", "504",
                                      "--batch-size", "1"])
    with pytest.raises(SystemExit):
        rk.main()
    assert "--seq-len 504 makes at most 8 chunks of 63 tokens: give more than 504" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", sys.argv[:-3] + ["505", "--batch-size", "1", "--out", str(tmp_path / "k.json")])
    rk.main()
    assert math.isfinite(json.loads((tmp_path / "k.json").read_text())["score_row_spread"])


def test_retrieval_margin_builds_samples_on_the_models_chunk_grid(tmp_path, monkeypatch):
    """retrieval_margin.py built its samples on the default 63-token chunks whatever the model's: for a
    model of 32-position chunks the needle and question chunk numbers it ranked named other chunks of
    the model's scores. The samples follow the model's text_per_chunk now."""
    from gca.data.tasks import TaskSource

    rm, data = _script("retrieval_margin"), _prepared(tmp_path, "emb")
    run = _saved_run(tmp_path, "c32", chunk_size=32, window=64)
    made = []

    class Spy(TaskSource):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(rm, "TaskSource", Spy)
    monkeypatch.setattr(sys, "argv", ["retrieval_margin", "--ckpt", str(run), "--data", str(data), "--length", "400",
                                      "--samples", "1", "--draws", "2", "--device", "cpu", "--out", str(tmp_path / "m.json")])
    rm.main()
    (src,) = made
    s, _ = src.sample_task(0)
    assert src.P == 31 and s.prompt_len % 31 == 1  # the question ends on the model's chunk grid
    assert json.loads((tmp_path / "m.json").read_text())["rows"][0]["candidates"] == s.query_chunk


def test_scripts_say_what_is_missing_in_one_line(tmp_path):
    """Run as commands, the scripts ended a missing checkpoint, folder or file, or an --n longer than
    the text, in a traceback; each says what to fix in one line now (GCA_TRACEBACK=1 keeps it)."""
    import subprocess

    (tmp_path / "run").mkdir()
    root = Path(__file__).parents[1]
    cmd = [sys.executable, str(root / "scripts" / "needle_attention.py"), "--ckpt", str(tmp_path / "run"),
           "--length", "300", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"needle_attention.py: error: no checkpoint in {tmp_path / 'run'}: expected " \
                               f"{tmp_path / 'run' / 'ckpt'}/ or {tmp_path / 'run' / 'model.safetensors'} with config.json"
    fc = _script("far_context")
    with pytest.raises(ValueError, match="has only .* tokens; give a smaller --n"):
        fc.main(["--data", str(_prepared(tmp_path, "emb")), "--n", "100000"])


def test_plot_retrieval_hits_names_every_run_and_refuses_a_task_no_file_holds(tmp_path, monkeypatch):
    """The legend came from the first panel alone (a run without rows of the first task went unnamed),
    and a task no file held was drawn as an empty panel without a word."""
    import matplotlib.figure

    ph = _script("plot_retrieval_hits")
    row = lambda task, n, hit, acc: {"task": task, "context_length": n, "trials": 4, "retrieval_hit": hit, "accuracy": acc}  # noqa: E731
    (tmp_path / "a.json").write_text(json.dumps([row("passkey", 500, 1.0, 0.5), row("passkey", 1000, 0.5, 0.25),
                                                 row("multikey", 500, 0.75, 0.5)]))
    (tmp_path / "b.json").write_text(json.dumps([row("multikey", 500, 0.25, 0.0)]))
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    monkeypatch.setattr(sys, "argv", ["plot_retrieval_hits", f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}",
                                      "--out", str(tmp_path / "h.png")])
    ph.main()
    labels = [t.get_text() for t in figs[0].legends[0].texts]
    assert labels == ["a: retrieval hit", "a: accuracy", "b: retrieval hit", "b: accuracy"]
    pk = figs[0].axes[0].get_lines()[0]
    assert list(pk.get_xdata()) == [500, 1000] and list(pk.get_ydata()) == [100.0, 50.0]
    monkeypatch.setattr(sys, "argv", ["plot_retrieval_hits", f"a={tmp_path / 'a.json'}", "--tasks", "passkey,2hop",
                                      "--out", str(tmp_path / "h2.png")])
    with pytest.raises(SystemExit, match="no rows of task 2hop"):
        ph.main()


# ---- eval / bench / plot fixes of an audit: each test failed before its fix ----
def test_eval_keeps_other_models_rows_in_a_shared_out(tmp_path, capsys, monkeypatch):
    """`gca eval` into an --out another model's evaluation wrote to (the default ./eval is every model's)
    replaced its tasks.json / ppl.json with this model's rows alone, without a word. Now the other models'
    rows are kept (a note names them), and of this model's only those measured again (same task or corpus
    and length) are replaced; a stopped evaluation keeps both, and a results file that is not a list of rows
    is refused before the model loads."""
    from gca.eval import tasks as eval_tasks

    a, b, data = _saved_run(tmp_path, "a"), _saved_run(tmp_path, "b"), _prepared(tmp_path, "emb")
    out = tmp_path / "eval"
    ev = ["--lengths", "0.5x", "--out", str(out), "--device", "cpu"]
    tasks = ["eval", "tasks", "--depths", "1", "--trials", "1", *ev]
    ppl = ["eval", "ppl", "--data", str(data), "--windows", "1", *ev]
    for argv in (tasks, ppl):
        name = "tasks.json" if argv is tasks else "ppl.json"
        assert main(argv + ["--ckpt", str(a)]) == 0
        capsys.readouterr()
        assert main(argv + ["--ckpt", str(b), "--lengths", "0.5x,1x"]) == 0
        assert f"note: {out / name} holds rows of other models (a): they are kept beside" in capsys.readouterr().out
        rows = json.loads((out / name).read_text())
        assert [(r["model"], r["context_length"]) for r in rows] == [("a", 200), ("b", 200), ("b", 400)]
        # b again at one length: that row replaced, its other length and a's kept (a longer length measured
        # in a later call, as 16M often is, no longer deletes the shorter ones)
        assert main(argv + ["--ckpt", str(b)]) == 0
        assert "and 1 row(s) of b at other" in capsys.readouterr().out
        rows = json.loads((out / name).read_text())
        assert [(r["model"], r["context_length"]) for r in rows] == [("a", 200), ("b", 400), ("b", 200)]
    assert (out / "heatmap_passkey.png").exists() and (out / "ppl_vs_length.png").exists()

    # a stopped evaluation of a third model keeps what it measured, beside the others' rows
    row = dict(task="passkey", context_length=400, depth=0.5, accuracy=0.0, retrieval_hit=0.0)

    def stopped(*args, on_row, **kw):
        on_row([row])
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_tasks, "evaluate_tasks", stopped)
    assert main(tasks + ["--ckpt", str(a), "--name", "c"]) == 130
    rows = json.loads((out / "tasks.json").read_text())
    assert [r["model"] for r in rows] == ["a", "b", "b", "c"]

    import gca.eval.cli as ecli

    monkeypatch.setattr(ecli, "load_for_eval", lambda *a, **k: pytest.fail("the model loaded"))
    (out / "tasks.json").write_text('{"not": "rows"}')
    capsys.readouterr()
    assert main(tasks + ["--ckpt", str(a)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gca eval: error: {out / 'tasks.json'} is not a list of gca eval rows, so its rows cannot be kept beside this "
        f"model's: move it away or give another --out"]


def _corrupt_copy(folder: Path, dest: Path, split: str, at: int) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    ids = np.memmap(dest / f"{split}.bin", dtype=np.uint16, mode="r+")
    ids[at : at + 3] = 60000
    ids.flush()
    return dest


def test_eval_names_a_corrupt_val_bin_as_gca_train_does(tmp_path, capsys):
    """A val.bin holding an id outside its vocabulary ended `gca eval ppl` in the model's "input_ids must lie
    in [0, 2048); got values in [2, 60000]" (after streaming), naming neither the file nor the fix; now it
    stops before any window with the line `gca train` says for the same file (PackedSource), and so does
    `gca eval tasks` with it as --filler."""
    from gca.data.batches import PackedSource
    from gca.data.prepare import PackedDataset

    bad = _corrupt_copy(_prepared(tmp_path, "emb"), tmp_path / "bad", "val", 500)
    n = len(PackedDataset(bad, "val"))
    with pytest.raises(ValueError) as e:  # what gca train says (its windows here: the whole split)
        PackedSource(bad, seq_len=n, split="val").sample(0)
    train_says = str(e.value)
    assert "at position 500," in train_says
    run = _saved_run(tmp_path, "t1")
    for argv in (["eval", "ppl", "--data", str(bad), "--windows", "1"],
                 ["eval", "tasks", "--filler", str(bad), "--depths", "1", "--trials", "1"]):
        assert main(argv + ["--ckpt", str(run), "--lengths", "200", "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"gca eval: error: {train_says}"


def test_eval_of_an_empty_val_split_says_what_applies_to_eval(tmp_path, capsys):
    """An empty val split advised "or train without validation (gca train --eval-every 0)", no help to
    `gca eval`; the line says what eval reads it for and how to get one (--filler: or leave it out)."""
    import warnings

    from gca.data.prepare import prepare

    src = tmp_path / "txt"
    src.mkdir()
    (src / "one.txt").write_text("one document of plain words " * 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (prepare warns of the empty split)
        prepare([str(src)], tmp_path / "d", tokenizer="embedded", val_fraction=0, progress=False)
    run, d = _saved_run(tmp_path, "t1"), tmp_path / "d"
    base = ["--ckpt", str(run), "--lengths", "200", "--out", str(tmp_path / "e"), "--device", "cpu"]
    assert main(["eval", "ppl", "--data", str(d), *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gca eval: error: {d}: split 'val' is empty (0 tokens; all 1 document(s) went to 'train', documents "
                   f"are not cut), and gca eval ppl scores that split: prepare it again with more documents or a larger "
                   f"--val-fraction (gca prepare ... --val-fraction F --out {d} --overwrite)"]
    assert main(["eval", "tasks", "--filler", str(d), "--trials", "1", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-every" not in err[0]
    assert err[0].endswith("--overwrite), or leave out --filler (random words)") and "filler text" in err[0]


def test_eval_tasks_warns_of_2hop_flags_without_2hop(tmp_path, capsys, monkeypatch):
    """--hop-answer and --hop-lead with --tasks passkey were ignored without a word."""
    from gca.eval import tasks as eval_tasks

    seen = []
    monkeypatch.setattr(eval_tasks, "evaluate_tasks", lambda *a, **kw: seen.append(kw) or [])
    monkeypatch.setattr("gca.eval.cli._print_table", lambda *a: None)
    monkeypatch.setattr("gca.eval.plots.plot_accuracy_vs_length", lambda *a, **k: None)
    monkeypatch.setattr("gca.eval.plots.plot_heatmap", lambda *a, **k: None)
    run = _saved_run(tmp_path, "t1")
    ev = ["eval", "tasks", "--ckpt", str(run), "--out", str(tmp_path / "e"), "--device", "cpu"]
    assert main(ev + ["--tasks", "passkey", "--hop-answer", "end", "--hop-lead", "2"]) == 0
    assert ("gca eval: warning: --hop-answer, --hop-lead only apply to the 2hop task, and --tasks passkey does not "
            "hold it: ignored") in capsys.readouterr().err.splitlines()
    assert main(ev + ["--tasks", "passkey,2hop", "--hop-answer", "end"]) == 0
    assert main(ev + ["--tasks", "multikey"]) == 0  # the defaults: nothing to warn of
    assert "only apply to the 2hop task" not in capsys.readouterr().err
    assert [kw["hop_answer"] for kw in seen] == ["end", "end", "chain"]


def test_bench_warns_of_ignored_options_and_checks_the_passkey_trial_first(tmp_path, capsys, monkeypatch):
    """`gca bench --ckpt RUN --preset small` ignored --preset silently (gca train warns of it beside
    --init-from); --passkey-trial with a --vocab-size below the embedded tokenizer's failed only after the
    whole benchmark had run."""
    import gca.inference.bench as ib

    run = _saved_run(tmp_path, "t1")
    monkeypatch.setattr(ib, "bench_streaming", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert main(["bench", "--lengths", "4096", "--vocab-size", "100", "--passkey-trial", "4096", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gca bench: error: --passkey-trial needs a model vocabulary of at least 2048 ids (the embedded tokenizer's, "
        "which writes its prompt); the model has 100: drop --vocab-size or --passkey-trial"]
    assert main(["bench", "--lengths", "300", "--passkey-trial", "100.7", "--device", "cpu"]) == 2  # bad lengths: first too
    assert "bad length '100.7'" in capsys.readouterr().err
    monkeypatch.setattr(ib, "bench_streaming", lambda model, lengths, **k: [])
    assert main(["bench", "--ckpt", str(run), "--preset", "small", "--vocab-size", "100", "--lengths", "300",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert ("gca bench: warning: --preset small, --vocab-size 100 are ignored: with --ckpt the model is "
            f"{run}'s") in capsys.readouterr().err.splitlines()


def test_bench_cpu_peak_memory_is_each_rows_or_says_it_is_the_process_peak(tmp_path, capsys, monkeypatch):
    """On CPU `peak GB` was the process's lifetime peak resident set (ru_maxrss), the same on every row,
    labelled as the row's. It is reset for each row now where Linux allows it, and the table and
    bench.json say which it is; where it cannot be reset, both say it is the process's peak so far."""
    import gca.inference.bench as ib

    import mmap

    def spike():  # 64 MiB of fresh pages resident at once (a mapping of its own: no allocator reuses them)
        m = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 1
        return m

    dev = torch.device("cpu")
    m = spike()
    peak_then = ib._peak_gb(dev, ib._reset_peak(dev))
    m.close()  # gone before the next row's reset: not that row's peak
    measure = ib._reset_peak(dev)
    if measure == ib.PEAK_RSS_ROW:  # (Linux)
        before = ib._peak_gb(dev, measure)
        assert before < peak_then - 0.05
        m = spike()
        assert ib._peak_gb(dev, measure) > before + 0.05
        m.close()
    out = tmp_path / "b.json"
    bench = ["bench", "--preset", "tiny", "--lengths", "200,300", "--decode-tokens", "2", "--offload", "off",
             "--device", "cpu", "--out", str(out)]
    assert main(bench) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = json.loads(out.read_text())
    assert {r["peak_mem_measure"] for r in rows} == {measure}
    footnote = {ib.PEAK_RSS_ROW: "peak GB: the process's peak resident memory during each row",
                ib.PEAK_RSS_SO_FAR: "peak GB: the process's peak resident memory so far"}[measure]
    assert printed[-2].startswith(footnote)  # under the table, before "wrote ..."
    monkeypatch.setattr(ib, "_reset_peak", lambda dev: ib.PEAK_RSS_SO_FAR)  # a system that cannot reset it
    assert main(bench) == 0
    assert capsys.readouterr().out.splitlines()[-2] == (
        "peak GB: the process's peak resident memory so far (this system cannot reset it for each row), not each row's own")
    assert {r["peak_mem_measure"] for r in json.loads(out.read_text())} == {ib.PEAK_RSS_SO_FAR}


def test_plot_of_one_run_given_twice_names_it_and_says_to_drop_it(tmp_path, capsys, monkeypatch):
    """`gca plot /abs/RUN ./RUN/` said "the run abs/RUN is given more than once: give each run its own label":
    the path without its leading /, and the wrong fix. A log file copied beside its run folder
    (RUNS/NAME.jsonl, as reproduce.sh keeps them) is another run, labelled with its suffix."""
    run = tmp_path / "t1"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) for s in range(1, 5)) + "\n")
    monkeypatch.chdir(tmp_path)
    for twice in ([str(run), "./t1/"], ["t1", "t1/log.jsonl"]):
        assert main(["plot", *twice, "--out", str(tmp_path / "c.png")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"gca plot: error: the run {run} is given more than once (as {', '.join(twice)}): drop the duplicate"]
    (tmp_path / "t1.jsonl").write_text((run / "log.jsonl").read_text())
    from gca.eval.cli import run_labels

    assert run_labels(["t1", "t1.jsonl"]) == ["t1", "t1.jsonl"]
    assert main(["plot", "t1", "t1.jsonl", "--out", str(tmp_path / "c.png")]) == 0


def test_needle_position_places_the_needle_at_the_asked_token(tmp_path):
    """scripts/needle_position.py: every trial's first target needle starts at the asked token (first chunk,
    its first token, a later chunk), for each task; a position past the last chunk is refused; the rows it
    writes say where the needles began and score the shipped model."""
    from gca.data.tasks import make_filler, make_task_sample

    npos = _script("needle_position")
    filler = make_filler(None, None, split="val")
    rng = np.random.default_rng(torch.initial_seed())
    for task in ("passkey", "multikey", "2hop"):
        for L in (1008, 4032):
            for t in (0, 1, 8, 63, 630):
                d = npos.depth_for(task, L, t, 63, filler, None)
                for _ in range(3):
                    s = make_task_sample(task, context_len=L, seed=rng, filler=filler, depth=d, text_per_chunk=63)
                    assert s.needle_spans[0][0] == t and s.target_chunks[0] == t // 63, (task, L, t, s.needle_spans)
    with pytest.raises(ValueError, match="no room"):
        npos.depth_for("passkey", 1008, 1000, 63, filler, None)

    out = tmp_path / "np.json"
    ckpt = str(Path(__file__).parents[1] / "checkpoints" / "passkey-tiny")
    npos.main(["--ckpt", ckpt, "--lengths", "1008", "--positions", "0,63", "--trials", "4", "--device", "cpu",
               "--dtype", "float32", "--seed", "7", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["context_length"], r["position"], r["needle_starts"], r["needle_chunks"], r["trials"]) for r in rows] == [
        (1008, 0, [0], [0], 4), (1008, 63, [63], [1], 4)]
    # the shipped model (100% passkey at 1x-64x, every depth) retrieves and reads the needle at both places
    assert all(r["retrieval_hit"] == 1.0 and r["accuracy"] == 1.0 for r in rows)


def test_needle_rank_ranks_the_needle_where_eval_tasks_retrieved_it(tmp_path):
    """scripts/needle_rank.py rebuilds `gca eval tasks`'s prompts and reads the question's retrieval scores: on a
    random model (retrieval hits and misses mixed), its `retrieved` share equals evaluate_tasks' retrieval_hit in
    every cell, and rank, gap and the top others agree with each other."""
    from gca.eval.tasks import evaluate_tasks
    from gca.train import load_model

    nr = _script("needle_rank")
    run = _saved_run(tmp_path, "r", seq_len=200)
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 20))
    out = tmp_path / "rank.json"
    nr.main(["--ckpt", str(run), "--tasks", "passkey,2hop", "--lengths", "2x,4x", "--depths", "3", "--trials", "3",
             "--seed", str(seed), "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    got = json.loads(out.read_text())
    rows = got["rows"]
    model = load_model(run / "ckpt").eval()
    K = model.config.top_k
    assert len(rows) == 2 * 2 * 3 * 3 * len(model.groups) and got["top_k"] == K
    for r in rows:
        assert 1 <= r["rank"] <= r["chunks"] and r["retrieved"] == (r["rank"] <= K) == (r["gap"] > 0)
        assert len(r["top_others"]) == min(K, r["chunks"] - 1) and r["needle_chunk"] not in r["top_others"]
        assert r["picks_agree"]  # the scores kept are those the model's retrieval used
    ref = evaluate_tasks(model, ["passkey", "2hop"], [400, 800], 3, 3, seed=seed, batch_size=2, progress=False,
                         hop_answer="chain")
    shares = {(r["task"], r["context_length"], r["depth"]): r["retrieval_hit"] for r in ref}
    mine = {}
    for key in shares:  # (evaluate_tasks counts a hit in any retrieval group)
        trials = [[r["retrieved"] for r in rows if (r["task"], r["context_length"], r["depth"]) == key
                   and r["trial"] == t] for t in range(3)]
        mine[key] = float(np.mean([any(t) for t in trials]))
    assert mine == shares
    assert 0 < np.mean(list(shares.values())) < 1  # hits and misses both: the comparison can fail
    with pytest.raises(SystemExit):
        nr.main(["--ckpt", str(run), "--tasks", "passkey,3hop", "--out", str(out)])


def test_needle_position_memory_compares_the_first_chunk_with_a_later_one(tmp_path):
    """--memory: chunk 0's memory is made from chunk 0 alone (later text leaves it unchanged); the rows
    compare a needle at tokens 0 and 1 with the same needle one chunk later, and the same needle after
    the same text compares equal."""
    from gca.data.tasks import make_filler
    from gca.train import load_model

    npos = _script("needle_position")
    ckpt = Path(__file__).parents[1] / "checkpoints" / "passkey-tiny"
    m = load_model(ckpt).float().eval()
    filler = make_filler(None, None, split="val")
    rng = np.random.default_rng(torch.initial_seed())
    a = [int(x) for x in filler.tokens(4 * 63, rng)]
    b = a[:63] + [int(x) for x in filler.tokens(3 * 63, rng)]
    (la, ka, va), (lb, kb, vb) = npos.memory_states(m, a), npos.memory_states(m, b)
    torch.testing.assert_close((la[0], ka[0], va[0]), (lb[0], kb[0], vb[0]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(va[2], vb[2])

    class Same:  # every "other text" the same: the reference differences are exactly 0
        tokenizer = None

        def tokens(self, n, rng):
            return filler.tokens(n, np.random.default_rng(0))

    r = npos.memory_shift(m, Same(), None, 1008, 0, rng)
    assert r["values_ref"] == r["keys_ref"] == r["landmark_ref"] == 0.0
    assert r["values_first"] > 0 and r["keys_first"] > 0

    out = tmp_path / "mem.json"
    npos.main(["--ckpt", str(ckpt), "--memory", "1", "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    got = json.loads(out.read_text())
    assert [r["position"] for r in got["memory"]] == [0, 1] and set(got["mean"]) == {"0", "1"}
    assert all(math.isfinite(v) and v >= 0 for r in got["memory"] for v in r.values())


def test_eval_tasks_depths_takes_a_list(tmp_path, capsys):
    """`--depths` took only a count; `--depths 0,1` (or `0.25`) measures exactly those relative depths, rows and
    --resume cells alike, and bad lists are refused by argparse with what to fix."""
    run = _saved_run(tmp_path, "t1", seq_len=200)
    seed = int(np.random.default_rng(torch.initial_seed()).integers(1 << 20))
    argv = ["eval", "tasks", "--ckpt", str(run), "--lengths", "1x", "--trials", "1", "--seed", str(seed), "--device",
            "cpu", "--prefill-chunk", "128", "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv + ["--depths", "0,1"]) == 0
    rows = json.loads((tmp_path / "e" / "tasks.json").read_text())
    assert [r["depth"] for r in rows] == [0.0, 1.0]
    assert main(argv + ["--depths", "0,1", "--resume"]) == 0
    assert "resume: 2 of the 2 (task, length, depth) cells" in capsys.readouterr().out
    assert main(argv + ["--depths", "0.25"]) == 0
    assert [r["depth"] for r in json.loads((tmp_path / "e" / "tasks.json").read_text())] == [0.25]
    for bad, msg in (("0,1.5", "in [0, 1]"), ("0,x", "comma-separated"), ("0,0.5,0.5", "twice"), ("0", ">= 1")):
        with pytest.raises(SystemExit):
            main(argv + ["--depths", bad])
        assert msg in capsys.readouterr().err, bad
