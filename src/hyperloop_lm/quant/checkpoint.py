"""Quantized checkpoints: the packed model on disk, and loading it back without dequantizing it.

    OUT/
        model.safetensors   packed codes (uint8), fp16 scales, uint8 zeros, int32 perms for the
                            quantized layers; fp32 for everything kept in high precision
        meta.json           the source checkpoint's meta (format version, model and train config)
                            + "quantization": method, bits, group size, sym, act-order, damp, and
                            "layers": {module name: {kind, shape, bits, group_size, act_order}}
        tokenizer.json      the model's tokenizer (+ tokenizer_meta.json)

A shared (looped) layer is one module, so it is one set of buffers in the file, however many loops.
The directory is written beside OUT as a temp directory and renamed into place when complete.

Loading builds the LM skeleton on the `meta` device (no fp32 weights are allocated), swaps in
empty QuantizedLinear / QuantizedEmbedding modules described by meta.json, and assigns the stored
tensors directly; each layer dequantizes at matmul time. Every mismatch between meta.json and the
tensors (missing or extra tensors, a buffer shape that does not fit the recorded bits/group size, a
wrong dtype, zero points off the grid) is reported as one UserError naming the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from hyperloop_lm.config import ModelConfig
from hyperloop_lm.quant.core import SCALE_DTYPE, SUPPORTED_BITS
from hyperloop_lm.quant.driver import replace_module
from hyperloop_lm.quant.packed import QuantizedEmbedding, QuantizedLinear
from hyperloop_lm.train.checkpoint import FORMAT_VERSION, META_FILE, MODEL_FILE, load_weights, read_meta, resolve
from hyperloop_lm.utils import UserError, atomic_dir

QUANT_FORMAT_VERSION = 1  # layout of meta["quantization"] and of the packed buffers (see packed.py)
_BUFFER_DTYPES = {"qweight": torch.uint8, "scales": SCALE_DTYPE, "zeros": torch.uint8, "perm": torch.int32}


def is_quantized(meta: dict[str, Any]) -> bool:
    return "quantization" in meta


def save_quantized(out: str | Path, model: nn.Module, meta: dict[str, Any], tokenizer=None) -> Path:
    """Write `model` (holding quantized modules) to the directory `out`, atomically.

    meta: at least {"model": config dict, "quantization": QuantResult.meta()}; other keys (train
    config, source checkpoint) are kept. An existing `out` is replaced only if it is a quantized
    checkpoint or empty, so a typo cannot wipe an unrelated directory.
    """
    out = Path(out).expanduser()
    if "model" not in meta or "quantization" not in meta:
        raise ValueError("meta needs 'model' (config dict) and 'quantization' (QuantResult.meta())")
    if out.exists():
        old = out / META_FILE
        is_old_quant = old.is_file() and "quantization" in json.loads(old.read_text() or "{}")
        if not out.is_dir() or (any(out.iterdir()) and not is_old_quant):
            raise UserError(f"{out} exists and is not a quantized checkpoint; choose another --out or remove it")
    with atomic_dir(out) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format_version": str(FORMAT_VERSION),
                                                             "quant_format_version": str(QUANT_FORMAT_VERSION)})
        if tokenizer is not None:
            tokenizer.save(tmp)
        q = {**meta["quantization"], "format_version": QUANT_FORMAT_VERSION}
        (tmp / META_FILE).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION, "quantization": q},
                                                indent=2))
    return out


def checkpoint_bytes(path: str | Path) -> dict[str, int]:
    """{"weights": bytes of model.safetensors, "total": bytes of every file in the directory}."""
    path = resolve(path)
    files = [f for f in path.iterdir() if f.is_file()]
    return {"weights": (path / MODEL_FILE).stat().st_size, "total": sum(f.stat().st_size for f in files)}


def _layer_module(name: str, info: dict[str, Any], where: Path) -> nn.Module:
    """An empty quantized module (meta device) as described by one meta["quantization"]["layers"] entry."""
    try:
        kind, (n_out, n_in), bits, gs = info["kind"], info["shape"], int(info["bits"]), int(info["group_size"])
        act_order = bool(info.get("act_order", False))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"quantized checkpoint {where}: meta.json entry for {name} is incomplete "
                        f"({info!r}); re-run `hyperloop-lm quantize`") from None
    if bits not in SUPPORTED_BITS:
        raise UserError(f"quantized checkpoint {where}: {name} has bits={bits}, expected one of {SUPPORTED_BITS}")
    if kind == "embedding":
        return QuantizedEmbedding(n_out, n_in, bits, gs, device="meta")
    if kind == "linear":
        return QuantizedLinear(n_in, n_out, bits, gs, bias=False, act_order=act_order, device="meta")
    raise UserError(f"quantized checkpoint {where}: unknown layer kind {kind!r} for {name}")


def build_quantized_skeleton(cfg: ModelConfig, layers: dict[str, dict[str, Any]], where: Path) -> nn.Module:
    """The LM on the meta device with quantized modules in place of the listed layers."""
    from hyperloop_lm.model.lm import LM

    with torch.device("meta"):
        model = LM(cfg)
    for name, info in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"quantized checkpoint {where}: layer {name} does not exist in this model") from None
        new = _layer_module(name, info, where)
        expect = ((old.num_embeddings, old.embedding_dim) if isinstance(old, nn.Embedding)
                  else (old.out_features, old.in_features) if isinstance(old, nn.Linear) else None)
        if expect != (new.out_features, new.in_features):
            raise UserError(f"quantized checkpoint {where}: {name} is recorded as shape "
                            f"{[new.out_features, new.in_features]} but the model config gives {expect}")
        replace_module(model, name, new)
    return model


def _check_tensors(model: nn.Module, weights: dict[str, torch.Tensor], qcfg: dict[str, Any], where: Path) -> None:
    """Every stored tensor must exist, fit the recorded shape/bits/group size, and have the right dtype."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]
        detail = "; ".join(p for p in parts if p)
        raise UserError(f"quantized checkpoint {where} does not match its meta.json ({detail}); the file is corrupt "
                        "or from another model")
    for key, ref in own.items():
        t = weights[key]
        if t.shape != ref.shape:
            layer = key.rpartition(".")[0]
            info = qcfg["layers"].get(layer)
            hint = (f" (meta.json says bits={info['bits']}, group_size={info['group_size']})" if info else "")
            raise UserError(f"quantized checkpoint {where}: {key} has shape {tuple(t.shape)}, expected "
                            f"{tuple(ref.shape)}{hint}; the file and meta.json disagree")
        if t.dtype != ref.dtype:
            raise UserError(f"quantized checkpoint {where}: {key} is {t.dtype}, expected {ref.dtype}")
    for name, info in qcfg["layers"].items():
        zeros, maxq = weights[f"{name}.zeros"], 2 ** int(info["bits"]) - 1
        if zeros.numel() and int(zeros.max()) > maxq:
            raise UserError(f"quantized checkpoint {where}: {name}.zeros exceeds {maxq}, impossible for "
                            f"bits={info['bits']}; the file and meta.json disagree")


