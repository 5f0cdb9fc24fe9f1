"""Training loop: learning, exact resume (also after ``kill -9``), atomic checkpoints, clear errors, DDP.

The tests never touch ``gca.data``: :class:`FakeSource` below stands in for its batch sources. Every run
is a tiny model (60K parameters) on 200-token sequences, a few steps long.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gca import DRT, DRTConfig
from gca.train import CheckpointError, TrainConfig, load_model, read_checkpoint, train
from gca.train import checkpoint as ckpt_mod
from gca.train.schedule import lr_at

TESTS = Path(__file__).resolve().parent
TINY = dict(hidden_size=32, num_heads=2, intermediate_size=64, window=64, top_k=2)


class FakeSource:
    """A stand-in for a ``gca.data`` batch source. Row ``r`` of global batch ``index`` (rank ``k`` holds rows
    ``k*B .. k*B+B-1``) comes from a generator seeded by (seed, split, index, r), so a world of 2 with batch B
    sees exactly the rows a single process with batch 2B sees. ``learnable``: arithmetic sequences
    (start, stride random) a model learns in a few steps; otherwise uniform random tokens."""

    tokenizer = None

    def __init__(self, vocab_size=64, seq_len=200, seed=0, split="train", learnable=True, crash_at=None, delay=0.0):
        self.vocab_size, self.seq_len, self.learnable = vocab_size, seq_len, learnable
        self.seed = seed * 7919 + (0 if split == "train" else 1_000_003)
        self.crash_at, self.delay = crash_at, delay

    def get_batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        if self.crash_at is not None and index >= self.crash_at:
            raise RuntimeError("simulated crash")
        if self.delay:
            time.sleep(self.delay)
        rows = []
        for i in range(batch_size):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 4099 + rank * batch_size + i)
            if self.learnable:
                start = int(torch.randint(0, self.vocab_size, (1,), generator=g))
                stride = int(torch.randint(1, 4, (1,), generator=g))
                rows.append((start + stride * torch.arange(self.seq_len)) % self.vocab_size)
            else:
                rows.append(torch.randint(0, self.vocab_size, (self.seq_len,), generator=g))
        ids = torch.stack(rows)
        labels = ids.clone()
        labels[:, :3] = -100  # some positions without loss, the same count in every row
        return {"input_ids": ids, "labels": labels}


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(
        preset="tiny",
        model=dict(TINY),
        data="fake",
        seq_len=200,
        batch_size=2,
        grad_accum=2,
        lr=1e-2,
        min_lr=1e-3,
        warmup=0.1,
        max_steps=8,
        save_every=4,
        log_every=1,
        eval_every=4,
        eval_batches=1,
        out=str(out),
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def sources(**kw):
    return dict(source=FakeSource(**kw), val_source=FakeSource(split="val"))


def log_rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def train_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in log_rows(out) if "loss" in r]


def val_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in log_rows(out) if "val_loss" in r]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run several times faster on one thread, above all on a busy machine; subprocesses get
    OMP_NUM_THREADS=1 so that they compute bit for bit what this process computes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env():
    path = os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH")) if p)  # gca without an install
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (8 steps, checkpoints at 4 and 8, validation at 4 and 8, Gumbel noise on)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(tiny_cfg(out), **sources())
    return out, result


# ---- learning, logs, schedule ----
def test_loss_decreases_and_run_dir_is_complete(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, max_steps=20, save_every=10, grad_accum=1, eval_every=10, tensorboard=True)
    result = train(cfg, **sources())
    losses = [loss for _, loss in train_losses(out)]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    vals = val_losses(out)
    assert [s for s, _ in vals] == [10, 20] and vals[1][1] < vals[0][1]
    for row in log_rows(out):
        assert {"step", "tokens", "elapsed_s"} <= set(row)
        if "val_loss" in row:  # a DRT's validation rows carry its retrieval health
            assert row["val_retr_spread"] >= 0 and 1 / 2 - 1e-6 <= row["val_retr_top"] <= 1  # top_k=2
            assert math.isfinite(row["val_gca_gain"]) and row["val_gca_gain"] != 0.0  # GCA changes the loss
    row = log_rows(out)[0]
    assert {"loss", "lr", "tok_per_s", "grad_norm"} <= set(row) and row["tokens"] == 2 * 200
    ck = read_checkpoint(out / "ckpt")
    assert ck.step == 20 and ck.config.hidden_size == 32 and ck.config.vocab_size == 64
    assert ck.train_config == cfg.to_dict()
    try:
        import tensorboard  # noqa: F401

        assert any((out / "tb").iterdir())
    except ImportError:
        pass
    model = load_model(out)
    for k, v in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training


def test_tok_per_s_leaves_out_validation_and_checkpoints(tmp_path, monkeypatch):
    """tok_per_s is the training's throughput: a row after a validation or a checkpoint counted their time
    as training time (here each takes a second, ten times a step's)."""
    from gca.train import trainer

    def slow(method):
        def run(*a, **kw):
            time.sleep(1.0)
            return method(*a, **kw)

        return run

    monkeypatch.setattr(trainer._Run, "_evaluate", slow(trainer._Run._evaluate))
    monkeypatch.setattr(trainer._Run, "_save", slow(trainer._Run._save))
    out = tmp_path / "run"
    train(tiny_cfg(out, max_steps=3, save_every=1, eval_every=1, grad_accum=1), **sources())
    rows = [r for r in log_rows(out) if "loss" in r]
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed[2] - elapsed[1] > 2.0  # the wall clock does count both
    assert all(r["tok_per_s"] > 400 for r in rows[1:]), rows  # 400 tokens a step, each well under 1 s


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    kw = dict(lr=2e-3, min_lr=4e-4, max_steps=100, warmup=0.02)
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(2e-3)
    assert lrs[-1] == pytest.approx(4e-4)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    # a warm-up that leaves one step after it, or none: the last step is still at min_lr (it stayed at lr)
    for max_steps, warmup in [(3, 0.5), (4, 0.75), (10, 0.9), (2, 1.0)]:
        kw = dict(lr=2e-3, min_lr=4e-4, max_steps=max_steps, warmup=warmup)
        w = round(warmup * max_steps)
        lrs = [lr_at(s, **kw) for s in range(max_steps + 2)]
        assert lrs[w - 1] == pytest.approx(2e-3), (max_steps, warmup)
        assert lrs[max(w, max_steps - 1):] == pytest.approx([4e-4] * len(lrs[max(w, max_steps - 1):])), (max_steps, warmup)


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("lr", math.inf, "positive finite number"),  # trained on with lr nan: every weight NaN at step 1
        ("lr", math.nan, "positive finite number"),
        ("lr", "1e-3", "must be a number"),  # a TypeError from '>' before
        ("weight_decay", math.nan, "finite number >= 0"),  # accepted before: the weights went NaN
        ("weight_decay", math.inf, "finite number >= 0"),
        ("grad_clip", math.nan, "must be >= 0"),  # accepted before: clipping silently off
        ("eps", -1e-8, "finite number >= 0"),  # not checked at all before
        ("eps", math.nan, "finite number >= 0"),
        ("betas", (0.9, math.nan), "two numbers in [0, 1)"),
    ],
    ids=lambda v: str(v),
)
def test_bad_numbers_are_refused_naming_the_field(tmp_path, field, value, says):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: .*{re.escape(says)}"):
        tiny_cfg(out, **{field: value})
    assert not out.exists()  # refused before any work
    tiny_cfg(out, grad_clip=math.inf)  # clipping at inf is no clipping, as 0 is


