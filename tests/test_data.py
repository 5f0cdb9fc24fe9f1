"""Data layer: tokenizer train/load, sources, prepare round trip, PackedDataset, build_source."""

import gzip
import json
import warnings

import numpy as np
import pytest
import torch

from gca.data import (
    PackedDataset,
    Tokenizer,
    build_source,
    content_hash,
    iter_documents,
    load_tokenizer,
    offline_corpus_files,
    prepare,
    train_bpe,
)
from gca.data.sources import OFFLINE_CORPUS_INSTALL

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "A second document, about chunks and landmarks and retrieval. " * 15,
    "Third one: numbers 12345 and 67890 appear here. " * 10,
    "Fourth document with some more words in it to make it longer. " * 12,
    "Fifth and last document. It is short.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(TEXTS[0])
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text(TEXTS[1])
    with gzip.open(d / "sub" / "c.txt.gz", "wt") as f:
        f.write(TEXTS[2])
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[3:])) + "\n")
    (d / "empty.txt").write_text("")
    (d / ".hidden.txt").write_text("never read")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "ds"
    meta = prepare([str(corpus)], out, tokenizer="embedded", val_fraction=0.3, seed=0, progress=False)
    return out, meta


# ---------------------------------------------------------------- tokenizer
def test_embedded_tokenizer():
    tok = load_tokenizer("embedded")
    assert tok.vocab_size <= 2048 and tok.eos_id == 0
    text = "The passkey is: 7 3 9 1 2. What is it?"
    assert tok.decode(tok.encode(text)) == text
    digits = [tok.encode(f" {d}") for d in range(10)]
    assert all(len(x) == 1 for x in digits)


@pytest.mark.filterwarnings("ignore:train_bpe:UserWarning")  # the tiny corpora fill fewer ids
def test_train_bpe_round_trip(tmp_path, corpus):
    tok = train_bpe([str(corpus)], vocab_size=300, out_path=tmp_path / "tok", show_progress=False)
    assert isinstance(tok, Tokenizer) and tok.vocab_size <= 300 and tok.eos_id == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    for loaded in (load_tokenizer(tmp_path / "tok"), load_tokenizer(tmp_path / "tok" / "tokenizer.json")):
        assert loaded.vocab_size == tok.vocab_size
        s = "Numbers 12345, unicode é ü and the lazy dog."
        assert loaded.encode(s) == tok.encode(s)
        assert loaded.decode(loaded.encode(s)) == s
    tok2 = train_bpe(["some text here " * 50, "and more text"], vocab_size=270, show_progress=False)
    assert tok2.vocab_size <= 270


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_bpe(["", ""], vocab_size=300, show_progress=False)
    with pytest.raises(FileNotFoundError):
        train_bpe([str(tmp_path / "typo")], vocab_size=300, show_progress=False)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")


def test_hf_name_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot load tokenizer .*cannot be reached") as e:
        load_tokenizer("surely-not-a-real-model-name-xyz")
    assert "\n" not in str(e.value)  # one line (transformers' own message runs to several)


def test_hf_name_with_the_hub_unreachable_asks_the_local_cache_only(monkeypatch):
    """No network: one quick probe, then the local cache only (no retries of every file)."""
    transformers = pytest.importorskip("transformers")
    from gca.data import tokenizer as tk

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert tk._hub_reachable(timeout=1.0) is False
    seen = []

    def fake(name, **kw):
        seen.append(kw)
        raise OSError("not in the cache")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        load_tokenizer("some-model")
    assert seen == [{"local_files_only": True}]


# ---------------------------------------------------------------- sources
def test_iter_documents(corpus):
    docs = list(iter_documents(str(corpus)))
    assert sorted(docs) == sorted(TEXTS)  # empty file skipped, hidden/unsupported ignored
    assert list(iter_documents(str(corpus))) == docs  # fixed order


