"""Fixtures for the data tests: an isolated cache and a small English-like corpus on disk."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from textgen import make_text


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every data test gets its own empty cache root, so nothing reads or writes ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HYPERLOOP_LM_DATA", str(root))
    return root


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """~60 KB in 12 documents: .txt/.md/.rst (one with invalid UTF-8 and CRLF), a subdir, an ignored .csv."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(8):
        (root / f"doc{i:02d}.txt").write_text(make_text(rng, 40))
    (root / "notes.md").write_text("# Notes\n\n" + make_text(rng, 30))
    (root / "sub" / "guide.rst").write_text("Guide\n=====\n\n" + make_text(rng, 30))
    (root / "sub" / "more.txt").write_text(make_text(rng, 30))
    # Two invalid UTF-8 sequences (a lone continuation byte, a truncated 3-byte char) and CRLF newlines.
    bad = make_text(rng, 30).replace("\n", "\r\n").encode()
    (root / "latin.txt").write_bytes(b"Caf\xe9 au lait \xe2\x82 and more.\r\n" + bad)
    (root / "table.csv").write_text("a,b\n1,2\n")  # not a text suffix: ignored in a directory
    return root


@pytest.fixture
def jsonl_file(tmp_path) -> Path:
    rng = random.Random(1)
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(30):
            f.write(json.dumps({"id": i, "text": make_text(rng, 8), "body": f"body {i}"}) + "\n")
        f.write("\n")  # a trailing blank line is fine
    return path


@pytest.fixture
def small_data(corpus_dir):
    """(corpus, 512-token BPE, shards) for the user fixture corpus: ~20k train tokens, built in ~1 s."""
    from hyperloop_lm.data import build_shards, load_corpus, train_tokenizer

    corpus = load_corpus(str(corpus_dir), val_fraction=0.2)
    tokenizer = train_tokenizer(corpus, vocab_size=512)
    return corpus, tokenizer, build_shards(corpus, tokenizer)
