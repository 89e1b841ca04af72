"""The one language-model class. Every family is a config (see hyperloop_lm.config):

    tokens -> embed -> begin blocks (once) -> middle blocks x loops (shared weights) -> end blocks (once)
           -> final RMSNorm -> untied head

Hyperloop widens the stream to n copies around the looped middle and mixes them once per loop
(`hc_every` unrolled middle layers per site); mHC keeps n streams through the whole stack.
Each attention call gets a virtual layer index (its position in the unrolled schedule) which keys
the KV cache and the per-depth analyses.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn

from hyperloop_lm.config import ModelConfig
from hyperloop_lm.model.hyper import HyperConnection
from hyperloop_lm.model.layers import Block, ForwardContext, LoopLoRA, rope_tables
from hyperloop_lm.utils import UserError

# Linear layers that write into the residual stream (scaled down by the GPT-2 init).
RESIDUAL_PROJECTIONS = ("attn.wo", "mlp.down")


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, mhc = cfg.d_model, cfg.connection == "mhc"
        lora_loops = cfg.loops if cfg.lora_rank else 0
        self.embed = nn.Embedding(cfg.vocab_size, C)
        self.begin = nn.ModuleList(Block(cfg, mhc=mhc) for _ in range(cfg.n_begin))
        self.middle = nn.ModuleList(Block(cfg, lora_loops=lora_loops, mhc=mhc) for _ in range(cfg.n_middle))
        self.end = nn.ModuleList(Block(cfg, mhc=mhc) for _ in range(cfg.n_end))
        # Loop-level hyper-connections: one site per `hc_span` unrolled middle layers, own parameters each.
        self.hc = nn.ModuleList(HyperConnection.from_config(cfg, cfg.h_res) for _ in range(cfg.hc_sites))
        # Learned loop position embeddings e_l, added to the output of each loop (Looped) / HC site.
        n_embed = cfg.hc_sites if cfg.connection == "loop_hc" else (cfg.loops if cfg.n_middle and cfg.loops > 1 else 0)
        self.loop_embed = nn.Parameter(torch.zeros(n_embed, C)) if cfg.loop_embedding and n_embed else None
        self.norm = nn.RMSNorm(C, eps=cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)  # untied [paper]
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """`pytorch`: module defaults (paper main text). `gpt2`: N(0, 0.02), residual projections
        N(0, 0.02/sqrt(2*unrolled_depth)) (paper v3 appendix). HC and LoRA parameters keep their own init."""
        if self.cfg.init != "gpt2":
            return
        small = 0.02 / math.sqrt(2 * self.cfg.unrolled_depth)
        nn.init.normal_(self.embed.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=small if name.endswith(RESIDUAL_PROJECTIONS) else 0.02)

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile per block (short compiles; one graph serves every loop of a shared block), and the
        read and write of each loop-level HC site, which wraps a whole block and so cannot be one graph."""
        for module in [*self.begin, *self.middle, *self.end, *self.hc]:
            module.compile(**kwargs)

    # ------------------------------------------------------------------ schedule
    def schedule(self, loops: int | None = None) -> Iterator[tuple[str, int, int]]:
        """The unrolled depth as (stage, layer index, loop) triples; the position is the virtual layer."""
        loops = self.cfg.loops if loops is None else loops
        yield from (("begin", i, 0) for i in range(self.cfg.n_begin))
        yield from (("middle", j, l) for l in range(loops) for j in range(self.cfg.n_middle))
        yield from (("end", i, 0) for i in range(self.cfg.n_end))

    def depth(self, loops: int | None = None) -> int:
        """Unrolled depth (= number of virtual layers = KV-cache slots needed)."""
        return sum(1 for _ in self.schedule(loops))

    # ------------------------------------------------------------------ forward
    def check_tokens(self, idx: torch.Tensor) -> None:
        """Clear error for out-of-vocabulary ids (the embedding would fail obscurely, on CUDA asynchronously)."""
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise UserError(f"token ids must lie in [0, {self.cfg.vocab_size}); got min {int(idx.min())}, "
                            f"max {int(idx.max())} (was the text encoded with this model's tokenizer?)")

    def forward(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None, cache=None,
                loops: int | None = None, trace: list | None = None, grad_last_loops: int | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V).

        attention_mask: (B, S) with 1 for real tokens, 0 for (left) padding, S = cached + new tokens.
        cache: a KV cache (hyperloop_lm.infer.cache.KVCache) sized to `self.depth(loops)` virtual layers.
        loops: run the middle block this many times (default: the trained count); per-loop parameters
            beyond the trained count reuse the last loop's.
        trace: if a list, receives (stage, virtual layer, loop, hidden) after every layer and
            ("streams", site, loop, y) after every loop-level HC site, for analysis.
        grad_last_loops: truncated backprop through loops: gradients flow only through the last k loops
            (the state entering loop L-k is detached, so earlier loops and the begin block get none).
        """
        B, T = idx.shape
        ctx = self._context(B, T, idx.device, attention_mask, cache)
        x = self.embed(idx)  # (B, T, C)
        if self.cfg.connection == "mhc":
            x = x.unsqueeze(-2).expand(B, T, self.cfg.n_streams, self.cfg.d_model)  # (B, T, n, C)
        v = 0
        for i, blk in enumerate(self.begin):
            x = blk(x, ctx, v)
            self._trace(trace, "begin", v, 0, x)
            v += 1
        x, v = self._middle(x, ctx, v, self.cfg.loops if loops is None else loops, trace, grad_last_loops)
        for blk in self.end:
            x = blk(x, ctx, v)
            self._trace(trace, "end", v, 0, x)
            v += 1
        if self.cfg.connection == "mhc":
            x = x.mean(dim=-2)
        if cache is not None:
            cache.advance(T)
        return self.head(self.norm(x))

    def _middle(self, x: torch.Tensor, ctx: ForwardContext, v: int, loops: int, trace: list | None,
                grad_last_loops: int | None = None):
        cfg = self.cfg
        if cfg.n_middle == 0 or loops == 0:
            return x, v
        if loops != cfg.loops and cfg.connection == "loop_hc" and cfg.hc_span != cfg.n_middle:
            raise UserError(f"loop override needs HC sites aligned with loops (hc_every={cfg.hc_every} spans "
                            f"{cfg.hc_span} layers, the middle block has {cfg.n_middle})")
        steps = [(l, j) for l in range(loops) for j in range(cfg.n_middle)]  # the unrolled middle
        cut = (loops - grad_last_loops, 0) if grad_last_loops and grad_last_loops < loops else None
        if cfg.connection != "loop_hc":
            for i, (l, j) in enumerate(steps):
                if (l, j) == cut:
                    x = x.detach()
                x = self.middle[j](x, ctx, v + i, loop=l)
                self._trace(trace, "middle", v + i, l, x)
                if j == cfg.n_middle - 1 and self.loop_embed is not None:
                    x = x + self.loop_embed[min(l, len(self.loop_embed) - 1)]
            return x, v + len(steps)

        span = cfg.hc_span
        y = x.unsqueeze(-2).expand(*x.shape[:-1], cfg.n_streams, cfg.d_model)  # expand: n copies (B, T, n, C)
        for s in range(len(steps) // span):
            seg, site = steps[s * span:(s + 1) * span], min(s, len(self.hc) - 1)

            def run(h: torch.Tensor, seg=seg, first=v + s * span, site=site) -> torch.Tensor:
                h_in = h
                for i, (l, j) in enumerate(seg):
                    h = self.middle[j](h, ctx, first + i, loop=l)
                    self._trace(trace, "middle", first + i, l, h)
                if cfg.hc_block_output == "delta":
                    h = h - h_in
                return h if self.loop_embed is None else h + self.loop_embed[site]

            if seg[0] == cut:
                y = y.detach()
            y = self.hc[site](y, run)
            if trace is not None:
                trace.append(("streams", s, seg[-1][0], y))
        return y.mean(dim=-2), v + len(steps)  # collapse: mean over streams

    @staticmethod
    def _trace(trace: list | None, stage: str, vlayer: int, loop: int, x: torch.Tensor) -> None:
        if trace is not None:
            trace.append((stage, vlayer, loop, x))

    def _context(self, B: int, T: int, device: torch.device, attention_mask: torch.Tensor | None, cache) -> ForwardContext:
        past = cache.pos if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise UserError(f"sequence of {past + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        q_abs = torch.arange(past, past + T, device=device)  # absolute positions of the new tokens
        causal = torch.arange(past + T, device=device)[None, :] <= q_abs[:, None]  # (T, S); shape-only: traceable
        if attention_mask is None:
            pos = q_abs.unsqueeze(0)  # (1, T)
            mask = causal[None, None] if cache is not None else None  # no cache: SDPA's is_causal
        else:
            if attention_mask.shape != (B, past + T):
                raise UserError(f"attention_mask must have shape (batch, cached + new tokens) = {(B, past + T)}, "
                                f"got {tuple(attention_mask.shape)}")
            keep = attention_mask.bool()
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # real-token positions (left padding)
            own = torch.arange(past + T, device=device)[None, :] == q_abs[:, None]  # a pad query sees itself: no NaN
            mask = ((causal & keep[:, None, :]) | own)[:, None]  # (B, 1, T, S)
        return ForwardContext(self.rope_cos[pos], self.rope_sin[pos], mask, cache)

    # ------------------------------------------------------------------ counting
    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.embed.weight.numel()


__all__ = ["LM", "LoopLoRA"]
