"""The benchmarks' own model variants do what their reports say they do."""
import pytest
import torch

from benchmarks.bench_site_cost import free_coefficients
from hyperloop_lm.config import get_preset
from hyperloop_lm.model.hyper import HyperConnection
from hyperloop_lm.model.lm import LM


@pytest.mark.parametrize("family", ["mhc", "hyperloop"])
def test_free_coefficients_keep_the_mixing_and_drop_the_projection(family):
    torch.manual_seed(0)
    cfg = get_preset(f"tiny-{family}", vocab_size=64, max_seq_len=16)
    model = LM(cfg)
    x = torch.randint(0, 64, (2, 16))
    site = next(m for m in model.modules() if isinstance(m, HyperConnection))
    y = torch.randn(2, 16, cfg.n_streams, cfg.d_model)
    real = [t if t is None else (t.shape, t.dtype) for t in site._gates(y)]
    before = model(x)
    free_coefficients(model)
    # the constants stand in for exactly what the sites compute: same shapes, same dtypes
    assert [t if t is None else (t.shape, t.dtype) for t in site._gates(y)] == real
    after = model(x)
    assert not torch.allclose(before, after)  # the constants, not the learned coefficients, are used
    after.square().mean().backward()
    hc_params = {id(p) for m in model.modules() if isinstance(m, HyperConnection) for p in m.parameters()}
    assert hc_params and all(p.grad is None for p in model.parameters() if id(p) in hc_params)
    assert all(p.grad is not None for p in model.parameters() if id(p) not in hc_params)
