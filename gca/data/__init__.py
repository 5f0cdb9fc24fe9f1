"""Data: tokenizers, text sources, prepared (memory-mapped) datasets, synthetic retrieval tasks and
the batch sources the trainer reads.

    from gca.data import build_source
    src = build_source("synthetic:passkey", seq_len=504)        # no download needed
    batch = src.get_batch(index=0, batch_size=8)                 # input_ids, labels: (8, 504) long

    from gca.data import prepare
    prepare(["debian-docs"], "data/debian", tokenizer="embedded")  # offline English corpus
    src = build_source("data/debian", seq_len=4096, split="val")

Files: ``tokenizer.py`` (train/load), ``sources.py`` (where text comes from), ``prepare.py``
(tokenise to .bin + meta.json, :class:`PackedDataset`), ``tasks.py`` (passkey / multikey / 2hop,
:class:`TaskSource`), ``batches.py`` (:class:`BatchSource`, :func:`build_source`).
"""

from gca.data.batches import BatchSource, MixtureSource, PackedSource, build_source
from gca.data.prepare import PackedDataset, content_hash, prepare
from gca.data.sources import OFFLINE_CORPUS_INSTALL, iter_documents, offline_corpus_files
from gca.data.tasks import (
    KINDS,
    StreamFiller,
    TaskSample,
    TaskSource,
    WordFiller,
    aligned_prompt_len,
    digit_ids,
    make_task_sample,
)
from gca.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "BatchSource", "KINDS", "MixtureSource", "OFFLINE_CORPUS_INSTALL", "PackedDataset", "PackedSource",
    "StreamFiller", "TaskSample", "TaskSource", "Tokenizer", "WordFiller", "aligned_prompt_len", "build_source",
    "content_hash", "digit_ids", "iter_documents", "load_tokenizer", "make_task_sample", "offline_corpus_files",
    "prepare", "train_bpe",
]
