"""Autoregressive generation with a preallocated KV cache keyed by the *virtual* layer index.

    out = generate(model, [[5, 17, 9], [3, 4]], max_new_tokens=32)            # greedy
    out = generate(model, prompts, 32, temperature=0.8, top_k=50, top_p=0.95, seed=0)
    out.tokens   # new token ids per prompt (up to and including the first EOS)

How a batch is decoded:
- Prompts of different lengths are LEFT-padded to the longest one and an attention mask (1 = real
  token, 0 = padding) travels with them; the model derives RoPE positions from the mask
  (cumsum - 1), so a padded row produces exactly the logits it would produce alone.
- Prefill runs the whole padded prompt once and fills the cache; then each step feeds one token per
  row. The cache is allocated once for prompt + max_new_tokens positions over every virtual layer,
  i.e. `model.depth(loops)` = n_begin + loops * n_middle + n_end slots: a looped model stores K/V
  for every *unrolled* layer, because each pass of the shared block sees different inputs.
- A row stops at its first EOS; the others go on. Finished rows still ride along in the batch
  (their outputs are discarded) until every row is done or max_new_tokens is reached.

Loop override (extrapolation): `loops=K` runs the middle block K times instead of the trained
count. Policy for per-loop parameters when K exceeds the trained count: loop l >= trained uses the
*last* trained loop's parameters (its hyper-connection site and loop embedding for Hyperloop, its
loop embedding for Looped, its LoRA adapter for per-loop LoRA). K below the trained count uses the
first K loops' parameters. The cache is sized to the overridden depth. `loops` is rejected for
models without a looped middle block (Transformer, mHC), where it would silently do nothing.

Anything that only calls `model.forward` works here, so quantized models (QuantizedLinear in place
of nn.Linear) generate through the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from hyperloop_lm.infer.cache import KVCache
from hyperloop_lm.utils import UserError

# stream(row, token_id): called for every kept token as soon as it is sampled.
StreamFn = Callable[[int, int], None]


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # new ids per prompt; a row that hit EOS ends with it
    logits: torch.Tensor | None = None  # (B, steps, V) fp32 logits each step sampled from, if requested
    cache: KVCache | None = None  # the cache used (None with use_cache=False)


# ---------------------------------------------------------------------------------------------- checks
def check_request(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, loops: int | None) -> None:
    """Reject bad requests with one clear sentence each, before any compute."""
    cfg = model.cfg
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise UserError("prompts must be a non-empty list of token-id lists (encode text with the tokenizer first)")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise UserError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty; give at least one token")
        if not all(isinstance(t, int) or (isinstance(t, torch.Tensor) and t.numel() == 1) for t in p):
            raise UserError(f"prompt {i} must contain integer token ids")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise UserError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} "
                        f"exceeds the model's context of {cfg.max_seq_len} tokens; shorten the prompt or lower "
                        "max_new_tokens")
    if loops is not None:
        if not isinstance(loops, int) or loops < 1:
            raise UserError(f"loops must be a positive integer, got {loops!r}")
        if cfg.n_middle == 0:
            raise UserError(f"loops={loops} needs a looped middle block, but this {cfg.family} model has none")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must lie in (0, 1], got {top_p}")


# ---------------------------------------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy (argmax); otherwise softmax(logits / T)
    restricted to the top_k ids and then to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an id if the ids ranked above it already reach top_p (the top id always survives)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------- batching
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, P) ids left-padded to the longest prompt, and the (B, P) mask (None when nothing is padded:
    the model then uses its cheaper causal path)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor([int(t) for t in p], dtype=torch.long)
        mask[i, P - len(p):] = 1
    padded = bool((mask == 0).any())
    return ids.to(device), (mask.to(device) if padded else None)


# ---------------------------------------------------------------------------------------------- generate
@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None, loops: int | None = None,
             eos_id: int | None = None, stream: StreamFn | None = None, use_cache: bool = True,
             output_logits: bool = False) -> GenerateOutput:
    """Continue each prompt by up to `max_new_tokens` tokens.

    prompts: token-id lists (different lengths are fine: left padding + attention mask).
    temperature / top_k / top_p: sampling; temperature 0 (default) is greedy decoding.
    seed: seeds the sampler (a private torch.Generator; global RNG state is left alone).
    loops: run the middle block this many times (see the module docstring for the policy).
    eos_id: stop a row at this id (included in its output); None = always produce max_new_tokens.
    stream: callback(row, token_id) for every kept token as it is produced.
    use_cache: False recomputes the full sequence every step (the reference the cache is tested against).
    output_logits: also return the (B, steps, V) logits each token was sampled from.
    """
    check_request(model, prompts, max_new_tokens, loops)
    check_sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    pad_id = eos_id if eos_id is not None else 0  # any valid id: padded positions are masked out
    ids, mask = left_pad(prompts, pad_id, device)
    model.check_tokens(ids)
    B, P = ids.shape
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    cache = KVCache.for_model(model, batch=B, max_len=P + max_new_tokens, loops=loops) if use_cache else None
    # The mask grows by one column per step; preallocate it and hand the model a prefix view.
    full_mask = None
    if mask is not None:
        full_mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)
        full_mask[:, :P] = mask
    seq = torch.empty(B, P + max_new_tokens, dtype=torch.long, device=device)  # only used without a cache
    seq[:, :P] = ids

    tokens: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_logits = []
    inp, S = ids, P  # model input this step and total length after it
    for step in range(max_new_tokens):
        m = full_mask[:, :S] if full_mask is not None else None
        if use_cache:
            logits = model(inp, attention_mask=m, cache=cache, loops=loops)[:, -1]  # (B, V)
        else:
            logits = model(seq[:, :S], attention_mask=m, loops=loops)[:, -1]
        if output_logits:
            step_logits.append(logits.float().clone())
        nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        for row, (t, finished) in enumerate(zip(nxt.tolist(), done.tolist())):
            if not finished:
                tokens[row].append(t)
                if stream is not None:
                    stream(row, t)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        seq[:, S] = nxt
        inp, S = nxt[:, None], S + 1
    logits_out = torch.stack(step_logits, dim=1) if output_logits else None
    return GenerateOutput(tokens=tokens, logits=logits_out, cache=cache)
