"""The ``gca`` command line: every subcommand's help, ``--set`` parsing, and ``gca train`` end to end on a
stand-in data source (``gca.data`` is replaced by a fake module, so these tests never depend on it)."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

from gca import DRT, DRTConfig
from gca.cli import main, parse_set
from test_train import TINY, FakeSource

COMMANDS = ["prepare", "train", "eval", "plot", "generate", "bench", "demo"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS], ids=lambda c: c[0] if c else "gca")
def test_help_exits_zero_and_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gca" in out and ("example" in out or "planned usage" in out)


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "gca.cli", "train", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "torchrun" in done.stdout


def test_bad_input_ends_in_one_line_naming_the_problem(tmp_path, capsys, monkeypatch):
    """A missing checkpoint or dataset and a bad value end a command with ``gca COMMAND: error: ...`` and exit
    status 2, not a traceback; GCA_TRACEBACK=1 raises instead."""
    ckpt = str(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "passkey-tiny")
    cases = [
        (["eval", "ppl", "--ckpt", str(tmp_path / "none"), "--data", str(tmp_path)], "gca eval: error: no checkpoint in"),
        (["eval", "ppl", "--ckpt", ckpt, "--data", str(tmp_path / "none")], "is not a prepared dataset"),
        (["eval", "tasks", "--ckpt", ckpt, "--tasks", "passkey,nope", "--out", str(tmp_path / "t")], "unknown task 'nope'"),
        (["eval", "ppl", "--ckpt", ckpt, "--data", str(tmp_path), "--lengths", "4x,fast"], "bad length 'fast'"),
        (["bench", "--preset", "tiny", "--lengths", "0", "--device", "cpu"], "gca bench: error: bad length '0'"),
        (["generate", "--ckpt", ckpt, "--prompt", "hi", "--top-p", "3", "--device", "cpu"], "gca generate: error: top_p"),
        (["generate", "--ckpt", ckpt, "--prompt", ""], "gca generate: error: give a non-empty --prompt"),
        (["generate", "--ckpt", ckpt, "--prompt-file", str(tmp_path / "none.txt")], "--prompt-file"),
        (["eval", "ppl", "--ckpt", ckpt], "gca eval: error: ppl needs --data DIR"),
    ]
    monkeypatch.setitem(sys.modules, "datasets", None)  # a missing optional package: `import datasets` fails
    cases.append((["prepare", "hf:some/corpus", "--out", str(tmp_path / "p")], "needs the `datasets` package"))
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (argv, err)
        assert err.strip().splitlines()[-1].startswith(f"gca {argv[0]}: error: "), err
    assert not (tmp_path / "t" / "tasks.json").exists()  # the bad task name failed before any trial
    monkeypatch.setenv("GCA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad length '0'"):
        main(["bench", "--preset", "tiny", "--lengths", "0", "--device", "cpu"])


def test_counts_below_their_minimum_are_refused_by_the_parser(tmp_path, capsys):
    """Zero or negative trials, depths, batch sizes and the like end in argparse's one line naming the
    option (before, --trials 0 ended in an IndexError traceback and --decode-tokens -1 printed negative
    speeds)."""
    ckpt = str(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "passkey-tiny")
    ev = ["eval", "tasks", "--ckpt", ckpt, "--lengths", "1x", "--out", str(tmp_path / "t")]
    cases = [
        (ev + ["--trials", "0"], "argument --trials: must be >= 1, got 0"),
        (ev + ["--depths", "-1"], "argument --depths: must be >= 1, got -1"),
        (ev + ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (ev + ["--hop-lead", "-2"], "argument --hop-lead: must be >= 0, got -2"),
        (ev + ["--trials", "many"], "argument --trials: expected an integer, got 'many'"),
        (["bench", "--preset", "tiny", "--decode-tokens", "0"], "argument --decode-tokens: must be >= 1, got 0"),
        (["generate", "--ckpt", ckpt, "--prompt", "hi", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        (["demo", "--minutes", "-1"], "argument --minutes: must be > 0, got -1.0"),
        (["prepare", "x.txt", "--out", str(tmp_path / "p"), "--max-documents", "0"], "argument --max-documents: must be >= 1, got 0"),
    ]
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"gca {argv[0]}: error: {says}", err
    assert not (tmp_path / "t").exists()



def test_device_is_checked_by_the_parser(tmp_path, capsys):
    """A device torch does not know, or CUDA on a machine without it, ends in one line naming the
    option (before: a traceback, or "corrupt checkpoint ... delete it" from the weights' read)."""
    ckpt = str(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "passkey-tiny")
    cases = [(["train", "--device", "foo"], "argument --device: 'foo' is not a device; use auto, cpu, cuda or cuda:N"),
             (["generate", "--ckpt", ckpt, "--prompt", "hi", "--device", "gpu0"], "argument --device: 'gpu0' is not a device")]
    if not torch.cuda.is_available():
        cases += [(cmd + ["--device", "cuda"], "argument --device: cuda: CUDA is not available on this machine; use --device cpu (or auto)")
                  for cmd in (["train"], ["generate", "--ckpt", ckpt, "--prompt", "hi"], ["bench"], ["demo"],
                              ["eval", "tasks", "--ckpt", ckpt, "--out", str(tmp_path / "t")])]
    else:
        n = torch.cuda.device_count()
        cases += [(["bench", "--device", f"cuda:{n}"], f"argument --device: cuda:{n}: this machine has {n} CUDA device(s)")]
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"gca {argv[0]}: error: {says}"), err

