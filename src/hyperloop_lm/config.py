"""ModelConfig: one dataclass describes all four families, plus the named presets.

A model is a *depth schedule*: `n_begin` layers run once, `n_middle` layers with shared weights run
`loops` times, `n_end` layers run once, and a `connection` decides how the residual stream works:

    family       connection  loops   streams
    transformer  residual    1       1
    mhc          mhc         1       n  (an mHC site around every attention and MLP sub-layer)
    looped       residual    > 1     1
    hyperloop    loop_hc     > 1     n  (one hyper-connection site per loop around the middle block)

Fields marked [choice] are not stated by the paper; their defaults are ours and are recorded in every
run's config.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from hyperloop_lm.utils import UserError, closest

CONNECTIONS = ("residual", "loop_hc", "mhc")
H_RES_KINDS = ("diagonal", "sinkhorn", "identity")
INITS = ("pytorch", "gpt2")
PRE_BIAS_INITS = ("zero", "logit_inv_n")
BLOCK_OUTPUTS = ("full", "delta")


@dataclass
class ModelConfig:
    name: str = "custom"  # preset name or a label; not used by the math
    vocab_size: int = 32000  # the paper's Llama-2 tokenizer; set from the tokenizer at train time
    d_model: int = 1024  # residual width C
    n_heads: int = 16  # multi-head attention, no GQA; head_dim = d_model / n_heads
    mlp_ratio: float = 2.75  # SwiGLU hidden = round(mlp_ratio * d_model)
    max_seq_len: int = 2048  # RoPE table length and the KV-cache limit
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # depth schedule: begin (once) -> middle (shared weights) x loops -> end (once)
    n_begin: int = 16
    n_middle: int = 0
    n_end: int = 0
    loops: int = 1
    depth: int | None = None  # declared unrolled depth; if set it must equal n_begin + loops*n_middle + n_end
    connection: str = "residual"  # residual | loop_hc (Hyperloop) | mhc (mHC Transformer)
    # hyper-connections (loop_hc and mhc)
    n_streams: int = 4  # parallel residual streams n
    h_res: str = "diagonal"  # loop_hc stream mixing: diagonal (paper) | sinkhorn (dense) | identity; mhc is always sinkhorn
    hc_every: int = 0  # loop_hc: unrolled middle layers per HC site; 0 = once per loop (= n_middle) [paper default]
    loop_embedding: bool = True  # add a learned e_l (C) after each loop / HC site
    hc_block_output: str = "full"  # loop_hc: u = block(x) incl. its inner skips (spec 2.1) | delta = block(x) - x [choice]
    hc_gate_init: float = 0.01  # a_pre/a_post/a_res init (mHC default)
    hc_pre_bias_init: str = "zero"  # b_pre: zero (pre=0.5) | logit_inv_n (pre=1/n, the block reads the stream mean) [choice]
    hc_res_init: float = 0.5  # diagonal H_res at init = sigmoid(b_res): 0.5 is b_res = 0 (spec); near 1 keeps the stream [choice]
    hc_weight_init_std: float = 0.02  # W_pre/W_post/W_res ~ N(0, std^2); small, nonzero so a_* gets gradient [choice]
    hc_res_offdiag_init: float = -2.0  # sinkhorn H_res logits: 0 on the diagonal, this off it (mild identity) [choice]
    sinkhorn_iters: int = 20
    # per-loop LoRA baseline (paper Table 7): rank-r adapters on the middle block's linears, one per loop
    lora_rank: int = 0
    # initialisation: pytorch = nn.Linear defaults (paper main text); gpt2 = N(0, 0.02) with residual
    # projections N(0, 0.02/sqrt(2*unrolled_depth)) (paper v3 appendix)
    init: str = "pytorch"

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived quantities
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.d_model)

    @property
    def unrolled_depth(self) -> int:
        return self.n_begin + self.loops * self.n_middle + self.n_end

    @property
    def unique_layers(self) -> int:
        return self.n_begin + self.n_middle + self.n_end

    @property
    def streams(self) -> int:
        """Width of the residual stream state in units of d_model (1 for plain residual models)."""
        return 1 if self.connection == "residual" else self.n_streams

    @property
    def hc_sites(self) -> int:
        """Number of loop-level hyper-connection sites over the unrolled middle (loop_hc only)."""
        if self.connection != "loop_hc" or self.n_middle == 0:
            return 0
        return self.loops * self.n_middle // self.hc_span

    @property
    def hc_span(self) -> int:
        """Unrolled middle layers covered by one loop_hc site."""
        return self.hc_every or self.n_middle

    @property
    def family(self) -> str:
        if self.connection == "mhc":
            return "mhc"
        if self.connection == "loop_hc":
            return "hyperloop"
        return "looped" if self.n_middle > 0 and self.loops > 1 else "transformer"

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(fieldname: str, msg: str) -> None:
            raise ValueError(f"ModelConfig.{fieldname}: {msg}")

        for f in ("vocab_size", "d_model", "n_heads", "max_seq_len", "loops", "n_streams", "sinkhorn_iters"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("n_begin", "n_middle", "n_end", "hc_every", "lora_rank"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                bad(f, f"must be a non-negative integer, got {getattr(self, f)!r}")
        if self.d_model % self.n_heads:
            bad("n_heads", f"must divide d_model={self.d_model} (got {self.n_heads}); pick e.g. "
                f"{[h for h in (1, 2, 4, 8, 16, 32) if self.d_model % h == 0][-1]}")
        if self.head_dim % 2:
            bad("n_heads", f"head_dim = d_model/n_heads = {self.head_dim} must be even for RoPE")
        if self.mlp_ratio <= 0:
            bad("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        if self.unrolled_depth < 1:
            bad("n_begin", "the model has no layers: set n_begin, n_middle or n_end")
        if self.depth is not None and self.depth != self.unrolled_depth:
            bad("depth", f"declared depth {self.depth} != n_begin + loops*n_middle + n_end = "
                f"{self.n_begin} + {self.loops}*{self.n_middle} + {self.n_end} = {self.unrolled_depth}; "
                "fix the block sizes or drop `depth`")
        for f, allowed in (("connection", CONNECTIONS), ("h_res", H_RES_KINDS), ("init", INITS),
                           ("hc_pre_bias_init", PRE_BIAS_INITS), ("hc_block_output", BLOCK_OUTPUTS)):
            if getattr(self, f) not in allowed:
                bad(f, f"must be one of {', '.join(allowed)}; got {getattr(self, f)!r}{closest(str(getattr(self, f)), allowed)}")
        if not 0 < self.hc_res_init < 1:
            bad("hc_res_init", f"is sigmoid(b_res) at init, so it must lie in (0, 1); got {self.hc_res_init}")
        if self.connection == "loop_hc":
            if self.n_middle == 0:
                bad("n_middle", "connection=loop_hc needs a looped middle block (n_middle > 0)")
            if (self.loops * self.n_middle) % self.hc_span:
                bad("hc_every", f"must divide loops*n_middle = {self.loops * self.n_middle} (got {self.hc_every})")
        if self.lora_rank and (self.n_middle == 0 or self.loops < 2):
            bad("lora_rank", "per-loop LoRA needs a looped middle block (n_middle > 0, loops > 1)")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**check_keys(cls, d, "model config"))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **check_keys(type(self), changes, "model config"))


def check_keys(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """Reject unknown keys with the closest valid one suggested (typos in YAML are common)."""
    valid = [f.name for f in fields(cls)]
    for key in d:
        if key not in valid:
            raise UserError(f"unknown {what} key '{key}'{closest(key, valid)}")
    return dict(d)


# --------------------------------------------------------------------------- presets
def _family(base: dict[str, Any], family: str, begin: int, middle: int, end: int, loops: int,
            depth: int) -> dict[str, Any]:
    """Config kwargs for one family at a given depth. Transformer/mHC use `depth` plain layers;
    Looped/Hyperloop use the begin-middle x loops-end split."""
    if family in ("transformer", "mhc"):
        sched = dict(n_begin=depth, n_middle=0, n_end=0, loops=1)
    else:
        sched = dict(n_begin=begin, n_middle=middle, n_end=end, loops=loops)
    conn = {"transformer": "residual", "mhc": "mhc", "looped": "residual", "hyperloop": "loop_hc"}[family]
    return {**base, **sched, "connection": conn, "depth": depth, "loop_embedding": family == "hyperloop"}


FAMILIES = ("transformer", "mhc", "looped", "hyperloop")

# (scale, d_model, n_heads, vocab, seq, depth, begin, middle, end, loops)
_SCALES = {
    "240m": (1024, 16, 32000, 2048, 16, 2, 4, 2, 3),
    "1b": (2048, 16, 32000, 2048, 18, 3, 4, 3, 3),
    "2b": (2048, 16, 32000, 2048, 38, 4, 10, 4, 3),
    # CPU scales keep the paper's structure: the looped models have ~half the unique layers
    "tiny": (128, 4, 4096, 256, 8, 1, 2, 1, 3),
    "small": (256, 8, 8192, 256, 16, 2, 4, 2, 3),
    # gpu-small: the reproduction scale for a single GPU (paper structure at d512)
    "gpu-small": (512, 8, 8192, 1024, 16, 2, 4, 2, 3),
    # micro: for tests and the end-to-end pipeline check (seconds)
    "micro": (64, 2, 512, 64, 4, 1, 1, 1, 2),
}

PRESETS: dict[str, dict[str, Any]] = {}
for _scale, (_d, _h, _v, _t, _depth, _b, _m, _e, _l) in _SCALES.items():
    _base = dict(d_model=_d, n_heads=_h, vocab_size=_v, max_seq_len=_t)
    for _fam in FAMILIES:
        PRESETS[f"{_scale}-{_fam}"] = {"name": f"{_scale}-{_fam}", **_family(_base, _fam, _b, _m, _e, _l, _depth)}

# Paper Table 3: fixed unrolled depth, a smaller middle block looped more times.
for _scale, _d, _b, _m, _l, _e in (("240m", 1024, 2, 3, 4, 2), ("240m", 1024, 2, 2, 6, 2),
                                   ("1b", 2048, 3, 3, 4, 3), ("1b", 2048, 3, 2, 6, 3)):
    _name = f"{_scale}-hyperloop-{_b}-{_m}x{_l}-{_e}"
    _base = dict(d_model=_d, n_heads=16, vocab_size=32000, max_seq_len=2048)
    PRESETS[_name] = {"name": _name, **_family(_base, "hyperloop", _b, _m, _e, _l, _b + _m * _l + _e)}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'{closest(name, PRESETS)}; see `hyperloop-lm info --list`")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


def logit(p: float) -> float:
    return math.log(p / (1 - p))
