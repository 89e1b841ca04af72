"""Counting from the config alone (the 2B preset never needs to be instantiated).

Conventions:
- unique params follow the paper: every layer + final norm + untied head, *not* the input embedding;
  total params add the embedding (what a device has to hold).
- FLOPs are matmul FLOPs (2 per multiply-add) over the *unrolled* depth, the way
  torch.utils.flop_counter counts them: attention scores and values over the full T x T
  (no causal discount), HC mixing matmuls included, elementwise work excluded.
- KV cache: K and V for every virtual layer; looping does not shrink it.
"""
from __future__ import annotations

from hyperloop_lm.config import ModelConfig


def _hc_site_params(cfg: ModelConfig, res_kind: str) -> int:
    n = cfg.n_streams
    res_rows = {"diagonal": n, "sinkhorn": n * n, "identity": 0}[res_kind]
    rows = 2 * n + res_rows
    return rows * n * cfg.d_model + rows + 2 + (res_rows > 0)  # W, b, gates a_*


def _lora_params(cfg: ModelConfig) -> int:
    """Per-loop LoRA on one middle layer's four linears: loops * r * (d_in + d_out) each."""
    if not cfg.lora_rank:
        return 0
    d, h = cfg.d_model, cfg.mlp_hidden
    shapes = [(d, 3 * d), (d, d), (d, 2 * h), (h, d)]
    return cfg.loops * cfg.lora_rank * sum(i + o for i, o in shapes)


def _n_loop_embeddings(cfg: ModelConfig) -> int:
    if not cfg.loop_embedding:
        return 0
    if cfg.connection == "loop_hc":
        return cfg.hc_sites
    return cfg.loops if cfg.n_middle and cfg.loops > 1 else 0


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    d, h, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    layer = 4 * d * d + 3 * d * h + 2 * d  # attention + SwiGLU + two RMSNorm gains
    if cfg.connection == "mhc":
        layer += 2 * _hc_site_params(cfg, "sinkhorn")  # one site around attention, one around the MLP
    layers = cfg.unique_layers * layer + cfg.n_middle * _lora_params(cfg)
    loop_hc = cfg.hc_sites * _hc_site_params(cfg, cfg.h_res) if cfg.connection == "loop_hc" else 0
    loop_embed = _n_loop_embeddings(cfg) * d
    mhc = cfg.unique_layers * 2 * _hc_site_params(cfg, "sinkhorn") if cfg.connection == "mhc" else 0
    unique = layers + loop_hc + loop_embed + d + V * d  # + final norm + head
    return {
        "unique": unique,  # paper convention
        "total": unique + V * d,  # + input embedding
        "embedding": V * d,
        "head": V * d,
        "per_layer": layer,
        "hc_overhead": loop_hc + loop_embed + mhc,  # what hyper-connections (and loop embeddings) add
        "lora": cfg.n_middle * _lora_params(cfg),
    }


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, loops: int | None = None) -> dict[str, float]:
    """Forward matmul FLOPs per token at context `seq_len`; training ~= 3x forward."""
    T = seq_len or cfg.max_seq_len
    L = cfg.loops if loops is None else loops
    d, h, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    per_layer = 2 * (4 * d * d + 3 * d * h) + 4 * T * d  # projections + (QK^T, AV)
    depth = cfg.n_begin + L * cfg.n_middle + cfg.n_end
    lora = 2 * _lora_params(cfg) // cfg.loops if cfg.lora_rank else 0  # one loop's adapters per call
    hc = 0.0
    if cfg.connection == "mhc":
        hc = depth * 2 * _hc_site_matmul(cfg, "sinkhorn")
    elif cfg.connection == "loop_hc":
        hc = (L * cfg.n_middle // cfg.hc_span) * _hc_site_matmul(cfg, cfg.h_res)
    forward = depth * per_layer + L * cfg.n_middle * lora + hc + 2 * d * V
    return {"forward": float(forward), "train": 3.0 * forward, "hc": float(hc), "unrolled_depth": depth}


def _hc_site_matmul(cfg: ModelConfig, res_kind: str) -> int:
    n, d = cfg.n_streams, cfg.d_model
    res_rows = {"diagonal": n, "sinkhorn": n * n, "identity": 0}[res_kind]
    read = 2 * n * d  # pre @ y: the one weighted sum F reads
    mix = 2 * n * (n + 1) * d if res_kind == "sinkhorn" else 0  # [H_res | post] @ [y; u]; diagonal is elementwise
    return 2 * (2 * n + res_rows) * n * d + read + mix  # coefficient projection + read (+ dense mixing)


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2, loops: int | None = None) -> int:
    L = cfg.loops if loops is None else loops
    return 2 * (cfg.n_begin + L * cfg.n_middle + cfg.n_end) * cfg.d_model * bytes_per_value


