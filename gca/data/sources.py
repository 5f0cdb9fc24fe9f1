"""Text sources: where documents come from before tokenisation.

A *source spec* is a string:

    data/books/                 a folder, read recursively (sorted paths, hidden files skipped)
    data/books/?group=folder    ... each folder's files joined into one document (any file spec may
                                carry ?group=folder, debian-docs too: one document per manual section)
    notes.txt                   one file = one document (.txt .md .rst .pod .text, optionally .gz)
    pages.html                  one document, tags stripped (.html .htm)
    docs.jsonl                  one document per line, from its "text" field
    docs.jsonl?field=content    ... or another field (any spec may carry ?field=NAME)
    shard.parquet               one document per row (needs pyarrow)
    hf:pg19                     a Hugging Face dataset (needs `datasets` and the hub; ?split= ?config= ?limit=)
    debian-docs                 the offline English corpus (alias local:debian-docs), see below

The offline corpus needs no hub: Debian ships the documentation of the Linux kernel, Python,
Perl, Django, PostgreSQL, Git, Apache and the Debian reference as plain text or HTML. On a Debian or
Ubuntu machine, as root::

    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        linux-doc python3-doc perl-doc python-django-doc postgresql-doc git-doc apache2-doc debian-reference-en

(:data:`OFFLINE_CORPUS_INSTALL`; about 75 MB to download, under a minute to install). Measured on Debian 12:
6,207 documents, 63.4M characters, 24.4M tokens with the embedded 2048-token BPE, 19.0M with an
8192-token BPE trained on it (larger vocabularies give fewer; see :func:`offline_corpus_files`).
Images whose dpkg config drops /usr/share/doc (some minimal Docker images) must lift that rule first.
With none of the packages installed, reading ``debian-docs`` fails naming them and the command; with
some missing, it warns which (:func:`offline_corpus_files`).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs

TEXT_EXTS = (".txt", ".text", ".md", ".rst", ".pod")
HTML_EXTS = (".html", ".htm")
JSONL_EXTS = (".jsonl", ".ndjson")
PARQUET_EXTS = (".parquet",)
SUPPORTED_EXTS = TEXT_EXTS + HTML_EXTS + JSONL_EXTS + PARQUET_EXTS
OFFLINE_NAMES = ("debian-docs", "local:debian-docs")

OFFLINE_CORPUS_PACKAGES = (
    "linux-doc",
    "python3-doc",
    "perl-doc",
    "python-django-doc",
    "postgresql-doc",
    "git-doc",
    "apache2-doc",
    "debian-reference-en",
)
OFFLINE_CORPUS_INSTALL = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    + " ".join(OFFLINE_CORPUS_PACKAGES)
)
HF_ALIASES = {"pg19": "deepmind/pg19", "proof-pile": "hoskinson-center/proof-pile"}


# ---------------------------------------------------------------- spec parsing
def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"docs.jsonl?field=content"`` -> ``("docs.jsonl", {"field": "content"})``."""
    spec = str(spec)
    if "?" in spec and not os.path.exists(spec):
        base, q = spec.split("?", 1)
        return base, {k: v[-1] for k, v in parse_qs(q, keep_blank_values=True).items()}
    return spec, {}


def is_source_spec(spec: str) -> bool:
    """True if ``spec`` names an existing path, an ``hf:`` dataset or the offline corpus."""
    base, _ = split_spec(spec)
    return base.startswith("hf:") or base in OFFLINE_NAMES or os.path.exists(base)


def describe_source(spec) -> str:
    """A one-line description stored in meta.json."""
    base, opts = split_spec(str(spec))
    if base in OFFLINE_NAMES:
        return f"debian-docs (offline; install: {OFFLINE_CORPUS_INSTALL})" + (f" {opts}" if opts else "")
    if base.startswith("hf:"):
        name = HF_ALIASES.get(base[3:], base[3:])
        return f"hf:{name}" + (f" {opts}" if opts else "")
    return str(Path(base).resolve()) + (f" {opts}" if opts else "")


