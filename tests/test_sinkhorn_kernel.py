"""The compiled Sinkhorn kernel (model/sinkhorn.c) against the torch code it replaces, and its fallbacks."""
import shutil

import pytest
import torch
from torch.testing import assert_close

from hyperloop_lm.model import hyper, sinkhorn_kernel

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """A fresh kernel cache (and a fresh availability decision) for this test, and again after it."""
    monkeypatch.setenv("HYPERLOOP_LM_DATA", str(tmp_path))
    sinkhorn_kernel._library.cache_clear()
    yield tmp_path
    sinkhorn_kernel._library.cache_clear()


def torch_code(logits, grad, iters):
    m0 = hyper._exp_shifted(logits)
    out, *saved = hyper._iterate(m0, iters)
    return out, hyper._iterate_backward(grad, *saved)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_the_torch_code(dtype, rebuild):
    """Every n the model allows, token counts around the kernel's block of 64, 0/1/20 iterations: forward
    and backward agree to rounding (the kernel multiplies by reciprocals where the torch code divides)."""
    assert sinkhorn_kernel.available(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.manual_seed(0)
    for n in (1, 2, 3, 4, 5, 16):
        for ntok, iters in ((1, 20), (63, 1), (64, 0), (65, 20), (200, 20)):
            logits = torch.randn(ntok, n, n, dtype=dtype) * 2
            grad = torch.randn(ntok, n, n, dtype=dtype)
            ref_out, ref_grad = torch_code(logits, grad, iters)
            m0 = hyper._exp_shifted(logits)
            assert_close(sinkhorn_kernel.forward(m0, iters), ref_out, **tol, msg=f"forward n={n} ntok={ntok}")
            assert_close(sinkhorn_kernel.backward(grad, m0, iters), ref_grad, **tol, msg=f"backward n={n} ntok={ntok}")


@needs_cc
def test_kernel_takes_any_leading_axes_and_strided_inputs(rebuild):
    logits = torch.randn(3, 5, 4, 4, dtype=torch.float64).transpose(0, 1)  # not contiguous
    grad = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    ref_out, ref_grad = torch_code(logits, grad, 20)
    x = logits.clone().requires_grad_()
    out = hyper.sinkhorn(x, 20)
    out.backward(grad)
    assert_close(out, ref_out, rtol=1e-12, atol=1e-13)
    assert_close(x.grad, ref_grad, rtol=1e-12, atol=1e-13)


def test_without_a_compiler_the_torch_code_runs_with_one_warning(rebuild, monkeypatch):
    monkeypatch.setenv("CC", str(rebuild / "no-such-cc"))
    logits = torch.randn(10, 4, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="Sinkhorn kernel is unavailable"):
        out = hyper.sinkhorn(logits)
    assert not sinkhorn_kernel.available()
    out.sum().backward()  # the torch code, end to end
    assert_close(out.sum(-2), torch.ones(10, 4), atol=1e-4, rtol=0)
    assert not list(rebuild.glob("kernels/*.so"))


def test_env_switch_forces_the_torch_code(rebuild, monkeypatch):
    monkeypatch.setenv("HYPERLOOP_LM_SINKHORN", "torch")
    assert not sinkhorn_kernel.available()
    assert not hyper._use_kernel(torch.zeros(2, 4, 4))


@needs_cc
def test_kernel_is_built_once_per_machine_and_reused(rebuild):
    assert sinkhorn_kernel.available()
    (lib,) = rebuild.glob("kernels/sinkhorn-float-*.so")
    stamp = lib.stat().st_mtime_ns
    sinkhorn_kernel._library.cache_clear()
    assert sinkhorn_kernel.available()
    assert lib.stat().st_mtime_ns == stamp and len(list(rebuild.glob("kernels/*"))) == 1  # no temp files left


@needs_cc
def test_more_streams_than_the_kernel_handles_use_the_torch_code(rebuild):
    logits = torch.randn(3, 17, 17)
    assert not hyper._use_kernel(logits)
    assert_close(hyper.sinkhorn(logits, 50).sum(-1), torch.ones(3, 17), atol=1e-5, rtol=0)
