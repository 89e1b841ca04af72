"""Optimizers (AdamW with no-decay groups, GaLore, one-sided LoRA) and the LR schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from hyperloop_lm.train.config import TrainConfig

# 2-D weights of attention and MLP layers: the ones GaLore / one-sided LoRA project.
PROJECTED = ("attn.wqkv.weight", "attn.wo.weight", "mlp.gate_up.weight", "mlp.down.weight")


def no_decay_names(model: nn.Module) -> set[str]:
    """Norms, gains, biases, hyper-connection parameters and loop embeddings: no weight decay."""
    return {n for n, p in model.named_parameters()
            if p.dim() < 2 or n.startswith(("hc.", "loop_embed")) or "_hc." in n}


def projected_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(PROJECTED) and ".lora." not in n]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    skip = no_decay_names(model)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if n not in skip], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in params if n in skip], "weight_decay": 0.0}]
        fused = next(model.parameters()).device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=betas, fused=fused or None)
    from hyperloop_lm.train import lowrank

    rank = cfg.rank or max(1, model.cfg.d_model // 4)
    build = lowrank.galore_adamw if cfg.optimizer == "galore" else lowrank.onesided_lora_adamw
    return build(model, projected_names(model), lr=cfg.peak_lr, rank=rank, scale=cfg.galore_scale,
                 proj_gap=cfg.proj_gap, proj=cfg.proj, betas=betas, weight_decay=cfg.weight_decay,
                 no_decay=lambda n, p: n in skip, seed=cfg.seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at the last step."""
    peak, warmup, total = cfg.peak_lr, cfg.warmup, cfg.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
