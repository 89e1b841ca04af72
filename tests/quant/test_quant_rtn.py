"""Round-to-nearest and the shared grid / representation."""
from __future__ import annotations

import pytest
import torch

from hyperloop_lm.quant.core import dequantize_codes, find_grid, quantize_rtn
from hyperloop_lm.utils import UserError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1, 48])  # 48 does not divide 160: ragged last group
def test_rtn_codes_grid_and_error_bound(bits: int, sym: bool, group_size: int) -> None:
    w = torch.randn(16, 160) * torch.rand(16, 1)  # rows of different magnitude
    qw = quantize_rtn(w, bits, group_size, sym)
    gs = 160 if group_size == -1 else group_size
    n_groups = -(-160 // gs)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (16, 160)
    assert int(qw.codes.max()) <= 2**bits - 1
    assert qw.scales.shape == qw.zeros.shape == (16, n_groups)
    assert qw.scales.dtype == torch.float16 and qw.perm is None
    if sym:
        assert torch.all(qw.zeros == 2 ** (bits - 1))
    # inside the grid the error is at most half a step; only the extremes can clip (symmetric: the
    # grid has one code fewer above zero; asymmetric: the integer zero point shifts the grid by up
    # to half a step), and never by more than one step
    step = qw.scales.float().repeat_interleave(gs, dim=1)[:, :160]
    err = (qw.dequantize() - w).abs()
    assert torch.all(err <= step * 1.0001)
    assert (err <= step * 0.5001).float().mean() > 0.97
    assert torch.equal(qw.g_idx, torch.arange(160) // gs)


def test_rtn_is_nearest_grid_point() -> None:
    """Every code is the nearest of all 2^bits grid points (asymmetric grid contains the group)."""
    w = torch.randn(8, 64)
    qw = quantize_rtn(w, bits=3, group_size=16, sym=False)
    s = qw.scales.float().repeat_interleave(16, 1)
    z = qw.zeros.float().repeat_interleave(16, 1)
    grid = (torch.arange(8.0)[None, None, :] - z[..., None]) * s[..., None]  # (8, 64, 8) all points
    best = (grid - w[..., None]).abs().amin(-1)
    torch.testing.assert_close((qw.dequantize() - w).abs(), best, rtol=0, atol=1e-6)


def test_grid_all_zero_row_and_fp16_scales() -> None:
    w = torch.zeros(2, 8)
    w[1] = torch.linspace(-1, 3, 8)
    scale, zero = find_grid(w, bits=4, sym=False)
    assert scale[0] > 0 and torch.isfinite(scale).all()  # an all-zero row still gets a usable grid
    assert torch.equal(scale, scale.half().float())  # exactly representable in the fp16 storage
    assert zero[1] == torch.round(1 / scale[1])  # zero point maps w = 0 exactly to an integer code
    qw = quantize_rtn(w, bits=4, group_size=-1, sym=False)
    assert torch.equal(qw.dequantize()[0], torch.zeros(8))


def test_dequantize_matches_formula_ragged() -> None:
    codes = torch.randint(0, 16, (4, 10), dtype=torch.uint8)
    scales = torch.rand(4, 3).half()
    zeros = torch.randint(0, 16, (4, 3), dtype=torch.uint8)
    w = dequantize_codes(codes, scales, zeros, group_size=4)  # groups [0:4], [4:8], [8:10]
    g = torch.arange(10) // 4
    expect = (codes.float() - zeros.float()[:, g]) * scales.float()[:, g]
    assert torch.equal(w, expect)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=5), "bits must be one of"),
        (dict(group_size=0), "group_size must be"),
    ],
)
def test_rtn_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        quantize_rtn(torch.randn(4, 8), **kwargs)
    with pytest.raises(UserError, match="2-D"):
        quantize_rtn(torch.randn(4, 8, 2))
