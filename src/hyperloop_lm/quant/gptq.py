"""GPTQ: second-order post-training weight quantization (Frantar et al. 2022, arXiv 2210.17323).

The algorithm, for one linear layer y = x W^T with W (out, in)
----------------------------------------------------------------
GPTQ minimises the layer-output error ||X W^T - X Ŵ^T||^2 over calibration inputs X (N, in). The
objective is quadratic with Hessian H = 2 X^T X (in, in), identical for every output row, so all rows
are quantized together, one input column at a time (Optimal Brain Surgeon):

    for column j (in a fixed order):
        q_j   = quant(w_j)                                   # round onto the group's grid
        err_j = (w_j - q_j) / [H_F^-1]_jj                    # H_F: Hessian over the not-yet-quantized columns F
        w_F  -= err_j [H_F^-1]_{j, F}                        # spread the error over the remaining columns
        F    -= {j}                                          # (the paper's eq. 3-4)

Three ideas make this fast and stable, all implemented here as in the reference code
(IST-DASLab/gptq, `gptq.py`):
1. The rows [H_F^-1]_{j, F} of the successively reduced inverses are exactly the rows of the upper
   Cholesky factor U of H^-1 (up to a factor sqrt([H_F^-1]_jj) that cancels), so we compute
   U = chol(H^-1, upper) once instead of downdating H^-1 after each column.
2. Lazy batch updates: columns are processed in blocks of `block_size` (128); inside a block only the
   block is updated, and the rest of W receives all of the block's errors in one matmul at its end.
3. Damping: H += damp * mean(diag(H)) * I (damp = 0.01) so that the Cholesky factorisations exist.
   Dead columns (H_jj == 0: the input is always zero) get H_jj = 1 and w_j = 0; they cannot matter.

Groups: with group_size g, a scale/zero pair per (row, group) is computed when the sweep *enters* the
group, from the weights with every earlier OBS update applied (so it absorbs the errors pushed into
it). The reference computes it from the lazily-updated copy, whose value depends on the block size;
we add the pending in-block correction so that the result equals the plain column-by-column
algorithm exactly (tests/quant checks this against such an implementation).

Act-order (`act_order=True`): columns are processed in order of decreasing diag(H) (the most
"active" inputs first, while many columns remain to absorb their error). Groups are then formed on
the fly in the *permuted* order, like the reference's `static_groups=False`: group k holds the
permuted columns [k g, (k+1) g). We keep that permuted order as the storage order (`perm` in the
`QuantizedWeight`), so groups stay contiguous in memory and the packed layer permutes its input
activations once (x[..., perm]) instead of gathering per-column scales (the `g_idx` layout). The
alternative, static groups (grid fixed from the un-updated weights in the original order), keeps the
original layout but cannot adapt the grid to the error GPTQ pushes into later columns.

Numerics: fp32 throughout (like the reference), on whatever device W lives on (cpu, cuda, mps).
`compute_dtype=torch.float64` exists for verification and small layers.

===================================================================================================
LOOPED MODELS: ORDER OF QUANTIZATION (implemented by `quant/driver.py::quantize_model`)
---------------------------------------------------------------------------------------------------
The paper's one change (spec section 4): a shared linear layer gets ONE `HessianAccumulator`, fed
from *every* call of that layer across all loops, and its weight is quantized once (one set of packed
buffers in the checkpoint). The driver quantizes one linear at a time, always capturing its inputs
from the model in its current state, i.e. with every earlier layer already quantized:
  - embedding (only with quantize_embeddings): RTN per row, first, so all later inputs see it.
  - begin block: layer by layer; inside a layer wqkv, wo, gate_up, down in forward order, each
    Hessian captured after its predecessors were replaced by their quantized versions.
  - middle (shared) block: for each shared linear, in the same order, run the whole loop schedule;
    its hook fires once per loop and sums x x^T over all calls of all loops (loop 0's inputs come
    from the quantized begin block, loop l's from loops < l running the already-quantized shared
    layers); quantize once; the next linear's capture then propagates through all loops with it.
  - end block: like the begin block, from the quantized middle's output.
  - head (only with quantize_embeddings): GPTQ with the Hessian of the final-norm output (or RTN).
Capture: begin/end blocks record their inputs once (with all earlier layers quantized) and are
re-run alone for each of their linears; a shared middle linear is captured in full forward passes
(cut short after its last call), where its hook fires once per loop. Cost and memory: see the
driver's docstring.
===================================================================================================
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from hyperloop_lm.quant.core import (
    QuantizedWeight,
    check_args,
    find_grid,
    quantize_to_codes,
)
from hyperloop_lm.utils import UserError


class HessianAccumulator:
    """Running H = 2/N * sum_n x_n x_n^T over all N input rows seen, across any number of calls.

    Each row of x (..., in) is one token's input to the layer. For a layer shared across loops, call
    `add_batch` from every loop (e.g. with `hook` as a forward hook): the result is the Hessian of all
    calls together. The reference normalises by the number of *sequences*; we count rows (tokens).
    The scale does not change GPTQ's result (damping is relative to mean(diag(H))), and counting rows
    makes H independent of how the calibration data is batched.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # (in, in)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Add the inputs x (..., in_features) of one layer call."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dim {self.in_features}, got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(self.H.device, torch.float32)  # (n, in)
        n = x.shape[0]
        if n == 0:
            return
        # running average: rescale the old sum, then add the new rows with the new normaliser
        self.H.mul_(self.nsamples / (self.nsamples + n))
        self.nsamples += n
        x = x * math.sqrt(2 / self.nsamples)
        self.H.addmm_(x.T, x)

    def hook(self, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        """Forward-hook signature: `layer.register_forward_hook(acc.hook)`."""
        self.add_batch(args[0])


def _inverse_cholesky_upper(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, so that H^-1 = U^T U."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0:
        raise UserError(
            f"GPTQ: the damped Hessian is not positive definite (damp={damp}); "
            "increase damp (e.g. 0.1) or use more calibration data."
        )
    return U


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    H: Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    compute_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Quantize w (out, in) with GPTQ given its input Hessian H (in, in) (see `HessianAccumulator`).

    group_size=-1 is per-channel; in_features need not be a multiple of group_size (the last group is
    shorter). Returns codes/scales/zeros in storage order (permuted when act_order; see module doc).
    """
    gs = check_args(w, bits, group_size)
    n_out, n_in = w.shape
    if tuple(H.shape) != (n_in, n_in):
        raise UserError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match weight shape {tuple(w.shape)}.")
    if block_size <= 0:
        raise UserError(f"GPTQ: block_size must be positive, got {block_size}.")
    dev = w.device
    W = w.detach().to(compute_dtype).clone()  # (out, in), updated in place by the OBS sweep
    H = H.detach().to(dev, compute_dtype).clone()  # (in, in)

    dead = torch.diag(H) == 0
    if bool(dead.all()):
        raise UserError("GPTQ: the Hessian is all zero; no calibration inputs reached this layer.")
    H[dead, dead] = 1  # keep H invertible; the column is zeroed so its value is irrelevant
    W[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)  # (in,)
        W = W[:, perm]
        H = H[perm][:, perm]

    U = _inverse_cholesky_upper(H, damp)  # (in, in) upper triangular
    codes = torch.zeros(n_out, n_in, dtype=torch.uint8, device=dev)
    scales, zeros = [], []
    scale = zero = None

    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (out, b) this block, kept fully up to date
        Err1 = torch.zeros_like(W1)  # (out, b) scaled errors, applied lazily to W[:, i2:]
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % gs == 0:  # entering a group: grid from the fully updated weights of the group
                wg = W1[:, i : i + gs]
                if j + gs > i2:  # group extends past this block: add the pending lazy updates
                    tail = W[:, i2 : j + gs] - Err1[:, :i] @ U[i1:j, i2 : j + gs]
                    wg = torch.cat([wg, tail], dim=1)
                scale, zero = find_grid(wg, bits, sym)  # (out,), (out,)
                scales.append(scale)
                zeros.append(zero)
            col = W1[:, i]  # (out,)
            q = quantize_to_codes(col, scale, zero, bits)
            codes[:, j] = q.to(torch.uint8)
            q_hat = (q - zero) * scale  # same expression as dequantize_codes
            err = (col - q_hat) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy batch update

    return QuantizedWeight.from_groups(codes, scales, zeros, bits, gs, sym, perm)
