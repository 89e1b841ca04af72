"""CPU kernels for the hyper-connection sites (hc_kernels.c): Sinkhorn, the per-token stream mixing of mHC
and the diagonal write of Hyperloop, forward and backward. Built on first use with the system C compiler
(with OpenMP if it has it: the token loops then run on torch's threads), cached per machine under
`data_dir()/kernels`, called through ctypes. `python -m benchmarks.bench_hc_kernels` times them against the
torch code they replace (reports/bench/hc_kernels.json).

hyper.py uses them on CPU for fp32 / fp64 except under torch.compile (inductor fuses the mixing itself),
TorchScript tracing (ONNX export) and dispatch modes (FLOP counting). If no compiler is found or the build
fails, `available()` is False, one warning says why, and hyper.py runs its torch code: same results to
rounding, slower. HYPERLOOP_LM_KERNELS=torch forces that path.
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
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from hyperloop_lm.utils import atomic_path, data_dir

SOURCE = Path(__file__).with_name("hc_kernels.c")
MAX_N = 16  # MAXN in hc_kernels.c: Sinkhorn's largest n
_C_TYPES = {torch.float32: "float", torch.float64: "double"}
# -march=native: the cache key includes the CPU's feature flags, so a shared cache never serves a binary
# built for another CPU. No -ffast-math: the kernels must round like the torch code.
_FLAGS = ("-O3", "-march=native", "-std=c99", "-shared", "-fPIC")


def available(dtype: torch.dtype = torch.float32) -> bool:
    return _library(dtype) is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the kernels here and now: real CPU tensors of one dtype, and
    nobody watching the ops (a dispatch mode such as FlopCounterMode or FakeTensorMode, the TorchScript
    tracer of ONNX export) who would miss a foreign call."""
    t = tensors[0]
    return (t.device.type == "cpu" and all(x.dtype == t.dtype for x in tensors) and not torch.jit.is_tracing()
            and _current_dispatch_mode() is None and available(t.dtype))