# ---------------------------------------------------------------- files
def list_files(path: str | os.PathLike) -> list[Path]:
    """Supported files under ``path`` (itself if a file), sorted, hidden ones skipped.

    Raises FileNotFoundError if the path does not exist, ValueError if a folder holds no supported file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_file():
        return [p]
    out = []
    for root, dirs, files in os.walk(p, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and _kind(f) is not None:
                out.append(Path(root) / f)
    out.sort()
    if not out:
        raise ValueError(f"{p} holds no supported files ({', '.join(SUPPORTED_EXTS)}, optionally .gz)")
    return out


def _kind(name: str) -> str | None:
    n = name.lower()
    if n.endswith(".gz"):
        n = n[:-3]
    if n.endswith(TEXT_EXTS):
        return "text"
    if n.endswith(HTML_EXTS):
        return "html"
    if n.endswith(JSONL_EXTS):
        return "jsonl"
    if n.endswith(PARQUET_EXTS) and not name.lower().endswith(".gz"):
        return "parquet"
    return None


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


class _Utf8:
    """Decodes one file's bytes (whole, or line by line) as UTF-8 with universal newlines (as text mode
    reads): a leading byte-order mark (Windows editors write one) is dropped, and bytes that are not
    UTF-8 (a Latin-1 file) become U+FFFD with one warning per file that names it, not silently."""

    def __init__(self, path: Path):
        self.path, self.first, self.warned = path, True, False

    def __call__(self, raw: bytes, line: int | None = None) -> str:
        if self.first:
            self.first = False
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if not self.warned:
                self.warned = True
                where = f"{self.path}:{line}" if line is not None else str(self.path)
                warnings.warn(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); its undecodable "
                              f"bytes become U+FFFD in the dataset; convert the file to UTF-8 first (e.g. iconv -f "
                              f"latin1 -t utf-8) to keep them", stacklevel=2)
            text = raw.decode("utf-8", errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")  # the newlines of text mode, as before


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; scripts, styles and navigation dropped."""

    SKIP = {"script", "style", "nav", "head", "noscript"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Strip tags; collapse runs of blank lines and trailing spaces."""
    p = _HTMLText()
    p.feed(html)
    p.close()
    text = "".join(p.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def iter_file_documents(path: Path, field: str = "text") -> Iterator[str]:
    """Documents of one file (empty documents are skipped). Errors name the file."""
    kind = _kind(path.name)
    try:
        if kind == "text":
            with _open_bytes(path) as f:
                t = _Utf8(path)(f.read())
            if t.strip():
                yield t
        elif kind == "html":
            with _open_bytes(path) as f:
                t = html_to_text(_Utf8(path)(f.read()))
            if t:
                yield t
        elif kind == "jsonl":
            decode = _Utf8(path)
            with _open_bytes(path) as f:
                for ln, raw in enumerate(f, 1):
                    line = decode(raw, ln)
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{ln}: not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or field not in rec:
                        raise ValueError(f"{path}:{ln}: record has no {field!r} field (set ?field=NAME)")
                    t = rec[field]
                    if not isinstance(t, str):
                        raise ValueError(f"{path}:{ln}: field {field!r} is {type(t).__name__}, not text")
                    if t.strip():
                        yield t
        elif kind == "parquet":
            yield from _iter_parquet(path, field)
        else:
            raise ValueError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_EXTS)})")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise OSError(f"cannot read {path}: {e}") from e


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); set ?field=NAME")
    for batch in pf.iter_batches(columns=[field]):
        for t in batch.column(0).to_pylist():
            if isinstance(t, str) and t.strip():
                yield t


# ---------------------------------------------------------------- offline corpus
def _newest(paths: list[str]) -> list[str]:
    """Of versioned folders (linux-doc-6.1, linux-doc-6.12), keep the newest: avoids duplicates."""

    def key(p):
        return [int(x) for x in re.findall(r"\d+", p)]

    return sorted(paths, key=key)[-1:] if paths else []


def offline_corpus_by_package(root: str | os.PathLike = "/") -> dict[str, list[Path]]:
    """The files of the offline corpus found under ``root``, by the Debian package that ships them
    (every name of :data:`OFFLINE_CORPUS_PACKAGES` is a key; an empty list: not installed).

    Documentation sources (plain text where Debian ships it, else HTML): Linux kernel (Sphinx
    sources + legacy .txt), Python (Sphinx sources), Perl (pod), Django and PostgreSQL and Apache
    (HTML), Git (asciidoc .txt), the Debian reference. Each file is one document.
    """
    r = str(Path(root))
    doc = os.path.join(r, "usr/share/doc")
    g = lambda pat: glob.glob(os.path.join(doc, pat) if not pat.startswith("/") else os.path.join(r, pat[1:]), recursive=True)  # noqa: E731
    parts: dict[str, list[str]] = {p: [] for p in OFFLINE_CORPUS_PACKAGES}
    for d in _newest(g("linux-doc-*")):
        parts["linux-doc"] += g(f"{os.path.basename(d)}/html/_sources/**/*.txt")
        parts["linux-doc"] += [f for f in g(f"{os.path.basename(d)}/Documentation/**/*.txt.gz") if "/devicetree/" not in f]
    for d in _newest([p for p in g("python3.*") if os.path.isdir(os.path.join(p, "html/_sources"))]):
        parts["python3-doc"] += g(f"{os.path.basename(d)}/html/_sources/**/*.txt")
    for d in _newest(g("/usr/share/perl/*/pod")):
        pods = glob.glob(os.path.join(d, "*.pod"))
        # perl-modules ships perldiag.pod alone (for `use diagnostics`): that is not perl-doc's ~200 pods
        if any(os.path.basename(f) != "perldiag.pod" for f in pods):
            parts["perl-doc"] += pods
    skip_html = ("/_modules/", "genindex", "/search.html", "py-modindex", "/_static/")
    parts["python-django-doc"] += [f for f in g("python-django-doc/html/**/*.html") if not any(s in f for s in skip_html)]
    for d in _newest(g("postgresql-doc-*")):
        parts["postgresql-doc"] += g(f"{os.path.basename(d)}/html/*.html")
    parts["git-doc"] += g("git-doc/*.txt") + g("git-doc/**/*.txt")
    parts["apache2-doc"] += g("apache2-doc/manual/en/**/*.html")
    parts["debian-reference-en"] += g("/usr/share/debian-reference/debian-reference.en.txt.gz")
    seen: set[str] = set()
    out: dict[str, list[Path]] = {}
    for pkg, files in parts.items():
        out[pkg] = []
        for f in sorted(set(files)):
            real = os.path.realpath(f)
            if real not in seen and os.path.isfile(f):
                seen.add(real)
                out[pkg].append(Path(f))
    return out


def _install_hint(root: str, missing: list[str]) -> str:
    """How to install ``missing``, one line, and the dpkg rule that would undo it where there is one."""
    hint = ("install them as root on Debian/Ubuntu (`make corpus` does it): apt-get update && DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y --no-install-recommends " + " ".join(missing))
    for cfg in glob.glob(os.path.join(str(root), "etc/dpkg/dpkg.cfg.d/*")):
        try:
            text = Path(cfg).read_text(errors="replace")
        except OSError:
            continue
        if re.search(r"^\s*path-exclude\s*=?\s*/usr/share/doc", text, re.M):
            hint += f" (and first drop the path-exclude of /usr/share/doc in {cfg}: dpkg leaves those files out)"
            break
    return hint


def offline_corpus_files(root: str | os.PathLike = "/", *, require: bool = True) -> list[Path]:
    """The files of the offline English corpus (see the module docstring for the install command,
    :func:`offline_corpus_by_package` for what is read).

    Args:
        root: filesystem root to search under (tests point it at a fake tree).
        require: raise FileNotFoundError, naming the install command, if none of the packages is
            installed, and warn naming those missing if only some are (the corpus is then smaller than
            the 6,207 documents the README counts).
    Returns:
        sorted, de-duplicated (by real path) list of files.
    """
    parts = offline_corpus_by_package(root)
    out = sorted(f for files in parts.values() for f in files)
    missing = [p for p, files in parts.items() if not files]
    if require and len(missing) == len(parts):
        raise FileNotFoundError(f"the offline corpus (debian-docs) is not installed (missing packages: "
                                f"{', '.join(missing)}); {_install_hint(str(root), missing)}")
    if require and missing:
        warnings.warn(f"the offline corpus (debian-docs) lacks {len(missing)} of its {len(parts)} packages "
                      f"({', '.join(missing)}), so it is smaller than the README's 6,207 documents; "
                      f"{_install_hint(str(root), missing)}", stacklevel=2)
    return out


# ---------------------------------------------------------------- Hugging Face datasets
def iter_hf_documents(name: str, split: str = "train", field: str = "text", config: str | None = None,
                      limit: int | None = None, streaming: bool = True) -> Iterator[str]:
    """Documents of a Hugging Face dataset (``pg19`` and ``proof-pile`` are aliases).

    Needs the ``datasets`` package and the hub (or its local cache); the error says which is missing.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"hf:{name} needs the `datasets` package (pip install datasets) and access to the Hugging Face hub; "
            f"offline, use a local folder or `debian-docs`"
        ) from None
    repo = HF_ALIASES.get(name, name)
    try:
        ds = datasets.load_dataset(repo, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(
            f"cannot load Hugging Face dataset {repo!r} (split {split!r}): {type(e).__name__}: {str(e)[:300]}. "
            f"Offline? Use a local folder of .txt/.jsonl/.parquet files or `debian-docs`."
        ) from e
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if field not in rec:
            raise ValueError(f"hf:{repo} records have no {field!r} field (fields: {sorted(rec)}); set ?field=NAME")
        t = rec[field]
        if isinstance(t, str) and t.strip():
            yield t


# ---------------------------------------------------------------- one entry point
def source_files(spec) -> list[Path] | None:
    """The files a spec reads, or None for a non-file source (``hf:``)."""
    base, _ = split_spec(str(spec))
    if base.startswith("hf:"):
        return None
    if base in OFFLINE_NAMES:
        return offline_corpus_files()
    return list_files(base)


def iter_documents(spec, text_field: str = "text", progress: bool = False) -> Iterator[str]:
    """Yield the documents (non-empty strings) of one source spec, in a fixed order.

    Args:
        spec: see the module docstring. ``?field=`` overrides ``text_field``.
        text_field: the JSONL / parquet / HF field holding the text.
        progress: show a tqdm bar over files.
    Raises:
        FileNotFoundError (missing path, offline corpus not installed, an hf: dataset that cannot be
        loaded), ValueError (bad records, folder without supported files), OSError (unreadable file),
        ImportError (hf: without `datasets`).
    """
    base, opts = split_spec(str(spec))
    field = opts.get("field", text_field)
    if base.startswith("hf:"):
        limit = int(opts["limit"]) if opts.get("limit") else None
        yield from iter_hf_documents(base[3:], split=opts.get("split", "train"), field=field,
                                     config=opts.get("config") or None, limit=limit)
        return
    files = source_files(base)
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc=f"reading {Path(base).name or base}", unit="file")
    group = opts.get("group", "")
    if group not in ("", "file", "folder"):
        raise ValueError(f"{spec}: group={group!r} is not known (use group=file, the default, or group=folder)")
    if group != "folder":
        for f in files:
            yield from iter_file_documents(f, field)
        return
    # group=folder: the documents of all files in one folder, in path order, make one document (a
    # manual's pages, a package's docs): long documents whose far context belongs to them
    folders: dict[Path, list[Path]] = {}
    for f in files:  # a folder's files in path order, the folders in the order their first file comes
        folders.setdefault(f.parent, []).append(f)
    for members in folders.values():
        text = "\n\n".join(d for f in members for d in iter_file_documents(f, field))
        if text:
            yield text