def test_iter_documents_group_folder(tmp_path):
    """?group=folder: each folder's files joined (path order) into one document, a subfolder's apart
    even when its path sorts between its parent's files; unknown group values are refused."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "1.txt").write_text("one")
    (tmp_path / "a" / "b" / "2.txt").write_text("two")
    (tmp_path / "a" / "c.txt").write_text("three")
    (tmp_path / "c" / "4.md").write_text("four")
    (tmp_path / "c" / "5.txt").write_text("")
    assert list(iter_documents(str(tmp_path))) == ["one", "two", "three", "four"]
    assert list(iter_documents(f"{tmp_path}?group=folder")) == ["one\n\nthree", "two", "four"]
    assert list(iter_documents(f"{tmp_path}?group=file")) == ["one", "two", "three", "four"]
    with pytest.raises(ValueError, match="group='book' is not known"):
        list(iter_documents(f"{tmp_path}?group=book"))


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_documents(str(tmp_path / "nope")))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ValueError, match="no supported files"):
        list(iter_documents(str(tmp_path)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_documents(str(bad)))
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "other field"}\n')
    assert list(iter_documents(f"{good}?field=body")) == ["other field"]


def test_html_and_offline_corpus(tmp_path):
    root = tmp_path / "root"
    src = root / "usr/share/doc/python3.11/html/_sources/library"
    src.mkdir(parents=True)
    (src / "os.rst.txt").write_text("The os module.")
    pg = root / "usr/share/doc/postgresql-doc-15/html"
    pg.mkdir(parents=True)
    (pg / "intro.html").write_text("<html><head><title>t</title><script>x=1</script></head>"
                                   "<body><p>Hello &amp; welcome.</p><nav>menu</nav></body></html>")
    with pytest.warns(UserWarning, match="lacks 6 of its 8 packages .linux-doc, perl-doc, .*apt-get install"):
        files = offline_corpus_files(root)
    assert len(files) == 2
    docs = [d for f in files for d in iter_documents(str(f))]
    assert "Hello & welcome." in docs and "The os module." in docs
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        offline_corpus_files(tmp_path / "empty_root")
    assert "linux-doc" in OFFLINE_CORPUS_INSTALL


def test_offline_corpus_without_its_packages(tmp_path):
    """perl-modules' lone perldiag.pod is no corpus: with none of the packages installed, an error in one
    line naming them and the install command (and the dpkg rule that drops /usr/share/doc, if any)."""
    pod = tmp_path / "usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    (pod / "perldiag.pod").write_text("=head1 NAME\n\nperldiag - various Perl diagnostics\n")
    with pytest.raises(FileNotFoundError, match="not installed .missing packages: linux-doc, .*perl-doc.*apt-get "
                                                "install .*debian-reference-en") as e:
        offline_corpus_files(tmp_path)
    assert "\n" not in str(e.value) and "path-exclude" not in str(e.value)
    assert offline_corpus_files(tmp_path, require=False) == []
    (tmp_path / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True)
    (tmp_path / "etc/dpkg/dpkg.cfg.d/excludes").write_text("path-exclude=/usr/share/doc/*\n")
    with pytest.raises(FileNotFoundError, match="drop the path-exclude of /usr/share/doc"):
        offline_corpus_files(tmp_path)
    (pod / "perlfunc.pod").write_text("=head1 NAME\n\nperlfunc - Perl builtin functions\n")  # perl-doc is in
    with pytest.warns(UserWarning, match="lacks 7 of its 8 packages"):
        assert [f.name for f in offline_corpus_files(tmp_path)] == ["perldiag.pod", "perlfunc.pod"]


def test_hf_source_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:  # the message must say what to install
        with pytest.raises(ImportError, match="datasets"):
            list(iter_documents("hf:pg19"))


# ---------------------------------------------------------------- prepare / PackedDataset
def test_prepare_round_trip(prepared):
    out, meta = prepared
    tok = load_tokenizer(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(TEXTS)
    assert meta["documents"]["val"] >= 1 and meta["documents"]["train"] >= 1
    assert (out / "tokenizer.json").exists() and meta["tokenizer"]["name"] == "embedded"
    assert meta["content_hash"] == content_hash(out)
    decoded = []
    for split in ("train", "val"):
        ds = PackedDataset(out, split)
        assert len(ds) == meta["tokens"][split] and ds.vocab_size == tok.vocab_size
        assert ds.num_documents == meta["documents"][split]
        assert int(ds.tokens[-1]) == ds.separator_id == tok.eos_id
        assert (np.asarray(ds.tokens) == ds.separator_id).sum() == ds.num_documents
        decoded += [ds.tokenizer.decode(ds.document(i)) for i in range(ds.num_documents)]
    assert sorted(decoded) == sorted(TEXTS)


def test_prepare_deterministic(corpus, prepared, tmp_path):
    _, meta = prepared
    meta2 = prepare([str(corpus)], tmp_path / "again", tokenizer="embedded", val_fraction=0.3, seed=0, progress=False)
    assert meta2["content_hash"] == meta["content_hash"]
    meta3 = prepare([str(corpus)], tmp_path / "other", tokenizer="embedded", val_fraction=0.6, seed=5, progress=False)
    assert meta3["splits"]["val"]["sha256"] != meta["splits"]["val"]["sha256"]
    with pytest.raises(FileExistsError):
        prepare([str(corpus)], tmp_path / "again", tokenizer="embedded", progress=False)


def test_prepare_errors(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty.txt").write_text("   \n")
    with pytest.raises(ValueError, match="no text"):
        prepare([str(tmp_path / "e")], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError):
        prepare([str(tmp_path / "missing")], tmp_path / "out2", progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        PackedDataset(tmp_path / "e")


@pytest.mark.parametrize("damage, says", [
    ("meta_not_json", "meta.json is not valid"),
    ("meta_no_dtype", "meta.json lacks 'dtype'"),
    ("truncated_bin", "val.bin has 10 bytes"),
    ("missing_bin", "val.bin is missing"),
    ("garbled_idx", "val.idx.npy is not a document index"),
    ("garbled_tokenizer", "tokenizer.json is not a tokenizers JSON file"),
])
def test_a_damaged_prepared_folder_names_the_file(prepared, tmp_path, damage, says):
    """A corrupt meta.json was a bare JSON error or a KeyError traceback, a truncated val.bin numpy's
    "mmap length is greater than file size", a garbled index numpy's advice to unpickle, and a garbled
    tokenizer.json of a folder a bare Exception: each now names the file (and how to remake it)."""
    import shutil

    src, _ = prepared
    d = tmp_path / "ds"
    shutil.copytree(src, d)
    if damage == "meta_not_json":
        (d / "meta.json").write_text("{")
    elif damage == "meta_no_dtype":
        (d / "meta.json").write_text(json.dumps({k: v for k, v in json.loads((d / "meta.json").read_text()).items()
                                                 if k != "dtype"}))
    elif damage == "truncated_bin":
        (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:10])
    elif damage == "missing_bin":
        (d / "val.bin").unlink()
    elif damage == "garbled_idx":
        (d / "val.idx.npy").write_bytes(b"xx")
    else:
        (d / "tokenizer.json").write_text("xx")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        PackedDataset(d, "val").tokenizer
    msg = str(e.value)
    assert str(d) in msg and says in msg, msg
    if damage != "garbled_tokenizer":
        assert "--overwrite" in msg and "allow_pickle" not in msg, msg


def test_prepare_warns_when_a_split_is_empty(tmp_path):
    """One document goes whole to one split: say so at prepare time, not at `gca train`'s first
    validation; val_fraction=0 asks for no validation, and gets no warning."""
    (tmp_path / "one.txt").write_text(TEXTS[0])
    with pytest.warns(UserWarning, match="val split is empty: the sources hold 1 document.*--eval-every 0"):
        meta = prepare([str(tmp_path / "one.txt")], tmp_path / "a", val_fraction=0.01, progress=False)
    assert meta["tokens"]["val"] == 0
    with pytest.raises(ValueError, match="split 'val' is empty .*gca prepare --val-fraction.*--eval-every 0"):
        PackedDataset(tmp_path / "a", "val")
    with pytest.warns(UserWarning, match="train split is empty.*smaller val_fraction .gca prepare --val-fraction"):
        meta = prepare([str(tmp_path / "one.txt")], tmp_path / "b", val_fraction=0.999, progress=False)
    assert meta["tokens"]["train"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare([str(tmp_path / "one.txt")], tmp_path / "c", val_fraction=0.0, progress=False)


def test_prepare_errors_name_the_cli_flags(tmp_path, prepared, corpus):
    out, _ = prepared
    with pytest.raises(FileExistsError, match=r"pass overwrite=True \(gca prepare --overwrite\)"):
        prepare([str(corpus)], out, progress=False)
    with pytest.raises(ValueError, match=r"val_fraction \(gca prepare --val-fraction\) must be in \[0, 1\)"):
        prepare([str(corpus)], tmp_path / "x", val_fraction=1.0, progress=False)


def test_mixture_of_datasets_with_different_tokenizers(tmp_path, prepared, corpus):
    """The user gave no tokenizer: the error says the mixture's datasets do not share one."""
    out, _ = prepared
    tok = train_bpe([str(corpus)], vocab_size=300, show_progress=False)
    other = tmp_path / "other"
    prepare([str(corpus)], other, tokenizer=tok, val_fraction=0.3, progress=False)
    for spec in (f"{out}@0.5+{other}@0.5", f"{other}+synthetic:passkey;filler={out}"):
        with pytest.raises(ValueError, match=f"do not share a tokenizer: .* with 'embedded' .2048 ids.*--tokenizer") as e:
            build_source(spec, seq_len=16)
        assert "tokenizer=None" not in str(e.value)


