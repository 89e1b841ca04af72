"""Checkpoints: one directory per step, written atomically, with everything needed to resume.

    out_dir/checkpoints/step-0000200/
        model.safetensors   weights (never pickled)
        state.pt            optimizer, loader position, RNG, step (loaded with weights_only=True)
        meta.json           format version, model config, train config, step, metrics
        tokenizer.json      the run's tokenizer (+ tokenizer_meta.json)

A directory is written as a hidden temp directory and renamed into place only when complete, so a crash
mid-write leaves the previous checkpoints untouched; half-written temp directories are ignored.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperloop_lm.config import ModelConfig
from hyperloop_lm.utils import UserError, atomic_dir, atomic_write_text

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, *, meta: dict[str, Any],
                    state: dict[str, Any] | None = None, tokenizer=None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """`weights` (optional) replaces the model's own state dict, e.g. full tensors gathered from FSDP shards."""
    root = Path(root)
    final = step_dir(root, step)
    with atomic_dir(final) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in (weights or plain_state_dict(model)).items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, **meta}, indent=2))
    atomic_write_text(root / "latest", final.name + "\n")
    return final


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model as a plain LM: parametrized weights (one-sided LoRA: W0 + P C) are
    saved as their effective value, so every checkpoint loads without knowing how it was trained."""
    from torch.nn.utils import parametrize

    sd = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr in module.parametrizations:
                sd[f"{name}.{attr}"] = getattr(module, attr).detach()
    return sd


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / META_FILE).is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def prune(root: str | Path, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest `keep_last` checkpoints (and those in `keep`, e.g. the best)."""
    ckpts = list_checkpoints(root)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({META_FILE}: {e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {meta.get('format_version')}, this version reads "
                        f"{FORMAT_VERSION}")
    return meta


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    path = Path(path).expanduser()
    if (path / META_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise UserError(f"no checkpoint at {path} (expected a checkpoint directory with {META_FILE}, or a run "
                    "directory with checkpoints/)")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = resolve(path)
    try:
        return load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path / MODEL_FILE} is corrupt or unreadable ({e}); use another checkpoint") from None


def load_state(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated/garbled file
        raise UserError(f"{path / STATE_FILE} is corrupt or unreadable ({type(e).__name__}); use another "
                        "checkpoint") from None


def check_model_config(expected: ModelConfig, saved: dict[str, Any], where: Path) -> None:
    """A clear error naming every field where a checkpoint's model differs from the one asked for."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs requested {v!r}" for k, v in expected.to_dict().items()
             if k != "name" and saved.get(k) != v]
    if diffs:
        raise UserError(f"checkpoint {where} was trained with a different model config ({'; '.join(diffs)}); "
                        "use a fresh out_dir or match the config")


def load_into(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights with strict key/shape checking, reported as one clear error."""
    weights = load_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shape mismatch {shapes[:3]}" if shapes else ""]
        raise UserError(f"checkpoint {resolve(path)} does not fit this model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(weights)


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides: Any):
    """(model, tokenizer or None, meta) from a checkpoint; `overrides` change inference-only fields."""
    from hyperloop_lm.data.tokenizer import Tokenizer
    from hyperloop_lm.model.lm import LM

    path = resolve(path)
    meta = read_meta(path)
    if "quantization" in meta:  # a packed low-bit checkpoint written by `hyperloop-lm quantize`
        from hyperloop_lm.quant.checkpoint import load_quantized

        return load_quantized(path, device, **overrides)
    cfg = ModelConfig.from_dict({**meta["model"], **overrides})
    model = LM(cfg)
    load_into(model, path)
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} ids but the model embeds "
                        f"{cfg.vocab_size}")
    return model.to(device).eval(), tokenizer, meta
