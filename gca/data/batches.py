"""The batch-source interface the trainer and evaluators use, and :func:`build_source`.

    src = build_source("synthetic:passkey", seq_len=504, seed=0)
    src = build_source("data/debian", seq_len=4096, split="val")
    src = build_source("data/debian@0.8+synthetic:passkey@0.2", seq_len=4096)
    b = src.get_batch(index=step, batch_size=8, rank=rank, world_size=world_size)
    b["input_ids"], b["labels"]        # (8, seq_len) torch.long; labels: -100 = no loss
    src.vocab_size, src.tokenizer      # the model's vocab_size must be >= src.vocab_size

Spec grammar (one string)::

    spec      := component ( "+" component )*             a mixture; weights default to 1
    component := source [ "@" weight ]
    source    := "synthetic:" tasks ( ";" key=value )*      synthetic tasks
               | PATH ( ";" key=value )*                    a folder written by gca.data.prepare
    tasks     := passkey | multikey | 2hop | mix | kind=w("," kind=w)*    (mix = passkey 0.5,
                                                            multikey 0.3, 2hop 0.2)

Options of ``synthetic:`` (all optional): ``filler=PATH`` (filler cut from a prepared folder's same
split; default embedded random words), ``loss=answer|all|answer_repeats``, ``min_len=N`` (variable
length samples, see :class:`gca.data.tasks.TaskSource`), ``repeat=p`` (probability of filler that
repeats pieces of itself), ``repeat_frac=f``, ``repeat_gap=N`` (tokens between a repeat and its source), ``digits=f`` (runs of digits in the filler, training only), ``edge=p`` (the
probability that a sample's first target needle starts at its first token), ``keys=N`` (multikey needles), ``chains=N`` (2hop
chains), ``lead=N`` (2hop: the question's X at least N chunks before the answer, see
:func:`gca.data.tasks.make_task_sample`'s ``hop_lead``), ``hop=chain|end`` (2hop: ask
for the chain ``Y , Z``, the default, or the end point ``Z``), ``key_len=N``, ``value_len=N``, ``align=0|1``, ``P=N`` (text tokens per chunk, default 63).
Example: ``synthetic:passkey;min_len=189;repeat=0.5;loss=answer_repeats``.

Determinism and ranks. Sample ``i`` of rank ``r``'s batch ``index`` is the global sample
``gid = (index * world_size + r) * batch_size + i``, and every sample is a pure function of
``(seed, split, gid)``. So ranks see disjoint samples, and world_size x batch_size = constant gives
the same global batches whatever the number of processes. ``split="val"`` reads val.bin, or for
synthetic tasks a separate random stream.
"""

from __future__ import annotations

import json
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from gca.data.tokenizer import Tokenizer, load_tokenizer

SPLIT_CODES = {"train": 0, "val": 1}


