"""Tokenizers: train a byte-level BPE, load one from a file, a folder or a Hugging Face name.

    tok = train_bpe(["corpus/"], vocab_size=8192, out_path="tok/tokenizer.json")
    tok = load_tokenizer("tok/")              # a folder holding tokenizer.json, or the file itself
    tok = load_tokenizer("embedded")          # the 2048-token BPE shipped in gca/data/assets/
    tok = load_tokenizer("gpt2")              # via transformers.AutoTokenizer (needs the hub or its cache)
    ids = tok.encode("The passkey is: 7")     # list[int]
    tok.decode(ids); tok.vocab_size; tok.eos_id; tok.save("out/tokenizer.json")

Every tokenizer is wrapped in :class:`Tokenizer`, which gives the rest of the package one small
interface whatever the backend (HF ``tokenizers`` or a ``transformers`` tokenizer).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Iterable, Iterator

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|end_of_text|>")
DEFAULT_SPECIAL = ("<|endoftext|>",)
ASSETS = Path(__file__).parent / "assets"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer-2048.json"
EMBEDDED_NAMES = ("embedded", "embedded-2048")


class Tokenizer:
    """A thin wrapper with one interface over HF ``tokenizers`` and ``transformers`` tokenizers.

    Attributes:
        name: how it was loaded (a path, ``"embedded"`` or a hub name); stored in dataset metadata.
        vocab_size: number of ids, special tokens included; every id is in ``[0, vocab_size)``.
        eos_id: the document separator id (``<|endoftext|>``, ``</s>``, ...), or None if it has none.
    """

    def __init__(self, backend, name: str = "tokenizer"):
        self._hf = None  # transformers tokenizer, when that is the backend
        if hasattr(backend, "encode_batch") and hasattr(backend, "to_str"):
            self._tok = backend  # tokenizers.Tokenizer
        elif hasattr(backend, "backend_tokenizer") or hasattr(backend, "convert_ids_to_tokens"):
            self._hf = backend
            self._tok = getattr(backend, "backend_tokenizer", None)
        else:
            raise TypeError(f"Tokenizer wraps a tokenizers.Tokenizer or a transformers tokenizer, got {type(backend)}")
        self.name = str(name)

    # ---- interface ----
    def encode(self, text: str) -> list[int]:
        """Text -> ids, without special tokens (no BOS/EOS is added)."""
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False))
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (parallel in the Rust backend)."""
        if self._tok is not None:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return len(self._hf)
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        if self._hf is not None and getattr(self._hf, "eos_token_id", None) is not None:
            return int(self._hf.eos_token_id)
        for t in EOS_CANDIDATES:
            i = self.token_to_id(t)
            if i is not None:
                return i
        return None

    def token_to_id(self, token: str) -> int | None:
        if self._tok is not None:
            return self._tok.token_to_id(token)
        i = self._hf.convert_tokens_to_ids(token)
        return None if i is None or i == getattr(self._hf, "unk_token_id", -1) else int(i)

    def id_to_str(self, i: int) -> str:
        """The text of one id as it decodes alone (``" the"``, ``" 7"``)."""
        return self.decode([i])

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (HF ``tokenizers`` format)."""
        if self._tok is None:
            raise ValueError(f"tokenizer {self.name!r} has no tokenizers backend to serialise")
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a ``.json`` file, or a folder that gets one)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _iter_texts(files_or_iterator, text_field: str = "text") -> Iterator[str]:
    """Texts from paths (files or folders, via gca.data.sources) or from an iterable of strings."""
    from gca.data.sources import iter_documents

    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    items = iter(files_or_iterator)
    for item in items:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_source(item)):
            yield from iter_documents(item, text_field=text_field)
        elif isinstance(item, str):
            if item and not any(c.isspace() for c in item):
                # one "word" that is no existing path: almost surely a mistyped path, not training text
                raise FileNotFoundError(f"no such file, folder or source: {item!r}")
            yield item
        else:
            raise TypeError(f"train_bpe expects paths or strings, got {type(item).__name__}")


def _looks_like_source(s: str) -> bool:
    from gca.data.sources import is_source_spec

    return "\n" not in s and len(s) < 4096 and is_source_spec(s)


def train_bpe(
    files_or_iterator,
    vocab_size: int,
    out_path: str | os.PathLike | None = None,
    *,
    special_tokens: Iterable[str] = DEFAULT_SPECIAL,
    min_frequency: int = 2,
    name: str | None = None,
    show_progress: bool = True,
    text_field: str = "text",
    max_documents: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: any byte sequence encodes, no unknown token).

    Args:
        files_or_iterator: source specs understood by :func:`gca.data.sources.iter_documents`
            (files, folders, ``debian-docs``, ``hf:NAME``) and/or an iterable of text strings.
        vocab_size: final size, the 256 byte symbols and ``special_tokens`` included.
        out_path: where to write ``tokenizer.json`` (a ``.json`` path or a folder); None = don't save.
        special_tokens: added first, so ``<|endoftext|>`` gets id 0 by default (the document separator).
        min_frequency: minimum pair count for a merge.
        text_field: the JSONL / parquet / HF field with the text (as :func:`gca.data.prepare.prepare`'s).
        max_documents: train on the first this many documents only (as ``prepare``'s, so that
            ``gca prepare --max-documents N --train-tokenizer`` reads N documents, not the whole corpus).
    Returns:
        the trained :class:`Tokenizer` (named after ``out_path`` when saved, else ``bpe-N`` with N
        its real size: a small corpus may give fewer than ``vocab_size`` ids, with a warning).
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if max_documents is not None:
        from gca.config import check_counts

        check_counts("train_bpe", max_documents=max_documents)
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size (gca prepare --vocab-size) must be >= {256 + len(special_tokens)} (256 bytes + "
                         f"{len(special_tokens)} special tokens), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = [0]

    def counted():
        for t in _iter_texts(files_or_iterator, text_field):
            if t:
                seen[0] += 1
                yield t
                if max_documents is not None and seen[0] >= max_documents:
                    return  # (before the next document is read, as prepare() stops)

    tok.train_from_iterator(counted(), trainer)
    if seen[0] == 0:
        raise ValueError("train_bpe: no text to train on (the inputs were empty)")
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        # too little text for that many merges: the name says the real size, and the user hears of it
        warnings.warn(f"train_bpe: the texts yield only {got} tokens (merges of pairs seen >= {min_frequency} times), "
                      f"fewer than the vocab_size={vocab_size} asked for (gca prepare --vocab-size); the tokenizer "
                      f"has {got} ids, more text gives more", stacklevel=2)
    out = Tokenizer(tok, name=name or (str(out_path) if out_path else f"bpe-{got}"))
    if out_path is not None:
        saved = out.save(out_path)
        out.name = name or str(saved)
    return out


def load_tokenizer(name_or_path) -> Tokenizer:
    """Load a tokenizer.

    Args:
        name_or_path: a :class:`Tokenizer` (returned as is); ``"embedded"`` (the 2048-token
            byte-level BPE in ``gca/data/assets/``); a ``tokenizer.json`` file; a folder holding
            ``tokenizer.json`` (a prepared dataset folder works too); or a Hugging Face name such
            as ``"gpt2"``, loaded with ``transformers.AutoTokenizer`` (from its local cache when
            offline).
    Raises:
        FileNotFoundError with what to do when nothing can be loaded.
    """
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    if name_or_path is None:
        name_or_path = "embedded"
    if not isinstance(name_or_path, (str, os.PathLike)):
        return Tokenizer(name_or_path, name=type(name_or_path).__name__)  # a raw backend object
    from tokenizers import Tokenizer as HFTokenizer

    s = str(name_or_path)
    if s in EMBEDDED_NAMES:
        if not EMBEDDED_TOKENIZER.exists():
            raise FileNotFoundError(f"the embedded tokenizer {EMBEDDED_TOKENIZER} is missing from the package")
        return Tokenizer(HFTokenizer.from_file(str(EMBEDDED_TOKENIZER)), name="embedded")
    p = Path(s).expanduser()
    if p.is_dir():
        f = p / "tokenizer.json"
        if not f.exists():
            raise FileNotFoundError(f"{p} is a folder without tokenizer.json")
        return Tokenizer(_from_file(f), name=_name_from_meta(p) or str(f))
    if p.is_file():
        return Tokenizer(_from_file(p), name=str(p))
    if s.endswith(".json") or s.startswith((".", "/", "~")) or p.is_absolute():
        raise FileNotFoundError(f"tokenizer file or folder not found: {s}")
    return _load_hf(s)


def _from_file(path: Path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json; ValueError naming the file when it is not one
    (tokenizers raises a bare Exception)."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"{path} is not a tokenizers JSON file: {e}") from e


def _name_from_meta(folder: Path) -> str | None:
    """A prepared dataset folder remembers the tokenizer's original name in meta.json."""
    m = folder / "meta.json"
    if m.exists():
        try:
            return json.loads(m.read_text())["tokenizer"]["name"]
        except (KeyError, ValueError, TypeError):
            return None
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers at all, asked once with a short timeout
    (through the environment's proxies), so that an offline machine does not sit through the hub
    client's retries of every file; False under ``HF_HUB_OFFLINE=1``."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered, if not with 200
    except Exception:  # noqa: BLE001 - no route, no name, refused, timed out
        return False
    return True


def _first_line(e: BaseException) -> str:
    """An exception's first non-empty line: transformers' errors run to several lines, and gca's errors are one."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def _load_hf(name: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    errors = []
    online = _hub_reachable()
    if AutoTokenizer is not None:
        try:  # offline: the local cache only
            return Tokenizer(AutoTokenizer.from_pretrained(name, local_files_only=not online), name=name)
        except Exception as e:  # noqa: BLE001
            errors.append(f"transformers: {type(e).__name__}: {_first_line(e)}")
    else:
        errors.append("transformers is not installed (pip install -e '.[hf]' in the gca checkout, "
                      "or pip install 'transformers>=4.50')")
    if online:
        try:
            from tokenizers import Tokenizer as HFTokenizer

            return Tokenizer(HFTokenizer.from_pretrained(name), name=name)
        except Exception as e:  # noqa: BLE001
            errors.append(f"tokenizers.from_pretrained: {type(e).__name__}: {_first_line(e)[:200]}")
    raise FileNotFoundError(
        f"cannot load tokenizer {name!r}: it is not a local file or folder, and the Hugging Face hub "
        f"could not provide it{'' if online else ' (it cannot be reached: offline?)'}. Use 'embedded', a "
        f"tokenizer.json path, or `gca prepare --train-tokenizer`. " + " | ".join(errors)
    )


def build_embedded_tokenizer(out_path: str | os.PathLike = EMBEDDED_TOKENIZER, vocab_size: int = 2048,
                             every: int = 3) -> Tokenizer:
    """Rebuild the shipped ``assets/tokenizer-2048.json``: a byte-level BPE trained on every
    ``every``-th file of the offline corpus (``debian-docs``, which must be installed).

        python -c "from gca.data.tokenizer import build_embedded_tokenizer as b; b()"
    """
    from gca.data.sources import iter_file_documents, offline_corpus_files

    import random

    files = offline_corpus_files()[::every]
    rng = random.Random(0)
    # spaced digits, so that " 0" ... " 9" become single tokens (the tasks' answer alphabet)
    digits = [" ".join(str(rng.randrange(10)) for _ in range(20)) for _ in range(2000)]
    texts = (t for src in (digits, (t for f in files for t in iter_file_documents(f))) for t in src)
    tok = train_bpe(texts, vocab_size, out_path, name="embedded")
    return tok
