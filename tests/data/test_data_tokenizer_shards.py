"""Tokenizer training/saving/loading and token shards: round trips, caching, determinism, dtype."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers

from hyperloop_lm.data import Tokenizer, build_shards, load_corpus, load_tokenizer, prepare_data, train_tokenizer
from hyperloop_lm.data.shards import open_shard, token_dtype
from hyperloop_lm.utils import UserError

SAMPLE = "The whale, the captain and Caf\u00e9 \u00fcber-na\u00efve \U0001f433!\n\n  Indented\tline.\n"


def test_bpe_round_trip_save_load(small_data, tmp_path):
    corpus, tok, _ = small_data
    assert tok.vocab_size == 512 and tok.eos_id == 0 and tok.decode([tok.eos_id]) == "<|endoftext|>"
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE  # byte-level: lossless on any text
    assert tok.encode_batch([SAMPLE, "sea"]) == [ids, tok.encode("sea")]
    assert len(ids) < len(SAMPLE.encode())  # merges were learned
    loaded = Tokenizer.load(tok.save(tmp_path / "tok"))
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert loaded.encode(SAMPLE) == ids and loaded.hash == tok.hash and loaded.eos_id == tok.eos_id
    assert loaded.name == tok.name
    assert load_tokenizer(str(tmp_path / "tok")).hash == tok.hash


def test_bpe_training_is_deterministic_and_cached(small_data, data_cache):
    corpus, tok, _ = small_data
    again = train_tokenizer(corpus, 512, cache=False)
    assert again._tok.to_str() == tok._tok.to_str()
    cached_dir = data_cache / "tokenizers" / f"bpe512-{corpus.id}"
    assert (cached_dir / "tokenizer.json").is_file()
    (cached_dir / "tokenizer.json").touch()
    before = (cached_dir / "tokenizer.json").stat().st_mtime_ns
    assert train_tokenizer(corpus, 512).hash == tok.hash
    assert (cached_dir / "tokenizer.json").stat().st_mtime_ns == before  # loaded, not retrained
    assert train_tokenizer(corpus, 600, cache=False).hash != tok.hash


def test_tokenizer_bad_inputs(small_data):
    corpus, _, _ = small_data
    with pytest.raises(UserError, match="at least 257"):
        train_tokenizer(corpus, 100)
    with pytest.raises(UserError, match="a corpus is needed"):
        load_tokenizer("bpe")
    with pytest.raises(UserError, match="did you mean 'llama2'"):
        load_tokenizer("lama2")


def test_shards_content_and_sidecar(small_data):
    corpus, tok, shards = small_data
    for split in ("train", "val"):
        shard = shards[split]
        tokens = np.asarray(shard.tokens)
        assert tokens.dtype == np.uint16 and shard.meta["dtype"] == "uint16"
        docs = list(corpus.documents(split))
        # doc0 EOS doc1 EOS ...: splitting at EOS gives back every document.
        ends = np.flatnonzero(tokens == tok.eos_id)
        assert len(ends) == len(docs) and ends[-1] == len(tokens) - 1
        pieces = np.split(tokens, ends + 1)[:-1]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
        meta = json.loads(shard.path.with_suffix(".json").read_text())
        assert meta["n_tokens"] == len(tokens) == shard.n_tokens
        assert meta["n_bytes"] == corpus.n_bytes(split) and meta["tokenizer_hash"] == tok.hash
        assert meta["manifest_version"] == 1 and meta["n_documents"] == len(docs)
        assert 1.5 < shard.bytes_per_token < 8  # merges compress the text


def test_shards_are_deterministic_and_cached(small_data, data_cache, monkeypatch):
    corpus, tok, shards = small_data
    first = {s: shards[s].path.read_bytes() for s in shards}
    assert build_shards(corpus, tok)["train"].path == shards["train"].path  # cache hit
    monkeypatch.setenv("HYPERLOOP_LM_DATA", str(data_cache / "other"))
    corpus2 = load_corpus(str(corpus.manifest["sources"][0]["spec"]), val_fraction=0.2)
    fresh = build_shards(corpus2, train_tokenizer(corpus2, 512))
    assert fresh["train"].path != shards["train"].path
    assert {s: fresh[s].path.read_bytes() for s in fresh} == first


def test_incomplete_shard_is_rebuilt(small_data):
    corpus, tok, shards = small_data
    path = shards["train"].path
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)  # as if a crash cut the write short
    assert open_shard(path) is None
    assert build_shards(corpus, tok)["train"].n_tokens == shards["train"].n_tokens


def test_uint32_for_large_vocabularies(small_data):
    corpus, tok, shards = small_data
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    inner = tokenizers.Tokenizer.from_str(tok._tok.to_str())
    inner.add_tokens([f"<unused{i}>" for i in range(65536 - tok.vocab_size)])
    big = Tokenizer(inner, "big", "<|endoftext|>")
    assert big.vocab_size == 65536
    wide = build_shards(corpus, big, splits=["val"])["val"]
    assert wide.tokens.dtype == np.uint32 and wide.meta["dtype"] == "uint32"
    np.testing.assert_array_equal(wide.tokens, shards["val"].tokens)


def test_prepare_data_end_to_end(corpus_dir):
    data = prepare_data(str(corpus_dir), vocab_size=300, val_fraction=0.2)
    assert data.tokenizer.vocab_size == 300
    assert data.train.n_tokens > data.val.n_tokens > 0
    assert data.train.meta["corpus_id"] == data.corpus.id
