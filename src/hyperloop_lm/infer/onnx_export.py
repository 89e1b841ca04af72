"""ONNX export of the decoder with a KV cache per *virtual* layer (optional extra `[export]`).

    hyperloop-lm export --checkpoint runs/tiny-hyperloop --format onnx --out tiny-hyperloop.onnx

One graph serves both prefill and decode:

    inputs   input_ids       int64 (batch, seq)
             attention_mask  int64 (batch, past_seq + seq)   1 = token, 0 = left padding
                             (left out with --no-attention-mask: then every position is a token)
             past_k_{i}, past_v_{i}   float32 (batch, n_heads, past_seq, head_dim)  i = 0 .. depth-1
    outputs  logits          float32 (batch, seq, vocab)
             present_k_{i}, present_v_{i}   float32 (batch, n_heads, past_seq + seq, head_dim)

`depth` is the unrolled depth n_begin + loops * n_middle + n_end (the loop count is fixed at export;
`--loops K` exports an extrapolated graph). For the first call pass past tensors with past_seq = 0;
then feed each call's present_* back as the next call's past_*.

Export uses the TorchScript tracer (`torch.onnx.export(dynamo=False)`, no onnxscript needed). The
LM builds its attention mask with Python ints (`tril(past)`), which a tracer would freeze at the
example's past length, so the exported module uses `_traced_context` below: the same mask and
RoPE positions computed from tensor shapes only.
"""
from __future__ import annotations

import copy
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from hyperloop_lm.model.layers import ForwardContext
from hyperloop_lm.model.lm import LM
from hyperloop_lm.utils import UserError

DEFAULT_OPSET = 17


@torch.onnx.symbolic_helper.parse_args("v", "is", "v", "f")
def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm has no ONNX mapping below opset 23 (which the TorchScript exporter cannot emit):
    x / sqrt(mean(x^2 over the normalized dims) + eps) * weight, from primitive ops."""
    axes = list(range(-len(normalized_shape), 0))
    mean_sq = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    eps = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_sq, eps)))
    return y if weight.node().mustBeNone() else g.op("Mul", y, weight)


class _ConcatCache:
    """past K/V in, present K/V out: update(vlayer) appends the new keys to that layer's past."""

    def __init__(self, past_k: list[torch.Tensor], past_v: list[torch.Tensor]):
        self.past_k, self.past_v = past_k, past_v
        self.present_k: list[torch.Tensor | None] = [None] * len(past_k)
        self.present_v: list[torch.Tensor | None] = [None] * len(past_v)

    def update(self, vlayer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.present_k[vlayer] = torch.cat([self.past_k[vlayer], k], dim=2)
        self.present_v[vlayer] = torch.cat([self.past_v[vlayer], v], dim=2)
        return self.present_k[vlayer], self.present_v[vlayer]

    def advance(self, n: int) -> None:
        pass  # the graph's caller carries the length, in the shapes of present_*


def _traced_context(self: LM, B: int, T: int, device: torch.device, attention_mask: torch.Tensor,
                    cache: _ConcatCache) -> ForwardContext:
    """LM._context for a given 2-D mask, with every length taken from tensor shapes (traceable)."""
    S = attention_mask.shape[1]  # past + T
    keep = attention_mask.bool()  # (B, S)
    pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, S - T:]  # (B, T) real-token positions
    q_abs = torch.arange(T, device=device) + (S - T)  # absolute index of each query in the sequence
    k_abs = torch.arange(S, device=device)
    causal = k_abs[None, :] <= q_abs[:, None]  # (T, S)
    own = k_abs[None, :] == q_abs[:, None]  # a pad query sees itself: no all-masked rows
    mask = ((causal[None] & keep[:, None, :]) | own[None])[:, None]  # (B, 1, T, S)
    return ForwardContext(self.rope_cos[pos], self.rope_sin[pos], mask, cache)


class OnnxDecoder(nn.Module):
    """(input_ids, attention_mask, past_k_0, past_v_0, ...) -> (logits, present_k_0, present_v_0, ...)."""

    def __init__(self, model: LM, loops: int | None = None, with_attention_mask: bool = True):
        super().__init__()
        lm = copy.copy(model)  # shares parameters; only this copy gets the traceable context builder
        lm._context = types.MethodType(_traced_context, lm)
        self.lm, self.loops, self.with_attention_mask = lm, loops, with_attention_mask
        self.depth = model.depth(loops)

    def forward(self, input_ids: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.with_attention_mask:
            attention_mask, past = args[0], args[1:]
        else:
            past = args
            B, T = input_ids.shape
            attention_mask = torch.ones(B, past[0].shape[2] + T, dtype=torch.long, device=input_ids.device)
        cache = _ConcatCache(list(past[0::2]), list(past[1::2]))
        logits = self.lm(input_ids, attention_mask=attention_mask, cache=cache, loops=self.loops)
        present = [t for kv in zip(cache.present_k, cache.present_v) for t in kv]
        return (logits, *present)


def io_names(depth: int, with_attention_mask: bool = True) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(depth) for kv in "kv"]
    present = [f"present_{kv}_{i}" for i in range(depth) for kv in "kv"]
    return ["input_ids"] + (["attention_mask"] if with_attention_mask else []) + past, ["logits"] + present


