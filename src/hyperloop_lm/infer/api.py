"""The Python entry point for text in, text out:

    import hyperloop_lm
    model = hyperloop_lm.load("runs/tiny-hyperloop")          # run dir or checkpoint dir
    model.generate("The state of the union", max_new_tokens=40)            # -> [str]
    model.generate(["Once", "The king said"], temperature=0.8, top_k=50, seed=0)
    model.generate("The king", loops=6)                          # extrapolate the loop count

`.model` (the LM) and `.tokenizer` are exposed for anything lower level, e.g.
`hyperloop_lm.infer.generate.generate(m.model, ids, ...)` on token ids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from hyperloop_lm.infer.generate import generate as generate_ids
from hyperloop_lm.utils import UserError


class Generator:
    """A loaded model + tokenizer with a `generate` method that maps text to text."""

    def __init__(self, model: torch.nn.Module, tokenizer, loops: int | None = None, meta: dict | None = None):
        if tokenizer is None:
            raise UserError("this checkpoint has no tokenizer.json, so text cannot be encoded; use "
                            "hyperloop_lm.infer.generate.generate(model, token_ids, ...) on ids instead")
        self.model = model
        self.tokenizer = tokenizer
        self.loops = loops  # default loop count for generate (None = the trained count)
        self.meta = meta or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        ids = [self.tokenizer.encode(t) for t in texts]
        for i, (t, p) in enumerate(zip(texts, ids)):
            if not p:
                raise UserError(f"prompt {i} ({t!r}) is empty after tokenization; give some text")
        return ids

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 loops: int | None = None, stop_at_eos: bool = True,
                 stream: Callable[[str], None] | None = None) -> list[str]:
        """Continuations (without the prompt) of one text or a list of texts; always returns a list.

        stream: called with each new piece of text as soon as it is decoded (single prompt only).
        The end-of-text token stops a continuation and is not included in the returned text.
        """
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("prompt must be a string or a non-empty list of strings")
        if stream is not None and len(texts) != 1:
            raise UserError("streaming prints one continuation; give a single prompt")
        eos = self.tokenizer.eos_id if stop_at_eos else None
        on_token = None
        if stream is not None:
            on_token = _TextStream(self.tokenizer, stream, eos)
        out = generate_ids(self.model, self.encode(texts), max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, loops=self.loops if loops is None else loops, eos_id=eos,
                           stream=on_token)
        if on_token is not None:
            on_token.flush()
        return [self.tokenizer.decode([t for t in row if t != eos]) for row in out.tokens]

    def __repr__(self) -> str:
        return f"Generator({self.model.cfg.name!r}, {self.model.cfg.family}, tokenizer={self.tokenizer!r})"


class _TextStream:
    """Turns token ids into text increments. Byte-level BPE can split one character over several
    tokens, so text ending in an incomplete character (decoded as U+FFFD) is held back until it completes."""

    def __init__(self, tokenizer, emit: Callable[[str], None], eos_id: int | None):
        self.tokenizer, self.emit, self.eos_id = tokenizer, emit, eos_id
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted

    def __call__(self, row: int, token: int) -> None:
        if token == self.eos_id:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._send(text)

    def flush(self) -> None:
        self._send(self.tokenizer.decode(self.ids))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from an fp32 or a quantized checkpoint (told apart by its meta.json)."""
    try:
        from hyperloop_lm.quant.checkpoint import load_any
    except ImportError:  # quantized checkpoints not available in this build
        from hyperloop_lm.train.checkpoint import load_model as load_any
    return load_any(path, device)


def load(path: str | Path, device: str | torch.device = "cpu", loops: int | None = None) -> Generator:
    """Load a checkpoint (or a run directory's latest; fp32 or quantized) for generation.
    device: cpu | cuda | mps | auto."""
    from hyperloop_lm.train.trainer import pick_device

    model, tokenizer, meta = load_checkpoint(path, pick_device(str(device)))
    return Generator(model, tokenizer, loops=loops, meta=meta)