def test_no_weight_decay_on_norms_and_embeddings():
    from gca import DRT, DRTConfig
    from gca.train.trainer import param_groups

    model = DRT(DRTConfig.from_preset("tiny", vocab_size=64, **TINY))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed.weight", "norm.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_scale_puts_matched_parameters_in_scaled_groups():
    from gca import DRT, DRTConfig
    from gca.train.trainer import param_groups

    model = DRT(DRTConfig.from_preset("tiny", vocab_size=64, **TINY))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1, {r"^encoder\.": 0.1, r"^(embed|encoder)\.": 0.5})
    assert [g["lr_scale"] for g in groups[:2]] == [1.0, 1.0]
    by_scale = {}
    for g in groups:
        by_scale.setdefault(g["lr_scale"], []).extend(names[id(p)] for p in g["params"])
        if g["weight_decay"]:  # decay only on weight matrices, as without scales
            assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in g["params"])
    assert by_scale[0.1] and all(n.startswith("encoder.") for n in by_scale[0.1])  # the first pattern wins
    assert by_scale[0.5] == ["embed.weight"]
    assert not any(n.startswith(("encoder.", "embed.")) for n in by_scale[1.0])
    assert sum(len(v) for v in by_scale.values()) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="matches no trained parameter"):
        param_groups(model, 0.1, {"nothing_is_called_this": 0.1})
    with pytest.raises(ValueError, match=r"'\^encoder.*an earlier pattern took them all"):
        param_groups(model, 0.1, {r"^enc": 0.1, r"^encoder\.": 0.5})  # shadowed: it would change nothing


def test_lr_scale_trains_matched_parameters_at_the_scaled_rate(reference, tmp_path):
    ref_out, ref = reference
    cfg = tiny_cfg(tmp_path / "ft", init_from=str(ref_out), lr_scale={r"^encoder\.": 1e-30}, max_steps=2,
                   eval_every=0, grad_accum=1, weight_decay=0.0)
    result = train(cfg, **sources())
    before, after = ref.model.state_dict(), result.model.state_dict()
    scaled = [k for k in before if k.startswith("encoder.")]
    rest = [k for k in before if not k.startswith("encoder.")]
    for k in scaled:  # an lr of 1e-30 x the schedule's moves nothing
        torch.testing.assert_close(after[k], before[k], atol=1e-12, rtol=0)
    assert sum(not torch.allclose(after[k], before[k]) for k in rest) >= len(rest) // 2
    resumed = train(dataclasses.replace(cfg, max_steps=3), **sources()).model.state_dict()  # resumes: same groups
    for k in scaled:  # the resumed optimizer kept the groups' scales
        torch.testing.assert_close(resumed[k], before[k], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="checkpoint"):  # another scale is another run
        train(dataclasses.replace(cfg, max_steps=4, lr_scale={r"^encoder\.": 0.5}), **sources())
    for bad in ({"(": 0.1}, {"x": 0.0}, {"x": -1.0}, {"x": float("inf")}):
        with pytest.raises(ValueError, match="lr_scale"):
            tiny_cfg(tmp_path / "bad", lr_scale=bad)


def test_resume_from_a_checkpoint_written_before_a_field_existed(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    train(tiny_cfg(out, stop_at=3), **sources())
    ck = out / "ckpt"
    tc = json.loads((ck / "train_config.json").read_text())
    del tc["lr_scale"], tc["freeze"]  # as an older version wrote it
    (ck / "train_config.json").write_text(json.dumps(tc))
    manifest = json.loads((ck / "checkpoint.json").read_text())
    manifest["files"]["train_config.json"] = (ck / "train_config.json").stat().st_size
    del manifest["sha256"]  # nor did it write the files' sums (checked by size alone)
    (ck / "checkpoint.json").write_text(json.dumps(manifest))
    assert train(tiny_cfg(out), **sources()).resumed_from == 3  # the missing fields count as their defaults
    assert train_losses(out) == train_losses(ref_out)


# ---- exact resume ----
def test_resume_after_crash_equals_uninterrupted_run(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(out), **sources(crash_at=2 * 6))  # dies during step 7, checkpoint at 4
    assert read_checkpoint(out / "ckpt").step == 4
    assert max(s for s, _ in train_losses(out)) == 6  # rows past the checkpoint, to be rewritten
    result = train(tiny_cfg(out), **sources())
    assert result.resumed_from == 4
    assert train_losses(out) == train_losses(ref_out)  # bitwise, with the Gumbel noise on
    assert val_losses(out) == val_losses(ref_out)
    assert [r["step"] for r in log_rows(out)] == [r["step"] for r in log_rows(ref_out)]  # no duplicates


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import FakeSource, tiny_cfg
from gca.train import train
_r = train(tiny_cfg({out!r}), source=FakeSource(delay={delay}), val_source=FakeSource(split="val"))
"""


def test_resume_after_sigkill_equals_uninterrupted_run(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(out), delay=0.15))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 60
    while not (out / "ckpt" / ckpt_mod.MANIFEST).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 60 s"
        time.sleep(0.02)
    time.sleep(0.3)  # let it get past the checkpoint and log a row or so
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert read_checkpoint(out / "ckpt").step == 4
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(out), delay=0.0))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    assert "resuming from step 4" in done.stdout
    assert train_losses(out) == train_losses(ref_out)
    assert val_losses(out) == val_losses(ref_out)


def test_ctrl_c_finishes_the_step_saves_and_resumes_to_the_uninterrupted_run(reference, tmp_path):
    """SIGINT while training: the step in progress finishes, a checkpoint of it is saved, train() returns
    (interrupted = SIGINT), and rerunning continues to the uninterrupted run's losses. SIGTERM likewise."""
    ref_out, _ = reference
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / f"run-{sig.name}"
        script = tmp_path / "run_train.py"
        script.write_text(SCRIPT.format(tests=str(TESTS), out=str(out), delay=0.15)
                          + "import signal as _s\nprint('RESULT', _r.step, _r.interrupted == _s.SIGINT, _r.interrupted == _s.SIGTERM)\n")
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
        deadline = time.time() + 60
        while not (out / "ckpt" / ckpt_mod.MANIFEST).exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        time.sleep(0.2)  # into step 5 or 6
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        step = read_checkpoint(out / "ckpt").step
        assert 4 < step < 10 and f"interrupted at step {step}: checkpoint saved" in stdout, stdout
        assert f"RESULT {step} {sig == signal.SIGINT} {sig == signal.SIGTERM}" in stdout
        script.write_text(SCRIPT.format(tests=str(TESTS), out=str(out), delay=0.0))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=_env())
        assert done.returncode == 0, done.stderr
        assert f"resuming from step {step}" in done.stdout
        assert train_losses(out) == train_losses(ref_out)


class StepRowsSource(FakeSource):
    """Rows that depend on (step, row of the step) alone, so ``grad_accum`` micro-batches of B rows hold
    the same rows as one batch of grad_accum x B; each row's labels are masked on a random number of its
    first positions (0 to 190 of 200, some rows wholly), so micro-batches hold very different counts."""

    def __init__(self, grad_accum, **kw):
        super().__init__(**kw)
        self.grad_accum = grad_accum

    def get_batch(self, index, batch_size, rank=0, world_size=1):
        step, first = index // self.grad_accum, (index % self.grad_accum) * batch_size
        ids, labels = [], []
        for r in range(first, first + batch_size):
            g = torch.Generator().manual_seed(step * 1009 + r)
            ids.append(torch.randint(0, self.vocab_size, (self.seq_len,), generator=g))
            lab = ids[-1].clone()
            cut = int(torch.randint(0, 191, (1,), generator=g)) if r % 3 else self.seq_len  # row 0, 3, ...: no label
            lab[:cut] = -100
            labels.append(lab)
        return {"input_ids": torch.stack(ids), "labels": torch.stack(labels)}


def test_grad_accum_weights_micro_batches_by_their_labelled_tokens(tmp_path):
    """Two micro-batches of 3 rows train as one batch of 6, though their rows hold very different numbers
    of labelled tokens (one micro-batch's first row none at all): the same loss and gradient norm at every
    step. The micro-batches' mean losses used to count equally, whatever their token counts."""
    kw = dict(max_steps=3, eval_every=0, log_every=1, weight_decay=0.0)
    train(tiny_cfg(tmp_path / "big", batch_size=6, grad_accum=1, **kw), source=StepRowsSource(1))
    train(tiny_cfg(tmp_path / "acc", batch_size=3, grad_accum=2, **kw), source=StepRowsSource(2))
    big, acc = [[r for r in log_rows(tmp_path / d) if "loss" in r] for d in ("big", "acc")]
    assert len(big) == len(acc) == 3
    for a, b in zip(acc, big):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-4)
    # one row a micro-batch: the first holds no labelled token (its mean loss is NaN); it adds nothing,
    # and the step is the batch of three (it used to stop the run: "the training loss is nan")
    train(tiny_cfg(tmp_path / "big3", batch_size=3, grad_accum=1, **kw), source=StepRowsSource(1))
    train(tiny_cfg(tmp_path / "acc3", batch_size=1, grad_accum=3, **kw), source=StepRowsSource(3))
    big, acc = [[r for r in log_rows(tmp_path / d) if "loss" in r] for d in ("big3", "acc3")]
    assert len(big) == len(acc) == 3 and not any(r.get("skipped_steps") for r in acc)
    for a, b in zip(acc, big):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-4)


