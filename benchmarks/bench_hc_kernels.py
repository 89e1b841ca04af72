"""The HC-site kernels (model/hc_kernels.c) against the torch code they replace, forward + backward.

Per mHC site, for a batch of 16 x 256 tokens (the configs' training batch) and 4 x 128 (an eighth),
n = 4 streams, fp32, one thread, at the small preset's width (d256): Sinkhorn (20 iterations), the write
[H_res | post] @ [y; u] and the read pre . y; and the write of a Hyperloop site, res * y + post * u
(diagonal res). Kernel and torch code are timed alternately (same noise) and checked to agree.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from hyperloop_lm.model import hc_kernels, hyper


def _sinkhorn(kernel: bool, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    use = hyper._use_kernel
    hyper._use_kernel = use if kernel else (lambda t: False)
    try:
        return torch.autograd.grad(hyper.sinkhorn(x, 20), x, g)[0]
    finally:
        hyper._use_kernel = use


def _write(kernel: bool, coef, y, u, g):
    out = hc_kernels.mix(coef, y, u) if kernel else coef @ torch.cat([y, u.unsqueeze(-2)], -2)
    return torch.autograd.grad(out, (coef, y, u), g)


def _read(kernel: bool, pre, y, g):
    out = hc_kernels.mix(pre.unsqueeze(-2), y).squeeze(-2) if kernel else (pre.unsqueeze(-2) @ y).squeeze(-2)
    return torch.autograd.grad(out, (pre, y), g)


def _diagonal_write(kernel: bool, res, post, y, u, g):
    if kernel:
        out = hc_kernels.scale_add(res, post, y, u)
    else:
        out = torch.addcmul(res.unsqueeze(-1) * y, post.unsqueeze(-1), u.unsqueeze(-2))
    return torch.autograd.grad(out, (res, post, y, u), g)


def _time(fn: Callable[[bool], object], reps: int) -> dict:
    times, first = {"kernel": [], "torch": []}, {}
    for rep in range(reps + 2):  # the first two are warm-up
        for code in times:
            t0 = time.perf_counter()
            result = fn(code == "kernel")
            if rep >= 2:
                times[code].append(time.perf_counter() - t0)
            first.setdefault(code, result)
    torch.testing.assert_close(first["kernel"], first["torch"], rtol=1e-4, atol=1e-5)
    ms = {code: 1e3 * statistics.median(t) for code, t in times.items()}
    return {"ms": ms, "speedup": ms["torch"] / ms["kernel"]}


def run(quick: bool = False, batches: tuple[tuple[int, int], ...] = ((16, 256), (4, 128)), n: int = 4,
        d: int = 256) -> dict:
    torch.set_num_threads(1)
    if not hc_kernels.available():
        return {"benchmark": "hc_kernels", "kernel_available": False, "markdown": "The C kernels are unavailable here."}
    reps = 10 if quick else 30
    results, rows = {}, ["| op (forward + backward) | tokens | torch code (ms) | C kernel (ms) | speed-up |",
                         "|---|---|---|---|---|"]
    for B, T in batches:
        torch.manual_seed(0)
        lead = (B, T)
        x, gx = torch.randn(*lead, n, n, requires_grad=True), torch.randn(*lead, n, n)
        coef = torch.rand(*lead, n, n + 1, requires_grad=True)
        y, u = torch.randn(*lead, n, d, requires_grad=True), torch.randn(*lead, d, requires_grad=True)
        pre = torch.rand(*lead, n, requires_grad=True)
        ops = {"sinkhorn": lambda k: _sinkhorn(k, x, gx),
               "write": lambda k: _write(k, coef, y, u, torch.ones(*lead, n, d)),
               "read": lambda k: _read(k, pre, y, torch.ones(*lead, d)),
               "diagonal write": lambda k: _diagonal_write(k, pre, coef[..., 0], y, u, torch.ones(*lead, n, d))}
        for name, fn in ops.items():
            r = results.setdefault(name, {})[B * T] = _time(fn, reps)
            rows.append(f"| {name} | {B * T} | {r['ms']['torch']:.2f} | {r['ms']['kernel']:.2f} | {r['speedup']:.1f}x |")
    return {"benchmark": "hc_kernels", "kernel_available": True, "n": n, "d_model": d, "reps": reps,
            "by_op": results, "markdown": "\n".join(rows)}


if __name__ == "__main__":
    print(run()["markdown"])
