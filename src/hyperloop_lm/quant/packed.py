"""Real low-bit storage and a linear layer that dequantizes its weight at matmul time.

Byte layout of the packed codes. Each row is packed independently, in a *planar* layout: the row's
codes (zero-padded) are split into P equal contiguous planes of m codes, and byte j of the row holds
code j of every plane:
- 8-bit: as is, one code per byte (P = 1).
- 4-bit: P = 2, m = ceil(in/2), byte j = c[j] | c[m + j] << 4.
- 2-bit: P = 4, m = ceil(in/4), byte j = c[j] | c[m+j] << 2 | c[2m+j] << 4 | c[3m+j] << 6.
- 3-bit: bit-packed, P = 8 planes, m = ceil(in/8): word j = sum_i c[i m + j] << 3i is a 24-bit
  number stored as three byte planes [low bytes (m) | middle bytes (m) | high bytes (m)].
Why planar rather than interleaving neighbouring codes in a byte: unpacking is then P scalar
shifts whose results are written straight into contiguous column slices of the fp32 weight; the
interleaved layout needs a strided/broadcast write, which measured several times slower on CPU.

Per (row, group): scale in fp16 (2 bytes; the quantizers already rounded it, so nothing is lost) and
zero point in uint8 (1 byte; kept even for symmetric grids, where it is the constant 2^(bits-1), so
one format serves both). With 4-bit and group 128 that is 0.5 + 3/128 = 0.52 bytes per weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperloop_lm.quant.core import SCALE_DTYPE, SUPPORTED_BITS, QuantizedWeight, dequantize_codes_
from hyperloop_lm.utils import UserError


def _planes(in_features: int, bits: int) -> tuple[int, int]:
    """(number of planes P, codes per plane m) of the planar layout."""
    n_planes = 8 if bits == 3 else 8 // bits
    return n_planes, math.ceil(in_features / n_planes)


def packed_cols(in_features: int, bits: int) -> int:
    """Bytes per row after packing `in_features` codes of `bits` bits."""
    n_planes, m = _planes(in_features, bits)
    return 3 * m if bits == 3 else m


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes (out, in) uint8 in [0, 2^bits) -> packed (out, packed_cols(in, bits)) uint8."""
    if bits not in SUPPORTED_BITS:
        raise UserError(f"bits must be one of {SUPPORTED_BITS}, got {bits}.")
    n_out, n_in = codes.shape
    n_planes, m = _planes(n_in, bits)
    c = F.pad(codes.to(torch.int32), (0, n_planes * m - n_in)).view(n_out, n_planes, m)  # (out, P, m)
    shifts = torch.arange(n_planes, device=codes.device, dtype=torch.int32) * bits
    # the shifted codes occupy disjoint bits, so the sum is a bitwise or
    word = (c << shifts[:, None]).sum(1)  # (out, m), < 2^24
    if bits == 3:
        return torch.cat([(word >> (8 * k)) & 0xFF for k in range(3)], dim=1).to(torch.uint8)
    return word.to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """Inverse of `pack_codes`: packed (out, packed_cols) uint8 -> fresh contiguous codes (out, in) in `dtype`."""
    n_out = packed.shape[0]
    if bits == 8:
        return packed[:, :in_features].to(dtype, copy=True)
    n_planes, m = _planes(in_features, bits)
    mask = 2**bits - 1
    if bits == 3:
        b = packed.to(torch.int32)
        src = b[:, :m] | (b[:, m : 2 * m] << 8) | (b[:, 2 * m :] << 16)  # (out, m) 24-bit words
    else:
        src = packed  # (out, m) uint8; scalar shifts on uint8 stay in uint8
    out = torch.empty(n_out, n_planes * m, dtype=dtype, device=packed.device)
    for i in range(n_planes):  # plane i -> contiguous column slice i (converted to dtype on write)
        out[:, i * m : (i + 1) * m] = (src >> (bits * i)) & mask
    return out if n_planes * m == in_features else out[:, :in_features].contiguous()


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored as packed low-bit codes + per-group fp16 scales / uint8 zeros.

    The weight is dequantized inside `forward` for this layer only (no up-front full-model
    dequantize), so resident memory is the packed size plus one layer's fp32 weight at a time.
    All state lives in buffers (`qweight`, `scales`, `zeros`, optional `perm` and `bias`), so
    `state_dict()` can be saved with safetensors. Build an empty layer with the same arguments to
    load a state dict into it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = True,
        act_order: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise UserError(f"bits must be one of {SUPPORTED_BITS}, got {bits}.")
        if group_size != -1 and group_size <= 0:
            raise UserError(f"group_size must be a positive integer or -1 (per-channel), got {group_size}.")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        n_groups = math.ceil(in_features / self.group_size)
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features, bits), **u8))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, **u8))
        # perm[k] = original input column stored at k (act-order); int32 halves its bytes vs int64
        perm = torch.arange(in_features, dtype=torch.int32, device=device) if act_order else None
        self.register_buffer("perm", perm)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_codes(cls, qw: QuantizedWeight, bias: Tensor | None = None) -> "QuantizedLinear":
        """Pack a `QuantizedWeight` (from `quantize_rtn` or `gptq_quantize`) into a layer."""
        n_out, n_in = qw.codes.shape
        layer = cls(
            n_in, n_out, qw.bits, qw.group_size, bias=bias is not None,
            act_order=qw.perm is not None, device=qw.codes.device,
        )
        layer.qweight.copy_(pack_codes(qw.codes, qw.bits))
        layer.scales.copy_(qw.scales)
        layer.zeros.copy_(qw.zeros)
        if qw.perm is not None:
            layer.perm.copy_(qw.perm)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize_storage(self) -> Tensor:
        """(out, in) fp32 weight with columns in storage (perm) order."""
        q = unpack_codes(self.qweight, self.bits, self.in_features, torch.float32)  # (out, in)
        return dequantize_codes_(q, self.scales, self.zeros, self.group_size)

    def dequantize(self) -> Tensor:
        """(out, in) fp32 weight in the original column order (for inspection and tests)."""
        w = self.dequantize_storage()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm.long()] = w
        return out

    def forward(self, x: Tensor) -> Tensor:  # x (..., in) -> (..., out)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)  # act-order: permute activations, not the weight
        w = self.dequantize_storage().to(x.dtype)  # (out, in), freed after this call
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight: packed codes + scales + zeros (+ perm); bias excluded."""
        bufs = [self.qweight, self.scales, self.zeros] + ([self.perm] if self.perm is not None else [])
        return sum(b.numel() * b.element_size() for b in bufs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, act_order={self.perm is not None}"
        )


class QuantizedEmbedding(QuantizedLinear):
    """nn.Embedding whose table (num_embeddings, dim) is stored like a QuantizedLinear weight: each
    row (one token) has its own packed codes and per-group scales/zeros along `dim`.

    A lookup unpacks and dequantizes only the rows it needs, so the table is never materialized in
    fp32. Same buffers and byte layout as QuantizedLinear (out = num_embeddings, in = dim); no bias,
    no act-order (row quantization by RTN: an embedding has no input Hessian to order columns by).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, group_size: int = 128,
                 device: torch.device | str | None = None):
        super().__init__(embedding_dim, num_embeddings, bits, group_size, bias=False, act_order=False, device=device)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def from_codes(cls, qw: QuantizedWeight, bias: Tensor | None = None) -> "QuantizedEmbedding":
        if bias is not None or qw.perm is not None:
            raise ValueError("a quantized embedding has no bias and no column permutation")
        n_rows, dim = qw.codes.shape
        layer = cls(n_rows, dim, qw.bits, qw.group_size, device=qw.codes.device)
        layer.qweight.copy_(pack_codes(qw.codes, qw.bits))
        layer.scales.copy_(qw.scales)
        layer.zeros.copy_(qw.zeros)
        return layer

    def forward(self, idx: Tensor) -> Tensor:  # idx (...) int64 -> (..., dim) fp32
        flat = idx.reshape(-1)
        q = unpack_codes(self.qweight[flat], self.bits, self.in_features, torch.float32)  # (n, dim)
        w = dequantize_codes_(q, self.scales[flat], self.zeros[flat], self.group_size)
        return w.view(*idx.shape, self.in_features)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}")
