"""`DRTConfig`: the typed configuration of a DRT model (and of its two baselines), with presets.

    cfg = DRTConfig.from_preset("tiny", vocab_size=512)   # any field can be overridden
    cfg = DRTConfig.from_dict(json.load(open("config.json")))

Presets: ``tiny`` (CPU tests and the demo, < 5M parameters), ``small`` (~40M, GPU experiments),
``paper`` (the published defaults, ~130M with the GPT-2 vocabulary).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def check_counts(where: str, **counts: Any) -> None:
    """Raise ValueError naming ``where`` and the first of ``counts`` that is not a positive integer
    (numpy integers count; bools do not). The argument checks of the Python API share it."""
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {v!r}")

def integer_dtype(dtype) -> bool:
    """Whether token ids of this torch dtype are integers (bool, float and complex are not)."""
    return not (dtype.is_floating_point or dtype.is_complex or str(dtype) == "torch.bool")


def _is_int(v: Any) -> bool:
    """An integer, numpy's included, but not a bool (True is an int to Python)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _is_real(v: Any) -> bool:
    """A real number, numpy's included, but not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _is_numpy_bool(v: Any) -> bool:
    return type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")


_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "chunk_size", "window", "top_k",
                  "retrieval_copy_ngram")
_NONNEGATIVE_INTS = ("num_lower_layers", "encoder_layers", "retrieval_distractors")
_REALS = ("retrieval_copy_loss", "retrieval_copy_force", "rope_theta", "norm_eps", "init_std")
_BOOLS = ("gca_softmax_one", "center_memory", "memory_key_shift", "gumbel", "tie_embeddings")

ARCHS = ("drt", "swa", "full")
RESIDUALS = ("plain", "published")
ATTN_IMPLS = ("auto", "flex", "blocked")
GCA_IMPLS = ("auto", "torch", "triton")
LANDMARK_MEMORY = ("keep", "zero")
RETRIEVAL_KEYS = ("landmark", "centered")
COPY_TARGETS = ("match", "other-sequence")


@dataclass
class DRTConfig:
    """Configuration of a DRT model. Every field is validated by :meth:`validate`."""

    vocab_size: int = 50257  # text vocabulary; the landmark gets one extra id (= vocab_size) internally
    hidden_size: int = 768  # model width
    num_heads: int = 12  # attention heads (self-attention and GCA); head size = hidden_size / num_heads
    num_kv_heads: int | None = None  # memory heads Hk for GCA (must divide num_heads); None = num_heads
    intermediate_size: int = 2048  # SwiGLU hidden size
    num_lower_layers: int = 6  # sliding-window layers below the chunk encoder
    encoder_layers: int = 2  # bidirectional chunk-encoder layers
    upper_groups: list[int] = field(default_factory=lambda: [6])  # layers per retrieval group
    chunk_size: int = 64  # positions per chunk, the landmark included (chunk_size - 1 text tokens)
    window: int = 512  # sliding-window size in positions (landmarks included); >= 2 * chunk_size keeps
    # the chunk before the current one inside it (retrieval serves only older chunks)
    top_k: int = 8  # chunks retrieved per chunk
    arch: str = "drt"  # "drt"; or a baseline of the same width and depth: "swa" (sliding window only), "full"
    residual: str = "plain"  # "plain": h += gca(norm(h)); "published": GCA output reaches h only via the MLP
    gca_softmax_one: bool = False  # add 1 to every GCA softmax denominator
    # the landmark position's slot in the chunk memory: "keep" (the encoder's output there, a summary
    # of the chunk that GCA can read) or "zero" (its key and value are 0, a fixed attend-to-nothing
    # slot, as the published code has it). results/README.md compares the two.
    landmark_memory: str = "keep"
    # each chunk's retrieval key: "landmark" (the encoder's normalised output at the landmark, as
    # published) or "centered" (the landmark's output minus the mean over its chunk's positions, then
    # normalised: immune to a large component shared by all positions, which in our corpus runs made
    # the published keys identical across chunks; results/README.md "Retrieval collapse")
    retrieval_key: str = "landmark"
    # subtract each chunk's mean over its positions from the encoder output before the memory keys and
    # values: GCA reads what differs within a chunk and cannot turn the memory into a constant (the
    # retrieval key follows retrieval_key; experimental, results/README.md "Retrieval collapse")
    center_memory: bool = False
    # build each memory key from its position and the one before it in the chunk (a learned per-feature
    # mix, 0.5 at init; the chunk's first position mixes with zeros), so that a GCA query for the
    # current token can match the position that follows it: the lookup a copy ("induction") needs,
    # given rather than learned. Values are unchanged. Experimental, results/README.md "Fourth run".
    memory_key_shift: bool = False
    gumbel: bool = True  # Gumbel noise on retrieval scores in training (exploration)
    # in training only: every retrieval row may also pick the chunks of this many other sequences of the
    # batch (rows b + 1 .. b + n, cyclically), as if they came before its own: unrelated text, which a
    # long context is full of, to learn to rank below its own. At the training length a row otherwise
    # sees only its own few dozen chunks (results/README.md, "Where the rise past 16x comes from").
    # Needs a batch of more than n sequences; the other rows must not hold this row's text (random
    # windows of a large corpus rarely overlap). Evaluation and generation never add them. Keep it 0 for
    # needle tasks: another sample's needle would answer the question as well as the row's own.
    # Measured over ten seeds of the small preset (results/README.md, "Retrieval distractors over ten
    # seeds"): on from the start, perplexity flat from 4x to 64x the training length in every seed, but
    # ~3.7% higher at the training length than without. Used instead in a short stage after plain
    # pre-training (400 steps at lr 1e-4, `scripts/reproduce.sh STAGE=distract`; ten seeds, "A distractor
    # stage after pre-training"): 16x -> 64x -0.01% to +0.26% (without: +0.08% to +1.83%), and +0.1% at
    # the training length against the same stage without.
    retrieval_distractors: int = 0
    # in training only: an auxiliary loss, this weight times a cross-entropy over each retrieval row's
    # noise-free scores (every chunk the row may pick) towards the chunks that hold a copy source of
    # the tokens the row serves: an earlier exact (retrieval_copy_ngram + 1)-gram match of a token and
    # its retrieval_copy_ngram predecessors, more than `window` tokens back (inside the window no
    # retrieval is needed). Rows with no such chunk add nothing. The language-model loss alone reaches
    # the scores only through the few picked chunks' softmax weights; GPU-trained small DRTs picked a
    # far copy's chunk for 1-5% of far-copyable held-out tokens (results/README.md, "Does retrieval
    # find the copies"). Experimental; 0 (off) is the published method.
    retrieval_copy_loss: float = 0.0
    retrieval_copy_ngram: int = 8
    # "match" (the above), or "other-sequence": each row gets the targets of the same row of the next
    # sequence in the batch (cyclically), as many and as placed as real ones but unrelated to its own
    # text: the control that tells a gain from the supervision apart from one from any extra signal
    retrieval_copy_targets: str = "match"
    # in training only: the share of retrieval rows (each row by chance, each step) whose picks start with
    # the chunks that hold its tokens' copy sources (those of retrieval_copy_loss: the same targets, the
    # same control), the rest of its k slots as usual; the weights stay the softmax of the scores. The
    # read then learns from chunks worth reading, whatever the scores pick. An oracle: the sources are
    # those of all the row's tokens, later ones included, so the training forward is not causal with it
    # (evaluation never forces). Experimental; 0 (off) is the published method.
    retrieval_copy_force: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    attn_impl: str = "auto"  # sliding-window backend: "auto" (flex on CUDA, blocked elsewhere), "flex", "blocked"
    gca_impl: str = "auto"  # GCA backend, see gca.ops.grouped_cross_attention

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def text_per_chunk(self) -> int:
        """User tokens per chunk (the chunk's last position is its landmark)."""
        return self.chunk_size - 1

    @property
    def landmark_id(self) -> int:
        return self.vocab_size

    @property
    def num_layers(self) -> int:
        return self.num_lower_layers + sum(self.upper_groups)

    def validate(self) -> "DRTConfig":
        def bad(name: str, why: str):
            raise ValueError(f"DRTConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                bad(name, "must be a positive integer")
        for name in _NONNEGATIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                bad(name, "must be a non-negative integer")
        if self.num_kv_heads is not None and (not _is_int(self.num_kv_heads) or self.num_kv_heads < 1):
            bad("num_kv_heads", "must be a positive integer or None")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("hidden_size", "hidden_size / num_heads must be even (rotary embeddings)")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if not isinstance(self.upper_groups, (list, tuple)) or any(
            not _is_int(g) or g < 1 for g in self.upper_groups
        ):
            bad("upper_groups", "must be a list of positive layer counts, e.g. [6] or [4, 4]")
        if self.arch not in ARCHS:
            bad("arch", f"must be one of {ARCHS}")
        if self.arch == "drt" and len(self.upper_groups) == 0:
            bad("upper_groups", "a DRT needs at least one retrieval group")
        if self.chunk_size < 2:
            bad("chunk_size", "must be >= 2 (text tokens plus the landmark)")
        if self.residual not in RESIDUALS:
            bad("residual", f"must be one of {RESIDUALS}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if self.retrieval_key not in RETRIEVAL_KEYS:
            bad("retrieval_key", f"must be one of {RETRIEVAL_KEYS}")
        if self.landmark_memory not in LANDMARK_MEMORY:
            bad("landmark_memory", f"must be one of {LANDMARK_MEMORY}")
        if self.attn_impl not in ATTN_IMPLS:
            bad("attn_impl", f"must be one of {ATTN_IMPLS}")
        if self.gca_impl not in GCA_IMPLS:
            bad("gca_impl", f"must be one of {GCA_IMPLS}")
        d = self.hidden_size // self.num_heads
        if self.gca_impl == "triton" and self.arch == "drt" and (d < 16 or d > 128 or d & (d - 1)):
            # the kernels' rule (gca.ops.gca_triton.supports); caught here rather than at the first retrieval
            bad("gca_impl", f"'triton' needs a head size (hidden_size / num_heads) that is a power of two in "
                            f"[16, 128], and it is {d}; use 'auto' or 'torch'")
        if self.retrieval_copy_targets not in COPY_TARGETS:
            bad("retrieval_copy_targets", f"must be one of {COPY_TARGETS}")
        c = self.retrieval_copy_loss
        if not _is_real(c) or not 0 <= c < float("inf"):
            bad("retrieval_copy_loss", "must be a finite weight >= 0 (0: off)")
        f = self.retrieval_copy_force
        if not _is_real(f) or not 0 <= f <= 1:
            bad("retrieval_copy_force", "must be a share of rows in [0, 1] (0: off)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 < v < float("inf"):
                bad(name, "must be a finite number > 0")
        return self

    def __post_init__(self):
        g = self.upper_groups
        if type(g).__module__ == "numpy" and getattr(g, "ndim", None) == 1:  # a row of a sweep's array
            g = g.tolist()
        self.upper_groups = list(g) if isinstance(g, (list, tuple)) else g
        # numpy integers (np.int64 from a sweep's array) are taken and stored as int, so the config stays JSON
        for name in _POSITIVE_INTS + _NONNEGATIVE_INTS + ("num_kv_heads",):
            if _is_int(getattr(self, name)):
                setattr(self, name, int(getattr(self, name)))
        if isinstance(self.upper_groups, list) and all(_is_int(g) for g in self.upper_groups):
            self.upper_groups = [int(g) for g in self.upper_groups]
        for name in _REALS:  # numpy floats (and ints) likewise, as float
            v = getattr(self, name)
            if _is_real(v) and type(v) not in (int, float):
                setattr(self, name, float(v))
        for name in _BOOLS:  # numpy bools as bool
            if _is_numpy_bool(getattr(self, name)):
                setattr(self, name, bool(getattr(self, name)))
        self.validate()

    # ---- presets and (de)serialisation ----
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DRTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DRTConfig":
        if not isinstance(d, Mapping):  # None, a list or a string failed with an unrelated message
            hint = " (a preset name goes to DRTConfig.from_preset)" if isinstance(d, str) else ""
            raise TypeError(f"DRTConfig.from_dict expects a dict of field values, got {type(d).__name__}{hint}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DRTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "DRTConfig":
        return self.from_dict({**self.to_dict(), **changes})


PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: about 1M parameters with a 2K vocabulary, < 5M with 8K.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        num_heads=4,
        intermediate_size=384,
        num_lower_layers=2,
        encoder_layers=1,
        upper_groups=[2],
        chunk_size=64,
        window=128,
        top_k=3,
    ),
    # GPU experiments: ~40M parameters with the GPT-2 vocabulary.
    "small": dict(
        vocab_size=50257,
        hidden_size=384,
        num_heads=6,
        intermediate_size=1024,
        num_lower_layers=4,
        encoder_layers=1,
        upper_groups=[4],
        chunk_size=64,
        window=512,
        top_k=8,
    ),
    # The published configuration (layers [6, 6], 2 encoder layers, top-8, window 512).
    "paper": dict(
        vocab_size=50257,
        hidden_size=768,
        num_heads=12,
        intermediate_size=2048,
        num_lower_layers=6,
        encoder_layers=2,
        upper_groups=[6],
        chunk_size=64,
        window=512,
        top_k=8,
    ),
}