def test_tensorboard_events_past_the_resume_point_are_purged_on_a_fresh_start_too(tmp_path, monkeypatch):
    """A run killed before its first checkpoint starts afresh at step 0: its TensorBoard events of steps 1..k
    must go as those past a checkpoint do (purge_step was None on a fresh start, so they stayed, doubled).
    (tensorboard is not a test dependency: a stand-in SummaryWriter records how it was opened.)"""
    import types

    opened = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            opened.append(purge_step)

        def add_scalar(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    kw = dict(max_steps=4, save_every=2, eval_every=0, tensorboard=True)
    train(tiny_cfg(tmp_path / "r", stop_at=2, **kw), **sources())
    train(tiny_cfg(tmp_path / "r", **kw), **sources())
    assert opened == [1, 3]  # the fresh start purges from step 1, the resume from step 3


def test_a_signal_during_a_checkpoint_save_stops_at_that_checkpoint(tmp_path, monkeypatch):
    """SIGTERM arriving while the step-4 checkpoint is written: the run returns at step 4 with that
    checkpoint (it used to train step 5 and save again before it looked at the signal)."""
    from gca.train import trainer as trainer_mod

    saves = []
    orig = trainer_mod._Run._save

    def save_then_signal(self, *a, **kw):
        orig(self, *a, **kw)
        saves.append(a[2])
        if len(saves) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the training loop's handler, in this thread

    monkeypatch.setattr(trainer_mod._Run, "_save", save_then_signal)
    r = train(tiny_cfg(tmp_path / "r"), **sources())
    assert r.interrupted == signal.SIGTERM and r.step == 4 and saves == [4]
    assert read_checkpoint(tmp_path / "r" / "ckpt").step == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_loading_on_cuda_without_cuda_is_not_called_corrupt():
    """The weights' read failed on pin_memory and was reported as a corrupt checkpoint to delete."""
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):
        load_model(TESTS.parent / "checkpoints" / "passkey-tiny", device="cuda")

def test_save_model_and_export_model_round_trip(reference, tmp_path):
    """save_model writes any DRT where load_model reads it back (exactly in float32, rounded in bf16);
    export_model makes the compact bf16 copy of a run's checkpoint, with its train config."""
    from gca.data.tokenizer import load_tokenizer
    from gca.train import export_model, save_model

    torch.manual_seed(0)
    m = DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=64)).eval()
    x = torch.randint(0, 64, (1, 150))
    save_model(m, tmp_path / "f32")
    back = load_model(tmp_path / "f32")
    assert back.config == m.config
    assert torch.equal(back(x).logits, m(x).logits)
    save_model(m, tmp_path / "bf16", dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.float32  # the model itself is left as it was
    half = load_model(tmp_path / "bf16")
    for (k, a), b in zip(half.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16).to(a.dtype)), k
    ref_out, _ = reference
    exp = export_model(ref_out, tmp_path / "export")
    assert sorted(p.name for p in exp.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "train_config.json"]
    trained = load_model(ref_out)
    torch.testing.assert_close(load_model(exp)(x).logits, trained(x).logits, atol=0.1, rtol=0.05)


def test_save_model_checks_dtype_and_tokenizer_and_drops_a_stale_one(tmp_path):
    """save_model(dtype=torch.int64) wrote zeros that load_model accepted (a model predicting nothing); a
    tokenizer with more ids than the model's vocabulary, or a path string for one (an AttributeError after the
    weights were written), was taken; a folder saved again without a tokenizer kept the previous model's."""
    from safetensors.torch import load_file, save_file

    from gca.data.tokenizer import load_tokenizer
    from gca.train import save_model

    torch.manual_seed(0)
    small = DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=64)).eval()
    for bad in (torch.int64, torch.bool, "bfloat16"):
        with pytest.raises(ValueError, match="floating-point torch.dtype"):
            save_model(small, tmp_path / "bad", dtype=bad)
    tok = load_tokenizer("embedded")  # 2048 ids
    with pytest.raises(ValueError, match="2048 ids but the model's vocabulary is 64"):
        save_model(small, tmp_path / "bad", tokenizer=tok)
    with pytest.raises(TypeError, match="load it first"):
        save_model(small, tmp_path / "bad", tokenizer="tokenizer.json")
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    m = DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=2048)).eval()
    save_model(m, tmp_path / "m", tokenizer=tok)
    assert load_tokenizer(tmp_path / "m" / "tokenizer.json").vocab_size == 2048
    with pytest.warns(UserWarning, match="removed .*tokenizer.json"):
        save_model(small, tmp_path / "m")  # another model in the same folder, without a tokenizer
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    # a weights file whose floating weights were cast to integers: refused on load, not zeros
    w = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v.to(torch.int64) for k, v in w.items()}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is (truncated or altered|damaged)"):
        load_model(tmp_path / "m")  # the folder's manifest catches the rewrite first
    (tmp_path / "m" / "manifest.json").unlink()  # as a file written by another tool
    with pytest.raises(CheckpointError, match="non-floating dtype"):
        load_model(tmp_path / "m")


def test_save_model_looks_through_wrappers_and_refuses_a_run_folder(reference, tmp_path):
    """A torch.compile'd model saved with its wrapper's "_orig_mod." names, which load_model then failed on
    with a TypeError (a set sliced in the error message); saving into a run folder would shadow its
    checkpoint; export onto its own source; "cpu:0" was called a corrupt checkpoint."""
    from safetensors.torch import load_file, save_file

    from gca.train import export_model, save_model

    torch.manual_seed(0)
    m = DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=64)).eval()
    save_model(torch.compile(m), tmp_path / "compiled")  # (nothing is compiled: only its state is read)
    assert not any(k.startswith("_orig_mod") for k in load_file(tmp_path / "compiled" / "model.safetensors"))
    x = torch.randint(0, 64, (1, 100))
    assert torch.equal(load_model(tmp_path / "compiled", device="cpu:0")(x).logits, m(x).logits)
    ref_out, _ = reference
    with pytest.raises(ValueError, match="holds a training run's checkpoint"):
        save_model(m, ref_out)
    with pytest.raises(ValueError, match="write the copy to another folder"):
        export_model(ref_out, ref_out)
    # a weights file without one of the model's tensors: the CheckpointError naming it
    w = load_file(tmp_path / "compiled" / "model.safetensors")
    save_file({k: v for k, v in w.items() if k != "norm.weight"}, tmp_path / "compiled" / "model.safetensors")
    (tmp_path / "compiled" / "manifest.json").unlink()  # (which would name the rewritten file first)
    with pytest.raises(CheckpointError, match="missing norm.weight"):
        load_model(tmp_path / "compiled")


def test_evaluation_gives_the_model_back_in_its_mode(tmp_path):
    from gca.eval.tasks import evaluate_tasks

    m = DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=2048)).train()
    evaluate_tasks(m, lengths=[200], depths=1, trials=1, progress=False)
    assert m.training
    evaluate_tasks(m.eval(), lengths=[200], depths=1, trials=1, progress=False)
    assert not m.training


# ---- atomic checkpoints ----
def test_save_interrupted_between_files_keeps_previous_checkpoint(reference, tmp_path, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(out), **sources(crash_at=2 * 5))  # checkpoint at 4, dies in step 6
    # a save that dies after model.safetensors, before trainer.pt: ckpt/ must still be step 4
    model = load_model(out)

    def boom(*a, **k):
        raise OSError("simulated crash inside save")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt_mod.save_checkpoint(out, model=model, train_config={}, trainer={"step": 5})
    monkeypatch.undo()
    assert (out / ckpt_mod.TMP / ckpt_mod.WEIGHTS).exists()  # the half-written one
    assert read_checkpoint(out / "ckpt").step == 4
    # resuming ignores (and later removes) the half-written ckpt.tmp and reproduces the reference
    train(tiny_cfg(out), **sources())
    assert train_losses(out) == train_losses(ref_out)
    assert not (out / ckpt_mod.TMP).exists()


