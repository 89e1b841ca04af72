"""Sinkhorn forward + backward per mHC site: the compiled C kernel against the torch code it replaces.

One site's H_res for a batch of 16 x 256 tokens (the configs' training batch), n = 4 streams, 20 iterations,
fp32, one thread. The two are timed alternately (same noise) and checked to agree.
"""
from __future__ import annotations

import statistics
import time

import torch

from hyperloop_lm.model import hyper, sinkhorn_kernel


def run(quick: bool = False, ntok: tuple[int, ...] = (4096, 1024), n: int = 4, iters: int = 20) -> dict:
    torch.set_num_threads(1)
    if not sinkhorn_kernel.available():
        return {"benchmark": "sinkhorn", "kernel_available": False, "markdown": "The C kernel is unavailable here."}
    reps = 10 if quick else 50
    codes = {"kernel": hyper._use_kernel, "torch": lambda t: False}
    results, rows = {}, ["| tokens | torch code (ms) | C kernel (ms) | speed-up |", "|---|---|---|---|"]
    for nt in ntok:
        torch.manual_seed(0)
        x = torch.randn(nt, n, n, requires_grad=True)
        g = torch.randn(nt, n, n)
        times, grads = {c: [] for c in codes}, {}
        try:
            for rep in range(reps + 2):  # the first two are warm-up
                for code, use in codes.items():
                    hyper._use_kernel = use
                    t0 = time.perf_counter()
                    (grads[code],) = torch.autograd.grad(hyper.sinkhorn(x, iters), x, g)
                    if rep >= 2:
                        times[code].append(time.perf_counter() - t0)
        finally:
            hyper._use_kernel = codes["kernel"]
        torch.testing.assert_close(grads["kernel"], grads["torch"], rtol=1e-4, atol=1e-5)
        ms = {c: 1e3 * statistics.median(t) for c, t in times.items()}
        results[nt] = {"ms": ms, "speedup": ms["torch"] / ms["kernel"]}
        rows.append(f"| {nt} | {ms['torch']:.2f} | {ms['kernel']:.2f} | {ms['torch'] / ms['kernel']:.2f}x |")
    return {"benchmark": "sinkhorn", "kernel_available": True, "n": n, "iters": iters, "reps": reps,
            "by_tokens": results, "markdown": "\n".join(rows)}


if __name__ == "__main__":
    print(run()["markdown"])
