"""Tokenise text sources into a memory-mapped dataset, and read it back.

    meta = prepare(["debian-docs"], "data/debian", tokenizer="embedded", val_fraction=0.02)
    ds = PackedDataset("data/debian", "val")
    len(ds), ds.vocab_size, ds.tokenizer, ds.num_documents, ds.document(0)

Layout of a prepared folder::

    train.bin, val.bin          the token stream of each split, np.uint16 if vocab_size <= 65536 else
                                np.uint32; every document is followed by the separator id (EOS)
    train.idx.npy, val.idx.npy  int64 start offset of each document in the stream
    tokenizer.json              a copy of the tokenizer (so the folder is self-contained)
    meta.json                   tokenizer name, vocab size, dtype, token and document counts,
                                sha256 of each split's bytes and of both ("content_hash"), sources,
                                val_fraction, seed, creation date

The split is by document: a document goes to validation when a hash of (seed, its text) falls below
``val_fraction``, so the split is deterministic, independent of the order of the sources, and puts
exact duplicates on one side. At least one document goes to each split when there are two or more
(one document leaves a split empty: prepare warns).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from gca.config import check_counts
from gca.data.sources import describe_source, iter_documents
from gca.data.tokenizer import Tokenizer, load_tokenizer

FORMAT = "gca-packed-v1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """np.uint16 when every id fits (vocab_size <= 65536), else np.uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _is_val(text: str, seed: int, val_fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64 < val_fraction


class _SplitWriter:
    """Appends documents (+ separator) to ``NAME.bin.tmp``, hashing the bytes as they are written."""

    def __init__(self, path: Path, dtype: np.dtype, sep: int):
        self.path, self.dtype, self.sep = path, dtype, sep
        self.f = open(path.with_suffix(".bin.tmp"), "wb")
        self.offsets: list[int] = []
        self.n = 0
        self.last: np.ndarray | None = None  # the last document, kept to rebalance a tiny split

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids + [self.sep], dtype=self.dtype)
        self.offsets.append(self.n)
        self.f.write(arr.tobytes())
        self.n += len(arr)
        self.last = arr

    def pop_last(self) -> np.ndarray:
        """Remove the last document (used only to give an empty split one document)."""
        arr = self.last
        self.n -= len(arr)
        self.offsets.pop()
        self.f.flush()
        self.f.truncate(self.n * self.dtype.itemsize)
        self.f.seek(self.n * self.dtype.itemsize)
        self.last = None
        return arr

    def add_array(self, arr: np.ndarray) -> None:
        self.offsets.append(self.n)
        self.f.write(arr.tobytes())
        self.n += len(arr)

    def finish(self) -> dict:
        self.f.close()
        tmp = self.path.with_suffix(".bin.tmp")
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        os.replace(tmp, self.path)
        np.save(self.path.with_suffix(".idx.npy"), np.asarray(self.offsets, dtype=np.int64))
        return {"tokens": self.n, "documents": len(self.offsets), "sha256": h.hexdigest()}


def _warn_empty_split(stats: dict, val_fraction: float) -> None:
    """Say at prepare time what `gca train` would otherwise find out later: a split holds nothing
    (a single document goes whole to one side). val_fraction=0 asks for no validation: no warning."""
    docs = sum(v["documents"] for v in stats.values())
    if val_fraction > 0 and stats["val"]["tokens"] == 0:
        warnings.warn(f"prepare: the val split is empty: the sources hold {docs} document(s) and validation holds out "
                      f"whole documents; give more documents (a long text split into several files), or train without "
                      f"validation (gca train --eval-every 0) and prepare with val_fraction=0 (--val-fraction 0) to "
                      f"say so", stacklevel=3)
    elif stats["train"]["tokens"] == 0:
        warnings.warn(f"prepare: the train split is empty: the sources hold {docs} document(s), all held out for "
                      f"validation; give more documents or a smaller val_fraction (gca prepare --val-fraction)",
                      stacklevel=3)