def weight_bytes(cfg: ModelConfig, bits: int, group_size: int = 128, quantize_embeddings: bool = True) -> int:
    """Bytes to hold all weights (embedding included). bits in {32, 16}: every parameter at that width.
    bits in {8, 4, 3, 2}: linear/embedding matrices at `bits` plus an fp16 scale and zero per group;
    norms, HC parameters and loop embeddings in 16 bit."""
    c = param_counts(cfg)
    if bits >= 16:
        return c["total"] * bits // 8
    d, h = cfg.d_model, cfg.mlp_hidden
    matrices = cfg.unique_layers * (4 * d * d + 3 * d * h)
    embeds = c["embedding"] + c["head"]
    if quantize_embeddings:
        matrices += embeds
    rest = c["total"] - matrices
    groups = matrices // group_size if group_size > 0 else matrices // d
    return matrices * bits // 8 + groups * 4 + rest * 2


def projected_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every attention/MLP weight (what GaLore / one-sided LoRA project), unique layers only."""
    d, h = cfg.d_model, cfg.mlp_hidden
    return [(3 * d, d), (d, d), (2 * h, d), (d, h)] * cfg.unique_layers


def optimizer_state_bytes(cfg: ModelConfig, kind: str = "adamw", rank: int | None = None) -> dict[str, int]:
    """fp32 optimizer state: `projected` for the attention/MLP weights under `kind`, `total` adding plain
    AdamW moments for everything else (embeddings, head, norms, HC). rank None = d_model / 4."""
    from hyperloop_lm.train.lowrank import expected_state_bytes

    shapes = projected_shapes(cfg)
    projected = expected_state_bytes(shapes, rank or max(1, cfg.d_model // 4), kind)
    rest = param_counts(cfg)["total"] - sum(m * n for m, n in shapes)
    return {"projected": projected, "total": projected + 2 * 4 * rest}


def summary(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Everything `hyperloop-lm info` prints, as numbers."""
    c = param_counts(cfg)
    f = flops_per_token(cfg, seq_len)
    return {
        "family": cfg.family,
        "schedule": schedule_string(cfg),
        "unrolled_depth": cfg.unrolled_depth,
        "unique_params": c["unique"],
        "total_params": c["total"],
        "hc_overhead": c["hc_overhead"],
        "flops_per_token_fwd": f["forward"],
        "flops_per_token_train": f["train"],
        "kv_bytes_per_token_bf16": kv_bytes_per_token(cfg, 2),
        **{f"weight_bytes_{k}": weight_bytes(cfg, b) for k, b in (("fp32", 32), ("bf16", 16), ("int8", 8), ("int4_g128", 4))},
        **{f"optimizer_bytes_{k.replace('-', '_')}": optimizer_state_bytes(cfg, k)["total"]
           for k in ("adamw", "galore", "onesided-lora")},
    }


def schedule_string(cfg: ModelConfig) -> str:
    if cfg.n_middle == 0 or cfg.loops == 1 and cfg.n_end == 0:
        return f"{cfg.unrolled_depth}L"
    return f"{cfg.n_begin}-{cfg.n_middle}x{cfg.loops}-{cfg.n_end}"
