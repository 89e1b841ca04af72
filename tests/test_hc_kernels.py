"""The compiled HC kernels (model/hc_kernels.c) against the torch code they replace, and their fallbacks."""
import shutil

import pytest
import torch
from torch.testing import assert_close

from hyperloop_lm.model import hc_kernels, hyper

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """A fresh kernel cache (and a fresh availability decision) for this test, and again after it."""
    monkeypatch.setenv("HYPERLOOP_LM_DATA", str(tmp_path))
    hc_kernels._library.cache_clear()
    yield tmp_path
    hc_kernels._library.cache_clear()


def torch_code(logits, grad, iters):
    m0 = hyper._exp_shifted(logits)
    out, *saved = hyper._iterate(m0, iters)
    return out, hyper._iterate_backward(grad, *saved)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_the_torch_code(dtype, rebuild):
    """Every n the model allows, token counts around the kernel's block of 64, 0/1/20 iterations: forward
    and backward agree to rounding (the kernel multiplies by reciprocals where the torch code divides)."""
    assert hc_kernels.available(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.manual_seed(0)
    for n in (1, 2, 3, 4, 5, 16):
        for ntok, iters in ((1, 20), (63, 1), (64, 0), (65, 20), (200, 20)):
            logits = torch.randn(ntok, n, n, dtype=dtype) * 2
            grad = torch.randn(ntok, n, n, dtype=dtype)
            ref_out, ref_grad = torch_code(logits, grad, iters)
            m0 = hyper._exp_shifted(logits)
            assert_close(hc_kernels.sinkhorn_forward(m0, iters), ref_out, **tol, msg=f"forward n={n} ntok={ntok}")
            assert_close(hc_kernels.sinkhorn_backward(grad, m0, iters), ref_grad, **tol, msg=f"backward n={n} ntok={ntok}")


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
    with pytest.warns(UserWarning, match="HC kernels are unavailable"):
        out = hyper.sinkhorn(logits)
    assert not hc_kernels.available()
    out.sum().backward()  # the torch code, end to end
    assert_close(out.sum(-2), torch.ones(10, 4), atol=1e-4, rtol=0)
    assert not list(rebuild.glob("kernels/*.so"))


def test_env_switch_forces_the_torch_code(rebuild, monkeypatch):
    monkeypatch.setenv("HYPERLOOP_LM_KERNELS", "torch")
    assert not hc_kernels.available()
    assert not hyper._use_kernel(torch.zeros(2, 4, 4)) and not hc_kernels.usable(torch.zeros(2, 4, 4))


@needs_cc
def test_kernel_is_built_once_per_machine_and_reused(rebuild):
    assert hc_kernels.available()
    (lib,) = rebuild.glob("kernels/hc-float-*.so")
    stamp = lib.stat().st_mtime_ns
    hc_kernels._library.cache_clear()
    assert hc_kernels.available()
    assert lib.stat().st_mtime_ns == stamp and len(list(rebuild.glob("kernels/*"))) == 1  # no temp files left


@needs_cc
def test_results_do_not_depend_on_the_thread_count(rebuild):
    """The kernels run their token loops on torch's threads; every token is computed alike either way."""
    torch.manual_seed(0)
    m0 = hyper._exp_shifted(torch.randn(1000, 4, 4))  # above the kernels' parallel threshold, a partial block
    g = torch.randn(1000, 4, 4)
    M, y, u = torch.randn(1000, 4, 5), torch.randn(1000, 4, 40), torch.randn(1000, 40)
    dout = torch.randn(1000, 4, 40)
    M.requires_grad_(), y.requires_grad_(), u.requires_grad_()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out = hc_kernels.mix(M, y, u)
            diag = hc_kernels.scale_add(M[..., 0], M[..., 1], y, u)
            results.append((hc_kernels.sinkhorn_forward(m0, 20), hc_kernels.sinkhorn_backward(g, m0, 20),
                            out, *torch.autograd.grad(out, (M, y, u), dout),
                            diag, *torch.autograd.grad(diag, (M, y, u), dout)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_cc
def test_a_compiler_without_openmp_builds_single_threaded_kernels(rebuild, monkeypatch):
    cc = shutil.which("cc") or shutil.which("gcc")
    fake = rebuild / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a; do [ "$a" = -fopenmp ] && exit 1; done\nexec {cc} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert hc_kernels.available()
    assert len(list(rebuild.glob("kernels/*.so"))) == 1
    logits = torch.randn(300, 4, 4, dtype=torch.float64)
    assert_close(hyper.sinkhorn(logits), torch_code(logits, torch.zeros_like(logits), 20)[0], rtol=1e-12, atol=1e-13)


@needs_cc
def test_more_streams_than_the_kernel_handles_use_the_torch_code(rebuild):
    logits = torch.randn(3, 17, 17)
    assert not hyper._use_kernel(logits)
    assert_close(hyper.sinkhorn(logits, 50).sum(-1), torch.ones(3, 17), atol=1e-5, rtol=0)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mix_matches_the_batched_matmul_forward_and_backward(dtype, rebuild):
    """out = M @ [y; u] per token, for the mHC write (r = n, with u), its read (r = 1, no u), odd widths and
    leading axes; gradients of M, y and u against autograd through torch.matmul."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    for lead, r, k1, C, with_u in (((2, 7), 4, 4, 33, True), ((5,), 1, 4, 64, False), ((3, 2), 3, 2, 1, True),
                                   ((1,), 1, 1, 17, False)):
        M = torch.randn(*lead, r, k1 + with_u, dtype=dtype, requires_grad=True)
        y = torch.randn(*lead, k1, C, dtype=dtype, requires_grad=True)
        u = torch.randn(*lead, C, dtype=dtype, requires_grad=True) if with_u else None
        g = torch.randn(*lead, r, C, dtype=dtype)
        inputs = (M, y, u) if with_u else (M, y)
        z = torch.cat([y, u.unsqueeze(-2)], -2) if with_u else y
        ref = M @ z
        ref_grads = torch.autograd.grad(ref, inputs, g)
        out = hc_kernels.mix(M, y, u)
        assert_close(out, ref, **tol)
        for got, want in zip(torch.autograd.grad(out, inputs, g), ref_grads):
            assert_close(got, want, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(hc_kernels.mix, (M.detach().requires_grad_(), y.detach().requires_grad_(), None))


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_add_matches_autograd_of_the_broadcast_formula(dtype, rebuild):
    """out = a y + b u per stream (the diagonal write) and a = None (the identity), for odd widths and leading
    axes; every gradient against autograd of the broadcast expression hyper.py runs without kernels."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    for lead, n, C, with_a in (((2, 7), 4, 33, True), ((5,), 4, 64, False), ((3, 2), 3, 1, True), ((1,), 1, 17, True)):
        a = torch.rand(*lead, n, dtype=dtype, requires_grad=True) if with_a else None
        b = torch.randn(*lead, n, dtype=dtype, requires_grad=True)
        y = torch.randn(*lead, n, C, dtype=dtype, requires_grad=True)
        u = torch.randn(*lead, C, dtype=dtype, requires_grad=True)
        g = torch.randn(*lead, n, C, dtype=dtype)
        inputs = (a, b, y, u) if with_a else (b, y, u)
        ref = torch.addcmul(a.unsqueeze(-1) * y if with_a else y, b.unsqueeze(-1), u.unsqueeze(-2))
        out = hc_kernels.scale_add(a, b, y, u)
        assert_close(out, ref, **tol)
        for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
            assert_close(got, want, **tol)
    if dtype == torch.float64:
        shapes = ((3, 4), (3, 4), (3, 4, 9), (3, 9))
        args = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
        assert torch.autograd.gradcheck(hc_kernels.scale_add, args)
        assert torch.autograd.gradcheck(hc_kernels.scale_add, [None, *args[1:]])


@needs_cc
def test_mhc_and_hyperloop_sites_match_their_torch_code(rebuild, monkeypatch):
    """A whole HC site (read, F, write), values and every gradient, with the kernels and without."""
    from hyperloop_lm.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_heads=4, max_seq_len=64, n_begin=1, n_middle=2, n_end=1, loops=3)
    for res_kind in ("sinkhorn", "diagonal", "identity"):
        site = hyper.HyperConnection.from_config(cfg, res_kind)
        with torch.no_grad():
            for p in site.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        lin = torch.nn.Linear(32, 32)
        y = torch.randn(4, 20, 4, 32, requires_grad=True)  # 80 tokens: enough for the mixing kernel
        assert not hc_kernels.worth_mixing(y[:1, :10])  # decode-sized: the batched matmul is cheaper
        results = []
        for kernels in ("c", "torch"):
            monkeypatch.setenv("HYPERLOOP_LM_KERNELS", kernels)
            hc_kernels._library.cache_clear()
            assert hc_kernels.worth_mixing(y) == (kernels == "c")
            out = site(y, lambda x: torch.tanh(lin(x)))
            params = (y, *site.parameters(), *lin.parameters())
            results.append((out, torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), params)))
        assert hc_kernels.available() is False  # the second pass really ran the torch code
        (out_c, grads_c), (out_t, grads_t) = results
        assert_close(out_c, out_t, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_c, grads_t):
            assert_close(a, b, rtol=1e-4, atol=1e-6)