def export_onnx(model: LM, out: str | Path, *, loops: int | None = None, with_attention_mask: bool = True,
                opset: int = DEFAULT_OPSET) -> Path:
    """Trace `model` into an ONNX decoder graph at `out` (see the module docstring for its interface)."""
    for m in model.modules():
        if type(m).__name__ == "QuantizedLinear":
            raise UserError("ONNX export of quantized checkpoints is not supported; export the fp32 checkpoint")
    cfg = model.cfg
    if loops is not None and cfg.n_middle == 0:
        raise UserError(f"loops={loops} needs a looped middle block, but this {cfg.family} model has none")
    dec = OnnxDecoder(model, loops, with_attention_mask).eval()
    device = next(model.parameters()).device
    # Example: batch 2, 3 new tokens after 2 cached ones (nonzero everywhere, so no axis is specialised).
    B, T, past = 2, 3, 2
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    kv = torch.zeros(B, cfg.n_heads, past, cfg.head_dim, device=device)
    mask = [torch.ones(B, past + T, dtype=torch.long, device=device)] if with_attention_mask else []
    inputs, outputs = io_names(dec.depth, with_attention_mask)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    if with_attention_mask:
        axes["attention_mask"] = {0: "batch", 1: "total_seq"}
    axes.update({n: {0: "batch", 2: "past_seq"} for n in inputs if n.startswith("past_")})
    axes.update({n: {0: "batch", 2: "total_seq"} for n in outputs if n.startswith("present_")})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not 14 <= opset <= 17:  # 14: attention with a boolean mask; > 17: ReduceMean takes axes as an input
        raise UserError(f"opset must be between 14 and 17, got {opset}")
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    # The tracer warns about unpacking q, k, v from a tensor (a fixed 3-way split, so harmless) and the
    # legacy exporter about being legacy; neither is actionable for the user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(dec, (ids, *mask, *[kv] * (2 * dec.depth)), str(out), dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    return out


def verify_onnx(path: str | Path, model: LM, *, loops: int | None = None, prompt_len: int = 5,
                with_attention_mask: bool = True, seed: int = 0) -> float:
    """Run a left-padded batch through onnxruntime (prefill, then one decode step with the returned
    present_* as past_*) and through PyTorch with our KVCache; return the max |logit difference|."""
    import numpy as np
    import onnxruntime as ort

    from hyperloop_lm.infer.cache import KVCache

    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    B, P = 3, prompt_len  # not the export example's batch of 2: checks the batch axis is dynamic
    ids = torch.randint(0, cfg.vocab_size, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    if with_attention_mask:
        mask[1, :2] = 0  # row 1 is left-padded by two
    nxt = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
    mask2 = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    depth = model.depth(loops)
    empty = np.zeros((B, cfg.n_heads, 0, cfg.head_dim), dtype=np.float32)
    feed = {"input_ids": ids.numpy()}
    if with_attention_mask:
        feed["attention_mask"] = mask.numpy()
    feed.update({f"past_{kv}_{i}": empty for i in range(depth) for kv in "kv"})
    first = sess.run(None, feed)
    feed = {"input_ids": nxt.numpy()}
    if with_attention_mask:
        feed["attention_mask"] = mask2.numpy()
    feed.update({f"past_{kv}_{i}": first[1 + 2 * i + j] for i in range(depth) for j, kv in enumerate("kv")})
    second = sess.run(None, feed)

    device = next(model.parameters()).device
    cache = KVCache.for_model(model, batch=B, max_len=P + 1, loops=loops)
    with torch.no_grad():
        m1, m2 = (mask.to(device), mask2.to(device)) if with_attention_mask else (None, None)
        ref1 = model(ids.to(device), attention_mask=m1, cache=cache, loops=loops).float().cpu()
        ref2 = model(nxt.to(device), attention_mask=m2, cache=cache, loops=loops).float().cpu()
    return max(float((torch.from_numpy(first[0]) - ref1).abs().max()),
               float((torch.from_numpy(second[0]) - ref2).abs().max()))