def worth_mixing(y: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether `mix` pays off for streams y (..., n, C): from 64 tokens up. Below that (decoding) the call
    overhead (~15 us) exceeds what one pass saves over a batched matmul."""
    return y.numel() >= 64 * y.shape[-2] * y.shape[-1] and usable(y, *others)


def sinkhorn_forward(m0: torch.Tensor, iters: int) -> torch.Tensor:
    """The Sinkhorn iterations of m0 = exp(logits - max), (..., n, n) -> (..., n, n)."""
    m0 = m0.contiguous()
    out = torch.empty_like(m0)
    n = m0.shape[-1]
    _check(_library(m0.dtype).sinkhorn_forward(m0.data_ptr(), out.data_ptr(), m0.numel() // n**2, n, iters))
    return out


def sinkhorn_backward(grad: torch.Tensor, m0: torch.Tensor, iters: int) -> torch.Tensor:
    """The gradient with respect to the logits, given the gradient of `sinkhorn_forward(m0, iters)`."""
    m0, grad = m0.contiguous(), grad.to(m0.dtype).contiguous()
    grad_logits = torch.empty_like(m0)
    n = m0.shape[-1]
    _check(_library(m0.dtype).sinkhorn_backward(grad.data_ptr(), m0.data_ptr(), grad_logits.data_ptr(),
                                                m0.numel() // n**2, n, iters))
    return grad_logits


def mix(M: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """M (..., r, k) @ Z (..., k, C) per token, where Z is the k1 streams y (..., k1, C) and, if given, one
    more row u (..., C): k = k1 + 1. Differentiable in M, y and u."""
    return _Mix.apply(M, y, u)


class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, y, u):
        M, y, u = M.contiguous(), y.contiguous(), None if u is None else u.contiguous()
        *lead, r, _ = M.shape
        k1, C = y.shape[-2:]
        out = y.new_empty(*lead, r, C)
        _library(y.dtype).mix_forward(M.data_ptr(), y.data_ptr(), _ptr(u), out.data_ptr(), out.numel() // (r * C),
                                      r, k1, C)
        ctx.save_for_backward(M, y, u)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        M, y, u = ctx.saved_tensors
        grad = grad.to(y.dtype).contiguous()
        dM, dy, du = torch.empty_like(M), torch.empty_like(y), None if u is None else torch.empty_like(u)
        r, k1, C = M.shape[-2], *y.shape[-2:]
        _library(y.dtype).mix_backward(M.data_ptr(), y.data_ptr(), _ptr(u), grad.data_ptr(), dM.data_ptr(),
                                       dy.data_ptr(), _ptr(du), grad.numel() // (r * C), r, k1, C)
        return dM, dy, du


def scale_add(a: torch.Tensor | None, b: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """a (..., n) * y (..., n, C) + b (..., n) * u (..., C) per stream, in one pass; a None stands for 1.
    The write of a diagonal (or identity) HC site. Differentiable in a, b, y and u."""
    return _ScaleAdd.apply(a, b, y, u)


class _ScaleAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, y, u):
        a, b, y, u = None if a is None else a.contiguous(), b.contiguous(), y.contiguous(), u.contiguous()
        out = torch.empty_like(y)
        n, C = y.shape[-2:]
        _library(y.dtype).scale_add_forward(_ptr(a), b.data_ptr(), y.data_ptr(), u.data_ptr(), out.data_ptr(),
                                            y.numel() // (n * C), n, C)
        ctx.save_for_backward(a, b, y, u)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b, y, u = ctx.saved_tensors
        grad = grad.to(y.dtype).contiguous()
        db, du = torch.empty_like(b), torch.empty_like(u)
        da, dy = (None, grad) if a is None else (torch.empty_like(a), torch.empty_like(y))  # identity: dy = grad
        n, C = y.shape[-2:]
        _library(y.dtype).scale_add_backward(_ptr(a), b.data_ptr(), y.data_ptr(), u.data_ptr(), grad.data_ptr(),
                                             _ptr(da), db.data_ptr(), _ptr(None if a is None else dy),
                                             du.data_ptr(), y.numel() // (n * C), n, C)
        return da, db, dy, du


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError({-1: f"Sinkhorn kernel: n must be 1..{MAX_N}",
                            -2: "Sinkhorn kernel: out of memory"}.get(rc, f"Sinkhorn kernel failed ({rc})"))


@functools.cache
def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    if os.environ.get("HYPERLOOP_LM_KERNELS", "c") == "torch" or dtype not in _C_TYPES:
        return None
    try:
        lib = ctypes.CDLL(str(_build(_C_TYPES[dtype])))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"the compiled HC kernels are unavailable, using the slower torch code: {e}", stacklevel=3)
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sinkhorn_forward.argtypes = (ptr, ptr, i64, i32, i32)
    lib.sinkhorn_backward.argtypes = (ptr, ptr, ptr, i64, i32, i32)
    for name, args in (("mix_forward", (ptr, ptr, ptr, ptr, i64, i32, i32, i64)),
                       ("mix_backward", (ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i32, i32, i64)),
                       ("scale_add_forward", (ptr, ptr, ptr, ptr, ptr, i64, i32, i64)),
                       ("scale_add_backward", (ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i32, i64))):
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    return lib


def _build(c_type: str) -> Path:
    """The cached shared library for this source, compiler, flags and CPU; compiled if missing. With OpenMP
    where the compiler has it (the kernels then use torch's threads), else single-threaded."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler found (install gcc, or set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    for threads in (("-fopenmp",), ()):
        flags = (*_FLAGS, *threads, f"-DREAL={c_type}")
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *flags, _cpu_features()]).encode()).hexdigest()
        lib = data_dir() / "kernels" / f"hc-{c_type}-{key[:16]}.so"
        try:
            if not lib.exists():
                _compile(cc, flags, lib)
            return lib
        except OSError:
            if not threads:
                raise
    raise AssertionError("unreachable")


def _compile(cc: str, flags: tuple[str, ...], lib: Path) -> None:
    with atomic_path(lib) as tmp:  # concurrent builders (DDP ranks) each rename a whole file into place
        r = subprocess.run([cc, *flags, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise OSError(f"{cc} failed: {r.stderr.strip()[-500:]}")


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor() or platform.machine()
