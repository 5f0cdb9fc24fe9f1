"""Training loop for DRT and its baselines: AdamW, warm-up + cosine, accumulation, clipping, validation,
atomic checkpoints with exact resume, and DDP.

On CPU (a tiny model, a few minutes)::

    gca train --preset tiny --data synthetic:passkey --seq-len 504 --batch-size 8 --max-steps 300 --out runs/tiny

On one GPU (bf16 autocast is on by default on CUDA)::

    gca train --preset small --data synthetic:mix --seq-len 4032 --batch-size 8 --max-steps 20000 --out runs/small

On 8 GPUs of one host (``--batch-size`` is per process; each rank reads its own shard)::

    torchrun --standalone --nproc-per-node 8 -m gca.cli train --preset paper --data data/pg19 \\
        --seq-len 16380 --batch-size 4 --max-steps 100000 --out runs/paper

Rerunning the same command on the same ``--out`` resumes from the last checkpoint; on CPU the resumed run
reproduces the uninterrupted run's losses bit for bit, also after a ``kill -9``. From Python::

    from gca.train import TrainConfig, train
    result = train(TrainConfig(preset="tiny", data="synthetic:passkey", seq_len=504, max_steps=100, out="runs/t"))

What the loop does, per optimizer step ``s`` (0-based; logs and checkpoints count completed steps, s + 1):
the learning rate is :func:`gca.train.schedule.lr_at` of ``s``; micro-batch ``m`` is
``source.get_batch(s * grad_accum + m, batch_size, rank, world_size)``, so the data position is a function
of the step alone; each micro-batch's loss (a mean over its labelled tokens) is weighted by its share of the
labelled tokens of the whole step, every micro-batch of every rank counted, so that the step's gradient is
that of the mean over all its labelled tokens, as one large batch gives, however the labels fall (answer-only
losses included); DDP averages gradients across ranks (synchronising only on the last micro-batch);
gradients are clipped to ``grad_clip`` in global norm.
Weight decay applies to the weight matrices of linear layers only, not to norms or the (tied) embedding:
decaying the embedding would also shrink the LM head and the landmark embedding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gca.config import ARCHS, DRTConfig
from gca.model import DRT, labelled_tokens
from gca.retrieval import COLLAPSED_SPREAD, retrieval_health
from gca.train import distributed as D
from gca.train.checkpoint import (
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    find_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    shape_mismatches,
    verify_model_files,
)
from gca.train.schedule import lr_at, warmup_steps

# TrainConfig fields that may change when a run is resumed: how the run is executed and observed,
# not what it computes (max_steps stretches the cosine from the checkpoint on).
RESUMABLE_FIELDS = (
    "max_steps",
    "save_every",
    "log_every",
    "eval_every",
    "eval_batches",
    "out",
    "device",
    "compile",
    "grad_checkpointing",
    "tensorboard",
    "progress",
    "time_limit",
    "max_nonfinite",
    "stop_at",
)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``train_config.json`` in every checkpoint."""

    # model
    preset: str = "tiny"  # DRTConfig preset: tiny | small | paper
    init_from: str | None = None  # fine-tune: start from this run's (or checkpoint's) weights and config; fresh optimizer
    model: dict[str, Any] = field(default_factory=dict)  # DRTConfig overrides, e.g. {"hidden_size": 128}
    arch: str | None = None  # "drt" | "swa" | "full" (baselines of the same width and depth); None = preset's
    freeze: str | None = None  # regular expression: parameters whose names it matches (re.search) are not trained
    lr_scale: dict[str, float] = field(default_factory=dict)  # {regex: factor}: matching parameters train at factor x lr
    # data
    data: str = "synthetic:passkey"  # gca.data.build_source spec: synthetic:passkey, synthetic:mix, a dir, mixtures
    seq_len: int = 1008  # tokens per training sequence (16 chunks of 63 text tokens)
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    # optimisation (the paper: AdamW, lr 2e-3 decaying to 4e-4, 2% warm-up)
    lr: float = 2e-3  # peak learning rate
    min_lr: float | None = None  # final learning rate of the cosine; None: 0.2 * lr (the paper's 4e-4 at 2e-3)
    warmup: float = 0.02  # warm-up length as a fraction of max_steps
    weight_decay: float = 0.1  # on linear weight matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    max_steps: int = 1000  # optimizer steps
    # bookkeeping
    save_every: int = 500  # checkpoint every N steps (and at the end)
    log_every: int = 10  # a log.jsonl row every N steps (and at the first and last step)
    eval_every: int = 250  # validation every N steps (and at the end); 0 disables
    eval_batches: int = 8  # validation micro-batches per rank
    seed: int = 0  # model init (same on all ranks); rank r's Gumbel noise uses seed + r
    out: str = "runs/default"  # run directory: log.jsonl, tb/, ckpt/
    # execution
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU, which always trains in fp32)
    grad_checkpointing: bool = False  # recompute layer activations in backward (less memory)
    compile: bool = False  # torch.compile the model
    tensorboard: bool = True  # write DIR/tb when tensorboard is installed
    progress: bool = True  # tqdm progress bar on rank 0
    time_limit: float = 0.0  # stop (with a checkpoint) after this many minutes of this process; 0 = none
    max_nonfinite: int = 10  # skip an update whose gradient is NaN/inf; stop after this many in a row (0 = stop at once)
    stop_at: int = 0  # stop (with a checkpoint) after this step, the schedule unchanged; 0 = run to max_steps

    def __post_init__(self):
        if self.min_lr is None and isinstance(self.lr, numbers.Real) and not isinstance(self.lr, bool):
            self.min_lr = 0.2 * self.lr  # (a fixed 4e-4 refused TrainConfig(lr=1e-4) for min_lr > lr)
        self.betas = tuple(self.betas)
        self.model = dict(self.model)
        self.lr_scale = dict(self.lr_scale)
        self.validate()

    def validate(self) -> "TrainConfig":
        def bad(name: str, why: str):
            raise ValueError(f"TrainConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "save_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        for name in ("eval_every", "eval_batches", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be a non-negative integer")
        if self.seq_len < 2:
            bad("seq_len", "must be >= 2 (the loss predicts token t + 1 from token t)")
        for name in ("lr", "min_lr", "warmup", "weight_decay", "eps", "grad_clip", "time_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                bad(name, "must be a number")
        # (each check below also refuses NaN; an infinite lr or weight decay made every weight NaN at the
        # first update, and a NaN grad_clip switched clipping off without a word)
        if not 0 < self.lr < math.inf:
            bad("lr", "must be a positive finite number")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"must lie in [0, lr={self.lr}]")
        if not 0 <= self.warmup < 1:
            bad("warmup", "is a fraction of max_steps in [0, 1)")
        if not 0 <= self.weight_decay < math.inf:
            bad("weight_decay", "must be a finite number >= 0")
        if not 0 <= self.eps < math.inf:
            bad("eps", "must be a finite number >= 0")
        if len(self.betas) != 2 or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        if not self.grad_clip >= 0:
            bad("grad_clip", "must be >= 0 (0 disables clipping)")
        if not isinstance(self.max_nonfinite, int) or isinstance(self.max_nonfinite, bool) or self.max_nonfinite < 0:
            bad("max_nonfinite", "must be a non-negative integer")
        if not isinstance(self.stop_at, int) or isinstance(self.stop_at, bool) or self.stop_at < 0:
            bad("stop_at", "must be a non-negative integer (0 = no early stop)")
        if not self.time_limit >= 0:
            bad("time_limit", "must be >= 0 minutes (0 = no limit)")
        if self.eval_every and self.eval_batches < 1:
            bad("eval_batches", "must be >= 1 when eval_every > 0")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; the run needs a folder (new, or a run's to resume it)")
        if self.freeze is not None:
            try:
                re.compile(self.freeze)
            except re.error as e:
                bad("freeze", f"is not a regular expression ({e})")
        for pattern, factor in self.lr_scale.items():
            try:
                re.compile(pattern)
            except re.error as e:
                bad("lr_scale", f"{pattern!r} is not a regular expression ({e})")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
                bad("lr_scale", f"the factor of {pattern!r} must be a positive number (use freeze for 0)")
        if self.arch is not None and self.arch not in ARCHS:
            bad("arch", f"must be one of {ARCHS} or None")
        if "arch" in self.model and self.arch is not None and self.model["arch"] != self.arch:
            bad("arch", f"conflicts with model override arch={self.model['arch']!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # JSON-normalised (tuples -> lists)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, Mapping):  # None, a list or a string would fail with an unrelated message
            raise TypeError(f"TrainConfig.from_dict expects a dict of field values, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def model_config(self, vocab_size: int | None = None) -> DRTConfig:
        """The resolved DRTConfig: preset (or, with ``init_from``, that checkpoint's config), then ``model``
        overrides, then ``arch``; the vocabulary comes from the data source unless overridden (an override
        may be larger, never smaller). A fine-tune that already has a checkpoint in ``out`` takes the base
        from there: resuming it needs nothing from the ``init_from`` run, which may have moved since."""
        overrides = dict(self.model)
        if self.arch is not None:
            overrides["arch"] = self.arch
        if self.init_from:
            from gca.train.checkpoint import read_config

            own = find_checkpoint(Path(self.out), repair=False) if Path(self.out).is_dir() else None
            resumed = own is not None and (own / MANIFEST).exists()
            base = read_config(own, resume=True) if resumed else _init_checkpoint(self.init_from)[1]
            if vocab_size is not None and base.vocab_size < vocab_size:
                raise ValueError(f"--init-from {self.init_from}: its vocabulary ({base.vocab_size}) is smaller than the data's ({vocab_size})")
            return DRTConfig.from_dict({**base.to_dict(), **overrides})
        if vocab_size is not None:
            v = overrides.setdefault("vocab_size", vocab_size)
            if v < vocab_size:
                raise ValueError(f"model vocab_size={v} is smaller than the data's vocabulary ({vocab_size})")
        return DRTConfig.from_preset(self.preset, **overrides)


def _init_checkpoint(path: str, verify: bool = False) -> tuple[Path, DRTConfig]:
    """The checkpoint folder and model config that ``init_from`` names; ``verify``: first check its files
    against the manifest, as every model load does (before its weights are read)."""
    from gca.train.checkpoint import read_config

    ckpt = find_checkpoint(Path(path), repair=False) if Path(path).exists() else None
    if ckpt is None:
        raise CheckpointError(f"--init-from {path}: no checkpoint there (expected a run folder or its ckpt/ folder)")
    if verify:
        verify_model_files(ckpt)
    return ckpt, read_config(ckpt)


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` is the unwrapped model (its ``.grad`` fields hold the last
    step's gradients); ``losses`` and ``val_losses`` are ``(step, loss)`` pairs of this process's run."""

    model: DRT
    step: int
    out: Path
    losses: list[tuple[int, float]]
    val_losses: list[tuple[int, float]]
    resumed_from: int
    skipped: list[int] = dataclasses.field(default_factory=list)  # steps whose update was skipped (non-finite gradient)
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run after a checkpoint, if one did


def _say(*parts) -> None:
    """Print a line of the run's story above any open progress bar (a plain print would be glued to the
    bar's line), flushed at once."""
    from tqdm.auto import tqdm

    tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
    sys.stdout.flush()


class _StopOnSignal:
    """While training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask the loop to finish
    the step it is in, save a checkpoint and return, instead of dying mid-step with up to
    ``save_every`` steps lost. A second SIGINT aborts at once. Only in the main thread (where Python
    delivers signals); elsewhere the process's handlers stay as they were."""

    def __init__(self, say):
        self.signum: int | None = None
        self._say, self._old = say, {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self._say(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again aborts)")

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def train(cfg: TrainConfig, *, source=None, val_source=None) -> TrainResult:
    """Train (or resume) the run ``cfg.out``. ``source``/``val_source`` replace the data sources built from
    ``cfg.data`` (tests pass small in-memory sources). Joins a process group when launched by torchrun."""
    cfg.validate()
    was_initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = D.setup(cfg.device)
    try:
        return _Run(cfg, info, source, val_source).run()
    finally:
        if not was_initialized:
            D.teardown()


def _diff(saved: dict[str, Any], now: dict[str, Any], ignore=()) -> list[str]:
    keys = sorted((set(saved) | set(now)) - set(ignore))
    return [f"{k}: checkpoint {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}" for k in keys if saved.get(k) != now.get(k)]


def freeze_parameters(model: torch.nn.Module, pattern: str) -> str:
    """Stop training the parameters whose names match ``pattern`` (``re.search``); returns a one-line summary.

    Raises ValueError when nothing matches, naming the model's parameter prefixes, or when everything does.
    Tied weights are one parameter: with ``tie_embeddings`` freezing ``embed`` freezes the output head too.
    To freeze the embedding and train the head, fine-tune with ``--set tie_embeddings=false``: the new
    ``lm_head`` starts as a copy of the tied embedding."""
    rx = re.compile(pattern)
    names = [n for n, _ in model.named_parameters()]
    hit = {n for n in names if rx.search(n)}
    if not hit:
        prefixes = sorted({".".join(n.split(".")[:2]) for n in names})
        raise ValueError(f"--freeze {pattern!r} matches no parameter; names start with: {', '.join(prefixes)}")
    if len(hit) == len(names):
        raise ValueError(f"--freeze {pattern!r} matches every parameter: nothing would be trained")
    count = 0
    for n, p in model.named_parameters():
        if n in hit:
            p.requires_grad_(False)
            count += p.numel()
    total = sum(p.numel() for p in model.parameters())
    return f"frozen: {len(hit)} tensors, {count / 1e6:.2f}M of {total / 1e6:.2f}M parameters (--freeze {pattern!r})"


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: decay the weight matrices of linear layers; not norms, biases or embeddings.

    With ``lr_scale`` (``{regex: factor}``) a trained parameter whose name matches a pattern (``re.search``,
    the first that matches) goes to a group of its own whose ``lr_scale`` is that factor; the trainer
    sets every group's learning rate to the schedule's times its ``lr_scale``. The first two groups are
    always the unscaled decay / no-decay ones. Raises ValueError for a pattern that takes no trained
    parameter (none matches, or an earlier pattern took them all)."""
    patterns = [(re.compile(k), k) for k in (lr_scale or {})]
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}
    took = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = next((k for rx, k in patterns if rx.search(name)), None)
        took.add(k)
        factor = 1.0 if k is None else float(lr_scale[k])
        groups.setdefault((factor, p.dim() >= 2 and "embed" not in name), []).append(p)
    for _, k in patterns:
        if k not in took:
            raise ValueError(f"--lr-scale {k!r} matches no trained parameter (or an earlier pattern took them all)")
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": f}
            for (f, decay), ps in groups.items() if ps or f == 1.0]


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA), in a form torch.load(weights_only) reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def truncate_log(path: Path, step: int) -> None:
    """Keep only the rows of ``log.jsonl`` up to ``step`` (a resumed run rewrites the rest); a row cut short
    by a crash is dropped."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _to_float(x: torch.Tensor) -> float:
    return float(x.detach().float().cpu())


class _Run:
    def __init__(self, cfg: TrainConfig, info: D.DistInfo, source, val_source):
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.out)
        self.source, self.val_source = source, val_source
        self.say = _say if info.is_main else (lambda *a: None)

    # ---- set-up ----
    def _build_sources(self):
        cfg = self.cfg
        if self.source is None or (cfg.eval_every and self.val_source is None):
            try:
                from gca.data import build_source
            except ImportError as e:
                raise RuntimeError(f"cannot build the data source {cfg.data!r}: gca.data is not available ({e})") from e
            if self.source is None:
                self.source = build_source(cfg.data, seq_len=cfg.seq_len, seed=cfg.seed, split="train")
            if cfg.eval_every and self.val_source is None:
                self.val_source = build_source(
                    cfg.data, seq_len=cfg.seq_len, seed=cfg.seed, split="val", tokenizer=getattr(self.source, "tokenizer", None)
                )

    def _find_resume(self):
        """Rank 0 repairs an interrupted save, then every rank reads the checkpoint (a shared filesystem)."""
        if self.info.is_main and self.out.exists():
            find_checkpoint(self.out, repair=True)
        D.barrier(self.info)
        path = find_checkpoint(self.out, repair=False) if self.out.exists() else None
        if path is None:
            return None
        if path == self.out and not (path / MANIFEST).exists():  # weights at the top, no training checkpoint
            raise ValueError(
                f"--out {self.out} holds a saved model (model.safetensors without a training checkpoint), not a "
                f"training run: pass a new --out (add --init-from {self.out} to start from these weights)"
            )
        return read_checkpoint(path)

    def _check_init_tokenizer(self, init_path: Path) -> None:
        """Refuse to fine-tune a checkpoint on data tokenized with another tokenizer than its own: the
        data's ids would be read as other words (and the new run's tokenizer.json would not be the one
        its model knows). Nothing to compare when the checkpoint has no tokenizer.json or the source
        no tokenizer (a source of one's own)."""
        tok = getattr(self.source, "tokenizer", None)
        own = init_path / "tokenizer.json"
        if tok is None or not own.is_file() or not callable(getattr(tok, "to_json", None)):
            return
        from gca.data.tokenizer import load_tokenizer

        ckpt_tok = load_tokenizer(str(own))
        try:
            same = ckpt_tok.to_json() == tok.to_json()
        except ValueError:  # (a tokenizer without a tokenizers backend: nothing to compare)
            return
        if not same:
            name, n = getattr(tok, "name", type(tok).__name__), getattr(tok, "vocab_size", "?")
            raise ValueError(
                f"--init-from {self.cfg.init_from}: --data {self.cfg.data} is tokenized with another tokenizer ({name}, "
                f"{n} ids) than the checkpoint's {own} ({ckpt_tok.vocab_size} ids): its ids would be read as other "
                f"words; prepare the text with the checkpoint's tokenizer (gca prepare ... --tokenizer {own}) and "
                f"train on that folder (a synthetic task: as its filler=DIR)"
            )

    def _check_resume(self, ck, mcfg: DRTConfig):
        cfg = self.cfg
        where = f"cannot resume the run in {self.out} from its checkpoint at step {ck.step}"
        fix = "Rerun with the original values, or pass a new --out to start a fresh run."
        # a field added since the checkpoint was written counts as its default there
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(TrainConfig)}
        saved = json.loads(json.dumps({**defaults, **ck.train_config}))
        now = cfg.to_dict()
        a, b = saved.get("init_from"), now.get("init_from")
        if a and b and os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b)):
            saved["init_from"] = b  # the same folder spelled another way (./x, x/, an absolute path)
        diffs = _diff(saved, now, ignore=RESUMABLE_FIELDS)
        if diffs:
            raise ValueError(
                f"{where}: these settings differ from the checkpoint's train_config.json:\n  "
                + "\n  ".join(diffs)
                + f"\n{fix} (Settings that may change on resume: {', '.join(RESUMABLE_FIELDS)}.)"
            )
        diffs = _diff(ck.config.to_dict(), mcfg.to_dict())
        if diffs:
            raise ValueError(f"{where}: the model config differs from the checkpoint's config.json:\n  " + "\n  ".join(diffs) + f"\n{fix}")
        ws = ck.trainer.get("world_size", 1)
        if ws != self.info.world_size:
            raise ValueError(
                f"{where}: it was trained with {ws} process(es), this run has {self.info.world_size}; the data shards "
                f"and per-rank random streams depend on it. Launch with --nproc-per-node {ws}, or use a new --out."
            )
        if ck.step > cfg.max_steps:
            raise ValueError(f"{where}: the checkpoint is already past --max-steps {cfg.max_steps}; raise --max-steps to continue.")

    def _optimizer(self, model: DRT) -> torch.optim.Optimizer:
        cfg = self.cfg
        kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        if self.info.device.type == "cuda":
            kwargs["fused"] = True
        groups = param_groups(model, cfg.weight_decay, cfg.lr_scale)
        scaled: dict[float, list] = {}
        for g in groups[2:]:  # (a decay and a no-decay group per factor)
            scaled.setdefault(g["lr_scale"], []).extend(g["params"])
        for f, ps in scaled.items():
            self.say(f"lr x {f:g}: {len(ps)} tensors, {sum(p.numel() for p in ps) / 1e6:.2f}M parameters")
        return torch.optim.AdamW(groups, **kwargs)

    def _tensorboard(self, start: int):
        if not (self.info.is_main and self.cfg.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.say("tensorboard is not installed: no TensorBoard events (pip install tensorboard); log.jsonl has every row")
            return None
        # purge_step drops events a killed run wrote past the checkpoint, or, on a fresh start after a run
        # killed before its first checkpoint, every event it wrote (nothing to drop in a new folder)
        return SummaryWriter(str(self.out / "tb"), purge_step=start + 1)

    # ---- the loop ----
    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        dev = info.device
        self._build_sources()
        mcfg = self.mcfg = cfg.model_config(self.source.vocab_size)
        ck = self._find_resume()
        start = 0
        if ck is not None:
            self._check_resume(ck, mcfg)
            start = ck.step
            was, now = _content_hashes(ck.trainer.get("data")), _content_hashes(_describe(self.source))
            if "data" in ck.trainer and was != now:  # (checkpoints before the description was saved: nothing to compare)
                self.say(f"warning: the training data is not what the checkpoint at step {start} was trained on "
                         f"(content hash {', '.join(h[:12] for h in was) or 'none'} then, {', '.join(h[:12] for h in now) or 'none'} "
                         f"now: prepared again?); the run goes on with the data as it is now")

        init = None
        if ck is None and cfg.init_from:  # (checked before anything is built: a damaged file, other data)
            init = _init_checkpoint(cfg.init_from, verify=True)
            self._check_init_tokenizer(init[0])

        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        model = DRT(mcfg)
        if ck is not None:
            load_weights(model, ck.path, resume=True)
        elif init is not None:
            init_path, saved_cfg = init
            if saved_cfg.upper_groups == mcfg.upper_groups and (init_path / WEIGHTS).is_file():
                bad = shape_mismatches(model, init_path / WEIGHTS)  # (a regrouping is checked layer by layer)
                if bad:  # not a corrupt checkpoint: the options ask for another model
                    k, there, here = bad[0]
                    raise ValueError(
                        f"--init-from {cfg.init_from}: its weights do not fit the model these options make "
                        f"({len(bad)} tensor(s) differ, e.g. {k} is {there} there and {here} here); start from a "
                        f"checkpoint of the same shape, or drop the options that change it (--arch, --set)"
                    )
            new, gone = load_weights(model, init_path, saved_config=saved_cfg)
            self.say(f"initialised from {init_path}")
            if "lm_head.weight" in new and saved_cfg.tie_embeddings:  # untied: the head starts where the tie left it
                with torch.no_grad():
                    model.lm_head.weight.copy_(model.embed.weight[: mcfg.vocab_size])
                new.remove("lm_head.weight")
                self.say("  untied: lm_head starts as a copy of the checkpoint's tied embedding")
            if new or gone:  # a --set override changed which parameters the model has
                self.say(f"  new (fresh initialisation): {', '.join(new) or 'none'}; dropped: {', '.join(gone) or 'none'}")
        if cfg.freeze:
            self.say(freeze_parameters(model, cfg.freeze))
        model.to(dev)
        model.gradient_checkpointing = cfg.grad_checkpointing
        model.train()
        opt = self._optimizer(model)
        if ck is not None:
            opt.load_state_dict(ck.trainer["optimizer"])
            set_rng_state(ck.trainer["rng"][info.rank])
        else:
            seed_everything(cfg.seed + info.rank)  # per-rank Gumbel noise
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # static shapes: training shapes never change, and symbolic sizes break torch.rand in the Gumbel noise
        eval_model = torch.compile(model, dynamic=False) if cfg.compile else model
        fwd = DDP(eval_model, device_ids=[dev.index] if dev.type == "cuda" else None) if info.enabled else eval_model

        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size
        elapsed0 = float(ck.trainer.get("elapsed_s", 0.0)) if ck is not None else 0.0
        result = TrainResult(model=model, step=start, out=self.out, losses=[], val_losses=[], resumed_from=start)
        log_path = self.out / "log.jsonl"
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            truncate_log(log_path, start)
        if start >= cfg.max_steps or (cfg.stop_at and start >= cfg.stop_at):
            self.say(f"{self.out}: the checkpoint is at step {start} (--max-steps {cfg.max_steps}, --stop-at {cfg.stop_at}); nothing to do")
            return result

        self.say(
            f"model {mcfg.arch} ({f'from {cfg.init_from}' if cfg.init_from else cfg.preset}): {model.num_parameters() / 1e6:.2f}M parameters, vocab {mcfg.vocab_size}; "
            f"{info.world_size} process(es) on {dev.type}; {tokens_per_step} tokens/step; "
            + (f"resuming from step {start}" if start else f"warm-up {warmup_steps(cfg.max_steps, cfg.warmup)} steps")
        )
        tb = self._tensorboard(start)
        logf = open(log_path, "a") if info.is_main else None
        autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if dev.type == "cuda" and cfg.bf16
            else contextlib.nullcontext
        )
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True, disable=not (info.is_main and cfg.progress))

        def write(row: dict[str, Any]):
            if logf is not None:
                logf.write(json.dumps(row) + "\n")
                logf.flush()
            if tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        tb.add_scalar(f"train/{k}" if not k.startswith("val") else k.replace("_", "/", 1), v, row["step"])

        prefetch = _Prefetcher(self.source, cfg.batch_size, info.rank, info.world_size, cfg.grad_accum)
        t0 = time.perf_counter()
        last_t, last_tokens = t0, start * tokens_per_step
        # every skipped step of the run, those before the checkpoint included: the log's count and the
        # streak that --max-nonfinite bounds go on across a resume as in an uninterrupted run
        self.skipped = [int(k) for k in ck.trainer.get("skipped", [])] if ck is not None else []
        bad_run = 0
        while start - bad_run in self.skipped:
            bad_run += 1
        warned_collapse = False
        stop = _StopOnSignal(self.say)
        try:
            stop.install()
            for s in range(start, cfg.max_steps):
                n = s + 1
                lr = lr_at(s, lr=cfg.lr, min_lr=cfg.min_lr, max_steps=cfg.max_steps, warmup=cfg.warmup)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)  # (checkpoints before lr_scale have no such key)
                opt.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=dev)
                copy_sum = None  # the auxiliary retrieval loss and its rows' share (retrieval_copy_loss > 0)
                micro = prefetch.get(s)  # the step's micro-batches as the source gave them: a skipped step keeps them all
                # each micro-batch's mean loss weighted by its share of the step's labelled tokens (all ranks;
                # DDP's gradient average divides by the world size again): the mean over every labelled token
                counts = [labelled_tokens(b["labels"]) for b in micro]
                total = D.sum_across_ranks(sum(counts), info) if cfg.grad_accum > 1 or info.enabled else sum(counts)
                for m, batch in enumerate(micro):
                    share = counts[m] * info.world_size / total if total > 0 else 1.0 / cfg.grad_accum
                    ids = batch["input_ids"].to(dev, non_blocking=True)
                    labels = batch["labels"].to(dev, non_blocking=True)
                    last_micro = m == cfg.grad_accum - 1
                    sync = fwd.no_sync() if info.enabled and not last_micro else contextlib.nullcontext()
                    with sync:
                        with autocast():
                            out = fwd(ids, labels)
                            loss = out.loss / cfg.grad_accum if share == 1.0 / cfg.grad_accum else out.loss * share
                        loss.backward()
                    if counts[m]:  # (no labelled token: its mean is NaN, weighted by 0; its gradients are 0)
                        loss_sum += loss.detach()
                    if out.retrieval_loss is not None:
                        part = torch.stack([out.retrieval_loss.detach(), out.retrieval_rows.detach()]) / cfg.grad_accum
                        copy_sum = part if copy_sum is None else copy_sum + part
                # the global norm (identical on every rank after DDP's all-reduce), then clipping (a no-op at
                # inf): clip_grad_norm_'s two halves, so that a non-finite step's gradients are left as they
                # came (clipping by a NaN norm would make every one NaN) for _dump_nonfinite to name
                params = [p for p in model.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                finite = bool(torch.isfinite(grad_norm))
                if finite:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"), grad_norm)
                    opt.step()
                    bad_run = 0
                else:  # skip the update: one NaN/inf gradient must not poison the weights
                    bad_run += 1
                    result.skipped.append(n)
                    self.skipped.append(n)
                    self._dump_nonfinite(n, model, micro, loss_sum)
                    if bad_run > cfg.max_nonfinite:
                        raise FloatingPointError(
                            f"{bad_run} steps in a row (to step {n}) had a non-finite gradient; lower --lr or check "
                            f"the data (batches saved in {self.out}/nonfinite; `gca replay-nonfinite {self.out}` runs "
                            f"the first again and names where it came from). {self._last_good()}"
                        )
                bar.update(1)
                result.step = n

                if finite and (n % cfg.log_every == 0 or n == cfg.max_steps or n == 1):
                    loss_val = _to_float(D.mean_across_ranks(loss_sum, info))
                    if not math.isfinite(loss_val):
                        raise FloatingPointError(
                            f"the training loss is {loss_val} at step {n}; lower --lr or check the data. {self._last_good()}"
                        )
                    now = time.perf_counter()
                    tokens = n * tokens_per_step
                    row = {
                        "step": n,
                        "loss": loss_val,
                        "lr": lr,
                        "tokens": tokens,
                        "elapsed_s": round(elapsed0 + now - t0, 3),
                        "tok_per_s": round((tokens - last_tokens) / max(now - last_t, 1e-9), 1),
                    }
                    row["grad_norm"] = _to_float(grad_norm)
                    if copy_sum is not None:  # the loss above includes retrieval_copy_loss x this
                        copy_val = D.mean_across_ranks(copy_sum, info).tolist()
                        row["retrieval_copy_loss"], row["retrieval_copy_rows"] = round(copy_val[0], 5), round(copy_val[1], 4)
                    if self.skipped:
                        row["skipped_steps"] = len(self.skipped)
                    last_t, last_tokens = now, tokens
                    result.losses.append((n, loss_val))
                    write(row)
                    bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tok_per_s']:.0f}")
                    if not cfg.progress:  # no bar to show it: a line a logged step (batch jobs' logs)
                        self.say(f"step {n}: loss {loss_val:.4f}, lr {lr:.2e}, {row['tok_per_s']:.0f} tok/s")

                if cfg.eval_every and (n % cfg.eval_every == 0 or n == cfg.max_steps):
                    t_eval = time.perf_counter()
                    val, health = self._evaluate(eval_model, autocast)
                    last_t += time.perf_counter() - t_eval  # tok_per_s: training throughput, validation left out
                    result.val_losses.append((n, val))
                    write({"step": n, "val_loss": val, **health, "tokens": n * tokens_per_step,
                           "elapsed_s": round(elapsed0 + time.perf_counter() - t0, 3)})
                    extra = "".join(f", {k[4:]} {v:g}" for k, v in health.items())
                    self.say(f"step {n}: val_loss {val:.4f}{extra}")
                    if health.get("val_retr_spread", 1.0) < COLLAPSED_SPREAD and not warned_collapse:
                        warned_collapse = True
                        self.say(
                            f"warning: at step {n} the retrieval scores of the chunks each row picks differ by "
                            f"{health['val_retr_spread']:.2g} (std): every picked chunk gets ~1/top_k of the weight, so "
                            "retrieval no longer tells chunks apart. results/README.md ('Retrieval collapse') says why "
                            "and what kept it selective there (a lower --lr, --set retrieval_key=centered)."
                        )

                timed_out = cfg.time_limit > 0 and time.perf_counter() - t0 > 60 * cfg.time_limit
                # every rank stops at the same step: one small all-reduce a step when distributed
                halt = D.any_across_ranks(timed_out or stop.signum is not None, info)
                stop_here = cfg.stop_at > 0 and n >= cfg.stop_at
                if n % cfg.save_every == 0 or n == cfg.max_steps or halt or stop_here:
                    t_save = time.perf_counter()
                    self._save(model, opt, n, n * tokens_per_step, elapsed0 + time.perf_counter() - t0)
                    last_t += time.perf_counter() - t_save  # (and checkpoints)
                    if not halt and D.any_across_ranks(stop.signum is not None, info):
                        halt = True  # a signal came during the save: the checkpoint it asks for is made
                if halt:
                    if stop.signum is not None:
                        result.interrupted = stop.signum
                        self.say(f"interrupted at step {n}: checkpoint saved; rerun the same command to resume")
                    elif timed_out:
                        self.say(f"time limit of {cfg.time_limit} min reached at step {n}; rerun the same command to resume")
                    else:
                        self.say(f"another process stopped at step {n} (interrupted or out of time): checkpoint saved")
                    break
                if stop_here:
                    self.say(f"stopped at step {n} (--stop-at); raise it or drop it and rerun to continue")
                    break
        finally:
            stop.restore()
            prefetch.close()
            bar.close()
            if logf is not None:
                logf.close()
            if tb is not None:
                tb.close()
        D.barrier(info)
        self.say(f"done: step {result.step}, checkpoint in {self.out / 'ckpt'}")
        return result

    def _last_good(self) -> str:
        """Where a run stopped by a non-finite loss or gradient goes on from (it may not have saved yet)."""
        path = find_checkpoint(self.out, repair=False) if self.out.is_dir() else None
        if path is not None:
            return f"The last good checkpoint is in {path}."
        return f"No checkpoint was saved yet (the first was due at step {min(self.cfg.save_every, self.cfg.max_steps)}): a rerun starts from scratch."

    @torch.no_grad()
    def _evaluate(self, model: torch.nn.Module, autocast) -> tuple[float, dict[str, float]]:
        """The validation loss and, for a DRT, its retrieval health (:func:`retrieval_health`) and
        ``val_gca_gain``: the validation loss with every GCA switched off minus the loss as trained
        (what reading the retrieved chunks is worth; one more forward per batch)."""
        cfg, info = self.cfg, self.info
        devices = [info.device.index] if info.device.type == "cuda" else []
        drt = self.mcfg.arch == "drt"
        raw = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the module
        with torch.random.fork_rng(devices=devices):  # validation must not shift the training's random streams
            model.eval()
            total = torch.zeros((), device=info.device)
            health = torch.zeros(3, device=info.device)
            for i in range(cfg.eval_batches):
                batch = self.val_source.get_batch(i, cfg.batch_size, info.rank, info.world_size)
                ids, labels = batch["input_ids"].to(info.device), batch["labels"].to(info.device)
                with autocast():
                    out = model(ids, labels, output_retrieval=drt)
                total += out.loss.float()
                if drt:
                    with autocast(), raw.gca_disabled():
                        off = model(ids, labels).loss.float()
                    health += torch.stack([*retrieval_health(out.retrieval), off - out.loss.float()])
            model.train()
        n = max(cfg.eval_batches, 1)
        loss = _to_float(D.mean_across_ranks(total / n, info))
        if not drt:
            return loss, {}
        spread, top, gain = (D.mean_across_ranks(health / n, info)).tolist()
        metrics = {"val_gca_gain": float(f"{gain:.4g}")}
        if not math.isnan(spread):  # NaN when no validation row has every slot filled (top_k >= its chunks)
            metrics = {"val_retr_spread": float(f"{spread:.4g}"), "val_retr_top": float(f"{top:.4g}"), **metrics}
        return loss, metrics

    def _dump_nonfinite(self, step: int, model: DRT, micro: list[dict], loss) -> None:
        """Keep what reproduces a skipped step (the first 5 steps only): its batch in
        DIR/nonfinite/step<N>_rank<r>.pt (every micro-batch, concatenated in order: any one of them may
        have made the NaN) and, for the first, the weights in DIR/nonfinite/step<N>/
        (:mod:`gca.train.nonfinite`: ``gca replay-nonfinite DIR`` runs it again under anomaly detection).
        Says which parameters' gradients are not finite."""
        from gca.train.nonfinite import nonfinite_parameters, save_nonfinite_weights

        d = self.out / "nonfinite"
        if d.exists() and len(list(d.glob("step*_rank*.pt"))) >= 5 * self.info.world_size:
            return
        d.mkdir(parents=True, exist_ok=True)
        ids, labels = (torch.cat([b[k].cpu() for b in micro]) for k in ("input_ids", "labels"))
        torch.save({"step": step, "input_ids": ids, "labels": labels, "micro_batches": len(micro), "loss": float(loss)},
                   d / f"step{step}_rank{self.info.rank}.pt")
        bad = nonfinite_parameters(model)
        weights = save_nonfinite_weights(model, self.out, step) if self.info.is_main else None
        names = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        self.say(f"step {step}: non-finite gradient (loss {float(loss):.4g}) in {len(bad)} parameter(s) ({names}); "
                 f"update skipped, batch saved in {d}" + (f", weights in {weights}" if weights else ""))

    def _save(self, model: DRT, opt, step: int, tokens: int, elapsed: float) -> None:
        rngs = D.gather_objects(rng_state(), self.info)  # a collective: every rank takes part
        if self.info.is_main:
            trainer = {
                "step": step,
                "tokens": tokens,
                "elapsed_s": elapsed,
                "world_size": self.info.world_size,
                "optimizer": opt.state_dict(),
                "rng": rngs,
                "skipped": list(self.skipped),  # steps whose update was skipped (non-finite gradient)
                "torch_version": str(torch.__version__),
                "data": json.loads(json.dumps(_describe(self.source), default=str)),  # resume compares its content hashes
            }
            tok = getattr(self.source, "tokenizer", None)
            save_checkpoint(self.out, model=model, train_config=self.cfg.to_dict(), trainer=trainer, tokenizer=tok)


def _describe(source) -> dict | None:
    """``source.describe()`` (gca's sources; a source of one's own need not have it)."""
    return source.describe() if callable(getattr(source, "describe", None)) else None


def _content_hashes(desc: Any) -> list[str]:
    """The ``content_hash`` of every prepared folder in a data source's ``describe()``, in order."""
    if isinstance(desc, dict):
        own = [desc["content_hash"]] if desc.get("content_hash") else []
        return own + _content_hashes(list(desc.values()))
    if isinstance(desc, list):
        return [h for v in desc if isinstance(v, (dict, list)) for h in _content_hashes(v)]
    return []


class _Prefetcher:
    """Builds step ``s + 1``'s micro-batches (``grad_accum`` of them) in a background thread while step
    ``s`` trains. Batches are pure functions of their index, so prefetching changes nothing but the
    wall-clock time."""

    def __init__(self, source, batch_size: int, rank: int, world_size: int, per_step: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self.args = (batch_size, rank, world_size)
        self.source, self.per_step = source, per_step
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: dict[int, object] = {}

    def _fetch(self, step: int) -> list:
        return [self.source.get_batch(step * self.per_step + m, *self.args) for m in range(self.per_step)]

    def get(self, step: int) -> list:
        """Step ``step``'s micro-batches, in order."""
        fut = self.pending.pop(step, None)
        batches = fut.result() if fut is not None else self._fetch(step)
        self.pending = {step + 1: self.pool.submit(self._fetch, step + 1)}
        return batches

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["TrainConfig", "TrainResult", "train", "param_groups", "CheckpointError", "RESUMABLE_FIELDS"]
