"""Hyper-connections: n parallel residual streams mixed by cheap input-dependent coefficients.

One site, given the stream state y (..., n, C) and a function F:
    z    = RMSNorm(flatten(y))                       (no gain), fp32
    pre  = sigmoid(a_pre  * W_pre  z + b_pre)         (n)   how much each stream F reads
    post = 2 sigmoid(a_post * W_post z + b_post)      (n)   how much of F's output each stream gets
    res  = diagonal: sigmoid(a_res * W_res z + b_res) (n)   per-stream decay (Hyperloop default)
           sinkhorn: Sinkhorn(a_res * mat(W_res z) + b_res) (n x n, doubly stochastic; mHC)
           identity: 1                                      (no parameters)
    y   <- res (x) y + post (x) F(sum_i pre_i y_i)

Hyperloop uses one site per loop around the whole middle block (F = the block, spec 2.1); the mHC
Transformer wraps every attention and MLP sub-layer in its own site (F = the sub-layer, spec 2.2).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperloop_lm.config import ModelConfig, logit
from hyperloop_lm.model import hc_kernels


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Doubly-stochastic projection of (..., n, n) logits: exp (max-subtracted), then `iters` rounds of
    column then row normalisation, in fp32. Differentiable: the exact gradient of these iterations.

    On CPU the iterations run in a compiled C kernel (hc_kernels.py) when one can be built, else in the
    torch code below; the two agree to rounding."""
    if iters < 1:
        raise ValueError(f"Sinkhorn needs at least one iteration, got {iters}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if torch.compiler.is_compiling():  # an opaque op: inductor's code for these size-n reductions is ~4x slower
        return torch.ops.hyperloop_lm.sinkhorn(logits, iters)[0]
    return _Sinkhorn.apply(logits, iters)


def _use_kernel(t: torch.Tensor) -> bool:
    return t.shape[-1] <= hc_kernels.MAX_N and hc_kernels.usable(t)


def _exp_shifted(logits: torch.Tensor) -> torch.Tensor:
    return (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()


def _iterate(m0: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """The torch code: the result of the iterations on m0 = exp(logits - max), and what the backward
    needs: the last iterate with the token axes last (n, n, ...) and the column / row sums of every
    iteration, (1, n, ...) / (n, 1, ...) each.

    Per token the matrices are only n x n, so per-op overhead and strided reductions over size-n rows
    dominate. With the token axes last each normalisation is a few contiguous vector ops."""
    d = m0.dim()  # positive axes: ONNX export rejects a Transpose with negative perm
    m = m0.movedim((d - 2, d - 1), (0, 1)).contiguous()  # (n, n, ...): reductions over rows/cols are vector adds
    cols, rows = [], []
    for _ in range(iters):  # in place: m is a fresh tensor that no graph records
        for dim, sums in ((0, cols), (1, rows)):  # columns, then rows
            sums.append(m.sum(dim, keepdim=True))
            m.div_(sums[-1])
    out = m.movedim((0, 1), (d - 2, d - 1)).contiguous()  # a strided result would make bmm loop per token
    return out, m, cols, rows


def _iterate_backward(grad: torch.Tensor, m: torch.Tensor, cols: Sequence[torch.Tensor], rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """The torch code: the backward of out = m / sum(m) is (g - sum(g * out)) / sum(m), applied from the
    last step back. Returns the gradient with respect to m0 times m0 (the logits' gradient through exp;
    the max-subtraction needs none: the result is invariant to a constant shift of the logits)."""
    g = grad.movedim((-2, -1), (0, 1)).clone(memory_format=torch.contiguous_format)
    m = m.clone()  # both updated in place below
    for k in reversed(range(len(cols))):
        for dim, s in ((1, rows[k]), (0, cols[k])):  # m is the output of this step; its input was m * s
            g.sub_((g * m).sum(dim, keepdim=True)).div_(s)
            m.mul_(s)
    return g.mul_(m).movedim((0, 1), (-2, -1)).contiguous()  # m is now m0


def _forward(logits: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The result and m0 = exp(logits - max), all the backward keeps (it recomputes the iterations)."""
    m0 = _exp_shifted(logits)
    return (hc_kernels.sinkhorn_forward(m0, iters) if _use_kernel(m0) else _iterate(m0, iters)[0]), m0


def _backward(grad: torch.Tensor, m0: torch.Tensor, iters: int) -> torch.Tensor:
    if _use_kernel(m0):
        return hc_kernels.sinkhorn_backward(grad, m0, iters)
    return _iterate_backward(grad, *_iterate(m0, iters)[1:])


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn with a hand-written backward through every iteration, ~6x faster than autograd on CPU
    (the torch code; the C kernel is 2-3x faster again)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.iters, ctx.kernel = iters, _use_kernel(logits)
        if ctx.kernel:
            m0 = _exp_shifted(logits)
            ctx.save_for_backward(m0)
            return hc_kernels.sinkhorn_forward(m0, iters)
        out, m, cols, rows = _iterate(_exp_shifted(logits), iters)  # keep the sums: no recompute
        ctx.save_for_backward(m, *cols, *rows)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.kernel:
            return hc_kernels.sinkhorn_backward(grad, ctx.saved_tensors[0], ctx.iters), None
        m, *sums = ctx.saved_tensors
        return _iterate_backward(grad, m, sums[: len(sums) // 2], sums[len(sums) // 2 :]), None


# The same as custom ops, for torch.compile (see `sinkhorn`); the backward recomputes the iterations.
@torch.library.custom_op("hyperloop_lm::sinkhorn", mutates_args=())
def _sinkhorn_op(logits: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(logits, iters)


@_sinkhorn_op.register_fake
def _(logits, iters):
    return torch.empty_like(logits), torch.empty_like(logits)


@torch.library.custom_op("hyperloop_lm::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(grad: torch.Tensor, m0: torch.Tensor, iters: int) -> torch.Tensor:
    return _backward(grad, m0, iters)


@_sinkhorn_backward_op.register_fake
def _(grad, m0, iters):
    return torch.empty_like(m0)


def _sinkhorn_setup(ctx, inputs, output):
    ctx.iters = inputs[1]
    ctx.save_for_backward(output[1])


def _sinkhorn_op_backward(ctx, grad, _):
    return _sinkhorn_backward_op(grad, ctx.saved_tensors[0], ctx.iters), None


_sinkhorn_op.register_autograd(_sinkhorn_op_backward, setup_context=_sinkhorn_setup)


class HyperConnection(nn.Module):
    def __init__(self, n: int, dim: int, res_kind: str, *, gate_init: float, pre_bias: float,
                 weight_std: float, res_offdiag: float, sinkhorn_iters: int, eps: float, res_init: float = 0.5):
        super().__init__()
        self.n, self.dim, self.res_kind, self.sinkhorn_iters, self.eps = n, dim, res_kind, sinkhorn_iters, eps
        res_rows = {"diagonal": n, "sinkhorn": n * n, "identity": 0}[res_kind]
        self.weight = nn.Parameter(torch.randn(2 * n + res_rows, n * dim) * weight_std)  # [W_pre; W_post; W_res]
        res_bias = torch.full((res_rows,), logit(res_init))  # diagonal: each stream keeps res_init of itself
        if res_kind == "sinkhorn":  # mild identity: strongly negative off-diagonals would freeze H_res
            res_bias = torch.full((n, n), res_offdiag).fill_diagonal_(0.0).flatten()
        self.bias = nn.Parameter(torch.cat([torch.full((n,), pre_bias), torch.zeros(n), res_bias]))
        self.gate = nn.Parameter(torch.full((2 + (res_rows > 0),), gate_init))  # a_pre, a_post[, a_res]
        self.rows = (n, n, res_rows)  # projected rows per gate

    @classmethod
    def from_config(cls, cfg: ModelConfig, res_kind: str) -> "HyperConnection":
        n = cfg.n_streams
        pre_bias = logit(1 / n) if cfg.hc_pre_bias_init == "logit_inv_n" and n > 1 else 0.0
        return cls(n, cfg.d_model, res_kind, gate_init=cfg.hc_gate_init, pre_bias=pre_bias,
                   weight_std=cfg.hc_weight_init_std, res_offdiag=cfg.hc_res_offdiag_init,
                   sinkhorn_iters=cfg.sinkhorn_iters, eps=cfg.norm_eps, res_init=cfg.hc_res_init)

    @classmethod
    def for_mhc(cls, cfg: ModelConfig) -> "HyperConnection":
        return cls.from_config(cfg, "sinkhorn")

    def coefficients(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """pre (..., n), post (..., n), res (..., n) | (..., n, n) | None, all fp32, from y (..., n, C)."""
        pre, half_post, res = self._gates(y)
        return pre, 2 * half_post, res

    def _gates(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """pre, post / 2, res. Written for few ops (decode is op-bound): a W RMSNorm(f) + b is computed as
        (W f) * (a / rms(f)) + b, so the normalised stream is never materialised, and the n-row groups
        that share a gate are gated and biased in one addcmul over a (..., groups, n) view."""
        n = self.n
        with torch.autocast(device_type=y.device.type, enabled=False):
            f = _fp32(y.flatten(-2))
            h, inv_rms = _project(f, _fp32(self.weight), self.eps)  # (..., rows), (..., 1)
            gate, bias = _fp32(self.gate), _fp32(self.bias)
            k = 2 if self.res_kind == "sinkhorn" else len(gate)  # groups of n rows: pre, post[, diagonal res]
            g = torch.addcmul(bias[: k * n].view(k, n), h[..., : k * n].unflatten(-1, (k, n)),
                              inv_rms.unsqueeze(-1) * gate[:k, None]).sigmoid()  # (..., k, n)
            res = g[..., 2, :] if self.res_kind == "diagonal" else None
            if self.res_kind == "sinkhorn":
                r = torch.addcmul(bias[2 * n :], h[..., 2 * n :], inv_rms * gate[2])
                res = sinkhorn(r.unflatten(-1, (n, n)), self.sinkhorn_iters)
        return g[..., 0, :], g[..., 1, :], res

    def forward(self, y: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """y: (..., n, C) -> (..., n, C). Read and write are separate steps so that `compile()` can fuse
        each of them even when F (a whole looped block) is compiled on its own."""
        x, half_post, res = self._read(y)
        return self._write(y, fn(x), half_post, res)

    def _read(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """F's input (one weighted sum of the streams) and the coefficients of the write."""
        pre, half_post, res = self._gates(y)
        if y.dtype != pre.dtype:
            pre, half_post, res = pre.to(y.dtype), half_post.to(y.dtype), None if res is None else res.to(y.dtype)
        if not torch.compiler.is_compiling() and hc_kernels.worth_mixing(y, pre):  # eager CPU: one pass, not a bmm
            return hc_kernels.mix(pre.unsqueeze(-2), y).squeeze(-2), half_post, res
        return (pre.unsqueeze(-2) @ y).squeeze(-2), half_post, res

    def _write(self, y: torch.Tensor, u: torch.Tensor, half_post: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        if res is not None and res.dim() > half_post.dim():
            if torch.compiler.is_compiling():  # inductor fuses this into one pass over the streams
                return (res.unsqueeze(-1) * y.unsqueeze(-3)).sum(-2) + 2 * half_post.unsqueeze(-1) * u.unsqueeze(-2)
            # eager: H_res y + post u^T as one per-token product [H_res | post] @ [y; u]; on CPU one pass over
            # the streams, else a batched matmul (2x faster than bmm + outer + add)
            coef = torch.cat([res, 2 * half_post.unsqueeze(-1)], -1)
            if hc_kernels.worth_mixing(y, coef, u):
                return hc_kernels.mix(coef, y, u)
            return coef @ torch.cat([y, u.unsqueeze(-2)], -2)
        coefs = (half_post,) if res is None else (half_post, res)
        if not torch.compiler.is_compiling() and hc_kernels.worth_mixing(y, u, *coefs):
            return hc_kernels.scale_add(res, 2 * half_post, y, u)  # eager CPU: one pass, not ~10 of autograd
        kept = y if res is None else res.unsqueeze(-1) * y  # identity, or diagonal decay
        return torch.addcmul(kept, half_post.unsqueeze(-1), u.unsqueeze(-2), value=2)

    def compile(self, **kwargs) -> None:
        """torch.compile the read and the write (not F, which the caller compiles as it sees fit)."""
        self._read = torch.compile(self._read, **kwargs)
        self._write = torch.compile(self._write, **kwargs)


def _project(f: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W f and 1 / rms(f) = 1 / sqrt(mean(f^2) + eps) over the last axis (keepdim)."""
    if (torch.is_grad_enabled() and (f.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()):
        return _Projection.apply(f, weight, eps)
    return F.linear(f, weight), _inv_rms(f, eps)


def _inv_rms(f: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(torch.linalg.vector_norm(f, dim=-1, keepdim=True).square() / f.shape[-1] + eps)


class _Projection(torch.autograd.Function):
    """Eager autograd writes three stream-sized gradients of f here (the matmul's, the norm's, and a
    masked_fill for a zero norm that eps rules out) and then adds them; this backward writes one: the
    norm's term -f r^3 / N, with the matmul's accumulated into it in place."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        r = _inv_rms(f, eps)
        ctx.save_for_backward(f, weight, r)
        return F.linear(f, weight), r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor, grad_r: torch.Tensor):
        f, weight, r = ctx.saved_tensors
        rows = grad_h.reshape(-1, grad_h.shape[-1])
        grad_f = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_f = (f * (grad_r * r.pow(3) / -f.shape[-1])).contiguous()
            grad_f.view(rows.shape[0], -1).addmm_(rows, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = rows.T @ f.reshape(rows.shape[0], -1)
        return grad_f, grad_weight, None


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()  # skips a no-op dispatch per call