def rng_for(seed: int, split: str, stream: str, gid: int) -> np.random.Generator:
    """Independent generator for one (seed, split, named stream, sample id)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, SPLIT_CODES[split], zlib.crc32(stream.encode()), int(gid)])


class BatchSource:
    """Base class: subclasses implement :meth:`sample` for one global sample id.

    Attributes:
        seq_len: row length L of every batch.
        seed, split: the stream (``"train"`` or ``"val"``).
        tokenizer: a :class:`Tokenizer`; ``vocab_size`` is its size.
    """

    def __init__(self, *, seq_len: int, seed: int = 0, split: str = "train", tokenizer: Tokenizer):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, got {split!r}")
        self.seq_len, self.seed, self.split = seq_len, int(seed), split
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def sample(self, gid: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, each ``(seq_len,)`` int64, for global sample id ``gid``."""
        raise NotImplementedError

    def get_batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Batch ``index`` of this rank.

        Returns:
            ``{"input_ids": (batch_size, seq_len) long, "labels": (batch_size, seq_len) long}``.
        """
        if index < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad get_batch arguments: index={index}, batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        base = (int(index) * world_size + rank) * batch_size
        rows = [self.sample(base + i) for i in range(batch_size)]
        ids = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))
        return {"input_ids": ids.long(), "labels": labels.long()}

    def describe(self) -> dict:
        """A JSON-able description (saved with checkpoints)."""
        return {"type": type(self).__name__, "seq_len": self.seq_len, "seed": self.seed, "split": self.split,
                "tokenizer": self.tokenizer.name, "vocab_size": self.vocab_size}


class PackedSource(BatchSource):
    """Windows of ``seq_len`` tokens from a prepared folder's split (loss on every token).

    Each epoch the split is cut into ``W = N // seq_len`` non-overlapping windows, shifted by a
    random offset in ``[0, N - W*seq_len]`` and visited in a random order; global sample ``gid``
    is window ``gid % W`` of epoch ``gid // W``. Windows cross document boundaries (the EOS
    separator stays in the stream, as in GPT-2 style pretraining).
    """

    def __init__(self, path, *, seq_len: int, seed: int = 0, split: str = "train", tokenizer=None):
        from gca.data.prepare import PackedDataset

        self.dataset = PackedDataset(path, split)
        tok = self.dataset.tokenizer if tokenizer is None else load_tokenizer(tokenizer)
        if tok.vocab_size != self.dataset.vocab_size:
            raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but {path} was prepared with "
                             f"{self.dataset.vocab_size}; leave tokenizer=None to use the folder's")
        super().__init__(seq_len=seq_len, seed=seed, split=split, tokenizer=tok)
        n = len(self.dataset)
        if n < seq_len:
            raise ValueError(f"{path} split {split!r} has {n} tokens, fewer than seq_len={seq_len}; use a shorter "
                             f"sequence (gca train --seq-len) or prepare more text")
        self.num_windows = n // seq_len
        self._epoch = lru_cache(maxsize=2)(self._epoch_plan)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, int]:
        rng = rng_for(self.seed, self.split, "packed-epoch", epoch)
        slack = len(self.dataset) - self.num_windows * self.seq_len
        return rng.permutation(self.num_windows), int(rng.integers(0, slack + 1))

    def sample(self, gid: int) -> tuple[np.ndarray, np.ndarray]:
        perm, shift = self._epoch(gid // self.num_windows)
        start = shift + int(perm[gid % self.num_windows]) * self.seq_len
        ids = self.dataset.window(start, self.seq_len)
        self.dataset.check_ids(ids, start)  # a corrupt .bin: said here, not as the embedding's (CUDA: an assert)
        return ids, ids.copy()

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.dataset.path), "content_hash": self.dataset.meta.get("content_hash")}


class MixtureSource(BatchSource):
    """Each sample comes from one component, drawn with the given weights (per sample, by gid)."""

    def __init__(self, components: list[tuple[BatchSource, float]], *, seed: int = 0):
        if not components:
            raise ValueError("a mixture needs at least one component")
        first = components[0][0]
        for c, w in components:
            if c.seq_len != first.seq_len:
                raise ValueError("mixture components must share seq_len")
            if c.vocab_size != first.vocab_size:
                raise ValueError(f"mixture components use different vocabularies ({c.vocab_size} vs "
                                 f"{first.vocab_size}); give synthetic tasks filler=DIR or the same tokenizer")
            if not 0 <= w < float("inf"):
                raise ValueError(f"mixture weights must be finite numbers >= 0, got {w}")
        super().__init__(seq_len=first.seq_len, seed=seed, split=first.split, tokenizer=first.tokenizer)
        self.components = [c for c, _ in components]
        w = np.asarray([w for _, w in components], dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError("mixture weights sum to 0")
        self.p = w / w.sum()

    def sample(self, gid: int) -> tuple[np.ndarray, np.ndarray]:
        j = int(rng_for(self.seed, self.split, "mixture", gid).choice(len(self.components), p=self.p))
        return self.components[j].sample(gid)

    def describe(self) -> dict:
        return {**super().describe(), "components": [c.describe() for c in self.components], "weights": self.p.tolist()}


# ---------------------------------------------------------------- spec parsing
_OPT_NAMES = {"filler": ("filler", str), "loss": ("loss_on", str), "min_len": ("min_len", int),
              "repeat": ("repeat_prob", float), "repeat_frac": ("repeat_frac", float), "repeat_gap": ("repeat_gap", int), "digits": ("digit_frac", float),
              "edge": ("edge_prob", float), "digit_repeat": ("digit_repeat", float), "keys": ("n_keys", int),
              "chains": ("n_chains", int), "lead": ("hop_lead", int), "hop": ("hop_answer", str), "key_len": ("key_len", int), "value_len": ("value_len", int),
              "align": ("align_question", lambda v: v.lower() not in ("0", "false", "no")),
              "P": ("text_per_chunk", int)}


def _parse_component(text: str) -> tuple[str, float]:
    if "@" in text:
        base, w = text.rsplit("@", 1)
        try:
            return base.strip(), float(w)
        except ValueError:
            raise ValueError(f"bad mixture weight {w!r} in {text!r} (expected SOURCE@0.5)") from None
    return text.strip(), 1.0


def _build_one(text: str, *, seq_len: int, seed: int, split: str, tokenizer) -> BatchSource:
    parts = text.split(";")
    base, opts = parts[0].strip(), {}
    for p in parts[1:]:
        if not p.strip():
            continue
        if "=" not in p:
            raise ValueError(f"bad option {p!r} in {text!r} (expected key=value)")
        k, v = (x.strip() for x in p.split("=", 1))
        if k not in _OPT_NAMES:
            raise ValueError(f"unknown option {k!r} in {text!r}; known: {sorted(_OPT_NAMES)}")
        name, conv = _OPT_NAMES[k]
        try:
            opts[name] = conv(v)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(conv, "another value")
            raise ValueError(f"option {k}={v!r} in {text!r}: expected {what}") from None
    if base.startswith("synthetic:"):
        from gca.data.tasks import TaskSource

        tasks = base[len("synthetic:"):]
        if "=" in tasks:
            kind = {}
            for item in tasks.split(","):
                k, _, w = item.partition("=")
                try:
                    kind[k.strip()] = float(w)
                except ValueError:
                    raise ValueError(f"task weight {item!r} in {text!r}: expected TASK=NUMBER, e.g. passkey=1") from None
        else:
            kind = tasks or "passkey"
        return TaskSource(kind, seq_len=seq_len, seed=seed, split=split, tokenizer=tokenizer, **opts)
    if opts:
        raise ValueError(f"options {sorted(opts)} apply only to synthetic: sources ({text!r})")
    p = Path(base).expanduser()
    if not (p / "meta.json").exists():
        what = "does not exist" if not p.exists() else "is not a prepared dataset (no meta.json)"
        raise ValueError(f"data source {base!r} {what}; expected synthetic:TASK (e.g. synthetic:passkey) or a "
                         f"folder written by `gca prepare`")
    return PackedSource(p, seq_len=seq_len, seed=seed, split=split, tokenizer=tokenizer)


def _check_shared_tokenizer(comps: list[tuple[str, float]]) -> None:
    """The prepared folders of a mixture (its datasets and synthetic ``filler=`` folders) must share a
    tokenizer: say which two do not, before any component is built (its error would blame a tokenizer
    argument the user never gave)."""
    folders = []
    for base, _ in comps:
        head, *opts = base.split(";")
        paths = [head.strip()] if not head.strip().startswith("synthetic:") else []
        paths += [o.split("=", 1)[1].strip() for o in opts if o.split("=", 1)[0].strip() == "filler" and "=" in o]
        folders += [Path(x).expanduser() for x in paths if (Path(x).expanduser() / "meta.json").exists()]
    seen = None
    for f in folders:
        try:
            meta = json.loads((f / "meta.json").read_text())
            tok = (meta["tokenizer"]["name"], int(meta["vocab_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # PackedDataset reports a broken folder when it is built
        if seen is None:
            seen = (f, tok)
        elif tok[1] != seen[1][1]:
            raise ValueError(f"the datasets of the mixture do not share a tokenizer: {seen[0]} was prepared with "
                             f"{seen[1][0]!r} ({seen[1][1]} ids), {f} with {tok[0]!r} ({tok[1]} ids); prepare them with "
                             f"the same one (gca prepare ... --tokenizer {seen[0]})")


def build_source(spec: str, *, seq_len: int, seed: int = 0, split: str = "train", tokenizer=None) -> BatchSource:
    """Build a :class:`BatchSource` from a spec string (grammar in the module docstring).

    Args:
        spec: e.g. ``"synthetic:passkey"``, ``"synthetic:mix"``, ``"data/debian"``,
            ``"data/debian@0.8+synthetic:passkey;filler=data/debian@0.2"``.
        seq_len: row length of every batch.
        seed: stream seed; the same (spec, seq_len, seed, split) always gives the same batches.
        split: ``"train"`` or ``"val"`` (held-out documents / a separate synthetic stream).
        tokenizer: optional override (a name/path/:class:`Tokenizer`); default: a prepared folder's
            own tokenizer, ``"embedded"`` for synthetic tasks. In a mixture, synthetic components
            without ``filler=`` use the first prepared folder's tokenizer.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("build_source: spec must be a non-empty string")
    if (Path(spec.strip()).expanduser() / "meta.json").is_file():
        comps = [(spec.strip(), 1.0)]  # a prepared folder whose name holds "+" or "@" (c++-docs): no mixture
    else:
        comps = [_parse_component(c) for c in spec.split("+")]
    if tokenizer is None and len(comps) > 1:
        _check_shared_tokenizer(comps)
        for base, _ in comps:
            b = base.split(";")[0]
            if not b.startswith("synthetic:") and (Path(b).expanduser() / "meta.json").exists():
                tokenizer = load_tokenizer(Path(b).expanduser())
                break
    # component j > 0 gets its own seed, so two similar components do not repeat each other
    built = [(_build_one(b, seq_len=seq_len, seed=seed + 1_000_003 * j, split=split, tokenizer=tokenizer), w)
             for j, (b, w) in enumerate(comps)]
    if len(built) == 1:
        return built[0][0]
    return MixtureSource(built, seed=seed)