def test_data_main_errors_in_one_line(capsys):
    from gca.data.__main__ import main

    assert main(["show", "synthetic:foo"]) == 2
    err = capsys.readouterr().err
    assert err == "python -m gca.data show: error: unknown task 'foo'; choose one of ('passkey', 'multikey', '2hop')\n"


def test_train_bpe_smaller_than_asked(corpus):
    """A small corpus cannot fill a large vocabulary: warn, and name the tokenizer by its real size."""
    with pytest.warns(UserWarning, match="yield only .* fewer than the vocab_size=70000 asked for .gca prepare --vocab-size"):
        tok = train_bpe([str(corpus)], vocab_size=70000, show_progress=False)
    assert tok.vocab_size < 70000 and tok.name == f"bpe-{tok.vocab_size}"
    with pytest.raises(ValueError, match=r"vocab_size \(gca prepare --vocab-size\) must be >= 257"):
        train_bpe([str(corpus)], vocab_size=100, show_progress=False)


def test_packed_source(prepared):
    out, meta = prepared
    L = 16
    src = build_source(str(out), seq_len=L, seed=1)
    b = src.get_batch(0, 4)
    assert b["input_ids"].shape == (4, L) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["input_ids"], b["labels"])
    assert torch.equal(b["input_ids"], build_source(str(out), seq_len=L, seed=1).get_batch(0, 4)["input_ids"])
    # world_size x batch_size constant -> same global batch; ranks disjoint within an epoch
    full = src.get_batch(3, 4)["input_ids"]
    halves = torch.cat([src.get_batch(3, 2, rank=r, world_size=2)["input_ids"] for r in range(2)])
    assert torch.equal(full, halves)
    W = src.num_windows
    rows = [tuple(src.sample(g)[0].tolist()) for g in range(W)]
    assert len(set(rows)) == W  # an epoch visits every window once
    val = build_source(str(out), seq_len=L, split="val")
    ds_val = PackedDataset(out, "val")
    v = val.get_batch(0, 2)["input_ids"][0].numpy()
    hay = np.asarray(ds_val.tokens, dtype=np.int64)
    assert any((hay[i:i + L] == v).all() for i in range(len(hay) - L + 1))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        build_source(str(out), seq_len=10**7)


