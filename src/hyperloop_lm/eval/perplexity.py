"""Held-out perplexity and bits-per-byte (comparable across tokenizers)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hyperloop_lm.data.loader import SequentialLoader
from hyperloop_lm.data.shards import TokenShard


@torch.no_grad()
def evaluate(model: torch.nn.Module, shard: TokenShard, seq_len: int, batch_size: int = 16,
             max_tokens: int | None = None, progress: bool = False, loops: int | None = None) -> dict[str, float]:
    """Mean next-token loss over the first `max_tokens` held-out tokens (non-overlapping windows).

    bits/byte = loss / ln 2 * tokens / bytes, with the split's average bytes per token.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = SequentialLoader(shard, batch_size, seq_len, max_tokens=max_tokens)
    total, count = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x) if loops is None else model(x, loops=loops)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "bpb": loss / math.log(2) / shard.bytes_per_token, "tokens": count}


def unigram_loss(train: TokenShard, val: TokenShard, vocab_size: int, max_tokens: int | None = None) -> float:
    """Held-out loss of the best context-free model (add-one smoothed train unigram): the floor to beat."""
    import numpy as np

    counts = np.bincount(np.asarray(train.tokens), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    v = np.asarray(val.tokens[: max_tokens] if max_tokens else val.tokens)
    return float(-logp[v].mean())