def prepare(
    sources: str | Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer="embedded",
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    text_field: str = "text",
    max_documents: int | None = None,
    separator_id: int | None = None,
    batch_chars: int = 4_000_000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise ``sources`` into ``out_dir`` (see the module docstring for the layout).

    Args:
        sources: one source spec or a list (see :mod:`gca.data.sources`): files, folders,
            ``debian-docs``, ``hf:NAME``.
        out_dir: output folder (created).
        tokenizer: anything :func:`load_tokenizer` accepts (default ``"embedded"``, 2048 ids).
        val_fraction: expected fraction of documents held out for validation, in [0, 1).
        seed: changes which documents are held out.
        text_field: JSONL / parquet / HF field with the text.
        max_documents: stop after this many documents (quick experiments).
        separator_id: id written after every document; default the tokenizer's EOS.
        batch_chars: documents are tokenised in batches of about this many characters.
        overwrite: replace an existing prepared dataset in ``out_dir``.
    Returns:
        the meta dict also written to ``out_dir/meta.json``.
    Raises:
        FileNotFoundError for missing sources, ValueError when the sources hold no text.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    if not sources:
        raise ValueError("prepare: no sources given")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction (gca prepare --val-fraction) must be in [0, 1), got {val_fraction}")
    if max_documents is not None:
        check_counts("prepare", max_documents=max_documents)
    tok = load_tokenizer(tokenizer)
    sep = tok.eos_id if separator_id is None else int(separator_id)
    if sep is None:
        raise ValueError(f"tokenizer {tok.name!r} has no EOS token to separate documents; use one that has (gca "
                         f"prepare --tokenizer) or pass prepare(..., separator_id=ID)")
    if not 0 <= sep < tok.vocab_size:
        raise ValueError(f"separator_id {sep} is outside the vocabulary [0, {tok.vocab_size})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"the output folder {out} exists and is a file; choose another (gca prepare --out)")
    if (out / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a prepared dataset; pass overwrite=True (gca prepare --overwrite) "
                              f"to replace it, or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    # check every source before the long tokenisation starts (missing paths fail fast)
    from gca.data.sources import source_files, split_spec

    for s in sources:
        if not split_spec(s)[0].startswith("hf:"):
            source_files(s)

    writers = {name: _SplitWriter(out / f"{name}.bin", dtype, sep) for name in SPLITS}
    n_docs = 0
    bar = None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"tokenising -> {out}", unit="doc", disable=not progress)
        batch: list[str] = []
        chars = 0

        def flush():
            nonlocal chars
            for text, ids in zip(batch, tok.encode_batch(batch)):
                if ids:
                    writers["val" if _is_val(text, seed, val_fraction) else "train"].add(ids)
            bar.update(len(batch))
            bar.set_postfix(tokens=writers["train"].n + writers["val"].n)
            batch.clear()
            chars = 0

        done = False
        for s in sources:
            for text in iter_documents(s, text_field=text_field):
                batch.append(text)
                chars += len(text)
                n_docs += 1
                if chars >= batch_chars:
                    flush()
                if max_documents is not None and n_docs >= max_documents:
                    done = True
                    break
            if done:
                break
        if batch:
            flush()
        bar.close()
        tr, va = writers["train"], writers["val"]
        if tr.n == 0 and va.n == 0:
            raise ValueError(f"prepare: the sources {sources} hold no text (all files empty?)")
        # tiny corpora: make sure both splits are usable when there are >= 2 documents
        if val_fraction > 0 and not va.offsets and len(tr.offsets) >= 2:
            va.add_array(tr.pop_last())
        elif not tr.offsets and len(va.offsets) >= 2:
            tr.add_array(va.pop_last())
        # an --overwrite's old meta.json goes before its .bin files are replaced: a crash from here until the
        # new one is written leaves a folder that is refused as unprepared, never old counts over new tokens
        (out / "meta.json").unlink(missing_ok=True)
        stats = {name: w.finish() for name, w in writers.items()}
    except BaseException:
        if bar is not None:
            bar.close()  # ends its line, so an error message starts on its own
        for w in writers.values():
            if not w.f.closed:
                w.f.close()
            w.path.with_suffix(".bin.tmp").unlink(missing_ok=True)
        raise

    _warn_empty_split(stats, val_fraction)

    content = hashlib.sha256((stats["train"]["sha256"] + stats["val"]["sha256"]).encode()).hexdigest()
    tok_file = tok.save(out / "tokenizer.json") if tok._tok is not None else None
    from gca import __version__

    meta = {
        "format": FORMAT,
        "tokenizer": {
            "name": tok.name,
            "file": tok_file.name if tok_file else None,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "separator_id": sep,
        "splits": stats,
        "tokens": {k: v["tokens"] for k, v in stats.items()},
        "documents": {k: v["documents"] for k, v in stats.items()},
        "content_hash": content,
        "sources": [describe_source(s) for s in sources],
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "max_documents": max_documents,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gca_version": __version__,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")  # whole or not there
    return meta


def content_hash(folder: str | os.PathLike) -> str:
    """Recompute the content hash of a prepared folder from its .bin files (matches meta.json)."""
    hs = []
    for name in SPLITS:
        h = hashlib.sha256()
        with open(Path(folder) / f"{name}.bin", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        hs.append(h.hexdigest())
    return hashlib.sha256("".join(hs).encode()).hexdigest()


class PackedDataset:
    """One split of a prepared folder, memory-mapped.

    Args:
        path: the folder written by :func:`prepare`.
        split: ``"train"`` or ``"val"``.
    Attributes:
        tokens: ``(N,)`` read-only np.memmap of ids (uint16/uint32).
        meta: the parsed meta.json.
    ``len(ds)`` is N, the number of tokens. Random training windows come from
    :class:`gca.data.batches.PackedSource` (``build_source(path, ...)``).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{self.path} is not a prepared dataset (no meta.json); make one with `gca prepare`")
        redo = f"prepare it again (gca prepare ... --out {self.path} --overwrite)"
        try:
            self.meta = json.loads(meta_file.read_text())
            self.dtype = np.dtype(self.meta["dtype"])
            n = int(self.meta["tokens"][split])
            vocab, sep = int(self.meta["vocab_size"]), int(self.meta["separator_id"])  # (read by the properties below)
            # a dtype or separator prepare never writes would read every id wrong, silently
            if self.dtype != token_dtype(vocab) or not 0 <= sep < vocab:
                raise ValueError(f"dtype {self.dtype.name} and separator_id {sep} do not go with vocab_size {vocab}")
        except (ValueError, KeyError, TypeError) as e:
            what = f"lacks {e}" if isinstance(e, KeyError) else f"is not valid ({e})"
            raise ValueError(f"{meta_file} {what}: the folder is not a complete prepared dataset; {redo}") from None
        self.split = split
        if n == 0:
            docs, other = sum(self.meta.get("documents", {}).values()), [s for s in SPLITS if s != split][0]
            raise ValueError(f"{self.path}: split {split!r} is empty (0 tokens; all {docs} document(s) went to "
                             f"{other!r}, documents are not cut); prepare it again with more documents or another val_fraction "
                             f"(gca prepare --val-fraction)" + ("; or train without validation (gca train "
                             f"--eval-every 0)" if split == "val" else ""))
        bin_file = self.path / f"{split}.bin"
        if not bin_file.is_file():
            raise FileNotFoundError(f"{bin_file} is missing: the folder is not a complete prepared dataset; {redo}")
        if bin_file.stat().st_size != n * self.dtype.itemsize:
            raise ValueError(f"{bin_file} has {bin_file.stat().st_size} bytes, meta.json says {n} {self.dtype.name} "
                             f"tokens ({n * self.dtype.itemsize} bytes): the file is truncated or from another "
                             f"preparation; {redo}")
        self.tokens = np.memmap(bin_file, dtype=self.dtype, mode="r", shape=(n,))
        self._tokenizer: Tokenizer | None = None
        idx = self.path / f"{split}.idx.npy"
        if not idx.exists():  # no index: one document (evaluation's document_lengths then reports none)
            self.doc_offsets = np.zeros(1, dtype=np.int64)
            return
        try:
            self.doc_offsets = np.load(idx)
        except (ValueError, OSError, EOFError):  # (numpy's message suggests allow_pickle: no help for bad bytes)
            raise ValueError(f"{idx} is not a document index numpy can read (corrupt?); {redo}") from None
        # evaluation reads document lengths from these offsets: those of this split's stream, or an error, not garbage
        o = self.doc_offsets
        docs = self.meta["documents"].get(split) if isinstance(self.meta.get("documents"), dict) else None
        if (o.ndim != 1 or o.dtype.kind not in "iu" or len(o) == 0 or o[0] != 0 or o[-1] >= n
                or (len(o) > 1 and not (np.diff(o) > 0).all()) or (docs is not None and len(o) != docs)):
            raise ValueError(f"{idx} does not index {bin_file} ({len(o)} offsets, meta.json says {docs} documents "
                             f"of {n} tokens): the file is corrupt or from another preparation; {redo}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def separator_id(self) -> int:
        return int(self.meta["separator_id"])

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer saved in the folder (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (without its separator), as int64."""
        start = int(self.doc_offsets[i])
        end = int(self.doc_offsets[i + 1]) if i + 1 < len(self.doc_offsets) else len(self.tokens)
        return np.asarray(self.tokens[start:end - 1], dtype=np.int64)

    def check_ids(self, ids: np.ndarray, start: int) -> None:
        """Refuse tokens ``ids`` read from position ``start`` of the split when one lies outside the vocabulary:
        a corrupt ``.bin``, said here rather than by the model's embedding (on CUDA: a device assert)."""
        if len(ids) and int(ids.max()) >= self.vocab_size:
            bad = int(np.argmax(ids >= self.vocab_size))
            raise ValueError(f"{self.path}/{self.split}.bin holds token id {int(ids[bad])} at position "
                             f"{(start + bad) % len(self.tokens)}, outside its vocabulary [0, {self.vocab_size}): "
                             f"the file is corrupt; prepare it again (gca prepare ... --out {self.path} --overwrite)")

    def check_all_ids(self, block: int = 1 << 24) -> None:
        """:meth:`check_ids` over the whole split, ``block`` tokens at a time."""
        for i in range(0, len(self.tokens), block):
            self.check_ids(np.asarray(self.tokens[i : i + block]), i)

    def window(self, start: int, length: int) -> np.ndarray:
        """``(length,)`` int64 tokens from ``start``, wrapping around the end of the split."""
        n = len(self.tokens)
        start %= n
        if start + length <= n:
            return np.asarray(self.tokens[start:start + length], dtype=np.int64)
        idx = (start + np.arange(length)) % n
        return np.asarray(self.tokens[idx], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"PackedDataset({str(self.path)!r}, split={self.split!r}, tokens={len(self)}, "
                f"documents={self.num_documents}, vocab_size={self.vocab_size})")

