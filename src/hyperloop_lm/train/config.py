"""TrainConfig: everything a run needs besides the model architecture (which is a preset + overrides).

YAML configs (configs/*.yaml) hold these fields; `--key value` on the command line overrides them and
`--model.FIELD value` overrides a ModelConfig field. Unknown keys are an error naming the closest one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hyperloop_lm.config import ModelConfig, check_keys, get_preset
from hyperloop_lm.utils import UserError

# The two recipes of the spec (section 3): init scheme and its peak learning rate.
RECIPES = {"pytorch": {"init": "pytorch", "lr": 4e-4}, "gpt2": {"init": "gpt2", "lr": 1.6e-3}}


@dataclass
class TrainConfig:
    # model
    model: str = "tiny-hyperloop"  # preset name (hyperloop-lm info --list)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. {n_streams: 8}
    # data
    corpus: str = "english-mix"  # english-mix | english-large | PATH (file, dir, glob, .jsonl[:field]) | hf:NAME
    tokenizer: str = "bpe"  # bpe (trained on the corpus) | llama2 | gpt2 | a directory with tokenizer.json
    vocab_size: int = 4096  # for a trained bpe tokenizer
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    tokens: int = 2_000_000  # training budget; steps = tokens / (batch_size * seq_len)
    # recipe and optimizer
    recipe: str = "pytorch"  # pytorch: default init, lr 4e-4 | gpt2: GPT-2 init, lr 1.6e-3 (spec 3)
    lr: float | None = None  # peak learning rate; None = the recipe's
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int | None = None  # None = 5% of the steps (paper: 1000 of 23.8k at 240M)
    weight_decay: float = 0.1  # not applied to norms, gains, HC parameters, loop embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    optimizer: str = "adamw"  # adamw | galore | onesided-lora
    rank: int | None = None  # galore / onesided-lora projection rank; None = d_model / 4
    proj_gap: int = 200  # projector refresh period (steps)
    proj: str = "svd"  # svd (of the gradient) | random (orthonormal sketch)
    galore_scale: float = 0.25
    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: bool = False  # torch.compile each block
    keep_freed_memory: bool = True  # CPU, glibc: keep freed memory in the process (no page faults every step)
    parallel: str = "ddp"  # with torchrun: ddp (replicate) | fsdp (FSDP2 fully_shard per block)
    truncate_backprop: int = 0  # >0: gradients flow only through the last k loops (scaling-law ablation)
    eval_every: int = 200  # steps between held-out evaluations (0 = only at the end)
    eval_tokens: int = 200_000  # held-out tokens per evaluation
    log_every: int = 10
    ckpt_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept besides the best
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto (latest checkpoint in out_dir, if any) | never | PATH to a checkpoint
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise UserError(f"recipe must be one of {', '.join(RECIPES)}, got '{self.recipe}'")
        if self.optimizer not in ("adamw", "galore", "onesided-lora"):
            raise UserError(f"optimizer must be adamw, galore or onesided-lora, got '{self.optimizer}'")
        for f in ("seq_len", "batch_size", "grad_accum", "tokens", "vocab_size"):
            if getattr(self, f) < 1:
                raise UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.parallel not in ("ddp", "fsdp"):
            raise UserError(f"parallel must be ddp or fsdp, got '{self.parallel}'")
        if self.parallel == "fsdp" and self.optimizer != "adamw":
            raise UserError("parallel: fsdp supports optimizer: adamw (GaLore/LoRA projectors need whole weights)")
        if self.batch_size % self.grad_accum:
            raise UserError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else RECIPES[self.recipe]["lr"]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset with the recipe's init, the tokenizer's vocabulary and a context >= seq_len."""
        base = get_preset(self.model)
        overrides = {"init": RECIPES[self.recipe]["init"], "vocab_size": vocab_size,
                     "max_seq_len": max(base.max_seq_len, self.seq_len), **self.model_overrides}
        return base.replace(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**check_keys(cls, d, "train config"))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """YAML file (optional) + overrides; `model.X` keys go to model_overrides."""
        d: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise UserError(f"config file {p} does not exist (see configs/ for examples)")
            d = yaml.safe_load(p.read_text()) or {}
            if not isinstance(d, dict):
                raise UserError(f"config file {p} must be a YAML mapping of train-config keys")
        d = dict(d)
        mo = dict(d.pop("model_overrides", None) or {})
        for key, value in (overrides or {}).items():
            if key.startswith("model."):
                mo[key[len("model."):]] = value
            else:
                d[key] = value
        check_keys(ModelConfig, mo, "model config")
        return cls.from_dict({**d, "model_overrides": mo})


def train_config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
