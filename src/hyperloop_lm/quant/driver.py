"""The model-level quantization driver: which layers, in which order, from which calibration inputs.

    info = quantize_model(model, "gptq", bits=4, group_size=128, calib=tokens)  # tokens (N, T) int64
    # model now holds QuantizedLinear modules in place of its block linears (in place, packed)

What is quantized
-----------------
- Every block's four linears, `attn.wqkv`, `attn.wo`, `mlp.gate_up`, `mlp.down`, in the begin, middle
  (shared, looped) and end blocks. A shared middle layer is quantized ONCE and stored once.
- With `quantize_embeddings=True` also the input embedding (RTN per row: an embedding has no input
  Hessian, its "inputs" are one-hot) and the untied head (GPTQ with the Hessian of the final-norm
  output, or RTN).
- Everything else stays fp32: hyper-connection parameters (loop-level and mHC sites), RMSNorm gains,
  loop embeddings and per-loop LoRA adapters. They are a tiny fraction of the bytes, and the HC
  coefficients are computed in fp32 by design.

GPTQ order (also in `gptq.py`'s docstring): embedding (RTN, if asked) -> begin blocks -> middle
blocks (each shared layer's Hessian summed over all loops) -> end blocks -> head (if asked). Inside a
block the four linears go in forward order, and each one's Hessian is captured *after* the previous
ones were replaced by their quantized versions (GPTQ's "true sequential" mode), so every layer is
fitted to the inputs it will see at deployment.

How the inputs are captured, and what it costs
----------------------------------------------
A linear's Hessian is captured with one forward hook on that linear feeding a `HessianAccumulator`,
over the calibration batches, with the model in its current state. Two ways of running the model:
- Blocks that run once per forward (begin, end): a forward pre-hook records the block's inputs
  (hidden state, RoPE/mask context) for every batch, with all earlier blocks already quantized, and
  the pass stops there. Each of the block's four linears is then captured by re-running only that
  block on the recorded inputs (this is the reference's layer-by-layer input caching, done
  generically; the block's output never needs storing, the next block records its own inputs).
- The shared middle blocks: the whole model runs forward (the block is called once per loop with
  hyper-connection mixing, loop embeddings and other shared layers in between), so a hook on a
  shared linear fires once per loop and its accumulator sums x x^T over every call in every loop
  without special code; loop l > 0 sees loops that already run the quantized earlier layers. The
  pass is cut short (an exception raised from the hook) after the layer's last call.
Cost: one prefix forward per begin/end block plus 4 block re-runs, and ~4 full forwards per middle
block, over the calibration set: minutes on CPU at our scale. Memory: one block's inputs for the
whole calibration set (N x T x C floats, x n streams for mHC), like the reference.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hyperloop_lm.quant.core import SUPPORTED_BITS, quantize_rtn
from hyperloop_lm.quant.gptq import HessianAccumulator, gptq_quantize
from hyperloop_lm.quant.packed import QuantizedEmbedding, QuantizedLinear
from hyperloop_lm.utils import UserError

BLOCK_LINEARS = ("attn.wqkv", "attn.wo", "mlp.gate_up", "mlp.down")  # forward order inside a Block
METHODS = ("rtn", "gptq")


@dataclass
class QuantSpec:
    """How a model is quantized; stored as meta["quantization"] in a quantized checkpoint."""

    method: str = "gptq"  # rtn | gptq
    bits: int = 4  # 2 | 3 | 4 | 8
    group_size: int = 128  # input columns per (scale, zero); -1 = one group per row
    sym: bool = False  # symmetric grid (zero fixed at 2^(bits-1)) vs asymmetric (integer zero point)
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ: damping, fraction of mean(diag H)
    block_size: int = 128  # GPTQ: lazy-batch width
    quantize_embeddings: bool = False  # also the input embedding (RTN per row) and the head

    def validate(self) -> "QuantSpec":
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise UserError(f"group_size must be a positive integer or -1 (per-channel), got {self.group_size}")
        if not self.damp > 0:
            raise UserError(f"damp must be > 0 (e.g. 0.01), got {self.damp}")
        return self


@dataclass
class QuantResult:
    """What `quantize_model` did: the spec, every quantized module in order, and timings."""

    spec: QuantSpec
    order: list[str]  # module names in the order they were quantized
    layers: dict[str, dict[str, Any]]  # name -> {kind, shape, bits, group_size, act_order, ...}
    seconds: float
    calib_tokens: int = 0
    hessians: dict[str, HessianAccumulator] = field(default_factory=dict)  # only if keep_hessians

    def meta(self) -> dict[str, Any]:
        """JSON-serializable description (goes into the quantized checkpoint's meta.json)."""
        return {**asdict(self.spec), "order": self.order, "layers": self.layers,
                "seconds": round(self.seconds, 3), "calib_tokens": self.calib_tokens}


# ------------------------------------------------------------------------------------ which layers
def block_linear_names(model: nn.Module) -> list[str]:
    """Names of the block linears in quantization order: begin, middle, end; forward order inside."""
    names = []
    for stage in ("begin", "middle", "end"):
        for i in range(len(getattr(model, stage))):
            names += [f"{stage}.{i}.{sub}" for sub in BLOCK_LINEARS]
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


# ------------------------------------------------------------------------------------ calibration
def calibration_tokens(tokens: np.ndarray | Tensor, n_seqs: int, seq_len: int, seed: int = 0) -> Tensor:
    """(n_seqs, seq_len) int64 windows at random offsets of a token stream (e.g. the train shard's
    memmap); deterministic in `seed`. Offsets are sorted so that a memmap is read front to back."""
    n = len(tokens)
    if n_seqs < 1 or seq_len < 1:
        raise UserError(f"calibration needs >= 1 sequence of >= 1 token, got {n_seqs} x {seq_len}")
    if n < seq_len:
        raise UserError(f"calibration: the token stream has {n} tokens, fewer than one sequence of {seq_len}")
    starts = np.sort(np.random.default_rng(seed).integers(0, n - seq_len + 1, size=n_seqs))
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


def _batches(calib: Tensor | Sequence[Tensor], batch_size: int) -> list[Tensor]:
    if isinstance(calib, Tensor):
        if calib.dim() != 2:
            raise UserError(f"calibration tokens must be (sequences, length), got shape {tuple(calib.shape)}")
        return list(calib.split(batch_size))
    return list(calib)


class _StopForward(Exception):
    """Raised from a hook once the captured layer has made its last call: the rest of the pass is waste."""


@torch.no_grad()
def calls_per_forward(model: nn.Module, names: Iterable[str], device: torch.device) -> dict[str, int]:
    """How often each named module runs in one forward pass (loops for a shared middle layer), counted
    on a 1-sequence, 2-token dummy input rather than derived from the config (works for any schedule)."""
    counts = {n: 0 for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: counts.__setitem__(n, counts[n] + 1)) for n in counts]
    try:
        model(torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    return counts


def _accumulate(layer: nn.Module, runs: Sequence[Callable[[], Any]], calls: int | None) -> HessianAccumulator:
    """Run each `runs[i]()` with a hook on `layer` that feeds one HessianAccumulator; a run is cut
    short after the layer's `calls`-th call (None: run to the end)."""
    acc = HessianAccumulator(layer.in_features, device=layer_device(layer))
    seen = [0]

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        acc.add_batch(args[0])
        seen[0] += 1
        if calls is not None and seen[0] == calls:
            raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        for run in runs:
            seen[0] = 0
            try:
                run()
            except _StopForward:
                pass
    finally:
        handle.remove()
    return acc


def layer_device(layer: nn.Module) -> torch.device:
    return next(iter([*layer.parameters(), *layer.buffers()])).device


@torch.no_grad()
def capture_hessian(model: nn.Module, name: str, batches: Sequence[Tensor],
                    calls: int | None = None) -> HessianAccumulator:
    """One HessianAccumulator for module `name`, fed by every call of it (all loops) in full forward
    passes over `batches`. `calls` (per pass) lets a pass stop after the last call."""
    device = next(model.parameters()).device
    return _accumulate(model.get_submodule(name), [lambda x=x: model(x.to(device)) for x in batches], calls)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: str, batches: Sequence[Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first call of module `block` for every batch; each pass stops there."""
    device = next(model.parameters()).device
    stored: list[tuple[tuple, dict]] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
        stored.append((args, kwargs))
        raise _StopForward

    handle = model.get_submodule(block).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(x.to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return stored


# ------------------------------------------------------------------------------------ the driver
def _layer_info(kind: str, q: QuantizedLinear, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "shape": [q.out_features, q.in_features], "bits": q.bits,
            "group_size": q.group_size, "act_order": q.perm is not None, **extra}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    calib: Tensor | Sequence[Tensor] | None = None,
    *,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    quantize_embeddings: bool = False,
    block_size: int = 128,
    batch_size: int = 8,
    keep_hessians: bool = False,
    log: Callable[[str], None] | None = None,
) -> QuantResult:
    """Quantize an `LM` in place (nn.Linear -> QuantizedLinear, nn.Embedding -> QuantizedEmbedding).

    calib: GPTQ calibration token ids, (N, T) (split into batches of `batch_size`) or a list of (B, T)
        tensors; ignored by RTN. keep_hessians: return every layer's HessianAccumulator (tests).
    The order and what stays in high precision are in the module docstring.
    """
    spec = QuantSpec(method, bits, group_size, sym, act_order, damp, block_size, quantize_embeddings).validate()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = _batches(calib, batch_size) if calib is not None else []
    if spec.method == "gptq" and not batches:
        raise UserError("GPTQ needs calibration tokens (calib=...); RTN needs none")
    result = QuantResult(spec, [], {}, 0.0, sum(b.numel() for b in batches) if spec.method == "gptq" else 0)
    say = log or (lambda s: None)

    if spec.quantize_embeddings:  # first, so that every later Hessian sees the quantized embedding
        emb = model.embed
        qe = QuantizedEmbedding.from_codes(quantize_rtn(emb.weight, bits, group_size, sym))
        replace_module(model, "embed", qe)
        result.order.append("embed")
        result.layers["embed"] = _layer_info("embedding", qe, method="rtn")

    names = block_linear_names(model) + (["head"] if spec.quantize_embeddings else [])
    calls: dict[str, int] = {}
    if spec.method == "gptq":
        blocks = sorted({n.rsplit(".", 2)[0] for n in names if n != "head"})
        calls = calls_per_forward(model, names + blocks, device)
    replay_block, replay_inputs = None, []
    for k, name in enumerate(names):
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise UserError(f"{name} is a {type(layer).__name__}, not an nn.Linear (already quantized?)")
        extra: dict[str, Any] = {}
        if spec.method == "gptq":
            # Inputs from the model as it is now: every earlier layer already quantized (see docstring).
            block = name.rsplit(".", 2)[0] if name != "head" else None
            if block is not None and calls[block] == 1:  # begin/end block: replay it on recorded inputs
                if block != replay_block:  # entering a new block: record its inputs once
                    replay_block, replay_inputs = block, capture_block_inputs(model, block, batches)
                blk = model.get_submodule(block)
                acc = _accumulate(layer, [lambda a=a, kw=kw: blk(*a, **kw) for a, kw in replay_inputs], calls[name])
            else:  # shared middle layer (one call per loop) or the head: full forward passes
                replay_block, replay_inputs = None, []  # free the recorded inputs
                acc = capture_hessian(model, name, batches, calls[name])
            qw = gptq_quantize(layer.weight, acc.H, bits, group_size, sym, act_order, damp, block_size)
            extra = {"calls_per_forward": calls[name], "hessian_rows": acc.nsamples}
            if keep_hessians:
                result.hessians[name] = acc
        else:
            qw = quantize_rtn(layer.weight, bits, group_size, sym)
        q = QuantizedLinear.from_codes(qw, layer.bias)
        replace_module(model, name, q)
        result.order.append(name)
        result.layers[name] = _layer_info("linear", q, method=spec.method, **extra)
        say(f"[{k + 1}/{len(names)}] {name} {tuple(layer.weight.shape)} ({time.perf_counter() - t0:.1f}s)")
    model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------ accounting
def state_bytes(model: nn.Module) -> int:
    """Bytes of everything the model persists (parameters + persistent buffers): its weights in memory."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