def test_build_source_specs(prepared):
    out, _ = prepared
    for spec in ("synthetic:passkey", "synthetic:multikey", "synthetic:2hop", "synthetic:mix",
                 "synthetic:passkey=0.5,multikey=0.3,2hop=0.2", "synthetic:passkey;min_len=189;loss=all;repeat=0.5"):
        src = build_source(spec, seq_len=252, seed=0)
        b = src.get_batch(0, 2)
        assert b["input_ids"].shape == (2, 252) and b["labels"].shape == (2, 252)
        assert src.vocab_size == 2048 and int(b["input_ids"].max()) < src.vocab_size
    mix = build_source(f"{out}@0.5+synthetic:passkey@0.5", seq_len=189, seed=0)
    b = mix.get_batch(0, 16)
    masked = (b["labels"] == -100).any(1)
    assert 0 < int(masked.sum()) < 16  # both components used
    with pytest.raises(ValueError, match="unknown option"):
        build_source("synthetic:passkey;bogus=1", seq_len=252)
    with pytest.raises(ValueError, match="option min_len='abc' in .*: expected an integer"):
        build_source("synthetic:passkey;min_len=abc", seq_len=252)
    with pytest.raises(ValueError, match="task weight 'passkey=x'"):
        build_source("synthetic:passkey=x,2hop=1", seq_len=252)
    with pytest.raises(ValueError, match="not a prepared dataset|does not exist"):
        build_source("/no/such/dir", seq_len=252)
    with pytest.raises(ValueError, match="unknown task"):
        build_source("synthetic:nope", seq_len=252)


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "", "two doc"], "n": [1, 2, 3]}), tmp_path / "x.parquet")
    assert list(iter_documents(str(tmp_path / "x.parquet"))) == ["one doc", "two doc"]
    with pytest.raises(ValueError, match="no column"):
        list(iter_documents(f"{tmp_path / 'x.parquet'}?field=body"))


