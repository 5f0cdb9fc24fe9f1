"""Synthetic long-context retrieval tasks (passkey, multi-key, 2-hop), deterministic by seed.

    s = make_task_sample("passkey", context_len=4096, seed=3)          # embedded tokenizer + filler
    s.input_ids[:s.prompt_len]   # the prompt; s.answer follows it in s.input_ids
    s.target_chunks, s.query_chunk, s.needle_spans

    src = TaskSource("passkey", seq_len=504, min_len=189, repeat_prob=0.5, loss_on="answer_repeats")
    batch = src.get_batch(index=0, batch_size=8)   # {"input_ids": (8, 504), "labels": (8, 504)} long

Tasks (the paper's forms; token-level, so any tokenizer works):

    passkey   filler ... |The passkey is: 7 3 9 1 2| ... filler |What is the passkey? The passkey is
              -> 7 3 9 1 2
    multikey  several |One of the special magic numbers for <key> is <value>| needles (distinct
              keys and values), then |What is the special magic number for <key>? The special
              magic number for <key> is -> <value of that key>
    2hop      chains |The path from <X> leads to <Y>| and |The path from <Y> leads to <Z>|
              (plus distractor chains), then |Where does the path from <X> lead? It leads to
              -> <Y>, <Z>  (the chain: the paper's task asks for it; the model names
              the first hop, then the second). ``hop_answer="end"``: |Where does the path from
              <X> lead after two steps? It leads to -> <Z>  (the end point only, the form of
              this package's results before 2026-12-01)

Keys are ``key_len`` word tokens; values are ``value_len`` digit tokens (``" 0"``..``" 9"`` when
the tokenizer has them as single tokens, else ``"0"``..``"9"``), each its own token. The answer
sequence occurs exactly once in the prompt, inside the target needle.

Alignment (``align_question=True``, the default). With P = ``text_per_chunk`` (63) user tokens per
chunk, chunk c holds tokens ``[c*P, (c+1)*P)``; the retrieval made at landmark c serves the
predictions made from chunk c + 1's positions, and the prediction of chunk c + 1's *first* token is
read at landmark c itself, which still uses the retrieval of landmark c - 1 (one token of lag).
So the prompt length is made ``prompt_len % P == 1``::

    chunk q = prompt_len // P - 1       chunk q + 1
    [ ... filler  |What is the passkey? The passkey][ is | 7  3  9  1  2  (trailing filler / pad) ]
                                          landmark q ^   ^ a0 is predicted here, at " is"

The question, all but its last token, closes chunk q; the question's last token (" is") opens chunk
q + 1 and every answer token is predicted from a position of chunk q + 1, so all of them use the
retrieval made at landmark q with the whole question in view. ``TaskSample.query_chunk`` is q: the
target needle's chunk should be in ``retrieval.indices[b, q]``. Needles never straddle a chunk
boundary (they are placed inside one chunk), and they sit in chunks strictly before the first chunk
holding a question token (retrieval at landmark q may only pick chunks j < q). With
``align_question=False`` the prompt has exactly ``context_len`` tokens and the question ends
wherever that falls.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

import numpy as np

from gca.config import check_counts
from gca.data.batches import BatchSource, rng_for
from gca.data.tokenizer import Tokenizer, load_tokenizer

KINDS = ("passkey", "multikey", "2hop")
HOP_ANSWERS = ("chain", "end")
KIND_ALIASES = {"multi-key": "multikey", "multi_key": "multikey", "multihop": "2hop", "multi-hop": "2hop",
                "hop2": "2hop", "two-hop": "2hop"}
DEFAULT_MIX = {"passkey": 0.5, "multikey": 0.3, "2hop": 0.2}
LOSS_MODES = ("answer", "all", "answer_repeats")
P_DEFAULT = 63


def canonical_kind(kind: str) -> str:
    k = KIND_ALIASES.get(kind, kind)
    if k not in KINDS:
        raise ValueError(f"unknown task {kind!r}; choose one of {KINDS}")
    return k


# ---------------------------------------------------------------- the sample
@dataclass
class TaskSample:
    """One task instance.

    Attributes:
        input_ids: prompt + answer (+ nothing else), ``prompt_len + len(answer)`` ids.
        prompt_len: number of prompt tokens; the answer starts at ``input_ids[prompt_len]``.
        answer: the answer ids.
        needle_spans: ``[(start, end), ...]`` token positions of each needle, end exclusive; the
            target needle(s) first (2hop: the X->Y needle, then Y->Z), then distractors.
        target_chunks: chunk index (of ``text_per_chunk`` user tokens) of each target needle.
        kind: ``"passkey"``, ``"multikey"`` or ``"2hop"``.
        text_per_chunk: P used for alignment and chunk indices (63 by default).
        aligned: whether ``prompt_len % P == 1`` was enforced.
        depth: requested relative depth of the (first) target needle in [0, 1].
        repeat_mask: per-token bool list, True on filler tokens that repeat an earlier piece of the
            filler (from the second token of each piece on; all False without repeats).
        question_len: the question's tokens, the last of the prompt.
        distractor_answers: the values of the distractor needles (multikey: the other keys' numbers;
            2hop: the other chains' answers, chains or end points as the question asks), each a
            possible wrong answer; empty for passkey.
        first_hop_len: 2hop with ``hop_answer="chain"``: the answer's first tokens that name the first
            hop's end <Y> (0 otherwise), so an evaluation can tell which lookup failed.
    """

    input_ids: list[int]
    prompt_len: int
    answer: list[int]
    needle_spans: list[tuple[int, int]]
    target_chunks: list[int]
    kind: str
    text_per_chunk: int = P_DEFAULT
    aligned: bool = True
    depth: float = 0.0
    repeat_mask: list[bool] = field(default_factory=list)
    question_len: int = 0
    distractor_answers: list[list[int]] = field(default_factory=list)
    first_hop_len: int = 0

    @property
    def target_chunk(self) -> int:
        """Chunk of the (first) target needle."""
        return self.target_chunks[0]

    @property
    def prompt(self) -> list[int]:
        return self.input_ids[: self.prompt_len]

    @property
    def query_chunk(self) -> int:
        """The chunk whose landmark's retrieval serves the first answer prediction (made at the
        prompt's last token): ``(prompt_len - 1) // P - 1``; -1 if none."""
        return (self.prompt_len - 1) // self.text_per_chunk - 1

    @property
    def answer_chunk(self) -> int:
        """Chunk holding the first answer token."""
        return self.prompt_len // self.text_per_chunk


# ---------------------------------------------------------------- vocab helpers
@lru_cache(maxsize=16)
def _vocab_info(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray, int]:
    """(word ids, digit ids, period id) of a tokenizer, cached per tokenizer object."""
    words = []
    for i in range(tok.vocab_size):
        s = tok.id_to_str(i)
        if re.fullmatch(r" [a-z]{3,12}", s):
            words.append(i)
    if len(words) < 8:
        raise ValueError(f"tokenizer {tok.name!r} has only {len(words)} whole-word tokens (' [a-z]{{3,12}}'); "
                         f"the synthetic tasks need >= 8 for keys and filler")
    digits = []
    for fmt in (" {}", "{}"):
        ids = [tok.encode(fmt.format(d)) for d in range(10)]
        if all(len(x) == 1 for x in ids):
            digits = [x[0] for x in ids]
            break
    if len(set(digits)) != 10:
        raise ValueError(f"tokenizer {tok.name!r} does not encode the digits as single tokens")
    period = tok.encode(".")
    words = np.asarray([w for w in words if w not in digits], dtype=np.int64)
    return words, np.asarray(digits, dtype=np.int64), period[0] if len(period) == 1 else int(words[0])


def digit_ids(tokenizer) -> list[int]:
    """The 10 single-token digits (``" 0"``..``" 9"`` if available, else ``"0"``..``"9"``)."""
    return _vocab_info(load_tokenizer(tokenizer))[1].tolist()


@lru_cache(maxsize=64)
def _enc(tok: Tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tok.encode(text))


# ---------------------------------------------------------------- fillers
def _check_digit_frac(digit_frac: float) -> float:
    if not 0.0 <= digit_frac < 1.0:
        raise ValueError(f"digit_frac must lie in [0, 1), got {digit_frac}")
    return float(digit_frac)


def _check_digit_repeat(digit_repeat: float, digit_frac: float) -> float:
    if not 0.0 <= digit_repeat < 1.0:
        raise ValueError(f"digit_repeat must lie in [0, 1), got {digit_repeat}")
    if digit_repeat and not digit_frac:
        raise ValueError("digit_repeat shapes the filler's digit runs: give digits (digit_frac) > 0 too")
    return float(digit_repeat)


def _digit_runs(out: np.ndarray, digits: np.ndarray, frac: float, rng: np.random.Generator,
                repeat: float = 0.0) -> np.ndarray:
    """Overwrite about a fraction ``frac`` of ``out`` (in place) with runs of 2-6 random digits. With
    ``repeat`` > 0 each digit after a run's first is the one before it with that probability (else
    uniform): runs of equal digits, rare among independent digits, become common. ``repeat = 0`` draws
    exactly what it always did (the same random stream)."""
    n = len(out)
    if frac > 0 and n >= 6:
        runs = rng.binomial(n, frac / 4.0)  # runs of 4 digits on average
        for start, ln in zip(rng.integers(0, n - 6, size=runs), rng.integers(2, 7, size=runs)):
            d = rng.integers(0, 10, size=ln)
            if repeat:
                same = rng.random(ln) < repeat
                same[0] = False
                # each digit takes the value of the last position before it (or itself) that drew its own
                d = d[np.maximum.accumulate(np.where(same, 0, np.arange(ln)))]
            out[start:start + ln] = digits[d]
    return out


class WordFiller:
    """Embedded filler, no download: sentences of 6-16 random word tokens ending with ".".

    Words are the tokenizer's own whole-word tokens (``" [a-z]{3,12}"``), so each word is one token.
    With ``digit_frac = 0`` (the default, and what evaluation uses) the filler never contains a digit;
    ``digit_frac = f`` overwrites about a fraction f of the tokens with runs of 2-6 random digits
    (training data in which copying digit strings can be practised, e.g. through repeats);
    ``digit_repeat = q`` makes each digit of a run repeat the one before it with probability q.
    """

    def __init__(self, tokenizer="embedded", digit_frac: float = 0.0, digit_repeat: float = 0.0):
        self.digit_frac = _check_digit_frac(digit_frac)
        self.digit_repeat = _check_digit_repeat(digit_repeat, digit_frac)
        self.tokenizer = load_tokenizer(tokenizer)
        self.words, self.digits, self.period = _vocab_info(self.tokenizer)

    def tokens(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n,)`` int64 filler tokens."""
        out = self.words[rng.integers(0, len(self.words), size=n)]
        ends = np.cumsum(rng.integers(7, 18, size=n // 7 + 1)) - 1
        out[ends[ends < n]] = self.period
        return _digit_runs(out, self.digits, self.digit_frac, rng, self.digit_repeat)

    def describe(self) -> str:
        return f"words({self.tokenizer.name})" + _describe_digits(self.digit_frac, self.digit_repeat)


def _describe_digits(frac: float, repeat: float) -> str:
    return (f", digits {frac}" if frac else "") + (f" (repeat {repeat})" if repeat else "")


class StreamFiller:
    """Filler cut from a token stream: a random window of a :class:`PackedDataset` split, with
    ``digit_frac`` of it overwritten by digit runs as :class:`WordFiller` does (training only)."""

    def __init__(self, dataset, digit_frac: float = 0.0, digit_repeat: float = 0.0):
        self.digit_frac = _check_digit_frac(digit_frac)
        self.digit_repeat = _check_digit_repeat(digit_repeat, digit_frac)
        self.dataset = dataset
        self.tokenizer = dataset.tokenizer
        self.digits = _vocab_info(self.tokenizer)[1] if self.digit_frac else None

    def tokens(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.array(self.dataset.window(int(rng.integers(0, len(self.dataset))), n), dtype=np.int64)
        return _digit_runs(out, self.digits, self.digit_frac, rng, self.digit_repeat) if self.digit_frac else out

    def describe(self) -> str:
        return f"stream({self.dataset.path}:{self.dataset.split})" + _describe_digits(self.digit_frac, self.digit_repeat)


def is_filler(obj) -> bool:
    """Whether ``obj`` is a ready filler: it has a ``tokens(n, rng)`` method. (A PackedDataset's
    ``tokens`` is its token array, not a method: it is made into a :class:`StreamFiller`.)"""
    return callable(getattr(obj, "tokens", None))


def make_filler(filler=None, tokenizer=None, split: str = "train", digit_frac: float = 0.0,
                digit_repeat: float = 0.0):
    """``None``/``"words"`` -> :class:`WordFiller`; a prepared folder path or a PackedDataset ->
    :class:`StreamFiller` of its ``split`` (both with ``digit_frac`` and ``digit_repeat``); anything
    with ``.tokens(n, rng)`` as is."""
    if filler is None or filler in ("words", "embedded"):
        return WordFiller(tokenizer if tokenizer is not None else "embedded", digit_frac=digit_frac,
                          digit_repeat=digit_repeat)
    if is_filler(filler):
        if digit_frac or digit_repeat:
            raise ValueError("digit_frac needs the embedded word filler or a prepared folder, not a custom filler")
        return filler
    from gca.data.prepare import PackedDataset

    if not isinstance(filler, PackedDataset):
        filler = PackedDataset(filler, split)
    return StreamFiller(filler, digit_frac=digit_frac, digit_repeat=digit_repeat)


def _check_same_vocab(tok: Tokenizer, fill) -> None:
    ft = getattr(fill, "tokenizer", None)
    if ft is not None and ft is not tok and ft.vocab_size != tok.vocab_size:
        raise ValueError(f"the filler's tokenizer ({ft.name}, {ft.vocab_size} ids) differs from the task "
                         f"tokenizer ({tok.name}, {tok.vocab_size} ids); pass the dataset's tokenizer")


def _with_repeats(base: np.ndarray, rng: np.random.Generator, frac: float = 0.3,
                  min_len: int = 8, max_len: int = 24, min_dist: int = P_DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Overwrite pieces of ``base`` with copies of earlier pieces (about ``frac`` of the tokens).

    Each copy comes from at least ``min_dist`` tokens earlier (default one chunk, so that the
    source is usually in another chunk). Returns (tokens, mask) where mask is True from the second
    token of each copied piece on (its first token is not predictable).
    """
    x = base.copy()
    mask = np.zeros(len(x), dtype=bool)
    n = len(x)
    budget = int(frac * n)
    pos = 0
    while budget > 0:
        ln = int(rng.integers(min_len, max_len + 1))
        lo, hi = max(pos, ln + min_dist), n - ln
        if lo > hi:
            break
        # spread the pieces: the next one starts within ~ (n - pos) / pieces left
        span = max(1, (hi - lo) * ln // max(budget, ln))
        d = lo + int(rng.integers(0, min(span, hi - lo) + 1))
        s = int(rng.integers(0, d - ln - min_dist + 1))
        x[d:d + ln] = x[s:s + ln]
        mask[d + 1:d + ln] = True
        pos = d + ln
        budget -= ln
    return x, mask


# ---------------------------------------------------------------- templates
def _templates(tok: Tokenizer, kind: str, keys: list[tuple[int, ...]], values: list[tuple[int, ...]],
               lead_tokens: int = 0, hop_answer: str = "chain"):
    """Needles (target first) and question ids for one instance. ``lead_tokens`` (2hop): the question's
    first key ends at least this many tokens before the question does (its first sentence repeated)."""
    E = lambda s: list(_enc(tok, s))  # noqa: E731
    bar = E("|")
    if kind == "passkey":
        needles = [E(" |The passkey is:") + list(values[0]) + bar]
        question = E(" |What is the passkey? The passkey is")
    elif kind == "multikey":
        needles = [E(" |One of the special magic numbers for") + list(k) + E(" is") + list(v) + bar
                   for k, v in zip(keys, values)]
        k0 = list(keys[0])
        question = (E(" |What is the special magic number for") + k0 + E("? The special magic number for")
                    + k0 + E(" is"))
    elif kind == "2hop":
        # keys = [X0, Y0, X1, Y1, ...], values = [Z0, Z1, ...]: chain i is Xi -> Yi -> Zi
        needles = []
        for i, z in enumerate(values):
            x, y = keys[2 * i], keys[2 * i + 1]
            needles.append(E(" |The path from") + list(x) + E(" leads to") + list(y) + bar)
            needles.append(E(" |The path from") + list(y) + E(" leads to") + list(z) + bar)
        ask = " lead?" if hop_answer == "chain" else " lead after two steps?"
        question = E(" |Where does the path from") + list(keys[0]) + E(ask + " It leads to")
        if lead_tokens > 0:
            head = E(" |Where does the path from") + list(keys[0]) + E(ask)
            tail = E(" It leads to")
            x_end = len(E(" |Where does the path from")) + len(keys[0])
            reps = max(1, -(-(lead_tokens + x_end - len(tail)) // len(head)))
            question = head * reps + tail  # reps * len(head) + len(tail) - x_end >= lead_tokens
    else:
        raise ValueError(kind)
    return needles, question


def _hop_answers(tok: Tokenizer, keys, values, hop_answer: str) -> list[list[int]]:
    """Each chain's answer, the target's first: ``Y , Z`` (chain) or ``Z`` (end)."""
    if hop_answer == "end":
        return [list(v) for v in values]
    sep = list(_enc(tok, ","))
    return [list(keys[2 * i + 1]) + sep + list(z) for i, z in enumerate(values)]


def answer_length(tokenizer, kind: str, key_len: int = 2, value_len: int = 5, hop_answer: str = "chain") -> int:
    """Tokens of a ``kind`` sample's answer (``value_len``, or for a 2hop chain ``key_len`` + the
    separator + ``value_len``)."""
    kind = canonical_kind(kind)
    if kind == "2hop" and _check_hop_answer(hop_answer) == "chain":
        return int(key_len) + len(_enc(load_tokenizer(tokenizer), ",")) + int(value_len)
    return int(value_len)


def _check_hop_answer(hop_answer: str) -> str:
    if hop_answer not in HOP_ANSWERS:
        raise ValueError(f"hop_answer must be one of {HOP_ANSWERS}, got {hop_answer!r}")
    return hop_answer


def _count(seq: np.ndarray, pat: list[int]) -> int:
    m = len(pat)
    if m == 0 or len(seq) < m:
        return 0
    w = np.lib.stride_tricks.sliding_window_view(seq, m)
    return int((w == np.asarray(pat)).all(axis=1).sum())


def aligned_prompt_len(context_len: int, P: int = P_DEFAULT) -> int:
    """Largest n <= context_len with n % P == 1 (the question's last token opens a chunk)."""
    if context_len < 1:
        raise ValueError("context_len must be >= 1")
    return ((context_len - 1) // P) * P + 1


class _NoRoom(ValueError):
    pass


def _place(lengths: list[int], n_chunks: int, P: int, rng: np.random.Generator,
           depths: list[float | None]) -> list[int]:
    """Start positions for needles of the given lengths, each inside one of chunks [0, n_chunks),
    non-overlapping. ``depths[i]`` (relative position in [0, 1]) fixes needle i's place, else random."""
    occupied: list[list[tuple[int, int]]] = [[] for _ in range(n_chunks)]
    A = n_chunks * P
    starts = []

    def free(c, o, n):
        return all(o + n <= a or b <= o for a, b in occupied[c])

    for n, d in zip(lengths, depths):
        if n > P:
            raise ValueError(f"a needle of {n} tokens cannot fit in one chunk of {P} tokens")
        placed = None
        if d is not None:
            s = int(round(float(d) * max(0, A - n)))
            c, o = min(s // P, n_chunks - 1), s % P
            o = min(o, P - n)  # shift back so the needle stays inside its chunk
            if free(c, o, n):
                placed = (c, o)
        if placed is None:
            for c in rng.permutation(n_chunks):
                opts = [o for o in range(P - n + 1) if free(c, o, n)]
                if opts:
                    placed = (int(c), int(opts[rng.integers(len(opts))]))
                    break
        if placed is None:
            raise _NoRoom("needles do not fit in the chunks before the question")
        c, o = placed
        occupied[c].append((o, o + n))
        starts.append(c * P + o)
    return starts


# ---------------------------------------------------------------- one sample
def make_task_sample(
    kind: str = "passkey",
    *,
    context_len: int,
    seed: int | np.random.Generator = 0,
    tokenizer=None,
    filler=None,
    depth: float | None = None,
    align_question: bool = True,
    text_per_chunk: int = P_DEFAULT,
    n_keys: int = 4,
    n_chains: int = 2,
    key_len: int = 2,
    value_len: int = 5,
    repeat_prob: float = 0.0,
    repeat_frac: float = 0.3,
    repeat_gap: int = P_DEFAULT,
    hop_lead: int = 0,
    hop_answer: str = "chain",
    max_tries: int = 100,
) -> TaskSample:
    """Build one task instance.

    Args:
        kind: ``"passkey"``, ``"multikey"`` or ``"2hop"``.
        context_len: prompt length in tokens; with ``align_question`` the prompt gets
            ``aligned_prompt_len(context_len)`` tokens (<= context_len, ``% P == 1``).
        seed: int seed or a numpy Generator.
        tokenizer: default the filler's tokenizer, else ``"embedded"``.
        filler: None (embedded random words), a prepared folder, a PackedDataset, or an object
            with ``tokens(n, rng)``.
        depth: relative position of the (first) target needle in [0, 1] over the chunks before
            the question; None = uniform random.
        align_question: see the module docstring.
        text_per_chunk: P, user tokens per chunk (``cfg.text_per_chunk``).
        n_keys: multikey needles (1 target + n_keys - 1 distractors).
        n_chains: 2hop chains (1 target + n_chains - 1 distractor chains), 2 needles each.
        key_len / value_len: tokens per key (words) / per value (digits).
        repeat_prob: probability that the filler repeats pieces of itself (see ``repeat_mask``).
        repeat_frac: fraction of the filler overwritten by repeats when it does.
        repeat_gap: a repeated piece starts at least ``repeat_gap + its length`` tokens after its
            source. Beyond the sliding window (e.g. 130 for a window of 128), the copy can only be
            made through retrieval and GCA, which trains exactly what the needle tasks need.
        hop_lead: 2hop only (other kinds ignore it): ask the question's first sentence (``|Where
            does the path from X lead?``; ``... lead after two steps?`` for the end point) as many
            times as it takes for its first X to end at least ``hop_lead`` whole chunks before the
            answer's chunk. Retrieval is made
            once per chunk, at its landmark, for the next chunk, and the second group's query sees
            what the first group retrieved for the *current* chunk; with the default single
            question (inside the last chunk) the Y -> Z needle can only be found by retrieving it
            together with X -> Y at the same landmark. With ``hop_lead=1`` the first group can
            fetch X -> Y one landmark earlier and the second group then looks for Y -> Z.
        hop_answer: 2hop only: ``"chain"`` (default; the paper's task's form) asks
            for the chain, answer ``Y , Z``: the model names the first hop and then the second,
            each a one-key lookup; ``"end"`` asks for the end point Z alone ("after two steps"),
            which needs both lookups composed before the first answer token.
    Raises:
        ValueError if the needles and question cannot fit in ``context_len``.
    """
    kind = canonical_kind(kind)
    _check_hop_answer(hop_answer)
    check_counts("make_task_sample", key_len=key_len, value_len=value_len, text_per_chunk=text_per_chunk)
    if depth is not None and not 0 <= float(depth) <= 1:
        raise ValueError(f"depth is a relative position in [0, 1], got {depth}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if isinstance(filler, (str, os.PathLike)) and filler not in ("words", "embedded"):
        filler = make_filler(filler)
    if tokenizer is None:
        tokenizer = getattr(filler, "tokenizer", None) or "embedded"
    tok = load_tokenizer(tokenizer)
    fill = make_filler(filler, tok)
    _check_same_vocab(tok, fill)
    words, digits, _ = _vocab_info(tok)
    P = int(text_per_chunk)
    L = aligned_prompt_len(context_len, P) if align_question else int(context_len)
    n_needle_sets = {"passkey": 1, "multikey": max(1, n_keys), "2hop": max(1, n_chains)}[kind]
    # every key and every value distinct: ask for no more than exist (else the draw never ends)
    n_values, n_keys_all = n_needle_sets, {"passkey": 0, "multikey": n_needle_sets, "2hop": 2 * n_needle_sets}[kind]
    if n_values > 10 ** value_len:
        raise ValueError(f"{kind}: {n_values} distinct values of value_len={value_len} digits are asked for, and only "
                         f"{10 ** value_len} exist; use a larger value_len or fewer {'chains' if kind == '2hop' else 'keys'}")
    if n_keys_all > len(words) ** key_len:
        raise ValueError(f"{kind}: {n_keys_all} distinct keys of key_len={key_len} words are asked for, and the "
                         f"tokenizer has {len(words) ** key_len}; use a larger key_len")

    for _ in range(max_tries):
        n_vals = n_needle_sets
        n_keys_needed = {"passkey": 0, "multikey": n_vals, "2hop": 2 * n_vals}[kind]
        keys = _distinct(rng, words, key_len, n_keys_needed)
        values = _distinct(rng, digits, value_len, n_vals)
        needles, question = _templates(tok, kind, keys, values, hop_lead * P + 1 if kind == "2hop" else 0,
                                       hop_answer=hop_answer)
        q = len(question)
        n_chunks = (L - q) // P  # chunks strictly before the first question token
        n_targets = 2 if kind == "2hop" else 1
        if n_chunks < 1:  # the shortest that works: a whole chunk before the question (aligned: % P == 1)
            need = q + P + ((1 - q - P) % P if align_question else 0)
            raise ValueError(f"context_len {context_len} leaves no whole chunk before the {kind} question "
                             f"({q} tokens); use at least {need}")
        depths = [float(depth) if depth is not None else float(rng.random())] + [None] * (len(needles) - 1)
        if kind == "2hop":  # the Y->Z needle at a random place of its own
            depths[1] = float(rng.random())
        try:
            starts = _place([len(n) for n in needles], n_chunks, P, rng, depths)
        except _NoRoom:
            if n_needle_sets > 1:  # drop a distractor and retry
                n_needle_sets -= 1
                continue
            raise ValueError(f"the {kind} needles do not fit in {n_chunks} chunk(s) before the question; "
                             f"use a longer context_len") from None
        n_fill = L - q - sum(len(n) for n in needles)
        base = fill.tokens(n_fill, rng)
        rep = np.zeros(n_fill, dtype=bool)
        if repeat_prob > 0 and rng.random() < repeat_prob:
            base, rep = _with_repeats(base, rng, frac=repeat_frac, min_dist=int(repeat_gap))
        ids = np.empty(L, dtype=np.int64)
        rmask = np.zeros(L, dtype=bool)
        order = np.argsort(starts, kind="stable")
        pos = fpos = 0
        spans = [None] * len(needles)
        for i in order:
            s, nd = starts[i], needles[i]
            gap = s - pos
            ids[pos:s] = base[fpos:fpos + gap]
            rmask[pos:s] = rep[fpos:fpos + gap]
            fpos += gap
            ids[s:s + len(nd)] = nd
            spans[i] = (s, s + len(nd))
            pos = s + len(nd)
        rest = L - q - pos
        ids[pos:pos + rest] = base[fpos:fpos + rest]
        rmask[pos:pos + rest] = rep[fpos:fpos + rest]
        ids[L - q:] = question
        answers = _hop_answers(tok, keys, values, hop_answer) if kind == "2hop" else [list(v) for v in values]
        answer = answers[0]
        # the value asked for must occur once in the prompt (inside its needle), each needle exactly once
        if _count(ids, list(values[0])) != 1 or any(_count(ids, nd) != 1 for nd in needles):
            continue
        full = ids.tolist() + answer
        return TaskSample(
            input_ids=full,
            prompt_len=L,
            answer=answer,
            needle_spans=[tuple(map(int, sp)) for sp in spans],
            target_chunks=[spans[i][0] // P for i in range(n_targets)],
            kind=kind,
            text_per_chunk=P,
            aligned=bool(align_question),
            depth=float(depths[0]),
            repeat_mask=rmask.tolist() + [False] * len(answer),
            question_len=q,
            distractor_answers=[list(map(int, a)) for a in answers[1:]],
            first_hop_len=key_len if kind == "2hop" and hop_answer == "chain" else 0,
        )
    raise RuntimeError(f"could not build a {kind} sample without accidental repeats in {max_tries} tries")


def _distinct(rng: np.random.Generator, alphabet: np.ndarray, length: int, count: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    seen = set()
    while len(out) < count:
        t = tuple(int(x) for x in alphabet[rng.integers(0, len(alphabet), size=length)])
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


# ---------------------------------------------------------------- training / eval batches
class TaskSource(BatchSource):
    """Batches of task samples for training or evaluation.

    Args:
        kind: a task name, ``"mix"`` (passkey 0.5, multikey 0.3, 2hop 0.2), or a dict of weights.
        seq_len: L, the row length of every batch.
        min_len: None = every sample fills L (prompt aligned so that the answer fits, then
            trailing filler). Else each sample's length T is ``min(L, n*P)`` with n uniform in
            ``[ceil(min_len/P), ceil(L/P)]`` (e.g. 3 to 8 chunks); positions past T are padding
            (the EOS id, label -100).
        filler: None (embedded words) or a prepared folder / PackedDataset (its ``split`` is used).
        seed: base seed; ``split="val"`` draws from a different stream.
        loss_on: ``"answer"`` (labels only on the answer tokens), ``"all"`` (every real token),
            ``"answer_repeats"`` (the answer and the repeated filler pieces).
        repeat_prob / repeat_frac: filler that repeats pieces of itself, see :func:`make_task_sample`.
        digit_frac: runs of random digits in the filler (about this fraction of its tokens);
            training only: they give the copy circuit digit strings to practise on.
        digit_repeat: each digit of such a run repeats the one before it with this probability
            (runs of equal digits to practise copying; 0: independent digits).
        edge_prob: the probability that a sample's first target needle starts at the sample's first
            token (depth 0; otherwise its depth is uniform, and token 0 is drawn about once in 4000
            samples of 4032 tokens). The first token of a sequence has no context before it; a
            model that never saw a needle there may retrieve it there and still misread it. Drawn
            from a stream of its own, so the samples with the needle elsewhere are those of
            ``edge_prob=0``.
        tokenizer: default the filler's tokenizer, else ``"embedded"``.
        **task_kwargs: passed to :func:`make_task_sample` (n_keys, n_chains, key_len, value_len,
            align_question, text_per_chunk, depth, hop_lead, hop_answer).
    ``get_batch`` returns ``input_ids`` and ``labels`` ``(B, L)`` long; labels equal input_ids where
    a loss is wanted and -100 elsewhere (the model shifts them).
    """

    def __init__(self, kind="passkey", seq_len: int = 504, *, min_len: int | None = None, filler=None,
                 seed: int = 0, split: str = "train", loss_on: str = "answer", repeat_prob: float = 0.0,
                 repeat_frac: float = 0.3, tokenizer=None, digit_frac: float = 0.0, digit_repeat: float = 0.0,
                 edge_prob: float = 0.0, **task_kwargs):
        if isinstance(kind, str):
            weights = dict(DEFAULT_MIX) if kind == "mix" else {canonical_kind(kind): 1.0}
        elif isinstance(kind, Mapping):
            weights = {canonical_kind(k): float(v) for k, v in kind.items()}
        else:
            raise TypeError("kind must be a task name, 'mix' or a dict of weights")
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"task weights must be non-negative with a positive sum, got {weights}")
        if loss_on not in LOSS_MODES:
            raise ValueError(f"loss_on must be one of {LOSS_MODES}, got {loss_on!r}")
        self.filler = make_filler(filler, tokenizer, split, digit_frac=digit_frac, digit_repeat=digit_repeat)
        tok = load_tokenizer(tokenizer if tokenizer is not None else getattr(self.filler, "tokenizer", "embedded"))
        _check_same_vocab(tok, self.filler)
        super().__init__(seq_len=seq_len, seed=seed, split=split, tokenizer=tok)
        self.weights = weights
        self._kinds = list(weights)
        w = np.asarray([weights[k] for k in self._kinds], dtype=np.float64)
        self._p = w / w.sum()
        self.P = int(task_kwargs.get("text_per_chunk", P_DEFAULT))
        self.min_len = None if min_len is None else int(min_len)
        if self.min_len is not None and not 0 < self.min_len <= seq_len:
            raise ValueError(f"min_len must be in [1, seq_len={seq_len}], got {min_len}")
        self.loss_on = loss_on
        self.repeat_prob, self.repeat_frac = float(repeat_prob), float(repeat_frac)
        self.edge_prob = float(edge_prob)
        if not 0.0 <= self.edge_prob <= 1.0:
            raise ValueError(f"edge_prob is a probability in [0, 1], got {edge_prob}")
        if self.edge_prob > 0 and task_kwargs.get("depth") is not None:
            raise ValueError(f"edge_prob={edge_prob} moves some needles to depth 0 and depth={task_kwargs['depth']} "
                             f"fixes every needle's depth: give one of the two")
        self.task_kwargs = task_kwargs
        self.pad_id = tok.eos_id if tok.eos_id is not None else 0
        shortest = self.min_len or seq_len
        self._answer_len = {k: answer_length(tok, k, task_kwargs.get("key_len", 2), task_kwargs.get("value_len", 5),
                                             task_kwargs.get("hop_answer", "chain")) for k in self._kinds}
        longest_answer = max(self._answer_len.values())
        if shortest < 2 * self.P + 1 + longest_answer:
            raise ValueError(f"samples of {shortest} tokens are too short: a task needs a needle chunk, a "
                             f"question chunk and the answer, >= {2 * self.P + 1 + longest_answer} "
                             f"tokens with P={self.P}")
        # make_task_sample drops distractor needles that do not fit before the question: say so once here
        for kind, want in (("multikey", task_kwargs.get("n_keys", 4)), ("2hop", task_kwargs.get("n_chains", 2))):
            if kind not in weights or want <= 1:
                continue
            ctx = shortest - self._answer_len[kind]
            got = [len(make_task_sample(kind, context_len=ctx, seed=np.random.default_rng(i), tokenizer=self.tokenizer,
                                        filler=self.filler, **task_kwargs).distractor_answers) + 1 for i in range(4)]
            if min(got) < want:
                warnings.warn(f"{kind} samples of {shortest} tokens hold only {min(got)}-{max(got)} of the {want} "
                              f"{'keys' if kind == 'multikey' else 'chains'} asked for: the distractors that do not "
                              f"fit before the question are dropped; use longer samples", stacklevel=2)

    def sample_task(self, gid: int) -> tuple[TaskSample, int]:
        """The task sample of global sample id ``gid`` and its real length T (<= seq_len)."""
        rng = rng_for(self.seed, self.split, "task", gid)
        kind = self._kinds[int(rng.choice(len(self._kinds), p=self._p))] if len(self._kinds) > 1 else self._kinds[0]
        L, P = self.seq_len, self.P
        if self.min_len is None:
            T = L
        else:
            lo, hi = -(-self.min_len // P), -(-L // P)
            T = min(L, int(rng.integers(lo, hi + 1)) * P)
        a = self._answer_len[kind]
        align = self.task_kwargs.get("align_question", True)
        ctx = T - a
        kwargs = dict(self.task_kwargs)
        if self.edge_prob > 0 and rng_for(self.seed, self.split, "edge", gid).random() < self.edge_prob:
            kwargs["depth"] = 0.0
        s = make_task_sample(kind, context_len=ctx, seed=rng, tokenizer=self.tokenizer, filler=self.filler,
                             repeat_prob=self.repeat_prob, repeat_frac=self.repeat_frac, **kwargs)
        if not align:
            assert s.prompt_len == ctx
        return s, T

    def sample(self, gid: int) -> tuple[np.ndarray, np.ndarray]:
        s, T = self.sample_task(gid)
        L = self.seq_len
        n = len(s.input_ids)
        ids = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, -100, dtype=np.int64)
        ids[:n] = s.input_ids
        rep = np.zeros(L, dtype=bool)
        rep[:n] = s.repeat_mask
        if T > n:  # trailing filler after the answer, up to the sample's length
            rng = rng_for(self.seed, self.split, "tail", gid)
            ids[n:T] = self.filler.tokens(T - n, rng)
        a0, a1 = s.prompt_len, s.prompt_len + len(s.answer)
        if self.loss_on == "all":
            labels[:T] = ids[:T]
        else:
            labels[a0:a1] = ids[a0:a1]
            if self.loss_on == "answer_repeats":
                labels[rep] = ids[rep]
        return ids, labels

    def describe(self) -> dict:
        return {**super().describe(), "kind": self.weights, "min_len": self.min_len, "loss_on": self.loss_on,
                "repeat_prob": self.repeat_prob, "filler": self.filler.describe(), **self.task_kwargs,
                **({"edge_prob": self.edge_prob} if self.edge_prob else {})}
