"""Hugging Face transformers integration (optional extra `[hf]`, tested with transformers 5.23).

    from hyperloop_lm.infer.hf import to_hf                 # also registers the Auto classes
    to_hf("runs/tiny-hyperloop", "hf/tiny-hyperloop")       # config.json + model.safetensors + tokenizer

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import hyperloop_lm.infer.hf                             # registers model_type "hyperloop_lm"
    model = AutoModelForCausalLM.from_pretrained("hf/tiny-hyperloop")
    tok = AutoTokenizer.from_pretrained("hf/tiny-hyperloop")   # padding_side="left", pad = EOS
    batch = tok(["The king", "A"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)

`HyperloopForCausalLM` wraps our own `LM` (its weights are the LM's, under the `lm.` prefix), so
there is exactly one implementation of the math. The KV cache is the library's: `generate()` builds
a `DynamicCache(config=model.config)`, and `config.num_hidden_layers` is the *unrolled* depth
(n_begin + loops * n_middle + n_end), so the cache holds one layer per virtual layer. Every
attention call of the LM writes under its virtual layer index through a small view
(`_LibraryCacheView`), which also lets a `StaticCache` (`cache_implementation="static"`) work.
The 2-D `attention_mask` goes to the LM unchanged: it derives positions (left padding) and the
causal/padding mask itself.

Loop override: `config.inference_loops = K` (or `from_pretrained(..., inference_loops=K)`) runs the
middle block K times; `num_hidden_layers` follows, so generate's cache is sized to the new depth.
`loops` (the trained count) is part of the architecture and must not be changed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerFast)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from hyperloop_lm.config import ModelConfig
from hyperloop_lm.model.layers import rope_tables
from hyperloop_lm.model.lm import LM
from hyperloop_lm.utils import UserError, atomic_dir

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_DEFAULTS = ModelConfig().to_dict()


class HyperloopConfig(PreTrainedConfig):
    """A `ModelConfig` as a transformers config: every ModelConfig field is an attribute of the same
    name (so config.json reads like our meta.json), plus `inference_loops`.

    The fields are copied from ModelConfig at construction rather than redeclared, so the two cannot
    drift apart when ModelConfig gains a field.
    """

    model_type = "hyperloop_lm"
    keys_to_ignore_at_inference = ["past_key_values"]
    # standard names the library (and users' tooling) look for
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len", "num_key_value_heads": "n_heads"}

    def __init__(self, inference_loops: int | None = None, **kwargs: Any):
        for name in MODEL_FIELDS:
            kwargs.setdefault(name, _DEFAULTS[name])
        kwargs.setdefault("tie_word_embeddings", False)  # untied head [paper]
        self.inference_loops = inference_loops
        super().__init__(**kwargs)
        self.to_model_config()  # validate now: a bad config.json fails here, naming the field

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> "HyperloopConfig":
        return cls(**cfg.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({name: getattr(self, name) for name in MODEL_FIELDS})

    @property
    def loops_at_inference(self) -> int:
        return self.loops if self.inference_loops is None else self.inference_loops

    @property
    def num_hidden_layers(self) -> int:
        """Unrolled depth = number of virtual layers = KV-cache layers the library allocates."""
        return self.n_begin + self.loops_at_inference * self.n_middle + self.n_end

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class _LibraryCacheView:
    """What `LM` expects of a cache (`pos`, `update(vlayer, k, v)`, `advance`), backed by a transformers
    `Cache` with one layer per virtual layer."""

    def __init__(self, cache: Cache, depth: int):
        fixed = getattr(cache, "layer_class_to_replicate", None) is None
        if fixed and len(cache.layers) < depth:
            raise UserError(f"the cache has {len(cache.layers)} layers but this forward runs {depth} virtual layers; "
                            "build it with DynamicCache(config=model.config) after setting config.inference_loops")
        self.cache = cache
        self.pos = int(cache.get_seq_length())  # fixed for the whole forward (layer 0 grows during it)

    def update(self, vlayer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.update(k, v, vlayer)
        end = self.pos + k.shape[2]
        return keys[:, :, :end], values[:, :, :end]  # a StaticCache hands back its whole preallocated buffer

    def advance(self, n: int) -> None:
        pass  # the library's cache counts its own length


class HyperloopForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HyperloopConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True  # the LM calls F.scaled_dot_product_attention itself

    def __init__(self, config: HyperloopConfig):
        super().__init__(config)
        self.lm = LM(config.to_model_config())
        self.post_init()

    @classmethod
    def from_native(cls, lm: LM, **config_kwargs: Any) -> "HyperloopForCausalLM":
        """Wrap an existing LM (shared, not copied: works for quantized linears too)."""
        config = HyperloopConfig.from_model_config(lm.cfg, **config_kwargs)
        with torch.device("meta"):  # the placeholder LM built by __init__ is replaced right away
            model = cls(config)
        model.lm = lm
        return model.eval()

    def _init_weights(self, module: nn.Module) -> None:
        # The LM initialises its own parameters in __init__. Only its non-persistent RoPE tables need
        # recomputing here: from_pretrained builds the model on the meta device and loads weights only.
        if isinstance(module, LM):
            cfg = module.cfg
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
            with torch.no_grad():
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.head

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """generate() would turn the 2-D mask into a 4-D one for static caches; the LM wants the 2-D mask."""
        return attention_mask

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, loops: int | None = None,
                inputs_embeds: torch.Tensor | None = None, cache: Cache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """input_ids (B, T); attention_mask (B, cached + T), 0 = left padding; labels (B, T) -> mean
        next-token loss (-100 = ignore). loops overrides config.inference_loops for this call.
        cache: the same as past_key_values (transformers >= 5.24 passes it under this name)."""
        if inputs_embeds is not None or input_ids is None:
            raise UserError("HyperloopForCausalLM takes input_ids (inputs_embeds are not supported)")
        past_key_values = cache if past_key_values is None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        loops = self.config.inference_loops if loops is None else loops
        if past_key_values is None and use_cache:
            past_key_values = DynamicCache(config=self.config) if loops == self.config.inference_loops else DynamicCache()
        view = None if past_key_values is None else _LibraryCacheView(past_key_values, self.lm.depth(loops))
        self.lm.check_tokens(input_ids)
        logits = self.lm(input_ids, attention_mask=attention_mask, cache=view, loops=loops)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


AutoConfig.register(HyperloopConfig.model_type, HyperloopConfig, exist_ok=True)
AutoModelForCausalLM.register(HyperloopConfig, HyperloopForCausalLM, exist_ok=True)


# ---------------------------------------------------------------------------------------------- conversion
def hf_tokenizer(tokenizer_json: str | Path, eos_token: str) -> PreTrainedTokenizerFast:
    """Our tokenizer.json as a PreTrainedTokenizerFast: left padding (decoder-only batches), pad = EOS."""
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=eos_token, pad_token=eos_token,
                                   padding_side="left")


def to_hf(checkpoint: str | Path, out_dir: str | Path, *, inference_loops: int | None = None) -> Path:
    """Convert a checkpoint (or a run dir's latest) to a transformers directory: config.json,
    model.safetensors, generation_config.json and the tokenizer (tokenizer.json + tokenizer_config.json)."""
    from hyperloop_lm.infer.api import load_checkpoint
    from hyperloop_lm.train.checkpoint import resolve

    src = resolve(checkpoint)
    model, tokenizer, meta = load_checkpoint(src)
    if "quantization" in meta:
        raise UserError(f"{src} is a quantized checkpoint; the Hugging Face export takes fp32 checkpoints")
    eos = {} if tokenizer is None else {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}
    hf = HyperloopForCausalLM.from_native(model, inference_loops=inference_loops, **eos)
    hf.generation_config = GenerationConfig(**eos, do_sample=False)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:  # no half-converted directory
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            hf_tokenizer(src / "tokenizer.json", tokenizer.eos_token).save_pretrained(tmp)
        (tmp / "hyperloop_source.json").write_text(json.dumps({"checkpoint": str(src)}, indent=2) + "\n")
    return out


__all__ = ["HyperloopConfig", "HyperloopForCausalLM", "hf_tokenizer", "to_hf"]