def test_overwrite_cut_short_leaves_no_stale_meta(corpus, tmp_path, monkeypatch):
    import importlib

    prep = importlib.import_module("gca.data.prepare")  # (gca.data.prepare is also the function's name)

    out = tmp_path / "ds"
    prepare([str(corpus)], out, tokenizer="embedded", val_fraction=0.3, seed=0, progress=False)
    finish, calls = prep._SplitWriter.finish, []

    def crash_on_second(self):  # the first split's .bin is replaced, then the process dies
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(self)

    monkeypatch.setattr(prep._SplitWriter, "finish", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], out, tokenizer="embedded", val_fraction=0.6, seed=5, progress=False, overwrite=True)
    # the old meta.json would describe the old train.bin beside a new one: it is gone, the folder refused
    assert not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        PackedDataset(out, "train")
    monkeypatch.undo()
    meta = prepare([str(corpus)], out, tokenizer="embedded", val_fraction=0.6, seed=5, progress=False, overwrite=True)
    assert len(PackedDataset(out, "train")) == meta["tokens"]["train"] and not (out / "meta.json.tmp").exists()


def test_sources_drop_a_bom_and_warn_of_bytes_that_are_not_utf8(tmp_path):
    """A JSONL file with a byte-order mark (Windows editors write one) was refused as "not valid JSON"
    at line 1, and a Latin-1 file became U+FFFD characters in the dataset without a word."""
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first doc"}\r\n{"text": "second doc"}\n')
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")
    assert list(iter_documents(str(tmp_path / "bom.jsonl"))) == ["first doc", "second doc"]
    assert list(iter_documents(str(tmp_path / "bom.txt"))) == ["line one\nline two\n"]  # newlines as text mode reads
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"latin1.txt: not UTF-8 \(byte 0xe9 at offset 3\).*iconv"):
        assert list(iter_documents(str(tmp_path / "latin1.txt"))) == ["caf\ufffd cr\ufffdme"]
    with gzip.open(tmp_path / "l.jsonl.gz", "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "\xe8"}\n')
    with pytest.warns(UserWarning, match=r"l.jsonl.gz:2: not UTF-8") as rec:
        assert list(iter_documents(str(tmp_path / "l.jsonl.gz"))) == ["ok", "caf\ufffd", "\ufffd"]
    assert len([w for w in rec if "not UTF-8" in str(w.message)]) == 1  # one warning per file


def test_train_bpe_reads_the_text_field_and_stops_at_max_documents(tmp_path):
    """`gca prepare X.jsonl --text-field content --train-tokenizer` trained the tokenizer on the "text"
    field (failing: record has no 'text' field), and with --max-documents on the whole corpus."""
    lines = [json.dumps({"content": f"document {i}: " + "the quick brown fox " * 20}) for i in range(3)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines + ["not json: never read"]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (too little text for 300 ids)
        tok = train_bpe([str(tmp_path / "d.jsonl")], 300, text_field="content", max_documents=3, show_progress=False)
        with pytest.raises(ValueError, match="d.jsonl:1: record has no 'text' field"):
            train_bpe([str(tmp_path / "d.jsonl")], 300, show_progress=False)
    assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"
    assert len(tok.encode(" quick brown fox")) < len(" quick brown fox") // 2  # it learnt the content's words


@pytest.mark.parametrize("damage, says", [
    ("idx_of_val", "train.idx.npy does not index"),
    ("idx_past_end", "train.idx.npy does not index"),
    ("dtype_float", "meta.json is not valid (dtype float16"),
    ("separator_out_of_vocab", "separator_id 99999 do not go with vocab_size"),
])
def test_a_prepared_folder_whose_parts_do_not_fit_is_refused(prepared, tmp_path, damage, says):
    """A document index from another split or preparation, a dtype or separator prepare never writes,
    loaded silently: evaluation then read wrong document lengths, or every token id was garbage."""
    import shutil

    src, _ = prepared
    d = tmp_path / "ds"
    shutil.copytree(src, d)
    meta = json.loads((d / "meta.json").read_text())
    if damage == "idx_of_val":
        shutil.copy(d / "val.idx.npy", d / "train.idx.npy")
    elif damage == "idx_past_end":
        offsets = np.load(d / "train.idx.npy")
        np.save(d / "train.idx.npy", np.append(offsets[:-1], meta["tokens"]["train"] + 5))
    elif damage == "dtype_float":
        (d / "meta.json").write_text(json.dumps({**meta, "dtype": "float16"}))
    else:
        (d / "meta.json").write_text(json.dumps({**meta, "separator_id": 99999}))
    with pytest.raises(ValueError) as e:
        PackedDataset(d, "train")
    assert says in str(e.value) and "--overwrite" in str(e.value), str(e.value)
    PackedDataset(src, "train")  # the intact folder loads


def test_packed_source_names_a_token_id_outside_the_vocabulary(prepared, tmp_path):
    """A corrupt .bin (ids past the vocabulary) gave batches the model's embedding fails on far from
    the cause (on CUDA, a device-side assert): the batch source names the file and the position."""
    import shutil

    src, meta = prepared
    d = tmp_path / "ds"
    shutil.copytree(src, d)
    tokens = np.memmap(d / "train.bin", dtype=np.uint16, mode="r+")
    tokens[7] = 60000
    tokens.flush()
    del tokens
    s = build_source(str(d), seq_len=meta["tokens"]["train"])  # one window: the whole split
    with pytest.raises(ValueError, match=r"train.bin holds token id 60000 at position 7, outside its vocabulary"):
        s.get_batch(0, 1)


def test_a_prepared_folder_named_with_plus_or_at_is_one_source(prepared, tmp_path):
    """`data/c++-docs` was split into the mixture `data/c` + `-docs` (and `x@y` into a weight): a spec that is
    a prepared folder is that folder."""
    out, _ = prepared
    for name in ("c++-docs", "v@2"):
        link = tmp_path / name
        link.symlink_to(out, target_is_directory=True)
        src = build_source(str(link), seq_len=189, seed=0)
        assert src.get_batch(0, 2)["input_ids"].shape == (2, 189)
        assert torch.equal(src.get_batch(3, 2)["input_ids"], build_source(str(out), seq_len=189, seed=0).get_batch(3, 2)["input_ids"])


def test_mixture_weights_must_be_finite(prepared):
    """`DIR@inf` ended in numpy's "Probabilities contain NaN"."""
    out, _ = prepared
    with pytest.raises(ValueError, match="mixture weights must be finite numbers >= 0, got inf"):
        build_source(f"{out}@inf+{out}@1", seq_len=16)


def test_prepare_into_a_file_says_so(corpus, tmp_path):
    """--out naming an existing file gave "[Errno 17] File exists"."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile exists and is a file; choose another"):
        prepare([str(corpus)], tmp_path / "afile", progress=False)


def test_train_tokenizer_command_reads_the_text_field_and_max_documents(tmp_path):
    """`python -m gca.data train-tokenizer` had no --text-field (a JSONL corpus with another field failed)
    nor --max-documents."""
    from gca.data.__main__ import main

    lines = [json.dumps({"content": f"doc {i}: " + "the quick brown fox jumps over the lazy dog. " * 10}) for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines + ["not json: past --max-documents"]) + "\n")
    with pytest.warns(UserWarning, match="fewer than the vocab_size=300"):
        assert main(["train-tokenizer", str(tmp_path / "d.jsonl"), "--vocab-size", "300", "--out", str(tmp_path / "tok"),
                     "--text-field", "content", "--max-documents", "4"]) == 0
    assert load_tokenizer(tmp_path / "tok").vocab_size > 256
