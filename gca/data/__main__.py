"""Command line for the data layer: ``python -m gca.data COMMAND ...``.

    python -m gca.data corpus                                  # is the offline corpus installed? its size
    python -m gca.data prepare debian-docs --out data/debian-docs --tokenizer embedded --val-fraction 0.02
    python -m gca.data train-tokenizer debian-docs --vocab-size 8192 --out data/tok8k
    python -m gca.data show synthetic:passkey --seq-len 252    # decode one sample of any source spec
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gca.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="tokenise sources into train.bin / val.bin / meta.json")
    p.add_argument("sources", nargs="+", help="files, folders, debian-docs, hf:NAME")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="embedded", help="embedded, a tokenizer.json / folder, or an HF name")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")

    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE")
    t.add_argument("sources", nargs="+")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="tokenizer.json path or folder")
    t.add_argument("--text-field", default="text", help="the JSONL / parquet / HF field with the text")
    t.add_argument("--max-documents", type=int, default=None, help="train on the first this many documents only")

    sub.add_parser("corpus", help="list what the offline corpus (debian-docs) holds here")

    s = sub.add_parser("show", help="decode a sample of a batch-source spec")
    s.add_argument("spec")
    s.add_argument("--seq-len", type=int, default=252)
    s.add_argument("--index", type=int, default=0)
    s.add_argument("--split", default="train")

    a = ap.parse_args(argv)
    try:
        return _run(a)
    # as `gca`'s main: a bad spec or value, a missing file or package end in one line, exit status 2
    except (OSError, ValueError, ImportError) as e:
        if os.environ.get("GCA_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"{ap.prog} {a.cmd}: error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    if a.cmd == "prepare":
        from gca.data.prepare import prepare

        meta = prepare(a.sources, a.out, a.tokenizer, val_fraction=a.val_fraction, seed=a.seed,
                       text_field=a.text_field, max_documents=a.max_documents, overwrite=a.overwrite)
        print(json.dumps({k: meta[k] for k in ("tokens", "documents", "dtype", "content_hash")}, indent=2))
    elif a.cmd == "train-tokenizer":
        from gca.data.tokenizer import train_bpe

        tok = train_bpe(a.sources, a.vocab_size, a.out, text_field=a.text_field, max_documents=a.max_documents)
        print(tok)
    elif a.cmd == "corpus":
        from gca.data.sources import OFFLINE_CORPUS_INSTALL, _install_hint, offline_corpus_by_package

        parts = offline_corpus_by_package()
        files = [f for fs in parts.values() for f in fs]
        missing = [p for p, fs in parts.items() if not fs]
        if not files:
            print(f"offline corpus not installed; as root run:\n  {OFFLINE_CORPUS_INSTALL}")
            return 1
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} files, {size / 1e6:.1f} MB on disk (some gzipped)")
        if missing:
            print(f"missing packages: {' '.join(missing)}; {_install_hint('/', missing)}")
    elif a.cmd == "show":
        from gca.data.batches import build_source

        src = build_source(a.spec, seq_len=a.seq_len, split=a.split)
        b = src.get_batch(a.index, 1)
        ids, labels = b["input_ids"][0].tolist(), b["labels"][0].tolist()
        print(json.dumps(src.describe()))
        print(src.tokenizer.decode(ids))
        tgt = [i for i, l in zip(ids, labels) if l != -100]
        print(f"--- loss on {len(tgt)} of {len(ids)} tokens" + (f": {src.tokenizer.decode(tgt)!r}" if len(tgt) < 64 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
