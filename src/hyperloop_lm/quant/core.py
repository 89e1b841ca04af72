"""The shared low-bit representation, the quantization grid, and round-to-nearest (RTN).

Every quantizer in this package (RTN here, GPTQ in `gptq.py`) returns a `QuantizedWeight`; packing
(`packed.py`) and dequantization only ever see that one representation.

Grid (per output row and per group of `group_size` consecutive input columns, in storage order):

    code = clamp(round(w / scale) + zero, 0, 2^bits - 1)        # unsigned integer code
    w_hat = scale * (code - zero)

- asymmetric: the grid spans [min(w, 0), max(w, 0)]; `zero` = round(-min / scale) is an integer.
- symmetric:  the grid spans [-amax, amax] with zero = 2^(bits-1) fixed (4-bit: codes 0..15 hold
  -8..7 steps). This is the GPTQ reference's convention, except that the reference keeps xmin = 0 for
  an all-non-negative group (wasting half the grid); we always use [-amax, amax].
- `scale` is stored in fp16 and rounded to fp16 *before* it is used to compute codes, so that GPTQ's
  error feedback sees exactly the grid that is stored (no fp32-vs-fp16 mismatch after packing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hyperloop_lm.utils import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
# Smallest normal fp16: below this fp16 loses relative precision; such groups are ~0 anyway.
_MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny
_MAX_SCALE = torch.finfo(SCALE_DTYPE).max


@dataclass
class QuantizedWeight:
    """A quantized 2-D weight W (out, in) in *storage order* (columns permuted by `perm`, if any).

    Storage column k holds original input column perm[k]; groups are contiguous in storage order
    (group of column k = k // group_size; the last group may be shorter). `perm=None` = identity.
    """

    codes: Tensor  # (out, in) uint8 in [0, 2^bits - 1], storage order
    scales: Tensor  # (out, n_groups) fp16
    zeros: Tensor  # (out, n_groups) uint8 in [0, 2^bits - 1]
    bits: int
    group_size: int  # effective group size (in_features for per-channel)
    sym: bool
    perm: Tensor | None = None  # (in,) int64, or None

    @classmethod
    def from_groups(cls, codes: Tensor, scales: list[Tensor], zeros: list[Tensor], bits: int, group_size: int,
                    sym: bool, perm: Tensor | None = None) -> "QuantizedWeight":
        """From per-group (out,) scale and zero vectors, in group order (how RTN and GPTQ produce them)."""
        return cls(codes=codes, scales=torch.stack(scales, 1).to(SCALE_DTYPE), zeros=torch.stack(zeros, 1).to(torch.uint8),
                   bits=bits, group_size=group_size, sym=sym, perm=perm)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def g_idx(self) -> Tensor:
        """(in,) group index of every *original* input column (the GPTQ/AutoGPTQ `g_idx` convention)."""
        n_in = self.codes.shape[1]
        g = torch.arange(n_in, device=self.codes.device) // self.group_size
        if self.perm is None:
            return g
        out = torch.empty_like(g)
        out[self.perm] = g
        return out

    def dequantize_storage(self) -> Tensor:
        """(out, in) fp32 weights in storage order."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size)

    def dequantize(self) -> Tensor:
        """(out, in) fp32 weights in the original column order (what replaces W)."""
        w = self.dequantize_storage()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


def check_args(w: Tensor, bits: int, group_size: int) -> int:
    """Validate the common arguments; returns the effective group size."""
    if w.dim() != 2:
        raise UserError(f"quantization expects a 2-D weight (out, in), got shape {tuple(w.shape)}.")
    if bits not in SUPPORTED_BITS:
        raise UserError(f"bits must be one of {SUPPORTED_BITS}, got {bits}.")
    if group_size == -1:
        return w.shape[1]
    if group_size <= 0:
        raise UserError(f"group_size must be a positive integer or -1 (per-channel), got {group_size}.")
    # group_size need not divide in_features: the last group is shorter (as in the GPTQ reference).
    return group_size


def find_grid(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-row grid for one group. w: (out, g) -> scale (out,) (fp16-representable), zero (out,).

    `zero` holds integers in [0, 2^bits - 1]. Both come back in w's dtype (fp32, or fp64 when GPTQ
    runs in fp64 for verification) because they feed the arithmetic, not the storage.
    """
    maxq = 2**bits - 1
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    xmin = w.amin(dim=1).clamp(max=0)  # (out,) the grid always contains 0
    xmax = w.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid works, pick [-1, 1]
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).clamp(_MIN_SCALE, _MAX_SCALE).to(SCALE_DTYPE).to(w.dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """w: (out, k), scale/zero: (out, 1) or (out,) broadcastable -> codes (out, k) fp32 integers."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """codes (out, in), scales/zeros (out, n_groups) -> (out, in) fp32, storage order."""
    return dequantize_codes_(codes.to(torch.float32, copy=True), scales, zeros, group_size)


def dequantize_codes_(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """In-place version: q (out, in) contiguous fp32 codes becomes scale * (q - zero).

    In place because a fresh full-size tensor per op costs more than the arithmetic on CPU
    (page faults on large allocations); this is the hot path of `QuantizedLinear.forward`.
    """
    n_out, n_in = q.shape
    n_groups = scales.shape[1]
    s = scales.float()
    z = zeros.float()
    if n_in == n_groups * group_size:  # every group full: broadcast over a (out, G, g) view
        qv = q.view(n_out, n_groups, group_size)
        qv.sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1))
    else:  # ragged last group: expand per-column scale/zero
        q.sub_(z.repeat_interleave(group_size, dim=1)[:, :n_in])
        q.mul_(s.repeat_interleave(group_size, dim=1)[:, :n_in])
    return q


def quantize_rtn(w: Tensor, bits: int = 4, group_size: int = 128, sym: bool = False) -> QuantizedWeight:
    """Group-wise round-to-nearest of w (out, in); group_size=-1 is per-channel (one group per row)."""
    gs = check_args(w, bits, group_size)
    w = w.detach().float()
    n_out, n_in = w.shape
    codes = torch.empty(n_out, n_in, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    for g0 in range(0, n_in, gs):
        wg = w[:, g0 : g0 + gs]  # (out, g)
        scale, zero = find_grid(wg, bits, sym)
        codes[:, g0 : g0 + gs] = quantize_to_codes(wg, scale[:, None], zero[:, None], bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight.from_groups(codes, scales, zeros, bits, gs, sym)
