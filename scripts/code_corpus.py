"""Write a corpus of Python source code as JSON lines, one document per folder, for `gca prepare`.

A second offline corpus with far more long-range repetition than `debian-docs`: names, signatures and
whole idioms recur across a package's files, thousands of tokens apart. It tests whether DRT's lead
over the sliding window grows with the text's far context (`results/README.md`, "A code corpus").

    python scripts/code_corpus.py --out .cache/code/code.jsonl --root /usr/lib/python3.11 \
        --root .venv/lib/python3.11/site-packages/numpy ...
    python -m gca.cli prepare .cache/code/code.jsonl --out data/code --val-fraction 0.1

Each document is one folder's ``.py`` files (not its subfolders'), sorted by name, each preceded by a
``# file: <path relative to its root>`` line; folders are visited in sorted order. Files larger than
``--max-file-bytes`` (generated tables) are skipped; ``--max-chars`` stops the corpus at a total size.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def folder_documents(root: Path, max_file_bytes: int):
    """Yield (folder relative to root's parent, text) for every folder under root holding .py files."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        parts = []
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.endswith(".py") or path.is_symlink() or path.stat().st_size > max_file_bytes:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                parts.append(f"# file: {path.relative_to(root.parent)}\n{text.rstrip()}\n")
        if parts:
            yield str(Path(dirpath).relative_to(root.parent)), "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", action="append", required=True, help="a folder of Python code (repeatable)")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--max-file-bytes", type=int, default=400_000)
    p.add_argument("--max-chars", type=int, default=0, help="stop after this many characters (0: no limit)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = chars = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for root in a.root:
            root = Path(root).resolve()
            if not root.is_dir():
                raise SystemExit(f"--root {root}: not a folder")
            for folder, text in folder_documents(root, a.max_file_bytes):
                if a.max_chars and chars + len(text) > a.max_chars:
                    break
                f.write(json.dumps({"text": text, "folder": folder}) + "\n")
                docs, chars = docs + 1, chars + len(text)
    os.replace(tmp, out)
    print(f"{out}: {docs} documents, {chars / 1e6:.1f}M characters")


if __name__ == "__main__":
    main()