def load_quantized(path: str | Path, device: str | torch.device = "cpu", **overrides: Any):
    """(model, tokenizer or None, meta) from a quantized checkpoint: the same contract as
    `train.checkpoint.load_model`, with QuantizedLinear/QuantizedEmbedding modules inside."""
    from hyperloop_lm.data.tokenizer import Tokenizer
    from hyperloop_lm.model.layers import rope_tables

    path = resolve(path)
    meta = read_meta(path)
    qcfg = meta.get("quantization")
    if not isinstance(qcfg, dict) or not isinstance(qcfg.get("layers"), dict):
        raise UserError(f"{path} is not a quantized checkpoint (meta.json has no 'quantization' section)")
    if qcfg.get("format_version") != QUANT_FORMAT_VERSION:
        raise UserError(f"{path} has quantized format {qcfg.get('format_version')}, this version reads "
                        f"{QUANT_FORMAT_VERSION}")
    cfg = ModelConfig.from_dict({**meta["model"], **overrides})
    model = build_quantized_skeleton(cfg, qcfg["layers"], path)
    weights = load_weights(path)
    _check_tensors(model, weights, qcfg, path)
    model.load_state_dict(weights, strict=True, assign=True)  # the stored tensors become the model's
    # Non-persistent buffers are not in the file: recompute them (the RoPE tables) on the real device.
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a new non-persistent buffer in LM must be recomputed above
        raise RuntimeError(f"load_quantized left tensors unmaterialized: {left[:5]}")
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} ids but the model embeds "
                        f"{cfg.vocab_size}")
    return model.to(device).eval(), tokenizer, meta


def load_any(path: str | Path, device: str | torch.device = "cpu", **overrides: Any):
    """`load_model` for fp32 checkpoints, `load_quantized` for quantized ones (decided by meta.json)."""
    from hyperloop_lm.train.checkpoint import load_model

    if is_quantized(read_meta(path)):
        return load_quantized(path, device, **overrides)
    return load_model(path, device, **overrides)
