"""Token shards: each split encoded once into a flat memmap file, documents separated by EOS.

    data_dir()/shards/<corpus id>-<tokenizer hash>/{train,val}.bin   raw uint16/uint32 tokens
                                                  /{train,val}.json  sidecar (below)

The sidecar carries what readers need without scanning: n_tokens, dtype, n_bytes (UTF-8 bytes of
the source text, for bits-per-byte = nats/token * n_tokens / n_bytes / ln 2), n_documents, the
tokenizer hash and the corpus manifest version. Each document is followed by one EOS token, so
the file is `doc0 EOS doc1 EOS ...`. The bytes are a pure function of (corpus, tokenizer).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from hyperloop_lm.data.corpus import SPLITS, Corpus
from hyperloop_lm.data.tokenizer import Tokenizer
from hyperloop_lm.utils import atomic_path, atomic_write_text, data_dir

log = logging.getLogger(__name__)

SHARD_FORMAT = 1
_CHUNK_BYTES = 4 << 20  # text per encode_batch call: big enough to keep all threads busy


@dataclass
class TokenShard:
    """One encoded split: `tokens` is a read-only memmap; `meta` is the sidecar."""

    path: Path
    meta: dict

    @cached_property
    def tokens(self) -> np.ndarray:
        if self.meta["n_tokens"] == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path, dtype=self.meta["dtype"], mode="r", shape=(self.meta["n_tokens"],))

    @property
    def n_tokens(self) -> int:
        return self.meta["n_tokens"]

    @property
    def bytes_per_token(self) -> float:
        return self.meta["n_bytes"] / max(1, self.meta["n_tokens"])

    def __len__(self) -> int:
        return self.n_tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536 (half the disk and page cache of uint32)."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def shard_dir(corpus: Corpus, tokenizer: Tokenizer) -> Path:
    return data_dir() / "shards" / f"{corpus.id}-{tokenizer.hash}"


def build_shards(corpus: Corpus, tokenizer: Tokenizer, splits: Iterable[str] = SPLITS) -> dict[str, TokenShard]:
    """Encode each split of `corpus` (or reuse the cached encoding); return {split: TokenShard}."""
    directory = shard_dir(corpus, tokenizer)
    shards = {}
    for split in splits:
        shard = open_shard(directory / f"{split}.bin")
        if shard is None:
            shard = _encode_split(corpus, tokenizer, split, directory / f"{split}.bin")
        shards[split] = shard
    return shards


def open_shard(path: str | Path) -> TokenShard | None:
    """The shard at `path` if it and a matching sidecar are complete, else None."""
    path = Path(path)
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("format") != SHARD_FORMAT or size != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return TokenShard(path, meta)


def _encode_split(corpus: Corpus, tokenizer: Tokenizer, split: str, path: Path) -> TokenShard:
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    n_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=corpus.n_bytes(split), unit="B", unit_scale=True, desc=f"encoding {corpus.name}/{split}",
               disable=None, leave=False)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, bar:
        for chunk in _chunks(corpus.documents(split), _CHUNK_BYTES):
            for ids in tokenizer.encode_batch(chunk):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                f.write(eos.tobytes())
                n_tokens += len(ids) + 1
            bar.update(sum(len(t.encode()) for t in chunk))
    seconds = time.perf_counter() - t0
    meta = {
        "format": SHARD_FORMAT,
        "split": split,
        "n_tokens": n_tokens,
        "dtype": dtype.name,
        "n_bytes": corpus.n_bytes(split),
        "n_documents": corpus.n_documents(split),
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name,
        "tokenizer_hash": tokenizer.hash,
        "corpus": corpus.name,
        "corpus_id": corpus.id,
        "manifest_version": corpus.manifest["manifest_version"],
    }
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    log.info("encoded %s/%s: %d tokens (%.2f bytes/token) in %.1f s", corpus.name, split, n_tokens,
             meta["n_bytes"] / max(1, n_tokens), seconds)
    return TokenShard(path, meta)


def _chunks(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
