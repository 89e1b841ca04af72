"""Fixtures for the data tests: an isolated cache and a small English-like corpus on disk."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

_WORDS = ("the state of union nation people congress year war peace law trade whale ship sea captain "
          "king queen lord love night day house city river money work government freedom justice time "
          "good great new old first last long little own other right high small large next early young "
          "said made went came took found gave told asked called thought knew felt seemed became left").split()


def make_text(rng: random.Random, n_sentences: int) -> str:
    """English-looking paragraphs: capitalized sentences of common words, some punctuation."""
    paragraphs, sentences = [], []
    for i in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        if rng.random() < 0.3:
            words[rng.randrange(1, len(words))] += ","
        sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
        if rng.random() < 0.25 or i == n_sentences - 1:
            paragraphs.append(" ".join(sentences))
            sentences = []
    return "\n\n".join(paragraphs) + "\n"


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