def test_bench_streaming_refuses_counts_below_one():
    from gca.inference.bench import bench_streaming

    model = DRT(DRTConfig.from_preset("tiny"))
    for kw in ({"decode_tokens": 0}, {"batch_size": 0}, {"prefill_chunk": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a positive integer"):
            bench_streaming(model, [64], progress=False, **kw)
    with pytest.raises(ValueError, match="lengths must be positive"):
        bench_streaming(model, [64, 0], progress=False)


@pytest.mark.parametrize("cuda_graph", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the graph decode phase runs on CUDA only"))], ids=["plain", "graph"])
def test_bench_sizes_the_chunk_memory_for_every_decode_step(monkeypatch, cuda_graph):
    # was: max_tokens = length + decode_tokens, but a run feeds 1 + decode_tokens plain steps and, on CUDA,
    # as many through the graph: the memory doubled inside the timed graph loop (a re-capture, two copies
    # at the reported peak) for decode_tokens >= ~64
    from gca.inference import bench
    from gca.inference.cache import ChunkMemory

    allocs = []
    alloc = ChunkMemory._alloc
    monkeypatch.setattr(ChunkMemory, "_alloc", lambda self, *a: (allocs.append(self), alloc(self, *a))[1])
    dev = "cuda" if cuda_graph else "cpu"
    cfg = DRTConfig.from_preset("tiny", vocab_size=97, hidden_size=32, num_heads=4, intermediate_size=64, window=80)
    model = DRT(cfg).to(dev)
    rows = bench.bench_streaming(model, [126], offload_modes=(False,), decode_tokens=128, prefill_chunk=64,
                                 progress=False, cuda_graph=cuda_graph)
    assert len(rows) == 1 and rows[0]["decode_tokens_per_s"] > 0
    timed = allocs[-1]  # the warm-up caches come first (kept alive here: no id is reused)
    assert sum(m is timed for m in allocs) == 1, "the timed run's chunk memory grew during the run"


def test_bench_command(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--lengths", "300,700", "--decode-tokens", "3", "--device", "cpu",
                 "--prefill-chunk", "256", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["context_length"], r["offload"]) for r in rows] == [(300, False), (300, True), (700, False), (700, True)]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert all(r["prefill_fetched_gb"] > 0 for r in rows if r["offload"]) and "prefill tok/s" in capsys.readouterr().out
    assert all(r["skip_upper"] is True for r in rows)
    assert main(["bench", "--preset", "tiny", "--lengths", "700", "--decode-tokens", "2", "--device", "cpu",
                 "--offload", "off", "--full-prefill", "--out", str(out)]) == 0  # fmt: skip
    assert [r["skip_upper"] for r in json.loads(out.read_text())] == [False]


def test_train_eval_generate_on_synthetic_passkey(tmp_path, capsys):
    """The real data path end to end: train 2 steps on the synthetic task, evaluate, generate."""
    run = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k != "vocab_size"]
    assert main(["train", "--preset", "tiny", "--data", "synthetic:passkey", "--out", str(run), "--seq-len", "200",
                 "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--device", "cpu", "--no-progress",
                 *sets]) == 0  # fmt: skip
    out = tmp_path / "eval"
    assert main(["eval", "tasks", "--ckpt", str(run), "--lengths", "1x,2x", "--depths", "2", "--trials", "3",
                 "--tasks", "passkey,multikey", "--out", str(out), "--device", "cpu", "--prefill-chunk", "128"]) == 0  # fmt: skip
    rows = json.loads((out / "tasks.json").read_text())
    assert {(r["task"], r["context_length"]) for r in rows} == {(t, n) for t in ("passkey", "multikey") for n in (200, 400)}
    assert all(r["trials"] == 3 and 0 <= r["accuracy"] <= 1 and r["train_length"] == 200 for r in rows)
    for png in ("accuracy_vs_length.png", "retrieval_vs_length.png", "heatmap_passkey.png", "heatmap_multikey.png"):
        assert (out / png).stat().st_size > 1000
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--prompt", "The passkey is", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    first = capsys.readouterr()
    assert "5 new" in first.err
    gen = ["generate", "--ckpt", str(run), "--prompt", "The passkey is", "--max-new-tokens", "5", "--device", "cpu"]
    assert main(gen + ["--no-cuda-graph"]) == 0  # plain streaming calls: the same greedy text
    assert capsys.readouterr().out == first.out


def test_demo_end_to_end_small(tmp_path, monkeypatch, capsys):
    """The demo's whole path on a shrunken grid: train briefly, evaluate, plot, final line."""
    import gca.demo

    monkeypatch.setattr(gca.demo, "MULTIPLES", (1, 2))
    monkeypatch.setattr(gca.demo, "DEPTHS", (0.5,))
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.05", "--trials", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "retrieval hit" in out and "untrained" in out and "beyond the window" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("demo: passkey accuracy ") and "at 2x the training length (1008 tokens)" in last
    for f in ("retrieval_vs_length.png", "passkey_accuracy_vs_length.png", "passkey_heatmap.png", "passkey.json"):
        assert (tmp_path / f).stat().st_size > 200


def test_demo_without_the_shipped_checkpoint_names_its_recipe(tmp_path, monkeypatch, capsys):
    """No checkpoints/passkey-tiny: the demo says which script rebuilds it (the exact recipe the README
    names, scripts/rebuild_passkey_tiny.sh), and that script exists."""
    import gca.demo

    monkeypatch.setattr(gca.demo, "SHIPPED", tmp_path / "none")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-train", "--device", "cpu"]) == 1
    script = capsys.readouterr().out.split("rebuild it with ")[1].split()[0]
    assert script == "scripts/rebuild_passkey_tiny.sh" and (pathlib.Path(__file__).parents[1] / script).exists()


def test_demo_out_a_file_is_refused_in_words(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["demo", "--out", str(f), "--no-train", "--device", "cpu"]) == 2  # was "[Errno 17] File exists"
    assert capsys.readouterr().err.startswith(f"gca demo: error: --out {f} is a file: give a folder")


def test_replay_nonfinite_on_a_healthy_run_or_no_run_says_so(tmp_path, capsys):
    """It said "no saved weights in RUN/nonfinite ... runs from before that have the batches only" of a
    folder that does not exist, for a run that never had a non-finite step."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("")
    assert main(["replay-nonfinite", str(tmp_path / "run")]) == 2
    assert "none of its steps had a non-finite gradient, so there is nothing to replay" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert main(["replay-nonfinite", str(tmp_path / "other")]) == 2
    assert "is not a gca training run (no log.jsonl, no ckpt/)" in capsys.readouterr().err


def test_parse_set():
    got = parse_set(["hidden_size=128", "upper_groups=[2, 2]", "arch=swa", "gumbel=false", "gca_softmax_one=True", "num_kv_heads=None"])
    assert got == dict(hidden_size=128, upper_groups=[2, 2], arch="swa", gumbel=False, gca_softmax_one=True, num_kv_heads=None)
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["hidden_size"])


@pytest.mark.parametrize("item, says", [("lr=0.1", "give it as --lr "), ("max-steps=5", "give it as --max-steps "),
                                        ("progress=false", "give it as --no-progress "),
                                        ("eps=1e-6", r"give it as TrainConfig\(eps=...\) from Python")])
def test_train_set_of_a_training_setting_names_its_option(tmp_path, capsys, item, says):
    # these were refused as unknown model fields, the list of model fields printed and no word of --lr
    assert main(["train", "--preset", "tiny", "--data", "synthetic:passkey", "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--set", item]) == 2
    err = capsys.readouterr().err
    assert "is a training setting, not a model field" in err and re.search(says, err), err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def fake_data(monkeypatch):
    """Make ``from gca.data import build_source`` return :class:`FakeSource`."""
    mod = types.ModuleType("gca.data")

    def build_source(spec, *, seq_len, seed=0, split="train", tokenizer=None):
        assert spec == "fake"
        return FakeSource(seq_len=seq_len, seed=seed, split=split)

    mod.build_source = build_source
    monkeypatch.setitem(sys.modules, "gca.data", mod)


def _train_args(out, *extra):
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    return ["train", "--preset", "tiny", "--data", "fake", "--out", str(out), "--seq-len", "200", "--batch-size", "2",
            "--max-steps", "3", "--log-every", "1", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu",
            "--no-progress", *sets, *extra]  # fmt: skip


def test_train_command_runs_resumes_and_rejects_changes(fake_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(out, "--set", "upper_groups=[1,1]")) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]
    cfg = json.loads((out / "ckpt" / "config.json").read_text())
    assert cfg["upper_groups"] == [1, 1] and cfg["hidden_size"] == 32 and cfg["vocab_size"] == 64
    tcfg = json.loads((out / "ckpt" / "train_config.json").read_text())
    assert tcfg["min_lr"] == pytest.approx(0.2 * tcfg["lr"])
    # a different learning rate cannot continue this run; more steps can
    assert main(_train_args(out, "--set", "upper_groups=[1,1]", "--lr", "0.005")) == 2
    err = capsys.readouterr().err
    assert "lr: checkpoint 0.002, now 0.005" in err and "min_lr" in err
    assert main(_train_args(out, "--set", "upper_groups=[1,1]", "--max-steps", "4")) == 0
    assert "resuming from step 3" in capsys.readouterr().out


def test_train_command_baseline_and_bad_override(fake_data, tmp_path, capsys):
    assert main(_train_args(tmp_path / "swa", "--arch", "swa", "--max-steps", "1", "--eval-every", "0")) == 0
    assert json.loads((tmp_path / "swa" / "ckpt" / "config.json").read_text())["arch"] == "swa"
    assert main(_train_args(tmp_path / "bad", "--set", "hiden_size=64")) == 2
    assert "hiden_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # counts are checked by the parser
        main(_train_args(tmp_path / "bad", "--batch-size", "0"))
    assert e.value.code == 2 and "argument --batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_train_says_what_is_wrong_where_nothing_is_corrupt(fake_data, tmp_path, capsys):
    """Cases that used to end in "corrupt checkpoint ... delete it" (or a traceback) though every file was
    sound: a saved model as --out, options whose model does not fit --init-from's weights, a file as
    --out; and --preset beside --init-from, silently ignored before."""
    saved = tmp_path / "saved"
    shutil.copytree(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "passkey-tiny", saved)
    (tmp_path / "afile").write_text("x")
    run = tmp_path / "run"
    assert main(_train_args(run, "--max-steps", "1", "--eval-every", "0")) == 0
    capsys.readouterr()
    init = ["--init-from", str(run), "--max-steps", "1", "--eval-every", "0"]

    def no_preset(argv):
        i = argv.index("--preset")
        return argv[:i] + argv[i + 2:]

    cases = [
        (_train_args(saved), f"--out {saved} holds a saved model (model.safetensors without a training checkpoint), "
                             f"not a training run: pass a new --out (add --init-from {saved} to start from these weights)"),
        (no_preset(_train_args(tmp_path / "swa", "--arch", "swa", *init)),
         f"--init-from {run}: its weights do not fit the model these options make (1 tensor(s) differ, e.g. embed.weight"),
        (_train_args(tmp_path / "afile"), f"--out {tmp_path / 'afile'} is a file; the run needs a folder"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"gca train: error: {says}") and "corrupt" not in err, (argv, err)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "tokenizer.json",
                                                      "train_config.json"]
    # --preset beside --init-from: the model is the run's; said once, as a warning (scripts pass both)
    assert main(_train_args(tmp_path / "p", *init)) == 0
    cap = capsys.readouterr()
    assert f"gca train: warning: --preset tiny is ignored: with --init-from the model is {run}'s" in cap.err
    assert f"model drt (from {run})" in cap.out


def test_train_without_progress_bar_prints_the_losses(fake_data, tmp_path, capsys):
    """--no-progress (batch jobs) prints a line for each logged step and each validation; before, nothing
    came between the header and "done"."""
    assert main(_train_args(tmp_path / "run", "--log-every", "2", "--max-steps", "4")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ")] == ["step 1", "step 2", "step 2", "step 4", "step 4"]
    assert sum("val_loss" in ln for ln in lines) == 2 and sum(" tok/s" in ln for ln in lines) == 3


def test_version_and_missing_run_folder(capsys, tmp_path):
    from gca import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gca {__version__}"
    assert main(["replay-nonfinite", str(tmp_path / "nope")]) == 2
    assert "nope: no such run folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, says, saved, bad, error",
    [("--freeze", r"^(embed|lower)\.", "frozen: ", r"^(embed|lower)\.", "nothing_is_called_this", "matches no parameter"),
     ("--lr-scale", r"^(embed|lower)\.=0.05", "lr x 0.05: ", {r"^(embed|lower)\.": 0.05}, r"^embed\.",
      "expected REGEX=FACTOR"),
     ("--lr-scale", r"^(embed|lower)\.=0.05", "lr x 0.05: ", {r"^(embed|lower)\.": 0.05},
      "nothing_is_called_this=0.5", "matches no trained parameter")],
    ids=["freeze", "lr-scale", "lr-scale-no-match"],
)
def test_train_command_freeze_and_lr_scale(fake_data, tmp_path, capsys, flag, value, says, saved, bad, error):
    out = tmp_path / "run"
    assert main(_train_args(out, flag, value, "--max-steps", "1", "--eval-every", "0")) == 0
    assert says in capsys.readouterr().out
    key = flag.lstrip("-").replace("-", "_")
    assert json.loads((out / "ckpt" / "train_config.json").read_text())[key] == saved
    assert main(_train_args(tmp_path / "bad", flag, bad)) == 2
    assert error in capsys.readouterr().err


def test_prepare_command(tmp_path, capsys):
    pytest.importorskip("gca.data.prepare")
    src = tmp_path / "txt"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["prepare", str(src), "--out", str(tmp_path / "data"), "--val-fraction", "0.3"]) == 0
    assert (tmp_path / "data" / "meta.json").exists() and (tmp_path / "data" / "tokenizer.json").exists()
    assert main(["prepare", str(src), "--out", str(tmp_path / "data")]) == 2  # exists: needs --overwrite
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "d2")]) == 2
    capsys.readouterr()
    # --vocab-size only sizes a trained tokenizer (it was silently ignored without --train-tokenizer)
    assert main(["prepare", str(src), "--out", str(tmp_path / "d3"), "--vocab-size", "300"]) == 2
    assert "--vocab-size sets the size of a tokenizer trained with --train-tokenizer" in capsys.readouterr().err
    # warnings come as one line in the command's name (one document: the val split is empty)
    assert main(["prepare", str(src / "doc0.txt"), "--out", str(tmp_path / "d4")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "gca prepare: warning: prepare: the val split is empty" in "\n".join(err)
    assert not any("UserWarning" in line for line in err)


def test_prepare_train_tokenizer_reads_the_text_field_and_max_documents(tmp_path, capsys):
    """--train-tokenizer read the inputs with the default "text" field whatever --text-field said (so a
    JSONL corpus with another field failed), and read all of them whatever --max-documents said."""
    pytest.importorskip("gca.data.prepare")
    lines = [json.dumps({"content": f"doc {i}: " + "the quick brown fox jumps over the lazy dog. " * 10}) for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines + ["not json: past --max-documents"]) + "\n")
    assert main(["prepare", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "data"), "--text-field", "content",
                 "--train-tokenizer", "--vocab-size", "300", "--max-documents", "4", "--val-fraction", "0.3"]) == 0, \
        capsys.readouterr().err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert sum(meta["documents"].values()) == 4 and meta["tokenizer"]["name"].startswith("bpe-")


def test_bench_overlap_modes_and_passkey_trial(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--lengths", "400", "--decode-tokens", "2", "--device", "cpu",
                 "--prefill-chunk", "128", "--offload", "on", "--no-overlap-too", "--passkey-trial", "700",
                 "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert [(r["offload"], r["overlap"]) for r in res["bench"]] == [(True, True), (True, False)]
    assert all(r["prefill_fetched_gb"] > 0 for r in res["bench"])
    (t,) = res["passkey_trials"]
    assert t["prompt_length"] % 63 == 1 and t["seconds"] > 0 and isinstance(t["correct"], bool)
    assert t["fetched_gb"] > 0 and "passkey trial 700 tokens" in capsys.readouterr().out


def test_plot_command_draws_runs_and_names_bad_input(tmp_path, capsys):
    run = tmp_path / "drt"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - s / 100, "lr": 1e-3} for s in range(1, 60)]
    rows += [{"step": s, "val_loss": 4.0 - s / 100, "val_retr_spread": 0.5 / s, "val_retr_top": 0.2,
              "val_gca_gain": s / 1000} for s in (20, 40)]
    lines = [json.dumps(r) for r in rows] + ['{"step": 61, "loss": 2.']  # a row cut short by a crash
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    swa = tmp_path / "swa.jsonl"
    swa.write_text("\n".join(json.dumps({"step": s, "loss": 4.0}) for s in range(1, 10)) + "\n")
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(run), str(swa), "--labels", "a,b", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert "a: step 40: val_loss 3.6000, retr_spread 0.0125, retr_top 0.2, gca_gain 0.04" in captured.out
    assert "skipped 1 line" in captured.err
    assert main(["plot", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no training log" in capsys.readouterr().err
    assert main(["plot", str(run), "--labels", "a,b", "--out", str(out)]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err


def test_plot_tells_runs_of_one_name_apart(tmp_path, monkeypatch, capsys):
    """Two runs whose folders share a name (or two log.jsonl files) got one label, and the first run was
    silently left out of the plot; now their labels take as much of their paths as tells them apart, and
    a label given twice, or a run given twice, is refused."""
    import matplotlib.figure

    runs = []
    for parent, loss in (("a", 5.0), ("b", 3.0)):
        run = tmp_path / parent / "drt"
        run.mkdir(parents=True)
        (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss}) + "\n" for s in range(1, 4)))
        runs.append(run)
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    for given in ([str(r) for r in runs], [str(r / "log.jsonl") for r in runs]):
        assert main(["plot", *given, "--out", str(tmp_path / "c.png")]) == 0
        lines = {ln.get_label(): list(ln.get_ydata()) for ln in figs[-1].axes[0].get_lines()}
        assert lines == {"a/drt": [5.0] * 3, "b/drt": [3.0] * 3}
    capsys.readouterr()
    assert main(["plot", *map(str, runs), "--labels", "x,x", "--out", str(tmp_path / "c.png")]) == 2
    assert "--labels names x more than once" in capsys.readouterr().err
    assert main(["plot", str(runs[0]), str(runs[0] / "log.jsonl"), "--out", str(tmp_path / "c.png")]) == 2
    assert "is given more than once" in capsys.readouterr().err
    assert len(figs) == 2


def test_plot_keeps_each_run_in_one_colour_across_panels(tmp_path, monkeypatch):
    import matplotlib.figure

    from gca.eval.plots import plot_training_logs

    swa = [{"step": s, "loss": 4.0} for s in range(1, 10)] + [{"step": 5, "val_loss": 3.9}]
    drt = [{"step": s, "loss": 5.0} for s in range(1, 10)] + [{"step": 5, "val_loss": 3.5, "val_retr_spread": 0.3,
                                                                "val_gca_gain": 0.1}]
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    plot_training_logs({"swa": swa, "drt": drt}, str(tmp_path / "c.png"))  # the swa run is absent from two panels
    colours = {}
    for ax in figs[0].axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) >= {"swa", "drt"} and len(colours["drt"]) == 1 and colours["drt"] != colours["swa"]


def test_plot_adds_a_panel_for_the_auxiliary_retrieval_loss(tmp_path, monkeypatch):
    import matplotlib.figure

    from gca.eval.plots import plot_training_logs

    swa = [{"step": s, "loss": 4.0} for s in range(1, 10)] + [{"step": 5, "val_loss": 3.9}]
    aux = [{"step": s, "loss": 5.0, "retrieval_copy_loss": 3.0 - 0.1 * s} for s in range(1, 10)]
    aux += [{"step": 5, "val_loss": 3.5, "val_retr_spread": 0.3, "val_gca_gain": 0.1}]
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    plot_training_logs({"swa": swa, "aux": aux}, str(tmp_path / "c.png"), smooth=1)
    axes = figs[0].axes
    assert len(axes) == 5
    assert "retrieval_copy_loss" in axes[4].get_title()
    (line,) = [ln for ln in axes[4].get_lines() if not ln.get_label().startswith("_")]
    assert line.get_label() == "aux" and list(line.get_ydata()) == [3.0 - 0.1 * s for s in range(1, 10)]
    gain = [ln for ln in axes[3].get_lines() if ln.get_label() == "aux"]
    assert "val_gca_gain" in axes[3].get_title() and list(gain[0].get_ydata()) == [0.1]


def test_plot_draws_a_log_shorter_than_smooth_row_by_row(tmp_path, monkeypatch):
    # 3 rows under the default --smooth 5 used to become their mean: one unmarked point
    import matplotlib.figure

    run = tmp_path / "t1"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - s / 10, "retrieval_copy_loss": 3.0 - s / 10} for s in (10, 20, 30)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    axes = figs[0].axes
    for ax, key in ((axes[0], "loss"), (axes[-1], "retrieval_copy_loss")):
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "t1"]
        assert list(line.get_xdata()) == [10, 20, 30] and list(line.get_ydata()) == [r[key] for r in rows]
        assert line.get_marker() not in ("None", "", None)
    assert "marked: as logged" in axes[0].get_title()
    # a longer log is still its running mean, unmarked
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 8)))
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    (line,) = [ln for ln in figs[1].axes[0].get_lines() if ln.get_label() == "t1"]
    assert list(line.get_xdata()) == [5, 6, 7] and list(line.get_ydata()) == pytest.approx([3.0, 4.0, 5.0])
    assert line.get_marker() == "None" and "as logged" not in figs[1].axes[0].get_title()


def test_train_stopped_by_a_signal_exits_with_the_shells_status(tmp_path, monkeypatch):
    """gca train returns 128 + the signal when Ctrl-C / SIGTERM stopped it after a checkpoint (the trainer's
    side is tests/test_train.py::test_ctrl_c_finishes_the_step_saves_and_resumes_to_the_uninterrupted_run)."""
    import signal

    from gca.train import trainer

    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (None, 0)):
        monkeypatch.setattr(trainer, "train", lambda cfg, sig=sig: types.SimpleNamespace(interrupted=sig))
        assert main(["train", "--preset", "tiny", "--data", "synthetic:passkey", "--out", str(tmp_path / "r")]) == status


def test_ctrl_c_ends_a_command_in_one_line(capsys, monkeypatch):
    """Ctrl-C (in `gca bench`, `prepare`, `generate`, or a second one in `gca train`) printed a
    KeyboardInterrupt traceback; now one line and the shell's status for SIGINT (GCA_TRACEBACK=1 raises)."""
    import gca.inference.bench as bench

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "bench_streaming", stop)
    argv = ["bench", "--preset", "tiny", "--lengths", "300", "--device", "cpu"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "gca bench: interrupted"
    monkeypatch.setenv("GCA_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        main(argv)


def test_train_stopped_by_nonfinite_gradients_ends_in_one_line(fake_data, tmp_path, capsys, monkeypatch):
    """A run that --max-nonfinite stops ended in a FloatingPointError traceback (status 1), and its message
    pointed at DIR/ckpt though no checkpoint had been saved yet; now one line, status 2, naming the
    checkpoint only when there is one."""
    real_forward = DRT.forward
    calls = {"n": 0, "bad_from": 2}  # training forward calls (one a step) from this one on give a NaN loss

    def forward(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] >= calls["bad_from"]:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DRT, "forward", forward)
    run = tmp_path / "run"
    assert main(_train_args(run, "--max-nonfinite", "0", "--eval-every", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("gca train: error: 1 steps in a row (to step 2) had a non-finite gradient") and "Traceback" not in err
    assert "No checkpoint was saved yet (the first was due at step 3): a rerun starts from scratch." in err
    assert not (run / "ckpt").exists()
    calls.update(n=0, bad_from=3)
    assert main(_train_args(tmp_path / "run2", "--max-nonfinite", "0", "--eval-every", "0", "--save-every", "1")) == 2
    err = capsys.readouterr().err
    assert "(to step 3) had" in err and f"The last good checkpoint is in {tmp_path / 'run2' / 'ckpt'}." in err
