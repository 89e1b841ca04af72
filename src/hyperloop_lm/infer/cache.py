"""KV cache keyed by the *virtual* (unrolled) layer index.

A looped model runs the same attention module several times per token; each call is a different
virtual layer with its own keys and values. The cache is preallocated for the whole unrolled depth.
"""
from __future__ import annotations

import torch

from hyperloop_lm.utils import UserError


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens cached so far (the same for every virtual layer)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None, loops: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        cfg = model.cfg
        p = next(model.parameters())
        return cls(model.depth(loops), batch, cfg.n_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                   device=p.device, dtype=dtype or (p.dtype if p.is_floating_point() else torch.float32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, vlayer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) at positions [pos, pos+T) of `vlayer`; return all cached (B, H, pos+T, hd)."""
        end = self.pos + k.shape[2]
        if vlayer >= self.k.shape[0]:
            raise UserError(f"KV cache has {self.k.shape[0]} virtual layers but layer {vlayer} was asked for; "
                            "size the cache with the same `loops` as the forward")
        if end > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} tokens; {end} needed")
        self.k[vlayer, :, :, self.pos:end] = k
        self.v[vlayer, :, :, self.pos:end] = v
        return self.k[vlayer, :, :, :end], self.v[vlayer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
