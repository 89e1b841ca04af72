"""The one layer type every family shares: pre-norm attention + SwiGLU MLP, RoPE, no biases.

Attention never stores state on itself: the same module runs several times per token in a looped
model, so K/V go to `ctx.cache` under the *virtual* layer index (position in the unrolled schedule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperloop_lm.config import ModelConfig


@dataclass
class ForwardContext:
    """What every attention call in one forward pass shares."""

    cos: torch.Tensor  # (B or 1, T, head_dim/2) RoPE tables at the query positions
    sin: torch.Tensor
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None = plain causal
    cache: Any | None  # a KV cache with .update(vlayer, k, v) -> (k_all, v_all), or None


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Llama / Hugging Face convention). x: (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # (B|1, 1, T, hd/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LoopLoRA(nn.Module):
    """Per-loop low-rank adapters for one shared linear layer (paper Table 7): delta_l = B_l A_l.

    Loops beyond the trained count reuse the last loop's adapter (inference-time loop override).
    """

    def __init__(self, loops: int, rank: int, d_in: int, d_out: int):
        super().__init__()
        self.a = nn.Parameter(torch.empty(loops, rank, d_in))
        self.b = nn.Parameter(torch.zeros(loops, d_out, rank))  # zero: training starts at the Looped model
        for a in self.a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, loop: int) -> torch.Tensor:
        loop = min(loop, self.a.shape[0] - 1)
        return F.linear(F.linear(x, self.a[loop]), self.b[loop])


def _linear(layer: nn.Module, lora: nn.ModuleDict | None, name: str, x: torch.Tensor, loop: int) -> torch.Tensor:
    y = layer(x)
    return y if lora is None else y + lora[name](x, loop)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, lora_loops: int = 0):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)  # writes to the residual stream
        self.lora = None
        if lora_loops:
            r = cfg.lora_rank
            self.lora = nn.ModuleDict({"wqkv": LoopLoRA(lora_loops, r, d, 3 * d), "wo": LoopLoRA(lora_loops, r, d, d)})

    def forward(self, x: torch.Tensor, ctx: ForwardContext, vlayer: int, loop: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = _linear(self.wqkv, self.lora, "wqkv", x, loop)
        q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(vlayer, k, v)  # (B, H, S, hd): everything cached so far
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None)
        return _linear(self.wo, self.lora, "wo", y.transpose(1, 2).reshape(B, T, C), loop)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, lora_loops: int = 0):
        super().__init__()
        d, h = cfg.d_model, cfg.mlp_hidden
        self.gate_up = nn.Linear(d, 2 * h, bias=False)  # gate and up projections, fused
        self.down = nn.Linear(h, d, bias=False)  # writes to the residual stream
        self.lora = None
        if lora_loops:
            r = cfg.lora_rank
            self.lora = nn.ModuleDict({"gate_up": LoopLoRA(lora_loops, r, d, 2 * h), "down": LoopLoRA(lora_loops, r, h, d)})

    def forward(self, x: torch.Tensor, loop: int = 0) -> torch.Tensor:
        gate, up = _linear(self.gate_up, self.lora, "gate_up", x, loop).chunk(2, dim=-1)
        return _linear(self.down, self.lora, "down", F.silu(gate) * up, loop)


class Block(nn.Module):
    """x + Attn(norm(x)); x + MLP(norm(x)). With `mhc=True` each sub-layer is wrapped by its own mHC site
    and x is the (B, T, n, C) stream state instead of (B, T, C)."""

    def __init__(self, cfg: ModelConfig, lora_loops: int = 0, mhc: bool = False):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, lora_loops)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg, lora_loops)
        self.attn_hc = self.mlp_hc = None
        if mhc:
            from hyperloop_lm.model.hyper import HyperConnection

            self.attn_hc = HyperConnection.for_mhc(cfg)
            self.mlp_hc = HyperConnection.for_mhc(cfg)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, vlayer: int, loop: int = 0) -> torch.Tensor:
        attn = lambda h: self.attn(self.attn_norm(h), ctx, vlayer, loop)  # noqa: E731
        mlp = lambda h: self.mlp(self.mlp_norm(h), loop)  # noqa: E731
        if self.attn_hc is None:
            x = x + attn(x)
            return x + mlp(x)
        x = self.attn_hc(x, attn)
        return self.mlp_hc(x, mlp)