def test_save_interrupted_between_renames_is_repaired(reference, tmp_path, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    model = load_model(out)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # ckpt -> ckpt.old done; crash before ckpt.tmp -> ckpt
            raise OSError("simulated crash between renames")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(OSError, match="between renames"):
        ckpt_mod.save_checkpoint(out, model=model, train_config={}, trainer={"step": 9})
    monkeypatch.undo()
    assert not (out / "ckpt").exists() and (out / ckpt_mod.OLD).exists()
    assert load_model(out) is not None  # readable without repair
    path = ckpt_mod.find_checkpoint(out)  # repairs
    assert path == out / "ckpt" and read_checkpoint(path).step == 8


# ---- errors ----
@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncate_weights", ["model.safetensors", "truncated"]),
        ("delete_trainer", ["trainer.pt", "missing"]),
        ("garble_trainer", ["trainer.pt", "cannot be read"]),
        ("garble_trainer_head", ["trainer.pt", "cannot be read"]),  # torch's paragraph, once
        ("garble_train_config", ["train_config.json", "does not hold a TrainConfig"]),  # a TypeError traceback before
        ("damage_trainer_inside", ["trainer.pt", "sha256"]),  # same size, read without complaint before
        ("damage_weights_inside", ["model.safetensors", "sha256"]),
        ("delete_manifest", ["checkpoint.json", "missing"]),
    ],
)
def test_corrupt_checkpoint_error_names_the_file(reference, tmp_path, damage, words):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    ck = out / "ckpt"
    if damage == "truncate_weights":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete_trainer":
        (ck / "trainer.pt").unlink()
    elif damage == "garble_trainer":
        n = (ck / "trainer.pt").stat().st_size
        (ck / "trainer.pt").write_bytes(b"\0" * n)
    elif damage == "garble_trainer_head":
        data = (ck / "trainer.pt").read_bytes()
        (ck / "trainer.pt").write_bytes(b"#" * 8 + data[8:])
    elif damage == "garble_train_config":  # valid JSON of the same size, but a list
        n = (ck / "train_config.json").stat().st_size
        (ck / "train_config.json").write_text("[" + " " * (n - 2) + "]")
    elif damage.startswith("damage_"):  # 64 bytes zeroed in the middle of the file
        f = ck / ("trainer.pt" if "trainer" in damage else "model.safetensors")
        data = bytearray(f.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        f.write_bytes(bytes(data))
    else:
        (ck / "checkpoint.json").unlink()
    if damage.startswith("garble_"):  # the read errors, as a manifest without sums (an older version's) meets them
        manifest = json.loads((ck / "checkpoint.json").read_text())
        del manifest["sha256"]
        (ck / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(out, max_steps=10), **sources())
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert "delete" in msg and str(ck) in msg
    assert "\n" not in msg and "weights_only" not in msg, msg  # one line, and no advice to unpickle unsafely


def test_truncated_weights_fail_in_load_model_too(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    with open(out / "ckpt" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(out)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path / "nothing")


def test_config_that_does_not_fit_the_weights_is_one_line(reference, tmp_path):
    """A config.json from another run (other widths): one line naming the first tensor that differs and
    how many do, not torch's line per tensor."""
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    cfg_file = out / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(CheckpointError, match="config.json is truncated or altered"):
        load_model(out)  # the manifest catches the edit first
    (out / "ckpt" / "checkpoint.json").unlink()  # as in a checkpoint assembled by hand or shipped without one
    with pytest.raises(CheckpointError) as e:
        load_model(out)
    msg = str(e.value)
    assert "\n" not in msg and "differ in shape, e.g. " in msg and "mlp" in msg and "config.json" in msg, msg


def test_resume_with_different_config_names_the_fields(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    with pytest.raises(ValueError) as e:
        train(tiny_cfg(out, lr=5e-3, batch_size=3, save_every=2), **sources())
    msg = str(e.value)
    assert "lr: checkpoint 0.01, now 0.005" in msg and "batch_size" in msg
    listed = [line.split(":")[0].strip() for line in msg.splitlines() if line.startswith("  ")]
    assert listed == ["batch_size", "lr"]  # save_every may change on resume: not a difference
    with pytest.raises(ValueError, match="hidden_size"):
        train(tiny_cfg(out, model=dict(TINY, hidden_size=64)), **sources())
    with pytest.raises(ValueError, match="raise --max-steps"):
        train(tiny_cfg(out, max_steps=6), **sources())
    # raising max_steps continues the run; the first 8 steps stay as they were
    result = train(tiny_cfg(out, max_steps=10), **sources())
    assert result.resumed_from == 8 and result.step == 10
    assert train_losses(out)[:8] == train_losses(ref_out) and [s for s, _ in train_losses(out)] == list(range(1, 11))


def test_resume_on_data_prepared_again_warns(tmp_path, capsys):
    from gca.data import prepare

    def corpus(name, words):
        d = tmp_path / name
        d.mkdir()
        for i in range(6):
            (d / f"doc{i}.txt").write_text(" ".join(f"{w}{(i * 7 + j) % 13}" for j in range(400) for w in words) + "\n")
        return d

    data = tmp_path / "data"
    prepare([str(corpus("a", ["alpha", "beta"]))], data, tokenizer="embedded", val_fraction=0.3, progress=False)
    out = tmp_path / "run"
    cfg = dict(data=str(data), save_every=1, eval_every=0, seq_len=128)
    train(tiny_cfg(out, max_steps=2, **cfg))
    assert read_checkpoint(out / "ckpt").trainer["data"]["content_hash"]  # the description is saved
    capsys.readouterr()
    train(tiny_cfg(out, max_steps=3, **cfg))  # the same data: resumes quietly
    assert "warning" not in capsys.readouterr().out
    prepare([str(corpus("b", ["gamma", "delta"]))], data, tokenizer="embedded", val_fraction=0.3, progress=False, overwrite=True)
    train(tiny_cfg(out, max_steps=4, **cfg))
    said = capsys.readouterr().out
    assert "warning: the training data is not what the checkpoint at step 3 was trained on" in said


# ---- DDP ----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_two(worker, args: tuple, seconds: float) -> None:
    """Run ``worker(rank, *args)`` in two processes; fail the test if they take longer than ``seconds``."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.time() + seconds
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {seconds:g} s")


def _ddp_cfg(out, max_steps, batch_size):
    return tiny_cfg(
        out, model=dict(TINY, gumbel=False), grad_clip=0.0, batch_size=batch_size, max_steps=max_steps, save_every=2, eval_every=2
    )


def _run_twice(out, batch_size) -> dict:
    """Step 1 (gradients kept), then resume to step 3: what both the DDP and the single-process runs do."""
    r1 = train(_ddp_cfg(out, 1, batch_size), **sources())
    grads = {n: p.grad.clone() for n, p in r1.model.named_parameters()}
    r3 = train(_ddp_cfg(out, 3, batch_size), **sources())
    params = {n: p.detach().clone() for n, p in r3.model.named_parameters()}
    return {"grads": grads, "params": params}


def _ddp_worker(rank: int, world: int, port: int, out: str, result_dir: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from gca.train import distributed as D

    D.setup("cpu")  # joins the group as torchrun's env would have train() do; kept for both runs
    try:
        torch.save(_run_twice(out, batch_size=2), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        D.teardown()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    out = tmp_path / "ddp"
    _spawn_two(_ddp_worker, (2, _free_port(), str(out), str(tmp_path)), seconds=60)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for n in r0["params"]:  # DDP keeps the replicas identical, bit for bit
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    single = _run_twice(tmp_path / "single", batch_size=4)
    for n, g in single["grads"].items():
        torch.testing.assert_close(r0["grads"][n], g, atol=1e-5, rtol=1e-4, msg=f"gradient of {n}")
    ddp_l, one_l = train_losses(out), train_losses(tmp_path / "single")
    assert [s for s, _ in ddp_l] == [1, 2, 3]
    assert ddp_l[0][1] == pytest.approx(one_l[0][1], abs=1e-5)  # the all-reduced mean
    for (_, a), (_, b) in zip(ddp_l, one_l):
        assert a == pytest.approx(b, abs=1e-3)
    ddp_v, one_v = val_losses(out), val_losses(tmp_path / "single")
    assert [s for s, _ in ddp_v] == [1, 2, 3] and ddp_v[0][1] == pytest.approx(one_v[0][1], abs=1e-5)
    ck = read_checkpoint(out / "ckpt")
    assert ck.step == 3 and ck.trainer["world_size"] == 2 and len(ck.trainer["rng"]) == 2



class _SignalSource(FakeSource):
    """A FakeSource that sends its own process SIGTERM when asked for batch ``signal_at`` (as a scheduler
    preempting one node would), on rank ``signal_rank`` only."""

    def __init__(self, signal_at: int, signal_rank: int, **kw):
        super().__init__(**kw)
        self.signal_at, self.signal_rank = signal_at, signal_rank

    def get_batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        if index == self.signal_at and rank == self.signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().get_batch(index, batch_size, rank, world_size)


def _ddp_signal_worker(rank: int, world: int, port: int, result_dir: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from gca.train import distributed as D

    D.setup("cpu")
    try:
        root = Path(result_dir)
        cfg = lambda out: _ddp_cfg(out, 8, batch_size=2)  # noqa: E731 (save_every 2: the stop must save off that beat too)
        # SIGTERM reaches rank 1 alone while the loader fetches batch 9 (step 5 of 8 at grad_accum 2, or earlier:
        # the loader runs ahead of the step)
        stopped = train(cfg(root / "run"), source=_SignalSource(9, 1), val_source=FakeSource(split="val"))
        first = {"step": stopped.step, "interrupted": stopped.interrupted}
        resumed = train(cfg(root / "run"), **sources())
        whole = train(cfg(root / "whole"), **sources())
        torch.save({"first": first, "resumed": (resumed.resumed_from, resumed.step), "whole": whole.step,
                    "params": {n: p.detach().clone() for n, p in resumed.model.named_parameters()},
                    "whole_params": {n: p.detach().clone() for n, p in whole.model.named_parameters()}},
                   root / f"rank{rank}.pt")
    finally:
        D.teardown()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_ddp_sigterm_on_one_rank_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path):
    """Under DDP a signal to one process (one node preempted) stops all of them after the same step, with
    one checkpoint of it; rerunning resumes there and ends where an uninterrupted run ends, bit for bit."""
    _spawn_two(_ddp_signal_worker, (2, _free_port(), str(tmp_path)), seconds=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    step = r1["first"]["step"]
    assert 1 <= step < 8 and r0["first"]["step"] == step, (r0["first"], r1["first"])
    assert r1["first"]["interrupted"] == signal.SIGTERM and r0["first"]["interrupted"] is None
    assert r0["resumed"] == r1["resumed"] == (step, 8) and r0["whole"] == r1["whole"] == 8
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "whole")
    for n, p in r0["params"].items():
        assert torch.equal(p, r0["whole_params"][n]) and torch.equal(p, r1["params"][n]), n


# ---- non-finite gradients ----
def test_nonfinite_gradient_skips_the_update_saves_the_batch_and_stops_when_it_repeats(tmp_path, monkeypatch):
    from gca.model import DRT

    calls = {"n": 0}
    bad_calls = {3, 4}  # forward calls (grad_accum=1: one per step) that yield a NaN loss: steps 3 and 4
    real_forward = DRT.forward

    def forward(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DRT, "forward", forward)
    out = tmp_path / "run"
    result = train(tiny_cfg(out, grad_accum=1, eval_every=0, max_steps=6), **sources())
    assert result.skipped == [3, 4] and result.step == 6
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    rows = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 5, 6] and all(r["loss"] == r["loss"] for r in rows)
    assert rows[-1]["skipped_steps"] == 2
    saved = sorted(p.name for p in (out / "nonfinite").iterdir())
    assert saved == ["step3", "step3_rank0.pt", "step4_rank0.pt"]  # the first bad step's weights too
    dump = torch.load(out / "nonfinite" / "step3_rank0.pt")
    assert dump["input_ids"].shape == (2, 200) and dump["loss"] != dump["loss"]

    # more than max_nonfinite bad steps in a row stop the run with a message naming the fix
    calls["n"] = 0
    bad_calls.clear()
    bad_calls.update(range(2, 100))
    with pytest.raises(FloatingPointError, match="non-finite gradient.*lower --lr"):
        train(tiny_cfg(tmp_path / "run2", grad_accum=1, eval_every=0, max_steps=10, max_nonfinite=2), **sources())


def test_skipped_steps_carry_across_a_resume(tmp_path, monkeypatch):
    """The log's skipped_steps count and the streak --max-nonfinite bounds go on from the checkpoint as
    in an uninterrupted run (a resumed run counted from zero: its rows lost the count, and a streak
    across the checkpoint never stopped the run)."""
    from gca.model import DRT

    calls = {"n": 0, "bad": {3}}  # training forward calls (grad_accum=1: call n is step n) with a NaN loss
    real_forward = DRT.forward

    def forward(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] in calls["bad"]:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DRT, "forward", forward)
    kw = dict(grad_accum=1, eval_every=0, max_steps=6, save_every=2)
    train(tiny_cfg(tmp_path / "ref", **kw), **sources())
    calls["n"] = 0
    train(tiny_cfg(tmp_path / "run", stop_at=4, **kw), **sources())
    calls["n"] = 4
    result = train(tiny_cfg(tmp_path / "run", **kw), **sources())
    assert result.skipped == [] and read_checkpoint(tmp_path / "run" / "ckpt").trainer["skipped"] == [3]
    def counts(out):
        return [(r["step"], r.get("skipped_steps")) for r in log_rows(out)]

    assert counts(tmp_path / "run") == counts(tmp_path / "ref") == [(1, None), (2, None), (4, 1), (5, 1), (6, 1)]
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "ref")

    # steps 3, 4 and 5 bad with --max-nonfinite 2: the third in a row stops the run, a checkpoint between or not
    calls.update(n=0, bad={3, 4, 5})
    with pytest.raises(FloatingPointError, match="3 steps in a row \\(to step 5\\)"):
        train(tiny_cfg(tmp_path / "ref2", max_nonfinite=2, **kw), **sources())
    calls["n"] = 0
    train(tiny_cfg(tmp_path / "run2", max_nonfinite=2, stop_at=4, **kw), **sources())
    calls["n"] = 4
    with pytest.raises(FloatingPointError, match="3 steps in a row \\(to step 5\\)"):
        train(tiny_cfg(tmp_path / "run2", max_nonfinite=2, **kw), **sources())


def _train_poisoned(monkeypatch, out, poison, grad_accum):
    """Four tiny training steps with DRT.forward patched: on a training forward whose ids ``poison(ids)``
    picks, the loss keeps its value and the final norm's gradient is NaN (0 * inf from a sqrt at 0)."""
    from gca.model import DRT

    real_forward = DRT.forward

    def forward(self, ids, *a, **kw):
        out = real_forward(self, ids, *a, **kw)
        if self.training and out.loss is not None and poison(ids):
            w = self.norm.weight
            out.loss = out.loss + 0.0 * (w - w.detach()).sum().sqrt()
        return out

    monkeypatch.setattr(DRT, "forward", forward)
    return train(tiny_cfg(out, grad_accum=grad_accum, eval_every=0, max_steps=4), **sources())


def test_replay_nonfinite_names_the_backward_function_and_the_parameters(tmp_path, monkeypatch, capsys):
    """A step whose loss is finite but whose backward is not (0 * sqrt(x) at x = 0 in the final norm's
    path): the trainer keeps that step's weights beside its batch, and `gca replay-nonfinite` runs it
    again, naming SqrtBackward0, the line of the forward that made it, and the parameters it reached;
    weights that differ from the saved ones (the step's update was skipped, so the saved ones are those
    the step used) would not give the same loss."""
    from gca.cli import main
    from gca.train.checkpoint import load_model
    from gca.train.nonfinite import replay_nonfinite

    calls = {"n": 0, "bad": {2}}

    def poison(ids):  # the training forwards' count picks them (calls["bad"] changes below)
        calls["n"] += 1
        return calls["bad"] == "all" or calls["n"] in calls["bad"]

    out = tmp_path / "run"
    result = _train_poisoned(monkeypatch, out, poison, grad_accum=1)
    assert result.skipped == [2]
    dump = torch.load(out / "nonfinite" / "step2_rank0.pt")
    assert math.isfinite(dump["loss"])
    saved = load_model(out / "nonfinite" / "step2")
    assert saved.config == result.model.config

    calls["bad"] = "all"
    r = replay_nonfinite(out, device="cpu")
    assert r["step"] == 2 and r["reproduced"] and r["finite_loss"]
    assert r["loss"] == pytest.approx(dump["loss"], rel=1e-5)  # the same weights and batch (fp32 on CPU)
    assert r["nonfinite_parameters"] == ["norm.weight"]
    assert "SqrtBackward0" in r["anomaly"]
    assert "test_train.py" in r["forward_frames"][-1] and ".sqrt()" in r["forward_frames"][-1]  # the line that made it
    assert main(["replay-nonfinite", str(out), "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "1 parameter(s) with a non-finite gradient: norm.weight" in text and "SqrtBackward0" in text
    assert json.loads((tmp_path / "r.json").read_text())["nonfinite_parameters"] == ["norm.weight"]
    # --set: the same step with another GCA backend (here it follows the model, not the backend)
    assert main(["replay-nonfinite", str(out), "--device", "cpu", "--set", "gca_impl=torch"]) == 0
    assert "SqrtBackward0" in capsys.readouterr().out

    calls["bad"] = set()  # the model's own backward is finite: not reproduced, exit status 1
    r = replay_nonfinite(out, device="cpu")
    assert not r["reproduced"] and r["nonfinite_parameters"] == [] and r["anomaly"] is None
    assert main(["replay-nonfinite", str(out), "--device", "cpu"]) == 1
    assert "did not come back" in capsys.readouterr().out
    # bad input: a run without saved weights, a step that was not saved
    assert main(["replay-nonfinite", str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert main(["replay-nonfinite", str(out), "--step", "7", "--device", "cpu"]) == 2
    assert "saved: step2" in capsys.readouterr().err


def test_replay_nonfinite_runs_every_micro_batch_of_an_accumulated_step(tmp_path, monkeypatch):
    """With --grad-accum 2 the trainer kept only the step's last micro-batch, so a NaN made by the first
    never came back in `gca replay-nonfinite` ("did not come back"); now the step's micro-batches are all
    kept and replayed one after the other, giving the step's loss as training logged it."""
    from gca.train.nonfinite import replay_nonfinite

    src = FakeSource()

    def first_tokens(index):
        return set(src.get_batch(index, 2)["input_ids"][:, 0].tolist())

    # a start token that only step 3's first micro-batch (batch index 4) holds among the run's batches
    (bad_token, *_) = first_tokens(4) - set().union(*(first_tokens(i) for i in range(10) if i != 4))
    out = tmp_path / "run"  # the gradient (not the loss) is NaN for rows starting with bad_token
    result = _train_poisoned(monkeypatch, out, lambda ids: bool((ids[:, 0] == bad_token).any()), grad_accum=2)
    assert result.skipped == [3]
    dump = torch.load(out / "nonfinite" / "step3_rank0.pt")
    assert dump["micro_batches"] == 2 and torch.equal(dump["input_ids"], torch.cat([src.get_batch(i, 2)["input_ids"] for i in (4, 5)]))
    r = replay_nonfinite(out, device="cpu")
    assert r["reproduced"] and r["nonfinite_parameters"] == ["norm.weight"] and "SqrtBackward0" in r["anomaly"]
    assert r["loss"] == pytest.approx(dump["loss"], rel=1e-5)  # the mean of the two micro-batches' losses


# ---- fine-tuning from a checkpoint, stopping early ----
def test_init_from_starts_at_the_checkpoint_weights_with_overrides(reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "ft"
    cfg = tiny_cfg(out, init_from=str(ref_out), model={"gca_softmax_one": True}, lr=1e-30, min_lr=0.0, max_steps=1,
                   eval_every=0, grad_accum=1)
    result = train(cfg, **sources())
    assert result.model.config.gca_softmax_one and result.model.config.hidden_size == 32
    for k, v in ref.model.state_dict().items():  # a step with lr 1e-30 leaves the weights where they were
        assert torch.allclose(result.model.state_dict()[k], v, atol=1e-6), k
    assert read_checkpoint(out / "ckpt").config.gca_softmax_one
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        train(tiny_cfg(tmp_path / "ft2", init_from=str(tmp_path / "missing")), **sources())


def test_a_fine_tune_resumes_after_the_run_it_started_from_has_moved(reference, tmp_path):
    """Resuming a fine-tune reads its own checkpoint only: it was refused ("--init-from ...: no checkpoint
    there") once the run it started from had been moved or deleted."""
    ref_out, _ = reference
    base = tmp_path / "base"
    shutil.copytree(ref_out, base)
    kw = dict(init_from=str(base), model={**TINY, "gca_softmax_one": True}, max_steps=4, save_every=2, eval_every=2)
    train(tiny_cfg(tmp_path / "whole", **kw), **sources())
    train(tiny_cfg(tmp_path / "ft", stop_at=2, **kw), **sources())
    base.rename(tmp_path / "moved")
    result = train(tiny_cfg(tmp_path / "ft", **kw), **sources())
    assert result.resumed_from == 2 and result.model.config.gca_softmax_one
    assert train_losses(tmp_path / "ft") == train_losses(tmp_path / "whole")
    assert val_losses(tmp_path / "ft") == val_losses(tmp_path / "whole")
    with pytest.raises(ValueError, match="model: checkpoint .*gca_softmax_one"):  # overrides still checked
        train(tiny_cfg(tmp_path / "ft", **{**kw, "model": TINY, "max_steps": 6}), **sources())


def test_a_fine_tune_resumes_with_its_init_from_spelled_another_way(reference, tmp_path, monkeypatch):
    """`--init-from base` on the first run, `--init-from ./base/` (or the absolute path) on the resume:
    the same folder, so the resume goes on (it was refused as a changed setting); another folder is refused."""
    ref_out, _ = reference
    shutil.copytree(ref_out, tmp_path / "base")
    shutil.copytree(ref_out, tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    kw = dict(max_steps=4, save_every=2, eval_every=2)
    train(tiny_cfg(tmp_path / "ft", init_from="base", stop_at=2, **kw), **sources())
    result = train(tiny_cfg(tmp_path / "ft", init_from="./base/", stop_at=3, **kw), **sources())
    assert result.resumed_from == 2
    result = train(tiny_cfg(tmp_path / "ft", init_from=str(tmp_path / "base"), **kw), **sources())
    assert result.resumed_from == 3 and result.step == 4
    with pytest.raises(ValueError, match="init_from: checkpoint '.*base', now 'other'"):
        train(tiny_cfg(tmp_path / "ft", init_from="other", max_steps=6, save_every=2, eval_every=2), **sources())


def test_init_from_with_an_override_that_adds_parameters(reference, tmp_path, capsys):
    ref_out, ref = reference
    cfg = tiny_cfg(tmp_path / "ft", init_from=str(ref_out), model={"retrieval_key": "centered"}, lr=1e-30,
                   min_lr=0.0, max_steps=1, eval_every=0, grad_accum=1)
    result = train(cfg, **sources())
    assert "new (fresh initialisation): encoder.key_norm.weight; dropped: none" in capsys.readouterr().out
    state = result.model.state_dict()
    for k, v in ref.model.state_dict().items():  # every saved parameter was loaded
        assert torch.allclose(state[k], v, atol=1e-6), k
    torch.testing.assert_close(state["encoder.key_norm.weight"], torch.ones(32))  # the new norm starts at 1
    # and back: the centred run's extra norm is dropped when fine-tuning with the published key
    back = tiny_cfg(tmp_path / "back", init_from=str(tmp_path / "ft"), model={"retrieval_key": "landmark"}, max_steps=1,
                    eval_every=0, grad_accum=1)
    train(back, **sources())
    assert "dropped: encoder.key_norm.weight" in capsys.readouterr().out


def test_init_from_with_regrouped_upper_layers_keeps_each_layer(reference, tmp_path, capsys):
    ref_out, ref = reference  # tiny: upper_groups [2]
    cfg = tiny_cfg(tmp_path / "ft", init_from=str(ref_out), model={"upper_groups": [1, 1]}, lr=1e-30, min_lr=0.0,
                   max_steps=1, eval_every=0, grad_accum=1)
    result = train(cfg, **sources())
    assert "new (fresh initialisation): retr_norms.1.weight; dropped: none" in capsys.readouterr().out
    state, old = result.model.state_dict(), ref.model.state_dict()
    moved = {"groups.0.0.": "groups.0.0.", "groups.0.1.": "groups.1.0."}  # upper layer i keeps its weights
    for k, v in old.items():
        new_k = next((k.replace(a, b, 1) for a, b in moved.items() if k.startswith(a)), k)
        assert torch.allclose(state[new_k], v, atol=1e-6), k
    torch.testing.assert_close(state["retr_norms.1.weight"], torch.ones(32))  # the second group's norm is new
    # and back to one group of two: both layers and the first norm come back, the second norm is dropped
    train(tiny_cfg(tmp_path / "back", init_from=str(tmp_path / "ft"), model={"upper_groups": [2]}, lr=1e-30,
                   min_lr=0.0, max_steps=1, eval_every=0, grad_accum=1), **sources())
    assert "dropped: retr_norms.1.weight" in capsys.readouterr().out
    # a different number of upper layers is not a regrouping: the extra layer is new
    train(tiny_cfg(tmp_path / "more", init_from=str(ref_out), model={"upper_groups": [2, 1]}, max_steps=1,
                   eval_every=0, grad_accum=1), **sources())
    assert "groups.1.0.attn.o.weight" in capsys.readouterr().out


def test_regroup_name_maps_layers_by_position():
    from gca.train.checkpoint import _regroup_name

    assert _regroup_name("groups.0.3.mlp.down.weight", [4], [2, 2]) == "groups.1.1.mlp.down.weight"
    assert _regroup_name("groups.1.0.gca.q.weight", [2, 2], [4]) == "groups.0.2.gca.q.weight"
    assert _regroup_name("groups.2.0.norm1.weight", [1, 1, 2], [3, 1]) == "groups.0.2.norm1.weight"
    assert _regroup_name("lower.0.attn.qkv.weight", [4], [2, 2]) == "lower.0.attn.qkv.weight"


def test_stop_at_keeps_the_schedule_and_resumes_to_the_same_run(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    first = train(tiny_cfg(out, stop_at=3), **sources())
    assert first.step == 3 and read_checkpoint(out / "ckpt").step == 3
    assert train_losses(out) == train_losses(ref_out)[:3]  # same lr schedule as the uninterrupted run
    train(tiny_cfg(out), **sources())  # without --stop-at it goes on to max_steps
    assert train_losses(out) == train_losses(ref_out)


def test_collapsed_retrieval_is_warned_once(tmp_path, monkeypatch, capsys):
    import gca.train.trainer as T

    monkeypatch.setattr(T, "COLLAPSED_SPREAD", float("inf"))  # any spread counts as collapsed
    train(tiny_cfg(tmp_path / "run", max_steps=4, eval_every=2), **sources())
    assert capsys.readouterr().out.count("retrieval no longer tells chunks apart") == 1
    monkeypatch.setattr(T, "COLLAPSED_SPREAD", 0.0)  # nothing is below 0: no warning
    train(tiny_cfg(tmp_path / "run2", max_steps=4, eval_every=2), **sources())
    assert "retrieval no longer tells chunks apart" not in capsys.readouterr().out


def test_freeze_keeps_the_matched_parameters_and_trains_the_rest(reference, tmp_path, capsys):
    ref_out, ref = reference
    pattern = r"^(embed|lower|encoder|retr_norms)\."
    cfg = tiny_cfg(tmp_path / "ft", init_from=str(ref_out), freeze=pattern, max_steps=3, eval_every=0, grad_accum=1)
    result = train(cfg, **sources())
    assert "frozen: " in capsys.readouterr().out
    before, after = ref.model.state_dict(), result.model.state_dict()
    frozen = [k for k in before if re.search(pattern, k)]
    trained = [k for k in before if not re.search(pattern, k)]
    assert frozen and trained
    for k in frozen:  # bit for bit: no update, no weight decay
        assert torch.equal(after[k], before[k]), k
    assert sum(not torch.equal(after[k], before[k]) for k in trained) >= len(trained) // 2
    assert read_checkpoint(tmp_path / "ft" / "ckpt").step == 3
    train(dataclasses.replace(cfg, max_steps=4), **sources())  # resumes with the same frozen set
    with pytest.raises(ValueError, match="checkpoint"):  # a different frozen set is not the same run
        train(dataclasses.replace(cfg, max_steps=5, freeze=r"^embed\."), **sources())


def test_freeze_rejects_bad_patterns(reference, tmp_path):
    ref_out, _ = reference
    with pytest.raises(ValueError, match="not a regular expression"):
        tiny_cfg(tmp_path / "a", freeze="(")
    with pytest.raises(ValueError, match="matches no parameter; names start with: .*embed"):
        train(tiny_cfg(tmp_path / "b", init_from=str(ref_out), freeze="no_such_layer", max_steps=1), **sources())
    with pytest.raises(ValueError, match="matches every parameter"):
        train(tiny_cfg(tmp_path / "c", freeze=".", max_steps=1), **sources())


def test_untying_on_init_starts_the_head_at_the_embedding_and_trains_it_apart(reference, tmp_path, capsys):
    ref_out, ref = reference
    pattern = r"^(embed|lower|encoder|retr_norms)\."
    cfg = tiny_cfg(tmp_path / "ft", init_from=str(ref_out), model={"tie_embeddings": False}, freeze=pattern,
                   lr=1e-30, min_lr=0.0, max_steps=1, eval_every=0, grad_accum=1)
    result = train(cfg, **sources())
    assert "untied: lm_head starts as a copy" in capsys.readouterr().out
    m = result.model
    V = m.config.vocab_size
    assert not m.config.tie_embeddings and m.lm_head is not None
    torch.testing.assert_close(m.lm_head.weight, ref.model.embed.weight[:V], atol=1e-6, rtol=0)
    ids = torch.randint(0, V, (2, 40))
    ref.model.eval(), m.eval()
    with torch.no_grad():  # same function as the tied model before training
        torch.testing.assert_close(m(ids).logits, ref.model(ids).logits, atol=1e-5, rtol=1e-5)
    # with a real step the head moves and the frozen embedding does not
    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "ft2"), lr=1e-2, min_lr=1e-3, max_steps=2)
    m2 = train(cfg2, **sources()).model
    assert torch.equal(m2.embed.weight, ref.model.embed.weight)
    assert not torch.allclose(m2.lm_head.weight, ref.model.embed.weight[:V])


def test_retrieval_copy_loss_is_logged_beside_the_loss(tmp_path):
    out = tmp_path / "run"
    model = dict(TINY, retrieval_copy_loss=0.2, retrieval_copy_ngram=1)  # 2-gram matches: some in random text
    data = dict(source=FakeSource(seq_len=400, learnable=False), val_source=FakeSource(seq_len=400, split="val"))
    train(tiny_cfg(out, model=model, seq_len=400, max_steps=3, eval_every=0, save_every=3), **data)
    rows = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["retrieval_copy_loss"] > 0 and 0 < r["retrieval_copy_rows"] <= 1
    assert read_checkpoint(out / "ckpt").config.retrieval_copy_loss == 0.2
    plain = tmp_path / "plain"
    train(tiny_cfg(plain, max_steps=1, eval_every=0, save_every=1), **sources())
    assert "retrieval_copy_loss" not in log_rows(plain)[0]


def test_load_model_does_not_read_the_trainer_state(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    data = bytearray((out / "ckpt" / "trainer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged in place: resuming refuses it, a model load never reads it
    (out / "ckpt" / "trainer.pt").write_bytes(bytes(data))
    assert load_model(out) is not None
    with pytest.raises(CheckpointError, match="trainer.pt is damaged"):
        read_checkpoint(out / "ckpt")


# ---- model loads: --init-from checked as every load, the trainer state left to resumes, saved folders' manifest ----
def _damage(path: Path, n: int = 64) -> None:
    """Overwrite ``n`` bytes in the middle of ``path`` with 0xff (the same size: only the sha256 tells)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + n] = b"\xff" * n
    path.write_bytes(bytes(data))


def test_init_from_checks_the_checkpoint_as_every_model_load_does(reference, tmp_path):
    """`--init-from` a run whose weights were damaged in place trained on NaN weights and exited 0 (the
    manifest's sha256 went unchecked); a saved model cut short ended in safetensors' traceback from the
    shape check. Both are now the one-line CheckpointError of other loads, before anything is written."""
    from gca.train import save_model

    ref_out, _ = reference
    base = tmp_path / "base"
    shutil.copytree(ref_out, base)
    _damage(base / "ckpt" / "model.safetensors")
    kw = dict(max_steps=1, eval_every=0, grad_accum=1)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged: its bytes do not match the manifest's sha256"):
        train(tiny_cfg(tmp_path / "ft", init_from=str(base), **kw), **sources())
    assert not (tmp_path / "ft").exists()
    torch.manual_seed(0)
    saved = save_model(DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=64)), tmp_path / "saved")
    (saved / "manifest.json").unlink()  # (a folder saved before the manifest existed)
    with open(saved / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(tmp_path / "ft2", init_from=str(saved), **kw), **sources())
    msg = str(e.value)
    assert "model.safetensors cannot be read" in msg and "\n" not in msg, msg
    assert not (tmp_path / "ft2").exists()


def test_a_model_load_needs_no_trainer_state_and_only_a_resume_is_told_to_start_over(reference, tmp_path):
    """A run whose trainer.pt (optimizer state) was missing or truncated could not be generated from,
    evaluated or exported, though no model load reads it; and every damaged model folder, an exported one
    included, was told to delete itself "to start this run from scratch". That advice is for a resume."""
    from gca.train import export_model

    ref_out, _ = reference
    gone, cut = tmp_path / "gone", tmp_path / "cut"
    shutil.copytree(ref_out, gone)
    shutil.copytree(ref_out, cut)
    (gone / "ckpt" / "trainer.pt").unlink()
    with open(cut / "ckpt" / "trainer.pt", "r+b") as f:
        f.truncate(100)
    x = torch.randint(0, 64, (1, 100))
    want = load_model(ref_out)(x).logits
    for run in (gone, cut):
        assert torch.equal(load_model(run)(x).logits, want)
        assert (export_model(run, tmp_path / f"export-{run.name}") / "model.safetensors").is_file()
    # resuming still refuses it, with the advice to start over
    for run, says in ((gone, "trainer.pt is missing"), (cut, "trainer.pt is truncated or altered")):
        with pytest.raises(CheckpointError) as e:
            train(tiny_cfg(run, max_steps=10), **sources())
        msg = str(e.value)
        assert says in msg and f"delete {run / 'ckpt'} to start this run from scratch" in msg, msg
    # a model load of a damaged run, or of an exported folder: restore the file, nothing to delete
    _damage(gone / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(gone)
    msg = str(e.value)
    assert "model.safetensors is damaged" in msg and "restore" in msg, msg
    assert "delete" not in msg and "from scratch" not in msg, msg
    exported = tmp_path / "export-cut"
    with open(exported / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError) as e:
        load_model(exported)
    msg = str(e.value)
    assert "model.safetensors is truncated or altered" in msg and "export" in msg and "download" in msg, msg
    assert "delete" not in msg and "from scratch" not in msg and "\n" not in msg, msg
    (exported / "manifest.json").unlink()  # read unchecked: safetensors' error, with the same advice
    with pytest.raises(CheckpointError) as e:
        load_model(exported)
    msg = str(e.value)
    assert "cannot be read" in msg and "download" in msg and "delete" not in msg, msg


def _prepared_folder(tmp_path: Path, name: str, tokenizer) -> Path:
    from gca.data.prepare import prepare

    src = tmp_path / f"{name}-txt"
    src.mkdir()
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega the of and to in is".split()
    for i in range(4):
        (src / f"d{i}.txt").write_text(f"document {i}. " + " ".join(words[(j * j + i) % len(words)] for j in range(400)))
    if tokenizer == "bpe":
        from gca.data import train_bpe

        tokenizer = train_bpe([str(src)], vocab_size=300, show_progress=False)
    prepare([str(src)], tmp_path / name, tokenizer=tokenizer, val_fraction=0.5, progress=False)
    return tmp_path / name


def test_init_from_refuses_data_of_another_tokenizer(tmp_path):
    """`--init-from RUN --data DIR` with DIR prepared with another tokenizer than RUN's trained the
    2048-id model on a 300-id BPE's ids (other words) and wrote that tokenizer.json beside it; refused now,
    before anything is written, with the command that prepares the data right (as `gca eval ppl` does)."""
    from gca.data.tokenizer import load_tokenizer
    from gca.train import save_model

    torch.manual_seed(0)
    base = save_model(DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=2048)), tmp_path / "base",
                      tokenizer=load_tokenizer("embedded"))
    kw = dict(init_from=str(base), max_steps=1, eval_every=0, grad_accum=1, seq_len=128, save_every=1)
    bpe = _prepared_folder(tmp_path, "bpe", "bpe")
    with pytest.raises(ValueError) as e:
        train(tiny_cfg(tmp_path / "ft", data=str(bpe), **kw))
    msg = str(e.value)
    assert "is tokenized with another tokenizer" in msg and "300 ids" in msg and "2048 ids" in msg, msg
    assert f"gca prepare ... --tokenizer {base / 'tokenizer.json'}" in msg and "\n" not in msg, msg
    assert not (tmp_path / "ft").exists()
    same = _prepared_folder(tmp_path, "same", str(base / "tokenizer.json"))  # as the message says
    assert train(tiny_cfg(tmp_path / "ft", data=str(same), **kw)).step == 1
    assert load_tokenizer(tmp_path / "ft" / "ckpt" / "tokenizer.json").vocab_size == 2048
    # a source without a tokenizer (one's own): nothing to compare
    assert train(tiny_cfg(tmp_path / "ft-fake", **{**kw, "seq_len": 200}), **sources()).step == 1


def test_a_saved_model_has_a_manifest_that_every_load_checks(reference, tmp_path):
    """save_model / export_model wrote no manifest: a byte flipped in a saved or exported folder gave
    another model without a word. Their manifest.json (sizes and sha256) is checked by every load; the
    folder is still a saved model (saved into again, refused as a run's --out), and one without it loads."""
    from gca.train import export_model, save_model

    ref_out, _ = reference
    torch.manual_seed(0)
    m = DRT(DRTConfig.from_preset("tiny", **TINY, vocab_size=64)).eval()
    saved = save_model(m, tmp_path / "saved")
    manifest = json.loads((saved / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(manifest["sha256"]) == ["config.json", "model.safetensors"]
    _damage(saved / "model.safetensors", n=1)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged: its bytes do not match the manifest's sha256"):
        load_model(saved)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        train(tiny_cfg(tmp_path / "ft", init_from=str(saved), max_steps=1, eval_every=0), **sources())
    save_model(m, saved)  # saved again into the same folder: a new manifest
    x = torch.randint(0, 64, (1, 100))
    assert torch.equal(load_model(saved)(x).logits, m(x).logits)
    with pytest.raises(ValueError, match="holds a saved model"):
        train(tiny_cfg(saved, max_steps=1), **sources())
    exp = export_model(ref_out, tmp_path / "export")
    assert sorted(json.loads((exp / "manifest.json").read_text())["files"]) == [
        "config.json", "model.safetensors", "train_config.json"]
    tc = exp / "train_config.json"
    tc.write_text(tc.read_text().replace('"seed": 0', '"seed": 1'))  # the same size, other bytes
    with pytest.raises(CheckpointError, match="train_config.json is damaged"):
        load_model(exp)
    (exp / "manifest.json").unlink()  # a folder saved before the manifest existed: read as it is
    assert load_model(exp) is not None


def test_trainconfig_min_lr_follows_lr_when_not_given():
    """In Python min_lr was a fixed 4e-4 (the CLI's 0.2 x --lr), so TrainConfig(lr=1e-4) was refused for
    min_lr > lr; unset, it is now 0.2 x lr as on the command line, and a given one is kept and checked."""
    assert TrainConfig(lr=1e-4).min_lr == pytest.approx(2e-5)
    assert TrainConfig().min_lr == pytest.approx(4e-4)  # the paper's 2e-3 -> 4e-4
    assert TrainConfig(lr=1e-3, min_lr=0.0).min_lr == 0.0
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
