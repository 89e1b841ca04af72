"""Packed low-bit storage and QuantizedLinear."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperloop_lm.quant.core import quantize_rtn
from hyperloop_lm.quant.gptq import HessianAccumulator, gptq_quantize
from hyperloop_lm.quant.packed import QuantizedLinear, pack_codes, packed_cols, unpack_codes
from hyperloop_lm.utils import UserError, atomic_path


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n_in", [1, 5, 8, 13, 64, 250])
def test_pack_round_trip(bits: int, n_in: int) -> None:
    codes = torch.randint(0, 2**bits, (7, n_in), dtype=torch.uint8)
    codes[0] = 2**bits - 1  # all bits set must survive too
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, packed_cols(n_in, bits))
    assert torch.equal(unpack_codes(packed, bits, n_in), codes)
    assert torch.equal(unpack_codes(packed, bits, n_in, torch.float32), codes.float())


def test_packed_byte_layout() -> None:
    """The documented planar layout, byte for byte."""
    four = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)  # planes [1, 2] and [3, 4]
    assert pack_codes(four, 4).tolist() == [[1 | 3 << 4, 2 | 4 << 4]]
    two = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack_codes(two, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    three = torch.zeros(1, 8, dtype=torch.uint8)
    three[0, 7] = 5  # plane 7 -> bits 21..23 of the 24-bit word -> high byte
    assert pack_codes(three, 3).tolist() == [[0, 0, 5 << 5]]
    three[0, 2] = 7  # plane 2 -> bits 6..8: straddles the low and middle byte
    assert pack_codes(three, 3).tolist() == [[7 << 6 & 0xFF, 1, 5 << 5]]
    with pytest.raises(UserError, match="bits must be one of"):
        pack_codes(four, 5)


def _gptq_layer(n_out: int, n_in: int, bits: int, group_size: int, act_order: bool, bias: bool):
    w = torch.randn(n_out, n_in)
    acc = HessianAccumulator(n_in)
    acc.add_batch(torch.randn(256, n_in) @ torch.randn(n_in, n_in))
    qw = gptq_quantize(w, acc.H, bits, group_size, sym=False, act_order=act_order)
    b = torch.randn(n_out) if bias else None
    return qw, b, QuantizedLinear.from_codes(qw, b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_quantized_linear_forward_matches_dequantized(bits: int, act_order: bool) -> None:
    qw, bias, layer = _gptq_layer(24, 100, bits, 32, act_order, bias=True)  # 100 % 32 != 0: ragged
    assert torch.equal(layer.dequantize(), qw.dequantize())
    x = torch.randn(2, 5, 100)  # (B, T, in)
    y = layer(x)
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y, x @ qw.dequantize().T + bias, rtol=1e-5, atol=1e-5)


def test_quantized_linear_without_bias_and_low_precision_inputs() -> None:
    qw = quantize_rtn(torch.randn(16, 64), bits=4, group_size=32)
    layer = QuantizedLinear.from_codes(qw)
    assert layer.bias is None and "bias" not in layer.state_dict()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ qw.dequantize().T, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("act_order", [False, True])
def test_safetensors_round_trip(tmp_path, act_order: bool) -> None:
    _, _, layer = _gptq_layer(32, 128, 4, 64, act_order, bias=True)
    path = tmp_path / "q.safetensors"
    with atomic_path(path) as tmp:
        save_file(layer.state_dict(), str(tmp))
    state = load_file(str(path))
    assert state["qweight"].dtype == torch.uint8 and state["scales"].dtype == torch.float16
    assert ("perm" in state) == act_order
    fresh = QuantizedLinear(128, 32, bits=4, group_size=64, bias=True, act_order=act_order)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="size mismatch"):  # wrong bit width for this file
        QuantizedLinear(128, 32, bits=8, group_size=64, act_order=act_order).load_state_dict(state)


def test_weight_bytes_int4_is_an_eighth_of_fp32_plus_scales() -> None:
    n_out, n_in, gs = 256, 1024, 128
    layer = QuantizedLinear.from_codes(quantize_rtn(torch.randn(n_out, n_in), bits=4, group_size=gs))
    fp32 = n_out * n_in * 4
    n_groups = n_in // gs
    assert layer.qweight.numel() * layer.qweight.element_size() == fp32 // 8
    assert layer.weight_bytes() == fp32 // 8 + n_out * n_groups * (2 + 1)  # fp16 scale + uint8 zero
    assert layer.weight_bytes() / fp32 < 0.135
    # bit widths scale the packed part as expected (3-bit is bit-packed, not a byte per code)
    for bits in (2, 3, 8):
        q = QuantizedLinear(n_in, n_out, bits=bits, group_size=gs)
        assert q.qweight.numel() == n_out * n_in * bits // 8


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="bits must be one of"):
        QuantizedLinear(8, 8, bits=6)
    with pytest.raises(UserError, match="group_size must be"):
        QuantizedLinear(8, 8, group_size=0)
