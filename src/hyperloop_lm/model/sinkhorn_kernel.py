"""The compiled Sinkhorn kernel (sinkhorn.c): built on first use with the system C compiler, cached per
machine under `data_dir()/kernels`, called through ctypes. About 2x faster than the torch ops it replaces on CPU (`python -m
benchmarks.bench_sinkhorn` times both; at n = 4 the torch code is already far from op-bound).

If no compiler is found, or the build fails, `available()` is False (with one warning saying why) and
hyper.py uses its torch code: same results, slower. HYPERLOOP_LM_SINKHORN=torch forces that path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from hyperloop_lm.utils import atomic_path, data_dir

SOURCE = Path(__file__).with_name("sinkhorn.c")
MAX_N = 16  # MAXN in sinkhorn.c
_C_TYPES = {torch.float32: "float", torch.float64: "double"}
# -march=native: the cache key includes the CPU's feature flags, so a shared cache never serves a binary
# built for another CPU. No -ffast-math: the kernel must round like the torch code.
_FLAGS = ("-O3", "-march=native", "-std=c99", "-shared", "-fPIC")


def available(dtype: torch.dtype = torch.float32) -> bool:
    return _library(dtype) is not None


def forward(m0: torch.Tensor, iters: int) -> torch.Tensor:
    """out = Sinkhorn iterations of m0 = exp(logits - max), (..., n, n) -> (..., n, n)."""
    m0 = m0.contiguous()
    out = torch.empty_like(m0)
    _check(_library(m0.dtype).sinkhorn_forward(m0.data_ptr(), out.data_ptr(), m0.numel() // m0.shape[-1] ** 2,
                                               m0.shape[-1], iters))
    return out


def backward(grad: torch.Tensor, m0: torch.Tensor, iters: int) -> torch.Tensor:
    """The gradient with respect to the logits, given the gradient of `forward(m0, iters)`."""
    m0, grad = m0.contiguous(), grad.to(m0.dtype).contiguous()
    grad_logits = torch.empty_like(m0)
    _check(_library(m0.dtype).sinkhorn_backward(grad.data_ptr(), m0.data_ptr(), grad_logits.data_ptr(),
                                                m0.numel() // m0.shape[-1] ** 2, m0.shape[-1], iters))
    return grad_logits


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError({-1: f"Sinkhorn kernel: n must be 1..{MAX_N}",
                            -2: "Sinkhorn kernel: out of memory"}.get(rc, f"Sinkhorn kernel failed ({rc})"))


@functools.cache
def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    if os.environ.get("HYPERLOOP_LM_SINKHORN", "c") == "torch" or dtype not in _C_TYPES:
        return None
    try:
        lib = ctypes.CDLL(str(_build(_C_TYPES[dtype])))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"the compiled Sinkhorn kernel is unavailable, using the slower torch code: {e}", stacklevel=3)
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sinkhorn_forward.argtypes = (ptr, ptr, i64, i32, i32)
    lib.sinkhorn_backward.argtypes = (ptr, ptr, ptr, i64, i32, i32)
    return lib


def _build(c_type: str) -> Path:
    """The cached shared library for this source, compiler, flags and CPU; compiled if missing."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler found (install gcc, or set CC)")
    flags = (*_FLAGS, f"-DREAL={c_type}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *flags, _cpu_features()]).encode()).hexdigest()
    lib = data_dir() / "kernels" / f"sinkhorn-{c_type}-{key[:16]}.so"
    if not lib.exists():
        with atomic_path(lib) as tmp:  # concurrent builders (DDP ranks) each rename a whole file into place
            r = subprocess.run([cc, *flags, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise OSError(f"{cc} failed: {r.stderr.strip()[-500:]}")
    return lib


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor() or platform.machine()

